//! realizehit (server-ws 0.3.3): JSON requests `{"id","act","pat"}` over
//! Engine.IO messages, exact channels named by filter objects, deliveries
//! `<8-hex id>?<raw payload>`. See `docs/dialects/realizehit.md`.
//!
//! This is the dialect only: its frames are the message texts. The
//! Engine.IO transport (`crate::transport::engineio`) wraps them in packets.
//!
//! Ids: the request's `id` is echoed as the JSON value the client sent
//! (any type, as the shipped server does); a missing or falsy one gets a
//! generated string id, as the shipped server's `uniqid()` did. The id's
//! JSON text travels through the session as the request's correlation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::Value;

use super::{
    Answer, Conversation, Frame, Inbound, Notice, NoticeKind, Refusal, Render, Request, Step,
};
use crate::broker::{BrokerMessage, Topic};

pub mod pattern;
pub mod publish;
pub mod reply;

pub use reply::GAP_ID;

/// The reply to an unknown `act`.
pub const UNKNOWN_ACT: &str = "Unable to attend request";
/// The reply to an unsubscribe of something not held.
pub const NOT_SUBSCRIBED: &str = "We did not found a subscription on this client";
/// A text message that is no JSON object, or a binary one.
pub const BINARY: &str = "binary messages are not supported: send JSON text";

/// One realizehit connection: it keeps no protocol state (ids are echoed,
/// subscriptions are the session's), only the shared render.
pub struct RealizehitConversation {
    render: Arc<dyn Render>,
}

impl RealizehitConversation {
    /// A conversation whose deliveries `render` renders (the transport's
    /// wrapping of [`RealizehitRender`]).
    pub fn new(render: Arc<dyn Render>) -> RealizehitConversation {
        RealizehitConversation { render }
    }
}

/// The bare realizehit render (no transport framing).
pub fn render() -> Arc<dyn Render> {
    static RENDER: OnceLock<Arc<dyn Render>> = OnceLock::new();
    RENDER.get_or_init(|| Arc::new(RealizehitRender)).clone()
}

/// Renders deliveries `<id>?<payload>` and gap notices (see [`GAP_ID`]).
pub struct RealizehitRender;

impl Render for RealizehitRender {
    fn key(&self) -> &'static str {
        "realizehit"
    }

    fn delivery(&self, message: &BrokerMessage) -> Option<Frame> {
        // Only exact channels are subscribed; a pattern's message is not ours.
        let Topic::Channel(channel) = &message.topic else {
            return None;
        };
        let payload = String::from_utf8_lossy(&message.payload);
        let mut text = String::with_capacity(9 + payload.len());
        text.push_str(std::str::from_utf8(&pattern::id(channel)).unwrap_or("00000000"));
        text.push('?');
        text.push_str(&payload);
        Some(Frame::text(text))
    }

    fn notice(&self, notice: &Notice<'_>) -> Option<Frame> {
        let kind = match notice.kind {
            NoticeKind::Interrupted => "interrupted",
            NoticeKind::Resumed => "resumed",
        };
        Some(reply::gap(kind, notice.reason, notice.topics))
    }
}

impl Conversation for RealizehitConversation {
    fn name(&self) -> &'static str {
        "realizehit"
    }

    fn render(&self) -> Arc<dyn Render> {
        self.render.clone()
    }

    fn decode(&mut self, inbound: Inbound<'_>, steps: &mut Vec<Step>) {
        let text = match inbound {
            Inbound::Text(text) => text,
            Inbound::Binary(_) => {
                steps.push(Step::Malformed(reply::error(None, BINARY)));
                return;
            }
        };
        steps.push(match decode(text) {
            Ok(request) => Step::Request(request),
            Err((id, error)) => Step::Malformed(reply::error(id.as_deref(), &error)),
        });
    }

    fn answer(&mut self, answer: Answer<'_>, out: &mut Vec<Frame>) {
        out.push(match answer {
            Answer::Ack(ack) => match ack.error {
                None => reply::done(ack.id),
                Some(Refusal::NotSubscribed) => reply::error(ack.id, NOT_SUBSCRIBED),
                Some(refusal) => reply::error(ack.id, refusal.message()),
            },
            Answer::Pong { id } => reply::pong(id),
            Answer::Refreshed { id, error } => match error {
                None => reply::done(id),
                Some(e) => reply::error(id, e),
            },
            Answer::Revoked { topic, reason } => reply::revoked(topic, reason),
            Answer::Published { id, error, .. } => match error {
                None => reply::done(id),
                Some(e) => reply::error(id, e.message()),
            },
            Answer::UnknownClient { .. }
            | Answer::Presence { .. }
            | Answer::Called { .. }
            | Answer::ServiceAck { .. }
            | Answer::ServiceData { .. }
            | Answer::ServiceEnded { .. } => return,
        });
    }
}

