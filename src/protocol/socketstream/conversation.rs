//! One SocketStream connection: its session id and the services' messages
//! as session requests.
//!
//! - system (0): `connect` answers a fresh, unguessable `sessionId` (the
//!   same one for every `connect` of the connection: wsgate keeps no
//!   session store, so a client's own id is never taken over); `discover`
//!   lists rpc and pubsub with their client handlers.
//! - rpc (1): `wsgate.subscribe` / `wsgate.unsubscribe` (one channel or
//!   glob) become session requests answered on the call's callback; any
//!   other `<service>.<method>` is a [`Request::Call`] of the services
//!   registry (the method is everything after the first dot), whose end is
//!   answered on the callback: `{"p":[<result>]}` or `{"e":{"message":..}}`.
//!   A subscription the server ends is told as the pubsub event
//!   `wsgate:unsubscribed`.
//! - pubsub (2): server pushes only. On open, the connection asks for
//!   `WSGATE_SOCKETSTREAM_CHANNELS` ([`Conversation::open`]); a refusal of
//!   one of those is told on the system service.
//!
//! A frame Prism would throw on is answered `0||{"type":"error",..}`.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::frame::{self, Service};
use super::reply;
use super::SocketStreamRender;
use crate::broker::Topic;
use crate::protocol::bayeux::client_id::ClientId;
use crate::protocol::{Ack, Answer, Call, Conversation, Frame, Inbound, Render, Request, Step};
use crate::rpc::CallError;

/// The service name of wsgate's own rpc methods (`wsgate.subscribe`).
const WSGATE: &str = "wsgate";

/// What every SocketStream connection shares.
#[derive(Debug, Default)]
pub struct Endpoint {
    /// `WSGATE_SOCKETSTREAM_CHANNELS`, as topics.
    pub channels: Vec<Topic>,
}

impl Endpoint {
    /// The endpoint for `WSGATE_SOCKETSTREAM_CHANNELS`.
    pub fn new(channels: &[String]) -> Endpoint {
        Endpoint {
            channels: channels.iter().map(|c| topic(c)).collect(),
        }
    }
}

/// A channel name, or a glob when it holds one of Redis's wildcards.
pub fn topic(name: &str) -> Topic {
    let bytes = Bytes::copy_from_slice(name.as_bytes());
    if name.contains(['*', '?', '[']) {
        Topic::Pattern(bytes)
    } else {
        Topic::Channel(bytes)
    }
}

/// One SocketStream connection; see the module docs.
pub struct SocketStreamConversation {
    endpoint: Arc<Endpoint>,
    session_id: Option<ClientId>,
}

/// A service's JSON payload, which must be an object.
fn object(service: Service, payload: &str) -> Result<serde_json::Map<String, Value>, String> {
    match serde_json::from_str::<Value>(payload) {
        Ok(Value::Object(obj)) => Ok(obj),
        Ok(_) => Err(format!(
            "service {} ({}) takes a JSON object",
            service.id(),
            service.name()
        )),
        Err(e) => Err(format!(
            "invalid JSON for service {} ({}): {e}",
            service.id(),
            service.name()
        )),
    }
}

impl SocketStreamConversation {
    /// A fresh connection.
    pub fn new(endpoint: Arc<Endpoint>) -> SocketStreamConversation {
        SocketStreamConversation {
            endpoint,
            session_id: None,
        }
    }

    fn system(&mut self, callback: Option<u64>, payload: &str, steps: &mut Vec<Step>) {
        let message = match object(Service::System, payload) {
            Ok(m) => m,
            Err(why) => return malformed(steps, &why),
        };
        match message.get("c").and_then(Value::as_str) {
            Some("connect") => {
                let id = match self.session_id {
                    Some(id) => id,
                    None => match ClientId::generate() {
                        Ok(id) => *self.session_id.insert(id),
                        Err(_) => {
                            let e = reply::error("no randomness for a session id");
                            return steps.push(Step::Reply(Frame::text(e)));
                        }
                    },
                };
                let text = reply::connected(callback, id.as_str());
                steps.push(Step::Reply(Frame::text(text)));
            }
            Some("discover") => steps.push(Step::Reply(Frame::text(reply::discovered(callback)))),
            Some(other) => malformed(
                steps,
                &format!("unknown system command {other:?}: expected connect or discover"),
            ),
            None => malformed(steps, "a system message needs \"c\": connect or discover"),
        }
    }

