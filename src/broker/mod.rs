//! The broker: where subscriptions are mirrored and messages come from.
//!
//! A [`Broker`] holds one node's subscriptions (exact channels and glob
//! patterns) and publishes. It is told *what* to hold by the hub's reconciler
//! ([`Broker::apply`]), and reports what arrives as [`BrokerEvent`]s on a
//! bounded channel handed to it at construction. Two implementations:
//! [`redis`] (one pub/sub connection per node, shared by every node of a
//! cluster through Redis) and [`memory`] (in-process, for a single node with
//! no Redis).

use bytes::Bytes;
use futures_util::future::BoxFuture;

pub mod memory;
pub mod redis;

/// Something a node can be subscribed to.
///
/// Names are bytes because Redis channel names are bytes; the native protocol
/// only produces UTF-8 ones.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Topic {
    /// One exact channel (Redis `SUBSCRIBE`): cheap for Redis.
    Channel(Bytes),
    /// A Redis glob pattern (Redis `PSUBSCRIBE`): Redis matches every publish
    /// against every distinct pattern, so these cost O(patterns) per message.
    Pattern(Bytes),
}

impl Topic {
    /// The channel name or pattern text.
    pub fn name(&self) -> &Bytes {
        match self {
            Topic::Channel(n) | Topic::Pattern(n) => n,
        }
    }

    /// `"channel"` or `"pattern"`: the metric label and the wire field name.
    pub fn kind(&self) -> &'static str {
        match self {
            Topic::Channel(_) => "channel",
            Topic::Pattern(_) => "pattern",
        }
    }
}

/// One message as the broker received it for one subscription.
///
/// A publish that matches a channel subscription and two patterns arrives as
/// three of these, exactly as Redis sends `message` and `pmessage` replies.
#[derive(Debug, Clone)]
pub struct BrokerMessage {
    /// The subscription that matched.
    pub topic: Topic,
    /// The channel the message was published to.
    pub channel: Bytes,
    /// The payload, untouched.
    pub payload: Bytes,
}

/// What a broker reports to the hub, in order, on one bounded channel.
#[derive(Debug)]
pub enum BrokerEvent {
    /// A message for one of the subscriptions.
    Message(BrokerMessage),
    /// The broker is connected and holds no subscriptions: everything the
    /// hub wants must be applied again, on this connection `generation`.
    Up {
        /// Increases with every new connection; [`Broker::apply`] names it.
        generation: u64,
    },
    /// The connection is gone; every subscription is lost until the next `Up`.
    Down,
}

/// Capacity of the event channel from a broker to the hub's dispatcher, in
/// events. The reader never blocks on it for messages: when it is full, the
/// message is dropped and counted (a burst larger than this means the node
/// cannot keep up anyway, and blocking would only push the overflow into Redis's
/// output buffer, which disconnects us). `Up`/`Down` wait for room.
pub const EVENT_CAPACITY: usize = 16 * 1024;

/// One batch of subscription changes; the reconciler never sends more than
/// [`MAX_BATCH`] topics at once.
#[derive(Debug, Default, Clone)]
pub struct Changes {
    /// Topics to start holding.
    pub subscribe: Vec<Topic>,
    /// Topics to stop holding.
    pub unsubscribe: Vec<Topic>,
}

/// Most topics per broker command, as Centrifugo does: large enough to resync
/// thousands of subscriptions in a few round trips, small enough to keep a
/// single command's reply time short.
pub const MAX_BATCH: usize = 512;

/// Why a broker operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// Not connected (yet, or any more); the operation did not happen.
    #[error("broker unavailable")]
    Unavailable,
    /// The connection was lost while the operation was in flight.
    #[error("broker connection lost")]
    ConnectionLost,
    /// The broker refused the command.
    #[error("broker error: {0}")]
    Refused(String),
}

/// A node's link to the message broker.
///
/// Object-safe so the server picks the implementation at start-up; the futures
/// are boxed because they are off the hot path (subscribe changes and publishes,
/// not deliveries).
pub trait Broker: Send + Sync + 'static {
    /// Applies subscription changes on connection `generation` (from the last
    /// [`BrokerEvent::Up`] the hub processed), resolving once the broker
    /// confirmed all of them: after `Ok`, a message published to a subscribed
    /// topic is delivered. On any other connection it fails with `Unavailable`
    /// and sends nothing.
    fn apply(
        &self,
        generation: u64,
        changes: Changes,
    ) -> BoxFuture<'static, Result<(), BrokerError>>;

    /// Publishes one message; returns how many subscriptions (across all nodes)
    /// received it, as Redis's `PUBLISH` does.
    fn publish(
        &self,
        channel: Bytes,
        payload: Bytes,
    ) -> BoxFuture<'static, Result<u64, BrokerError>>;

    /// A short name for logs and metrics: `redis` or `memory`.
    fn name(&self) -> &'static str;
}
