//! `wsgate-bench baseline`: the reference fan-out server of issue 13, the
//! yardstick wsgate's CPU per delivery, latency, arrival spread and idle
//! memory are divided by in the same run (these machines drift by 20%
//! between runs; ratios taken minutes apart do not).
//!
//! It is the simple design and nothing more: tokio-tungstenite, one task per
//! socket (4 KiB read buffer), one Redis pub/sub connection whose reader
//! renders each message's native delivery frame once and hands it to every
//! subscribed socket's bounded queue; a socket task, woken, feeds every
//! queued frame and flushes once. It speaks just enough of the native
//! protocol (docs/protocol.md) for the bench's load client: `subscribe`,
//! `unsubscribe` and `ping` requests, their replies, and deliveries with the
//! same bytes as wsgate's. It is not a product: no auth, no limits beyond
//! the queue bound (a full queue drops the frame, counted as the client's
//! loss), no gap notices, Redis subscriptions kept until exit (so an
//! unsubscribe never races a subscribe), no reconnect (a lost Redis link
//! ends the process).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use redis::aio::PubSubSink;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Printed by `wsgate-bench baseline --help`.
pub(crate) const USAGE: &str = "\
wsgate-bench baseline: the minimal reference fan-out server (issue 13's yardstick)

USAGE:
  wsgate-bench baseline --listen 127.0.0.1:PORT --redis redis://127.0.0.1:PORT
                        [--threads N] [--queue FRAMES]

  --listen ADDR    address to serve WebSockets on (any path)
  --redis URL      Redis to PSUBSCRIBE/SUBSCRIBE on
  --threads N      runtime worker threads [number of CPUs, as wsgate]
  --queue FRAMES   frames queued per socket before drops [5600: 1 MiB of the bench's
                   100-byte-payload frames (~188 B), as WSGATE_CLIENT_QUEUE_BYTES]
Runs until SIGINT/SIGTERM or until the Redis link is lost.
";

/// A subscription's key: (pattern?, name), as Redis reports it back.
type Key = (bool, String);

/// One socket's entry in a topic: its id (to leave) and its queue.
type Member = (u64, mpsc::Sender<Utf8Bytes>);

/// Topic -> members; locked only for plain, await-free work.
type Registry = Arc<Mutex<HashMap<Key, Vec<Member>>>>;

