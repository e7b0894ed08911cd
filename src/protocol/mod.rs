//! Wire dialects: how clients of one kind phrase requests and expect replies.
//!
//! This module is the contract between the dialects and the rest:
//!
//! - a [`Conversation`] is one connection's dialect: it owns that
//!   connection's protocol state (a Bayeux clientId, a held connect), turns
//!   each inbound message into [`Step`]s (requests for the session, replies
//!   of its own, several per message when the wire batches them) and renders
//!   the session's [`Answer`]s its own way;
//! - a [`Render`] is what the hub holds for a member: it renders a broker
//!   message once per render key ([`Render::key`]) and the same [`Frame`] is
//!   cloned (a reference count) into every queue with that key.
//!
//! The session sees requests and answers, never a dialect's shapes, and the
//! hub sees only `Render`; so a dialect is a module here plus a route.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::auth::Identity;
use crate::broker::{BrokerMessage, Topic};
use crate::rpc::CallError;

pub mod bayeux;
pub mod native;
pub mod realizehit;
pub mod roadrunner;
pub mod since;
pub mod socketstream;
pub mod sse;

/// An encoded message, ready to be queued to any number of connections:
/// cloning it clones a reference to the shared bytes, never the bytes. The
/// transport decides how it goes on the wire (a WebSocket frame, or a piece
/// of a long-poll body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// UTF-8 text (every dialect's replies and deliveries).
    Text(Utf8Bytes),
    /// Bytes.
    Binary(Bytes),
    /// A WebSocket ping (keepalive); nothing on other transports.
    Ping,
    /// A text message deflated for sockets that agreed permessage-deflate
    /// ([`crate::deflate`]): raw DEFLATE without its sync-flush tail, sent
    /// as one text frame with RSV1. Only such sockets' renders make it.
    Deflated(Bytes),
}

impl Frame {
    /// A text frame owning `text`.
    pub fn text(text: String) -> Frame {
        Frame::Text(text.into())
    }

    /// Bytes it costs in a queue.
    pub fn len(&self) -> usize {
        match self {
            Frame::Text(t) => t.len(),
            Frame::Binary(b) | Frame::Deflated(b) => b.len(),
            Frame::Ping => 0,
        }
    }

    /// Whether it carries no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The text, for a text frame.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Frame::Text(t) => Some(t.as_str()),
            _ => None,
        }
    }
}

/// One message from a client, as the transport received it.
#[derive(Debug, Clone, Copy)]
pub enum Inbound<'a> {
    /// A text frame, or a POST body that was UTF-8.
    Text(&'a str),
    /// A binary frame, or a body that was not UTF-8.
    Binary(&'a [u8]),
}

/// What a client asked the session for, independent of how it phrased it.
/// `id` is the dialect's own correlation token, opaque to the session and
/// handed back in the [`Answer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Start receiving messages for a channel or pattern.
    Subscribe {
        /// What to subscribe to.
        topic: Topic,
        /// Correlation, echoed in the answer.
        id: Option<String>,
        /// Extra fields for the authorisation callback: Bayeux's `ext`, as
        /// the JSON text the client sent (an object).
        ext: Option<String>,
        /// The last position the client has of a history channel: deliver
        /// what came after it first (`docs/history.md`).
        since: Option<crate::history::Since>,
        /// Also receive the channel's join and leave events (a presence
        /// channel, `docs/presence.md`).
        join_leave: bool,
    },
    /// Who is subscribed to a presence channel, cluster-wide; with
    /// `stats`, only how many clients and distinct users.
    Presence {
        /// The channel.
        channel: Bytes,
        /// Correlation, echoed in the answer.
        id: Option<String>,
        /// Counts only (`presence_stats`).
        stats: bool,
    },
    /// Stop receiving messages for a channel or pattern.
    Unsubscribe {
        /// What to unsubscribe from.
        topic: Topic,
        /// Correlation, echoed in the answer.
        id: Option<String>,
    },
    /// Application-level liveness check; answered at once.
    Ping {
        /// Correlation, echoed in the answer.
        id: Option<String>,
    },
    /// Publish one message to a channel through the broker, as `POST
    /// /publish` would; allowed only by `WSGATE_CLIENT_PUBLISH` (and the
    /// token's `publish` claim), see [`crate::publish`].
    Publish {
        /// The channel, as given: a name, never expanded (a `*` in it is a
        /// byte like any other).
        channel: Bytes,
        /// What Redis carries, already under the payload rule
        /// ([`crate::publish::json_payload`]: the JSON text as sent).
        payload: Bytes,
        /// Correlation, echoed in the answer.
        id: Option<String>,
    },
    /// A fresh token for the same subject, before the current one expires.
    Refresh {
        /// The new JWT.
        token: String,
        /// Correlation, echoed in the answer.
        id: Option<String>,
    },
    /// Call a method of a registered service (`docs/services.md`); answered
    /// with [`Answer::Called`] when the service replied, or the call failed.
    Call(Call),
    /// Open the client's line to a service: Bayeux's subscribe of
    /// `/service/<name>` (a registered service, or a nodefony TCP backend
    /// of `WSGATE_TCP_SERVICES`, connected for this client alone).
    ServiceSubscribe {
        /// The service's name (`random` for `/service/random`).
        service: String,
        /// Correlation, echoed in the [`Answer::ServiceAck`].
        id: Option<String>,
    },
    /// Close the client's line to a service (Bayeux's unsubscribe of
    /// `/service/<name>`).
    ServiceUnsubscribe {
        /// The service's name.
        service: String,
        /// Correlation, echoed in the [`Answer::ServiceAck`].
        id: Option<String>,
    },
    /// What a client sends a service on its line (Bayeux's publish on
    /// `/service/<name>`): a line for a TCP backend, a JSON-RPC 2.0 call for
    /// a registered service; replies come back as [`Answer::ServiceData`].
    ServicePublish {
        /// The service's name.
        service: String,
        /// The message's `data`, as the JSON text the client sent.
        data: Bytes,
        /// Correlation, echoed in the [`Answer::ServiceAck`].
        id: Option<String>,
    },
}

