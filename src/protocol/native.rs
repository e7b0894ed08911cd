//! The native protocol, v1: JSON text frames on `WSGATE_WS_PATH` (`/ws`).
//!
//! The shape follows the realizehit communication spec (`action`, `pattern`,
//! `status`), extended with exact channels, ids, pings and client publishes
//! (whose payload keeps its exact JSON text: the frame is read a second time
//! for it, see [`crate::publish`]). The full reference
//! with examples is `docs/protocol.md`. Deliveries embed the Redis payload as
//! JSON when it is JSON, as a JSON string when it is other UTF-8 text, and as
//! base64 with `"encoding":"base64"` when it is not UTF-8, so no byte is lost.

use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use std::sync::{Arc, OnceLock};

use super::{
    Ack, AckKind, Answer, Conversation, Frame, Inbound, Notice, NoticeKind, Refusal, Render,
    Request, Step,
};
use crate::broker::{BrokerMessage, Topic};
use crate::rpc::CallError;

/// The native JSON dialect's rendering, shared by every native connection;
/// see the module docs.
#[derive(Debug, Default, Clone, Copy)]
pub struct Native;

/// One native connection. The protocol is stateless, so this is zero-sized:
/// a native socket allocates nothing for its dialect.
#[derive(Debug, Default, Clone, Copy)]
pub struct NativeConversation;

/// A frame that is not a valid request. The client gets an error reply built
/// from it; the connection stays open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The request's id, when one could be read.
    pub id: Option<String>,
    /// What was wrong, for a human.
    pub error: String,
}

/// The reply to subscribe/unsubscribe, in the field order of the docs.
#[derive(Serialize)]
struct AckFrame<'a> {
    action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pattern: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    status: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recovered: Option<bool>,
}

/// The reply to `publish`: the subscribe reply's shape (`status`, `error`),
/// plus `maybe_published` when the broker failed.
#[derive(Serialize)]
struct PublishFrame<'a> {
    action: &'static str,
    channel: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    status: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    maybe_published: Option<bool>,
}

/// The payload of a `publish` frame, borrowed as raw JSON text from the
/// frame (the parsed [`Value`] would have normalised it). Other fields are
/// ignored here; they were read from the `Value`.
#[derive(Deserialize)]
struct PublishPayload<'a> {
    #[serde(borrow, default, deserialize_with = "crate::publish::present")]
    payload: Option<&'a RawValue>,
}

/// `interrupted` and `resumed` gap notices.
#[derive(Serialize)]
struct NoticeFrame<'a> {
    action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    patterns: Vec<std::borrow::Cow<'a, str>>,
    channels: Vec<std::borrow::Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recovered: Option<bool>,
}

/// The reply to `refresh`.
#[derive(Serialize)]
struct RefreshFrame<'a> {
    action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    status: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

/// The server ended a subscription: `unsubscribed`, with the reason.
#[derive(Serialize)]
struct RevokedFrame<'a> {
    action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pattern: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    reason: &'a str,
}

/// `pong` and `error` replies.
#[derive(Serialize)]
struct PlainFrame<'a> {
    action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

impl Conversation for NativeConversation {
    fn name(&self) -> &'static str {
        "native"
    }

    fn render(&self) -> Arc<dyn Render> {
        static NATIVE: OnceLock<Arc<dyn Render>> = OnceLock::new();
        NATIVE.get_or_init(|| Arc::new(Native)).clone()
    }

    fn decode(&mut self, inbound: Inbound<'_>, steps: &mut Vec<Step>) {
        steps.push(match Native.decode(inbound) {
            Ok(request) => Step::Request(request),
            Err(rejection) => Step::Malformed(Native.reject(&rejection)),
        });
    }

    fn answer(&mut self, answer: Answer<'_>, out: &mut Vec<Frame>) {
        out.push(match answer {
            Answer::Ack(ack) => Native.ack(&ack),
            Answer::Pong { id } => Native.pong(id),
            Answer::Refreshed { id, error } => Native.refreshed(id, error),
            Answer::Revoked { topic, reason } => Native.revoked(topic, reason),
            Answer::Published {
                channel,
                id,
                error,
                maybe_published,
            } => Native.published(channel, id, error, maybe_published),
            Answer::Called { id, outcome } => Native.called(id, outcome),
            Answer::Presence {
                channel,
                id,
                stats,
                outcome,
            } => Native.presence(channel, id, stats, outcome),
            Answer::UnknownClient { .. }
            | Answer::ServiceAck { .. }
            | Answer::ServiceData { .. }
            | Answer::ServiceEnded { .. } => return,
        });
    }
}

