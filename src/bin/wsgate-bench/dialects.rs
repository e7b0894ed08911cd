//! The raw-WebSocket dialects besides native and Bayeux, as much as a
//! subscriber needs: realizehit over Engine.IO 3 (websocket-only), RoadRunner
//! and SocketStream. Each has a setup (its subscribe requests, every reply
//! awaited) and a byte scan of the frames the gateway sends afterwards, as
//! the native receiver scans its own: deliveries are found by their opening
//! and the bench's send time by the payload's `"t":` (RoadRunner carries the
//! payload as a JSON string, so there it is `\"t\":`).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::net::{find, sent_nanos, Ws};

/// Which of these dialects a socket speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wire {
    /// realizehit's requests in Engine.IO 3 message packets (`4...`).
    Realizehit,
    /// RoadRunner websockets v2 (`{"command":"join",...}`).
    RoadRunner,
    /// SocketStream 0.4 (`<service>|<callback>|<json>`).
    SocketStream,
}

/// One frame from the gateway, as the receiver counts it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Item {
    /// A delivery; the send time of a bench payload (`None`: not the bench's).
    Delivery(Option<u64>),
    /// A gap notice: `interrupted` (true) or `resumed`.
    Gap(bool),
    /// Anything else (replies, pongs).
    Other,
}

/// How often an Engine.IO client pings (the server ends a session that
/// stays silent longer than its `pingInterval` plus `pingTimeout`).
pub(crate) const EIO_PING_EVERY: Duration = Duration::from_secs(10);

impl Wire {
    /// What the socket sends now and then to stay alive (`None`: the
    /// gateway's WebSocket pings suffice).
    pub(crate) fn keepalive(self) -> Option<Message> {
        match self {
            Wire::Realizehit => Some(Message::Text("2".into())),
            Wire::RoadRunner | Wire::SocketStream => None,
        }
    }

    /// Sends the subscribes of `names` and awaits every reply: (accepted,
    /// refused, the first refusal as received). The caller bounds it in time.
    pub(crate) async fn setup(
        self,
        ws: &mut Ws,
        names: &[String],
    ) -> Result<(usize, usize, Option<String>), String> {
        match self {
            Wire::Realizehit => realizehit(ws, names).await,
            Wire::RoadRunner => roadrunner(ws, names).await,
            Wire::SocketStream => socketstream(ws, names).await,
        }
    }

    /// Classifies one text frame received after the setup.
    pub(crate) fn scan(self, frame: &[u8]) -> Item {
        match self {
            Wire::Realizehit => match frame.strip_prefix(b"4") {
                // `4<8 hex>?<payload>`: a delivery; `4{...}`: a reply or notice.
                Some(rest) if rest.get(8) == Some(&b'?') => Item::Delivery(sent_nanos(rest)),
                Some(rest) if find(rest, b"\"interrupted\"").is_some() => Item::Gap(true),
                Some(rest) if find(rest, b"\"resumed\"").is_some() => Item::Gap(false),
                _ => Item::Other,
            },
            Wire::RoadRunner => {
                if frame.starts_with(b"{\"topic\":\"#interrupted\"") {
                    Item::Gap(true)
                } else if frame.starts_with(b"{\"topic\":\"#resumed\"") {
                    Item::Gap(false)
                } else if frame.starts_with(b"{\"topic\":\"#")
                    || frame.starts_with(b"{\"topic\":\"@")
                {
                    Item::Other
                } else if frame.starts_with(b"{\"topic\":") {
                    Item::Delivery(escaped_sent_nanos(frame))
                } else {
                    Item::Other
                }
            }
            Wire::SocketStream => match frame.strip_prefix(b"2|{\"e\":\"") {
                Some(rest) if rest.starts_with(b"wsgate:interrupted\"") => Item::Gap(true),
                Some(rest) if rest.starts_with(b"wsgate:resumed\"") => Item::Gap(false),
                Some(rest) if rest.starts_with(b"wsgate:") => Item::Other,
                Some(rest) => Item::Delivery(sent_nanos(rest)),
                None => Item::Other,
            },
        }
    }
}

/// The send time in a payload carried as a JSON string (`\"t\":123`).
fn escaped_sent_nanos(frame: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\\\"t\\\":";
    digits(frame.get(find(frame, KEY)? + KEY.len()..)?)
}

fn digits(b: &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    let mut n = 0;
    for &c in b {
        if !c.is_ascii_digit() {
            break;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
        n += 1;
    }
    (n > 0).then_some(v)
}

async fn send(ws: &mut Ws, text: String) -> Result<(), String> {
    ws.send(Message::Text(text.into()))
        .await
        .map_err(|e| format!("send: {e}"))
}

/// The next text frame (binary and control frames skipped).
async fn next_text(ws: &mut Ws) -> Result<String, String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_owned()),
            Some(Ok(Message::Close(f))) => return Err(format!("closed by the gateway: {f:?}")),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("read: {e}")),
            None => return Err("connection ended".to_owned()),
        }
    }
}

