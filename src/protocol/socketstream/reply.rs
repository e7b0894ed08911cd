//! Every frame a SocketStream client reads, byte for byte.

use serde::Serialize;

use super::frame::Service;
use crate::broker::{BrokerMessage, Topic};
use crate::protocol::native::is_strict_json;
use crate::protocol::{Notice, NoticeKind};

/// The version `connect` answers (Prism's client sends `0.0.1` too).
pub const VERSION: &str = "0.0.1";

/// The event of a gap notice's start.
pub const INTERRUPTED: &str = "wsgate:interrupted";
/// The event of a gap notice's end.
pub const RESUMED: &str = "wsgate:resumed";
/// The event of a subscription the server ended (the operator API's
/// `POST /unsubscribe`).
pub const UNSUBSCRIBED: &str = "wsgate:unsubscribed";

/// The client side of the rpc service, which `discover` hands out: calls
/// `<service>.<method>` with the arguments, then the callback (a last
/// function argument) with the responder's arguments; an error goes to
/// `console.error`, as SocketStream's rpc client did.
pub const RPC_HANDLER: &str = "function (client) {\n  return function (method) {\n    var args = Array.prototype.slice.call(arguments, 1);\n    var cb = typeof args[args.length - 1] === 'function' ? args.pop() : function () {};\n    client.send({m: method, p: args}, function (reply) {\n      if (reply.e) console.error('rpc ' + method + ': ' + reply.e.message);\n      else cb.apply(null, reply.p);\n    });\n  };\n}";

/// The client side of the pubsub service: a small event emitter; a push
/// `{"e":name,"p":[args]}` calls the listeners of `name` with the args.
pub const PUBSUB_HANDLER: &str = "function (client) {\n  var listeners = {};\n  var api = {\n    on: function (e, fn) { (listeners[e] = listeners[e] || []).push(fn); return api; },\n    off: function (e, fn) { listeners[e] = (listeners[e] || []).filter(function (f) { return f !== fn; }); return api; }\n  };\n  client.onmessage = function (msg) {\n    (listeners[msg.e] || []).slice().forEach(function (fn) { fn.apply(null, msg.p); });\n  };\n  return api;\n}";

/// `<service>|<callback>|<payload>` (an empty slot for `None`).
pub fn with_callback(service: Service, callback: Option<u64>, payload: &str) -> String {
    match callback {
        Some(cb) => format!("{}|{cb}|{payload}", service.id()),
        None => format!("{}||{payload}", service.id()),
    }
}

/// `{"type":"error","message":..}`.
#[derive(Serialize)]
struct ErrorBody<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message: &'a str,
}

/// The answer to `connect`.
#[derive(Serialize)]
struct Connected<'a> {
    version: &'static str,
    #[serde(rename = "sessionId")]
    session_id: &'a str,
}

/// What `use` says of a service.
#[derive(Serialize)]
struct Use {
    json: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    callbacks: bool,
}

/// A service's `params`.
#[derive(Serialize)]
struct Params {
    id: u8,
    name: &'static str,
    options: Empty,
    #[serde(rename = "use")]
    uses: Use,
}

/// `{}`.
#[derive(Serialize)]
struct Empty {}

/// One entry of the `discover` answer.
#[derive(Serialize)]
struct Discovered {
    params: Params,
    handler: &'static str,
}

/// `{"e":{"message":..}}`.
#[derive(Serialize)]
struct RpcError<'a> {
    e: Message<'a>,
}

#[derive(Serialize)]
struct Message<'a> {
    message: &'a str,
}

/// A pubsub event.
#[derive(Serialize)]
struct Event<'a, P: Serialize> {
    e: &'a str,
    p: P,
}

/// Serialises a reply; our shapes hold strings, bools and numbers, which
/// cannot fail, and the fallback keeps this total anyway.
fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "{}".to_owned())
}

/// An error on the system service: `0||{"type":"error","message":..}`.
pub fn error(message: &str) -> String {
    let body = ErrorBody {
        kind: "error",
        message,
    };
    with_callback(Service::System, None, &to_json(&body))
}

/// The answer to `connect`.
pub fn connected(callback: Option<u64>, session_id: &str) -> String {
    let body = Connected {
        version: VERSION,
        session_id,
    };
    with_callback(Service::System, callback, &to_json(&body))
}

/// The answer to `discover`: the public services, each with its client handler.
pub fn discovered(callback: Option<u64>) -> String {
    let entry = |service: Service, handler| Discovered {
        params: Params {
            id: service.id(),
            name: service.name(),
            options: Empty {},
            uses: Use {
                json: true,
                callbacks: service.callbacks(),
            },
        },
        handler,
    };
    let body = [
        entry(Service::Rpc, RPC_HANDLER),
        entry(Service::PubSub, PUBSUB_HANDLER),
    ];
    with_callback(Service::System, callback, &to_json(&body))
}

/// An rpc result: `1|<cb>|{"p":[..]}` with `args` as the JSON arguments.
pub fn rpc_result(callback: Option<u64>, args: &str) -> String {
    with_callback(Service::Rpc, callback, &format!("{{\"p\":[{args}]}}"))
}

/// An rpc error: `1|<cb>|{"e":{"message":..}}`.
pub fn rpc_error(callback: Option<u64>, message: &str) -> String {
    let body = RpcError {
        e: Message { message },
    };
    with_callback(Service::Rpc, callback, &to_json(&body))
}

/// Deepest payload embedded as JSON: the frame wraps it in an object and
/// an array, and serde_json reads 128 levels.
const MAX_PAYLOAD_DEPTH: usize = 125;

