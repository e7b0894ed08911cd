//! The broker: where subscriptions are mirrored and messages come from.
//!
//! A [`Broker`] holds one node's subscriptions (exact channels and glob
//! patterns) and publishes. It is told *what* to hold by the hub's reconciler
//! ([`Broker::apply`]), and reports what arrives as [`BrokerEvent`]s on a
//! bounded channel handed to it at construction. Two implementations:
//! [`redis`] (K pub/sub connections per node, shared by every node of a
//! cluster through Redis) and [`memory`] (in-process, for a single node with
//! no Redis).
//!
//! A broker may hold its topics over several *links* (the Redis broker's
//! pub/sub connections), each topic on exactly one ([`Broker::link_of`]).
//! Every link connects, fails and reconnects on its own and reports its own
//! `Up`/`Down`, so a link that fails interrupts only the topics it held;
//! the hub keeps a resync per link and never learns what a link is.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt};
use tokio::sync::mpsc;

use crate::history::{Position, Query, Read, Rules};
use crate::metrics::Metrics;
use crate::presence;

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
    /// The payload, untouched (for a history channel: what the envelope held).
    pub payload: Bytes,
    /// Its place in the channel's history: set by the hub for a history
    /// channel's enveloped message ([`crate::history`]), `None` otherwise.
    pub position: Option<Position>,
}

/// One message Redis delivered through a pattern that stands for several
/// client patterns (a *cover*, see `src/broker/redis/cover.rs`): the hub
/// delivers it to each of `patterns` that matches `channel`.
#[derive(Debug, Clone)]
pub struct CoveredMessage {
    /// The Redis pattern it arrived through; a client pattern of the same
    /// text needs no matching (Redis matched it).
    pub via: Bytes,
    /// The client patterns routed through `via` when it arrived (sorted).
    pub patterns: Arc<[Bytes]>,
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
    /// A message for whichever of several client patterns match it.
    Covered(CoveredMessage),
    /// Link `link` is connected and holds no subscriptions: everything the
    /// hub wants of that link's topics must be applied again, on this
    /// connection `generation`.
    Up {
        /// Which link ([`Broker::link_of`]).
        link: usize,
        /// Increases with every new connection of that link; [`Broker::apply`]
        /// names it.
        generation: u64,
    },
    /// Link `link`'s connection is gone; every subscription it held is lost
    /// until its next `Up`. Topics on other links are unaffected.
    Down {
        /// Which link.
        link: usize,
    },
    /// Link `link` is trying to connect again (after a `Down`, or at start).
    Reconnecting {
        /// Which link.
        link: usize,
    },
    /// Messages for these topics were dropped because the event channel was
    /// full (`None`: too many topics to list; treat as all). The hub tells the
    /// affected subscribers.
    Gap(Option<Vec<Topic>>),
}

/// The broker end of the event channel. Messages never wait: on a full
/// channel they are dropped, counted, and their topics remembered, and a
/// [`BrokerEvent::Gap`] naming them goes out before the next message that
/// fits, so no loss is silent. State events wait for room.
pub struct EventSink {
    tx: mpsc::Sender<BrokerEvent>,
    /// Messages handed over so far (dropped ones excluded), shared with the
    /// hub: a subscription started when this read `n` receives only messages
    /// the dispatcher dequeues after its `n`-th, i.e. those that reached the
    /// node after the subscribe reply was queued.
    queued: Arc<AtomicU64>,
    /// Topics that lost messages since the last `Gap` was sent; `None` once
    /// more than [`MAX_GAP_TOPICS`] distinct ones (then: all).
    dropped: Option<HashSet<Topic>>,
    /// True while `dropped` holds something not yet announced.
    pending_gap: bool,
    metrics: Metrics,
    /// Rewrites (or swallows) this sink's state events: set by a broker made
    /// of several ([`redis::shards`]), whose links the hub numbers as one set.
    remap: Option<StateMap>,
    /// Where state events go instead of the hub (after `remap`): a broker
    /// that derives the hub's link states from several connections'
    /// (Redis Cluster: one hub link per hash slot, [`redis::cluster`]).
    divert: Option<mpsc::Sender<BrokerEvent>>,
}

