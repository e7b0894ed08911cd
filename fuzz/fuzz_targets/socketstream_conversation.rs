//! Fuzzes the SocketStream codec and one conversation
//! (`wsgate::protocol::socketstream`): what a session does with any
//! sequence of client frames.
//!
//! Input: frames separated by a 0xff byte (the first byte picks text or
//! binary frames), fed to one conversation in order. Checks, for any input:
//! - `frame::parse` never panics, splits on the first separators only (the
//!   payload is a suffix of the frame) and gives a callback only to a
//!   callback service;
//! - every frame the conversation queues is `0|..`, `1|..` or `2|..` with a
//!   JSON payload after its slots;
//! - every request it makes, answered done and refused, renders such a
//!   frame (a call's arguments are a JSON array, and its result or error
//!   renders an rpc frame), and a delivery of the frame's bytes renders `2|{"e":..,"p":[..]}`
//!   that a strict JSON reader accepts.

#![no_main]

use std::sync::Arc;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use wsgate::broker::{BrokerMessage, Topic};
use wsgate::protocol::socketstream::frame::{self, Service};
use wsgate::protocol::socketstream::{reply, Endpoint, SocketStreamConversation};
use wsgate::protocol::{
    Ack, AckKind, Answer, Call, Conversation, Frame, Inbound, Refusal, Request, Step,
};
use wsgate::rpc::CallError;

/// A frame the client reads: `<id>|[<cb>|]<json>`.
fn check(frame: &Frame, what: &str) {
    let Frame::Text(text) = frame else {
        panic!("{what}: not text: {frame:?}");
    };
    let text = text.as_str();
    let json = match text.split_once('|') {
        Some(("0" | "1", rest)) => rest.split_once('|').map(|(_, j)| j),
        Some(("2", rest)) => Some(rest),
        _ => None,
    };
    let ok = json.is_some_and(|j| serde_json::from_str::<Value>(j).is_ok());
    assert!(ok, "{what}: not a SocketStream frame with JSON: {text}");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let endpoint = Arc::new(Endpoint::new(&["a".to_owned(), "b.*".to_owned()]));
    let mut conv = SocketStreamConversation::new(endpoint);
    let mut steps = Vec::new();
    conv.open(&mut steps);
    for part in rest.split(|b| *b == 0xff) {
        if let Ok(text) = std::str::from_utf8(part) {
            if let Ok(m) = frame::parse(text) {
                assert!(text.ends_with(m.payload));
                assert!(m.callback.is_none() || m.service.callbacks());
                assert!(m.service != Service::PubSub || m.callback.is_none());
            }
        }
        if mode & 1 == 0 {
            match std::str::from_utf8(part) {
                Ok(text) => conv.decode(Inbound::Text(text), &mut steps),
                Err(_) => conv.decode(Inbound::Binary(part), &mut steps),
            }
        } else {
            conv.decode(Inbound::Binary(part), &mut steps);
        }
        let delivered = reply::delivery(&BrokerMessage {
            topic: Topic::Channel(Bytes::copy_from_slice(part)),
            channel: Bytes::copy_from_slice(part),
            payload: Bytes::copy_from_slice(part),
            position: None,
        });
        check(&Frame::text(delivered), "delivery");
    }
    for step in steps {
        match step {
            Step::Reply(f) | Step::Malformed(f) => check(&f, "reply"),
            Step::Request(Request::Subscribe { topic, id, .. }) => {
                answer(&mut conv, AckKind::Subscribe, &topic, id.as_deref())
            }
            Step::Request(Request::Unsubscribe { topic, id }) => {
                answer(&mut conv, AckKind::Unsubscribe, &topic, id.as_deref())
            }
            Step::Request(Request::Call(call)) => called(&mut conv, &call),
            other => panic!("unexpected step {other:?}"),
        }
    }
});

/// A call's arguments are a JSON array; its end, a result or any error,
/// renders an rpc frame.
fn called(conv: &mut SocketStreamConversation, call: &Call) {
    let args = serde_json::from_slice::<Value>(&call.params);
    assert!(matches!(args, Ok(Value::Array(_))), "{call:?}");
    assert!(!call.service.is_empty() && !call.method.is_empty() && call.service != "wsgate");
    let failed = CallError::Failed {
        code: 1,
        message: "x\"|y".into(),
    };
    for outcome in [Ok(&call.params[..]), Err(&CallError::Timeout), Err(&failed)] {
        let mut out = Vec::new();
        let id = call.id.as_deref();
        conv.answer(Answer::Called { id, outcome }, &mut out);
        for f in &out {
            check(f, "called");
        }
    }
}

fn answer(conv: &mut SocketStreamConversation, kind: AckKind, topic: &Topic, id: Option<&str>) {
    for error in [
        None,
        Some(Refusal::NotAllowed),
        Some(Refusal::Other("x\"|y".into())),
    ] {
        let mut out = Vec::new();
        conv.answer(
            Answer::Ack(Ack {
                kind,
                topic,
                id,
                error: error.as_ref(),
                recovered: None,
            }),
            &mut out,
        );
        for f in &out {
            check(f, "answer");
        }
    }
}
