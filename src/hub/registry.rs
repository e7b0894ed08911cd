//! The hub's bookkeeping: who wants what, and what the broker holds.
//!
//! Pure data, no I/O, no tasks: the [`super::Hub`] wraps it in a mutex and
//! drives it. Each topic has an [`Entry`] with its local members and the
//! broker's state for it. Changes do not call the broker directly; they mark
//! the topic *dirty*, and the hub's single reconciler later compares what is
//! wanted (at least one member) with what the broker holds and issues the
//! difference. Because that comparison is made when the command is sent, not
//! when the change happened, no interleaving of subscribes, unsubscribes and
//! disconnects can leave Redis holding a topic nobody wants, or miss one that
//! somebody does; a reconnect is just "every topic is dirty".
//!
//! Every operation under the lock is O(1) per topic touched, whatever the
//! number of members: a join or leave updates an index and a copy-on-write
//! member list (cloned only when the dispatcher is iterating the same list at
//! that moment, so at most once per delivery), and a broker outage touches
//! each topic once and no member at all (the hub then marks each session's
//! queue; the sessions render their own notices).
//!
//! The registry also holds each broker link's [`LinkState`] and the progress
//! of its resync, which is bounded: it ends when every topic of the link
//! wanted at the reconnect has been answered, however much churn continues
//! meanwhile. Every topic is on one link (the broker says which, once, when
//! the topic's entry is made); a link's `Up`/`Down` touches its topics only.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;

use crate::broker::{Applied, BrokerError, Changes, Topic};
use crate::history::Position;
use crate::outbox::Outbox;
use crate::pattern_cost::{self, Refusal};
use crate::protocol::{Frame, Render};

/// One session as the hub sees it: where to put frames, and how to render them.
pub struct Member {
    /// Unique per session for the life of the process.
    pub id: u64,
    /// The session's outbound queue.
    pub outbox: Arc<Outbox>,
    /// Renders deliveries for this session.
    pub render: Arc<dyn Render>,
}

/// One member's place in one topic: what the dispatcher iterates.
///
/// `since` says which messages it receives: none ([`NOT_LIVE`]) until the
/// session has queued its subscribe reply, then every message the node
/// received after that moment (the dispatcher numbers messages in the order
/// the broker queued them), until it is stopped again before the unsubscribe
/// reply is queued. Deliveries check it under the outbox lock
/// ([`Outbox::push_live`]), which orders deliveries and replies exactly,
/// without the registry lock.
pub struct Sub {
    /// The subscriber.
    pub member: Arc<Member>,
    /// Members with the same key share one rendered frame per message.
    pub key: &'static str,
    /// The member takes one message per publish (its render says so).
    pub once: bool,
    since: AtomicU64,
    /// Its position in its topic's member list (written under the registry
    /// lock only): removal is a swap-remove with no index map to grow.
    pos: AtomicUsize,
    /// The broker's count of queued messages, read when starting.
    queued: Arc<AtomicU64>,
    /// Set once, before [`Sub::start`], by a subscribe that recovers
    /// history (`since`): see [`Recovery`]. Boxed: every subscription pays
    /// for the empty cell, only recovering ones for the state.
    recovery: OnceLock<Box<Recovery>>,
    /// Set by the hub when an outage of this subscription is being healed
    /// (`super::heal`): its `resumed` comes from the hub, after the healed
    /// messages, so the session leaves it out of the one it renders.
    healing: AtomicBool,
    /// Receives the channel's join and leave events (`"join_leave":true`
    /// on a presence channel); set before [`Sub::start`].
    join_leave: std::sync::atomic::AtomicBool,
}

/// Most bytes of live deliveries a recovering subscription holds while its
/// history read is in flight; beyond, it drops them and the recovery is
/// reported `recovered:false` (the client refetches).
pub const MAX_HELD_BYTES: usize = 4 << 20;

/// A subscription that recovers history: from [`Sub::start`] until the
/// session's history read is answered, live deliveries are *held* here
/// (the read and the live stream overlap); [`Sub::release`] then queues,
/// under this lock, the recovered messages and the held ones not already
/// among them, so no delivery overtakes them. Afterwards a delivery at or
/// below the recovered position (same epoch) is skipped: a message the read
/// returned may still arrive live, later, from Redis.
pub struct Recovery {
    state: Mutex<RecoveryState>,
}

struct RecoveryState {
    /// `Some` while holding.
    held: Option<HeldDeliveries>,
    /// After release, per recovered channel: deliveries at or below it
    /// are duplicates.
    floors: Vec<(Bytes, Position)>,
}

/// Live deliveries held during a recovery read.
#[derive(Default)]
pub struct HeldDeliveries {
    /// The frames in delivery order, with their channels and positions.
    pub frames: Vec<(Frame, Bytes, Option<Position>)>,
    bytes: usize,
    /// More than [`MAX_HELD_BYTES`] arrived: `frames` is incomplete (emptied).
    pub overflowed: bool,
}

/// What the dispatcher does with one delivery to a recovering subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Queue it as usual.
    Push,
    /// Held (or dropped as a duplicate): nothing more to do.
    Taken,
}

/// `Sub::since` of a subscription that receives nothing.
pub const NOT_LIVE: u64 = u64::MAX;

