//! Fuzzes one RoadRunner conversation (`wsgate::protocol::roadrunner`) and
//! its Go-style JSON strings.
//!
//! Input: frames separated by a 0xff byte, fed to one conversation in order;
//! each request is answered (done, already held, or refused, chosen by the
//! bytes). Checks, for any input:
//! - `decode` never panics, and every frame queued is `{"topic":..,
//!   "payload":..}` JSON;
//! - every join is answered, once its last topic is, by an optional `#join`
//!   and then one `@join`, whose lists together are the join's topics;
//! - a delivery and the Go escaping of any bytes read back as the bytes'
//!   text (one U+FFFD per invalid byte) with no raw `<`, `>` or `&`.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use wsgate::broker::{BrokerMessage, Topic};
use wsgate::protocol::roadrunner::{json, reply, RoadRunnerConversation};
use wsgate::protocol::{
    Ack, AckKind, Answer, Conversation, Frame, Inbound, Refusal, Request, Step,
};

fn parsed(frame: &Frame) -> Value {
    let text = frame
        .as_text()
        .unwrap_or_else(|| panic!("not text: {frame:?}"));
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(v["topic"].is_string(), "{text}");
    v
}

fn go_text(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        for _ in chunk.invalid() {
            out.push('\u{fffd}');
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let mut conv = RoadRunnerConversation::new();
    for (n, part) in data.split(|b| *b == 0xff).enumerate() {
        let quoted = json::string(part);
        assert!(!quoted.contains(['<', '>', '&']));
        assert_eq!(
            serde_json::from_str::<String>(&quoted).ok(),
            Some(go_text(part))
        );
        let delivered = reply::delivery(&BrokerMessage {
            topic: Topic::Channel(Bytes::copy_from_slice(part)),
            channel: Bytes::copy_from_slice(part),
            payload: Bytes::copy_from_slice(part),
            position: None,
        });
        parsed(&Frame::text(delivered));

        let mut steps = Vec::new();
        conv.decode(Inbound::Binary(part), &mut steps);
        let mut asked = Vec::new();
        let mut out = Vec::new();
        for step in steps {
            match step {
                Step::Reply(f) | Step::Malformed(f) => {
                    parsed(&f);
                }
                Step::Request(Request::Subscribe { topic, id, .. }) => {
                    asked.push(String::from_utf8_lossy(topic.name()).into_owned());
                    let error = match (n + asked.len()) % 3 {
                        0 => None,
                        1 => Some(Refusal::AlreadySubscribed),
                        _ => Some(Refusal::NotAllowed),
                    };
                    conv.answer(
                        Answer::Ack(Ack {
                            kind: AckKind::Subscribe,
                            topic: &topic,
                            id: id.as_deref(),
                            error: error.as_ref(),
                            recovered: None,
                        }),
                        &mut out,
                    );
                }
                Step::Request(Request::Unsubscribe { topic, id }) => {
                    conv.answer(
                        Answer::Ack(Ack {
                            kind: AckKind::Unsubscribe,
                            topic: &topic,
                            id: id.as_deref(),
                            error: None,
                            recovered: None,
                        }),
                        &mut out,
                    );
                }
                other => panic!("unexpected step {other:?}"),
            }
        }
        let answers: Vec<Value> = out.iter().map(parsed).collect();
        if !asked.is_empty() {
            let last = answers
                .last()
                .unwrap_or_else(|| panic!("join not answered"));
            assert_eq!(last["topic"], "@join");
            let mut listed: Vec<String> = answers
                .iter()
                .flat_map(|a| a["payload"].as_array().cloned().unwrap_or_default())
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
            listed.sort();
            asked.sort();
            assert_eq!(listed, asked);
        }
    }
});
