//! The native protocol over server-sent events (`WSGATE_SSE_PATH`): one
//! way, the subscriptions named in the URL (`docs/dialects/sse.md`).
//!
//! Every frame is a whole SSE event, rendered once:
//!
//! - a delivery is an unnamed event (EventSource's `message`) whose data is
//!   the native delivery JSON: `data: {"action":"message",...}\n\n`;
//! - everything else is a named event whose type is the native `action`
//!   and whose data is the native JSON: `event: subscribe` (the answer to
//!   each subscription of the URL, `status` true or false with the native
//!   refusal), `event: interrupted` and `event: resumed` (gap notices), and
//!   the last one, `event: close` (`{"action":"close","code":..,"reason":..}`,
//!   the code a WebSocket would have been closed with).
//!
//! Render key `sse`: a delivery is rendered once per message for every SSE
//! member, with its `data: ` prefix and blank line in the same allocation,
//! and queued as the same shared bytes to each; the transport writes them
//! as they are.

use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use super::native::{delivery_capacity, Native, NativeConversation};
use super::{
    AckKind, Answer, Conversation, Frame, Inbound, Notice, NoticeKind, Render, Request, Step,
};
use crate::broker::{BrokerMessage, Topic};
use crate::history::{Position, Since, MAX_EPOCH_BYTES};

/// The SSE rendering, shared by every event stream.
#[derive(Debug, Default, Clone, Copy)]
pub struct SseRender;

impl Render for SseRender {
    fn key(&self) -> &'static str {
        "sse"
    }

    fn delivery(&self, message: &BrokerMessage) -> Option<Frame> {
        let mut out = String::with_capacity(delivery_capacity(message) + 8);
        if let Some(position) = &message.position {
            write_id(&mut out, position, &message.channel);
        }
        let data_at = out.len();
        out.push_str("data: ");
        Native.write_delivery(&mut out, message);
        out.push_str("\n\n");
        Some(Frame::text(split_lines(out, data_at)))
    }

    fn notice(&self, notice: &Notice<'_>) -> Option<Frame> {
        let name = match notice.kind {
            NoticeKind::Interrupted => "interrupted",
            NoticeKind::Resumed => "resumed",
        };
        Native
            .notice(notice)
            .as_text()
            .map(|json| event(name, json))
    }
}

/// One event stream's dialect: the native answers, as named events, and the
/// subscriptions its URL asked for, made first.
#[derive(Debug, Default)]
pub struct SseConversation {
    opening: Vec<Topic>,
    resume: Option<LastEventId>,
}

impl SseConversation {
    /// A stream that subscribes to `topics` as it opens; `resume`, the
    /// client's `Last-Event-ID`, goes as `since` with the first of them
    /// that covers its channel (the exact channel, else a pattern).
    pub fn new(topics: Vec<Topic>, resume: Option<LastEventId>) -> SseConversation {
        SseConversation {
            opening: topics,
            resume,
        }
    }
}

impl Conversation for SseConversation {
    fn name(&self) -> &'static str {
        "sse"
    }

    fn render(&self) -> Arc<dyn Render> {
        static SSE: OnceLock<Arc<dyn Render>> = OnceLock::new();
        SSE.get_or_init(|| Arc::new(SseRender)).clone()
    }

    /// Nothing arrives on an event stream.
    fn decode(&mut self, _inbound: Inbound<'_>, _steps: &mut Vec<Step>) {}

    fn open(&mut self, steps: &mut Vec<Step>) {
        let resume = self.resume.take();
        let resumed_at = resume.as_ref().and_then(|r| {
            let exact = self
                .opening
                .iter()
                .position(|t| matches!(t, Topic::Channel(_)) && r.since_for(t).is_some());
            exact.or_else(|| self.opening.iter().position(|t| r.since_for(t).is_some()))
        });
        steps.extend(self.opening.drain(..).enumerate().map(|(i, topic)| {
            let since = match (&resume, resumed_at) {
                (Some(r), Some(at)) if at == i => r.since_for(&topic),
                _ => None,
            };
            Step::Request(Request::Subscribe {
                topic,
                id: None,
                ext: None,
                since,
                join_leave: false,
            })
        }));
    }

    fn answer(&mut self, answer: Answer<'_>, out: &mut Vec<Frame>) {
        let name = match &answer {
            Answer::Ack(ack) if ack.kind == AckKind::Subscribe => "subscribe",
            Answer::Ack(_) => "unsubscribe",
            Answer::Pong { .. } => "pong",
            Answer::Refreshed { .. } => "refresh",
            Answer::Revoked { .. } => "unsubscribed",
            Answer::Published { .. } => "publish",
            Answer::UnknownClient { .. }
            | Answer::Presence { .. }
            | Answer::Called { .. }
            | Answer::ServiceAck { .. }
            | Answer::ServiceData { .. }
            | Answer::ServiceEnded { .. } => return,
        };
        let mut native = Vec::with_capacity(1);
        NativeConversation.answer(answer, &mut native);
        out.extend(
            native
                .iter()
                .filter_map(Frame::as_text)
                .map(|json| event(name, json)),
        );
    }
}