impl Sub {
    /// A subscription that receives nothing until [`Sub::start`].
    pub fn new(member: Arc<Member>, queued: Arc<AtomicU64>) -> Arc<Sub> {
        let key = member.render.key();
        let once = member.render.once_per_publish();
        Arc::new(Sub {
            member,
            key,
            once,
            since: AtomicU64::new(NOT_LIVE),
            pos: AtomicUsize::new(usize::MAX),
            queued,
            recovery: OnceLock::new(),
            healing: AtomicBool::new(false),
            join_leave: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// From now on this subscription receives join and leave events.
    pub fn want_join_leave(&self) {
        self.join_leave.store(true, Ordering::Relaxed);
    }

    /// Whether it receives join and leave events.
    pub fn join_leave(&self) -> bool {
        self.join_leave.load(Ordering::Relaxed)
    }

    /// Holds live deliveries from [`Sub::start`] on until [`Sub::release`]
    /// (call before starting).
    pub fn recover(&self) {
        let _ = self.recovery.set(Box::new(Recovery {
            state: Mutex::new(RecoveryState {
                held: Some(HeldDeliveries::default()),
                floors: Vec::new(),
            }),
        }));
    }

    /// True for a subscription that recovered (or is recovering) history:
    /// its deliveries go through [`Sub::admit`].
    pub fn recovering(&self) -> bool {
        self.recovery.get().is_some()
    }

    /// Decides one delivery (`seq`, at `position`) of a recovering
    /// subscription: held while the read is in flight, skipped when at or
    /// below the recovered position, else pushed as usual.
    pub fn admit(
        &self,
        frame: &Frame,
        channel: &Bytes,
        position: Option<&Position>,
        seq: u64,
    ) -> Admit {
        let Some(recovery) = self.recovery.get() else {
            return Admit::Push;
        };
        let mut state = recovery.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = &mut state.held {
            if seq <= self.since.load(Ordering::Acquire) || held.overflowed {
                return Admit::Taken;
            }
            held.bytes += frame.len();
            if held.bytes > MAX_HELD_BYTES {
                held.overflowed = true;
                held.frames = Vec::new();
            } else {
                held.frames
                    .push((frame.clone(), channel.clone(), position.cloned()));
            }
            return Admit::Taken;
        }
        let Some(p) = position else {
            return Admit::Push;
        };
        let duplicate = state
            .floors
            .iter()
            .any(|(c, f)| c == channel && p.epoch == f.epoch && p.offset <= f.offset);
        if duplicate {
            Admit::Taken
        } else {
            Admit::Push
        }
    }

    /// Ends the hold: `queue` gets what was held and queues it, with the
    /// recovered messages before it, while deliveries wait; from then on
    /// deliveries at or below a channel's floor are skipped.
    pub fn release(&self, floors: Vec<(Bytes, Position)>, queue: impl FnOnce(HeldDeliveries)) {
        let Some(recovery) = self.recovery.get() else {
            return;
        };
        let mut state = recovery.state.lock().unwrap_or_else(|p| p.into_inner());
        let held = state.held.take().unwrap_or_default();
        queue(held);
        state.floors = floors;
    }

    /// The hub heals this subscription's current gap and will send its
    /// `resumed` itself.
    pub fn set_healing(&self) {
        self.healing.store(true, Ordering::Release);
    }

    /// Whether the hub sends this subscription's next `resumed` (asked once
    /// per `resumed` the session renders: the answer is consumed).
    pub fn take_healing(&self) -> bool {
        self.healing.swap(false, Ordering::AcqRel)
    }

    /// Deliveries may flow, for messages the node receives from now on (call
    /// after queuing the subscribe reply).
    pub fn start(&self) {
        let now = self.queued.load(Ordering::Acquire);
        self.since.store(now, Ordering::Release);
    }

    /// No delivery may follow (call before queuing the unsubscribe reply).
    pub fn stop(&self) {
        self.since.store(NOT_LIVE, Ordering::Release);
    }

    /// What deliveries check: message number `seq` is for this subscription
    /// only if `seq > since`.
    pub fn since(&self) -> &AtomicU64 {
        &self.since
    }
}

/// What a pending subscriber learns when its wait ends.
///
/// Every waiter of one topic shares one round: a `watch` answered once, in
/// O(1) under the lock (the answer is sent after the lock is released), so a
/// confirmation costs the same for one waiter as for ten thousand.
pub type Confirmation = watch::Receiver<Option<Result<(), BrokerError>>>;

/// The sending side of a confirmation round.
type Round = watch::Sender<Option<Result<(), BrokerError>>>;

/// The outcome of joining a topic.
pub enum Joined {
    /// The broker holds the topic: queue the reply, then [`Sub::start`].
    Active(Arc<Sub>),
    /// Wait for the broker; on `Ok`, call [`super::Hub::activate`].
    Pending(Confirmation),
}

/// What the broker holds of one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Not held (never asked, unsubscribed, or lost with the connection).
    Absent,
    /// A subscribe for it is in flight.
    Subscribing,
    /// Confirmed by the broker: messages flow.
    Present,
    /// An unsubscribe for it is in flight.
    Unsubscribing,
    /// The broker refused it; not asked again until a new subscriber comes
    /// or the connection is replaced.
    Refused,
}

/// A subscriber waiting for the broker to confirm: the round it waits in.
/// It stays (and keeps the topic wanted) after its round is answered, until
/// the session activates it.
pub struct Waiter {
    round: u64,
}

struct Entry {
    /// The broker link that holds it.
    link: usize,
    /// Members receiving deliveries; copy-on-write, so the dispatcher iterates
    /// a clone of the `Arc` without the lock.
    active: Members,
    /// Members waiting for confirmation.
    pending: HashMap<u64, Waiter>,
    /// The round new waiters join, until it is answered.
    round: Option<Round>,
    /// Number of the current (or next) round; every round before it is over.
    round_no: u64,
    held: Held,
    dirty: bool,
    /// Part of the resync in progress (wanted at the last `Up`, not answered yet).
    resync: bool,
}

impl Entry {
    fn new(link: usize) -> Entry {
        Entry {
            link,
            active: Arc::new(Vec::new()),
            pending: HashMap::new(),
            round: None,
            round_no: 1,
            held: Held::Absent,
            dirty: false,
            resync: false,
        }
    }

    /// A receiver of the open round (opening one if needed), and its number.
    fn join_round(&mut self) -> (u64, Confirmation) {
        let round = self.round.get_or_insert_with(|| watch::Sender::new(None));
        (self.round_no, round.subscribe())
    }

    /// Closes the open round: its sender, to answer outside the lock.
    fn end_round(&mut self) -> Option<Round> {
        let round = self.round.take()?;
        self.round_no += 1;
        Some(round)
    }

    fn wanted(&self) -> bool {
        !self.active.is_empty() || !self.pending.is_empty()
    }

    /// Adds a member (a session holds a topic once: it refuses a second
    /// subscribe itself). No hash map: an index that grows rehashes all of
    /// it under the lock, which a join storm measured as its longest holds.
    fn insert(&mut self, sub: Arc<Sub>) {
        let list = Arc::make_mut(&mut self.active);
        sub.pos.store(list.len(), Ordering::Relaxed);
        list.push(sub);
    }

    /// Removes `sub` if it is in this list (its position says where).
    fn remove(&mut self, sub: &Sub) -> bool {
        let at = sub.pos.load(Ordering::Relaxed);
        if !self.active.get(at).is_some_and(|s| std::ptr::eq(&**s, sub)) {
            return false;
        }
        let list = Arc::make_mut(&mut self.active);
        list.swap_remove(at);
        if let Some(moved) = list.get(at) {
            moved.pos.store(at, Ordering::Relaxed);
        }
        sub.pos.store(usize::MAX, Ordering::Relaxed);
        true
    }
}

/// Result of removing one member from one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    /// It was receiving deliveries.
    Active,
    /// It was still waiting for confirmation; its wait is now cancelled.
    Pending,
    /// It held no such subscription.
    NotFound,
}

/// Counts the reconciler reports to metrics after each step.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HeldCounts {
    /// Distinct channels the broker holds.
    pub channels: usize,
    /// Distinct patterns the broker holds.
    pub patterns: usize,
}

