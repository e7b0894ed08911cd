//! The hub: one node's registry of subscriptions, and the fan-out.
//!
//! Sessions add and remove themselves per topic; the hub refcounts by keeping
//! the members of each topic, and a single *reconciler* task brings the broker
//! in line with it (first member: subscribe; last one gone: unsubscribe) in
//! batches of up to [`MAX_BATCH`] topics, one batch in flight per broker link
//! (so K links resync side by side; a topic's commands stay in order because
//! a topic is on one link). A *dispatcher* task consumes the
//! broker's events in order: each message is rendered once per render key
//! and the same frame is pushed into every member's outbox, never waiting on
//! any of them. The hub never knows which dialect a member speaks; it only
//! holds the [`crate::protocol::Render`] trait object to render with.
//!
//! Nothing under the registry lock grows with the number of members of a
//! topic (see [`registry`]); how long the lock is held is measured
//! (`wsgate_hub_lock_hold_seconds`). Broker outages reach sessions as marks
//! in their queues ([`crate::outbox`]): one push per session.

mod heal;
pub mod publishes;
pub mod registry;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, info, warn, Instrument};

use crate::broker::{
    Applied, Broker, BrokerError, BrokerEvent, BrokerMessage, Changes, CoveredMessage, Topic,
    MAX_BATCH,
};
use crate::history::{self, Position, Query, Read, Rule};
use crate::metrics::Metrics;
use crate::outbox::{Out, Outbox, Pushed};
use crate::pattern_cost::Refusal;
use crate::presence;
use crate::protocol::{Frame, Notice, NoticeKind, Render};
use heal::Healer;
use publishes::Publishes;
pub use registry::{
    Admit, Confirmation, HeldDeliveries, Joined, LinkState, Member, Removed, Sub, MAX_HELD_BYTES,
    NOT_LIVE,
};
use registry::{Members, Registry, Step};

/// Pause after a failed broker apply before trying again, so that a broker
/// that refuses at once (disconnected) does not spin the reconciler; the
/// retry is normally triggered sooner by the broker's `Up` event anyway.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Most broker events the dispatcher takes per wake-up: amortises the channel
/// and lock costs over a burst while keeping each step short.
const DISPATCH_BATCH: usize = 256;

/// The `seq` of a gap notice: for every live subscription.
const ANY: u64 = NOT_LIVE - 1;

/// Reason given to the subscribers of the topics of a broker link that was
/// lost while the others carry on (the words a whole outage's notice uses).
pub const LINK_LOST: &str = "broker connection lost";

/// Reason given to subscribers of a message too large to deliver.
pub const TOO_LARGE: &str = "message too large";

/// Limits the hub applies to deliveries (from [`crate::Config`]).
#[derive(Debug, Clone, Copy)]
pub struct HubOptions {
    /// Largest delivery frame; a larger message is not delivered and its
    /// subscribers get a gap notice instead of being closed as slow.
    pub max_delivery_bytes: usize,
    /// How long gap healing waits for one channel's history read
    /// (`WSGATE_SUBSCRIBE_TIMEOUT_MS`); past it the channel is
    /// `recovered:false`.
    pub heal_timeout: Duration,
}

impl Default for HubOptions {
    fn default() -> Self {
        HubOptions {
            max_delivery_bytes: 1 << 20,
            heal_timeout: Duration::from_secs(5),
        }
    }
}

/// Cheap, clonable handle to the node's hub.
#[derive(Clone)]
pub struct Hub {
    shared: Arc<Shared>,
}

struct Shared {
    /// Registry behind a plain mutex: every critical section is a map update
    /// or a reference-count clone, never an await (clippy's
    /// `await_holding_lock` is denied crate-wide).
    registry: Mutex<Registry>,
    /// Every open session, for outage marks (O(1) per join and leave).
    sessions: Mutex<HashMap<u64, Arc<Member>>>,
    broker: Arc<dyn Broker>,
    /// Wakes the reconciler when a topic became dirty.
    dirty: Notify,
    /// Flips to `true` once, when the hub closes; both tasks watch it.
    closing: watch::Sender<bool>,
    next_member: AtomicU64,
    /// Messages the broker has queued to the dispatcher (see [`Sub`]).
    queued: Arc<AtomicU64>,
    /// Messages the dispatcher has taken, in the same order.
    dispatched: AtomicU64,
    /// Longest registry lock hold seen, in nanoseconds.
    longest_hold: AtomicU64,
    metrics: Metrics,
    options: HubOptions,
    /// Links whose resync just ended, for the dispatcher to heal (set by
    /// the reconciler; at most one flag per link).
    resynced: Mutex<Vec<bool>>,
    /// Wakes the dispatcher for `resynced`.
    heal_wake: Notify,
    /// Where heal reads report to the dispatcher.
    heal_reads: mpsc::Sender<HealRead>,
    /// Topics whose `resumed` the dispatcher sends after healing: left out
    /// of the notices of a link's resync.
    healing: Mutex<std::collections::HashSet<Topic>>,
    /// The node's presence, when `WSGATE_PRESENCE` names channels
    /// ([`Hub::start_presence`]).
    presence: std::sync::OnceLock<crate::presence::tracker::Tracker>,
    gauges: Gauges,
}

/// The hub's labelled gauges, resolved once. `with_label_values` hashes its
/// labels and takes the vector's lock on every call, and these are set after
/// every registry change, the broker ones under the registry lock: resolved
/// per call they were 7% of the node's CPU in a subscribe/unsubscribe churn.
struct Gauges {
    /// `wsgate_broker_subscriptions{kind="channel"|"pattern"}`.
    broker_channels: prometheus::IntGauge,
    broker_patterns: prometheus::IntGauge,
    /// `wsgate_local_subscriptions{kind="channel"|"pattern"}`.
    local_channels: prometheus::IntGauge,
    local_patterns: prometheus::IntGauge,
    /// `wsgate_broker_state{state}`, in [`LinkState::ALL`] order.
    states: [prometheus::IntGauge; 4],
}

