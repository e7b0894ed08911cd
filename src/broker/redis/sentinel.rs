//! Redis Sentinel: which server is the master now, and when that changes.
//!
//! A `redis+sentinel://` URL names sentinels, not a Redis. Every connect
//! (first or after a failure) asks them afresh ([`Sentinel::resolve`]:
//! `SENTINEL get-master-addr-by-name`, each sentinel in turn from the last
//! one that answered, each within [`ASK_TIMEOUT`]), and the handshake ends
//! with `ROLE` so a connection that reached a server which is no longer the
//! master (the sentinels' view lags a failover) fails and asks again.
//!
//! Connections also drop at once when the sentinels announce a new master:
//! one task per URL ([`watch`], started by the first connect, ended when the
//! last connection's [`Target`](super::conn::Target) is dropped) holds a
//! sentinel connection `SUBSCRIBE`d to `+switch-master` and publishes the
//! announced address; each connection waits for an announcement that names
//! another server than its own ([`Moved`]). A demoted master usually closes
//! our connections itself (Sentinel sends it `CLIENT KILL`), a publish there
//! gets `READONLY` (the publish connection then reconnects), and a dead one
//! fails the PING probe: any of these four signals is enough.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tracing::{debug, info, warn, Instrument};

use super::conn::exchange;
use super::resp::{self, Value};
use super::stream::{Stream, Tls};

/// Bound on one sentinel's answer (connect, `AUTH`, the query): sentinels
/// answer from memory, so a slow one is skipped for the next.
pub(crate) const ASK_TIMEOUT: Duration = Duration::from_millis(500);
/// How often the `+switch-master` connection PINGs its sentinel, and checks
/// whether anyone still needs it; three silent periods make it move on.
const WATCH_TICK: Duration = Duration::from_secs(1);

/// The sentinels of one URL and the master they watch.
#[derive(Debug)]
pub(crate) struct Sentinel {
    /// `host:port` of each sentinel, in URL order.
    pub(crate) nodes: Vec<(String, u16)>,
    /// The master's name (`mymaster`).
    pub(crate) master: String,
    /// `WSGATE_REDIS_SENTINEL_PASSWORD`: the sentinels' own `AUTH`.
    pub(crate) password: Option<String>,
    /// TLS for the sentinels too (`rediss+sentinel://`).
    pub(crate) tls: Option<Tls>,
    /// The sentinel that answered last: asked first next time.
    preferred: AtomicUsize,
    /// The master last announced by `+switch-master`.
    announced: watch::Sender<Option<(String, u16)>>,
    /// Whether the `+switch-master` task runs.
    watching: AtomicBool,
}

impl Sentinel {
    /// Sentinels at `nodes` watching `master`.
    pub(crate) fn new(
        nodes: Vec<(String, u16)>,
        master: String,
        password: Option<String>,
        tls: Option<Tls>,
    ) -> Sentinel {
        Sentinel {
            nodes,
            master,
            password,
            tls,
            preferred: AtomicUsize::new(0),
            announced: watch::Sender::new(None),
            watching: AtomicBool::new(false),
        }
    }

