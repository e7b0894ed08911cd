//! Every frame a RoadRunner client reads, byte for byte: `{"topic":..,
//! "payload":..}` with Go's escaping ([`super::json`]).

use super::json;
use crate::broker::{BrokerMessage, Topic};
use crate::protocol::{Notice, NoticeKind};

/// The topic of a join's answer for its accepted topics.
pub const JOINED: &str = "@join";
/// The topic of a join's answer for its refused topics.
pub const REFUSED: &str = "#join";
/// The topic of a leave's answer.
pub const LEFT: &str = "@leave";
/// The topic of the answer to a frame that could not be read.
pub const ERROR: &str = "#error";

/// `{"topic":<topic>,"payload":[<names>]}`, or `"payload":null` for none.
pub fn list<'a>(topic: &str, names: Option<impl IntoIterator<Item = &'a str>>) -> String {
    let mut out = String::with_capacity(64);
    out.push_str("{\"topic\":");
    json::push_str(&mut out, topic.as_bytes());
    out.push_str(",\"payload\":");
    push_names(&mut out, names);
    out.push('}');
    out
}

fn push_names<'a>(out: &mut String, names: Option<impl IntoIterator<Item = &'a str>>) {
    let Some(names) = names else {
        out.push_str("null");
        return;
    };
    out.push('[');
    for (i, name) in names.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        json::push_str(out, name.as_bytes());
    }
    out.push(']');
}

/// The answer to a frame that could not be read: `{"topic":"#error",
/// "payload":["<reason>"]}` (RoadRunner only logged it).
pub fn error(reason: &str) -> String {
    list(ERROR, Some([reason]))
}

/// A delivery: `{"topic":"<channel>","payload":"<the bytes as a string>"}`.
pub fn delivery(message: &BrokerMessage) -> String {
    let mut out = String::with_capacity(32 + message.channel.len() + message.payload.len() * 9 / 8);
    out.push_str("{\"topic\":");
    json::push_str(&mut out, &message.channel);
    out.push_str(",\"payload\":");
    json::push_str(&mut out, &message.payload);
    out.push('}');
    out
}

/// A gap notice: `{"topic":"#interrupted","payload":[<topics>],"reason":..}`
/// or `{"topic":"#resumed","payload":[<topics>]}`.
pub fn notice(notice: &Notice<'_>) -> String {
    let topic = match notice.kind {
        NoticeKind::Interrupted => "#interrupted",
        NoticeKind::Resumed => "#resumed",
    };
    let names: Vec<std::borrow::Cow<'_, str>> = notice
        .topics
        .iter()
        .map(|t| String::from_utf8_lossy(Topic::name(t)))
        .collect();
    let mut out = list(topic, Some(names.iter().map(|n| n.as_ref())));
    if let Some(reason) = notice.reason {
        out.pop();
        out.push_str(",\"reason\":");
        json::push_str(&mut out, reason.as_bytes());
        out.push('}');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn answers() {
        assert_eq!(
            list(JOINED, Some(["foo", "foo2"])),
            r#"{"topic":"@join","payload":["foo","foo2"]}"#
        );
        assert_eq!(
            list(LEFT, None::<[&str; 0]>),
            r#"{"topic":"@leave","payload":null}"#
        );
        assert_eq!(
            list(REFUSED, Some(["<a>"])),
            r##"{"topic":"#join","payload":["\u003ca\u003e"]}"##
        );
        assert_eq!(
            error("bad \"x\""),
            r##"{"topic":"#error","payload":["bad \"x\""]}"##
        );
    }

    #[test]
    fn deliveries_carry_the_bytes_as_a_string() {
        let m = BrokerMessage {
            topic: Topic::Channel(Bytes::from_static(b"chat")),
            channel: Bytes::from_static(b"chat"),
            payload: Bytes::from_static(b"{\"html\":\"<b>&\"}\xff"),
            position: None,
        };
        assert_eq!(
            delivery(&m),
            r#"{"topic":"chat","payload":"{\"html\":\"\u003cb\u003e\u0026\"}\ufffd"}"#
        );
    }

    #[test]
    fn gap_notices() {
        let topics = [Topic::Channel(Bytes::from_static(b"a"))];
        let n = Notice {
            kind: NoticeKind::Interrupted,
            topics: &topics,
            reason: Some("message too large"),
            recovered: None,
        };
        assert_eq!(
            notice(&n),
            r##"{"topic":"#interrupted","payload":["a"],"reason":"message too large"}"##
        );
        let n = Notice {
            kind: NoticeKind::Resumed,
            topics: &topics,
            reason: None,
            recovered: None,
        };
        assert_eq!(notice(&n), r##"{"topic":"#resumed","payload":["a"]}"##);
    }
}