/// A call to `service:method`, whatever dialect phrased it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The registered service's name.
    pub service: String,
    /// One of the methods it registered.
    pub method: String,
    /// The arguments, as JSON text (`null` when the client sent none).
    pub params: Bytes,
    /// Correlation, echoed in the answer.
    pub id: Option<String>,
    /// A deadline shorter than `WSGATE_CALL_TIMEOUT_MS`, when the client
    /// asked for one.
    pub timeout: Option<Duration>,
}

/// What a [`Conversation`] makes of an inbound message, in order.
#[derive(Debug)]
pub enum Step {
    /// Ask the session.
    Request(Request),
    /// Queue this reply (the dialect answered by itself).
    Reply(Frame),
    /// Queue this error reply to a malformed message (counted in
    /// `wsgate_malformed_frames_total`).
    Malformed(Frame),
    /// The client authenticated (a Bayeux handshake's token): the session
    /// takes this identity, as if it had come with the upgrade.
    Authenticated(Identity),
    /// The client's session is known on this node by this key from now on
    /// (a Bayeux handshake): later links may find it.
    Bind(String),
    /// The message belongs to another session of this node, known by this
    /// key: hand the link over to it, with the whole message.
    Route(String),
    /// Hold the answer of a connect this long, then ask
    /// [`Conversation::release`] for it; deliveries flow meanwhile.
    Hold(Duration),
    /// The client said goodbye: end the session after the replies.
    End,
}

/// Which request an [`Ack`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    /// Answers [`Request::Subscribe`].
    Subscribe,
    /// Answers [`Request::Unsubscribe`].
    Unsubscribe,
}

/// Which request an [`Answer::ServiceAck`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceOp {
    /// Answers [`Request::ServiceSubscribe`].
    Subscribe,
    /// Answers [`Request::ServiceUnsubscribe`].
    Unsubscribe,
    /// Answers [`Request::ServicePublish`].
    Publish,
}

/// The answer to a subscribe or unsubscribe.
#[derive(Debug, Clone, Copy)]
pub struct Ack<'a> {
    /// Which request this answers.
    pub kind: AckKind,
    /// The topic as requested.
    pub topic: &'a Topic,
    /// The request's id, if it had one.
    pub id: Option<&'a str>,
    /// `None` when done; the reason when refused.
    pub error: Option<&'a Refusal>,
    /// For a subscribe that asked to recover (`since`): whether every
    /// message after the position was delivered (see `docs/history.md`).
    pub recovered: Option<bool>,
}

