//! Server-sent events, as much as a subscriber needs: one `GET` of the SSE
//! path naming the subscriptions, the response's chunked body decoded, and
//! each event (up to its blank line) classified by a byte scan: an unnamed
//! event is a delivery (`data: {"action":"message",...}`), the named ones
//! are the answers to the subscriptions (`event: subscribe`), gap notices
//! (`event: interrupted` / `resumed`) and the last one (`event: close`).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cli::TopicKind;
use crate::net::{find, sent_nanos, Gateway};

/// One event, as the receiver counts it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Item {
    /// A delivery; the send time of a bench payload (`None`: not the bench's).
    Delivery(Option<u64>),
    /// The answer to one subscription: accepted (true) or refused.
    Subscribed(bool),
    /// A gap notice: `interrupted` (true) or `resumed`.
    Gap(bool),
    /// The stream's last event, with the close code it carries.
    Close(u16),
    /// `retry:`, heartbeat comments, anything else.
    Other,
}

/// Classifies one event (its bytes up to, not including, the blank line).
pub(crate) fn scan(event: &[u8]) -> Item {
    if event.starts_with(b"data: ") {
        Item::Delivery(sent_nanos(event))
    } else if let Some(rest) = event.strip_prefix(b"event: ") {
        if rest.starts_with(b"subscribe\n") {
            Item::Subscribed(find(rest, b"\"status\":true").is_some())
        } else if rest.starts_with(b"interrupted\n") {
            Item::Gap(true)
        } else if rest.starts_with(b"resumed\n") {
            Item::Gap(false)
        } else if rest.starts_with(b"close\n") {
            let code = find(rest, b"\"code\":").and_then(|at| {
                let digits: Vec<u8> = rest[at + 7..]
                    .iter()
                    .copied()
                    .take_while(u8::is_ascii_digit)
                    .collect();
                std::str::from_utf8(&digits).ok()?.parse().ok()
            });
            Item::Close(code.unwrap_or(1005))
        } else {
            Item::Other
        }
    } else {
        Item::Other
    }
}

/// An open event stream.
pub(crate) struct Events {
    tcp: TcpStream,
    /// Raw bytes read and not yet decoded.
    raw: Vec<u8>,
    /// Decoded body bytes not yet split into events.
    body: Vec<u8>,
    /// Chunked transfer coding (else the body runs to the end of the connection).
    chunked: bool,
    /// Bytes left in the current chunk.
    left: usize,
    /// The last (empty) chunk arrived.
    ended: bool,
}

/// Percent-encodes a query value (everything but unreserved characters).
fn encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Opens the stream of `gw`'s URL with `topics` in its query, from `src`,
/// and reads the response's head.
pub(crate) async fn open(
    gw: &Gateway,
    src: std::net::Ipv4Addr,
    topics: &[(TopicKind, String)],
) -> Result<Events, String> {
    let mut tcp = crate::net::tcp(gw, src).await?;
    let path = gw
        .url
        .strip_prefix("http://")
        .and_then(|rest| rest.find('/').map(|at| &rest[at..]))
        .unwrap_or("/sse");
    let query: Vec<String> = topics
        .iter()
        .map(|(kind, name)| format!("{}={}", kind.field(), encode(name)))
        .collect();
    let sep = if path.contains('?') { '&' } else { '?' };
    let req = format!(
        "GET {path}{sep}{} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
        query.join("&"),
        gw.addr
    );
    tcp.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut ev = Events {
        tcp,
        raw: Vec::with_capacity(8192),
        body: Vec::with_capacity(8192),
        chunked: false,
        left: 0,
        ended: false,
    };
    let head_end = loop {
        if let Some(at) = find(&ev.raw, b"\r\n\r\n") {
            break at;
        }
        if !ev.fill().await? {
            return Err("connection ended before the response head".to_owned());
        }
    };
    let head = String::from_utf8_lossy(&ev.raw[..head_end]).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") {
        let status = head.lines().next().unwrap_or_default().to_owned();
        return Err(format!("stream refused: {status}"));
    }
    ev.chunked = head.contains("transfer-encoding: chunked");
    ev.raw.drain(..head_end + 4);
    Ok(ev)
}

