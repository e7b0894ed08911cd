//! One node's presence: its own members, kept in memory, written to the
//! broker in batches by one task (`docs/presence.md`).
//!
//! Sessions call [`Tracker::join`] and [`Tracker::leave`] without waiting
//! (a short lock, no I/O); the task wakes, takes everything pending and
//! sends it in one [`Batch`], and otherwise renews the node's lease every
//! third of it: one round trip per node per period, whatever the number
//! of members. The table in memory is the truth: when the broker loses the
//! node (Redis restarted, or the lease ran out while the node was stalled)
//! or a batch fails, the next batch is a reset holding the whole table.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tracing::{debug, warn};

use super::{envelope, event, stored, Batch, Change, Op, Rules, Synced, Who};
use crate::broker::Broker;

/// Most changes (and, separately, events) waiting for the next batch: past
/// this, the table is resent whole (a reset) and the events are dropped
/// (counted in the log), so a burst of joins cannot grow memory unbounded.
pub const MAX_PENDING: usize = 65_536;

/// Most member changes one batch carries; the rest follow at once.
pub const MAX_BATCH_OPS: usize = 8_192;

/// After a failed batch, how long before the next try.
const RETRY: Duration = Duration::from_millis(250);

/// A node's presence: see the module docs. Cloning shares it.
#[derive(Clone)]
pub struct Tracker {
    shared: Arc<Shared>,
}

struct Shared {
    rules: Rules,
    node: Arc<str>,
    state: Mutex<State>,
    wake: Notify,
}

#[derive(Default)]
struct State {
    /// channel -> client -> what the broker stores for it.
    table: HashMap<Bytes, HashMap<String, Bytes>>,
    ops: Vec<Op>,
    events: Vec<(Bytes, Bytes)>,
    /// The next batch resends the whole table.
    reset: bool,
    /// Events dropped since the last warning.
    dropped_events: u64,
}

impl Tracker {
    /// Starts the node's presence task over `broker` (whose
    /// [`Broker::presence`] rules it serves), renewing a lease of `lease`.
    pub fn start(broker: Arc<dyn Broker>, node: &str, lease: Duration) -> Tracker {
        let shared = Arc::new(Shared {
            rules: broker.presence().clone(),
            node: node.into(),
            state: Mutex::new(State {
                reset: true,
                ..State::default()
            }),
            wake: Notify::new(),
        });
        let weak = Arc::downgrade(&shared);
        tokio::spawn(run(weak, broker, lease));
        Tracker { shared }
    }

    /// The channels that keep presence.
    pub fn rules(&self) -> &Rules {
        &self.shared.rules
    }

    /// `who` subscribed to the presence channel `channel` (a channel
    /// [`Tracker::rules`] covers).
    pub fn join(&self, channel: &Bytes, who: &Who) {
        let member = who.json();
        let value = stored(&self.shared.node, channel, &member);
        let ev = envelope(&event(Change::Join, channel, &member));
        let mut state = self.shared.lock();
        let members = state.table.entry(channel.clone()).or_default();
        if members.insert(who.client.clone(), value.clone()).is_some() {
            return;
        }
        state.push_op(Op::Join {
            channel: channel.clone(),
            client: who.client.clone(),
            stored: value,
        });
        state.push_event(channel.clone(), ev);
        drop(state);
        self.shared.wake.notify_one();
    }

    /// The member `client` left `channel`; nothing if it was not there.
    pub fn leave(&self, channel: &Bytes, client: &str) {
        let mut state = self.shared.lock();
        let Some(members) = state.table.get_mut(channel) else {
            return;
        };
        let Some(value) = members.remove(client) else {
            return;
        };
        let last = members.is_empty();
        if last {
            state.table.remove(channel);
        }
        // The stored value is `<node>\n<leave event>`: the event is published as is.
        let leave = value
            .iter()
            .position(|b| *b == b'\n')
            .map(|nl| value.slice(nl + 1..))
            .unwrap_or_default();
        let mut ev = bytes::BytesMut::with_capacity(super::MAGIC.len() + leave.len());
        ev.extend_from_slice(super::MAGIC);
        ev.extend_from_slice(&leave);
        state.push_op(Op::Leave {
            channel: channel.clone(),
            client: client.to_owned(),
            last,
        });
        state.push_event(channel.clone(), ev.freeze());
        drop(state);
        self.shared.wake.notify_one();
    }

