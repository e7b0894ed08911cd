//! The baseline `calls` is compared with: a direct Redis round trip. A
//! requester PUBLISHes to `<prefix>.rt.req`, paced per tick like the
//! callers; an echo holds a subscription to that channel and PUBLISHes each
//! message it gets back to `<prefix>.rt.rep`, which a collector holds:
//! latency is the collector's receipt minus the send time in the payload.
//! That is the least a call through the gateways needs (a PUBLISH to the
//! service's node, one back to the caller's), without the WebSocket hops.
//!
//! Spoken in raw RESP2 over four plain TCP connections, every writer
//! sending what it has in one write, so that the baseline carries no client
//! library's cost: it is the harder baseline to be compared with.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::hist::Hist;
use crate::sys::unix_nanos;

/// Largest bulk string or array accepted from Redis (a corrupt length must
/// not make the reader wait for, or allocate, gigabytes).
const MAX_LEN: i64 = 16 << 20;

/// A RESP2 value.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Resp {
    Simple(Vec<u8>),
    Error(Vec<u8>),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Resp>>),
}

/// A command as RESP.
pub(crate) fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn line(buf: &[u8], from: usize) -> Option<(&[u8], usize)> {
    let rest = buf.get(from..)?;
    let at = rest.windows(2).position(|w| w == b"\r\n")?;
    Some((&rest[..at], from + at + 2))
}

fn int(l: &[u8]) -> Result<i64, String> {
    std::str::from_utf8(l)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad RESP integer {:?}", String::from_utf8_lossy(l)))
}

/// The first complete value in `buf` and the bytes it took; `None` if
/// `buf` holds only part of one.
pub(crate) fn parse(buf: &[u8]) -> Result<Option<(Resp, usize)>, String> {
    parse_at(buf, 0)
}

fn parse_at(buf: &[u8], at: usize) -> Result<Option<(Resp, usize)>, String> {
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    let Some((l, next)) = line(buf, at + 1) else {
        return Ok(None);
    };
    let len = |l: &[u8]| -> Result<i64, String> {
        let n = int(l)?;
        if n > MAX_LEN {
            return Err(format!("RESP length {n} over the bench's bound"));
        }
        Ok(n)
    };
    Ok(Some(match kind {
        b'+' => (Resp::Simple(l.to_vec()), next),
        b'-' => (Resp::Error(l.to_vec()), next),
        b':' => (Resp::Int(int(l)?), next),
        b'$' => {
            let n = len(l)?;
            if n < 0 {
                (Resp::Bulk(None), next)
            } else {
                let end = next + n as usize;
                match buf.get(end..end + 2) {
                    None => return Ok(None),
                    Some(b"\r\n") => (Resp::Bulk(Some(buf[next..end].to_vec())), end + 2),
                    Some(_) => return Err("RESP bulk string without its CRLF".into()),
                }
            }
        }
        b'*' => {
            let n = len(l)?;
            if n < 0 {
                (Resp::Array(None), next)
            } else {
                let mut items = Vec::with_capacity((n as usize).min(16));
                let mut pos = next;
                for _ in 0..n {
                    match parse_at(buf, pos)? {
                        Some((v, p)) => {
                            items.push(v);
                            pos = p;
                        }
                        None => return Ok(None),
                    }
                }
                (Resp::Array(Some(items)), pos)
            }
        }
        other => return Err(format!("RESP type byte {other:#04x}")),
    }))
}

/// The payload of a pub/sub `message` push.
pub(crate) fn message_payload(v: Resp) -> Option<Vec<u8>> {
    let Resp::Array(Some(mut items)) = v else {
        return None;
    };
    if items.len() != 3 || items[0] != Resp::Bulk(Some(b"message".to_vec())) {
        return None;
    }
    match items.pop() {
        Some(Resp::Bulk(Some(p))) => Some(p),
        _ => None,
    }
}

/// `AUTH`'s arguments: the password, or the user and the password.
pub(crate) type Auth = Vec<Vec<u8>>;

/// Where Redis is, and how to log in: `redis://[[user]:password@]host:port[/db]`
/// (the database does not matter to pub/sub).
pub(crate) fn target(url: &str) -> Result<(String, Option<Auth>), String> {
    let rest = url
        .strip_prefix("redis://")
        .ok_or_else(|| format!("{url}: the direct round trip takes redis:// URLs"))?;
    let rest = rest.split('/').next().unwrap_or(rest);
    let (auth, hostport) = match rest.rsplit_once('@') {
        Some((a, h)) => (Some(a), h),
        None => (None, rest),
    };
    let auth = auth.map(|a| match a.split_once(':') {
        Some(("", pass)) => vec![pass.as_bytes().to_vec()],
        Some((user, pass)) => vec![user.as_bytes().to_vec(), pass.as_bytes().to_vec()],
        None => vec![a.as_bytes().to_vec()],
    });
    Ok((hostport.to_owned(), auth))
}

/// Reads RESP values from one connection.
struct Reader {
    half: OwnedReadHalf,
    buf: Vec<u8>,
    start: usize,
}

