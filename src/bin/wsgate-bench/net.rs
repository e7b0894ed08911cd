//! Sockets: WebSocket clients bound to spread loopback sources, a tiny HTTP
//! GET for `/metrics`, and byte scans of the gateway's frames.

use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use wsgate::deflate::inflate::InflateIo;

/// A client WebSocket over a plain TCP stream, read through the gateway's
/// own inflating codec when permessage-deflate was agreed (`--deflate`;
/// tungstenite refuses RSV1 frames), straight otherwise.
pub(crate) type Ws = WebSocketStream<InflateIo<TcpStream>>;

/// What `--deflate` offers.
const DEFLATE_OFFER: &str = "permessage-deflate";

/// Largest message the load client inflates (tungstenite's default limit).
const MAX_INFLATED: usize = 64 << 20;

/// One gateway: its WebSocket URL, socket address and (optional) pid.
#[derive(Clone, Debug)]
pub(crate) struct Gateway {
    pub(crate) url: String,
    pub(crate) addr: SocketAddr,
    pub(crate) pid: Option<u32>,
}

impl Gateway {
    /// Parses `ws://host:port/path` (or `http://`, for event streams).
    pub(crate) fn parse(url: &str, pid: Option<u32>) -> Result<Gateway, String> {
        let rest = url
            .strip_prefix("ws://")
            .or_else(|| url.strip_prefix("http://"))
            .ok_or_else(|| format!("{url}: only ws:// and http:// URLs are supported"))?;
        let hostport = rest.split('/').next().unwrap_or(rest);
        let addr = hostport
            .to_socket_addrs()
            .map_err(|e| format!("{url}: {e}"))?
            .find(SocketAddr::is_ipv4)
            .ok_or_else(|| format!("{url}: no IPv4 address (give host:port)"))?;
        Ok(Gateway {
            url: url.to_owned(),
            addr,
            pid,
        })
    }
}

/// Source address number `i`: 127.0.0.1 + offset + (i mod sources).
pub(crate) fn source(i: usize, sources: u32, offset: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x7F00_0001u32 + offset + (i as u64 % u64::from(sources)) as u32)
}

/// Opens a WebSocket to `gw` from `src` (port chosen at connect time, thanks
/// to `IP_BIND_ADDRESS_NO_PORT`, so sources are not limited to one port range each).
pub(crate) async fn connect(gw: &Gateway, src: Ipv4Addr, read_buffer: usize) -> Result<Ws, String> {
    connect_with(gw, src, read_buffer, false).await
}

/// [`connect`], offering permessage-deflate when `deflate`; a gateway that
/// agrees has its compressed frames inflated on read. (The codec starts
/// after the handshake: the gateway sends nothing before the first
/// subscribe, so no frame can have been read with the 101.)
pub(crate) async fn connect_with(
    gw: &Gateway,
    src: Ipv4Addr,
    read_buffer: usize,
    deflate: bool,
) -> Result<Ws, String> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::{header, HeaderValue};
    let mut req = gw
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("{}: {e}", gw.url))?;
    if deflate {
        req.headers_mut().insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static(DEFLATE_OFFER),
        );
    }
    let stream = InflateIo::plain(tcp(gw, src).await?);
    let config = WebSocketConfig::default().read_buffer_size(read_buffer);
    let (mut ws, res) = tokio_tungstenite::client_async_with_config(req, stream, Some(config))
        .await
        .map_err(|e| format!("handshake {}: {e}", gw.url))?;
    let agreed = res
        .headers()
        .get(header::SEC_WEBSOCKET_EXTENSIONS)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(DEFLATE_OFFER));
    if deflate && !agreed {
        return Err(format!(
            "{}: permessage-deflate was not agreed (WSGATE_COMPRESSION=on?)",
            gw.url
        ));
    }
    if agreed {
        ws.get_mut().inflate_server(MAX_INFLATED);
    }
    Ok(ws)
}

