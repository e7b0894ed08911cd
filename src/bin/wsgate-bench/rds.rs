//! Redis: a publisher paced to a rate, and the few admin commands the
//! workloads read (INFO, PUBSUB NUMPAT, PING, CLIENT KILL).

use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;

use crate::sys::unix_nanos;

/// Opens a multiplexed connection with explicit timeouts.
pub(crate) async fn connect(url: &str, timeout: Duration) -> Result<MultiplexedConnection, String> {
    let client = redis::Client::open(url).map_err(|e| format!("redis {url}: {e}"))?;
    let cfg = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(Duration::from_secs(5)));
    client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
        .map_err(|e| format!("redis {url}: {e}"))
}

/// `INFO section` as text.
/// `CLIENT KILL TYPE pubsub`: cuts every pub/sub connection (the gateways'
/// broker links); returns how many Redis closed.
pub(crate) async fn kill_pubsub(conn: &mut MultiplexedConnection) -> Result<i64, String> {
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(conn)
        .await
        .map_err(|e| format!("CLIENT KILL: {e}"))
}

pub(crate) async fn info(
    conn: &mut MultiplexedConnection,
    section: &str,
) -> Result<String, String> {
    redis::cmd("INFO")
        .arg(section)
        .query_async::<String>(conn)
        .await
        .map_err(|e| format!("INFO {section}: {e}"))
}

/// A `key:value` field of INFO text.
pub(crate) fn info_field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
}

/// Redis CPU seconds (user + sys) from `INFO cpu`.
pub(crate) async fn cpu_secs(conn: &mut MultiplexedConnection) -> Result<f64, String> {
    let text = info(conn, "cpu").await?;
    let f = |k| {
        info_field(&text, k)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok(f("used_cpu_user") + f("used_cpu_sys"))
}

/// Calls of the pub/sub (un)subscribe commands so far, from `INFO commandstats`.
pub(crate) async fn subscribe_calls(conn: &mut MultiplexedConnection) -> Result<u64, String> {
    let text = info(conn, "commandstats").await?;
    let mut total = 0;
    for cmd in ["subscribe", "psubscribe", "unsubscribe", "punsubscribe"] {
        let calls = info_field(&text, &format!("cmdstat_{cmd}"))
            .and_then(|v| v.split(',').find_map(|kv| kv.strip_prefix("calls=")))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        total += calls;
    }
    Ok(total)
}

/// `PUBSUB NUMPAT`.
pub(crate) async fn numpat(conn: &mut MultiplexedConnection) -> Result<i64, String> {
    redis::cmd("PUBSUB")
        .arg("NUMPAT")
        .query_async::<i64>(conn)
        .await
        .map_err(|e| format!("PUBSUB NUMPAT: {e}"))
}

/// Exact channels with subscribers that match `pattern` (`PUBSUB CHANNELS`).
pub(crate) async fn channels_matching(
    conn: &mut MultiplexedConnection,
    pattern: &str,
) -> Result<usize, String> {
    redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg(pattern)
        .query_async::<Vec<Vec<u8>>>(conn)
        .await
        .map(|v| v.len())
        .map_err(|e| format!("PUBSUB CHANNELS: {e}"))
}

/// What the publisher did.
#[derive(Debug, Default)]
pub(crate) struct Published {
    /// PUBLISH commands answered.
    pub(crate) messages: u64,
    /// Sum of PUBLISH replies (subscriptions reached, one per node and topic).
    pub(crate) receivers: i64,
    /// Publish start, unix nanos.
    pub(crate) start_ns: u64,
    /// From the first to the last PUBLISH answered.
    pub(crate) secs: f64,
    /// Pipelines sent.
    pub(crate) batches: u64,
    /// Stopped early because the run's time was up.
    pub(crate) timed_out: bool,
    /// PUBLISH commands sent to each server (one entry without shards).
    pub(crate) per_server: Vec<u64>,
}

/// Publishes `messages` messages at `rate` per second, paced per `tick`
/// (each tick sends, as one pipeline per server, every message due by
/// then), to the channel `channel(seq)`. Payload: `{"t":<unix nanos>,"s":<seq>,"p":"x…"}`
/// padded to `payload_bytes`. Each message goes to its channel's owner on
/// `route` (the server the gateway subscribed it on), and the servers'
/// pipelines of one tick are in flight together.
pub(crate) async fn publish(
    route: &crate::route::Route,
    rate: u64,
    messages: u64,
    shape: Shape,
    tick: Duration,
    deadline: Instant,
    channel: impl Fn(u64) -> String,
) -> Result<Published, String> {
    let mut conns = Vec::with_capacity(route.servers.len());
    for url in &route.servers {
        conns.push(connect(url, Duration::from_secs(2)).await?);
    }
    let n = conns.len().max(1);
    let mut out = Published {
        start_ns: unix_nanos(),
        per_server: vec![0; n],
        ..Published::default()
    };
    let start = Instant::now();
    let mut next_tick = start;
    let mut sent = 0u64;
    while sent < messages {
        if Instant::now() >= deadline {
            out.timed_out = true;
            break;
        }
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64 + 1).min(messages);
        if due > sent {
            // Bound one pipeline; the next round catches up at once.
            let batch = (due - sent).min(4096);
            let mut pipes: Vec<redis::Pipeline> = (0..n).map(|_| redis::pipe()).collect();
            let t = unix_nanos();
            for seq in sent..sent + batch {
                let name = channel(seq);
                let owner = route.owner(name.as_bytes()).min(n - 1);
                pipes[owner]
                    .cmd(route.command)
                    .arg(name)
                    .arg(shape.payload(t, seq));
                out.per_server[owner] += 1;
            }
            let replies = futures_util::future::join_all(
                conns
                    .iter_mut()
                    .zip(&pipes)
                    .filter(|(_, p)| !p.is_empty())
                    .map(|(conn, pipe)| pipe.query_async::<Vec<i64>>(conn)),
            )
            .await;
            for r in replies {
                out.receivers += r.map_err(|e| format!("PUBLISH: {e}"))?.iter().sum::<i64>();
            }
            sent += batch;
            out.batches += 1;
            continue;
        }
        next_tick += tick;
        let now = Instant::now();
        if next_tick > now {
            tokio::time::sleep_until(next_tick.into()).await;
        } else {
            next_tick = now;
        }
    }
    out.messages = sent;
    out.secs = start.elapsed().as_secs_f64();
    Ok(out)
}

