//! The embedded broker: Redis pub/sub semantics inside the process.
//!
//! Used when `WSGATE_REDIS_URL` is unset, so `cargo run` works with nothing
//! else installed. It keeps the node's channel and pattern sets and, on
//! publish, matches the channel exactly as Redis would (see [`crate::pattern`]),
//! reporting one [`BrokerMessage`] per matching subscription. It serves one node
//! only: there is nothing to share between processes.
//!
//! Idempotency keys live in a map bounded in time (the TTL) and in entries
//! ([`MAX_IDEMPOTENCY_KEYS`], oldest evicted first), the in-process
//! counterpart of the keys the Redis broker keeps in Redis.
//!
//! History channels (`WSGATE_HISTORY`) keep their messages here as the Redis
//! broker keeps them in Streams ([`Histories`]): the same dense offsets, an
//! epoch per history (new when it expired), the same envelope on the
//! message the hub receives, and the same reads.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{self, BoxFuture, FutureExt};

use super::{
    Applied, Broker, BrokerError, BrokerEvent, BrokerMessage, Changes, EventSink, Publication,
    PublishError, Topic,
};
use crate::history::{self, Entry, Position, Query, Read, Rules};
use crate::metrics::Metrics;
use crate::pattern;

/// The embedded broker never reconnects: it has one generation.
const GENERATION: u64 = 1;

/// Most idempotency keys remembered at once. When full, the oldest key is
/// forgotten before its TTL (a retry with it would publish again): at most
/// channel + key bytes (512 by the HTTP limits) plus ~100 bytes each.
pub const MAX_IDEMPOTENCY_KEYS: usize = 65_536;

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
    /// Recent idempotency keys. Held across a whole publish (check, deliver,
    /// remember) so two publishes with the same key cannot both go out; never
    /// across an await.
    idempotency: Mutex<Idempotency>,
    /// `WSGATE_HISTORY`.
    rules: Rules,
    /// History channels' messages. Locked while a history publish is
    /// appended *and* handed to the hub, so offsets reach the hub in order;
    /// never across an await.
    histories: Mutex<Histories>,
    /// `WSGATE_PRESENCE`.
    presence_rules: crate::presence::Rules,
    /// Presence channels' members: channel -> client -> stored value
    /// (`crate::presence::stored`). One node, so no lease: a member goes
    /// when its session leaves. Never locked across an await.
    presence: Mutex<HashMap<Bytes, HashMap<String, Bytes>>>,
}

/// Most history channels kept at once: when full, expired ones go first,
/// then the one closest to expiry (its epoch is lost, as a TTL would).
pub const MAX_HISTORY_CHANNELS: usize = 65_536;

/// Every history channel's stored messages.
#[derive(Default)]
struct Histories {
    channels: HashMap<Bytes, Stored>,
}

/// One channel's history: the in-memory counterpart of its Stream and meta key.
struct Stored {
    epoch: Bytes,
    top: u64,
    entries: VecDeque<Entry>,
    expires: Instant,
}

impl Histories {
    /// `channel`'s live history, created (new epoch, empty) if it has none
    /// or it expired.
    fn live(&mut self, channel: &Bytes, ttl: Duration, now: Instant) -> &mut Stored {
        let stale = self.channels.get(channel).is_none_or(|s| s.expires <= now);
        if stale {
            if !self.channels.contains_key(channel) && self.channels.len() >= MAX_HISTORY_CHANNELS {
                self.channels.retain(|_, s| s.expires > now);
                if self.channels.len() >= MAX_HISTORY_CHANNELS {
                    let first = self
                        .channels
                        .iter()
                        .min_by_key(|(_, s)| s.expires)
                        .map(|(c, _)| c.clone());
                    if let Some(first) = first {
                        self.channels.remove(&first);
                    }
                }
            }
            let old = self.channels.get(channel).map(|s| s.epoch.clone());
            self.channels.insert(
                channel.clone(),
                Stored {
                    epoch: new_epoch(old.as_ref()),
                    top: 0,
                    entries: VecDeque::new(),
                    expires: now + ttl,
                },
            );
        }
        match self.channels.get_mut(channel) {
            Some(stored) => stored,
            None => unreachable!("inserted above"),
        }
    }
}

/// A random epoch: std's per-process random hasher keys, over a counter and
/// the clock (no RNG crate for one value per history), never `old`.
fn new_epoch(old: Option<&Bytes>) -> Bytes {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        let epoch = Bytes::from(format!("{:016x}", h.finish()));
        if old != Some(&epoch) {
            return epoch;
        }
    }
}

/// Idempotency keys (per channel) seen within the TTL, with the receiver
/// count of their first publish.
struct Idempotency {
    ttl: Duration,
    max: usize,
    results: HashMap<(Bytes, Bytes), u64>,
    /// Insertion order, which is also expiry order (one TTL for all); each
    /// key of `results` appears here exactly once.
    order: VecDeque<(Instant, (Bytes, Bytes))>,
}