impl Render for Native {
    fn key(&self) -> &'static str {
        "native"
    }

    fn delivery(&self, message: &BrokerMessage) -> Option<Frame> {
        Some(Native::delivery(self, message))
    }

    fn notice(&self, notice: &Notice<'_>) -> Option<Frame> {
        Some(Native::notice(self, notice))
    }

    /// The event's JSON as it is: wsgate wrote it (a forged envelope that
    /// is not JSON text is not delivered).
    fn presence_event(&self, _channel: &[u8], event: &[u8]) -> Option<Frame> {
        let text = std::str::from_utf8(event).ok()?;
        is_strict_json(text, MAX_PAYLOAD_DEPTH).then(|| Frame::text(text.to_owned()))
    }
}

impl Native {
    /// Parses one client frame.
    pub fn decode(&self, inbound: Inbound<'_>) -> Result<Request, Rejection> {
        let text = match inbound {
            Inbound::Text(text) => text,
            Inbound::Binary(_) => {
                return Err(reject(
                    None,
                    "binary frames are not supported: send JSON text frames",
                ))
            }
        };
        let value: Value =
            serde_json::from_str(text).map_err(|e| reject(None, &format!("invalid JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(reject(None, "a request must be a JSON object"));
        };
        let id = match obj.get("id") {
            None | Some(Value::Null) => None,
            Some(Value::String(id)) => Some(id.clone()),
            Some(_) => return Err(reject(None, "\"id\" must be a string")),
        };
        let action = match obj.get("action") {
            None => return Err(reject(id, "missing field \"action\"")),
            Some(Value::String(a)) => a.as_str(),
            Some(_) => return Err(reject(id, "\"action\" must be a string")),
        };
        match action {
            "subscribe" => {
                let topic = topic(&obj, id.as_deref())?;
                let since = since(&obj, &topic, id.as_deref())?;
                let join_leave = match obj.get("join_leave") {
                    None | Some(Value::Null) | Some(Value::Bool(false)) => false,
                    Some(Value::Bool(true)) if matches!(topic, Topic::Channel(_)) => true,
                    Some(Value::Bool(true)) => {
                        return Err(reject(id, "\"join_leave\" is for channels, not patterns"))
                    }
                    Some(_) => return Err(reject(id, "\"join_leave\" must be a boolean")),
                };
                Ok(Request::Subscribe {
                    topic,
                    id,
                    ext: None,
                    since,
                    join_leave,
                })
            }
            "presence" | "presence_stats" => match topic(&obj, id.as_deref())? {
                Topic::Channel(channel) => Ok(Request::Presence {
                    channel,
                    id,
                    stats: action == "presence_stats",
                }),
                Topic::Pattern(_) => Err(reject(id, "presence is for channels, not patterns")),
            },
            "unsubscribe" => {
                topic(&obj, id.as_deref()).map(|topic| Request::Unsubscribe { topic, id })
            }
            "ping" => Ok(Request::Ping { id }),
            "publish" => publish(text, &obj, id),
            "call" => call(&obj, id),
            "refresh" => match obj.get("token") {
                Some(Value::String(token)) => Ok(Request::Refresh {
                    token: token.clone(),
                    id,
                }),
                None | Some(Value::Null) => Err(reject(id, "missing field \"token\"")),
                Some(_) => Err(reject(id, "\"token\" must be a string")),
            },
            other => {
                let msg = format!(
                    "unknown action {other:?}: expected subscribe, unsubscribe, publish, call, presence, presence_stats, ping or refresh"
                );
                Err(reject(id, &msg))
            }
        }
    }

    /// See [`super::Answer`].
    pub fn ack(&self, ack: &Ack<'_>) -> Frame {
        let name = String::from_utf8_lossy(ack.topic.name());
        let (pattern, channel) = match ack.topic {
            Topic::Pattern(_) => (Some(&*name), None),
            Topic::Channel(_) => (None, Some(&*name)),
        };
        json_frame(&AckFrame {
            action: match ack.kind {
                AckKind::Subscribe => "subscribe",
                AckKind::Unsubscribe => "unsubscribe",
            },
            pattern,
            channel,
            id: ack.id,
            status: ack.error.is_none(),
            error: ack.error.map(Refusal::message),
            recovered: ack.recovered,
        })
    }

    /// See [`super::Answer`].
    pub fn pong(&self, id: Option<&str>) -> Frame {
        json_frame(&PlainFrame {
            action: "pong",
            id,
            error: None,
        })
    }

    /// See [`super::Answer`].
    pub fn reject(&self, rejection: &Rejection) -> Frame {
        json_frame(&PlainFrame {
            action: "error",
            id: rejection.id.as_deref(),
            error: Some(&rejection.error),
        })
    }

    /// See [`super::Answer`].
    pub fn notice(&self, notice: &Notice<'_>) -> Frame {
        let names = |pattern: bool| {
            notice
                .topics
                .iter()
                .filter(|t| matches!(t, Topic::Pattern(_)) == pattern)
                .map(|t| String::from_utf8_lossy(t.name()))
                .collect()
        };
        json_frame(&NoticeFrame {
            action: match notice.kind {
                NoticeKind::Interrupted => "interrupted",
                NoticeKind::Resumed => "resumed",
            },
            reason: notice.reason,
            patterns: names(true),
            channels: names(false),
            recovered: notice.recovered,
        })
    }

    /// See [`super::Answer`].
    pub fn refreshed(&self, id: Option<&str>, error: Option<&str>) -> Frame {
        json_frame(&RefreshFrame {
            action: "refresh",
            id,
            status: error.is_none(),
            error,
        })
    }

    /// See [`super::Answer`].
    pub fn revoked(&self, topic: &Topic, reason: &str) -> Frame {
        let name = String::from_utf8_lossy(topic.name());
        let (pattern, channel) = match topic {
            Topic::Pattern(_) => (Some(&*name), None),
            Topic::Channel(_) => (None, Some(&*name)),
        };
        json_frame(&RevokedFrame {
            action: "unsubscribed",
            pattern,
            channel,
            reason,
        })
    }

    /// The answer to a publish: `{"action":"publish","channel":..,"id":..,
    /// "status":true}`, or `status` false with the `error` (and, for a
    /// broker failure, `maybe_published`).
    pub fn published(
        &self,
        channel: &[u8],
        id: Option<&str>,
        error: Option<&Refusal>,
        maybe_published: Option<bool>,
    ) -> Frame {
        json_frame(&PublishFrame {
            action: "publish",
            channel: &String::from_utf8_lossy(channel),
            id,
            status: error.is_none(),
            error: error.map(Refusal::message),
            maybe_published,
        })
    }

    /// The end of a call: `{"action":"call","id":..,"status":true,
    /// "result":..}`, or `status` false with the `error` and its `code`.
    pub fn called(&self, id: Option<&str>, outcome: Result<&[u8], &CallError>) -> Frame {
        let mut out = String::from("{\"action\":\"call\",");
        if let Some(id) = id {
            out.push_str("\"id\":");
            push_json_str(&mut out, id.as_bytes());
            out.push(',');
        }
        match outcome {
            Ok(result) => {
                out.push_str("\"status\":true,\"result\":");
                // The service's result is JSON text already (checked where
                // it entered the gateway).
                out.push_str(&String::from_utf8_lossy(result));
            }
            Err(e) => {
                out.push_str("\"status\":false,\"error\":");
                push_json_str(&mut out, e.message().as_bytes());
                out.push_str(&format!(",\"code\":{}", e.code()));
            }
        }
        out.push('}');
        Frame::text(out)
    }

    /// The answer to `presence` / `presence_stats`:
    /// `{"action":"presence","channel":..,"id":..,"status":true,"members":[..]}`,
    /// `{..."status":true,"clients":N,"users":M}`, or `"status":false` with
    /// `error`, as a refused subscribe.
    pub fn presence(
        &self,
        channel: &[u8],
        id: Option<&str>,
        stats: bool,
        outcome: Result<&crate::presence::Members, &Refusal>,
    ) -> Frame {
        let mut out = String::from("{\"action\":");
        out.push_str(if stats {
            "\"presence_stats\""
        } else {
            "\"presence\""
        });
        out.push_str(",\"channel\":");
        push_json_str(&mut out, channel);
        if let Some(id) = id {
            out.push_str(",\"id\":");
            push_json_str(&mut out, id.as_bytes());
        }
        match outcome {
            Ok(members) if stats => {
                out.push_str(&format!(
                    ",\"status\":true,\"clients\":{},\"users\":{}",
                    members.members.len(),
                    members.users
                ));
            }
            Ok(members) => {
                out.push_str(",\"status\":true,\"members\":");
                out.push_str(&members.json_array());
            }
            Err(refusal) => {
                out.push_str(",\"status\":false,\"error\":");
                push_json_str(&mut out, refusal.message().as_bytes());
            }
        }
        out.push('}');
        Frame::text(out)
    }

    /// See [`super::Answer`].
    pub fn delivery(&self, msg: &BrokerMessage) -> Frame {
        let mut out = String::with_capacity(delivery_capacity(msg));
        self.write_delivery(&mut out, msg);
        Frame::text(out)
    }

    /// Appends the delivery JSON of `msg` to `out` (the SSE render writes
    /// it after its `data: ` prefix, in the same allocation).
    pub fn write_delivery(&self, out: &mut String, msg: &BrokerMessage) {
        out.push_str("{\"action\":\"message\",");
        if let Topic::Pattern(p) = &msg.topic {
            out.push_str("\"pattern\":");
            push_json_str(out, p);
            out.push(',');
        }
        out.push_str("\"channel\":");
        push_json_str(out, &msg.channel);
        out.push_str(",\"payload\":");
        push_payload(out, &msg.payload);
        if let Some(position) = &msg.position {
            out.push_str(",\"offset\":");
            out.push_str(&position.offset.to_string());
            out.push_str(",\"epoch\":");
            push_json_str(out, &position.epoch);
        }
        out.push('}');
    }
}

/// Room for a delivery of `msg`, so that rendering it allocates once.
pub fn delivery_capacity(msg: &BrokerMessage) -> usize {
    64 + msg.channel.len() + msg.payload.len() * 4 / 3
}

/// `{"action":"call","service":..,"method":..,"params":..,"timeout_ms":..}`.
fn call(obj: &serde_json::Map<String, Value>, id: Option<String>) -> Result<Request, Rejection> {
    let name = |field: &str| match obj.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) => Err(reject(id.clone(), &format!("missing field \"{field}\""))),
        Some(_) => Err(reject(id.clone(), &format!("\"{field}\" must be a string"))),
    };
    let service = name("service")?;
    let method = name("method")?;
    let params = match obj.get("params") {
        None => Bytes::from_static(b"null"),
        Some(v) => Bytes::from(v.to_string()),
    };
    let timeout = match obj.get("timeout_ms") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(ms) if ms > 0 => Some(std::time::Duration::from_millis(ms)),
            _ => return Err(reject(id, "\"timeout_ms\" must be a positive integer")),
        },
    };
    Ok(Request::Call(crate::protocol::Call {
        service,
        method,
        params,
        id,
        timeout,
    }))
}