/// A named event: `event: <name>\ndata: <json>\n\n`.
pub fn event(name: &str, json: &str) -> Frame {
    let mut out = String::with_capacity(name.len() + json.len() + 16);
    out.push_str("event: ");
    out.push_str(name);
    out.push_str("\ndata: ");
    out.push_str(json);
    out.push_str("\n\n");
    let data_at = out.find("\ndata: ").map_or(0, |i| i + 1);
    Frame::text(split_lines(out, data_at))
}

/// The last event of a stream: why it ended, with the close code a
/// WebSocket would have had (4008 slow consumer, 1012 restart, ...).
pub fn close_event(code: u16, reason: &str) -> Frame {
    let json = serde_json::json!({ "action": "close", "code": code, "reason": reason });
    event("close", &json.to_string())
}

/// The first bytes of a stream: EventSource's reconnection delay.
pub fn retry_field(millis: u64) -> String {
    format!("retry: {millis}\n\n")
}

/// The `id:` line of a history channel's delivery,
/// `id: <epoch>:<offset>:<channel>\n`: EventSource keeps it and sends it back
/// as `Last-Event-ID` when it reconnects, and [`LastEventId::parse`] reads
/// it into the `since` of that channel's subscribe. Nothing is written for
/// a channel that is not UTF-8 or holds a CR, LF or NUL (an `id` cannot;
/// that channel cannot resume this way, `docs/dialects/sse.md`).
fn write_id(out: &mut String, position: &Position, channel: &[u8]) {
    let Ok(channel) = std::str::from_utf8(channel) else {
        return;
    };
    if channel.contains(['\r', '\n', '\0']) {
        return;
    }
    // Epochs are ASCII letters and digits (`history::open`).
    let Ok(epoch) = std::str::from_utf8(&position.epoch) else {
        return;
    };
    // Writing into a String cannot fail.
    let _ = writeln!(out, "id: {epoch}:{}:{channel}", position.offset);
}

/// A `Last-Event-ID` a stream of ours gave: the channel and the position
/// of the last delivery the client took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastEventId {
    /// The channel of that delivery.
    pub channel: Bytes,
    /// Its position.
    pub position: Position,
}

impl LastEventId {
    /// Reads `<epoch>:<offset>:<channel>`; `None` for anything else (an id
    /// from another server, or mangled), which resumes nothing.
    pub fn parse(raw: &str) -> Option<LastEventId> {
        let (epoch, rest) = raw.split_once(':')?;
        let (offset, channel) = rest.split_once(':')?;
        let epoch_ok = !epoch.is_empty()
            && epoch.len() <= MAX_EPOCH_BYTES
            && epoch.bytes().all(|b| b.is_ascii_alphanumeric());
        let offset_ok = !offset.is_empty() && offset.bytes().all(|b| b.is_ascii_digit());
        if !epoch_ok || !offset_ok || channel.is_empty() {
            return None;
        }
        Some(LastEventId {
            channel: Bytes::copy_from_slice(channel.as_bytes()),
            position: Position {
                offset: offset.parse().ok()?,
                epoch: Bytes::copy_from_slice(epoch.as_bytes()),
            },
        })
    }

    /// The `since` for `topic`: this position when the topic is the
    /// channel, or a pattern that matches it.
    fn since_for(&self, topic: &Topic) -> Option<Since> {
        let covers = match topic {
            Topic::Channel(c) => *c == self.channel,
            Topic::Pattern(p) => crate::pattern::matches(p, &self.channel),
        };
        covers.then(|| vec![(self.channel.clone(), self.position.clone())])
    }
}