/// Parses the options and serves until stopped.
pub(crate) fn main(args: &[String]) -> Result<(), String> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return Ok(());
    }
    let (mut listen, mut redis_url) = (None, None);
    let mut threads = crate::sys::nproc();
    // wsgate's default WSGATE_CLIENT_QUEUE_BYTES (1 MiB) in the bench's
    // frames, so that both servers give up on a slow reader at the same depth.
    let mut queue = 5600usize;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = Some(value()?),
            "--redis" => redis_url = Some(value()?),
            "--threads" => threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?,
            "--queue" => queue = value()?.parse().map_err(|e| format!("--queue: {e}"))?,
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    let listen = listen.ok_or("--listen is required")?;
    let redis_url = redis_url.ok_or("--redis is required")?;
    if threads == 0 || queue == 0 {
        return Err("--threads and --queue must be >= 1".into());
    }
    crate::sys::raise_fd_limit().map_err(|e| format!("RLIMIT_NOFILE: {e}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(serve(&listen, &redis_url, queue))
}

async fn serve(listen: &str, redis_url: &str, queue: usize) -> Result<(), String> {
    let client = redis::Client::open(redis_url).map_err(|e| format!("redis: {e}"))?;
    let pubsub = client
        .get_async_pubsub()
        .await
        .map_err(|e| format!("redis {redis_url}: {e}"))?;
    let (sink, mut stream) = pubsub.split();
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("listen {listen}: {e}"))?;
    eprintln!("wsgate-bench baseline: serving ws://{listen}/ (Redis {redis_url})");
    let registry: Registry = Arc::default();
    let dropped = Arc::new(AtomicU64::new(0));

    let reader = {
        let (registry, dropped) = (registry.clone(), dropped.clone());
        async move {
            while let Some(msg) = stream.next().await {
                dispatch(&registry, &dropped, &msg);
            }
        }
    };
    let accept = async {
        let mut next_id = 0u64;
        loop {
            match listener.accept().await {
                Ok((tcp, _)) => {
                    next_id += 1;
                    let socket = Socket {
                        id: next_id,
                        registry: registry.clone(),
                        sink: sink.clone(),
                        queue,
                    };
                    tokio::spawn(socket.run(tcp));
                }
                // Out of fds and the like: keep serving the sockets held.
                Err(e) => {
                    eprintln!("baseline: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
    };
    let stop = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    let outcome = tokio::select! {
        _ = reader => Err("the Redis link was lost".to_owned()),
        _ = accept => Ok(()),
        _ = stop => Ok(()),
    };
    eprintln!(
        "wsgate-bench baseline: stopping; {} frames dropped on full queues",
        dropped.load(Ordering::Relaxed)
    );
    outcome
}

/// One Redis message: its frame rendered once, queued to every member.
fn dispatch(registry: &Registry, dropped: &AtomicU64, msg: &redis::Msg) {
    let channel = String::from_utf8_lossy(msg.get_channel_name().as_bytes()).into_owned();
    let pattern = msg
        .get_pattern::<Option<Vec<u8>>>()
        .ok()
        .flatten()
        .map(|p| String::from_utf8_lossy(&p).into_owned());
    let frame = Utf8Bytes::from(delivery(
        pattern.as_deref(),
        &channel,
        msg.get_payload_bytes(),
    ));
    let key = match pattern {
        Some(p) => (true, p),
        None => (false, channel),
    };
    let Ok(reg) = registry.lock() else { return };
    for (_, tx) in reg.get(&key).into_iter().flatten() {
        if tx.try_send(frame.clone()).is_err() {
            dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// wsgate's native delivery, byte for byte for JSON and UTF-8 payloads
/// (non-UTF-8 payloads, which the bench never sends, become lossy text
/// rather than base64).
fn delivery(pattern: Option<&str>, channel: &str, payload: &[u8]) -> String {
    let mut out = String::with_capacity(64 + channel.len() + payload.len() * 4 / 3);
    out.push_str("{\"action\":\"message\",");
    if let Some(p) = pattern {
        out.push_str("\"pattern\":");
        push_str(&mut out, p);
        out.push(',');
    }
    out.push_str("\"channel\":");
    push_str(&mut out, channel);
    out.push_str(",\"payload\":");
    match std::str::from_utf8(payload) {
        Ok(text) if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() => {
            out.push_str(text)
        }
        Ok(text) => push_str(&mut out, text),
        Err(_) => push_str(&mut out, &String::from_utf8_lossy(payload)),
    }
    out.push('}');
    out
}

/// `s` as a JSON string.
fn push_str(out: &mut String, s: &str) {
    out.push_str(&Value::from(s).to_string());
}

/// One socket's task state.
struct Socket {
    id: u64,
    registry: Registry,
    sink: PubSubSink,
    queue: usize,
}

impl Socket {
    async fn run(mut self, tcp: TcpStream) {
        let _ = tcp.set_nodelay(true);
        let config = WebSocketConfig::default().read_buffer_size(4096);
        let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(tcp, Some(config)).await
        else {
            return;
        };
        let (tx, mut rx) = mpsc::channel::<Utf8Bytes>(self.queue);
        let mut held: Vec<Key> = Vec::new();
        loop {
            tokio::select! {
                m = ws.next() => match m {
                    Some(Ok(Message::Text(t))) => {
                        let reply = self.request(t.as_str(), &tx, &mut held).await;
                        if ws.send(Message::Text(reply.into())).await.is_err() {
                            break;
                        }
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => {}
                },
                f = rx.recv() => {
                    // The task holds `tx`, so the queue never closes.
                    let Some(f) = f else { break };
                    if ws.feed(Message::Text(f)).await.is_err() {
                        break;
                    }
                    let mut ok = true;
                    while let Ok(f) = rx.try_recv() {
                        if ws.feed(Message::Text(f)).await.is_err() {
                            ok = false;
                            break;
                        }
                    }
                    if !ok || ws.flush().await.is_err() {
                        break;
                    }
                }
            }
        }
        if let Ok(mut reg) = self.registry.lock() {
            for key in held {
                leave(&mut reg, &key, self.id);
            }
        }
    }

    /// One native request; the reply text.
    async fn request(
        &mut self,
        text: &str,
        tx: &mpsc::Sender<Utf8Bytes>,
        held: &mut Vec<Key>,
    ) -> String {
        let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
        let action = v["action"].as_str().unwrap_or("");
        let id = v["id"].as_str();
        let topic = match (&v["pattern"], &v["channel"]) {
            (Value::String(p), _) => Some((true, p.clone())),
            (_, Value::String(c)) => Some((false, c.clone())),
            _ => None,
        };
        let mut tail = String::new();
        if let Some((pattern, name)) = &topic {
            tail.push_str(if *pattern {
                ",\"pattern\":"
            } else {
                ",\"channel\":"
            });
            push_str(&mut tail, name);
        }
        if let Some(id) = id {
            tail.push_str(",\"id\":");
            push_str(&mut tail, id);
        }
        if action == "ping" {
            return format!("{{\"action\":\"pong\"{tail}}}");
        }
        let mut out = format!("{{\"action\":{}{tail}", Value::from(action));
        let error = match (action, topic) {
            ("subscribe", Some(key)) if held.contains(&key) => Some("already subscribed".into()),
            ("subscribe", Some(key)) => self.subscribe(key, tx, held).await.err(),
            ("unsubscribe", Some(key)) if held.contains(&key) => {
                held.retain(|k| k != &key);
                if let Ok(mut reg) = self.registry.lock() {
                    leave(&mut reg, &key, self.id);
                }
                None
            }
            ("unsubscribe", Some(_)) => Some("not subscribed".into()),
            _ => Some("unsupported by the reference server".to_owned()),
        };
        match error {
            None => out.push_str(",\"status\":true}"),
            Some(e) => {
                out.push_str(",\"status\":false,\"error\":");
                push_str(&mut out, &e);
                out.push('}');
            }
        }
        out
    }

    /// Joins the topic, then asks Redis and waits for its confirmation (a
    /// repeated `PSUBSCRIBE` is answered again, so every subscriber's reply
    /// follows Redis's).
    async fn subscribe(
        &mut self,
        key: Key,
        tx: &mpsc::Sender<Utf8Bytes>,
        held: &mut Vec<Key>,
    ) -> Result<(), String> {
        if let Ok(mut reg) = self.registry.lock() {
            reg.entry(key.clone())
                .or_default()
                .push((self.id, tx.clone()));
        }
        held.push(key.clone());
        let (pattern, name) = key;
        let r = if pattern {
            self.sink.psubscribe(&name).await
        } else {
            self.sink.subscribe(&name).await
        };
        if let Err(e) = r {
            held.retain(|k| k.0 != pattern || k.1 != name);
            if let Ok(mut reg) = self.registry.lock() {
                leave(&mut reg, &(pattern, name), self.id);
            }
            return Err(format!("refused by Redis: {e}"));
        }
        Ok(())
    }
}

/// Removes socket `id` from topic `key`.
fn leave(reg: &mut HashMap<Key, Vec<Member>>, key: &Key, id: u64) {
    if let Some(members) = reg.get_mut(key) {
        members.retain(|(m, _)| *m != id);
        if members.is_empty() {
            reg.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_bytes_match_the_native_protocol() {
        assert_eq!(
            delivery(Some("news.*"), "news.sport", br#"{"score":3}"#),
            r#"{"action":"message","pattern":"news.*","channel":"news.sport","payload":{"score":3}}"#
        );
        assert_eq!(
            delivery(None, "a\"b", b"hello"),
            r#"{"action":"message","channel":"a\"b","payload":"hello"}"#
        );
    }
}