impl Gauges {
    fn new(metrics: &Metrics) -> Gauges {
        let kind = |v: &prometheus::IntGaugeVec, k: &str| v.with_label_values(&[k]);
        Gauges {
            broker_channels: kind(&metrics.broker_subscriptions, "channel"),
            broker_patterns: kind(&metrics.broker_subscriptions, "pattern"),
            local_channels: kind(&metrics.local_subscriptions, "channel"),
            local_patterns: kind(&metrics.local_subscriptions, "pattern"),
            states: LinkState::ALL
                .map(|state| metrics.broker_state.with_label_values(&[state.as_str()])),
        }
    }

    /// `wsgate_local_subscriptions` of `topic`'s kind.
    fn local(&self, topic: &Topic) -> &prometheus::IntGauge {
        match topic {
            Topic::Pattern(_) => &self.local_patterns,
            Topic::Channel(_) => &self.local_channels,
        }
    }
}

/// One channel's heal read, answered: the channel, the plan generation it
/// was made for, and what it found.
type HealRead = (bytes::Bytes, u64, Result<Read, BrokerError>);

/// Heal reads a node makes side by side.
const HEAL_READS_AT_ONCE: usize = 16;

/// The registry, locked; measures how long it is held.
struct Locked<'a> {
    guard: MutexGuard<'a, Registry>,
    since: Instant,
    shared: &'a Shared,
}

impl std::ops::Deref for Locked<'_> {
    type Target = Registry;
    fn deref(&self) -> &Registry {
        &self.guard
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Registry {
        &mut self.guard
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let held = self.since.elapsed();
        let nanos = u64::try_from(held.as_nanos()).unwrap_or(u64::MAX);
        if self.shared.longest_hold.fetch_max(nanos, Ordering::Relaxed) < nanos {
            self.shared
                .metrics
                .hub_lock_hold_max
                .set(held.as_secs_f64());
        }
        self.shared
            .metrics
            .hub_lock_hold
            .observe(held.as_secs_f64());
    }
}

impl Hub {
    /// Starts the hub's reconciler and dispatcher over `broker`, whose events
    /// arrive on `events`; `queued` is the broker's count of messages queued
    /// there (from its [`crate::broker::EventSink`]). Both tasks end on
    /// [`Hub::close`].
    pub fn start(
        broker: Arc<dyn Broker>,
        events: mpsc::Receiver<BrokerEvent>,
        queued: Arc<AtomicU64>,
        metrics: Metrics,
        options: HubOptions,
    ) -> Hub {
        let router_broker = broker.clone();
        let registry = Registry::with_links(
            broker.links(),
            Arc::new(move |topic: &Topic| router_broker.link_of(topic)),
        );
        let links = registry.link_count();
        let (heal_reads, heal_rx) = mpsc::channel(HEAL_READS_AT_ONCE * 4);
        let gauges = Gauges::new(&metrics);
        let shared = Arc::new(Shared {
            registry: Mutex::new(registry),
            sessions: Mutex::new(HashMap::new()),
            broker,
            dirty: Notify::new(),
            closing: watch::Sender::new(false),
            next_member: AtomicU64::new(1),
            queued,
            dispatched: AtomicU64::new(0),
            longest_hold: AtomicU64::new(0),
            metrics,
            options,
            resynced: Mutex::new(vec![false; links]),
            heal_wake: Notify::new(),
            heal_reads,
            healing: Mutex::new(std::collections::HashSet::new()),
            presence: std::sync::OnceLock::new(),
            gauges,
        });
        tokio::spawn(reconcile(shared.clone()).instrument(tracing::info_span!("reconciler")));
        tokio::spawn(
            dispatch(shared.clone(), events, heal_rx).instrument(tracing::info_span!("dispatcher")),
        );
        Hub { shared }
    }

    /// A new session's place in the hub, until [`Hub::leave_node`].
    pub fn join_node(&self, outbox: Arc<Outbox>, render: Arc<dyn Render>) -> Arc<Member> {
        let member = Arc::new(Member {
            id: self.shared.next_member.fetch_add(1, Ordering::Relaxed),
            outbox,
            render,
        });
        self.shared.sessions().insert(member.id, member.clone());
        member
    }

    /// The session ended (after leaving every topic).
    pub fn leave_node(&self, member_id: u64) {
        self.shared.sessions().remove(&member_id);
    }

    /// Adds `member` to `topic`. On [`Joined::Active`] the caller queues its
    /// reply and then starts the subscription; on [`Joined::Pending`] it
    /// waits, then calls [`Hub::activate`].
    /// Refused (nothing changes) for a pattern new to a node that holds
    /// `WSGATE_MAX_PATTERNS` patterns already.
    pub fn subscribe(&self, member: &Arc<Member>, topic: Topic) -> Result<Joined, Refusal> {
        let local = self.shared.gauges.local(&topic).clone();
        let sub = Sub::new(member.clone(), self.shared.queued.clone());
        let joined = {
            let mut registry = self.shared.lock();
            let joined = registry.subscribe(sub, topic)?;
            self.shared.update_gauges(&registry);
            joined
        };
        local.inc();
        if matches!(joined, Joined::Pending(_)) {
            self.shared.dirty.notify_one();
        }
        Ok(joined)
    }

    /// Caps the distinct patterns this node holds (`WSGATE_MAX_PATTERNS`);
    /// set once at start-up, before any session.
    pub fn set_max_patterns(&self, max: usize) {
        self.shared.lock().set_max_patterns(max);
    }