impl Idempotency {
    fn new(ttl: Duration, max: usize) -> Idempotency {
        Idempotency {
            ttl,
            max,
            results: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// The first result for `key`, if it is still remembered at `now`.
    fn get(&mut self, key: &(Bytes, Bytes), now: Instant) -> Option<u64> {
        while let Some((expires, _)) = self.order.front() {
            if *expires > now {
                break;
            }
            if let Some((_, old)) = self.order.pop_front() {
                self.results.remove(&old);
            }
        }
        self.results.get(key).copied()
    }

    /// Remembers `key` (not present: [`Idempotency::get`] just said so).
    fn insert(&mut self, key: (Bytes, Bytes), receivers: u64, now: Instant) {
        while self.order.len() >= self.max {
            if let Some((_, old)) = self.order.pop_front() {
                self.results.remove(&old);
            }
        }
        self.results.insert(key.clone(), receivers);
        self.order.push_back((now + self.ttl, key));
    }
}

#[derive(Default)]
struct Subscriptions {
    channels: HashSet<Bytes>,
    patterns: HashSet<Bytes>,
}

impl MemoryBroker {
    /// Creates the broker and reports it up at once: there is no connection to
    /// wait for. Idempotency keys are remembered for `idempotency_ttl`.
    pub fn new(mut events: EventSink, metrics: Metrics, idempotency_ttl: Duration) -> MemoryBroker {
        // The channel is new and empty, so this cannot find it full; if the
        // receiver is already gone there is nobody to tell.
        let _ = events.try_state(BrokerEvent::Up {
            link: 0,
            generation: GENERATION,
        });
        metrics.broker_up.with_label_values(&["0"]).set(1);
        metrics.broker_links_up.set(1);
        MemoryBroker {
            subscriptions: Mutex::new(Subscriptions::default()),
            numpat: metrics.redis_numpat.clone(),
            events: Mutex::new(events),
            idempotency: Mutex::new(Idempotency::new(idempotency_ttl, MAX_IDEMPOTENCY_KEYS)),
            rules: Rules::default(),
            histories: Mutex::new(Histories::default()),
            presence_rules: crate::presence::Rules::default(),
            presence: Mutex::new(HashMap::new()),
        }
    }

    /// Keeps presence for the channels `rules` (`WSGATE_PRESENCE`) name.
    pub fn with_presence(mut self, rules: crate::presence::Rules) -> MemoryBroker {
        self.presence_rules = rules;
        self
    }

    /// Keeps history for the channels `rules` (`WSGATE_HISTORY`) name.
    pub fn with_history(mut self, rules: Rules) -> MemoryBroker {
        self.rules = rules;
        self
    }

    /// Publishes one message: on a history channel, appended to its history
    /// and delivered in an envelope, both under the history lock.
    fn publish_one(&self, channel: Bytes, payload: Bytes) -> u64 {
        let Some(rule) = (!self.rules.is_empty())
            .then(|| self.rules.of(&channel))
            .flatten()
        else {
            return self.deliver(channel, payload);
        };
        let now = Instant::now();
        let mut histories = self.histories.lock().unwrap_or_else(|p| p.into_inner());
        let stored = histories.live(&channel, rule.ttl, now);
        stored.top += 1;
        stored.expires = now + rule.ttl;
        stored.entries.push_back(Entry {
            offset: stored.top,
            payload: payload.clone(),
        });
        while stored.entries.len() as u64 > rule.size {
            stored.entries.pop_front();
        }
        let position = Position {
            offset: stored.top,
            epoch: stored.epoch.clone(),
        };
        let receivers = self.deliver(channel, history::envelope(&position, &payload));
        drop(histories);
        receivers
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Subscriptions> {
        // A panic while holding this lock cannot leave the sets half-updated in
        // a way that matters (each operation is one insert/remove), so recover.
        self.subscriptions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands one message to every matching subscription; returns how many.
    fn deliver(&self, channel: Bytes, payload: Bytes) -> u64 {
        let topics = self.matching(&channel);
        let receivers = topics.len() as u64;
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        for topic in topics {
            let msg = BrokerMessage {
                topic,
                channel: channel.clone(),
                payload: payload.clone(),
                position: None,
            };
            // Only fails when the hub is gone (shutting down): nobody to deliver to.
            let _ = events.message(msg);
        }
        receivers
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
        _link: usize,
        _generation: u64,
        changes: Changes,
    ) -> BoxFuture<'static, Result<Applied, BrokerError>> {
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
        future::ready(Ok(Applied::default())).boxed()
    }

    fn publish_batch(
        &self,
        messages: Vec<Publication>,
    ) -> BoxFuture<'static, Vec<Result<u64, PublishError>>> {
        let mut idempotency = self.idempotency.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let results = messages
            .into_iter()
            .map(|m| {
                let Some(key) = m.idempotency_key else {
                    return Ok(self.publish_one(m.channel, m.payload));
                };
                let key = (m.channel, key);
                if let Some(first) = idempotency.get(&key, now) {
                    return Ok(first);
                }
                let receivers = self.publish_one(key.0.clone(), m.payload);
                idempotency.insert(key, receivers, now);
                Ok(receivers)
            })
            .collect();
        drop(idempotency);
        future::ready(results).boxed()
    }

    fn history(&self) -> &Rules {
        &self.rules
    }

    fn presence(&self) -> &crate::presence::Rules {
        &self.presence_rules
    }

    fn sync_presence(
        &self,
        batch: crate::presence::Batch,
    ) -> BoxFuture<'static, Result<crate::presence::Synced, BrokerError>> {
        use crate::presence::Op;
        let mut table = self.presence.lock().unwrap_or_else(|p| p.into_inner());
        if batch.reset {
            let prefix = format!("{}\n", batch.node);
            table.retain(|_, members| {
                members.retain(|_, v| !v.starts_with(prefix.as_bytes()));
                !members.is_empty()
            });
        }
        for op in batch.ops {
            match op {
                Op::Join {
                    channel,
                    client,
                    stored,
                } => {
                    table.entry(channel).or_default().insert(client, stored);
                }
                Op::Leave {
                    channel, client, ..
                } => {
                    if let Some(members) = table.get_mut(&channel) {
                        members.remove(&client);
                        if members.is_empty() {
                            table.remove(&channel);
                        }
                    }
                }
            }
        }
        drop(table);
        for (channel, event) in batch.events {
            self.deliver(channel, event);
        }
        future::ready(Ok(crate::presence::Synced::Done)).boxed()
    }

    fn read_presence(&self, channel: Bytes) -> BoxFuture<'static, Result<Vec<Bytes>, BrokerError>> {
        let table = self.presence.lock().unwrap_or_else(|p| p.into_inner());
        let found = table
            .get(&channel)
            .map(|members| {
                members
                    .values()
                    .filter_map(|v| {
                        let nl = v.iter().position(|b| *b == b'\n')?;
                        Some(v.slice(nl + 1..))
                    })
                    .collect()
            })
            .unwrap_or_default();
        future::ready(Ok(found)).boxed()
    }