/// Bytes the kernel received on `ws`'s connection so far (`TCP_INFO`'s
/// `tcpi_bytes_received`: what came over the wire, WebSocket headers
/// included, TCP/IP headers not); 0 if it cannot be read.
pub(crate) fn wire_bytes(ws: &Ws) -> u64 {
    let fd = ws.get_ref().get_ref().as_raw_fd();
    // SAFETY: zeroed tcp_info is a valid value; getsockopt writes at most
    // `len` bytes into it, and `fd` is the open socket `ws` owns.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        if rc == 0 {
            info.tcpi_bytes_received
        } else {
            0
        }
    }
}

/// [`connect`], presenting `key` as `Authorization: Bearer <key>` on the
/// upgrade (how a service process proves itself to `/services`).
pub(crate) async fn connect_bearer(
    gw: &Gateway,
    src: Ipv4Addr,
    read_buffer: usize,
    key: Option<&str>,
) -> Result<Ws, String> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::{header, HeaderValue};
    let mut req = gw
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("{}: {e}", gw.url))?;
    if let Some(key) = key {
        let value = HeaderValue::from_str(&format!("Bearer {key}"))
            .map_err(|_| "the service key is not a valid header value".to_owned())?;
        req.headers_mut().insert(header::AUTHORIZATION, value);
    }
    let stream = InflateIo::plain(tcp(gw, src).await?);
    let config = WebSocketConfig::default().read_buffer_size(read_buffer);
    let (ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(config))
        .await
        .map_err(|e| format!("handshake {}: {e}", gw.url))?;
    Ok(ws)
}

/// A TCP connection to `gw` from `src`, without delay.
pub(crate) async fn tcp(gw: &Gateway, src: Ipv4Addr) -> Result<TcpStream, String> {
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a c_int option value of the right length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(format!(
            "IP_BIND_ADDRESS_NO_PORT: {}",
            std::io::Error::last_os_error()
        ));
    }
    socket
        .bind(SocketAddr::new(src.into(), 0))
        .map_err(|e| format!("bind {src}: {e}"))?;
    let stream = socket
        .connect(gw.addr)
        .await
        .map_err(|e| format!("connect {} from {src}: {e}", gw.addr))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("nodelay: {e}"))?;
    Ok(stream)
}

/// A native-protocol request frame.
pub(crate) fn request(action: &str, field: &str, name: &str) -> Message {
    Message::Text(format!("{{\"action\":\"{action}\",\"{field}\":\"{name}\"}}").into())
}

/// Sends `frames` in one flush, then reads until as many subscribe/unsubscribe
/// replies arrived. Returns (succeeded, refusals with their first error).
pub(crate) async fn request_all(
    ws: &mut Ws,
    frames: Vec<Message>,
    timeout: Duration,
) -> Result<(usize, usize, Option<String>), String> {
    let want = frames.len();
    for f in frames {
        ws.feed(f).await.map_err(|e| format!("send: {e}"))?;
    }
    ws.flush().await.map_err(|e| format!("send: {e}"))?;
    let (mut ok, mut refused, mut first_error) = (0, 0, None);
    let replies = async {
        while ok + refused < want {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let b = t.as_bytes();
                    if !(b.starts_with(b"{\"action\":\"subscribe\"")
                        || b.starts_with(b"{\"action\":\"unsubscribe\""))
                    {
                        continue;
                    }
                    if find(b, b"\"status\":true").is_some() {
                        ok += 1;
                    } else {
                        refused += 1;
                        if first_error.is_none() {
                            first_error = Some(t.as_str().to_owned());
                        }
                    }
                }
                Some(Ok(Message::Close(f))) => return Err(format!("closed by the gateway: {f:?}")),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("read: {e}")),
                None => return Err("connection ended".to_owned()),
            }
        }
        Ok(())
    };
    tokio::time::timeout(timeout, replies)
        .await
        .map_err(|_| format!("no reply to {want} requests within {timeout:?}"))??;
    Ok((ok, refused, first_error))
}

/// Position of `needle` in `hay`.
pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let first = *needle.first()?;
    let last_start = hay.len().checked_sub(needle.len())?;
    let mut i = 0;
    while i <= last_start {
        match hay[i..=last_start].iter().position(|&b| b == first) {
            None => return None,
            Some(p) => {
                i += p;
                if hay[i..].starts_with(needle) {
                    return Some(i);
                }
                i += 1;
            }
        }
    }
    None
}