/// Where the node's broker link stands: connected -> down -> reconnecting
/// -> resyncing -> connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinkState {
    /// Connected, and every wanted topic confirmed since.
    Connected,
    /// The connection was just lost.
    Down,
    /// Trying to connect (also the state at start-up).
    #[default]
    Reconnecting,
    /// Connected; re-applying every wanted topic.
    Resyncing,
}

impl LinkState {
    /// Every state, for metrics.
    pub const ALL: [LinkState; 4] = [
        LinkState::Connected,
        LinkState::Down,
        LinkState::Reconnecting,
        LinkState::Resyncing,
    ];

    /// The metric label / log name.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Connected => "connected",
            LinkState::Down => "down",
            LinkState::Reconnecting => "reconnecting",
            LinkState::Resyncing => "resyncing",
        }
    }

    fn is_up(self) -> bool {
        matches!(self, LinkState::Connected | LinkState::Resyncing)
    }

    /// How far along it is (down first): the node's state is its least
    /// advanced link's.
    fn rank(self) -> usize {
        match self {
            LinkState::Down => 0,
            LinkState::Reconnecting => 1,
            LinkState::Resyncing => 2,
            LinkState::Connected => 3,
        }
    }
}

/// What the reconciler gets from [`Registry::take_changes`].
#[derive(Default)]
pub struct Step {
    /// The link the changes are for.
    pub link: usize,
    /// The connection generation the changes are for.
    pub generation: u64,
    /// What to send to the broker (possibly nothing).
    pub changes: Changes,
    /// Set when this call finished the link's resync: how long it took.
    pub resynced: Option<Duration>,
    /// Set when this call finished the node's resync (every link connected
    /// and caught up again): how long since the first link came back.
    pub node_resynced: Option<Duration>,
}

/// Which broker link holds a topic ([`crate::broker::Broker::link_of`]).
pub type Router = Arc<dyn Fn(&Topic) -> usize + Send + Sync>;

/// One broker link as the registry sees it.
#[derive(Default)]
struct Link {
    state: LinkState,
    /// The connection its `held` states describe (from its last `Up`).
    /// Changes are applied only on that connection, and answers from
    /// another are treated as failures, so a quick reconnect racing the
    /// `Down`/`Up` events cannot leave a stale state behind.
    generation: u64,
    /// When its current resync started (its last `Up`).
    resync_started: Option<Instant>,
    /// Its entries with `resync` set.
    resync_left: usize,
    /// Its dirty topics, in order.
    dirty: VecDeque<Topic>,
    /// Its topics (every entry on it).
    topics: HashSet<Topic>,
    /// In [`Registry::visit`]: the reconciler should look at it.
    queued: bool,
}

/// A topic's active members, as the dispatcher iterates them.
pub type Members = Arc<Vec<Arc<Sub>>>;

/// A round to answer, and what it says.
pub type Answer = (Round, Result<(), BrokerError>);

