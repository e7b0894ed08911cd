//! The body of the `presence_event` fuzz target (also run by
//! `tests/fuzz_bodies.rs` on seeds): what wsgate does with a presence
//! channel's `\xffwsgate-p1:` envelope and with a presence store's entries,
//! both bytes that any Redis client can write (`docs/presence.md`).
//!
//! Input: any bytes. Checks:
//! - `presence::envelope` of the input's text is `MAGIC` and the text, so
//!   the hub's prefix strip gives back exactly the event;
//! - the native render of the bytes after `MAGIC` (`Render::presence_event`,
//!   what the hub hands any forged envelope) never panics, and delivers
//!   only a text frame holding exactly those bytes, which
//!   `serde_json::from_str::<Value>` reads (a forged envelope that is not
//!   strict JSON is dropped, never half-delivered);
//! - `presence::member_of` and `Members::from_read` on the input split on
//!   0xff (stored leave events, as a presence read returns them) never
//!   panic; every member they return is the JSON object inside a stored
//!   leave event of that channel, with a string `client`; members are
//!   sorted by client, `users` counts distinct non-null users, and
//!   `json_array` is one JSON array of those objects.

use bytes::Bytes;
use serde_json::Value;
use wsgate::presence::{self, Change, Members};
use wsgate::protocol::native::Native;
use wsgate::protocol::{Frame, Render};

/// Runs the checks on one input.
pub(crate) fn run(data: &[u8]) {
    let channel: &[u8] = b"chat.room";
    if let Ok(text) = std::str::from_utf8(data) {
        let env = presence::envelope(text);
        assert_eq!(&env[..presence::MAGIC.len()], presence::MAGIC);
        assert_eq!(&env[presence::MAGIC.len()..], data);
    }

    match Native.presence_event(channel, data) {
        None => {
            let strict = std::str::from_utf8(data)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(t).ok());
            // What serde_json reads, the renderer refuses only for its
            // depth: more than 126 levels, which a frame could not carry
            // readably (serde_json's limit is 128).
            if let Some(v) = strict {
                assert!(depth(&v) > 126, "valid JSON refused: {data:?}");
            }
        }
        Some(Frame::Text(text)) => {
            let v: Value = serde_json::from_str(text.as_str()).unwrap_or_else(|e| panic!("{e}"));
            assert!(depth(&v) <= 126, "too deep to embed: {text}");
            assert_eq!(text.as_bytes(), data, "the event was changed");
        }
        Some(other) => panic!("not a text frame: {other:?}"),
    }

    // As stored entries: `<leave event>` each, channel `chat.room`.
    let read: Vec<Bytes> = data
        .split(|&b| b == 0xff)
        .map(Bytes::copy_from_slice)
        .collect();
    let head = presence::event(Change::Leave, channel, "");
    let head = head.strip_suffix('}').unwrap_or(&head);
    for raw in &read {
        if let Some(member) = presence::member_of(channel, raw) {
            assert!(raw.starts_with(head.as_bytes()), "{raw:?}");
            assert!(raw.ends_with(b"}"));
            assert_eq!(
                &raw[head.len()..raw.len() - 1],
                member.as_bytes(),
                "member is not the inside of the event"
            );
        }
    }
    let members = Members::from_read(channel, &read);
    assert!(members.users <= members.members.len());
    let mut clients = Vec::new();
    let mut users = Vec::new();
    for m in &members.members {
        let v: Value = serde_json::from_str(m).unwrap_or_else(|e| panic!("{e}: {m}"));
        let client = v["client"]
            .as_str()
            .unwrap_or_else(|| panic!("no string client: {m}"))
            .to_owned();
        if let Some(u) = v["user"].as_str() {
            users.push(u.to_owned());
        }
        clients.push(client);
    }
    assert!(
        clients.windows(2).all(|w| w[0] <= w[1]),
        "not sorted: {clients:?}"
    );
    users.sort();
    users.dedup();
    assert_eq!(users.len(), members.users);
    match serde_json::from_str::<Value>(&members.json_array()) {
        Ok(Value::Array(items)) => {
            assert_eq!(items.len(), members.members.len());
            assert!(items.iter().all(Value::is_object));
        }
        other => panic!("json_array: {other:?}"),
    }
}

/// Arrays and objects nested in a JSON value (0 for a scalar), as
/// serde_json and the renderer count them.
fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}