/// Turns one inner link's state event into the hub's view of it, or into
/// nothing (see [`EventSink::remapped`]).
pub type StateMap = Arc<dyn Fn(BrokerEvent) -> Option<BrokerEvent> + Send + Sync>;

/// Most distinct topics a gap remembers before it means "everything".
const MAX_GAP_TOPICS: usize = 4096;

/// The hub is gone: the broker should stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubGone;

impl EventSink {
    /// Wraps the sending side of the hub's event channel; `queued` counts
    /// the messages handed over (see the field's docs).
    pub fn new(
        tx: mpsc::Sender<BrokerEvent>,
        metrics: Metrics,
        queued: Arc<AtomicU64>,
    ) -> EventSink {
        EventSink {
            tx,
            queued,
            dropped: Some(HashSet::new()),
            pending_gap: false,
            metrics,
            remap: None,
            divert: None,
        }
    }

    /// This sink with every state event sent to `to` rather than to the hub
    /// (waiting for room there, as [`EventSink::state`] does); messages
    /// still go to the hub.
    pub fn diverted(mut self, to: mpsc::Sender<BrokerEvent>) -> EventSink {
        self.divert = Some(to);
        self
    }

    /// This sink with every state event passed through `remap` first: the
    /// link numbers of an inner broker become the outer broker's, and events
    /// the outer broker folds together are swallowed. Messages pass as they
    /// are (they name topics, not links).
    pub fn remapped(mut self, remap: StateMap) -> EventSink {
        self.remap = Some(remap);
        self
    }

    /// Another sink on the same channel and message count, with its own
    /// record of dropped topics: one per broker link, so that a link's
    /// `Down` clears only its own pending gap.
    pub fn sibling(&self) -> EventSink {
        let mut sink = EventSink::new(self.tx.clone(), self.metrics.clone(), self.queued.clone());
        sink.remap = self.remap.clone();
        sink.divert = self.divert.clone();
        sink
    }

    /// Hands over one message without waiting (see the type docs).
    pub fn message(&mut self, msg: BrokerMessage) -> Result<(), HubGone> {
        self.hand_over(BrokerEvent::Message(msg))
    }

    /// Hands over one message that stands for several client patterns,
    /// without waiting, like [`EventSink::message`]. When it is dropped,
    /// every pattern it could have reached is told about the gap: matching
    /// here would slow the reader down exactly when the node is overloaded.
    pub fn covered(&mut self, msg: CoveredMessage) -> Result<(), HubGone> {
        self.hand_over(BrokerEvent::Covered(msg))
    }

