//! The body of the `sse_last_event_id` fuzz target (also run by
//! `tests/fuzz_bodies.rs` on seeds): the `Last-Event-ID` header an SSE
//! client sends back when it reconnects (`docs/dialects/sse.md`), which any
//! client can set to anything.
//!
//! Input: any bytes, read as the header's text (invalid UTF-8 replaced by
//! U+FFFD). Checks:
//! - `LastEventId::parse` never panics and agrees with an independent
//!   reading of `<epoch>:<offset>:<channel>`: an epoch of 1 to 64 ASCII
//!   letters and digits, an offset of decimal digits that fits a `u64`, a
//!   non-empty channel (the rest, colons included);
//! - a stream opened with the id on its channel (after a pattern that also
//!   covers it) resumes exactly that channel at exactly that position, on
//!   the channel's own subscribe, and subscribes to everything else without
//!   `since`;
//! - a delivery at that position on that channel writes an `id:` line that
//!   parses back to the same id, unless the channel holds CR, LF or NUL
//!   (then it writes no `id:` line at all).

use bytes::Bytes;
use wsgate::broker::{BrokerMessage, Topic};
use wsgate::protocol::sse::{LastEventId, SseConversation, SseRender};
use wsgate::protocol::{Conversation, Frame, Render, Request, Step};

/// The reading the docs describe, written separately from the parser.
fn expected(raw: &str) -> Option<(String, u64, String)> {
    let mut parts = raw.splitn(3, ':');
    let (epoch, offset, channel) = (parts.next()?, parts.next()?, parts.next()?);
    if epoch.is_empty() || epoch.len() > 64 || !epoch.chars().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    if offset.is_empty() || !offset.chars().all(|c| c.is_ascii_digit()) || channel.is_empty() {
        return None;
    }
    Some((epoch.to_owned(), offset.parse().ok()?, channel.to_owned()))
}

/// Runs the checks on one input.
pub(crate) fn run(data: &[u8]) {
    let raw = String::from_utf8_lossy(data);
    let parsed = LastEventId::parse(&raw);
    let want = expected(&raw);
    assert_eq!(
        parsed.as_ref().map(|id| (
            id.position.epoch.to_vec(),
            id.position.offset,
            id.channel.to_vec()
        )),
        want.map(|(e, o, c)| (e.into_bytes(), o, c.into_bytes())),
        "{raw:?}"
    );
    let Some(id) = parsed else {
        return;
    };

    let topics = vec![
        Topic::Pattern(Bytes::from_static(b"*")),
        Topic::Channel(id.channel.clone()),
        Topic::Channel(Bytes::from_static(b"\x00other")),
    ];
    let mut conv = SseConversation::new(topics.clone(), Some(id.clone()));
    let mut steps = Vec::new();
    conv.open(&mut steps);
    let mut subscribed = Vec::new();
    for step in steps {
        if let Step::Request(Request::Subscribe { topic, since, .. }) = step {
            let resumes = topic == Topic::Channel(id.channel.clone()) && subscribed.len() == 1;
            if resumes {
                assert_eq!(since, Some(vec![(id.channel.clone(), id.position.clone())]));
            } else {
                assert_eq!(since, None, "{topic:?}");
            }
            subscribed.push(topic);
        }
    }
    // `\x00other` may equal the channel; the stream subscribes to what it was given.
    assert_eq!(subscribed, topics);

    let message = BrokerMessage {
        topic: Topic::Channel(id.channel.clone()),
        channel: id.channel.clone(),
        payload: Bytes::from_static(b"{\"x\":1}"),
        position: Some(id.position.clone()),
    };
    let Some(Frame::Text(event)) = SseRender.delivery(&message) else {
        panic!("no text event");
    };
    let event = event.as_str();
    if id.channel.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
        assert!(event.starts_with("data: "), "{event:?}");
    } else {
        let line = event
            .strip_prefix("id: ")
            .and_then(|rest| rest.split('\n').next())
            .unwrap_or_else(|| panic!("no id line: {event:?}"));
        assert_eq!(LastEventId::parse(line).as_ref(), Some(&id), "{event:?}");
    }
}