/// What [`Registry::complete`] leaves for the hub to do outside the lock.
#[derive(Default)]
pub struct Completed {
    /// Confirmations to send (waiters whose topic the broker now holds, or
    /// refused).
    pub answers: Vec<Answer>,
    /// Topics the broker refused that still had active members, with those
    /// members and the reason: they are told delivery is interrupted.
    pub refused_active: Vec<(Topic, Members, String)>,
    /// Refused waiters, counted by their topic's kind: those subscriptions are gone.
    pub refused_waiters: Vec<(&'static str, usize)>,
    /// Their entries, dropped by the hub after the lock is released.
    pub dropped: Vec<HashMap<u64, Waiter>>,
}

/// All topics of one node; see the module docs.
pub struct Registry {
    entries: HashMap<Topic, Entry>,
    links: Vec<Link>,
    router: Router,
    /// What `/readyz` says: true once every link is connected and caught
    /// up, false again only when no link holding topics is connected (a
    /// partial outage keeps the node ready: most of its topics flow).
    ready: bool,
    /// When the node's resync started: the first `Up` since every link was
    /// last connected and caught up (or since start).
    node_resync: Option<Instant>,
    /// Links the reconciler should look at (dirty topics, or a resync that
    /// may be over), so that a wake costs O(links touched), not O(K).
    visit: VecDeque<usize>,
    /// Subscribers waiting for confirmation (the held-requests gauge).
    waiting: usize,
    held: HeldCounts,
    /// `WSGATE_MAX_PATTERNS` and the count it bounds; see [`PatternCap`].
    patterns: PatternCap,
    /// How many links are in each state (indexed by [`LinkState::rank`]),
    /// so that the node's state costs O(1) with thousands of links (a Redis
    /// Cluster broker has one per hash slot).
    states: [usize; 4],
}

/// The node-wide cap on distinct patterns: how many patterns have at least
/// one member (active or pending), and how many may. Kept apart from the rest
/// of the registry on purpose: it only ever refuses a subscribe.
#[derive(Default)]
struct PatternCap {
    wanted: usize,
    /// `None`: no cap (the registry's default, for unit tests).
    max: Option<usize>,
}

impl PatternCap {
    /// Why a subscribe to `topic`, whose entry is `wanted` already or not,
    /// must be refused, if it must: only a pattern new to the node counts.
    fn refusal(&self, topic: &Topic, wanted: bool) -> Option<Refusal> {
        let max = self.max?;
        (matches!(topic, Topic::Pattern(_)) && !wanted && self.wanted >= max)
            .then(|| pattern_cost::node_refusal(max))
    }

    /// A pattern entry became wanted (`true`) or stopped being wanted.
    fn changed(&mut self, topic: &Topic, wanted: bool) {
        if matches!(topic, Topic::Pattern(_)) {
            if wanted {
                self.wanted += 1;
            } else {
                self.wanted = self.wanted.saturating_sub(1);
            }
        }
    }
}

impl Default for Registry {
    /// One link, holding every topic.
    fn default() -> Registry {
        Registry::with_links(1, Arc::new(|_: &Topic| 0))
    }
}

impl Registry {
    /// An empty registry over `links` broker links (at least one); `router`
    /// says which holds a topic.
    pub fn with_links(links: usize, router: Router) -> Registry {
        Registry {
            entries: HashMap::new(),
            links: (0..links.max(1)).map(|_| Link::default()).collect(),
            router,
            ready: false,
            node_resync: None,
            visit: VecDeque::new(),
            waiting: 0,
            held: HeldCounts::default(),
            patterns: PatternCap::default(),
            states: {
                let mut states = [0; 4];
                states[LinkState::Reconnecting.rank()] = links.max(1);
                states
            },
        }
    }

    /// Moves link `link` to `state`, keeping the per-state counts.
    fn set_state(&mut self, link: usize, state: LinkState) {
        let Some(l) = self.links.get_mut(link) else {
            return;
        };
        let was = std::mem::replace(&mut l.state, state);
        self.states[was.rank()] -= 1;
        self.states[state.rank()] += 1;
    }

    /// Queues `link` for the reconciler's next look.
    fn wake(&mut self, link: usize) {
        if let Some(l) = self.links.get_mut(link) {
            if !std::mem::replace(&mut l.queued, true) {
                self.visit.push_back(link);
            }
        }
    }

    /// The links to look at now (each once), emptying the queue.
    pub fn links_to_visit(&mut self) -> Vec<usize> {
        let links: Vec<usize> = self.visit.drain(..).collect();
        for &l in &links {
            self.links[l].queued = false;
        }
        links
    }

    /// How many broker links there are.
    pub fn link_count(&self) -> usize {
        self.links.len()
    }

    /// Caps the distinct patterns the node holds (`WSGATE_MAX_PATTERNS`).
    pub fn set_max_patterns(&mut self, max: usize) {
        self.patterns.max = Some(max);
    }