    /// This node's members (for tests and the metrics of an operator).
    pub fn local_members(&self) -> usize {
        self.shared.lock().table.values().map(HashMap::len).sum()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next batch: a reset with the whole table, or the pending ops
    /// (at most [`MAX_BATCH_OPS`]); `more`: ops remain for another batch.
    fn take(&self, lease: Duration) -> (Batch, bool) {
        let mut state = self.lock();
        let reset = std::mem::take(&mut state.reset);
        let (ops, more) = if reset {
            state.ops.clear();
            let ops = state
                .table
                .iter()
                .flat_map(|(channel, members)| {
                    members.iter().map(|(client, value)| Op::Join {
                        channel: channel.clone(),
                        client: client.clone(),
                        stored: value.clone(),
                    })
                })
                .collect();
            (ops, false)
        } else if state.ops.len() > MAX_BATCH_OPS {
            let rest = state.ops.split_off(MAX_BATCH_OPS);
            (std::mem::replace(&mut state.ops, rest), true)
        } else {
            (std::mem::take(&mut state.ops), false)
        };
        let events = if more {
            Vec::new() // sent with the batch that ends the run of ops
        } else {
            std::mem::take(&mut state.events)
        };
        if state.dropped_events > 0 {
            warn!(
                dropped = state.dropped_events,
                "presence events dropped: too many pending"
            );
            state.dropped_events = 0;
        }
        let batch = Batch {
            node: self.node.clone(),
            lease,
            reset,
            ops,
            events,
        };
        (batch, more)
    }
}

impl State {
    fn push_op(&mut self, op: Op) {
        if self.reset {
            return; // the reset sends the table, which has this change
        }
        if self.ops.len() >= MAX_PENDING {
            self.ops.clear();
            self.reset = true;
            return;
        }
        self.ops.push(op);
    }

    fn push_event(&mut self, channel: Bytes, event: Bytes) {
        if self.events.len() >= MAX_PENDING {
            self.dropped_events += 1;
            return;
        }
        self.events.push((channel, event));
    }
}

/// The node's presence task: a batch whenever something is pending, and a
/// renewal every third of the lease; ends with the tracker.
async fn run(shared: std::sync::Weak<Shared>, broker: Arc<dyn Broker>, lease: Duration) {
    let period = lease / 3;
    let mut again = true; // the first batch (a reset) goes at once
    loop {
        if !again {
            let Some(s) = shared.upgrade() else { return };
            let woken = tokio::time::timeout(period, s.wake.notified()).await;
            drop(s);
            debug!(woken = woken.is_ok(), "presence batch");
        }
        let Some(s) = shared.upgrade() else { return };
        let (batch, more) = s.take(lease);
        drop(s);
        let reset = batch.reset;
        let outcome = tokio::time::timeout(period.max(RETRY), broker.sync_presence(batch)).await;
        again = more;
        match outcome {
            Ok(Ok(Synced::Done)) => {}
            Ok(Ok(Synced::Lost)) => {
                warn!("the broker lost this node's presence; resending it");
                mark_reset(&shared);
                again = true;
            }
            Ok(Err(e)) => {
                warn!(cause = %e, reset, "presence batch failed; resending the table");
                mark_reset(&shared);
                tokio::time::sleep(RETRY).await;
                again = true;
            }
            Err(_) => {
                warn!(reset, "presence batch timed out; resending the table");
                mark_reset(&shared);
                again = true;
            }
        }
    }
}

fn mark_reset(shared: &std::sync::Weak<Shared>) {
    if let Some(s) = shared.upgrade() {
        let mut state = s.lock();
        state.reset = true;
        state.ops.clear();
    }
}