impl Reader {
    /// The next value, or an error when the connection ends.
    async fn next(&mut self) -> Result<Resp, String> {
        loop {
            if let Some((v, n)) = parse(&self.buf[self.start..])? {
                self.start += n;
                return Ok(v);
            }
            self.buf.drain(..self.start);
            self.start = 0;
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(64 * 1024);
            }
            let n = self
                .half
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| format!("redis read: {e}"))?;
            if n == 0 {
                return Err("redis closed the connection".into());
            }
        }
    }

    /// Whether a complete value is already buffered.
    fn has_value(&self) -> bool {
        matches!(parse(&self.buf[self.start..]), Ok(Some(_)))
    }
}

/// One connection, logged in: a reader and a writer half.
async fn open(url: &str) -> Result<(Reader, OwnedWriteHalf), String> {
    let (addr, auth) = target(url)?;
    let s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&addr))
        .await
        .map_err(|_| format!("redis {addr}: connect timed out"))?
        .map_err(|e| format!("redis {addr}: {e}"))?;
    s.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
    let (r, mut w) = s.into_split();
    let mut reader = Reader {
        half: r,
        buf: Vec::with_capacity(64 * 1024),
        start: 0,
    };
    if let Some(auth) = auth {
        let mut args: Vec<&[u8]> = vec![b"AUTH"];
        args.extend(auth.iter().map(Vec::as_slice));
        w.write_all(&command(&args))
            .await
            .map_err(|e| format!("redis write: {e}"))?;
        if let Resp::Error(e) = reader.next().await? {
            return Err(format!("AUTH: {}", String::from_utf8_lossy(&e)));
        }
    }
    Ok((reader, w))
}

/// A connection subscribed to `channel` (confirmed). The write half is
/// returned to be kept: dropping it would shut the socket's write side.
async fn subscribed(url: &str, channel: &str) -> Result<(Reader, OwnedWriteHalf), String> {
    let (mut r, mut w) = open(url).await?;
    w.write_all(&command(&[b"SUBSCRIBE", channel.as_bytes()]))
        .await
        .map_err(|e| format!("redis write: {e}"))?;
    match r.next().await? {
        Resp::Array(Some(items))
            if items.first() == Some(&Resp::Bulk(Some(b"subscribe".to_vec()))) => {}
        other => return Err(format!("SUBSCRIBE {channel}: {other:?}")),
    }
    Ok((r, w))
}

/// Reads the replies of a publishing connection until it ends.
async fn discard(mut r: Reader) {
    while r.next().await.is_ok() {}
}

/// What the round trip measured.
#[derive(Default)]
pub(crate) struct Measured {
    pub(crate) sent: u64,
    pub(crate) received: u64,
    /// From the first send to the last receipt.
    pub(crate) secs: f64,
    /// Round trips, µs.
    pub(crate) hist: Hist,
    /// Stopped waiting for the last replies at the bound.
    pub(crate) timed_out: bool,
}

/// Runs the round trip at `rate` for `duration`, `bytes` per message.
pub(crate) async fn run(
    url: &str,
    prefix: &str,
    rate: u64,
    duration: Duration,
    bytes: usize,
    tick: Duration,
    deadline: Instant,
) -> Result<Measured, String> {
    let req = format!("{prefix}.rt.req");
    let rep = format!("{prefix}.rt.rep");
    let collector = subscribed(url, &rep).await?;
    let echo_in = subscribed(url, &req).await?;
    let (echo_replies, echo_out) = open(url).await?;
    let (req_replies, req_out) = open(url).await?;
    let (target_tx, target_rx) = watch::channel(None);
    let collect = tokio::spawn(collect(collector, target_rx));
    let echo = tokio::spawn(echo(echo_in, echo_out, rep));
    let sinks = [
        tokio::spawn(discard(echo_replies)),
        tokio::spawn(discard(req_replies)),
    ];

    let start_ns = unix_nanos();
    let sent = request(req_out, &req, rate, duration, bytes, tick, deadline).await;
    let settle = (Instant::now() + Duration::from_secs(2)).min(deadline);
    let _ = target_tx.send(Some((*sent.as_ref().unwrap_or(&0), settle)));
    let collected = collect
        .await
        .map_err(|e| format!("round trip collector: {e}"));
    echo.abort();
    for s in sinks {
        s.abort();
    }
    let sent = sent?;
    let (received, hist, last_ns) = collected??;
    Ok(Measured {
        sent,
        received,
        secs: last_ns.saturating_sub(start_ns) as f64 / 1e9,
        timed_out: received < sent,
        hist,
    })
}