/// Parses one request, or says why not (with the id to answer, when known).
fn decode(text: &str) -> Result<Request, (Option<String>, String)> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| (None, reply::json_error(text, &e)))?;
    let obj = match value {
        Value::Null => return Err((None, "Cannot read property 'id' of null".to_owned())),
        Value::Object(obj) => obj,
        // `"x".id` is undefined: a fresh id, and no `act`.
        _ => return Err((Some(fresh_id()), UNKNOWN_ACT.to_owned())),
    };
    let id = match obj.get("id") {
        Some(v) if pattern::truthy(v) => v.to_string(),
        _ => fresh_id(),
    };
    let fail = |e: &str| (Some(id.clone()), e.to_owned());
    match obj.get("act").and_then(Value::as_str) {
        Some("sub") => {
            let channel = pattern::channel(obj.get("pat")).map_err(fail)?;
            Ok(Request::Subscribe {
                topic: Topic::Channel(Bytes::from(channel)),
                id: Some(id),
                ext: None,
                since: None,
                join_leave: false,
            })
        }
        Some("unsub") => {
            let channel = match obj.get("pat") {
                // The shipped server looked a string up as the channel itself.
                Some(Value::String(s)) if !s.is_empty() => s.clone(),
                Some(v @ (Value::Object(_) | Value::Array(_) | Value::Null)) => {
                    pattern::channel(Some(v)).map_err(fail)?
                }
                _ => return Err(fail(NOT_SUBSCRIBED)),
            };
            Ok(Request::Unsubscribe {
                topic: Topic::Channel(Bytes::from(channel)),
                id: Some(id),
            })
        }
        Some("ping") => Ok(Request::Ping { id: Some(id) }),
        _ => Err(fail(UNKNOWN_ACT)),
    }
}

/// A fresh request id, as JSON text: unique on this node (the start time
/// and a counter, base 36 like `uniqid`).
fn fresh_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static START: OnceLock<u64> = OnceLock::new();
    let start = *START.get_or_init(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("\"{}{}\"", base36(start), base36(n))
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Vec<String> {
        let mut conv = RealizehitConversation::new(render());
        let mut steps = Vec::new();
        conv.decode(Inbound::Text(text), &mut steps);
        steps
            .into_iter()
            .map(|s| match s {
                Step::Request(r) => format!("{r:?}"),
                Step::Malformed(f) => f.as_text().unwrap_or("").to_owned(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn requests_and_errors() {
        assert_eq!(
            one(r#"{"id":"s1","act":"sub","pat":{"foo":"bar"}}"#),
            [
                r#"Subscribe { topic: Channel(b"foo:bar"), id: Some("\"s1\""), ext: None, since: None, join_leave: false }"#
            ]
        );
        assert_eq!(
            one(r#"{"id":7,"act":"unsub","pat":"foo:bar"}"#),
            [r#"Unsubscribe { topic: Channel(b"foo:bar"), id: Some("7") }"#]
        );
        assert_eq!(
            one(r#"{"id":"a","act":"nope"}"#),
            [r#"{"id":"a","err":"Unable to attend request"}"#]
        );
        assert_eq!(
            one(r#"{"id":"a","act":"sub","pat":"x"}"#),
            [r#"{"id":"a","err":"invalid filters provided"}"#]
        );
        assert_eq!(
            one(r#"{"id":"a","act":"unsub"}"#),
            [r#"{"id":"a","err":"We did not found a subscription on this client"}"#]
        );
        assert_eq!(
            one("null"),
            [r#"{"err":"Cannot read property 'id' of null"}"#]
        );
        assert_eq!(one("{"), [r#"{"err":"Unexpected end of JSON input"}"#]);
        assert_eq!(
            one("{x"),
            [r#"{"err":"Unexpected token x in JSON at position 1"}"#]
        );
    }

    #[test]
    fn deliveries_name_the_subscription_id() {
        let msg = BrokerMessage {
            topic: Topic::Channel(Bytes::from_static(b"channel:cnn|tvshow:simpsons")),
            channel: Bytes::from_static(b"channel:cnn|tvshow:simpsons"),
            payload: Bytes::from_static(b"\"Hello world\""),
            position: None,
        };
        let frame = RealizehitRender.delivery(&msg);
        assert_eq!(
            frame.as_ref().and_then(Frame::as_text),
            Some(r#"54797868?"Hello world""#)
        );
    }
}