    /// Queues a message event, or drops it (counted, its topics remembered
    /// for the gap notice) when the channel is full or a gap is pending.
    fn hand_over(&mut self, event: BrokerEvent) -> Result<(), HubGone> {
        self.metrics.broker_messages.inc();
        self.flush_gap()?;
        if self.pending_gap {
            // The gap notice did not fit: this message would overtake it.
            self.drop_event(&event);
            return Ok(());
        }
        match self.tx.try_send(event) {
            Ok(()) => {
                self.queued.fetch_add(1, Ordering::Release);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(event)) => {
                self.drop_event(&event);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(HubGone),
        }
    }

    fn drop_event(&mut self, event: &BrokerEvent) {
        match event {
            BrokerEvent::Message(msg) => self.drop_message(msg.topic.clone()),
            BrokerEvent::Covered(msg) => self.drop_covered(msg),
            _ => {}
        }
    }

    fn drop_covered(&mut self, msg: &CoveredMessage) {
        self.metrics.broker_messages_dropped.inc();
        for pattern in msg.patterns.iter() {
            self.remember_dropped(Topic::Pattern(pattern.clone()));
        }
    }

    fn drop_message(&mut self, topic: Topic) {
        self.metrics.broker_messages_dropped.inc();
        self.remember_dropped(topic);
    }

    fn remember_dropped(&mut self, topic: Topic) {
        self.pending_gap = true;
        if let Some(set) = &mut self.dropped {
            set.insert(topic);
            if set.len() > MAX_GAP_TOPICS {
                self.dropped = None;
            }
        }
    }

    /// Announces dropped messages if there is room; called before every
    /// message and periodically, so a gap is announced even if traffic stops.
    pub fn flush_gap(&mut self) -> Result<(), HubGone> {
        if !self.pending_gap {
            return Ok(());
        }
        let topics = self
            .dropped
            .as_ref()
            .map(|set| set.iter().cloned().collect());
        match self.tx.try_send(BrokerEvent::Gap(topics)) {
            Ok(()) => {
                self.pending_gap = false;
                self.dropped = Some(HashSet::new());
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(HubGone),
        }
    }

    /// Sends a state event without waiting (a fresh channel has room); `false`
    /// if it could not be sent.
    pub fn try_state(&mut self, event: BrokerEvent) -> bool {
        match (self.remap(event), &self.divert) {
            (Some(event), Some(divert)) => divert.try_send(event).is_ok(),
            (Some(event), None) => self.tx.try_send(event).is_ok(),
            (None, _) => true,
        }
    }

    fn remap(&self, event: BrokerEvent) -> Option<BrokerEvent> {
        match &self.remap {
            Some(remap) => remap(event),
            None => Some(event),
        }
    }

    /// Sends a state event, waiting for room. `Down` supersedes any pending
    /// gap: the hub tells every subscriber about the outage anyway.
    pub async fn state(&mut self, event: BrokerEvent) -> Result<(), HubGone> {
        if matches!(event, BrokerEvent::Down { .. }) {
            self.pending_gap = false;
            self.dropped = Some(HashSet::new());
        }
        let to = self.divert.as_ref().unwrap_or(&self.tx);
        match self.remap(event) {
            Some(event) => to.send(event).await.map_err(|_| HubGone),
            None if self.tx.is_closed() => Err(HubGone),
            None => Ok(()),
        }
    }
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

/// What the broker did with a batch of [`Changes`] it answered.
#[derive(Debug, Default, Clone)]
pub struct Applied {
    /// Subscribes the broker refused (e.g. a Redis ACL), each with the reason
    /// its subscribers are given. Everything else in the batch was applied.
    pub refused: Vec<(Topic, String)>,
}

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

/// One message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// The channel it is published to.
    pub channel: Bytes,
    /// The bytes subscribers receive, untouched.
    pub payload: Bytes,
    /// With a key, a publication on the same channel with the same key within
    /// `WSGATE_IDEMPOTENCY_TTL_MS` of the first is not published again and
    /// returns the first one's receiver count, so a client may retry a
    /// publish whose outcome it does not know.
    pub idempotency_key: Option<Bytes>,
}

/// Why a publication was not confirmed. The HTTP API tells the caller which
/// of these may nevertheless have reached subscribers
/// ([`PublishError::maybe_published`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// Nothing was sent: surely not published.
    #[error("broker unavailable")]
    Unavailable,
    /// The connection failed after the message was sent: it may have been
    /// published (Redis may have run it and lost only the reply).
    #[error("broker connection lost after the message was sent: it may have been published")]
    Lost,
    /// Sent, but no reply came within the timeout: it may have been published.
    #[error("broker did not answer in time: the message may have been published")]
    TimedOut,
    /// The broker answered with an error: not published.
    #[error("broker refused the message: {0}")]
    Refused(String),
}

impl PublishError {
    /// True when the message may have reached subscribers although it was not
    /// confirmed: retry it only with an idempotency key.
    pub fn maybe_published(&self) -> bool {
        matches!(self, PublishError::Lost | PublishError::TimedOut)
    }

    /// What a client that published over its socket is told (any dialect):
    /// `broker unavailable` whenever the broker did not confirm, beside
    /// [`PublishError::maybe_published`] saying whether it may have gone out
    /// anyway, and Redis's refusal when Redis refused it (`not permitted by
    /// Redis` for an ACL's `NOPERM`), in the words a refused subscribe gets.
    /// Shorter than the `Display` text the HTTP API gives, which spells the
    /// uncertainty out in words.
    pub fn client_error(&self) -> std::borrow::Cow<'static, str> {
        match self {
            PublishError::Unavailable | PublishError::Lost | PublishError::TimedOut => {
                "broker unavailable".into()
            }
            PublishError::Refused(why) if why.starts_with("NOPERM") => redis::NOT_PERMITTED.into(),
            PublishError::Refused(why) => format!("refused by Redis: {why}").into(),
        }
    }
}