/// The payload of message `seq` sent at `t`, padded with `x` to `bytes`.
pub(crate) fn payload(t: u64, seq: u64, bytes: usize) -> String {
    let mut p = format!("{{\"t\":{t},\"s\":{seq},\"p\":\"");
    let pad = bytes.saturating_sub(p.len() + 2);
    p.extend(std::iter::repeat_n('x', pad));
    p.push_str("\"}");
    p
}

/// What the publisher's payloads look like: their size, and JSON records
/// or padding.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    /// About this many bytes.
    pub(crate) bytes: usize,
    /// [`json_payload`] rather than [`payload`].
    pub(crate) json: bool,
}

impl Shape {
    /// Message `seq`'s payload, sent at `t`.
    pub(crate) fn payload(self, t: u64, seq: u64) -> String {
        if self.json {
            json_payload(t, seq, self.bytes)
        } else {
            payload(t, seq, self.bytes)
        }
    }
}

/// The payload of message `seq` sent at `t` as an application would send
/// it (`--payload-shape json`): an array of records with varied names and
/// numbers, about `bytes` long (within one record), so that a compressor
/// finds what it finds in real JSON, not a run of `x`.
pub(crate) fn json_payload(t: u64, seq: u64, bytes: usize) -> String {
    const SIDES: [&str; 2] = ["buy", "sell"];
    const VENUES: [&str; 4] = ["XNYS", "XNAS", "BATS", "ARCX"];
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut p = format!("{{\"t\":{t},\"s\":{seq},\"trades\":[");
    let mut i = 0;
    while p.len() + 2 < bytes {
        let r = next();
        let sym: String = (0..4)
            .map(|k| char::from(b'A' + ((r >> (8 * k)) % 26) as u8))
            .collect();
        if i > 0 {
            p.push(',');
        }
        p.push_str(&format!(
            "{{\"id\":{},\"sym\":\"{sym}\",\"px\":{}.{:02},\"qty\":{},\"side\":\"{}\",\"venue\":\"{}\"}}",
            seq * 100 + i,
            (r >> 32) % 1000,
            (r >> 44) % 100,
            (r >> 20) % 5000 + 1,
            SIDES[(r >> 5) as usize % 2],
            VENUES[(r >> 9) as usize % 4],
        ));
        i += 1;
    }
    p.push_str("]}");
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_payload_is_json_of_about_the_size_asked() {
        let p = json_payload(1_712_345_678_901_234_567, 42, 2048);
        assert!((2048..2048 + 120).contains(&p.len()), "{}", p.len());
        let v: serde_json::Value = serde_json::from_str(&p).unwrap_or_default();
        assert_eq!(v["s"], 42);
        assert!(v["trades"].as_array().is_some_and(|a| a.len() > 20));
        assert_eq!(
            crate::net::sent_nanos(p.as_bytes()),
            Some(1_712_345_678_901_234_567)
        );
        assert_ne!(p, json_payload(1_712_345_678_901_234_567, 43, 2048));
    }

    #[test]
    fn payload_is_json_of_the_size_asked() {
        let p = payload(1_712_345_678_901_234_567, 42, 100);
        assert_eq!(p.len(), 100);
        let v: serde_json::Value = serde_json::from_str(&p).unwrap_or_default();
        assert_eq!(v["s"], 42);
        assert_eq!(
            crate::net::sent_nanos(p.as_bytes()),
            Some(1_712_345_678_901_234_567)
        );
        assert!(payload(1, 1, 0).len() < 30);
    }

    #[test]
    fn info_fields() {
        let text = "# CPU\r\nused_cpu_sys:1.5\r\nused_cpu_user:2.25\r\n";
        assert_eq!(info_field(text, "used_cpu_sys"), Some("1.5"));
        assert_eq!(info_field(text, "used_cpu"), None);
    }
}