fn reject(id: Option<String>, error: &str) -> Rejection {
    Rejection {
        id,
        error: error.to_owned(),
    }
}

/// Reads a `publish`: a string `channel` (a name: `pattern` is not a field
/// of a publish) and a `payload` of any JSON, `null` included, kept as the
/// text the client sent. `text` is the frame `obj` was parsed from.
fn publish(
    text: &str,
    obj: &serde_json::Map<String, Value>,
    id: Option<String>,
) -> Result<Request, Rejection> {
    let channel = match obj.get("channel") {
        Some(Value::String(c)) => Bytes::copy_from_slice(c.as_bytes()),
        None | Some(Value::Null) => return Err(reject(id, "missing field \"channel\"")),
        Some(_) => return Err(reject(id, "\"channel\" must be a string")),
    };
    // The frame parsed as a Value a moment ago, so this fails only on what a
    // Value forgives and a struct does not: `payload` given twice.
    let payload = match serde_json::from_str::<PublishPayload<'_>>(text) {
        Ok(PublishPayload {
            payload: Some(payload),
        }) => crate::publish::json_payload(payload),
        Ok(PublishPayload { payload: None }) => {
            return Err(reject(id, "missing field \"payload\""))
        }
        Err(e) => return Err(reject(id, &format!("invalid publish: {e}"))),
    };
    Ok(Request::Publish {
        channel,
        payload,
        id,
    })
}

