//! Bayeux 1.0 over a WebSocket, as much as a subscriber needs: the
//! handshake, the first connect (answered at once), the subscribes, a held
//! connect kept going, and a byte scan of the frames the gateway sends.
//!
//! Setup replies are parsed as JSON (a few per socket); deliveries are only
//! scanned, as the native receiver scans its frames: a Bayeux frame is an
//! array of messages, each rendered by wsgate with `channel` first
//! (`[{"channel":"/x","data":<payload>}]`), so messages are found by their
//! `{"channel":"` opening and the bench's send time by the payload's `"t":`.
//! (A `data` that itself held `{"channel":"` would be miscounted; the
//! bench's payloads never do.)

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::net::{find, sent_nanos, Ws};

/// The client side of one Bayeux session after its setup.
pub(crate) struct Session {
    pub(crate) client_id: String,
    next_id: u64,
}

impl Session {
    fn id(&mut self) -> String {
        self.next_id += 1;
        self.next_id.to_string()
    }

    /// A `/meta/connect`; `immediate` asks for an answer at once
    /// (`advice.timeout: 0`), else the gateway holds it
    /// (`WSGATE_BAYEUX_CONNECT_TIMEOUT_MS`).
    pub(crate) fn connect(&mut self, immediate: bool) -> Message {
        let mut m = json!({
            "channel": "/meta/connect",
            "clientId": self.client_id,
            "connectionType": "websocket",
            "id": self.id(),
        });
        if immediate {
            m["advice"] = json!({"timeout": 0});
        }
        text(json!([m]))
    }

    /// A `/meta/subscribe` of `names` (one string, or an array of several).
    fn subscribe(&mut self, names: &[String]) -> Message {
        let subscription = match names {
            [one] => json!(one),
            many => json!(many),
        };
        text(json!([{
            "channel": "/meta/subscribe",
            "clientId": self.client_id,
            "subscription": subscription,
            "id": self.id(),
        }]))
    }

    /// A `/meta/disconnect`: the gateway ends the session at once instead
    /// of keeping it for `WSGATE_BAYEUX_SESSION_TIMEOUT_MS`.
    pub(crate) fn disconnect(&mut self) -> Message {
        text(json!([{
            "channel": "/meta/disconnect",
            "clientId": self.client_id,
            "id": self.id(),
        }]))
    }
}

fn text(v: Value) -> Message {
    Message::Text(v.to_string().into())
}

/// The handshake every socket sends first.
fn handshake() -> Message {
    text(json!([{
        "channel": "/meta/handshake",
        "version": "1.0",
        "supportedConnectionTypes": ["websocket"],
        "id": "1",
    }]))
}

/// What the setup of one socket gave.
pub(crate) struct Setup {
    pub(crate) session: Session,
    /// Subscriptions answered `successful:true`.
    pub(crate) ok: usize,
    /// Subscriptions refused, and the first refusal as received.
    pub(crate) refused: usize,
    pub(crate) first_error: Option<String>,
}

/// Handshake, a connect answered at once, the subscribes of `names` (every
/// reply awaited), then a connect left held. The caller bounds it in time.
pub(crate) async fn setup(ws: &mut Ws, names: &[String]) -> Result<Setup, String> {
    send(ws, handshake()).await?;
    let reply = replies(ws, "/meta/handshake", 1).await?.remove(0);
    if reply["successful"] != json!(true) {
        return Err(format!("handshake refused: {reply}"));
    }
    let client_id = reply["clientId"]
        .as_str()
        .ok_or_else(|| format!("handshake reply without clientId: {reply}"))?
        .to_owned();
    let mut session = Session {
        client_id,
        next_id: 1,
    };
    send(ws, session.connect(true)).await?;
    let reply = replies(ws, "/meta/connect", 1).await?.remove(0);
    if reply["successful"] != json!(true) {
        return Err(format!("connect refused: {reply}"));
    }
    let (mut ok, mut refused, mut first_error) = (0, 0, None);
    if !names.is_empty() {
        send(ws, session.subscribe(names)).await?;
        for r in replies(ws, "/meta/subscribe", names.len()).await? {
            if r["successful"] == json!(true) {
                ok += 1;
            } else {
                refused += 1;
                first_error.get_or_insert_with(|| r.to_string());
            }
        }
    }
    send(ws, session.connect(false)).await?;
    Ok(Setup {
        session,
        ok,
        refused,
        first_error,
    })
}

async fn send(ws: &mut Ws, m: Message) -> Result<(), String> {
    ws.send(m).await.map_err(|e| format!("send: {e}"))
}

/// Reads frames until `n` messages on `channel` arrived (others are
/// skipped); returns them.
async fn replies(ws: &mut Ws, channel: &str, n: usize) -> Result<Vec<Value>, String> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                if let Ok(Value::Array(msgs)) = serde_json::from_str::<Value>(t.as_str()) {
                    got.extend(msgs.into_iter().filter(|m| m["channel"] == channel));
                }
            }
            Some(Ok(Message::Close(f))) => return Err(format!("closed by the gateway: {f:?}")),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("read: {e}")),
            None => return Err("connection ended".to_owned()),
        }
    }
    Ok(got)
}