/// PUBLISHes `rate` messages a second to `channel` for `duration`: each
/// tick, every message due by then in one write.
async fn request(
    mut w: OwnedWriteHalf,
    channel: &str,
    rate: u64,
    duration: Duration,
    bytes: usize,
    tick: Duration,
    deadline: Instant,
) -> Result<u64, String> {
    let start = Instant::now();
    let end = (start + duration).min(deadline);
    let total = (duration.as_secs_f64() * rate as f64).ceil() as u64;
    let mut next_tick = start;
    let mut sent = 0u64;
    let mut out = Vec::with_capacity(64 * 1024);
    while sent < total {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let due = (((now - start).as_secs_f64() * rate as f64) as u64 + 1).min(total);
        if due > sent {
            let batch = (due - sent).min(4096);
            let t = unix_nanos();
            for seq in sent..sent + batch {
                let p = crate::rds::payload(t, seq, bytes);
                out.extend_from_slice(&command(&[b"PUBLISH", channel.as_bytes(), p.as_bytes()]));
            }
            w.write_all(&out)
                .await
                .map_err(|e| format!("redis write: {e}"))?;
            out.clear();
            sent += batch;
            continue;
        }
        while next_tick <= now {
            next_tick += tick;
        }
        tokio::time::sleep_until(next_tick.min(end).into()).await;
    }
    Ok(sent)
}

/// The echo: every message on the request channel, published back to
/// `rep`; what arrived together goes back in one write.
async fn echo(sub: (Reader, OwnedWriteHalf), mut w: OwnedWriteHalf, rep: String) {
    let (mut r, _keep) = sub;
    let mut out = Vec::with_capacity(64 * 1024);
    loop {
        let Ok(v) = r.next().await else { return };
        let mut push = |v: Resp| {
            if let Some(p) = message_payload(v) {
                out.extend_from_slice(&command(&[b"PUBLISH", rep.as_bytes(), &p]));
            }
        };
        push(v);
        while r.has_value() {
            let Ok(v) = r.next().await else { return };
            push(v);
        }
        if w.write_all(&out).await.is_err() {
            return;
        }
        out.clear();
    }
}

/// The collector: records each reply's round trip until told how many were
/// sent and they all came, or the time given with that number passes.
/// Returns (received, round trips in µs, unix nanos of the last receipt).
async fn collect(
    sub: (Reader, OwnedWriteHalf),
    mut target: watch::Receiver<Option<(u64, Instant)>>,
) -> Result<(u64, Hist, u64), String> {
    let (mut r, _keep) = sub;
    let (mut received, mut hist, mut last_ns) = (0u64, Hist::default(), 0u64);
    loop {
        let t = *target.borrow_and_update();
        if let Some((want, _)) = t {
            if received >= want {
                break;
            }
        }
        let until = t.map_or(Instant::now() + Duration::from_secs(86_400), |(_, u)| u);
        tokio::select! {
            v = r.next() => {
                if let Some(p) = message_payload(v?) {
                    let now = unix_nanos();
                    if let Some(sent) = crate::net::sent_nanos(&p) {
                        hist.record(now.saturating_sub(sent) / 1000);
                    }
                    received += 1;
                    last_ns = now;
                }
            }
            r = target.changed(), if t.is_none() => {
                if r.is_err() {
                    break;
                }
            }
            _ = tokio::time::sleep_until(until.into()), if t.is_some() => break,
        }
    }
    Ok((received, hist, last_ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resp_round_trip() {
        let c = command(&[b"PUBLISH", b"a.b", b"{\"t\":1}"]);
        assert_eq!(
            c,
            b"*3\r\n$7\r\nPUBLISH\r\n$3\r\na.b\r\n$7\r\n{\"t\":1}\r\n"
        );
        let push = b"*3\r\n$7\r\nmessage\r\n$3\r\na.b\r\n$7\r\n{\"t\":1}\r\n:1\r\n";
        let (v, n) = parse(push).ok().flatten().unwrap_or((Resp::Int(-1), 0));
        assert_eq!(n, push.len() - 4);
        assert_eq!(message_payload(v), Some(b"{\"t\":1}".to_vec()));
        assert_eq!(parse(&push[n..]), Ok(Some((Resp::Int(1), 4))));
        // Every proper prefix is incomplete, never an error.
        for cut in 0..n {
            assert_eq!(parse(&push[..cut]), Ok(None), "cut {cut}");
        }
        assert_eq!(parse(b"$-1\r\n"), Ok(Some((Resp::Bulk(None), 5))));
        assert_eq!(
            parse(b"-ERR no\r\n"),
            Ok(Some((Resp::Error(b"ERR no".to_vec()), 9)))
        );
        assert!(parse(b"$3\r\nabcd\r\n").is_err());
        assert!(parse(b"$99999999999\r\n").is_err());
        assert!(parse(b"?x\r\n").is_err());
        let sub = b"*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n";
        let (v, _) = parse(sub).ok().flatten().unwrap_or((Resp::Int(-1), 0));
        assert_eq!(message_payload(v), None);
    }

    #[test]
    fn urls() {
        assert_eq!(
            target("redis://127.0.0.1:7001"),
            Ok(("127.0.0.1:7001".into(), None))
        );
        assert_eq!(
            target("redis://:pw@127.0.0.1:7001/2"),
            Ok(("127.0.0.1:7001".into(), Some(vec![b"pw".to_vec()])))
        );
        assert_eq!(
            target("redis://u:pw@h:1"),
            Ok(("h:1".into(), Some(vec![b"u".to_vec(), b"pw".to_vec()])))
        );
        assert!(target("rediss://h:1").is_err());
    }
}
