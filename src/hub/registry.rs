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
//! The registry also holds the broker link's [`LinkState`] and who must be
//! told about a gap in delivery: members active when the link went down are
//! sent an `interrupted` notice, and a `resumed` one once every topic is
//! confirmed again.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::broker::{BrokerError, Changes, Topic};
use crate::pattern_cost::{self, Refusal};
use crate::protocol::{Dialect, Frame};
use crate::session::outbox::Outbox;

/// One session as the hub sees it: where to put frames, and how to render them.
pub struct Member {
    /// Unique per session for the life of the process.
    pub id: u64,
    /// The session's outbound queue.
    pub outbox: Arc<Outbox>,
    /// Renders deliveries for this session.
    pub dialect: Arc<dyn Dialect>,
}

/// What a pending subscriber learns when its wait ends.
pub type Confirmation = oneshot::Receiver<Result<(), BrokerError>>;

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
}

/// A subscriber waiting for the broker to confirm.
struct Waiter {
    member: Arc<Member>,
    /// Pushed into the member's outbox at the moment it becomes active, so
    /// the reply precedes every delivery it can receive.
    ack: Frame,
    done: oneshot::Sender<Result<(), BrokerError>>,
}

struct Entry {
    /// Members receiving deliveries, keyed by member id.
    active: HashMap<u64, Arc<Member>>,
    /// Members waiting for confirmation.
    pending: HashMap<u64, Waiter>,
    /// Snapshot of `active` for the dispatcher: cloned (one refcount) under the
    /// lock, iterated without it. Rebuilt on every membership change.
    snapshot: Arc<[Arc<Member>]>,
    held: Held,
    dirty: bool,
}

impl Entry {
    fn new() -> Entry {
        Entry {
            active: HashMap::new(),
            pending: HashMap::new(),
            snapshot: Arc::from(Vec::new()),
            held: Held::Absent,
            dirty: false,
        }
    }

    fn wanted(&self) -> bool {
        !self.active.is_empty() || !self.pending.is_empty()
    }

    fn rebuild_snapshot(&mut self) {
        let mut members: Vec<Arc<Member>> = self.active.values().cloned().collect();
        // Grouping by dialect lets the dispatcher render once per dialect run.
        members.sort_by_key(|m| m.dialect.name());
        self.snapshot = Arc::from(members);
    }

    /// Makes a waiter active: its ack goes out before any delivery can.
    fn activate(&mut self, waiter: Waiter) {
        waiter.member.outbox.push(waiter.ack);
        let _ = waiter.done.send(Ok(()));
        self.active.insert(waiter.member.id, waiter.member);
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
}

/// Members to notify, each with the topics concerned.
pub type Notices = Vec<(Arc<Member>, Vec<Topic>)>;

/// What the reconciler gets from [`Registry::take_changes`].
#[derive(Default)]
pub struct Step {
    /// The connection generation the changes are for.
    pub generation: u64,
    /// What to send to the broker (possibly nothing).
    pub changes: Changes,
    /// Set when this call finished a resync: how long it took, and who must
    /// be told that delivery resumed.
    pub resynced: Option<(Duration, Notices)>,
}

/// All topics of one node; see the module docs.
#[derive(Default)]
pub struct Registry {
    entries: HashMap<Topic, Entry>,
    dirty: VecDeque<Topic>,
    link: LinkState,
    /// When the current resync started (the last `Up`).
    resync_started: Option<Instant>,
    /// Members told `interrupted` and not yet `resumed`, with their topics.
    interrupted: HashMap<u64, (Arc<Member>, Vec<Topic>)>,
    /// Subscribers waiting for confirmation (the held-requests gauge).
    waiting: usize,
    /// The broker connection the registry's `held` states describe (from the
    /// last `Up`). Changes are applied only on that connection, and answers
    /// from another are treated as failures, so a quick reconnect racing the
    /// `Down`/`Up` events cannot leave a stale state behind.
    generation: u64,
    held: HeldCounts,
    /// `WSGATE_MAX_PATTERNS` and the count it bounds; see [`PatternCap`].
    patterns: PatternCap,
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

impl Registry {
    /// Caps the distinct patterns the node holds (`WSGATE_MAX_PATTERNS`).
    pub fn set_max_patterns(&mut self, max: usize) {
        self.patterns.max = Some(max);
    }