    fn rpc(&mut self, callback: Option<u64>, payload: &str, steps: &mut Vec<Step>) {
        let message = match object(Service::Rpc, payload) {
            Ok(message) => message,
            Err(why) => return malformed(steps, &why),
        };
        let refuse = |steps: &mut Vec<Step>, why: &str| {
            steps.push(Step::Malformed(Frame::text(reply::rpc_error(
                callback, why,
            ))));
        };
        let Some(method) = message.get("m").and_then(Value::as_str) else {
            return refuse(steps, "missing method name \"m\"");
        };
        let subscribe = match method {
            "wsgate.subscribe" => true,
            "wsgate.unsubscribe" => false,
            _ => return call(callback, method, payload, steps),
        };
        let name = match message.get("p") {
            Some(Value::Array(params)) => match params.as_slice() {
                [Value::String(name)] => Some(name.as_str()),
                _ => None,
            },
            _ => None,
        };
        let Some(name) = name else {
            return refuse(
                steps,
                &format!("{method} takes one argument: a channel or a pattern"),
            );
        };
        let topic = topic(name);
        let id = Some(callback_id(callback));
        steps.push(Step::Request(if subscribe {
            Request::Subscribe {
                topic,
                id,
                ext: None,
                since: None,
                join_leave: false,
            }
        } else {
            Request::Unsubscribe { topic, id }
        }));
    }
}

/// The session's id of a request answered on `callback`: its number, or
/// empty for an empty slot (answered with an empty slot).
fn callback_id(callback: Option<u64>) -> String {
    callback.map_or_else(String::new, |cb| cb.to_string())
}

/// The arguments of an rpc message, as the client wrote them.
#[derive(Deserialize)]
struct Arguments<'a> {
    #[serde(borrow, default)]
    p: Option<&'a RawValue>,
}

/// A call to an application service: `<service>.<method>` (the method may
/// hold dots itself) with the arguments `p` (an array, kept as the JSON
/// text the client sent), answered on the callback when the call ends.
/// wsgate's own methods (`wsgate.*`) are never a service's.
fn call(callback: Option<u64>, method: &str, payload: &str, steps: &mut Vec<Step>) {
    let refuse = |steps: &mut Vec<Step>, why: &str| {
        steps.push(Step::Malformed(Frame::text(reply::rpc_error(
            callback, why,
        ))));
    };
    let (service, name) = match method.split_once('.') {
        Some((service, name)) if !service.is_empty() && !name.is_empty() => (service, name),
        _ => {
            return refuse(
                steps,
                &format!("method {method:?} must be <service>.<method>"),
            )
        }
    };
    if service == WSGATE {
        let text = reply::rpc_error(callback, &CallError::NoSuchMethod.message());
        return steps.push(Step::Reply(Frame::text(text)));
    }
    // Already read as an object by the caller: this second read only takes
    // `p` as its raw text (serde_json would reorder an object's keys and
    // round big numbers).
    let params = match serde_json::from_str::<Arguments<'_>>(payload) {
        Ok(Arguments { p: None }) => Bytes::from_static(b"[]"),
        Ok(Arguments { p: Some(p) }) if p.get().starts_with('[') => {
            Bytes::copy_from_slice(p.get().as_bytes())
        }
        Ok(_) | Err(_) => {
            return refuse(
                steps,
                &format!("{method} takes its arguments as an array \"p\""),
            )
        }
    };
    steps.push(Step::Request(Request::Call(Call {
        service: service.to_owned(),
        method: name.to_owned(),
        params,
        id: Some(callback_id(callback)),
        timeout: None,
    })));
}

/// An error on the system service, for a frame that is not one.
fn malformed(steps: &mut Vec<Step>, why: &str) {
    steps.push(Step::Malformed(Frame::text(reply::error(why))));
}