/// A realizehit channel `a:x|b:y` as its filter object `{"a":"x","b":"y"}`.
fn filters(name: &str) -> Value {
    let mut pat = serde_json::Map::new();
    for pair in name.split('|') {
        let (k, v) = pair.split_once(':').unwrap_or((pair, ""));
        pat.insert(k.to_owned(), json!(v));
    }
    Value::Object(pat)
}

async fn realizehit(
    ws: &mut Ws,
    names: &[String],
) -> Result<(usize, usize, Option<String>), String> {
    let open = next_text(ws).await?;
    if !open.starts_with('0') {
        return Err(format!("expected the Engine.IO open packet, got {open:?}"));
    }
    let mut frames = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let req = json!({"id": format!("s{i}"), "act": "sub", "pat": filters(name)});
        frames.push(format!("4{req}"));
    }
    for f in frames {
        send(ws, f).await?;
    }
    let (mut ok, mut refused, mut first) = (0, 0, None);
    while ok + refused < names.len() {
        let t = next_text(ws).await?;
        let Some(reply) = t.strip_prefix("4{") else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<Value>(&format!("{{{reply}")) else {
            continue;
        };
        if !v["id"].as_str().is_some_and(|id| id.starts_with('s')) {
            continue;
        }
        if v.get("err").is_some() {
            refused += 1;
            first.get_or_insert_with(|| v.to_string());
        } else {
            ok += 1;
        }
    }
    Ok((ok, refused, first))
}

async fn roadrunner(
    ws: &mut Ws,
    names: &[String],
) -> Result<(usize, usize, Option<String>), String> {
    send(ws, json!({"command": "join", "topics": names}).to_string()).await?;
    let (mut ok, mut refused, mut first) = (0, 0, None);
    loop {
        let t = next_text(ws).await?;
        let Ok(v) = serde_json::from_str::<Value>(&t) else {
            continue;
        };
        let n = v["payload"].as_array().map_or(0, Vec::len);
        match v["topic"].as_str() {
            Some("#join") => {
                refused += n;
                first.get_or_insert(t);
            }
            Some("@join") => {
                ok += n;
                return Ok((ok, refused, first));
            }
            _ => {}
        }
    }
}

async fn socketstream(
    ws: &mut Ws,
    names: &[String],
) -> Result<(usize, usize, Option<String>), String> {
    send(
        ws,
        r#"0|1|{"c":"connect","v":"0.0.1","sessionId":false}"#.to_owned(),
    )
    .await?;
    loop {
        if next_text(ws).await?.starts_with("0|1|") {
            break;
        }
    }
    for (i, name) in names.iter().enumerate() {
        let call = json!({"m": "wsgate.subscribe", "p": [name]});
        send(ws, format!("1|{}|{call}", i + 1)).await?;
    }
    let (mut ok, mut refused, mut first) = (0, 0, None);
    while ok + refused < names.len() {
        let t = next_text(ws).await?;
        let Some(rest) = t.strip_prefix("1|") else {
            continue;
        };
        let Some((_, body)) = rest.split_once('|') else {
            continue;
        };
        if body.starts_with("{\"e\"") {
            refused += 1;
            first.get_or_insert_with(|| t.clone());
        } else {
            ok += 1;
        }
    }
    Ok((ok, refused, first))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans() {
        let p = crate::rds::payload(1_712_345_678_901_234_567, 7, 100);
        let t = Some(1_712_345_678_901_234_567);
        let eio = format!("4540d034d?{p}");
        assert_eq!(Wire::Realizehit.scan(eio.as_bytes()), Item::Delivery(t));
        assert_eq!(Wire::Realizehit.scan(b"4{\"id\":\"s1\"}"), Item::Other);
        assert_eq!(Wire::Realizehit.scan(b"3"), Item::Other);
        let rr = format!(r#"{{"topic":"a.b","payload":{}}}"#, json!(p));
        assert_eq!(Wire::RoadRunner.scan(rr.as_bytes()), Item::Delivery(t));
        assert_eq!(
            Wire::RoadRunner.scan(br##"{"topic":"#interrupted","payload":["a"]}"##),
            Item::Gap(true)
        );
        assert_eq!(
            Wire::RoadRunner.scan(br#"{"topic":"@join","payload":["a"]}"#),
            Item::Other
        );
        let ss = format!(r#"2|{{"e":"a.b","p":[{p}]}}"#);
        assert_eq!(Wire::SocketStream.scan(ss.as_bytes()), Item::Delivery(t));
        assert_eq!(Wire::SocketStream.scan(b"1|3|{\"p\":[]}"), Item::Other);
        assert_eq!(filters("a:x|b:y"), json!({"a": "x", "b": "y"}));
    }
}