    /// A pending subscribe was confirmed: become active (or wait again if the
    /// link dropped meanwhile). `None` if it is no longer waiting.
    pub fn activate(&self, member: &Arc<Member>, topic: &Topic) -> Option<Joined> {
        let sub = Sub::new(member.clone(), self.shared.queued.clone());
        let joined = {
            let mut registry = self.shared.lock();
            let joined = registry.activate(sub, topic);
            self.shared.update_gauges(&registry);
            joined
        };
        if matches!(joined, Some(Joined::Pending(_))) {
            self.shared.dirty.notify_one();
        }
        joined
    }

    /// Removes `member_id` from `topic`. (An active subscription's [`Sub`]
    /// is stopped by the caller first.)
    pub fn unsubscribe(&self, member_id: u64, topic: &Topic, active: Option<&Sub>) -> Removed {
        let removed = {
            let mut registry = self.shared.lock();
            let removed = registry.unsubscribe(member_id, topic, active);
            self.shared.update_gauges(&registry);
            removed
        };
        if removed != Removed::NotFound {
            self.left(topic);
        }
        removed
    }

    /// Withdraws a subscribe that is still waiting for the broker (its wait
    /// timed out); `false` if it was confirmed meanwhile (then activate it).
    pub fn cancel_pending(&self, member_id: u64, topic: &Topic) -> bool {
        let cancelled = {
            let mut registry = self.shared.lock();
            let cancelled = registry.cancel_pending(member_id, topic);
            self.shared.update_gauges(&registry);
            cancelled
        };
        if cancelled {
            self.left(topic);
        }
        cancelled
    }

    /// A member left `topic`: count it, and let the reconciler look.
    fn left(&self, topic: &Topic) {
        self.shared.gauges.local(topic).dec();
        self.shared.dirty.notify_one();
    }

    /// Publishes through the broker; returns the receiver count it reports.
    pub async fn publish(
        &self,
        message: crate::broker::Publication,
    ) -> Result<u64, crate::broker::PublishError> {
        self.shared.broker.publish(message).await
    }

    /// Publishes in order, in one broker round trip; one result per message.
    pub async fn publish_batch(
        &self,
        messages: Vec<crate::broker::Publication>,
    ) -> Vec<Result<u64, crate::broker::PublishError>> {
        self.shared.broker.publish_batch(messages).await
    }

    /// The `WSGATE_HISTORY` rule of `channel`, if it keeps history.
    pub fn history_rule(&self, channel: &[u8]) -> Option<Rule> {
        self.shared.broker.history().of(channel).cloned()
    }

    /// Reads `channel`'s history through the broker.
    pub async fn read_history(
        &self,
        channel: bytes::Bytes,
        query: Query,
    ) -> Result<Read, BrokerError> {
        self.shared.broker.read_history(channel, query).await
    }

    /// Starts the node's presence (`docs/presence.md`) when the broker has
    /// presence rules: `node` is `WSGATE_NODE_ID`, `lease` its lease.
    pub fn start_presence(&self, node: &str, lease: std::time::Duration) {
        if self.shared.broker.presence().is_empty() {
            return;
        }
        let tracker =
            crate::presence::tracker::Tracker::start(self.shared.broker.clone(), node, lease);
        let _ = self.shared.presence.set(tracker);
    }

    /// The node's presence tracker, when presence is on.
    pub fn presence(&self) -> Option<&crate::presence::tracker::Tracker> {
        self.shared.presence.get()
    }

    /// Whether `channel` keeps presence.
    pub fn has_presence(&self, channel: &[u8]) -> bool {
        self.shared.presence.get().is_some() && self.shared.broker.presence().covers(channel)
    }

    /// `channel`'s live members, cluster-wide.
    pub async fn read_presence(
        &self,
        channel: bytes::Bytes,
    ) -> Result<crate::presence::Members, BrokerError> {
        let read = self.shared.broker.read_presence(channel.clone()).await?;
        Ok(crate::presence::Members::from_read(&channel, &read))
    }

    /// The Redis server that owns `channel` when the broker shards channels
    /// over several ([`Broker::shard_of`]): `GET /shard`.
    pub fn shard_of(&self, channel: &[u8]) -> Option<(usize, String)> {
        self.shared.broker.shard_of(channel)
    }

    /// Broker connected and every wanted topic confirmed since: `/readyz`.
    pub fn is_ready(&self) -> bool {
        self.shared.lock().is_ready()
    }

    /// Stops both tasks; the broker is dropped with the last handle.
    pub fn close(&self) {
        self.shared.closing.send_replace(true);
    }
}