impl Conversation for SocketStreamConversation {
    fn name(&self) -> &'static str {
        "socketstream"
    }

    fn render(&self) -> Arc<dyn Render> {
        static RENDER: OnceLock<Arc<dyn Render>> = OnceLock::new();
        RENDER.get_or_init(|| Arc::new(SocketStreamRender)).clone()
    }

    fn open(&mut self, steps: &mut Vec<Step>) {
        for topic in &self.endpoint.channels {
            steps.push(Step::Request(Request::Subscribe {
                topic: topic.clone(),
                id: None,
                ext: None,
                since: None,
                join_leave: false,
            }));
        }
    }

    fn decode(&mut self, inbound: Inbound<'_>, steps: &mut Vec<Step>) {
        let text = match inbound {
            Inbound::Text(text) => text,
            Inbound::Binary(bytes) => match std::str::from_utf8(bytes) {
                Ok(text) => text,
                Err(_) => return malformed(steps, "frames must be UTF-8 text"),
            },
        };
        let message = match frame::parse(text) {
            Ok(m) => m,
            Err(e) => return malformed(steps, &e.to_string()),
        };
        match message.service {
            Service::System => self.system(message.callback, message.payload, steps),
            Service::Rpc => self.rpc(message.callback, message.payload, steps),
            Service::PubSub => malformed(
                steps,
                "service 2 (pubsub) takes no messages from clients: subscribe with rpc wsgate.subscribe",
            ),
        }
    }

    fn answer(&mut self, answer: Answer<'_>, out: &mut Vec<Frame>) {
        let text = match answer {
            Answer::Ack(ack) => match acked(&ack) {
                Some(text) => text,
                None => return,
            },
            Answer::Called { id, outcome } => {
                let callback = id.and_then(|id| id.parse().ok());
                match outcome {
                    // The service's result is JSON text already (checked
                    // where it entered the gateway): the responder's one
                    // argument.
                    Ok(result) => reply::rpc_result(callback, &String::from_utf8_lossy(result)),
                    Err(e) => reply::rpc_error(callback, &e.message()),
                }
            }
            Answer::Revoked { topic, reason } => reply::unsubscribed(topic, reason),
            _ => return,
        };
        out.push(Frame::text(text));
    }
}

