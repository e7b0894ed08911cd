//! The embedded broker: Redis pub/sub semantics inside the process.
//!
//! Used when `WSGATE_REDIS_URL` is unset, so `cargo run` works with nothing
//! else installed. It keeps the node's channel and pattern sets and, on
//! publish, matches the channel exactly as Redis would (see [`crate::pattern`]),
//! reporting one [`BrokerMessage`] per matching subscription. It serves one node
//! only: there is nothing to share between processes.

use std::collections::HashSet;
use std::sync::Mutex;

use bytes::Bytes;
use futures_util::future::{self, BoxFuture, FutureExt};
use tokio::sync::mpsc;

use super::{Broker, BrokerError, BrokerEvent, BrokerMessage, Changes, EventSink, Topic};
use crate::metrics::Metrics;
use crate::pattern;

/// The embedded broker never reconnects: it has one generation.
const GENERATION: u64 = 1;

/// In-process broker; see the module docs.
pub struct MemoryBroker {
    /// The node's subscriptions. A plain mutex: held only to read or update the
    /// sets, never across an await.
    subscriptions: Mutex<Subscriptions>,
    /// Behind its own mutex because publishes arrive from many HTTP tasks;
    /// held only for non-blocking `try_send`s.
    events: Mutex<EventSink>,
    /// `wsgate_redis_numpat`: here, the patterns this broker holds.
    numpat: prometheus::IntGauge,
}

#[derive(Default)]
struct Subscriptions {
    channels: HashSet<Bytes>,
    patterns: HashSet<Bytes>,
}

impl MemoryBroker {
    /// Creates the broker and reports it up at once: there is no connection to wait for.
    pub fn new(events: mpsc::Sender<BrokerEvent>, metrics: Metrics) -> MemoryBroker {
        // The channel is new and empty, so this cannot find it full; if the
        // receiver is already gone there is nobody to tell.
        let _ = events.try_send(BrokerEvent::Up {
            generation: GENERATION,
        });
        metrics.broker_up.set(1);
        MemoryBroker {
            subscriptions: Mutex::new(Subscriptions::default()),
            numpat: metrics.redis_numpat.clone(),
            events: Mutex::new(EventSink::new(events, metrics)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Subscriptions> {
        // A panic while holding this lock cannot leave the sets half-updated in
        // a way that matters (each operation is one insert/remove), so recover.
        self.subscriptions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every subscription `channel` reaches, as Redis would report them.
    fn matching(&self, channel: &[u8]) -> Vec<Topic> {
        let subs = self.lock();
        let mut out = Vec::new();
        if subs.channels.contains(channel) {
            out.push(Topic::Channel(Bytes::copy_from_slice(channel)));
        }
        for p in &subs.patterns {
            if pattern::matches(p, channel) {
                out.push(Topic::Pattern(p.clone()));
            }
        }
        out
    }
}

impl Broker for MemoryBroker {
    fn apply(
        &self,
        _generation: u64,
        changes: Changes,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        let mut subs = self.lock();
        for t in changes.unsubscribe {
            match t {
                Topic::Channel(n) => subs.channels.remove(&n),
                Topic::Pattern(n) => subs.patterns.remove(&n),
            };
        }
        for t in changes.subscribe {
            match t {
                Topic::Channel(n) => subs.channels.insert(n),
                Topic::Pattern(n) => subs.patterns.insert(n),
            };
        }
        self.numpat.set(subs.patterns.len() as i64);
        future::ready(Ok(())).boxed()
    }

    fn publish(
        &self,
        channel: Bytes,
        payload: Bytes,
    ) -> BoxFuture<'static, Result<u64, BrokerError>> {
        let topics = self.matching(&channel);
        let receivers = topics.len() as u64;
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        for topic in topics {
            let msg = BrokerMessage {
                topic,
                channel: channel.clone(),
                payload: payload.clone(),
            };
            // Only fails when the hub is gone (shutting down): nobody to deliver to.
            let _ = events.message(msg);
        }
        drop(events);
        future::ready(Ok(receivers)).boxed()
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}