    fn read_history(
        &self,
        channel: Bytes,
        query: Query,
    ) -> BoxFuture<'static, Result<Read, BrokerError>> {
        let Some(rule) = self.rules.of(&channel) else {
            return future::ready(Err(BrokerError::Refused(
                "no history for this channel".to_owned(),
            )))
            .boxed();
        };
        let mut histories = self.histories.lock().unwrap_or_else(|p| p.into_inner());
        let stored = histories.live(&channel, rule.ttl, Instant::now());
        let entries = match &query {
            Query::Latest { limit } => {
                let skip = stored.entries.len().saturating_sub(*limit);
                stored.entries.iter().skip(skip).cloned().collect()
            }
            Query::After {
                offset,
                epoch,
                limit,
            } => {
                if *epoch == stored.epoch && *offset > stored.top {
                    // The client saw more than we hold: history was reset.
                    stored.epoch = new_epoch(Some(&stored.epoch));
                }
                if *epoch != stored.epoch {
                    Vec::new()
                } else {
                    stored
                        .entries
                        .iter()
                        .filter(|e| e.offset > *offset)
                        .take(*limit)
                        .cloned()
                        .collect()
                }
            }
        };
        let read = Read {
            epoch: stored.epoch.clone(),
            top: stored.top,
            entries,
        };
        future::ready(Ok(read)).boxed()
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &'static str) -> (Bytes, Bytes) {
        (Bytes::from_static(b"c"), Bytes::from_static(k.as_bytes()))
    }

    #[test]
    fn idempotency_keys_expire_after_the_ttl() {
        let ttl = Duration::from_secs(10);
        let mut map = Idempotency::new(ttl, 100);
        let t0 = Instant::now();
        assert_eq!(map.get(&key("a"), t0), None);
        map.insert(key("a"), 3, t0);
        assert_eq!(map.get(&key("a"), t0 + ttl / 2), Some(3));
        // Another channel, same key: another entry.
        assert_eq!(
            map.get(&(Bytes::from_static(b"d"), Bytes::from_static(b"a")), t0),
            None
        );
        assert_eq!(map.get(&key("a"), t0 + ttl), None);
        assert!(map.results.is_empty() && map.order.is_empty());
        // Reinserted after expiry: remembered again, once.
        map.insert(key("a"), 4, t0 + ttl);
        assert_eq!(map.get(&key("a"), t0 + ttl), Some(4));
        assert_eq!(map.order.len(), 1);
    }

    #[test]
    fn idempotency_keys_are_bounded_in_number_oldest_first() {
        let mut map = Idempotency::new(Duration::from_secs(60), 3);
        let t0 = Instant::now();
        for (i, k) in ["a", "b", "c", "d"].into_iter().enumerate() {
            assert_eq!(map.get(&key(k), t0), None);
            map.insert(key(k), i as u64, t0);
        }
        assert_eq!(map.results.len(), 3);
        assert_eq!(map.order.len(), 3);
        assert_eq!(map.get(&key("a"), t0), None, "the oldest was evicted");
        assert_eq!(map.get(&key("b"), t0), Some(1));
        assert_eq!(map.get(&key("d"), t0), Some(3));
    }
}