    /// Adds `member` to `topic`: active at once when the broker holds it
    /// (`sub` is then the member's place), otherwise waiting; refuses a
    /// pattern new to the node when the node holds `WSGATE_MAX_PATTERNS`
    /// already.
    pub fn subscribe(&mut self, sub: Arc<Sub>, topic: Topic) -> Result<Joined, Refusal> {
        let wanted = self.entries.get(&topic).is_some_and(Entry::wanted);
        if let Some(refusal) = self.patterns.refusal(&topic, wanted) {
            return Err(refusal);
        }
        if !wanted {
            self.patterns.changed(&topic, true);
        }
        let entry = match self.entries.entry(topic.clone()) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let link = (self.router)(&topic).min(self.links.len() - 1);
                self.links[link].topics.insert(topic.clone());
                v.insert(Entry::new(link))
            }
        };
        if entry.held == Held::Present {
            entry.insert(sub.clone());
            return Ok(Joined::Active(sub));
        }
        let (round, confirmation) = entry.join_round();
        let id = sub.member.id;
        if entry.pending.insert(id, Waiter { round }).is_none() {
            self.waiting += 1;
        }
        if entry.held == Held::Refused {
            // A new subscriber asks again (the broker's rules may have changed);
            // one command per subscribe, which the per-connection rate bounds.
            self.set_held(&topic, Held::Absent);
        }
        self.mark_dirty(&topic);
        Ok(Joined::Pending(confirmation))
    }

    /// A waiter's confirmation arrived: makes it active if the broker still
    /// holds the topic, or makes it wait again (the link dropped meanwhile).
    /// `None` if it is no longer waiting (unsubscribed meanwhile).
    pub fn activate(&mut self, sub: Arc<Sub>, topic: &Topic) -> Option<Joined> {
        let entry = self.entries.get_mut(topic)?;
        let id = sub.member.id;
        if !entry.pending.contains_key(&id) {
            return None;
        }
        if entry.held == Held::Present {
            entry.pending.remove(&id);
            self.waiting -= 1;
            entry.insert(sub.clone());
            return Some(Joined::Active(sub));
        }
        let (round, confirmation) = entry.join_round();
        if let Some(w) = entry.pending.get_mut(&id) {
            w.round = round;
        }
        if entry.held == Held::Refused {
            self.set_held(topic, Held::Absent);
        }
        self.mark_dirty(topic);
        Some(Joined::Pending(confirmation))
    }

    /// Removes `member_id` from `topic`: its waiter, or `active`, its place.
    pub fn unsubscribe(&mut self, member_id: u64, topic: &Topic, active: Option<&Sub>) -> Removed {
        let Some(entry) = self.entries.get_mut(topic) else {
            return Removed::NotFound;
        };
        let removed = if entry.pending.remove(&member_id).is_some() {
            self.waiting -= 1;
            Removed::Pending
        } else if active.is_some_and(|sub| entry.remove(sub)) {
            Removed::Active
        } else {
            Removed::NotFound
        };
        if !entry.wanted() {
            if removed != Removed::NotFound {
                self.patterns.changed(topic, false);
            }
            self.mark_dirty(topic);
        }
        removed
    }

    /// Withdraws `member_id`'s subscribe to `topic` only if it is still
    /// waiting for the broker; `false` if the broker confirmed it meanwhile
    /// (the session then activates it).
    pub fn cancel_pending(&mut self, member_id: u64, topic: &Topic) -> bool {
        let Some(entry) = self.entries.get_mut(topic) else {
            return false;
        };
        match entry.pending.get(&member_id) {
            Some(w) if w.round == entry.round_no => {}
            _ => return false,
        }
        entry.pending.remove(&member_id);
        self.waiting -= 1;
        if !entry.wanted() {
            self.patterns.changed(topic, false);
            self.mark_dirty(topic);
        }
        true
    }

    fn mark_dirty(&mut self, topic: &Topic) {
        if let Some(entry) = self.entries.get_mut(topic) {
            if !entry.dirty {
                entry.dirty = true;
                let link = entry.link;
                self.links[link].dirty.push_back(topic.clone());
                self.wake(link);
            }
        }
    }

    /// Whether `topic` has members (active or waiting): a topic without is
    /// about to be dropped.
    pub fn is_wanted(&self, topic: &Topic) -> bool {
        self.entries.get(topic).is_some_and(Entry::wanted)
    }

    /// The members to deliver a message for `topic` to (a reference count).
    pub fn receivers(&self, topic: &Topic) -> Option<Members> {
        self.entries.get(topic).map(|e| e.active.clone())
    }

    /// Takes up to `max` dirty topics of `link` whose broker state differs
    /// from what is wanted, and marks them in flight. Empty when the link is
    /// down or nothing differs.
    pub fn take_changes(&mut self, link: usize, max: usize) -> Step {
        let mut changes = Changes::default();
        let Some(l) = self.links.get(link) else {
            return Step::default();
        };
        let generation = l.generation;
        if !l.state.is_up() {
            return Step {
                link,
                generation,
                ..Step::default()
            };
        }
        while changes.subscribe.len() + changes.unsubscribe.len() < max {
            let Some(topic) = self.links[link].dirty.pop_front() else {
                break;
            };
            let Some(entry) = self.entries.get_mut(&topic) else {
                continue;
            };
            entry.dirty = false;
            match (entry.wanted(), entry.held) {
                (true, Held::Absent) => {
                    self.set_held(&topic, Held::Subscribing);
                    changes.subscribe.push(topic);
                }
                (false, Held::Present) => {
                    self.set_held(&topic, Held::Unsubscribing);
                    changes.unsubscribe.push(topic);
                }
                (false, Held::Absent | Held::Refused) => self.remove_entry(&topic),
                // Settled, or in flight (its answer re-checks it).
                _ => self.resync_answered(&topic),
            }
        }
        let mut resynced = None;
        let mut node_resynced = None;
        let l = &mut self.links[link];
        if l.state == LinkState::Resyncing && l.resync_left == 0 {
            resynced = Some(
                l.resync_started
                    .take()
                    .map(|t| t.elapsed())
                    .unwrap_or_default(),
            );
            self.set_state(link, LinkState::Connected);
            if self.states[LinkState::Connected.rank()] == self.links.len() {
                self.ready = true;
                node_resynced = self.node_resync.take().map(|t| t.elapsed());
            }
        }
        Step {
            link,
            generation,
            changes,
            resynced,
            node_resynced,
        }
    }

    /// `topic` no longer holds up the resync (answered, settled or gone).
    fn resync_answered(&mut self, topic: &Topic) {
        if let Some(entry) = self.entries.get_mut(topic) {
            if entry.resync && !matches!(entry.held, Held::Subscribing | Held::Unsubscribing) {
                entry.resync = false;
                self.links[entry.link].resync_left -= 1;
            }
        }
    }

    fn remove_entry(&mut self, topic: &Topic) {
        if let Some(entry) = self.entries.remove(topic) {
            let link = &mut self.links[entry.link];
            if entry.resync {
                link.resync_left -= 1;
            }
            link.topics.remove(topic);
            self.waiting -= entry.pending.len();
        }
    }

    /// Records the broker's answer to changes from [`Registry::take_changes`]
    /// for `link`.
    pub fn complete(
        &mut self,
        link: usize,
        generation: u64,
        changes: &Changes,
        result: Result<Applied, BrokerError>,
    ) -> Completed {
        let mut out = Completed::default();
        let current = self.links.get(link).map(|l| l.generation);
        let result = match result {
            Ok(_) if current != Some(generation) => Err(BrokerError::ConnectionLost),
            other => other,
        };
        let refused: HashMap<&Topic, &str> = match &result {
            Ok(applied) => applied
                .refused
                .iter()
                .map(|(t, why)| (t, why.as_str()))
                .collect(),
            Err(_) => HashMap::new(),
        };
        for topic in changes.subscribe.iter().chain(&changes.unsubscribe) {
            let Some(entry) = self.entries.get_mut(topic) else {
                continue;
            };
            let next = match (&result, entry.held) {
                (Ok(_), Held::Subscribing) if refused.contains_key(topic) => Held::Refused,
                (Ok(_), Held::Subscribing) => Held::Present,
                (Ok(_), Held::Unsubscribing) => Held::Absent,
                // In doubt (failed or connection lost): assume nothing is
                // held; the next `Up` resubscribes everything wanted anyway.
                (Err(_), _) => Held::Absent,
                (_, other) => other,
            };
            self.set_held(topic, next);
            let Some(entry) = self.entries.get_mut(topic) else {
                continue;
            };
            match next {
                Held::Present => {
                    if let Some(round) = entry.end_round() {
                        out.answers.push((round, Ok(())));
                    }
                }
                Held::Refused => {
                    let why = refused.get(topic).copied().unwrap_or("refused").to_owned();
                    self.waiting -= entry.pending.len();
                    // Dropped outside the lock (the map may be large).
                    let gone = std::mem::take(&mut entry.pending);
                    out.refused_waiters.push((topic.kind(), gone.len()));
                    out.dropped.push(gone);
                    if let Some(round) = entry.end_round() {
                        out.answers
                            .push((round, Err(BrokerError::Refused(why.clone()))));
                    }
                    if !entry.active.is_empty() {
                        out.refused_active
                            .push((topic.clone(), entry.active.clone(), why));
                    } else {
                        self.patterns.changed(topic, false);
                    }
                }
                _ => {}
            }
            let settled = matches!(
                (entry.wanted(), entry.held),
                (true, Held::Present | Held::Refused) | (false, Held::Absent)
            );
            if !settled {
                self.mark_dirty(topic);
            } else if !entry.wanted() && !entry.dirty {
                self.remove_entry(topic);
                continue;
            }
            // A failed apply of a wanted topic does not count towards the
            // link's resync: it is not held, and a link that stays up (a
            // Cluster redirect) must not say `resumed` until the retry
            // holds it.
            if settled || result.is_ok() {
                self.resync_answered(topic);
            }
        }
        out
    }

    fn set_held(&mut self, topic: &Topic, next: Held) {
        let Some(entry) = self.entries.get_mut(topic) else {
            return;
        };
        let was = entry.held == Held::Present;
        entry.held = next;
        let is = next == Held::Present;
        let count = match topic {
            Topic::Channel(_) => &mut self.held.channels,
            Topic::Pattern(_) => &mut self.held.patterns,
        };
        match (was, is) {
            (false, true) => *count += 1,
            (true, false) => *count -= 1,
            _ => {}
        }
    }

    /// Link `link` connected with nothing held: every wanted topic of it is
    /// dirty, and its resync lasts until each of those is answered.
    pub fn broker_up(&mut self, link: usize, generation: u64) {
        self.set_state(link, LinkState::Resyncing);
        let Some(l) = self.links.get_mut(link) else {
            return;
        };
        l.resync_started = Some(Instant::now());
        l.generation = generation;
        l.resync_left = 0;
        self.node_resync.get_or_insert_with(Instant::now);
        let topics: Vec<Topic> = l.topics.iter().cloned().collect();
        for topic in topics {
            self.set_held(&topic, Held::Absent);
            if let Some(entry) = self.entries.get_mut(&topic) {
                entry.resync = true;
                self.links[link].resync_left += 1;
            }
            self.mark_dirty(&topic);
        }
        self.wake(link);
    }

    /// Link `link`'s connection is gone, and with it everything it held.
    /// O(its topics): the hub tells their subscribers. The node stays ready
    /// while another link holding topics is connected.
    pub fn broker_down(&mut self, link: usize) {
        self.set_state(link, LinkState::Down);
        let Some(l) = self.links.get_mut(link) else {
            return;
        };
        l.resync_started = None;
        l.resync_left = 0;
        let topics: Vec<Topic> = l.topics.iter().cloned().collect();
        for topic in &topics {
            self.set_held(topic, Held::Absent);
            if let Some(entry) = self.entries.get_mut(topic) {
                entry.resync = false;
            }
        }
        let flowing = self
            .links
            .iter()
            .any(|l| l.state == LinkState::Connected && !l.topics.is_empty());
        if !flowing {
            self.ready = false;
        }
    }

    /// Link `link` is trying to connect again.
    pub fn broker_reconnecting(&mut self, link: usize) {
        if self.links.get(link).is_some_and(|l| !l.state.is_up()) {
            self.set_state(link, LinkState::Reconnecting);
        }
    }

    /// The topics link `link` holds (or should), with their active members:
    /// whom its outage or its resync concerns.
    pub fn members_of_link(&self, link: usize) -> Vec<(Topic, Members)> {
        let Some(l) = self.links.get(link) else {
            return Vec::new();
        };
        l.topics
            .iter()
            .filter_map(|t| self.entries.get(t).map(|e| (t.clone(), e.active.clone())))
            .filter(|(_, members)| !members.is_empty())
            .collect()
    }

    /// The active members of each of `topics` (`None`: of every topic): who
    /// lost messages to an overflow. One reference count per topic.
    pub fn members_of(&self, topics: Option<&[Topic]>) -> Vec<(Topic, Members)> {
        match topics {
            Some(list) => list
                .iter()
                .filter_map(|t| self.entries.get(t).map(|e| (t.clone(), e.active.clone())))
                .collect(),
            None => self
                .entries
                .iter()
                .map(|(t, e)| (t.clone(), e.active.clone()))
                .collect(),
        }
    }

    /// What `/readyz` reports: every link connected and caught up, or a
    /// partial outage of a node that was (see the field's docs).
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// The broker's state: connected when every link is, else the least
    /// advanced link's state (down, reconnecting, resyncing).
    pub fn link(&self) -> LinkState {
        LinkState::ALL
            .into_iter()
            .filter(|s| self.states[s.rank()] > 0)
            .min_by_key(|s| s.rank())
            .unwrap_or_default()
    }

    /// Links connected and caught up.
    pub fn links_connected(&self) -> usize {
        self.states[LinkState::Connected.rank()]
    }

    /// Subscribers waiting for the broker to confirm.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// How many distinct topics the broker holds, by kind.
    pub fn held(&self) -> HeldCounts {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::native::Native;
    use bytes::Bytes;

    fn new_sub(id: u64) -> Arc<Sub> {
        Sub::new(member(id), Arc::default())
    }

    fn member(id: u64) -> Arc<Member> {
        Arc::new(Member {
            id,
            outbox: Arc::new(Outbox::new(1 << 20)),
            render: Arc::new(Native),
        })
    }

    /// A recovering subscription holds deliveries until released, then
    /// skips those at or below the recovered position of the same epoch.
    #[test]
    fn recovery_holds_then_skips_duplicates() {
        let queued = Arc::new(AtomicU64::new(0));
        let sub = Sub::new(member(1), queued.clone());
        let at = |offset, epoch: &'static [u8]| Position {
            offset,
            epoch: Bytes::from_static(epoch),
        };
        let (a, b) = (Bytes::from_static(b"a"), Bytes::from_static(b"b"));
        let frame = |t: &str| Frame::text(t.to_owned());
        assert!(!sub.recovering());
        sub.recover();
        queued.store(10, Ordering::Release);
        sub.start();
        assert!(sub.recovering());
        // Before the start (seq 10): not for this subscription.
        assert_eq!(
            sub.admit(&frame("old"), &a, Some(&at(4, b"e")), 10),
            Admit::Taken
        );
        assert_eq!(
            sub.admit(&frame("5"), &a, Some(&at(5, b"e")), 11),
            Admit::Taken
        );
        assert_eq!(
            sub.admit(&frame("6"), &a, Some(&at(6, b"e")), 12),
            Admit::Taken
        );
        assert_eq!(sub.admit(&frame("plain"), &a, None, 13), Admit::Taken);
        let mut released = Vec::new();
        sub.release(vec![(a.clone(), at(5, b"e"))], |held| {
            assert!(!held.overflowed);
            released = held.frames;
        });
        let offsets: Vec<_> = released
            .iter()
            .map(|(_, _, p)| p.as_ref().map(|p| p.offset))
            .collect();
        assert_eq!(offsets, [Some(5), Some(6), None]);
        // After the release: at or below the channel's floor is a duplicate;
        // another epoch, another channel, or no position, is not.
        assert_eq!(
            sub.admit(&frame("5"), &a, Some(&at(5, b"e")), 14),
            Admit::Taken
        );
        assert_eq!(
            sub.admit(&frame("7"), &a, Some(&at(7, b"e")), 15),
            Admit::Push
        );
        assert_eq!(
            sub.admit(&frame("1"), &a, Some(&at(1, b"f")), 16),
            Admit::Push
        );
        assert_eq!(
            sub.admit(&frame("b"), &b, Some(&at(1, b"e")), 17),
            Admit::Push
        );
        assert_eq!(sub.admit(&frame("p"), &a, None, 18), Admit::Push);
    }

    /// Holding is bounded: past `MAX_HELD_BYTES` everything held is dropped
    /// and the release says so.
    #[test]
    fn recovery_hold_is_bounded() {
        let sub = Sub::new(member(1), Arc::default());
        sub.recover();
        sub.start();
        let c = Bytes::from_static(b"c");
        let big = Frame::text("x".repeat(MAX_HELD_BYTES / 2 + 1));
        assert_eq!(sub.admit(&big, &c, None, 1), Admit::Taken);
        assert_eq!(sub.admit(&big, &c, None, 2), Admit::Taken);
        sub.release(Vec::new(), |held| {
            assert!(held.overflowed);
            assert!(held.frames.is_empty());
        });
    }

    fn held_channel(r: &mut Registry, t: &Topic) {
        r.broker_up(0, 1);
        let sub = new_sub(0);
        let _ = r.subscribe(sub, t.clone());
        let step = r.take_changes(0, 10);
        r.complete(0, 1, &step.changes, Ok(Applied::default()));
        assert!(r.activate(new_sub(0), t).is_some());
    }

    /// Regression (issue 16, point 4): a join or leave used to rebuild and
    /// sort the whole member snapshot. Now the list is modified in place
    /// unless the dispatcher holds it, and then copied once, not per join.
    #[test]
    fn joins_do_not_copy_the_member_list() {
        let mut r = Registry::default();
        let t = Topic::Channel(Bytes::from_static(b"c"));
        held_channel(&mut r, &t);
        let before = Arc::as_ptr(&r.receivers(&t).unwrap_or_default());
        let mut subs = std::collections::HashMap::new();
        for id in 1..1000 {
            let Ok(Joined::Active(sub)) = r.subscribe(new_sub(id), t.clone()) else {
                panic!("expected active");
            };
            subs.insert(id, sub);
        }
        let list = r.receivers(&t).unwrap_or_default();
        assert_eq!(list.len(), 1000);
        assert_eq!(Arc::as_ptr(&list), before, "the list was rebuilt");
        // While the dispatcher holds `list`, a join copies it once.
        let _ = r.subscribe(new_sub(5000), t.clone());
        let after_one = Arc::as_ptr(&r.receivers(&t).unwrap_or_default());
        assert_ne!(after_one, before);
        drop(list);
        for id in 1000..1100 {
            let sub = subs.get(&(id - 999)).cloned();
            assert_eq!(r.unsubscribe(id - 999, &t, sub.as_deref()), Removed::Active);
            // Gone means gone: a second removal finds nothing.
            assert_eq!(
                r.unsubscribe(id - 999, &t, sub.as_deref()),
                Removed::NotFound
            );
        }
        assert_eq!(Arc::as_ptr(&r.receivers(&t).unwrap_or_default()), after_one);
        let ids: std::collections::HashSet<u64> = r
            .receivers(&t)
            .unwrap_or_default()
            .iter()
            .map(|s| s.member.id)
            .collect();
        assert_eq!(ids.len(), 901);
        assert!(!ids.contains(&1) && ids.contains(&101) && ids.contains(&5000));
    }

    /// The resync ends once every topic wanted at the reconnect is answered,
    /// even while new topics keep becoming dirty.
    #[test]
    fn resync_is_bounded_under_churn() {
        let mut r = Registry::default();
        let topics: Vec<Topic> = (0..10)
            .map(|i| Topic::Channel(Bytes::from(format!("t{i}"))))
            .collect();
        for t in &topics {
            let _ = r.subscribe(new_sub(1), t.clone());
        }
        r.broker_up(0, 1);
        let mut churn = 100;
        let mut done = false;
        for _ in 0..50 {
            // Steady churn: a new topic dirty before every step.
            churn += 1;
            let _ = r.subscribe(
                new_sub(churn),
                Topic::Channel(Bytes::from(format!("churn{churn}"))),
            );
            let step = r.take_changes(0, 4);
            if step.resynced.is_some() {
                done = true;
                break;
            }
            r.complete(0, 1, &step.changes, Ok(Applied::default()));
        }
        assert!(done, "resync never finished under churn");
        assert!(r.is_ready());
    }

    /// A confirmation is one answer per topic, however many wait: the lock
    /// does not hold O(waiters) work (every waiter's `watch` sees it).
    #[test]
    fn ten_thousand_waiters_are_one_answer() {
        let mut r = Registry::default();
        r.broker_up(0, 1);
        let t = Topic::Channel(Bytes::from_static(b"storm"));
        let mut waits = Vec::new();
        for id in 0..10_000 {
            let Ok(Joined::Pending(c)) = r.subscribe(new_sub(id), t.clone()) else {
                panic!("expected pending");
            };
            waits.push(c);
        }
        let step = r.take_changes(0, 10);
        let done = r.complete(0, 1, &step.changes, Ok(Applied::default()));
        assert_eq!(done.answers.len(), 1);
        for (tx, res) in done.answers {
            tx.send_replace(Some(res));
        }
        assert!(waits.iter().all(|w| matches!(*w.borrow(), Some(Ok(())))));
        // Confirmed, not yet activated: a timeout now must not withdraw it.
        assert!(!r.cancel_pending(7, &t));
        assert!(matches!(
            r.activate(new_sub(7), &t),
            Some(Joined::Active(_))
        ));
    }

    #[test]
    fn a_refused_topic_refuses_its_waiters_and_is_not_retried() {
        let mut r = Registry::default();
        r.broker_up(0, 1);
        let t = Topic::Channel(Bytes::from_static(b"secret"));
        let Ok(Joined::Pending(mut conf)) = r.subscribe(new_sub(1), t.clone()) else {
            panic!("expected pending");
        };
        let step = r.take_changes(0, 10);
        let applied = Applied {
            refused: vec![(t.clone(), "not permitted by Redis".to_owned())],
        };
        let done = r.complete(0, 1, &step.changes, Ok(applied));
        assert_eq!(done.answers.len(), 1);
        for (tx, res) in done.answers {
            tx.send_replace(Some(res));
        }
        let answer = conf.borrow_and_update().clone();
        assert!(matches!(answer, Some(Err(BrokerError::Refused(_)))));
        assert!(r.take_changes(0, 10).changes.subscribe.is_empty());
        assert_eq!(r.waiting(), 0);
    }
}
