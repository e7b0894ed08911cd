//! What nodes say to each other on their node channels
//! (`wsgate:node:<id>`, and `wsgate:nodes` for orders to every node): one
//! JSON object per message, tagged by `t`.
//!
//! Whoever can `PUBLISH` to these channels can make a node call a service
//! or close connections, as whoever can publish can send any message:
//! Redis is trusted (`docs/security.md`).

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{CallError, NodeCommand};
use crate::broker::Topic;

/// The node channel of node `id`.
pub fn node_channel(id: &str) -> Bytes {
    Bytes::from(format!("wsgate:node:{id}"))
}

/// The channel every node holds, for orders to all of them.
pub const NODES_CHANNEL: &str = "wsgate:nodes";

/// One message between nodes. Serialized with its tag `t`; read in two
/// steps ([`Wire::decode`]), since serde's tagged enums buffer their
/// content and a raw payload cannot be read from that buffer.
#[derive(Debug, Serialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Wire {
    /// A call for an instance of the receiving node.
    Call {
        /// The caller's node: where the reply goes.
        from: String,
        /// The caller node's number for the call.
        seq: u64,
        /// The chosen instance.
        instance: String,
        /// `service:method`.
        destination: String,
        /// Who calls.
        #[serde(skip_serializing_if = "Option::is_none")]
        consumer: Option<String>,
        /// The caller's callback name, passed through.
        #[serde(skip_serializing_if = "Option::is_none")]
        responder: Option<String>,
        /// Time left before the caller gives up.
        timeout_ms: u64,
        /// The parameters.
        payload: Box<RawValue>,
    },
    /// The end of call `seq` of the receiving node.
    Reply {
        /// The caller node's number for the call.
        seq: u64,
        /// The result, on success.
        #[serde(skip_serializing_if = "Option::is_none")]
        payload: Option<Box<RawValue>>,
        /// The error, on failure.
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<WireError>,
    },
    /// An order for every node's sessions.
    Order {
        /// The ordering node: where the count goes.
        from: String,
        /// Its number for the order.
        seq: u64,
        /// What to do.
        command: WireCommand,
    },
    /// How many connections a node acted on for order `seq`.
    Count {
        /// The order's number.
        seq: u64,
        /// Connections acted on.
        n: u64,
    },
}

/// A call's error on the wire: its code and message, and which of the
/// gateway's own errors it is (so the caller's node rebuilds the same
/// [`CallError`]).
#[derive(Debug, Serialize, Deserialize)]
pub struct WireError {
    /// The code.
    pub code: i64,
    /// The message.
    pub message: String,
    /// The gateway's error kind, when it is one of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

impl WireError {
    /// The wire form of `e`.
    pub fn from_error(e: &CallError) -> WireError {
        let kind = match e {
            CallError::NotAllowed => Some("not_allowed"),
            CallError::NoSuchService => Some("no_such_service"),
            CallError::NoSuchMethod => Some("no_such_method"),
            CallError::Timeout => Some("timeout"),
            CallError::ServiceGone => Some("service_gone"),
            CallError::Busy => Some("busy"),
            CallError::TooLarge => Some("too_large"),
            CallError::Unavailable => Some("unavailable"),
            CallError::Invalid(_) => Some("invalid"),
            CallError::Failed { .. } => None,
        };
        WireError {
            code: e.code(),
            message: e.message(),
            kind: kind.map(str::to_owned),
        }
    }

    /// The error it stands for.
    pub fn into_error(self) -> CallError {
        match self.kind.as_deref() {
            Some("not_allowed") => CallError::NotAllowed,
            Some("no_such_service") => CallError::NoSuchService,
            Some("no_such_method") => CallError::NoSuchMethod,
            Some("timeout") => CallError::Timeout,
            Some("service_gone") => CallError::ServiceGone,
            Some("busy") => CallError::Busy,
            Some("too_large") => CallError::TooLarge,
            Some("unavailable") => CallError::Unavailable,
            Some("invalid") => CallError::Invalid(self.message),
            _ => CallError::Failed {
                code: self.code,
                message: self.message,
            },
        }
    }
}

/// A [`NodeCommand`] on the wire.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireCommand {
    /// [`NodeCommand::Disconnect`].
    Disconnect {
        /// The user.
        user: String,
    },
    /// [`NodeCommand::Unsubscribe`] of a channel or a pattern.
    Unsubscribe {
        /// The user.
        user: String,
        /// The channel, for a channel subscription.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        channel: Option<String>,
        /// The pattern, for a pattern subscription.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pattern: Option<String>,
    },
}