/// The answer to a subscribe or unsubscribe: on its callback, or (asked on
/// open) a refusal on the system service.
fn acked(ack: &Ack<'_>) -> Option<String> {
    Some(match (ack.id, ack.error) {
        // Asked on open: only a refusal is worth a word.
        (None, None) => return None,
        (None, Some(refusal)) => {
            let name = String::from_utf8_lossy(ack.topic.name());
            reply::error(&format!(
                "cannot subscribe to {name}: {}",
                refusal.message()
            ))
        }
        (Some(cb), None) => reply::rpc_result(cb.parse().ok(), "true"),
        (Some(cb), Some(refusal)) => reply::rpc_error(cb.parse().ok(), refusal.message()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(input: &str) -> Vec<Step> {
        let mut steps = Vec::new();
        SocketStreamConversation::new(Arc::new(Endpoint::default()))
            .decode(Inbound::Text(input), &mut steps);
        steps
    }

    fn reply_of(input: &str) -> String {
        match decode(input).as_slice() {
            [Step::Reply(f) | Step::Malformed(f)] => f.as_text().unwrap_or_default().to_owned(),
            other => panic!("{input}: {other:?}"),
        }
    }

    #[test]
    fn connect_gives_one_random_session_id() {
        let mut conv = SocketStreamConversation::new(Arc::new(Endpoint::default()));
        let mut steps = Vec::new();
        conv.decode(
            Inbound::Text(r#"0|1|{"c":"connect","v":"0.0.1","sessionId":false}"#),
            &mut steps,
        );
        conv.decode(
            Inbound::Text(r#"0|2|{"c":"connect","sessionId":"mine"}"#),
            &mut steps,
        );
        let texts: Vec<&str> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Reply(f) => f.as_text(),
                _ => None,
            })
            .collect();
        assert_eq!(texts.len(), 2);
        let id = texts[0]
            .strip_prefix(r#"0|1|{"version":"0.0.1","sessionId":""#)
            .and_then(|r| r.strip_suffix("\"}"))
            .unwrap_or_default();
        assert!(ClientId::parse(id).is_some(), "{}", texts[0]);
        assert_eq!(
            texts[1],
            format!(r#"0|2|{{"version":"0.0.1","sessionId":"{id}"}}"#)
        );
    }

    #[test]
    fn rpc_calls() {
        match decode(r#"1|3|{"m":"wsgate.subscribe","p":["news.*"]}"#).as_slice() {
            [Step::Request(Request::Subscribe { topic, id, .. })] => {
                assert_eq!(topic, &Topic::Pattern(Bytes::from_static(b"news.*")));
                assert_eq!(id.as_deref(), Some("3"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            reply_of(r#"1|4|{"m":"wsgate.square","p":[5]}"#),
            r#"1|4|{"e":{"message":"no such method"}}"#
        );
        assert_eq!(
            reply_of(r#"1|5|{"m":"wsgate.subscribe","p":[1]}"#),
            r#"1|5|{"e":{"message":"wsgate.subscribe takes one argument: a channel or a pattern"}}"#
        );
        assert_eq!(
            reply_of(r#"1|6|{"p":[]}"#),
            r#"1|6|{"e":{"message":"missing method name \"m\""}}"#
        );
    }

    #[test]
    fn what_prism_throws_on_is_an_error_on_the_system_service() {
        assert_eq!(
            reply_of("9|1|{}"),
            r#"0||{"type":"error","message":"unknown service id \"9\": expected 0 (system), 1 (rpc) or 2 (pubsub)"}"#
        );
        assert_eq!(
            reply_of("1|{not json"),
            r#"0||{"type":"error","message":"service 1 (rpc) needs a callback slot: 1|<callbackId>|<payload>"}"#
        );
        assert!(reply_of("1|2|{not json")
            .starts_with(r#"0||{"type":"error","message":"invalid JSON for service 1 (rpc): "#));
        assert_eq!(
            reply_of(r#"0|1|{"c":"dance"}"#),
            r#"0||{"type":"error","message":"unknown system command \"dance\": expected connect or discover"}"#
        );
    }

    /// The call a frame decodes to.
    fn call_of(input: &str) -> Call {
        match decode(input).as_slice() {
            [Step::Request(Request::Call(call))] => call.clone(),
            other => panic!("{input}: {other:?}"),
        }
    }

    #[test]
    fn rpc_to_services_are_calls() {
        let call =
            call_of(r#"1|4|{"m":"billing.charge","p":[5, {"b":1,"a":12345678901234567890}]}"#);
        assert_eq!(
            call,
            Call {
                service: "billing".into(),
                method: "charge".into(),
                params: Bytes::from_static(br#"[5, {"b":1,"a":12345678901234567890}]"#),
                id: Some("4".into()),
                timeout: None,
            }
        );
        // Dots after the first belong to the method.
        let call = call_of(r#"1|5|{"m":"billing.charge.v2","p":[]}"#);
        assert_eq!((&*call.service, &*call.method), ("billing", "charge.v2"));
        // No arguments (or null) are an empty argument list; an empty slot an
        // empty id.
        let call = call_of(r#"1||{"m":"a.b"}"#);
        assert_eq!(
            (&call.params[..], call.id.as_deref()),
            (&b"[]"[..], Some(""))
        );
        assert_eq!(&call_of(r#"1|6|{"m":"a.b","p":null}"#).params[..], b"[]");
    }

    #[test]
    fn malformed_calls_are_answered_on_their_callback() {
        for (input, want) in [
            (
                r#"1|7|{"m":"billing","p":[]}"#,
                r#"1|7|{"e":{"message":"method \"billing\" must be <service>.<method>"}}"#,
            ),
            (
                r#"1|8|{"m":".charge"}"#,
                r#"1|8|{"e":{"message":"method \".charge\" must be <service>.<method>"}}"#,
            ),
            (
                r#"1|9|{"m":"billing."}"#,
                r#"1|9|{"e":{"message":"method \"billing.\" must be <service>.<method>"}}"#,
            ),
            (
                r#"1|10|{"m":"billing.charge","p":5}"#,
                r#"1|10|{"e":{"message":"billing.charge takes its arguments as an array \"p\""}}"#,
            ),
            (
                r#"1|11|{"m":"billing.charge","p":{"x":1}}"#,
                r#"1|11|{"e":{"message":"billing.charge takes its arguments as an array \"p\""}}"#,
            ),
        ] {
            match decode(input).as_slice() {
                [Step::Malformed(f)] => assert_eq!(f.as_text(), Some(want), "{input}"),
                other => panic!("{input}: {other:?}"),
            }
        }
    }

    fn answered(answer: Answer<'_>) -> Vec<String> {
        let mut out = Vec::new();
        SocketStreamConversation::new(Arc::new(Endpoint::default())).answer(answer, &mut out);
        out.iter()
            .filter_map(|f| f.as_text().map(str::to_owned))
            .collect()
    }

    #[test]
    fn call_results_and_errors_are_rpc_replies() {
        let ok = answered(Answer::Called {
            id: Some("4"),
            outcome: Ok(br#"{"charged":25}"#),
        });
        assert_eq!(ok, [r#"1|4|{"p":[{"charged":25}]}"#]);
        let failed = CallError::Failed {
            code: 402,
            message: "card \"x\" declined".into(),
        };
        let err = answered(Answer::Called {
            id: Some("5"),
            outcome: Err(&failed),
        });
        assert_eq!(err, [r#"1|5|{"e":{"message":"card \"x\" declined"}}"#]);
        let err = answered(Answer::Called {
            id: Some(""),
            outcome: Err(&CallError::NotAllowed),
        });
        assert_eq!(err, [r#"1||{"e":{"message":"not allowed"}}"#]);
        let topic = Topic::Channel(Bytes::from_static(b"news"));
        let revoked = answered(Answer::Revoked {
            topic: &topic,
            reason: "unsubscribed by the server",
        });
        assert_eq!(
            revoked,
            [r#"2|{"e":"wsgate:unsubscribed","p":["news","unsubscribed by the server"]}"#]
        );
    }
}
