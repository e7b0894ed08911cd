//! The body of the `bayeux_conversation` fuzz target (also run by
//! `tests/fuzz_bodies.rs` on seeds): one Bayeux conversation
//! (`wsgate::protocol::bayeux::conversation`), what a session does with
//! any sequence of client messages.
//!
//! Input: messages separated by a 0xff byte, fed to one conversation in
//! order (the first is preceded by a real handshake half the time, chosen
//! by the first byte, so that both a fresh and a bound conversation are
//! exercised). Checks, for any input:
//! - `decode` never panics, and every frame it queues (replies, errors) is
//!   one JSON array of objects;
//! - every request it makes, answered by the session as done or refused (in
//!   each way a session refuses), renders a JSON array of objects, and a
//!   publish's answer has no `data`;
//! - `release` and `unknown` render JSON arrays of objects too;
//! - a request's channel or topic is never under `/meta/` and a publish is
//!   never to a wildcard;
//! - a `/service/<name>` request names one segment, and every answer to it
//!   (acks done and refused, data, an ended line) renders a JSON array of
//!   objects, a publish ack without `data`, a data message with string
//!   `data`;
//! - a subscribe's answer, saying `recovered` true, false or nothing
//!   (`ext.wsgate.recovered`), is one JSON array of objects too.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use wsgate::protocol::bayeux::conversation::{
    BayeuxConversation, BayeuxRender, Endpoint, ServiceMap,
};
use wsgate::protocol::bayeux::message::Limits;
use wsgate::protocol::{
    Ack, AckKind, Answer, Conversation, Frame, Inbound, Refusal, Request, ServiceOp, Step,
};

/// One JSON array of objects, or a panic saying what it was.
fn check(frame: &Frame, what: &str) -> Vec<Value> {
    let Frame::Text(text) = frame else {
        panic!("{what}: not text: {frame:?}");
    };
    match serde_json::from_str::<Value>(text.as_str()) {
        Ok(Value::Array(items)) if items.iter().all(Value::is_object) => items,
        other => panic!("{what}: not an array of objects ({other:?}): {text}"),
    }
}

fn refusals() -> [Option<Refusal>; 9] {
    [
        None,
        Some(Refusal::NotAllowed),
        Some(Refusal::Denied("no: \"x\"".into())),
        Some(Refusal::AlreadySubscribed),
        Some(Refusal::NotSubscribed),
        Some(Refusal::Cancelled),
        Some(Refusal::RateLimited),
        Some(Refusal::Unavailable("broker unavailable".into())),
        Some(Refusal::Other("limit, reached: 3".into())),
    ]
}

/// What a session may refuse a service request with.
fn service_refusals() -> Vec<Option<Refusal>> {
    let mut all = refusals().to_vec();
    for text in [
        "no such service",
        "payload too large",
        "too many calls in flight",
    ] {
        all.push(Some(Refusal::Other(text.into())));
    }
    all
}

/// Every answer a service request may get, checked.
fn service_answers(
    conv: &mut BayeuxConversation,
    kind: ServiceOp,
    service: &str,
    id: Option<&str>,
) {
    assert!(
        !service.is_empty() && !service.contains('/') && !service.contains('*'),
        "{service:?}"
    );
    for error in service_refusals() {
        let mut out = Vec::new();
        let ack = Answer::ServiceAck {
            kind,
            service,
            id,
            error: error.as_ref(),
        };
        conv.answer(ack, &mut out);
        for f in &out {
            for m in check(f, "service ack") {
                if kind == ServiceOp::Publish {
                    assert!(m.get("data").is_none(), "ack with data: {m}");
                }
            }
        }
    }
    let mut out = Vec::new();
    conv.answer(
        Answer::ServiceData {
            service,
            id,
            data: "READY \"\u{0}",
        },
        &mut out,
    );
    conv.answer(
        Answer::ServiceEnded {
            service,
            reason: "gone: \"x\"",
        },
        &mut out,
    );
    for f in &out {
        for m in check(f, "service data") {
            if m["channel"] != "/meta/unsubscribe" {
                assert!(m["data"].is_string(), "{m}");
            }
        }
    }
}