    /// The master's address as the first sentinel that knows answers, and
    /// the watch of later announcements (marked seen before asking, so an
    /// announcement made meanwhile still counts). Starts the
    /// `+switch-master` task on first use.
    pub(crate) async fn resolve(self: &Arc<Self>) -> Result<((String, u16), Moved), String> {
        if !self.watching.swap(true, Ordering::AcqRel) {
            let span = tracing::info_span!("redis_sentinel_watch", master = %self.master);
            tokio::spawn(watch(Arc::downgrade(self)).instrument(span));
        }
        let mut announced = self.announced.subscribe();
        announced.borrow_and_update();
        let n = self.nodes.len();
        let first = self.preferred.load(Ordering::Relaxed);
        let mut causes = Vec::with_capacity(n);
        for i in (0..n).map(|i| (first + i) % n) {
            let Some((host, port)) = self.nodes.get(i) else {
                continue;
            };
            match tokio::time::timeout(ASK_TIMEOUT, self.ask(host, *port)).await {
                Ok(Ok(addr)) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok((addr.clone(), Moved::new(announced, addr)));
                }
                Ok(Err(cause)) => causes.push(format!("{host}:{port}: {cause}")),
                Err(_) => causes.push(format!("{host}:{port}: no answer within {ASK_TIMEOUT:?}")),
            }
        }
        Err(format!(
            "no sentinel knows master {:?}: {}",
            self.master,
            causes.join("; ")
        ))
    }

    /// Connects to one sentinel, authenticates when a password is set.
    async fn open(
        &self,
        host: &str,
        port: u16,
        then: &[&[u8]],
    ) -> Result<(Stream, Vec<Value>), String> {
        let mut stream = Stream::connect(host, port, self.tls.as_ref()).await?;
        let mut cmd = BytesMut::new();
        let mut expected = 1;
        if let Some(pw) = &self.password {
            resp::encode_command(&mut cmd, [&b"AUTH"[..], pw.as_bytes()].into_iter());
            expected += 1;
        }
        resp::encode_command(&mut cmd, then.iter().copied());
        let replies = exchange(&mut stream, &cmd, expected).await?;
        if let Some(Value::Error(e)) = replies.first() {
            return Err(format!("AUTH refused: {}", String::from_utf8_lossy(e)));
        }
        Ok((stream, replies))
    }

    /// `SENTINEL get-master-addr-by-name` on one sentinel.
    async fn ask(&self, host: &str, port: u16) -> Result<(String, u16), String> {
        let query: [&[u8]; 3] = [
            b"SENTINEL",
            b"get-master-addr-by-name",
            self.master.as_bytes(),
        ];
        let (_, replies) = self.open(host, port, &query).await?;
        match replies.last() {
            Some(Value::Array(items)) => match items.as_slice() {
                [Value::Bulk(h), Value::Bulk(p)] => {
                    let host = String::from_utf8_lossy(h).into_owned();
                    let port = std::str::from_utf8(p)
                        .ok()
                        .and_then(|p| p.parse().ok())
                        .ok_or_else(|| format!("bad port in {items:?}"))?;
                    Ok((host, port))
                }
                other => Err(format!("unexpected reply {other:?}")),
            },
            Some(Value::Null) => Err("unknown master name".to_owned()),
            other => Err(format!("unexpected reply {other:?}")),
        }
    }
}

/// What a connection to the master waits on to learn that the sentinels
/// announced another one.
pub(crate) struct Moved {
    announced: Option<watch::Receiver<Option<(String, u16)>>>,
    addr: (String, u16),
}

impl Moved {
    fn new(announced: watch::Receiver<Option<(String, u16)>>, addr: (String, u16)) -> Moved {
        Moved {
            announced: Some(announced),
            addr,
        }
    }

    /// For a URL without sentinels: never resolves.
    pub(crate) fn never() -> Moved {
        Moved {
            announced: None,
            addr: (String::new(), 0),
        }
    }

    /// Resolves once the sentinels announced a master other than the one
    /// this connection reached; pending forever otherwise.
    pub(crate) async fn wait(&mut self) {
        let Some(rx) = self.announced.as_mut() else {
            return std::future::pending().await;
        };
        loop {
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
            if rx
                .borrow_and_update()
                .as_ref()
                .is_some_and(|a| *a != self.addr)
            {
                return;
            }
        }
    }
}

/// The `+switch-master` task: a connection to one sentinel after another,
/// `SUBSCRIBE`d to `+switch-master`, publishing each announcement for our
/// master, until nobody holds the [`Sentinel`] any more.
async fn watch(sentinel: Weak<Sentinel>) {
    let mut at = 0usize;
    loop {
        let Some(s) = sentinel.upgrade() else { return };
        let n = s.nodes.len().max(1);
        let Some((host, port)) = s.nodes.get(at % n).cloned() else {
            return;
        };
        at += 1;
        let opened = tokio::time::timeout(
            ASK_TIMEOUT,
            s.open(&host, port, &[b"SUBSCRIBE", b"+switch-master"]),
        )
        .await;
        let stream = match opened {
            Ok(Ok((stream, _))) => stream,
            Ok(Err(cause)) => {
                debug!(%cause, sentinel = %format!("{host}:{port}"), "cannot watch +switch-master");
                drop(s);
                tokio::time::sleep(ASK_TIMEOUT).await;
                continue;
            }
            Err(_) => continue,
        };
        debug!(sentinel = %format!("{host}:{port}"), "watching +switch-master");
        drop(s);
        if follow(&sentinel, stream).await.is_err() {
            return;
        }
    }
}