/// Reads the `pattern` or `channel` field (exactly one of them).
fn topic(obj: &serde_json::Map<String, Value>, id: Option<&str>) -> Result<Topic, Rejection> {
    let field = |name: &str| match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(Bytes::copy_from_slice(s.as_bytes()))),
        Some(_) => Err(reject(
            id.map(str::to_owned),
            &format!("\"{name}\" must be a string"),
        )),
    };
    match (field("pattern")?, field("channel")?) {
        (Some(p), None) => Ok(Topic::Pattern(p)),
        (None, Some(c)) => Ok(Topic::Channel(c)),
        (Some(_), Some(_)) => Err(reject(
            id.map(str::to_owned),
            "give either \"pattern\" or \"channel\", not both",
        )),
        (None, None) => Err(reject(
            id.map(str::to_owned),
            "missing field \"pattern\" or \"channel\"",
        )),
    }
}

/// The optional `since` of a subscribe: `{"offset":<n>,"epoch":"<e>"}` for
/// a channel; for a pattern, a map of channels it matches to such objects
/// (at most [`crate::history::MAX_SINCE_CHANNELS`]).
fn since(
    obj: &serde_json::Map<String, Value>,
    topic: &Topic,
    id: Option<&str>,
) -> Result<Option<crate::history::Since>, Rejection> {
    const SHAPE: &str =
        "\"since\" must be {\"offset\":<whole number>,\"epoch\":<string>} as a delivery gave them";
    const MAP: &str = "\"since\" of a pattern must map channels the pattern matches (at most 64) to {\"offset\":<whole number>,\"epoch\":<string>}";
    let bad = |why: &str| reject(id.map(str::to_owned), why);
    let since = match obj.get("since") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(since)) => since,
        Some(_) => return Err(bad(SHAPE)),
    };
    match topic {
        Topic::Channel(channel) => match super::since::position(since) {
            Some(p) => Ok(Some(vec![(channel.clone(), p)])),
            None => Err(bad(SHAPE)),
        },
        Topic::Pattern(pattern) => {
            match super::since::map(since, |c| crate::pattern::matches(pattern, c)) {
                Some(out) => Ok(Some(out)),
                None => Err(bad(MAP)),
            }
        }
    }
}