/// An SSE line ends at CR, LF or CRLF, so a data line cannot hold one: a
/// JSON payload embedded as it was published may (as whitespace; inside a
/// JSON string they are escaped). Each break becomes `\ndata: `, which the
/// client joins back with LF: the same JSON. `event` is the whole event,
/// its own line ends (the last two bytes of the header lines and the blank
/// line) included, and its `data: ` line starts at `data_at` (after the
/// `event:` and `id:` lines); the usual event has no break in its data and
/// is returned as it is.
fn split_lines(event: String, data_at: usize) -> String {
    let Some(body) = event.strip_suffix("\n\n") else {
        return event;
    };
    let data_at = (data_at + "data: ".len()).min(body.len());
    if !body.is_char_boundary(data_at) || !body[data_at..].contains(['\r', '\n']) {
        return event;
    }
    let mut out = String::with_capacity(event.len() + 64);
    out.push_str(&body[..data_at]);
    let mut chars = body[data_at..].chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' | '\n' => {
                if c == '\r' && chars.peek() == Some(&'\n') {
                    chars.next();
                }
                out.push_str("\ndata: ");
            }
            c => out.push(c),
        }
    }
    out.push_str("\n\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn message(payload: &'static [u8]) -> BrokerMessage {
        BrokerMessage {
            topic: Topic::Channel(Bytes::from_static(b"news")),
            channel: Bytes::from_static(b"news"),
            payload: Bytes::from_static(payload),
            position: None,
        }
    }

    #[test]
    fn a_delivery_is_one_data_line() {
        let frame = SseRender.delivery(&message(br#"{"a":1}"#)).unwrap();
        assert_eq!(
            frame.as_text().unwrap(),
            "data: {\"action\":\"message\",\"channel\":\"news\",\"payload\":{\"a\":1}}\n\n"
        );
    }

    #[test]
    fn line_breaks_in_a_payload_become_data_lines() {
        let frame = SseRender
            .delivery(&message(b"{\"a\":\r\n1,\r\"b\":\n2}"))
            .unwrap();
        assert_eq!(
            frame.as_text().unwrap(),
            "data: {\"action\":\"message\",\"channel\":\"news\",\"payload\":{\"a\":\ndata: 1,\ndata: \"b\":\ndata: 2}}\n\n"
        );
        // Text with breaks is a JSON string: escaped, one line.
        let frame = SseRender.delivery(&message(b"two\nlines")).unwrap();
        assert!(frame
            .as_text()
            .unwrap()
            .ends_with("\"payload\":\"two\\nlines\"}\n\n"));
    }

    #[test]
    fn history_deliveries_carry_an_id_that_resumes() {
        let mut m = message(b"{\"a\":\n1}");
        m.position = Some(Position {
            offset: 7,
            epoch: Bytes::from_static(b"e1"),
        });
        assert_eq!(
            SseRender.delivery(&m).unwrap().as_text().unwrap(),
            "id: e1:7:news\ndata: {\"action\":\"message\",\"channel\":\"news\",\"payload\":{\"a\":\ndata: 1},\"offset\":7,\"epoch\":\"e1\"}\n\n"
        );
        m.channel = Bytes::from_static(b"a\nb");
        assert!(SseRender
            .delivery(&m)
            .unwrap()
            .as_text()
            .unwrap()
            .starts_with("data: "));
        let id = LastEventId::parse("e1:7:a:b").unwrap();
        assert_eq!((&id.channel[..], id.position.offset), (&b"a:b"[..], 7));
        for bad in [
            "", "e1", "e1:7", "e1:7:", ":7:a", "e-1:7:a", "e1:x:a", "e1:-7:a",
        ] {
            assert!(LastEventId::parse(bad).is_none(), "{bad}");
        }
        let topics = vec![
            Topic::Pattern(Bytes::from_static(b"a*")),
            Topic::Channel(Bytes::from_static(b"a:b")),
        ];
        let mut steps = Vec::new();
        SseConversation::new(topics, Some(id)).open(&mut steps);
        let sinces: Vec<bool> = steps
            .iter()
            .map(|s| matches!(s, Step::Request(Request::Subscribe { since: Some(_), .. })))
            .collect();
        assert_eq!(sinces, vec![false, true], "the exact channel first");
    }

    #[test]
    fn named_events() {
        assert_eq!(
            close_event(4008, "slow consumer").as_text().unwrap(),
            "event: close\ndata: {\"action\":\"close\",\"code\":4008,\"reason\":\"slow consumer\"}\n\n"
        );
        let topics = [Topic::Pattern(Bytes::from_static(b"a.*"))];
        let notice = Notice {
            kind: NoticeKind::Interrupted,
            topics: &topics,
            reason: Some("broker connection lost"),
            recovered: None,
        };
        assert_eq!(
            SseRender.notice(&notice).unwrap().as_text().unwrap(),
            "event: interrupted\ndata: {\"action\":\"interrupted\",\"reason\":\"broker connection lost\",\"patterns\":[\"a.*\"],\"channels\":[]}\n\n"
        );
    }
}