/// Reads announcements from one sentinel connection until it fails
/// (`Ok`: try the next sentinel) or nobody needs them (`Err`).
async fn follow(sentinel: &Weak<Sentinel>, mut stream: Stream) -> Result<(), ()> {
    let mut buf = BytesMut::with_capacity(1024);
    let mut tick = tokio::time::interval(WATCH_TICK);
    let mut silent = 0u32;
    let mut ping = BytesMut::new();
    resp::encode_command(&mut ping, [&b"PING"[..]].into_iter());
    loop {
        tokio::select! {
            read = stream.read_buf(&mut buf) => {
                match read {
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(_) => silent = 0,
                }
                loop {
                    let value = match resp::parse(&mut buf) {
                        Ok(Some(v)) => v,
                        Ok(None) => break,
                        Err(_) => return Ok(()),
                    };
                    let Some(s) = sentinel.upgrade() else { return Err(()) };
                    if let Some(addr) = switched_to(&value, &s.master) {
                        info!(master = %s.master, to = %format!("{}:{}", addr.0, addr.1), "+switch-master");
                        s.announced.send_replace(Some(addr));
                    }
                }
            }
            _ = tick.tick() => {
                if sentinel.strong_count() == 0 {
                    return Err(());
                }
                silent += 1;
                if silent > 3 {
                    warn!("sentinel silent: watching +switch-master on the next one");
                    return Ok(());
                }
                if stream.write_all(&ping).await.is_err() || stream.flush().await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// The new address in a `+switch-master` message (`<master> <old-ip>
/// <old-port> <new-ip> <new-port>`) for `master`.
fn switched_to(value: &Value, master: &str) -> Option<(String, u16)> {
    let Value::Array(items) = value else {
        return None;
    };
    let [Value::Bulk(kind), Value::Bulk(_), Value::Bulk(text)] = items.as_slice() else {
        return None;
    };
    if &kind[..] != b"message" {
        return None;
    }
    let text = std::str::from_utf8(text).ok()?;
    let words: Vec<&str> = text.split(' ').collect();
    match words.as_slice() {
        [name, _, _, host, port] if *name == master => {
            Some(((*host).to_owned(), port.parse().ok()?))
        }
        _ => None,
    }
}

/// Whether a `ROLE` reply says master.
pub(crate) fn is_master(role: &Value) -> Result<(), String> {
    match role {
        Value::Array(items) => match items.first() {
            Some(Value::Bulk(r)) if &r[..] == b"master" => Ok(()),
            Some(Value::Bulk(r)) => Err(format!(
                "reached a {} where the sentinels said master: asking them again",
                String::from_utf8_lossy(r)
            )),
            _ => Err(format!("unexpected ROLE reply {items:?}")),
        },
        Value::Error(e) => Err(format!("ROLE refused: {}", String::from_utf8_lossy(e))),
        other => Err(format!("unexpected ROLE reply {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn bulk(s: &str) -> Value {
        Value::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn reads_switch_master_for_our_master_only() {
        let msg =
            |text: &str| Value::Array(vec![bulk("message"), bulk("+switch-master"), bulk(text)]);
        assert_eq!(
            switched_to(&msg("mymaster 127.0.0.1 7001 127.0.0.1 7002"), "mymaster"),
            Some(("127.0.0.1".to_owned(), 7002))
        );
        assert_eq!(
            switched_to(&msg("other 1.1.1.1 1 2.2.2.2 2"), "mymaster"),
            None
        );
        assert_eq!(switched_to(&bulk("PONG"), "mymaster"), None);
    }

    #[test]
    fn role_must_be_master() {
        assert!(is_master(&Value::Array(vec![bulk("master"), Value::Integer(0)])).is_ok());
        assert!(is_master(&Value::Array(vec![bulk("slave")])).is_err());
        assert!(is_master(&Value::Error(Bytes::from_static(b"NOPERM"))).is_err());
    }
}