    /// Adds `member` to `topic`. Returns `None` when the broker already holds
    /// the topic (the member is active and `ack` already queued), or a
    /// [`Confirmation`] to wait for; refuses a pattern new to the node when
    /// the node holds `WSGATE_MAX_PATTERNS` already.
    pub fn subscribe(
        &mut self,
        member: Arc<Member>,
        topic: Topic,
        ack: Frame,
    ) -> Result<Option<Confirmation>, Refusal> {
        let wanted = self.entries.get(&topic).is_some_and(Entry::wanted);
        if let Some(refusal) = self.patterns.refusal(&topic, wanted) {
            return Err(refusal);
        }
        if !wanted {
            self.patterns.changed(&topic, true);
        }
        let entry = self.entries.entry(topic.clone()).or_insert_with(Entry::new);
        let (done, confirmation) = oneshot::channel();
        let waiter = Waiter { member, ack, done };
        if entry.held == Held::Present {
            entry.activate(waiter);
            entry.rebuild_snapshot();
            return Ok(None);
        }
        entry.pending.insert(waiter.member.id, waiter);
        self.waiting += 1;
        self.mark_dirty(&topic);
        Ok(Some(confirmation))
    }

    /// Removes `member_id` from `topic`.
    pub fn unsubscribe(&mut self, member_id: u64, topic: &Topic) -> Removed {
        let Some(entry) = self.entries.get_mut(topic) else {
            return Removed::NotFound;
        };
        let removed = if entry.pending.remove(&member_id).is_some() {
            self.waiting -= 1;
            Removed::Pending
        } else if entry.active.remove(&member_id).is_some() {
            entry.rebuild_snapshot();
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
    /// waiting; `false` if it was activated meanwhile (its ack is queued).
    pub fn cancel_pending(&mut self, member_id: u64, topic: &Topic) -> bool {
        let Some(entry) = self.entries.get_mut(topic) else {
            return false;
        };
        if entry.pending.remove(&member_id).is_none() {
            return false;
        }
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
                self.dirty.push_back(topic.clone());
            }
        }
    }

    /// The members to deliver a message for `topic` to.
    pub fn receivers(&self, topic: &Topic) -> Option<Arc<[Arc<Member>]>> {
        self.entries.get(topic).map(|e| e.snapshot.clone())
    }

    /// Takes up to `max` dirty topics whose broker state differs from what is
    /// wanted, and marks them in flight. Empty when the broker is down or
    /// nothing differs (then the node counts as synced).
    pub fn take_changes(&mut self, max: usize) -> Step {
        let mut changes = Changes::default();
        if !self.link.is_up() {
            return Step {
                generation: self.generation,
                changes,
                resynced: None,
            };
        }
        while changes.subscribe.len() + changes.unsubscribe.len() < max {
            let Some(topic) = self.dirty.pop_front() else {
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
                (false, Held::Absent) => {
                    self.entries.remove(&topic);
                }
                _ => {}
            }
        }
        let mut resynced = None;
        let idle =
            changes.subscribe.is_empty() && changes.unsubscribe.is_empty() && self.dirty.is_empty();
        if idle && self.link == LinkState::Resyncing {
            self.link = LinkState::Connected;
            let took = self
                .resync_started
                .take()
                .map(|t| t.elapsed())
                .unwrap_or_default();
            resynced = Some((took, self.take_resumed()));
        }
        Step {
            generation: self.generation,
            changes,
            resynced,
        }
    }

    /// Everyone told `interrupted`, with the topics they still hold.
    fn take_resumed(&mut self) -> Notices {
        let mut out = Vec::new();
        for (id, (member, topics)) in self.interrupted.drain() {
            let held: Vec<Topic> = topics
                .into_iter()
                .filter(|t| {
                    self.entries
                        .get(t)
                        .is_some_and(|e| e.active.contains_key(&id))
                })
                .collect();
            if !held.is_empty() {
                out.push((member, held));
            }
        }
        out
    }