/// Runs the checks on one input.
pub(crate) fn run(data: &[u8]) {
    let endpoint = Arc::new(Endpoint {
        render: Arc::new(BayeuxRender),
        connect_timeout: Duration::from_secs(30),
        session_timeout: Duration::from_secs(60),
        limits: Limits::new(64 * 1024),
        verifier: None,
        nodefony: data
            .first()
            .is_some_and(|b| b & 2 != 0)
            .then(|| ServiceMap {
                tcp: vec!["random".into()],
                registered: Box::new(|| vec!["billing".into(), "random".into()]),
            }),
    });
    let mut conv = BayeuxConversation::new(endpoint, None);
    let mut steps = Vec::new();
    let mut inputs: Vec<Vec<u8>> = data
        .get(1..)
        .unwrap_or_default()
        .split(|&b| b == 0xff)
        .map(<[u8]>::to_vec)
        .collect();
    if data.first().is_some_and(|b| b & 1 != 0) {
        inputs.insert(
            0,
            br#"{"channel":"/meta/handshake","version":"1.0","supportedConnectionTypes":["websocket"],"id":"h"}"#
                .to_vec(),
        );
    }
    for input in &inputs {
        let inbound = match std::str::from_utf8(input) {
            Ok(text) => Inbound::Text(text),
            Err(_) => Inbound::Binary(input),
        };
        conv.decode(inbound, &mut steps);
        for step in steps.drain(..) {
            match step {
                Step::Reply(f) | Step::Malformed(f) => {
                    check(&f, "reply");
                }
                Step::Request(Request::Subscribe { topic, id, .. }) => {
                    assert!(!topic.name().starts_with(b"/meta/"), "{topic:?}");
                    for (kind, error) in [AckKind::Subscribe, AckKind::Unsubscribe]
                        .into_iter()
                        .flat_map(|k| refusals().into_iter().map(move |r| (k, r)))
                    {
                        for recovered in [None, Some(true), Some(false)] {
                            let ack = Ack {
                                kind,
                                topic: &topic,
                                id: id.as_deref(),
                                error: error.as_ref(),
                                recovered,
                            };
                            let mut out = Vec::new();
                            conv.answer(Answer::Ack(ack), &mut out);
                            for f in &out {
                                check(f, "ack");
                            }
                        }
                    }
                }
                Step::Request(Request::Unsubscribe { topic, .. }) => {
                    assert!(!topic.name().starts_with(b"/meta/"), "{topic:?}");
                }
                Step::Request(Request::Publish {
                    channel,
                    id,
                    payload,
                }) => {
                    assert!(!channel.starts_with(b"/meta/"), "{channel:?}");
                    assert!(!channel.ends_with(b"*"), "{channel:?}");
                    assert!(
                        serde_json::from_slice::<Value>(&payload).is_ok(),
                        "{payload:?}"
                    );
                    for error in refusals() {
                        let answer = Answer::Published {
                            channel: &channel,
                            id: id.as_deref(),
                            error: error.as_ref(),
                            maybe_published: None,
                        };
                        let mut out = Vec::new();
                        conv.answer(answer, &mut out);
                        for f in &out {
                            for m in check(f, "publish ack") {
                                assert!(m.get("data").is_none(), "ack with data: {m}");
                            }
                        }
                    }
                }
                Step::Request(Request::ServiceSubscribe { service, id }) => {
                    service_answers(&mut conv, ServiceOp::Subscribe, &service, id.as_deref());
                }
                Step::Request(Request::ServiceUnsubscribe { service, id }) => {
                    service_answers(&mut conv, ServiceOp::Unsubscribe, &service, id.as_deref());
                }
                Step::Request(Request::ServicePublish { service, id, data }) => {
                    assert!(serde_json::from_slice::<Value>(&data).is_ok(), "{data:?}");
                    service_answers(&mut conv, ServiceOp::Publish, &service, id.as_deref());
                }
                Step::Request(_) => {}
                Step::Route(key) => {
                    let mut out = Vec::new();
                    conv.answer(Answer::UnknownClient { key: &key }, &mut out);
                    for f in &out {
                        check(f, "unknown client");
                    }
                }
                Step::Hold(_) => {
                    if let Some(f) = conv.release() {
                        check(&f, "connect release");
                    }
                }
                Step::Authenticated(_) | Step::Bind(_) | Step::End => {}
            }
        }
        if let Some(f) = conv.unknown(inbound, "0123456789abcdef0123456789abcdef") {
            check(&f, "unknown");
        }
    }
}
