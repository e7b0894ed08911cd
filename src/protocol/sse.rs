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

use std::sync::{Arc, OnceLock};

use super::native::{delivery_capacity, Native, NativeConversation};
use super::{
    AckKind, Answer, Conversation, Frame, Inbound, Notice, NoticeKind, Render, Request, Step,
};
use crate::broker::{BrokerMessage, Topic};

/// The SSE rendering, shared by every event stream.
#[derive(Debug, Default, Clone, Copy)]
pub struct SseRender;

impl Render for SseRender {
    fn key(&self) -> &'static str {
        "sse"
    }

    fn delivery(&self, message: &BrokerMessage) -> Option<Frame> {
        let mut out = String::with_capacity(delivery_capacity(message) + 8);
        out.push_str("data: ");
        Native.write_delivery(&mut out, message);
        out.push_str("\n\n");
        Some(Frame::text(split_lines(out)))
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
}

impl SseConversation {
    /// A stream that subscribes to `topics` as it opens.
    pub fn new(topics: Vec<Topic>) -> SseConversation {
        SseConversation { opening: topics }
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
        steps.extend(self.opening.drain(..).map(|topic| {
            Step::Request(Request::Subscribe {
                topic,
                id: None,
                ext: None,
                since: None,
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
    Frame::text(split_lines(out))
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

/// An SSE line ends at CR, LF or CRLF, so a data line cannot hold one: a
/// JSON payload embedded as it was published may (as whitespace; inside a
/// JSON string they are escaped). Each break becomes `\ndata: `, which the
/// client joins back with LF: the same JSON. `event` is the whole event,
/// its own line ends (the last two bytes of the header lines and the blank
/// line) included; the usual event has no break in its data and is
/// returned as it is.
fn split_lines(event: String) -> String {
    let Some(body) = event.strip_suffix("\n\n") else {
        return event;
    };
    let data_at = body.find("data: ").map_or(0, |i| i + "data: ".len());
    if !body[data_at..].contains(['\r', '\n']) {
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
        };
        assert_eq!(
            SseRender.notice(&notice).unwrap().as_text().unwrap(),
            "event: interrupted\ndata: {\"action\":\"interrupted\",\"reason\":\"broker connection lost\",\"patterns\":[\"a.*\"],\"channels\":[]}\n\n"
        );
    }
}