/// A node's link to the message broker.
///
/// Object-safe so the server picks the implementation at start-up; the futures
/// are boxed because they are off the hot path (subscribe changes and publishes,
/// not deliveries).
pub trait Broker: Send + Sync + 'static {
    /// Applies subscription changes on link `link`'s connection `generation`
    /// (from the last [`BrokerEvent::Up`] of that link the hub processed),
    /// resolving once the broker answered all of them: after `Ok`, a message
    /// published to a subscribed topic is delivered, except for the topics
    /// listed as refused. On any other connection it fails with
    /// `Unavailable` and sends nothing. Every topic in `changes` is on `link`.
    fn apply(
        &self,
        link: usize,
        generation: u64,
        changes: Changes,
    ) -> BoxFuture<'static, Result<Applied, BrokerError>>;

    /// How many links the broker spreads its topics over (at least 1): the
    /// hub keeps one link state and one resync per link.
    fn links(&self) -> usize {
        1
    }

    /// The link that holds `topic`, below [`Broker::links`]; stable for the
    /// life of the broker (the hub records it once per topic).
    fn link_of(&self, _topic: &Topic) -> usize {
        0
    }

    /// The Redis server that owns `channel` when the broker spreads channels
    /// over several (`WSGATE_REDIS_SHARDS`): its index and its
    /// `redis://host:port`, without credentials (`GET /shard`). `None` for a
    /// broker with one server.
    fn shard_of(&self, _channel: &[u8]) -> Option<(usize, String)> {
        None
    }

    /// Publishes one message; returns how many subscriptions (across all nodes)
    /// received it, as Redis's `PUBLISH` does.
    fn publish(&self, message: Publication) -> BoxFuture<'static, Result<u64, PublishError>> {
        let batch = self.publish_batch(vec![message]);
        async move {
            batch
                .await
                .into_iter()
                .next()
                .unwrap_or(Err(PublishError::Unavailable))
        }
        .boxed()
    }

    /// Publishes `messages` in order, in one round trip where the broker can
    /// (Redis: one pipeline); returns one result per message, in the same
    /// order. Only what surely did not reach the broker is retried, so no
    /// message is published twice by the gateway itself.
    fn publish_batch(
        &self,
        messages: Vec<Publication>,
    ) -> BoxFuture<'static, Vec<Result<u64, PublishError>>>;

    /// The `WSGATE_HISTORY` rules the broker keeps history for: the hub opens
    /// envelopes on these channels only.
    fn history(&self) -> &Rules;

    /// Reads `channel`'s history (a history channel: [`Broker::history`]
    /// has a rule for it), as `query` says.
    fn read_history(
        &self,
        channel: Bytes,
        query: Query,
    ) -> BoxFuture<'static, Result<Read, BrokerError>>;

    /// The `WSGATE_PRESENCE` rules: the hub opens join/leave envelopes on
    /// these channels only.
    fn presence(&self) -> &presence::Rules;

    /// Applies one node's presence batch (`docs/presence.md`): its member
    /// changes, its lease, its events; and reaps nodes whose lease ran out.
    /// By default: unavailable, for brokers that keep no presence (shards and
    /// Cluster refuse `WSGATE_PRESENCE` at start-up).
    fn sync_presence(
        &self,
        _batch: presence::Batch,
    ) -> BoxFuture<'static, Result<presence::Synced, BrokerError>> {
        async { Err(BrokerError::Unavailable) }.boxed()
    }

    /// The stored members of `channel` (leave events, see
    /// [`presence::stored`], their node stripped) whose node's lease holds.
    /// By default: unavailable, as [`Broker::sync_presence`].
    fn read_presence(
        &self,
        _channel: Bytes,
    ) -> BoxFuture<'static, Result<Vec<Bytes>, BrokerError>> {
        async { Err(BrokerError::Unavailable) }.boxed()
    }

    /// A short name for logs and metrics: `redis` or `memory`.
    fn name(&self) -> &'static str;
}