/// Serialises a reply. Our reply structs hold only strings and bools, for
/// which serde_json cannot fail; the fallback keeps this total anyway.
fn json_frame<T: Serialize>(value: &T) -> Frame {
    let text = serde_json::to_string(value)
        .unwrap_or_else(|_| "{\"action\":\"error\",\"error\":\"internal error\"}".to_owned());
    Frame::text(text)
}

/// Appends `bytes` as a JSON string (invalid UTF-8 replaced, see docs).
pub(crate) fn push_json_str(out: &mut String, bytes: &[u8]) {
    let s = String::from_utf8_lossy(bytes);
    // Serialising a &str into a String cannot fail.
    if let Ok(quoted) = serde_json::to_string(&*s) {
        out.push_str(&quoted);
    }
}

/// Appends the payload: raw JSON if it is JSON, a string if UTF-8, else base64.
pub(crate) fn push_payload(out: &mut String, payload: &[u8]) {
    match std::str::from_utf8(payload) {
        Ok(text) if is_strict_json(text, MAX_PAYLOAD_DEPTH) => out.push_str(text),
        Ok(text) => {
            if let Ok(quoted) = serde_json::to_string(text) {
                out.push_str(&quoted);
            }
        }
        Err(_) => {
            out.push('"');
            base64::engine::general_purpose::STANDARD.encode_string(payload, out);
            out.push_str("\",\"encoding\":\"base64\"");
        }
    }
}

/// Accepts exactly the JSON documents serde_json can read into values once
/// embedded in a delivery frame. `IgnoredAny` would skip string contents
/// undecoded and so let through lone surrogate escapes (`"\ud800"`); this
/// decodes each string (borrowed, so no allocation for plain text). And
/// since the frame wraps the payload in one more object, the payload may nest
/// one level less than serde_json's limit of 128, or the frame would be
/// unreadable by strict clients (found by `cargo fuzz run delivery`).
#[derive(Clone, Copy)]
struct StrictJson {
    depth: usize,
    max: usize,
}