impl Shared {
    fn lock(&self) -> Locked<'_> {
        // Registry methods leave it consistent between statements that can
        // panic only on allocation failure; reuse it rather than cascade.
        let guard = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        Locked {
            guard,
            since: Instant::now(),
            shared: self,
        }
    }

    /// The number of the message event just taken, in the broker's queue
    /// order (see [`Sub`]).
    fn next_seq(&self) -> u64 {
        self.dispatched.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<u64, Arc<Member>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Mirrors the registry's counts and link state into gauges (a few
    /// atomic stores; called after every registry change).
    fn update_gauges(&self, registry: &Registry) {
        let held = registry.held();
        let g = &self.gauges;
        g.broker_channels.set(held.channels as i64);
        g.broker_patterns.set(held.patterns as i64);
        self.metrics.subscribes_held.set(registry.waiting() as i64);
        let link = registry.link();
        for (state, gauge) in LinkState::ALL.iter().zip(&g.states) {
            gauge.set(i64::from(*state == link));
        }
    }

    /// Places an outage mark in every session's queue; each session renders
    /// its notice from its own subscriptions.
    fn mark_all(&self, kind: NoticeKind) {
        let started = Instant::now();
        let members: Vec<Arc<Member>> = self.sessions().values().cloned().collect();
        for member in &members {
            member.outbox.mark(kind);
        }
        let took = started.elapsed();
        self.metrics.gap_marks_seconds.observe(took.as_secs_f64());
        debug!(
            sessions = members.len(),
            took_us = took.as_micros() as u64,
            ?kind,
            "gap marks placed"
        );
    }

    /// Tells the live members of one topic about a gap: the notice names one
    /// topic, so it is rendered once per render key.
    fn notify_topic(
        &self,
        topic: &Topic,
        subs: &[Arc<Sub>],
        kind: NoticeKind,
        reason: Option<&str>,
        recovered: Option<bool>,
    ) {
        let topics = std::slice::from_ref(topic);
        let notice = Notice {
            kind,
            topics,
            reason,
            recovered,
        };
        let mut rendered = Renders::default();
        for sub in subs {
            let Some(frame) = rendered.get(sub, |r| r.notice(&notice)) else {
                continue;
            };
            self.metrics.gap_notices.inc();
            if sub.member.outbox.push_live(frame, sub.since(), ANY, None) == Pushed::Overflowed {
                self.metrics.slow_consumer_closes.inc();
            }
        }
    }

    /// Applies one broker state event to the registry and tells whom it concerns.
    fn link_event(&self, event: BrokerEvent) {
        let mut registry = self.lock();
        let before = registry.link();
        let single = registry.link_count() == 1;
        let mut down = None;
        match event {
            BrokerEvent::Up { link, generation } => {
                registry.broker_up(link, generation);
                if generation > 1 {
                    self.metrics.broker_reconnects.inc();
                }
            }
            BrokerEvent::Down { link } => {
                registry.broker_down(link);
                down = Some(link);
            }
            BrokerEvent::Reconnecting { link } => registry.broker_reconnecting(link),
            BrokerEvent::Message(_) | BrokerEvent::Covered(_) | BrokerEvent::Gap(_) => {}
        }
        self.update_gauges(&registry);
        let after = registry.link();
        // A partial outage: who holds that link's topics, to tell them.
        let concerned = match down {
            Some(link) if !single => registry.members_of_link(link),
            _ => Vec::new(),
        };
        drop(registry);
        if before != after {
            match after {
                LinkState::Down => warn!(from = before.as_str(), "broker link down"),
                _ => info!(
                    from = before.as_str(),
                    to = after.as_str(),
                    "broker link state"
                ),
            }
        }
        if let Some(link) = down {
            if single {
                self.mark_all(NoticeKind::Interrupted);
            } else {
                warn!(link, topics = concerned.len(), "broker link down");
                self.notify_groups(concerned, NoticeKind::Interrupted, Some(LINK_LOST));
            }
        }
        self.dirty.notify_one();
    }

    /// Messages for `topics` were dropped: tell their subscribers both that
    /// delivery was interrupted and that it has resumed (it has: the drop was
    /// noticed because a later message got through).
    /// Topics the node can heal (history channels with a position) are told
    /// `interrupted` now and `resumed` once healed (`docs/history.md`).
    fn gap(self: &Arc<Self>, topics: Option<Vec<Topic>>, reason: &str, healer: &mut Healer) {
        let mut groups = self.lock().members_of(topics.as_deref());
        if !self.broker.history().is_empty() {
            let (heal, rest): (Vec<_>, Vec<_>) =
                groups.into_iter().partition(|(t, _)| healer.knows(t));
            groups = rest;
            for (topic, subs) in &heal {
                self.notify_topic(topic, subs, NoticeKind::Interrupted, Some(reason), None);
            }
            let planned = healer.plan(&heal, None);
            self.healing_topics().extend(planned);
            self.start_heal_reads(healer);
        }
        if groups.len() == 1 {
            for (topic, subs) in &groups {
                self.notify_topic(topic, subs, NoticeKind::Interrupted, Some(reason), None);
                self.notify_topic(topic, subs, NoticeKind::Resumed, None, None);
            }
            return;
        }
        let both = [
            (NoticeKind::Interrupted, Some(reason)),
            (NoticeKind::Resumed, None),
        ];
        self.notify_members(groups, &both);
    }

    /// Tells the members of `groups` (topics with their members) about
    /// `kind`: one notice per member naming its topics among them.
    fn notify_groups(&self, groups: Vec<(Topic, Members)>, kind: NoticeKind, reason: Option<&str>) {
        self.notify_members(groups, &[(kind, reason)]);
    }

    /// One notice per member and per `(kind, reason)` of `notices`, naming
    /// the member's topics among `groups`.
    fn notify_members(
        &self,
        groups: Vec<(Topic, Members)>,
        notices: &[(NoticeKind, Option<&str>)],
    ) {
        let mut per_member: HashMap<u64, (Arc<Sub>, Vec<Topic>)> = HashMap::new();
        for (topic, subs) in groups {
            for sub in subs.iter() {
                per_member
                    .entry(sub.member.id)
                    .or_insert_with(|| (sub.clone(), Vec::new()))
                    .1
                    .push(topic.clone());
            }
        }
        for (_, (sub, mut topics)) in per_member {
            topics.sort();
            for &(kind, why) in notices {
                let Some(frame) = sub.member.render.notice(&Notice {
                    kind,
                    topics: &topics,
                    reason: why,
                    recovered: None,
                }) else {
                    continue;
                };
                self.metrics.gap_notices.inc();
                if sub.member.outbox.push_live(frame, sub.since(), ANY, None) == Pushed::Overflowed
                {
                    self.metrics.slow_consumer_closes.inc();
                }
            }
        }
    }

    /// Fans one message out: rendered once per render key, cloned into each
    /// outbox. A frame over the delivery limit goes to nobody; its
    /// subscribers are told instead.
    /// `publish` numbers the publish the message belongs to
    /// ([`publishes`]): a member that takes one message per publish gets it once.
    fn deliver(&self, msg: &BrokerMessage, seq: u64, publish: u64, touched: &mut Vec<Arc<Member>>) {
        let Some(subs) = self.lock().receivers(&msg.topic) else {
            return;
        };
        self.deliver_to(msg, &subs, seq, publish, touched);
    }

    /// [`Shared::deliver`] to `subs` (the topic's members, or those a
    /// healed gap is for).
    fn deliver_to(
        &self,
        msg: &BrokerMessage,
        subs: &[Arc<Sub>],
        seq: u64,
        publish: u64,
        touched: &mut Vec<Arc<Member>>,
    ) {
        let mut rendered = Renders::default();
        let max = self.options.max_delivery_bytes;
        let mut too_large = false;
        for sub in subs.iter() {
            let Some(frame) = rendered.get(sub, |r| r.delivery(msg)) else {
                continue;
            };
            if frame.len() > max {
                too_large = true;
                continue;
            }
            if sub.recovering()
                && sub.admit(&frame, &msg.channel, msg.position.as_ref(), seq) == Admit::Taken
            {
                continue;
            }
            let once = sub.once.then_some(publish);
            match sub
                .member
                .outbox
                .push_deferred(frame, sub.since(), seq, once)
            {
                Pushed::Overflowed => self.metrics.slow_consumer_closes.inc(),
                Pushed::Deferred => touched.push(sub.member.clone()),
                Pushed::Queued | Pushed::Refused => {}
            }
        }
        if too_large {
            self.metrics.deliveries_too_large.inc();
            debug!(bytes = msg.payload.len(), "message too large to deliver");
            let over: Vec<Arc<Sub>> = subs
                .iter()
                .filter(|s| {
                    rendered
                        .peek(s)
                        .is_some_and(|f| f.as_ref().is_some_and(|f| f.len() > max))
                })
                .cloned()
                .collect();
            self.notify_topic(
                &msg.topic,
                &over,
                NoticeKind::Interrupted,
                Some(TOO_LARGE),
                None,
            );
            self.notify_topic(&msg.topic, &over, NoticeKind::Resumed, None, None);
        }
    }
}