/// One message of a frame, as the receiver counts it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Item {
    /// On a channel outside `/meta/` and `/wsgate/`: the send time of a bench
    /// payload (`None`: not one of the bench's).
    Delivery(Option<u64>),
    /// A successful `/meta/connect` reply: a held connect was answered.
    Connected,
    /// Any other `/meta/` reply (or a refused connect).
    Meta,
    /// A `/wsgate/gap` notice: `interrupted` (true) or `resumed`.
    Gap(bool),
}

const OPEN: &[u8] = b"{\"channel\":\"";

/// Calls `f` with each message of a Bayeux frame. A frame that is not an
/// array of messages opening with `channel` gives nothing.
pub(crate) fn scan(frame: &[u8], mut f: impl FnMut(Item)) {
    let Some(mut rest) = frame.strip_prefix(b"[") else {
        return;
    };
    while let Some(at) = find(rest, OPEN) {
        let body = &rest[at + OPEN.len()..];
        // This message runs to the next one's opening, or to the end.
        let end = find(body, OPEN).unwrap_or(body.len());
        let msg = &body[..end];
        f(if let Some(meta) = msg.strip_prefix(b"/meta/") {
            if meta.starts_with(b"connect\"") && find(meta, b"\"successful\":true").is_some() {
                Item::Connected
            } else {
                Item::Meta
            }
        } else if msg.starts_with(b"/wsgate/gap\"") {
            Item::Gap(find(msg, b"\"state\":\"interrupted\"").is_some())
        } else {
            Item::Delivery(sent_nanos(msg))
        });
        rest = &body[end..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(frame: &str) -> Vec<Item> {
        let mut v = Vec::new();
        scan(frame.as_bytes(), |i| v.push(i));
        v
    }

    #[test]
    fn scans_frames() {
        let payload = crate::rds::payload(1_712_345_678_901_234_567, 7, 100);
        let one = format!(r#"[{{"channel":"/bench1/f/x","data":{payload}}}]"#);
        assert_eq!(
            items(&one),
            [Item::Delivery(Some(1_712_345_678_901_234_567))]
        );
        let two = format!(
            r#"[{{"channel":"/a/b","data":{payload}}},{{"channel":"/a/c","data":{{"t":5}}}}]"#
        );
        assert_eq!(
            items(&two),
            [
                Item::Delivery(Some(1_712_345_678_901_234_567)),
                Item::Delivery(Some(5))
            ]
        );
        assert_eq!(
            items(r#"[{"channel":"/x","data":"hello"}]"#),
            [Item::Delivery(None)]
        );
        let connect = r#"[{"channel":"/meta/connect","id":"4","successful":true,"clientId":"ab"}]"#;
        assert_eq!(items(connect), [Item::Connected]);
        let refused = r#"[{"channel":"/meta/connect","id":"4","successful":false,"error":"402:ab:Unknown client"}]"#;
        assert_eq!(items(refused), [Item::Meta]);
        let sub = r#"[{"channel":"/meta/subscribe","id":"3","successful":true,"clientId":"ab","subscription":"/a/*"}]"#;
        assert_eq!(items(sub), [Item::Meta]);
        let gap = r#"[{"channel":"/wsgate/gap","data":{"state":"interrupted","reason":"broker connection lost","subscriptions":["/a/*"]}}]"#;
        assert_eq!(items(gap), [Item::Gap(true)]);
        let back =
            r#"[{"channel":"/wsgate/gap","data":{"state":"resumed","subscriptions":["/a/*"]}}]"#;
        assert_eq!(items(back), [Item::Gap(false)]);
        let mixed = format!(
            r#"[{{"channel":"/meta/connect","successful":true}},{{"channel":"/a/b","data":{payload}}}]"#
        );
        assert_eq!(
            items(&mixed),
            [
                Item::Connected,
                Item::Delivery(Some(1_712_345_678_901_234_567))
            ]
        );
        assert!(items(r#"[{"successful":false,"error":"400:not JSON:Bad request"}]"#).is_empty());
        assert!(items(r#"{"action":"message"}"#).is_empty());
    }

    #[test]
    fn requests() {
        let mut s = Session {
            client_id: "ab".into(),
            next_id: 1,
        };
        let parse = |m: Message| -> Value {
            serde_json::from_str(m.to_text().unwrap_or_default()).unwrap_or_default()
        };
        let c = parse(s.connect(true));
        assert_eq!(c[0]["channel"], "/meta/connect");
        assert_eq!(c[0]["clientId"], "ab");
        assert_eq!(c[0]["connectionType"], "websocket");
        assert_eq!(c[0]["advice"]["timeout"], 0);
        assert_eq!(c[0]["id"], "2");
        let held = parse(s.connect(false));
        assert!(held[0].get("advice").is_none());
        assert_eq!(held[0]["id"], "3");
        let one = parse(s.subscribe(&["/a/*".to_owned()]));
        assert_eq!(one[0]["subscription"], "/a/*");
        let two = parse(s.subscribe(&["/a/*".to_owned(), "/b".to_owned()]));
        assert_eq!(two[0]["subscription"], json!(["/a/*", "/b"]));
        assert_eq!(parse(s.disconnect())[0]["channel"], "/meta/disconnect");
        assert_eq!(
            parse(handshake())[0]["supportedConnectionTypes"],
            json!(["websocket"])
        );
    }
}