impl Events {
    /// Reads more raw bytes; false at the end of the connection.
    async fn fill(&mut self) -> Result<bool, String> {
        let mut buf = [0u8; 16 * 1024];
        let n = self
            .tcp
            .read(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        self.raw.extend_from_slice(&buf[..n]);
        Ok(n > 0)
    }

    /// Moves what can be decoded from `raw` to `body`.
    fn decode(&mut self) -> Result<(), String> {
        if !self.chunked {
            self.body.append(&mut self.raw);
            return Ok(());
        }
        let mut at = 0;
        loop {
            if self.left > 0 {
                let take = self.left.min(self.raw.len() - at);
                self.body.extend_from_slice(&self.raw[at..at + take]);
                self.left -= take;
                at += take;
                if self.left > 0 {
                    break;
                }
            }
            // A chunk's data is followed by CRLF, then the next size line
            // (the first size line has no CRLF before it).
            let rest = &self.raw[at..];
            let rest_start = if rest.starts_with(b"\r\n") { 2 } else { 0 };
            let Some(line_end) = find(&rest[rest_start..], b"\r\n") else {
                break;
            };
            let line = &rest[rest_start..rest_start + line_end];
            let size = std::str::from_utf8(line)
                .ok()
                .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok())
                .ok_or_else(|| format!("bad chunk size line {line:?}"))?;
            at += rest_start + line_end + 2;
            if size == 0 {
                self.ended = true;
                break;
            }
            self.left = size;
        }
        self.raw.drain(..at);
        Ok(())
    }

    /// Calls `f` with each whole event received, reading once if none is
    /// whole yet. False when the stream has ended.
    pub(crate) async fn next_batch(&mut self, mut f: impl FnMut(Item)) -> Result<bool, String> {
        loop {
            let mut start = 0;
            let mut any = false;
            while let Some(end) = find(&self.body[start..], b"\n\n") {
                f(scan(&self.body[start..start + end]));
                start += end + 2;
                any = true;
            }
            self.body.drain(..start);
            if any {
                return Ok(true);
            }
            // Bytes read with the response head (or after the last event)
            // may hold whole events already: decode them before waiting.
            if !self.raw.is_empty() {
                let before = self.body.len();
                self.decode()?;
                if self.body.len() > before {
                    continue;
                }
            }
            if self.ended || !self.fill().await? {
                return Ok(false);
            }
            self.decode()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_events() {
        let p = crate::rds::payload(1_712_345_678_901_234_567, 7, 100);
        let d = format!(r#"data: {{"action":"message","channel":"a","payload":{p}}}"#);
        assert_eq!(
            scan(d.as_bytes()),
            Item::Delivery(Some(1_712_345_678_901_234_567))
        );
        let sub = br#"event: subscribe
data: {"action":"subscribe","channel":"a","status":true}"#;
        assert_eq!(scan(sub), Item::Subscribed(true));
        let no = br#"event: subscribe
data: {"action":"subscribe","channel":"a","status":false,"error":"not allowed"}"#;
        assert_eq!(scan(no), Item::Subscribed(false));
        assert_eq!(scan(b"event: interrupted\ndata: {}"), Item::Gap(true));
        assert_eq!(scan(b"event: resumed\ndata: {}"), Item::Gap(false));
        assert_eq!(
            scan(
                br#"event: close
data: {"action":"close","code":4008,"reason":"slow"}"#
            ),
            Item::Close(4008)
        );
        assert_eq!(scan(b"retry: 1500"), Item::Other);
        assert_eq!(scan(b":"), Item::Other);
        assert_eq!(encode("a.b *"), "a.b%20%2A");
    }
}