impl Shared {
    /// Whether a message is a presence channel's join or leave event
    /// (`docs/presence.md`): the envelope on a channel with presence.
    fn is_presence_event(&self, channel: &[u8], payload: &[u8]) -> bool {
        payload.starts_with(presence::MAGIC)
            && self.presence.get().is_some()
            && self.broker.presence().covers(channel)
    }

    /// Fans a join or leave event out to the channel's subscribers that
    /// asked for them (`join_leave`), rendered once per render key.
    fn deliver_event(&self, msg: &BrokerMessage, seq: u64, touched: &mut Vec<Arc<Member>>) {
        let Some(subs) = self.lock().receivers(&msg.topic) else {
            return;
        };
        let event = &msg.payload[presence::MAGIC.len()..];
        let mut rendered = Renders::default();
        for sub in subs.iter().filter(|s| s.join_leave()) {
            let Some(frame) = rendered.get(sub, |r| r.presence_event(&msg.channel, event)) else {
                continue;
            };
            if sub.recovering() && sub.admit(&frame, &msg.channel, None, seq) == Admit::Taken {
                continue;
            }
            match sub
                .member
                .outbox
                .push_deferred(frame, sub.since(), seq, None)
            {
                Pushed::Overflowed => self.metrics.slow_consumer_closes.inc(),
                Pushed::Deferred => touched.push(sub.member.clone()),
                Pushed::Queued | Pushed::Refused => {}
            }
        }
    }

    /// The position and payload of a history channel's enveloped message;
    /// `None` for anything else (delivered as it came). An envelope on a
    /// channel without history is not opened: it is some other
    /// publisher's bytes (`docs/history.md`, "What a plain publisher can do").
    fn open(&self, channel: &[u8], payload: &bytes::Bytes) -> Option<(Position, bytes::Bytes)> {
        if !payload.starts_with(history::MAGIC) {
            return None;
        }
        self.broker.history().of(channel)?;
        history::open(payload)
    }
}

/// Frames rendered for one message, one per render key seen so far (a
/// handful at most: linear search beats hashing). `None` is remembered too:
/// a key that does not take the message is asked once.
#[derive(Default)]
struct Renders {
    frames: Vec<(&'static str, Option<Frame>)>,
}

impl Renders {
    fn get(
        &mut self,
        sub: &Sub,
        render: impl FnOnce(&dyn Render) -> Option<Frame>,
    ) -> Option<Frame> {
        if let Some(frame) = self.peek(sub) {
            return frame.clone();
        }
        let frame = render(sub.member.render.as_ref());
        self.frames.push((sub.key, frame.clone()));
        frame
    }

    fn peek(&self, sub: &Sub) -> Option<&Option<Frame>> {
        self.frames
            .iter()
            .find(|(k, _)| std::ptr::eq(*k, sub.key) || *k == sub.key)
            .map(|(_, f)| f)
    }
}

impl Shared {
    /// Writes the direct outboxes a batch filled: what the batch brought
    /// for a socket goes out in one write. Where the socket was full or a
    /// gap mark waits, its session is woken to finish.
    fn write_out(&self, touched: &mut Vec<Arc<Member>>) {
        for member in touched.drain(..) {
            let (frames, out) = member.outbox.write_out();
            self.metrics.frames_out.inc_by(frames);
            if out != Out::Done {
                member.outbox.wake();
            }
        }
    }