    /// Records the broker's answer to changes from [`Registry::take_changes`].
    pub fn complete(
        &mut self,
        generation: u64,
        changes: &Changes,
        result: Result<(), BrokerError>,
    ) {
        let result = match result {
            Ok(()) if generation != self.generation => Err(BrokerError::ConnectionLost),
            other => other,
        };
        for topic in changes.subscribe.iter().chain(&changes.unsubscribe) {
            let Some(entry) = self.entries.get_mut(topic) else {
                continue;
            };
            let next = match (&result, entry.held) {
                (Ok(()), Held::Subscribing) => Held::Present,
                (Ok(()), Held::Unsubscribing) => Held::Absent,
                // In doubt (failed or connection lost): assume nothing is
                // held; the next `Up` resubscribes everything wanted anyway.
                (Err(_), _) => Held::Absent,
                (_, other) => other,
            };
            self.set_held(topic, next);
            let entry = match self.entries.get_mut(topic) {
                Some(e) => e,
                None => continue,
            };
            if entry.held == Held::Present && !entry.pending.is_empty() {
                self.waiting -= entry.pending.len();
                for (_, waiter) in entry.pending.drain().collect::<Vec<_>>() {
                    entry.activate(waiter);
                }
                entry.rebuild_snapshot();
            }
            let settled = entry.wanted() == (entry.held == Held::Present);
            if !settled {
                self.mark_dirty(topic);
            } else if !entry.wanted() && !entry.dirty {
                self.entries.remove(topic);
            }
        }
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

    /// The broker connected with nothing held: everything wanted is dirty.
    pub fn broker_up(&mut self, generation: u64) {
        self.link = LinkState::Resyncing;
        self.resync_started = Some(Instant::now());
        self.generation = generation;
        let topics: Vec<Topic> = self.entries.keys().cloned().collect();
        for topic in topics {
            self.set_held(&topic, Held::Absent);
            self.mark_dirty(&topic);
        }
    }

    /// The broker connection is gone, and with it everything it held.
    /// Returns the members to tell `interrupted`: every active member, with
    /// the topics it has not already been told about.
    pub fn broker_down(&mut self) -> Notices {
        self.link = LinkState::Down;
        self.resync_started = None;
        let topics: Vec<Topic> = self.entries.keys().cloned().collect();
        for topic in &topics {
            self.set_held(topic, Held::Absent);
        }
        let mut fresh: HashMap<u64, (Arc<Member>, Vec<Topic>)> = HashMap::new();
        for (topic, entry) in &self.entries {
            for (id, member) in &entry.active {
                let told = self
                    .interrupted
                    .entry(*id)
                    .or_insert_with(|| (member.clone(), Vec::new()));
                if !told.1.contains(topic) {
                    told.1.push(topic.clone());
                    fresh
                        .entry(*id)
                        .or_insert_with(|| (member.clone(), Vec::new()))
                        .1
                        .push(topic.clone());
                }
            }
        }
        fresh.into_values().collect()
    }

    /// The broker is trying to connect again.
    pub fn broker_reconnecting(&mut self) {
        if !self.link.is_up() {
            self.link = LinkState::Reconnecting;
        }
    }

    /// Active members of `topics` (`None`: of every topic), each with its
    /// topics among them: who lost messages to an overflow.
    pub fn members_of(&self, topics: Option<&[Topic]>) -> Notices {
        let mut out: HashMap<u64, (Arc<Member>, Vec<Topic>)> = HashMap::new();
        let mut add = |topic: &Topic, entry: &Entry| {
            for (id, member) in &entry.active {
                out.entry(*id)
                    .or_insert_with(|| (member.clone(), Vec::new()))
                    .1
                    .push(topic.clone());
            }
        };
        match topics {
            Some(list) => {
                for t in list {
                    if let Some(e) = self.entries.get(t) {
                        add(t, e);
                    }
                }
            }
            None => {
                for (t, e) in &self.entries {
                    add(t, e);
                }
            }
        }
        out.into_values().collect()
    }

    /// Connected and caught up: what `/readyz` reports.
    pub fn is_ready(&self) -> bool {
        self.link == LinkState::Connected
    }

    /// The broker link's state.
    pub fn link(&self) -> LinkState {
        self.link
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
