//! Fuzzes `Native::decode` on arbitrary frames, and the replies built from
//! its answer.
//!
//! Checks: decode never panics; it agrees with an independent reading of
//! the rules in docs/protocol.md (`action` subscribe/unsubscribe/ping, an
//! optional string `id`, exactly one string `pattern` or `channel`, extra
//! fields ignored, the `id` echoed in a rejection when it could be read;
//! `refresh` with a string `token`; `publish` with a string `channel` and
//! exactly one `payload`, kept as the JSON text sent); binary and control
//! frames are rejected; and every reply rendered from the result (`ack`,
//! `pong`, `refreshed`, `published`, `reject`) is valid JSON echoing the
//! request.
//!
//! Input: the bytes, as a text frame (invalid UTF-8 replaced by U+FFFD).

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use wsgate::broker::Topic;
use wsgate::protocol::native::Native;
use wsgate::protocol::{Ack, AckKind, Frame, Inbound, Refusal, Request};

/// An object's members in order, repeated keys kept, values as raw text:
/// the independent reading of a publish's `payload`.
struct Members(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Members, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, Box<RawValue>>()? {
                    out.push(entry);
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// The request the docs say `text` is, or `Err(id echoed in the error)`.
fn expected(text: &str) -> Result<Request, Option<String>> {
    let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(text) else {
        return Err(None);
    };
    let id = match obj.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(None),
    };
    let action = match obj.get("action") {
        Some(Value::String(a)) => a.as_str(),
        _ => return Err(id),
    };
    let topic = |obj: &Map<String, Value>| -> Result<Topic, Option<String>> {
        let field = |name: &str| match obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(Bytes::copy_from_slice(s.as_bytes()))),
            Some(_) => Err(id.clone()),
        };
        match (field("pattern")?, field("channel")?) {
            (Some(p), None) => Ok(Topic::Pattern(p)),
            (None, Some(c)) => Ok(Topic::Channel(c)),
            _ => Err(id.clone()),
        }
    };
    match action {
        "subscribe" => Ok(Request::Subscribe {
            topic: topic(&obj)?,
            id,
            ext: None,
            since: None,
            join_leave: false,
        }),
        "unsubscribe" => Ok(Request::Unsubscribe {
            topic: topic(&obj)?,
            id,
        }),
        "ping" => Ok(Request::Ping { id }),
        "refresh" => match obj.get("token") {
            Some(Value::String(token)) => Ok(Request::Refresh {
                token: token.clone(),
                id,
            }),
            _ => Err(id),
        },
        "publish" => {
            let channel = match obj.get("channel") {
                Some(Value::String(c)) => Bytes::copy_from_slice(c.as_bytes()),
                _ => return Err(id),
            };
            let Ok(Members(members)) = serde_json::from_str::<Members>(text) else {
                return Err(id);
            };
            let mut payloads = members.iter().filter(|(k, _)| k == "payload");
            match (payloads.next(), payloads.next()) {
                (Some((_, raw)), None) => Ok(Request::Publish {
                    channel,
                    payload: Bytes::copy_from_slice(raw.get().as_bytes()),
                    id,
                }),
                _ => Err(id),
            }
        }
        _ => Err(id),
    }
}

/// Parses a reply frame, which must be a JSON object in a text frame.
fn reply(frame: Frame) -> Map<String, Value> {
    let Frame::Text(text) = frame else {
        panic!("reply is not a text frame: {frame:?}");
    };
    match serde_json::from_str::<Value>(text.as_str()) {
        Ok(Value::Object(obj)) => obj,
        other => panic!("reply is not a JSON object ({other:?}): {text:?}"),
    }
}

fn id_value(id: Option<&str>) -> Option<Value> {
    id.map(Value::from)
}