impl WireCommand {
    /// The wire form of `c`.
    pub fn from_command(c: &NodeCommand) -> WireCommand {
        match c {
            NodeCommand::Disconnect { user } => WireCommand::Disconnect { user: user.clone() },
            NodeCommand::Unsubscribe { user, topic } => {
                let name = String::from_utf8_lossy(topic.name()).into_owned();
                let (channel, pattern) = match topic {
                    Topic::Channel(_) => (Some(name), None),
                    Topic::Pattern(_) => (None, Some(name)),
                };
                WireCommand::Unsubscribe {
                    user: user.clone(),
                    channel,
                    pattern,
                }
            }
        }
    }

    /// The command it stands for; `None` when it names neither a channel
    /// nor a pattern.
    pub fn into_command(self) -> Option<NodeCommand> {
        Some(match self {
            WireCommand::Disconnect { user } => NodeCommand::Disconnect { user },
            WireCommand::Unsubscribe {
                user,
                channel,
                pattern,
            } => {
                let topic = match (channel, pattern) {
                    (Some(c), None) => Topic::Channel(Bytes::from(c)),
                    (None, Some(p)) => Topic::Pattern(Bytes::from(p)),
                    _ => return None,
                };
                NodeCommand::Unsubscribe { user, topic }
            }
        })
    }
}

impl Wire {
    /// The message as JSON bytes.
    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Parses a node channel message; `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<Wire> {
        #[derive(Deserialize)]
        struct Tag<'a> {
            #[serde(borrow)]
            t: &'a str,
        }
        #[derive(Deserialize)]
        struct CallBody {
            from: String,
            seq: u64,
            instance: String,
            destination: String,
            consumer: Option<String>,
            responder: Option<String>,
            timeout_ms: u64,
            payload: Box<RawValue>,
        }
        #[derive(Deserialize)]
        struct ReplyBody {
            seq: u64,
            payload: Option<Box<RawValue>>,
            error: Option<WireError>,
        }
        #[derive(Deserialize)]
        struct OrderBody {
            from: String,
            seq: u64,
            command: WireCommand,
        }
        #[derive(Deserialize)]
        struct CountBody {
            seq: u64,
            n: u64,
        }
        let tag: Tag<'_> = serde_json::from_slice(bytes).ok()?;
        Some(match tag.t {
            "call" => {
                let b: CallBody = serde_json::from_slice(bytes).ok()?;
                Wire::Call {
                    from: b.from,
                    seq: b.seq,
                    instance: b.instance,
                    destination: b.destination,
                    consumer: b.consumer,
                    responder: b.responder,
                    timeout_ms: b.timeout_ms,
                    payload: b.payload,
                }
            }
            "reply" => {
                let b: ReplyBody = serde_json::from_slice(bytes).ok()?;
                Wire::Reply {
                    seq: b.seq,
                    payload: b.payload,
                    error: b.error,
                }
            }
            "order" => {
                let b: OrderBody = serde_json::from_slice(bytes).ok()?;
                Wire::Order {
                    from: b.from,
                    seq: b.seq,
                    command: b.command,
                }
            }
            "count" => {
                let b: CountBody = serde_json::from_slice(bytes).ok()?;
                Wire::Count { seq: b.seq, n: b.n }
            }
            _ => return None,
        })
    }
}

/// `text` as a raw JSON value, when it is valid JSON.
pub fn raw(text: &[u8]) -> Option<Box<RawValue>> {
    let text = std::str::from_utf8(text).ok()?;
    RawValue::from_string(text.to_owned()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_and_replies_round_trip_with_their_raw_payloads() {
        let call = Wire::Call {
            from: "a".into(),
            seq: 7,
            instance: "b.1.2".into(),
            destination: "billing:charge".into(),
            consumer: Some("web".into()),
            responder: None,
            timeout_ms: 900,
            payload: raw(br#"{"amount": 3}"#).unwrap(),
        };
        let bytes = call.encode();
        assert_eq!(
            &bytes[..],
            br#"{"t":"call","from":"a","seq":7,"instance":"b.1.2","destination":"billing:charge","consumer":"web","timeout_ms":900,"payload":{"amount": 3}}"#
        );
        assert!(matches!(
            Wire::decode(&bytes),
            Some(Wire::Call { seq: 7, .. })
        ));
        let reply = Wire::Reply {
            seq: 7,
            payload: None,
            error: Some(WireError::from_error(&CallError::ServiceGone)),
        };
        let Some(Wire::Reply { error: Some(e), .. }) = Wire::decode(&reply.encode()) else {
            panic!("reply did not round trip");
        };
        assert_eq!(e.into_error(), CallError::ServiceGone);
        let failed = WireError::from_error(&CallError::Failed {
            code: 17,
            message: "card declined".into(),
        });
        assert_eq!(
            failed.into_error(),
            CallError::Failed {
                code: 17,
                message: "card declined".into()
            }
        );
        assert!(Wire::decode(b"{\"t\":\"nope\"}").is_none());
        assert!(Wire::decode(b"\xff").is_none());
    }
}
