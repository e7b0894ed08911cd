//! realizehit's reply shapes, as the shipped server wrote them with
//! `JSON.stringify`: `{"id":..,"ret":..}` on success (`ret` left out when
//! there is none), `{"id":..,"err":".."}` on failure (no `id` when the
//! message was no JSON), and the notices it lacked, under reserved ids.

use serde::Serialize;

use crate::broker::Topic;
use crate::protocol::Frame;

use super::pattern;

/// The reserved id of a gap notice: `{"id":"$gap","ret":{"gap":
/// "interrupted"|"resumed","reason":..,"subs":{"<id>":"<channel>"}}}`. A
/// realizehit client waits for the id it sent, so it never mistakes this
/// for a reply; an application can listen for it.
pub const GAP_ID: &str = "$gap";

/// The reserved id of a revocation: `{"id":"$revoked","err":..,"sub":..}`.
const REVOKED_ID: &str = "$revoked";

fn json(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// `{"id":<id>}`: a sub or unsub done. `id` is JSON text.
pub fn done(id: Option<&str>) -> Frame {
    Frame::text(format!("{{\"id\":{}}}", id.unwrap_or("null")))
}

/// `{"id":<id>,"ret":"pong"}`.
pub fn pong(id: Option<&str>) -> Frame {
    Frame::text(format!(
        "{{\"id\":{},\"ret\":\"pong\"}}",
        id.unwrap_or("null")
    ))
}

/// `{"id":<id>,"err":<error>}`, or `{"err":<error>}` without an id.
pub fn error(id: Option<&str>, error: &str) -> Frame {
    match id {
        Some(id) => Frame::text(format!("{{\"id\":{id},\"err\":{}}}", json(error))),
        None => Frame::text(format!("{{\"err\":{}}}", json(error))),
    }
}

#[derive(Serialize)]
struct Gap<'a> {
    gap: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    subs: serde_json::Map<String, serde_json::Value>,
}

#[derive(Serialize)]
struct Wrapped<'a, T> {
    id: &'a str,
    ret: T,
}

/// A gap notice: see [`GAP_ID`].
pub fn gap(kind: &str, reason: Option<&str>, topics: &[Topic]) -> Frame {
    let subs = topics
        .iter()
        .map(|t| {
            let id = pattern::id(t.name());
            (
                String::from_utf8_lossy(&id).into_owned(),
                String::from_utf8_lossy(t.name()).into_owned().into(),
            )
        })
        .collect();
    let body = Wrapped {
        id: GAP_ID,
        ret: Gap {
            gap: kind,
            reason,
            subs,
        },
    };
    Frame::text(serde_json::to_string(&body).unwrap_or_default())
}

/// The server ended a subscription (a refreshed token no longer allows it).
pub fn revoked(topic: &Topic, reason: &str) -> Frame {
    let id = pattern::id(topic.name());
    Frame::text(format!(
        "{{\"id\":\"{REVOKED_ID}\",\"err\":{},\"sub\":\"{}\"}}",
        json(reason),
        String::from_utf8_lossy(&id)
    ))
}

/// What Node's `JSON.parse` said about text that is no JSON (V8's wording):
/// `Unexpected end of JSON input`, or `Unexpected token <c> in JSON at
/// position <n>`.
pub fn json_error(text: &str, e: &serde_json::Error) -> String {
    if e.is_eof() {
        return "Unexpected end of JSON input".to_owned();
    }
    // serde's line and column (1-based, in chars) back to a char position.
    let (mut line, mut column) = (1usize, 0usize);
    for (at, c) in text.chars().enumerate() {
        if line == e.line() {
            column += 1;
            if column == e.column() {
                return format!("Unexpected token {c} in JSON at position {at}");
            }
        }
        if c == '\n' {
            line += 1;
        }
    }
    "Unexpected end of JSON input".to_owned()
}