/// A delivery: `2|{"e":"<channel>","p":[<payload>]}`, the payload embedded
/// when it is JSON, else a string (invalid UTF-8 replaced by U+FFFD).
pub fn delivery(message: &BrokerMessage) -> String {
    let channel = String::from_utf8_lossy(&message.channel);
    let mut out = String::with_capacity(24 + channel.len() + message.payload.len());
    out.push_str("2|{\"e\":");
    push_json_str(&mut out, &channel);
    out.push_str(",\"p\":[");
    match std::str::from_utf8(&message.payload) {
        Ok(text) if is_strict_json(text, MAX_PAYLOAD_DEPTH) => out.push_str(text),
        Ok(text) => push_json_str(&mut out, text),
        Err(_) => push_json_str(&mut out, &String::from_utf8_lossy(&message.payload)),
    }
    out.push_str("]}");
    out
}

/// A gap notice, as a pubsub event: `2|{"e":"wsgate:interrupted","p":[[<topics>],"<reason>"]}`
/// or `2|{"e":"wsgate:resumed","p":[[<topics>]]}`.
pub fn notice(notice: &Notice<'_>) -> String {
    let topics: Vec<String> = notice
        .topics
        .iter()
        .map(|t| String::from_utf8_lossy(Topic::name(t)).into_owned())
        .collect();
    let body = match (notice.kind, notice.reason) {
        (NoticeKind::Interrupted, Some(reason)) => to_json(&Event {
            e: INTERRUPTED,
            p: (topics, reason),
        }),
        (NoticeKind::Interrupted, None) => to_json(&Event {
            e: INTERRUPTED,
            p: (topics,),
        }),
        (NoticeKind::Resumed, _) => to_json(&Event {
            e: RESUMED,
            p: (topics,),
        }),
    };
    format!("2|{body}")
}

/// A subscription the server ended, as a pubsub event:
/// `2|{"e":"wsgate:unsubscribed","p":["<topic>","<reason>"]}`.
pub fn unsubscribed(topic: &Topic, reason: &str) -> String {
    let name = String::from_utf8_lossy(topic.name());
    let body = to_json(&Event {
        e: UNSUBSCRIBED,
        p: (&*name, reason),
    });
    format!("2|{body}")
}

fn push_json_str(out: &mut String, s: &str) {
    if let Ok(quoted) = serde_json::to_string(s) {
        out.push_str(&quoted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg(payload: &'static [u8]) -> BrokerMessage {
        BrokerMessage {
            topic: Topic::Pattern(Bytes::from_static(b"news.*")),
            channel: Bytes::from_static(b"news.a"),
            payload: Bytes::from_static(payload),
            position: None,
        }
    }

    #[test]
    fn deliveries() {
        assert_eq!(
            delivery(&msg(br#"{"x":1}"#)),
            r#"2|{"e":"news.a","p":[{"x":1}]}"#
        );
        assert_eq!(
            delivery(&msg(b"hi \"you\"")),
            r#"2|{"e":"news.a","p":["hi \"you\""]}"#
        );
        assert_eq!(
            delivery(&msg(b"a\xffb")),
            "2|{\"e\":\"news.a\",\"p\":[\"a\u{fffd}b\"]}"
        );
        assert_eq!(delivery(&msg(b"42")), r#"2|{"e":"news.a","p":[42]}"#);
        let deep = format!("{}{}", "[".repeat(126), "]".repeat(126));
        let frame = delivery(&BrokerMessage {
            payload: Bytes::from(deep.clone()),
            position: None,
            ..msg(b"")
        });
        let v: serde_json::Value = serde_json::from_str(&frame[2..]).unwrap_or_default();
        assert_eq!(v["p"][0], serde_json::Value::String(deep));
    }

    #[test]
    fn answers() {
        assert_eq!(error("x"), r#"0||{"type":"error","message":"x"}"#);
        assert_eq!(
            connected(Some(1), "abc"),
            r#"0|1|{"version":"0.0.1","sessionId":"abc"}"#
        );
        assert_eq!(rpc_result(Some(7), "true"), r#"1|7|{"p":[true]}"#);
        assert_eq!(
            rpc_error(None, "no such service"),
            r#"1||{"e":{"message":"no such service"}}"#
        );
        assert!(discovered(Some(2)).starts_with(r#"0|2|[{"params":{"id":1,"name":"rpc","options":{},"use":{"json":true,"callbacks":true}},"handler":"function (client) {"#));
    }

    #[test]
    fn gap_notices() {
        let topics = [Topic::Channel(Bytes::from_static(b"a"))];
        let n = Notice {
            kind: NoticeKind::Interrupted,
            topics: &topics,
            reason: Some("broker connection lost"),
            recovered: None,
        };
        assert_eq!(
            notice(&n),
            r#"2|{"e":"wsgate:interrupted","p":[["a"],"broker connection lost"]}"#
        );
        let n = Notice {
            kind: NoticeKind::Resumed,
            topics: &topics,
            reason: None,
            recovered: None,
        };
        assert_eq!(notice(&n), r#"2|{"e":"wsgate:resumed","p":[["a"]]}"#);
        let pattern = Topic::Pattern(Bytes::from_static(b"news.*"));
        assert_eq!(
            unsubscribed(&pattern, "unsubscribed by the server"),
            r#"2|{"e":"wsgate:unsubscribed","p":["news.*","unsubscribed by the server"]}"#
        );
    }
}