/// Why the session refused a request: a closed set, so each dialect can
/// phrase each refusal its own way (Bayeux maps them to error codes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Outside the ACLs, or a publish without the permission.
    NotAllowed,
    /// The authorisation callback denied it, with its reason.
    Denied(String),
    /// A subscribe for a topic already held (or being subscribed).
    AlreadySubscribed,
    /// An unsubscribe for a topic not held.
    NotSubscribed,
    /// The subscribe was withdrawn by an unsubscribe before it completed.
    Cancelled,
    /// Too many requests per second.
    RateLimited,
    /// The broker (or the callback) could not answer in time.
    Unavailable(String),
    /// Anything else the session or the broker refused, for a human.
    Other(String),
}

impl Refusal {
    /// The text the native protocol (and logs) use.
    pub fn message(&self) -> &str {
        match self {
            Refusal::NotAllowed => "not allowed",
            Refusal::AlreadySubscribed => "already subscribed",
            Refusal::NotSubscribed => "not subscribed",
            Refusal::Cancelled => "cancelled by unsubscribe",
            Refusal::RateLimited => "rate limited",
            Refusal::Denied(s) | Refusal::Unavailable(s) | Refusal::Other(s) => s,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

/// What the session answers, for the dialect to render.
#[derive(Debug, Clone, Copy)]
pub enum Answer<'a> {
    /// A subscribe or unsubscribe was done or refused.
    Ack(Ack<'a>),
    /// The answer to a ping.
    Pong {
        /// The ping's id.
        id: Option<&'a str>,
    },
    /// The answer to a refresh: `None` when the new token was taken.
    Refreshed {
        /// The refresh's id.
        id: Option<&'a str>,
        /// Why not, when refused.
        error: Option<&'a str>,
    },
    /// The server ended a subscription the client held (its refreshed token
    /// no longer allows it).
    Revoked {
        /// The subscription.
        topic: &'a Topic,
        /// Why.
        reason: &'a str,
    },
    /// A publish was done (`error` `None`) or refused.
    Published {
        /// The channel.
        channel: &'a [u8],
        /// The publish's id.
        id: Option<&'a str>,
        /// Why not, when refused.
        error: Option<&'a Refusal>,
        /// For a broker failure only: whether the message may have been
        /// published anyway (so a blind retry could publish it twice).
        maybe_published: Option<bool>,
    },
    /// The message named a client no session on this node holds (after a
    /// [`Step::Route`] that found nobody): answer it as unknown.
    UnknownClient {
        /// The key that was routed.
        key: &'a str,
    },
    /// A [`Request::Call`] ended: the service's result (JSON text), or why not.
    Called {
        /// The call's id.
        id: Option<&'a str>,
        /// The result, or the error.
        outcome: Result<&'a [u8], &'a CallError>,
    },
    /// A [`Request::ServiceSubscribe`], [`Request::ServiceUnsubscribe`] or
    /// [`Request::ServicePublish`] was done (`error` `None`) or refused.
    ServiceAck {
        /// Which request this answers.
        kind: ServiceOp,
        /// The service's name.
        service: &'a str,
        /// The request's id.
        id: Option<&'a str>,
        /// Why not, when refused.
        error: Option<&'a Refusal>,
    },
    /// Text for this client on its line to `service`: a line its TCP backend
    /// wrote, or the JSON-RPC 2.0 reply to its call (Bayeux: a message on
    /// `/service/<name>` with this string as `data`).
    ServiceData {
        /// The service's name.
        service: &'a str,
        /// The id of the [`Request::ServicePublish`] this answers (a
        /// JSON-RPC reply), so that a client correlating by message id
        /// (cometd's `remoteCall`) finds it; `None` for a backend's line.
        id: Option<&'a str>,
        /// The text, as it is to appear in `data`.
        data: &'a str,
    },
    /// The answer to a [`Request::Presence`].
    Presence {
        /// The channel.
        channel: &'a [u8],
        /// The request's id.
        id: Option<&'a str>,
        /// Counts only.
        stats: bool,
        /// The members, or why not.
        outcome: Result<&'a crate::presence::Members, &'a Refusal>,
    },
    /// The line to `service` ended without the client asking (its TCP
    /// backend went away): the client is told why, and is no longer
    /// subscribed to it.
    ServiceEnded {
        /// The service's name.
        service: &'a str,
        /// Why.
        reason: &'a str,
    },
}

/// Which gap notice: delivery stopped, or resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeKind {
    /// Messages for these topics are being (or were) lost.
    Interrupted,
    /// Messages for these topics flow again; what was published in between is gone.
    Resumed,
}

/// A gap notice: Redis pub/sub is at-most-once, so whenever messages can be
/// lost the affected clients are told, with the topics concerned, so an
/// application can refetch.
#[derive(Debug, Clone, Copy)]
pub struct Notice<'a> {
    /// Interrupted or resumed.
    pub kind: NoticeKind,
    /// The member's subscriptions affected.
    pub topics: &'a [Topic],
    /// Why delivery was interrupted (for `Interrupted`).
    pub reason: Option<&'a str>,
    /// For a `Resumed` of history channels the node healed (gap healing,
    /// `docs/history.md`): whether every message missed was delivered
    /// before it. `None` for every other notice (unchanged bytes).
    pub recovered: Option<bool>,
}

/// What the hub holds for a member: how its deliveries and notices look.
/// Shared by every connection of a dialect; never per connection.
pub trait Render: Send + Sync + 'static {
    /// Members with the same key share one rendering per message.
    fn key(&self) -> &'static str;
    /// Renders a broker message for delivery, once per message per key;
    /// `None` when it is not for members of this key (a Bayeux `/foo/*`
    /// does not take `/foo/a/b`, which the Redis glob lets through).
    fn delivery(&self, message: &BrokerMessage) -> Option<Frame>;
    /// Renders a gap notice.
    fn notice(&self, notice: &Notice<'_>) -> Option<Frame>;
    /// Renders a presence channel's join or leave `event` (its JSON,
    /// `docs/presence.md`) for subscribers that asked for them, once per
    /// event per key; `None`: this dialect has no way to say it.
    fn presence_event(&self, _channel: &[u8], _event: &[u8]) -> Option<Frame> {
        None
    }
    /// Whether a member receives a published message once even when several
    /// of its subscriptions match it (Bayeux), rather than once per
    /// subscription (the native protocol names the pattern that matched).
    fn once_per_publish(&self) -> bool {
        false
    }
}

/// One connection's dialect: see the module docs. Owned by the session
/// task, so it needs no locks.
pub trait Conversation: Send + 'static {
    /// Short name, used in logs.
    fn name(&self) -> &'static str;
    /// How this connection's deliveries are rendered.
    fn render(&self) -> Arc<dyn Render>;
    /// The steps of a connection that has just opened, before any message
    /// of its client (SocketStream subscribes every connection to
    /// `WSGATE_SOCKETSTREAM_CHANNELS`); served as a message's are.
    fn open(&mut self, _steps: &mut Vec<Step>) {}
    /// Reads one inbound message into steps.
    fn decode(&mut self, inbound: Inbound<'_>, steps: &mut Vec<Step>);
    /// Renders the session's answer into `out`: nothing, one frame, or
    /// several (a RoadRunner join answers its refused topics and then its
    /// accepted ones, once the last topic of the join is answered).
    fn answer(&mut self, answer: Answer<'_>, out: &mut Vec<Frame>);
    /// The answer of the connect held by [`Step::Hold`], now due.
    fn release(&mut self) -> Option<Frame> {
        None
    }
    /// How long the session outlives its link waiting for the client to come
    /// back (a Bayeux clientId without `/meta/disconnect`); `None`: it ends
    /// with its link.
    fn linger(&self) -> Option<Duration> {
        None
    }
    /// Whether a session of this dialect may ever outlive its link (or be
    /// handed another one), even if it does not yet: such a session keeps
    /// its writes in its own task instead of owning one socket's writes
    /// (the direct write path, `docs/design.md`).
    fn may_linger(&self) -> bool {
        false
    }
    /// The key this conversation's session is known by, once it has one.
    fn key(&self) -> Option<&str> {
        None
    }
    /// Takes over the session of `key`, issued by another node and adopted
    /// here (a [`Step::Route`] that no session of this node took); `false`
    /// when this conversation cannot.
    fn adopt(&mut self, _key: &str) -> bool {
        false
    }
    /// Answers every message of `inbound` as naming an unknown client `key`
    /// (its session was adopted by another node).
    fn unknown(&mut self, _inbound: Inbound<'_>, _key: &str) -> Option<Frame> {
        None
    }
}