/// Deepest payload nesting embedded as JSON (serde_json's limit is 128 levels,
/// and the frame adds one); deeper payloads are delivered as strings.
const MAX_PAYLOAD_DEPTH: usize = 126;

/// Is `text` exactly one JSON document that serde_json reads back as a
/// value, nesting at most `max_depth` arrays/objects deep? Every dialect
/// that embeds foreign JSON in its own frames asks this (the native one for
/// Redis payloads, Bayeux for payloads and for what its clients send), so
/// that what it renders is always readable by a strict client.
pub(crate) fn is_strict_json(text: &str, max_depth: usize) -> bool {
    let mut de = serde_json::Deserializer::from_str(text);
    let seed = StrictJson {
        depth: 0,
        max: max_depth,
    };
    serde::de::DeserializeSeed::deserialize(seed, &mut de).is_ok() && de.end().is_ok()
}

impl StrictJson {
    fn nested<E: serde::de::Error>(&self) -> Result<StrictJson, E> {
        if self.depth >= self.max {
            return Err(E::custom("payload nested too deep to embed"));
        }
        Ok(StrictJson {
            depth: self.depth + 1,
            max: self.max,
        })
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for StrictJson {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for StrictJson {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = self.nested()?;
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = self.nested()?;
        while map.next_key_seed(inner)?.is_some() {
            map.next_value_seed(inner)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(text: &str) -> Result<Request, Rejection> {
        Native.decode(Inbound::Text(text))
    }

    fn text(frame: Frame) -> String {
        match frame {
            Frame::Text(t) => t.as_str().to_owned(),
            other => panic!("not text: {other:?}"),
        }
    }

    fn msg(topic: Topic, channel: &'static [u8], payload: &'static [u8]) -> BrokerMessage {
        BrokerMessage {
            topic,
            channel: Bytes::from_static(channel),
            payload: Bytes::from_static(payload),
            position: None,
        }
    }

    #[test]
    fn decodes_requests() {
        assert_eq!(
            decode(r#"{"action":"subscribe","pattern":"news.*","id":"c1"}"#),
            Ok(Request::Subscribe {
                topic: Topic::Pattern(Bytes::from_static(b"news.*")),
                id: Some("c1".into()),
                ext: None,
                since: None,
                join_leave: false,
            })
        );
        assert_eq!(
            decode(r#"{"action":"unsubscribe","channel":"news.sport"}"#),
            Ok(Request::Unsubscribe {
                topic: Topic::Channel(Bytes::from_static(b"news.sport")),
                id: None
            })
        );
        assert_eq!(
            decode(r#"{"action":"ping","id":"c3"}"#),
            Ok(Request::Ping {
                id: Some("c3".into())
            })
        );
        assert_eq!(
            decode(r#"{"action":"refresh","token":"a.b.c","id":"r"}"#),
            Ok(Request::Refresh {
                token: "a.b.c".into(),
                id: Some("r".into())
            })
        );
        assert!(decode(r#"{"action":"refresh"}"#)
            .unwrap_err()
            .error
            .contains("token"));
        assert!(decode(r#"{"action":"refresh","token":1}"#)
            .unwrap_err()
            .error
            .contains("must be a string"));
    }

    #[test]
    fn decodes_publishes_keeping_the_payload_text() {
        for (payload, published) in [
            (r#""42""#, r#""42""#),
            ("42", "42"),
            ("null", "null"),
            (r#"{"z":1, "a":[2]}"#, r#"{"z":1, "a":[2]}"#),
            (r#""\u0041\n""#, r#""\u0041\n""#),
            ("1.0e0", "1.0e0"),
        ] {
            let frame =
                format!(r#"{{"action":"publish","channel":"c.*","payload":{payload},"id":"p"}}"#);
            assert_eq!(
                decode(&frame),
                Ok(Request::Publish {
                    channel: Bytes::from_static(b"c.*"),
                    payload: Bytes::copy_from_slice(published.as_bytes()),
                    id: Some("p".into())
                }),
                "{frame}"
            );
        }
        // Fields in any order; unknown ones ignored, as for every request.
        assert_eq!(
            decode(r#"{"payload":[1] ,"x":0,"channel":"c","action":"publish"}"#),
            Ok(Request::Publish {
                channel: Bytes::from_static(b"c"),
                payload: Bytes::from_static(b"[1]"),
                id: None
            })
        );
    }

    #[test]
    fn rejects_malformed_publishes_with_the_id() {
        for (input, expect) in [
            (
                r#"{"action":"publish","payload":1,"id":"p"}"#,
                "missing field \"channel\"",
            ),
            (
                r#"{"action":"publish","channel":null,"payload":1,"id":"p"}"#,
                "missing field \"channel\"",
            ),
            (
                r#"{"action":"publish","channel":"c","id":"p"}"#,
                "missing field \"payload\"",
            ),
            (
                r#"{"action":"publish","pattern":"c.*","payload":1,"id":"p"}"#,
                "missing field \"channel\"",
            ),
            (
                r#"{"action":"publish","channel":7,"payload":1,"id":"p"}"#,
                "\"channel\" must be a string",
            ),
            (
                r#"{"action":"publish","channel":"c","payload":1,"payload":2,"id":"p"}"#,
                "invalid publish: duplicate field `payload`",
            ),
        ] {
            let r = decode(input).unwrap_err();
            assert!(r.error.contains(expect), "{input}: {}", r.error);
            assert_eq!(r.id.as_deref(), Some("p"), "{input}");
        }
    }

    #[test]
    fn renders_publish_replies_exactly() {
        let reply = |error: Option<Refusal>, maybe_published| {
            text(Native.published(b"chat.a", Some("p1"), error.as_ref(), maybe_published))
        };
        assert_eq!(
            reply(None, None),
            r#"{"action":"publish","channel":"chat.a","id":"p1","status":true}"#
        );
        assert_eq!(
            reply(Some(Refusal::NotAllowed), None),
            r#"{"action":"publish","channel":"chat.a","id":"p1","status":false,"error":"not allowed"}"#
        );
        assert_eq!(
            reply(
                Some(Refusal::Unavailable("broker unavailable".into())),
                Some(true)
            ),
            r#"{"action":"publish","channel":"chat.a","id":"p1","status":false,"error":"broker unavailable","maybe_published":true}"#
        );
        assert_eq!(
            text(Native.published(b"c", None, None, None)),
            r#"{"action":"publish","channel":"c","status":true}"#
        );
    }

    #[test]
    fn renders_refresh_replies_and_revocations() {
        assert_eq!(
            text(Native.refreshed(Some("r"), None)),
            r#"{"action":"refresh","id":"r","status":true}"#
        );
        assert_eq!(
            text(Native.refreshed(None, Some("token expired"))),
            r#"{"action":"refresh","status":false,"error":"token expired"}"#
        );
        assert_eq!(
            text(Native.revoked(
                &Topic::Pattern(Bytes::from_static(b"news.*")),
                "not allowed"
            )),
            r#"{"action":"unsubscribed","pattern":"news.*","reason":"not allowed"}"#
        );
    }

    #[test]
    fn rejects_malformed_requests_with_a_reason_and_the_id() {
        for (input, expect, id) in [
            ("not json", "invalid JSON", None),
            ("[1,2]", "JSON object", None),
            (r#"{"pattern":"a"}"#, "missing field \"action\"", None),
            (r#"{"action":"jump","id":"x"}"#, "unknown action", Some("x")),
            (r#"{"action":7}"#, "\"action\" must be a string", None),
            (
                r#"{"action":"subscribe","id":"y"}"#,
                "missing field \"pattern\" or \"channel\"",
                Some("y"),
            ),
            (
                r#"{"action":"subscribe","pattern":"a","channel":"b"}"#,
                "not both",
                None,
            ),
            (
                r#"{"action":"subscribe","pattern":5}"#,
                "\"pattern\" must be a string",
                None,
            ),
            (
                r#"{"action":"ping","id":5}"#,
                "\"id\" must be a string",
                None,
            ),
        ] {
            let r = decode(input).unwrap_err();
            assert!(r.error.contains(expect), "{input}: {}", r.error);
            assert_eq!(r.id.as_deref(), id, "{input}");
        }
        let r = Native.decode(Inbound::Binary(b"{}")).unwrap_err();
        assert!(r.error.contains("binary"));
    }

    #[test]
    fn renders_replies_exactly() {
        let t = Topic::Pattern(Bytes::from_static(b"news.*"));
        let ack = Ack {
            kind: AckKind::Subscribe,
            topic: &t,
            id: Some("c1"),
            error: None,
            recovered: None,
        };
        assert_eq!(
            text(Native.ack(&ack)),
            r#"{"action":"subscribe","pattern":"news.*","id":"c1","status":true}"#
        );
        let c = Topic::Channel(Bytes::from_static(b"x"));
        let ack = Ack {
            kind: AckKind::Unsubscribe,
            topic: &c,
            id: None,
            error: Some(&Refusal::NotSubscribed),
            recovered: None,
        };
        assert_eq!(
            text(Native.ack(&ack)),
            r#"{"action":"unsubscribe","channel":"x","status":false,"error":"not subscribed"}"#
        );
        assert_eq!(
            text(Native.pong(Some("c3"))),
            r#"{"action":"pong","id":"c3"}"#
        );
        assert_eq!(
            text(Native.reject(&reject(None, "bad"))),
            r#"{"action":"error","error":"bad"}"#
        );
    }

    #[test]
    fn deep_payloads_stay_readable() {
        for depth in [1, 126, 127, 128, 300] {
            let payload = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            let m = msg(Topic::Channel(Bytes::from_static(b"c")), b"c", b"");
            let m = BrokerMessage {
                payload: Bytes::from(payload.clone()),
                position: None,
                ..m
            };
            let frame = text(Native.delivery(&m));
            let v: Value =
                serde_json::from_str(&frame).unwrap_or_else(|e| panic!("depth {depth}: {e}"));
            if depth <= 126 {
                assert!(v["payload"].is_array(), "depth {depth} embedded");
            } else {
                assert_eq!(
                    v["payload"],
                    Value::String(payload),
                    "depth {depth} stringified"
                );
            }
        }
    }

    #[test]
    fn renders_gap_notices() {
        let topics = [
            Topic::Pattern(Bytes::from_static(b"news.*")),
            Topic::Channel(Bytes::from_static(b"a")),
        ];
        let n = Notice {
            kind: NoticeKind::Interrupted,
            topics: &topics,
            reason: Some("broker connection lost"),
            recovered: None,
        };
        assert_eq!(
            text(Native.notice(&n)),
            r#"{"action":"interrupted","reason":"broker connection lost","patterns":["news.*"],"channels":["a"]}"#
        );
        let n = Notice {
            kind: NoticeKind::Resumed,
            topics: &topics[..1],
            reason: None,
            recovered: None,
        };
        assert_eq!(
            text(Native.notice(&n)),
            r#"{"action":"resumed","patterns":["news.*"],"channels":[]}"#
        );
    }

    #[test]
    fn renders_deliveries_for_each_payload_kind() {
        let p = Topic::Pattern(Bytes::from_static(b"news.*"));
        assert_eq!(
            text(Native.delivery(&msg(p.clone(), b"news.sport", br#"{"score":3}"#))),
            r#"{"action":"message","pattern":"news.*","channel":"news.sport","payload":{"score":3}}"#
        );
        assert_eq!(
            text(Native.delivery(&msg(p.clone(), b"news.sport", b"hello \"world\""))),
            r#"{"action":"message","pattern":"news.*","channel":"news.sport","payload":"hello \"world\""}"#
        );
        assert_eq!(
            text(Native.delivery(&msg(
                Topic::Channel(Bytes::from_static(b"c")),
                b"c",
                b"\xff\x00"
            ))),
            r#"{"action":"message","channel":"c","payload":"/wA=","encoding":"base64"}"#
        );
        // A lone surrogate escape is not JSON a strict client can read: stringified.
        assert_eq!(
            text(Native.delivery(&msg(
                Topic::Channel(Bytes::from_static(b"c")),
                b"c",
                br#""\ud800""#
            ))),
            r#"{"action":"message","channel":"c","payload":"\"\\ud800\""}"#
        );
        assert_eq!(
            text(Native.delivery(&msg(p, b"n", b"42"))),
            r#"{"action":"message","pattern":"news.*","channel":"n","payload":42}"#
        );
    }
}
