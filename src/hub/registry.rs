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

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::broker::{BrokerError, Changes, Topic};
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

/// All topics of one node; see the module docs.
#[derive(Default)]
pub struct Registry {
    entries: HashMap<Topic, Entry>,
    dirty: VecDeque<Topic>,
    /// The broker is connected.
    up: bool,
    /// The broker connection the registry's `held` states describe (from the
    /// last `Up`). Changes are applied only on that connection, and answers
    /// from another are treated as failures, so a quick reconnect racing the
    /// `Down`/`Up` events cannot leave a stale state behind.
    generation: u64,
    /// Since the last `Up`, the reconciler has caught up at least once.
    synced: bool,
    held: HeldCounts,
}

impl Registry {
    /// Adds `member` to `topic`. Returns `None` when the broker already holds
    /// the topic (the member is active and `ack` already queued), or a
    /// [`Confirmation`] to wait for.
    pub fn subscribe(
        &mut self,
        member: Arc<Member>,
        topic: Topic,
        ack: Frame,
    ) -> Option<Confirmation> {
        let entry = self.entries.entry(topic.clone()).or_insert_with(Entry::new);
        let (done, confirmation) = oneshot::channel();
        let waiter = Waiter { member, ack, done };
        if entry.held == Held::Present {
            entry.activate(waiter);
            entry.rebuild_snapshot();
            return None;
        }
        entry.pending.insert(waiter.member.id, waiter);
        self.mark_dirty(&topic);
        Some(confirmation)
    }

    /// Removes `member_id` from `topic`.
    pub fn unsubscribe(&mut self, member_id: u64, topic: &Topic) -> Removed {
        let Some(entry) = self.entries.get_mut(topic) else {
            return Removed::NotFound;
        };
        let removed = if entry.pending.remove(&member_id).is_some() {
            Removed::Pending
        } else if entry.active.remove(&member_id).is_some() {
            entry.rebuild_snapshot();
            Removed::Active
        } else {
            Removed::NotFound
        };
        if !entry.wanted() {
            self.mark_dirty(topic);
        }
        removed
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
    pub fn take_changes(&mut self, max: usize) -> (u64, Changes) {
        let mut changes = Changes::default();
        if !self.up {
            return (self.generation, changes);
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
                    entry.held = Held::Subscribing;
                    changes.subscribe.push(topic);
                }
                (false, Held::Present) => {
                    entry.held = Held::Unsubscribing;
                    changes.unsubscribe.push(topic);
                }
                (false, Held::Absent) => {
                    self.entries.remove(&topic);
                }
                _ => {}
            }
        }
        if changes.subscribe.is_empty() && changes.unsubscribe.is_empty() && self.dirty.is_empty() {
            self.synced = true;
        }
        (self.generation, changes)
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
        self.up = true;
        self.generation = generation;
        self.synced = false;
        let topics: Vec<Topic> = self.entries.keys().cloned().collect();
        for topic in topics {
            self.set_held(&topic, Held::Absent);
            self.mark_dirty(&topic);
        }
    }

    /// The broker connection is gone, and with it everything it held.
    pub fn broker_down(&mut self) {
        self.up = false;
        self.synced = false;
        let topics: Vec<Topic> = self.entries.keys().cloned().collect();
        for topic in topics {
            self.set_held(&topic, Held::Absent);
        }
    }

    /// Connected and caught up: what `/readyz` reports.
    pub fn is_ready(&self) -> bool {
        self.up && self.synced
    }

    /// How many distinct topics the broker holds, by kind.
    pub fn held(&self) -> HeldCounts {
        self.held
    }

    /// Topics wanted locally (at least one member), for tests and diagnostics.
    pub fn wanted_topics(&self) -> Vec<Topic> {
        self.entries
            .iter()
            .filter(|(_, e)| e.wanted())
            .map(|(t, _)| t.clone())
            .collect()
    }
}
