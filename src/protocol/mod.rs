//! Wire dialects: how clients of one kind phrase requests and expect replies.
//!
//! A [`Dialect`] turns one WebSocket frame into a [`Request`] and renders
//! replies and deliveries back into frames. The session and the hub only see
//! requests, topics and encoded frames, never a dialect's shapes, so adding
//! Bayeux or RoadRunner later is a new file here and a route, nothing more.
//!
//! Deliveries are rendered once per message per dialect ([`Dialect::delivery`])
//! and the same [`Frame`] is cloned (a reference count) into every queue.

use bytes::Bytes;
use tokio_tungstenite::tungstenite::Message;

use crate::broker::{BrokerMessage, Topic};

pub mod bayeux;
pub mod native;

/// An encoded WebSocket message, ready to be queued to any number of sockets:
/// cloning it clones a reference to the shared bytes, never the bytes.
pub type Frame = Message;

/// What a client asked for, independent of how it phrased it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Start receiving messages for a channel or pattern.
    Subscribe {
        /// What to subscribe to.
        topic: Topic,
        /// Client-chosen correlation id, echoed in the reply.
        id: Option<String>,
    },
    /// Stop receiving messages for a channel or pattern.
    Unsubscribe {
        /// What to unsubscribe from.
        topic: Topic,
        /// Client-chosen correlation id, echoed in the reply.
        id: Option<String>,
    },
    /// Application-level liveness check; answered at once.
    Ping {
        /// Client-chosen correlation id, echoed in the reply.
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
        /// Client-chosen correlation id, echoed in the reply.
        id: Option<String>,
    },
    /// A fresh token for the same subject, before the current one expires.
    Refresh {
        /// The new JWT.
        token: String,
        /// Client-chosen correlation id, echoed in the reply.
        id: Option<String>,
    },
}

/// A frame that is not a valid request. The client gets an error reply built
/// from it; the connection stays open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The request's id, when one could be read.
    pub id: Option<String>,
    /// What was wrong, for a human.
    pub error: String,
}

/// Which request an [`Ack`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    /// Answers [`Request::Subscribe`].
    Subscribe,
    /// Answers [`Request::Unsubscribe`].
    Unsubscribe,
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
    pub error: Option<&'a str>,
}

/// The answer to a client publish: once the broker answered, or at once when
/// refused before it.
#[derive(Debug, Clone, Copy)]
pub struct PublishReply<'a> {
    /// The channel as requested.
    pub channel: &'a [u8],
    /// The request's id, if it had one.
    pub id: Option<&'a str>,
    /// `None` when the broker confirmed the publish; the reason when not.
    pub error: Option<&'a str>,
    /// For a broker failure only: whether the message may have been
    /// published anyway (so a blind retry could publish it twice). `None`
    /// when confirmed, or refused before anything was sent.
    pub maybe_published: Option<bool>,
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
}

/// One client wire format. Implementations are stateless and shared.
pub trait Dialect: Send + Sync + 'static {
    /// Short name, used in logs (`dialect` span field).
    fn name(&self) -> &'static str;
    /// Parses one client frame.
    fn decode(&self, frame: &Message) -> Result<Request, Rejection>;
    /// Renders the answer to a subscribe or unsubscribe.
    fn ack(&self, ack: &Ack<'_>) -> Frame;
    /// Renders the answer to a publish.
    fn published(&self, reply: &PublishReply<'_>) -> Frame;
    /// Renders the answer to a ping.
    fn pong(&self, id: Option<&str>) -> Frame;
    /// Renders the error reply for a frame that was not a valid request.
    fn reject(&self, rejection: &Rejection) -> Frame;
    /// Renders a broker message for delivery; called once per message, not
    /// once per subscriber.
    fn delivery(&self, message: &BrokerMessage) -> Frame;
    /// Renders a gap notice for one member.
    fn notice(&self, notice: &Notice<'_>) -> Frame;
    /// Renders the answer to a refresh: `None` when the new token was taken.
    fn refreshed(&self, id: Option<&str>, error: Option<&str>) -> Frame;
    /// Renders the notice that the server ended a subscription the client
    /// held (its refreshed token no longer allows it), with the reason.
    fn revoked(&self, topic: &Topic, reason: &str) -> Frame;
}