/// The send time carried by a bench payload (`"t":<unix nanos>`), if any.
pub(crate) fn sent_nanos(frame: &[u8]) -> Option<u64> {
    number_after(frame, b"\"t\":")
}

/// The sequence number of a bench payload (`"s":<seq>`, after `"t"`), if any.
pub(crate) fn seq(frame: &[u8]) -> Option<u64> {
    number_after(frame, b",\"s\":")
}

/// The decimal number right after the first `key` in `frame`.
fn number_after(frame: &[u8], key: &[u8]) -> Option<u64> {
    let at = find(frame, key)? + key.len();
    let mut v: u64 = 0;
    let mut digits = 0;
    for &b in frame.get(at..)? {
        if !b.is_ascii_digit() {
            break;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        digits += 1;
    }
    (digits > 0).then_some(v)
}

/// GET `path` over a fresh HTTP/1.1 connection; the body of a 200 answer.
pub(crate) async fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let attempt = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        if !head.starts_with("HTTP/1.1 200") {
            return Err(format!("status {:?}", head.lines().next()));
        }
        Ok(body.to_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| format!("GET http://{addr}{path}: {e}"))
}

/// Sum of every sample of metric `name` (any labels) in Prometheus text.
pub(crate) fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = if rest.starts_with('{') {
                rest.rsplit_once(' ')?.1
            } else {
                rest.strip_prefix(' ')?
            };
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

/// Sums metric `name` over every gateway (0 where a gateway does not answer).
pub(crate) async fn metric_sum(gws: &[Gateway], names: &[&str]) -> Vec<f64> {
    let mut out = vec![0.0; names.len()];
    for gw in gws {
        if let Ok(text) = http_get(gw.addr, "/metrics").await {
            for (o, n) in out.iter_mut().zip(names) {
                *o += metric(&text, n);
            }
        }
    }
    out
}

/// Every sample whose metric name starts with one of `prefixes`, keyed by
/// the sample's name and labels and summed over the gateways; histogram
/// buckets are left out (their `_sum` and `_count` stay). For figures whose
/// names the bench need not know in advance (the router's).
pub(crate) async fn metrics_by_prefix(
    gws: &[Gateway],
    prefixes: &[&str],
) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for gw in gws {
        if let Ok(text) = http_get(gw.addr, "/metrics").await {
            add_samples(&mut out, &text, prefixes);
        }
    }
    out
}

fn add_samples(out: &mut std::collections::BTreeMap<String, f64>, text: &str, prefixes: &[&str]) {
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        if !prefixes.iter().any(|p| l.starts_with(p)) {
            continue;
        }
        let Some((key, value)) = l.rsplit_once(' ') else {
            continue;
        };
        let name = key.split('{').next().unwrap_or(key);
        if name.ends_with("_bucket") {
            continue;
        }
        if let Ok(v) = value.trim().parse::<f64>() {
            *out.entry(key.to_owned()).or_default() += v;
        }
    }
}

/// What changed from `before` to `after` ([`metrics_by_prefix`] readings):
/// the samples that moved, rounded to 6 decimals.
pub(crate) fn metrics_delta(
    before: &std::collections::BTreeMap<String, f64>,
    after: &std::collections::BTreeMap<String, f64>,
) -> serde_json::Map<String, serde_json::Value> {
    after
        .iter()
        .filter_map(|(k, a)| {
            let d = a - before.get(k).copied().unwrap_or(0.0);
            (d != 0.0).then(|| (k.clone(), serde_json::json!((d * 1e6).round() / 1e6)))
        })
        .collect()
}

/// The hub's registry-lock metrics of the gateways, at one moment:
/// `wsgate_hub_lock_hold_max_seconds` (longest hold since start, max over
/// gateways) and the `wsgate_hub_lock_hold_seconds` histogram (cumulative
/// bucket counts, summed over gateways).
#[derive(Clone, Debug, Default)]
pub(crate) struct LockHolds {
    /// Longest hold since start, seconds (None: no gateway exports it).
    pub(crate) max_secs: Option<f64>,
    /// (upper bound `le` in seconds, cumulative count), ascending; `+Inf` last.
    pub(crate) buckets: Vec<(f64, f64)>,
}