    /// A message that came through a Redis pattern standing for several
    /// client patterns: delivered to each that matches, as Redis itself
    /// would have decided (`crate::pattern` is its matcher byte for byte).
    /// Each matching pattern is one subscription, rendered once per dialect,
    /// exactly as if Redis had sent one `pmessage` per pattern.
    fn deliver_covered(
        &self,
        msg: &CoveredMessage,
        position: Option<&Position>,
        (seq, publish): (u64, u64),
        healer: &mut Healer,
        touched: &mut Vec<Arc<Member>>,
    ) {
        for pattern in msg.patterns.iter() {
            if *pattern == msg.via || crate::pattern::matches(pattern, &msg.channel) {
                let one = BrokerMessage {
                    topic: Topic::Pattern(pattern.clone()),
                    channel: msg.channel.clone(),
                    payload: msg.payload.clone(),
                    position: position.cloned(),
                };
                self.take(one, seq, publish, healer, touched);
            }
        }
    }
}

/// What one in-flight reconciler job ended with.
enum Done {
    /// A batch of `link` was answered.
    Applied {
        link: usize,
        generation: u64,
        changes: Changes,
        result: Result<Applied, BrokerError>,
    },
    /// A failed link's pause is over.
    Paused(usize),
}

/// Most batches in flight across all links. One batch per link keeps each
/// topic's commands in order; this bound across links is what lets changes
/// made while batches are answered net out (a topic unsubscribed and
/// resubscribed meanwhile sends nothing), as they do with one link, instead
/// of each change going out alone to an idle link. Eight batches of
/// [`MAX_BATCH`] still keep Redis busy through a resync (measured in
/// `docs/benchmarks.md`, "Pattern resync over K connections").
const MAX_IN_FLIGHT: usize = 8;

/// Brings the broker in line with the registry, one batch per link at a
/// time (links side by side, at most [`MAX_IN_FLIGHT`] at once). Being a
/// single task that never has two batches of one link in flight is what
/// keeps each topic's commands in the order decided.
async fn reconcile(shared: Arc<Shared>) {
    let mut closing = shared.closing.subscribe();
    let links = shared.lock().link_count();
    let mut busy = vec![false; links];
    let mut in_flight = 0usize;
    let mut jobs = FuturesUnordered::new();
    // Links to look at, first come first served so that none waits behind
    // busier ones: at start every one, then those the registry queued and
    // each link whose batch was just answered.
    let mut waiting = std::collections::VecDeque::with_capacity(links);
    let mut queued = vec![false; links];
    let mut also: Vec<usize> = (0..links).collect();
    loop {
        let steps: Vec<Step> = {
            let mut registry = shared.lock();
            for l in registry.links_to_visit().into_iter().chain(also.drain(..)) {
                if !std::mem::replace(&mut queued[l], true) {
                    waiting.push_back(l);
                }
            }
            let mut steps = Vec::new();
            let mut slots = MAX_IN_FLIGHT.saturating_sub(in_flight);
            while slots > 0 {
                let Some(l) = waiting.pop_front() else { break };
                queued[l] = false;
                if busy[l] {
                    // Looked at again when its batch is answered.
                    continue;
                }
                let step = registry.take_changes(l, MAX_BATCH);
                if !step.changes.subscribe.is_empty() || !step.changes.unsubscribe.is_empty() {
                    slots -= 1;
                } else if step.resynced.is_none() && step.node_resynced.is_none() {
                    continue;
                }
                steps.push(step);
            }
            shared.update_gauges(&registry);
            steps
        };
        for step in steps {
            if step.resynced.is_some() {
                shared.link_resynced(step.link, links);
            }
            if let Some(took) = step.node_resynced {
                shared
                    .metrics
                    .broker_resync_seconds
                    .observe(took.as_secs_f64());
                info!(took_ms = took.as_millis() as u64, "broker link resynced");
            }
            let (link, generation, changes) = (step.link, step.generation, step.changes);
            if changes.subscribe.is_empty() && changes.unsubscribe.is_empty() {
                continue;
            }
            debug!(
                link,
                subscribe = changes.subscribe.len(),
                unsubscribe = changes.unsubscribe.len(),
                "applying"
            );
            busy[link] = true;
            in_flight += 1;
            let apply = shared.broker.apply(link, generation, changes.clone());
            jobs.push(Box::pin(async move {
                Done::Applied {
                    link,
                    generation,
                    changes,
                    result: apply.await,
                }
            })
                as futures_util::future::BoxFuture<'static, Done>);
        }
        let done = tokio::select! {
            Some(done) = jobs.next(), if !jobs.is_empty() => done,
            _ = shared.dirty.notified() => continue,
            _ = closing.wait_for(|c| *c) => return,
        };
        match done {
            Done::Paused(link) => {
                busy[link] = false;
                also.push(link);
            }
            Done::Applied {
                link,
                generation,
                changes,
                result,
            } => {
                in_flight -= 1;
                if shared.applied(link, generation, &changes, result) {
                    // Failed: the link is down or going; wait a little before
                    // its next batch (its `Up` normally comes first anyway).
                    jobs.push(Box::pin(async move {
                        tokio::time::sleep(RETRY_PAUSE).await;
                        Done::Paused(link)
                    }));
                } else {
                    busy[link] = false;
                    also.push(link);
                }
            }
        }
    }
}

impl Shared {
    /// Link `link` (of `links`) is caught up again: its subscribers are told
    /// delivery has resumed (every session at once when there is one link).
    /// Topics being healed are left out: the dispatcher tells them once
    /// healed, and is woken here to start their reads.
    fn link_resynced(&self, link: usize, links: usize) {
        if links == 1 {
            self.mark_all(NoticeKind::Resumed);
        } else {
            let mut groups = self.lock().members_of_link(link);
            {
                let healing = self.healing_topics();
                if !healing.is_empty() {
                    groups.retain(|(t, _)| !healing.contains(t));
                }
            }
            info!(link, topics = groups.len(), "broker link caught up");
            self.notify_groups(groups, NoticeKind::Resumed, None);
        }
        if !self.broker.history().is_empty() {
            if let Some(flag) = self.resynced_links().get_mut(link) {
                *flag = true;
            }
            self.heal_wake.notify_one();
        }
    }

    /// Records a batch's answer and tells whom it concerns; `true` if the
    /// batch failed.
    fn applied(
        &self,
        link: usize,
        generation: u64,
        changes: &Changes,
        result: Result<Applied, BrokerError>,
    ) -> bool {
        let failed = result.is_err();
        match &result {
            Err(e) => debug!(link, cause = %e, "apply failed; will retry after reconnect"),
            Ok(applied) => {
                for (topic, why) in &applied.refused {
                    warn!(topic = %String::from_utf8_lossy(topic.name()), kind = topic.kind(), reason = %why, "broker refused a subscription");
                    self.metrics.broker_refusals.inc();
                }
            }
        }
        let done = {
            let mut registry = self.lock();
            let done = registry.complete(link, generation, changes, result);
            self.update_gauges(&registry);
            done
        };
        for (round, answer) in done.answers {
            round.send_replace(Some(answer));
        }
        for (kind, n) in done.refused_waiters {
            self.metrics
                .local_subscriptions
                .with_label_values(&[kind])
                .sub(n as i64);
        }
        drop(done.dropped);
        for (topic, subs, why) in done.refused_active {
            self.notify_topic(&topic, &subs, NoticeKind::Interrupted, Some(&why), None);
        }
        failed
    }
}

/// Gap healing's I/O and deliveries; the bookkeeping is [`heal::Healer`],
/// owned by the dispatcher.
impl Shared {
    fn healing_topics(&self) -> MutexGuard<'_, std::collections::HashSet<Topic>> {
        self.healing.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn resynced_links(&self) -> MutexGuard<'_, Vec<bool>> {
        self.resynced.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A message from the broker, in order: held or dropped while its
    /// channel heals, else delivered and its position remembered.
    fn take(
        &self,
        msg: BrokerMessage,
        seq: u64,
        publish: u64,
        healer: &mut Healer,
        touched: &mut Vec<Arc<Member>>,
    ) {
        let msg = if healer.is_idle() {
            msg
        } else {
            match healer.take(msg, seq, publish) {
                Some(msg) => msg,
                None => return,
            }
        };
        self.deliver(&msg, seq, publish, touched);
        if msg.position.is_some() {
            healer.record(&msg, |seen| {
                let registry = self.lock();
                seen.retain(|t, _| registry.is_wanted(t));
            });
        }
    }

    /// Link `link` went down: its topics with a position are healed when
    /// it is back. With one link the sessions render `resumed` from a mark,
    /// so those subscriptions are flagged for the session to leave out.
    fn plan_outage(&self, link: usize, healer: &mut Healer) {
        if self.broker.history().is_empty() {
            return;
        }
        let (groups, single) = {
            let registry = self.lock();
            (registry.members_of_link(link), registry.link_count() == 1)
        };
        let planned = healer.plan(&groups, Some(link));
        if planned.is_empty() {
            return;
        }
        if single {
            for (topic, subs) in &groups {
                if planned.contains(topic) {
                    subs.iter().for_each(|s| s.set_healing());
                }
            }
        }
        debug!(link, topics = planned.len(), "gap healing planned");
        self.healing_topics().extend(planned);
    }

    /// Starts the reads of every channel ready to heal, side by side
    /// ([`HEAL_READS_AT_ONCE`]), each bounded by the heal timeout; their
    /// answers come back to the dispatcher.
    fn start_heal_reads(self: &Arc<Self>, healer: &mut Healer) {
        let reads = healer.reads_due();
        if reads.is_empty() {
            return;
        }
        debug!(channels = reads.len(), "gap healing reads");
        let shared = self.clone();
        tokio::spawn(async move {
            let timeout = shared.options.heal_timeout;
            let mut answers = futures_util::stream::iter(reads)
                .map(|(channel, query, generation)| {
                    let broker = shared.broker.clone();
                    async move {
                        let read = tokio::time::timeout(
                            timeout,
                            read_until_connected(&*broker, &channel, query),
                        )
                        .await
                        .unwrap_or(Err(BrokerError::Unavailable));
                        (channel, generation, read)
                    }
                })
                .buffer_unordered(HEAL_READS_AT_ONCE);
            while let Some(answer) = answers.next().await {
                if shared.heal_reads.send(answer).await.is_err() {
                    return;
                }
            }
        });
    }

    /// A heal read is in: the missed messages to the members that missed
    /// them, the held live ones after, then the `resumed` of each topic
    /// whose every channel is done.
    fn healed(
        &self,
        (channel, generation, read): HealRead,
        healer: &mut Healer,
        publishes: &mut Publishes,
        touched: &mut Vec<Arc<Member>>,
    ) {
        if let Err(e) = &read {
            warn!(channel = %String::from_utf8_lossy(&channel), cause = %e, "gap healing read failed");
        }
        let Some(out) = healer.release(&channel, generation, read) else {
            return;
        };
        self.metrics.gap_healed.inc_by(out.healed.len() as u64);
        for (msg, members) in &out.healed {
            let via = match &msg.topic {
                Topic::Pattern(p) => Some(p),
                Topic::Channel(_) => None,
            };
            let publish = publishes.number(via, &msg.channel, &msg.payload);
            self.deliver_to(msg, members, ANY, publish, touched);
        }
        for held in out.held {
            self.take(held.msg, held.seq, held.publish, healer, touched);
        }
        for (topic, members, recovered) in out.resumed {
            self.healing_topics().remove(&topic);
            self.notify_topic(&topic, &members, NoticeKind::Resumed, None, Some(recovered));
        }
    }
}

/// Longest pause between two tries of a heal read whose connection is
/// not back yet.
const HEAL_RETRY_MAX: Duration = Duration::from_millis(400);

/// Reads `channel`'s history, trying again while the broker's read
/// connection is still reconnecting (the pub/sub link can be back first);
/// the caller bounds it with the heal timeout.
async fn read_until_connected(
    broker: &dyn Broker,
    channel: &bytes::Bytes,
    query: Query,
) -> Result<Read, BrokerError> {
    let mut pause = Duration::from_millis(25);
    loop {
        match broker.read_history(channel.clone(), query.clone()).await {
            Err(BrokerError::Unavailable | BrokerError::ConnectionLost) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(HEAL_RETRY_MAX);
            }
            other => return other,
        }
    }
}

/// Consumes broker events in order: messages fan out, `Up`/`Down` update the
/// registry. Per-channel order holds because there is one consumer.
async fn dispatch(
    shared: Arc<Shared>,
    mut events: mpsc::Receiver<BrokerEvent>,
    mut heal_reads: mpsc::Receiver<HealRead>,
) {
    let mut closing = shared.closing.subscribe();
    let mut batch = Vec::with_capacity(DISPATCH_BATCH);
    let mut publishes = Publishes::default();
    let mut healer = Healer::default();
    // Direct outboxes given deliveries in this batch, written at its end.
    let mut touched = Vec::new();
    loop {
        tokio::select! {
            n = events.recv_many(&mut batch, DISPATCH_BATCH) => {
                if n == 0 {
                    return; // the broker is gone
                }
            }
            Some(read) = heal_reads.recv() => {
                shared.healed(read, &mut healer, &mut publishes, &mut touched);
            }
            _ = shared.heal_wake.notified() => {
                let links: Vec<usize> = {
                    let mut flags = shared.resynced_links();
                    (0..flags.len()).filter(|&l| std::mem::take(&mut flags[l])).collect()
                };
                for link in links {
                    healer.resynced(link);
                }
                shared.start_heal_reads(&mut healer);
            }
            _ = closing.wait_for(|c| *c) => return,
        }
        for event in batch.drain(..) {
            match event {
                BrokerEvent::Message(mut msg) => {
                    let pattern = match &msg.topic {
                        Topic::Pattern(p) => Some(p),
                        Topic::Channel(_) => None,
                    };
                    if shared.is_presence_event(&msg.channel, &msg.payload) {
                        if pattern.is_none() {
                            let seq = shared.next_seq();
                            shared.deliver_event(&msg, seq, &mut touched);
                        }
                        continue;
                    }
                    let publish = publishes.number(pattern, &msg.channel, &msg.payload);
                    if let Some((position, payload)) = shared.open(&msg.channel, &msg.payload) {
                        msg.position = Some(position);
                        msg.payload = payload;
                    }
                    let seq = shared.next_seq();
                    shared.take(msg, seq, publish, &mut healer, &mut touched);
                }
                BrokerEvent::Covered(mut msg) => {
                    if shared.is_presence_event(&msg.channel, &msg.payload) {
                        continue; // join/leave go to channel subscribers only
                    }
                    let publish = publishes.number(Some(&msg.via), &msg.channel, &msg.payload);
                    let mut position = None;
                    if let Some((at, payload)) = shared.open(&msg.channel, &msg.payload) {
                        position = Some(at);
                        msg.payload = payload;
                    }
                    let seq = shared.next_seq();
                    shared.deliver_covered(
                        &msg,
                        position.as_ref(),
                        (seq, publish),
                        &mut healer,
                        &mut touched,
                    );
                }
                BrokerEvent::Gap(topics) => {
                    shared.gap(topics, "messages dropped: node overloaded", &mut healer)
                }
                state => {
                    let down = match &state {
                        BrokerEvent::Down { link } => Some(*link),
                        _ => None,
                    };
                    shared.link_event(state);
                    if let Some(link) = down {
                        shared.plan_outage(link, &mut healer);
                    }
                }
            }
        }
        write_out(&shared, &mut touched).await;
    }
}

/// Most sockets one core writes at the end of a dispatch batch: past this,
/// the other half goes to a second thread, so a message to many sockets
/// uses both cores (issue 13). Order per socket holds whoever writes: a
/// socket's writes start at its queue's front, under its lock.
const SPLIT_WRITES: usize = 512;

/// Writes what a dispatch batch queued for direct sockets
/// ([`Shared::write_out`]), split over two threads when there are many;
/// returns once both halves are written, so the next batch's deliveries
/// never overtake this one's on any socket.
async fn write_out(shared: &Arc<Shared>, touched: &mut Vec<Arc<Member>>) {
    if touched.len() < SPLIT_WRITES {
        shared.write_out(touched);
        return;
    }
    let mut half = touched.split_off(touched.len() / 2);
    let other = shared.clone();
    // A blocking-pool thread, not a spawned task: a task spawned from here
    // would wait in this worker's LIFO slot, where no other worker steals it.
    let task = tokio::task::spawn_blocking(move || other.write_out(&mut half));
    shared.write_out(touched);
    if let Err(e) = task.await {
        warn!(cause = %e, "a fan-out writer failed");
    }
}