fuzz_target!(|data: &[u8]| {
    // Binary frames are always rejected, without an id (control frames
    // never reach the dialect).
    let rejection = Native
        .decode(Inbound::Binary(data))
        .expect_err("binary frame accepted");
    assert_eq!(rejection.id, None);

    let text = String::from_utf8_lossy(data).into_owned();
    let got = Native.decode(Inbound::Text(&text));
    // Not in this reading yet: a subscribe's `since` and `join_leave`
    // (history, presence) and the actions added since (`presence`,
    // `presence_stats`, `call`, ...): such a request is checked for panics
    // and replies only.
    let newer = serde_json::from_str::<Value>(&text).is_ok_and(|v| {
        match v.get("action").and_then(Value::as_str) {
            Some("subscribe") => v.get("since").is_some() || v.get("join_leave").is_some(),
            Some("unsubscribe" | "ping" | "refresh" | "publish") | None => false,
            Some(_) => true,
        }
    });
    match (&got, expected(&text)) {
        _ if newer => {}
        (Ok(req), Ok(want)) => assert_eq!(req, &want, "input {text:?}"),
        (Err(rej), Err(want_id)) => assert_eq!(rej.id, want_id, "input {text:?}"),
        (got, want) => panic!("input {text:?}: decoded {got:?}, expected {want:?}"),
    }

    // Replies rendered from the outcome are valid JSON and echo the request.
    match got {
        Ok(Request::Subscribe { topic, id, .. } | Request::Unsubscribe { topic, id }) => {
            let refused = Refusal::Other("refused \"\u{0}\u{ffff}".to_owned());
            for error in [None, Some(&refused)] {
                let obj = reply(Native.ack(&Ack {
                    kind: AckKind::Subscribe,
                    topic: &topic,
                    id: id.as_deref(),
                    error,
                    recovered: None,
                }));
                let name = Value::from(String::from_utf8_lossy(topic.name()).into_owned());
                assert_eq!(obj.get(topic.kind()), Some(&name), "ack {obj:?}");
                assert_eq!(
                    obj.get("id").cloned(),
                    id_value(id.as_deref()),
                    "ack {obj:?}"
                );
                assert_eq!(obj.get("status"), Some(&Value::Bool(error.is_none())));
            }
        }
        Ok(Request::Publish {
            channel,
            payload,
            id,
        }) => {
            // What Redis would carry is one JSON value.
            assert!(
                serde_json::from_slice::<Value>(&payload).is_ok(),
                "payload {payload:?} is not JSON"
            );
            let refused = Refusal::Other("x\"\u{0}".to_owned());
            for (error, maybe_published) in [(None, None), (Some(&refused), Some(true))] {
                let obj = reply(Native.published(&channel, id.as_deref(), error, maybe_published));
                let name = Value::from(String::from_utf8_lossy(&channel).into_owned());
                assert_eq!(obj.get("action"), Some(&Value::from("publish")));
                assert_eq!(obj.get("channel"), Some(&name), "published {obj:?}");
                assert_eq!(obj.get("id").cloned(), id_value(id.as_deref()));
                assert_eq!(obj.get("status"), Some(&Value::Bool(error.is_none())));
            }
        }
        Ok(Request::Refresh { id, .. }) => {
            for error in [None, Some("refused \"\u{0}")] {
                let obj = reply(Native.refreshed(id.as_deref(), error));
                assert_eq!(obj.get("action"), Some(&Value::from("refresh")));
                assert_eq!(obj.get("id").cloned(), id_value(id.as_deref()));
                assert_eq!(obj.get("status"), Some(&Value::Bool(error.is_none())));
            }
        }
        Ok(Request::Ping { id }) => {
            let obj = reply(Native.pong(id.as_deref()));
            assert_eq!(obj.get("action"), Some(&Value::from("pong")));
            assert_eq!(
                obj.get("id").cloned(),
                id_value(id.as_deref()),
                "pong {obj:?}"
            );
        }
        Ok(_) => {}
        Err(rejection) => {
            let obj = reply(Native.reject(&rejection));
            assert_eq!(obj.get("action"), Some(&Value::from("error")));
            assert_eq!(
                obj.get("error"),
                Some(&Value::from(rejection.error.as_str()))
            );
            assert_eq!(obj.get("id").cloned(), id_value(rejection.id.as_deref()));
        }
    }
});