impl LockHolds {
    /// Reads every gateway's `/metrics`.
    pub(crate) async fn read(gws: &[Gateway]) -> LockHolds {
        let mut out = LockHolds::default();
        for gw in gws {
            if let Ok(text) = http_get(gw.addr, "/metrics").await {
                out.add(&text);
            }
        }
        out
    }

    fn add(&mut self, text: &str) {
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            if let Some(v) = l.strip_prefix("wsgate_hub_lock_hold_max_seconds ") {
                if let Ok(v) = v.trim().parse::<f64>() {
                    self.max_secs = Some(self.max_secs.map_or(v, |m: f64| m.max(v)));
                }
            } else if let Some(rest) = l.strip_prefix("wsgate_hub_lock_hold_seconds_bucket{") {
                let Some(le) = rest
                    .split_once("le=\"")
                    .and_then(|(_, r)| r.split_once('"'))
                    .map(|(le, _)| le)
                else {
                    continue;
                };
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    match le.parse::<f64>() {
                        Ok(v) => v,
                        Err(_) => continue,
                    }
                };
                let Some(n) = rest
                    .rsplit_once(' ')
                    .and_then(|(_, n)| n.trim().parse().ok())
                else {
                    continue;
                };
                match self.buckets.iter_mut().find(|(b, _)| *b == le) {
                    Some(b) => b.1 += n,
                    None => self.buckets.push((le, n)),
                }
            }
        }
        self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }

    /// Whether the gateways export the histogram at all.
    pub(crate) fn exported(&self) -> bool {
        !self.buckets.is_empty()
    }

    /// What happened between `before` and `self`: (holds, holds longer than
    /// `secs` (counted from the smallest bucket bound >= `secs`), upper bound
    /// of the bucket holding the longest hold (None: no hold; infinite: over
    /// the last finite bound)).
    pub(crate) fn since(&self, before: &LockHolds, secs: f64) -> (f64, f64, Option<f64>) {
        let at = |h: &LockHolds, le: f64| {
            h.buckets
                .iter()
                .find(|(b, _)| *b == le)
                .map_or(0.0, |b| b.1)
        };
        let total = at(self, f64::INFINITY) - at(before, f64::INFINITY);
        let bound = self
            .buckets
            .iter()
            .map(|b| b.0)
            .find(|&le| le >= secs)
            .unwrap_or(f64::INFINITY);
        let over = total - (at(self, bound) - at(before, bound));
        let longest = (total > 0.0).then(|| {
            self.buckets
                .iter()
                .map(|b| b.0)
                .find(|&le| at(self, le) - at(before, le) >= total)
                .unwrap_or(f64::INFINITY)
        });
        (total, over, longest)
    }
}

