//! One SocketStream connection: its session id and the services' messages
//! as session requests.
//!
//! - system (0): `connect` answers a fresh, unguessable `sessionId` (the
//!   same one for every `connect` of the connection: wsgate keeps no
//!   session store, so a client's own id is never taken over); `discover`
//!   lists rpc and pubsub with their client handlers.
//! - rpc (1): `wsgate.subscribe` / `wsgate.unsubscribe` (one channel or
//!   glob) become session requests answered on the call's callback; every
//!   other method is `no such service` until the services registry exists.
//! - pubsub (2): server pushes only. On open, the connection asks for
//!   `WSGATE_SOCKETSTREAM_CHANNELS` ([`Conversation::open`]); a refusal of
//!   one of those is told on the system service.
//!
//! A frame Prism would throw on is answered `0||{"type":"error",..}`.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde_json::Value;

use super::frame::{self, Service};
use super::reply;
use super::SocketStreamRender;
use crate::broker::Topic;
use crate::protocol::bayeux::client_id::ClientId;
use crate::protocol::{Ack, Answer, Conversation, Frame, Inbound, Render, Request, Step};

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
        let call = match object(Service::Rpc, payload) {
            Ok(call) => call,
            Err(why) => return malformed(steps, &why),
        };
        let refuse = |steps: &mut Vec<Step>, why: &str| {
            steps.push(Step::Malformed(Frame::text(reply::rpc_error(
                callback, why,
            ))));
        };
        let Some(method) = call.get("m").and_then(Value::as_str) else {
            return refuse(steps, "missing method name \"m\"");
        };
        let subscribe = match method {
            "wsgate.subscribe" => true,
            "wsgate.unsubscribe" => false,
            _ => {
                let text = reply::rpc_error(callback, "no such service");
                return steps.push(Step::Reply(Frame::text(text)));
            }
        };
        let name = match call.get("p") {
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
        let id = Some(callback.map_or_else(String::new, |cb| cb.to_string()));
        steps.push(Step::Request(if subscribe {
            Request::Subscribe {
                topic,
                id,
                ext: None,
            }
        } else {
            Request::Unsubscribe { topic, id }
        }));
    }
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
        let Answer::Ack(Ack {
            topic, id, error, ..
        }) = answer
        else {
            return;
        };
        let text = match (id, error) {
            // Asked on open: only a refusal is worth a word.
            (None, None) => return,
            (None, Some(refusal)) => {
                let name = String::from_utf8_lossy(topic.name());
                reply::error(&format!(
                    "cannot subscribe to {name}: {}",
                    refusal.message()
                ))
            }
            (Some(cb), None) => reply::rpc_result(cb.parse().ok(), "true"),
            (Some(cb), Some(refusal)) => reply::rpc_error(cb.parse().ok(), refusal.message()),
        };
        out.push(Frame::text(text));
    }
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
            reply_of(r#"1|4|{"m":"demo.square","p":[5]}"#),
            r#"1|4|{"e":{"message":"no such service"}}"#
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
}