/// Records the lock-hold figures of one measured phase: the gauge read after
/// it (`lock_hold_max_us`, which includes every earlier phase since the
/// gateway started), the holds of the phase itself from the histogram
/// (`phase_lock_holds`, `phase_holds_over_<limit>`), and the bucket bound the
/// phase's longest hold falls under (`phase_lock_hold_bound_us`). All null
/// when the gateway does not export them (older builds).
pub(crate) fn report_lock_holds(
    run: &mut crate::report::Run,
    before: &LockHolds,
    after: &LockHolds,
    limit_secs: f64,
    over_name: &'static str,
) {
    use serde_json::Value;
    let us = |v: f64| (v * 1e7).round() / 10.0;
    match after.max_secs {
        Some(m) => run.result("lock_hold_max_us", us(m)),
        None => run.result("lock_hold_max_us", Value::Null),
    }
    if after.exported() {
        let (total, over, longest) = after.since(before, limit_secs);
        run.result("phase_lock_holds", total as u64);
        run.result(over_name, over as u64);
        match longest {
            Some(le) if le.is_finite() => run.result("phase_lock_hold_bound_us", us(le)),
            Some(_) => run.result("phase_lock_hold_bound_us", "over the last bucket"),
            None => run.result("phase_lock_hold_bound_us", Value::Null),
        }
    } else {
        run.result("phase_lock_holds", Value::Null);
        run.result(over_name, Value::Null);
        run.result("phase_lock_hold_bound_us", Value::Null);
        run.notes.push(
            "the gateway exports no wsgate_hub_lock_hold_* metrics (older build): lock holds n/a"
                .into(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans() {
        let f = br#"{"action":"message","pattern":"b.*","channel":"b.x","payload":{"t":1712345678901234567,"s":3,"p":"xx"}}"#;
        assert_eq!(sent_nanos(f), Some(1_712_345_678_901_234_567));
        assert_eq!(seq(f), Some(3));
        assert_eq!(sent_nanos(b"{\"action\":\"resumed\"}"), None);
        assert_eq!(find(b"abcabd", b"abd"), Some(3));
        assert_eq!(find(b"ab", b"abc"), None);
        let m = "# HELP x\nwsgate_a 3\nwsgate_ab 5\nwsgate_a{k=\"1\"} 4\n";
        assert_eq!(metric(m, "wsgate_a"), 7.0);
        assert_eq!(source(0, 50, 0), Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(source(51, 50, 0), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(source(300, 1000, 0), Ipv4Addr::new(127, 0, 1, 45));
    }

    #[test]
    fn samples_by_prefix() {
        let text = "# TYPE wsgate_calls_total counter\nwsgate_calls_total{outcome=\"ok\"} 5\n\
                    wsgate_call_seconds_bucket{le=\"0.001\"} 3\nwsgate_call_seconds_count 5\n\
                    wsgate_connections 2\n";
        let mut a = std::collections::BTreeMap::new();
        add_samples(&mut a, text, &["wsgate_call"]);
        add_samples(&mut a, text, &["wsgate_call"]);
        assert_eq!(a.len(), 2);
        assert_eq!(a["wsgate_calls_total{outcome=\"ok\"}"], 10.0);
        let mut b = a.clone();
        b.insert("wsgate_call_seconds_count".into(), 12.0);
        let d = metrics_delta(&a, &b);
        assert_eq!(d.len(), 1);
        assert_eq!(d["wsgate_call_seconds_count"], serde_json::json!(2.0));
    }

    #[test]
    fn lock_holds() {
        let m = |b: [u64; 4], max: &str| {
            format!(
                "# TYPE x\nwsgate_hub_lock_hold_max_seconds {max}\n\
                 wsgate_hub_lock_hold_seconds_bucket{{le=\"0.00001\"}} {}\n\
                 wsgate_hub_lock_hold_seconds_bucket{{le=\"0.00005\"}} {}\n\
                 wsgate_hub_lock_hold_seconds_bucket{{le=\"0.001\"}} {}\n\
                 wsgate_hub_lock_hold_seconds_bucket{{le=\"+Inf\"}} {}\n\
                 wsgate_hub_lock_hold_seconds_count {}\n",
                b[0], b[1], b[2], b[3], b[3]
            )
        };
        let mut before = LockHolds::default();
        before.add(&m([5, 6, 7, 7], "0.0002"));
        let mut after = LockHolds::default();
        after.add(&m([8, 10, 12, 12], "0.0003"));
        assert_eq!(after.max_secs, Some(0.0003));
        // 5 holds in the phase: 3 under 10 µs, 1 more under 50 µs, 1 under 1 ms.
        assert_eq!(after.since(&before, 50e-6), (5.0, 1.0, Some(0.001)));
        assert_eq!(after.since(&before, 1e-3), (5.0, 0.0, Some(0.001)));
        assert_eq!(before.since(&before, 1e-3), (0.0, 0.0, None));
        let mut inf = LockHolds::default();
        inf.add(&m([8, 10, 12, 13], "0.5"));
        assert_eq!(inf.since(&before, 1e-3), (6.0, 1.0, Some(f64::INFINITY)));
        assert!(!LockHolds::default().exported());
    }
}
