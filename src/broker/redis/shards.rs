//! Client-side sharding over independent Redis servers
//! (`WSGATE_REDIS_SHARDS`), as Centrifugo does for throughput without Redis
//! Cluster: one [`RedisBroker`] per server, behind one [`Broker`] for the hub.
//!
//! An exact channel lives on one server, `jump(fnv1a64(name), N)`
//! ([`jump`](super::jump)): its subscription, its publishes and its history.
//! A pattern can match channels of every server, so each pattern is held on
//! every server. Each shard runs K + 1 links: local link 0 holds its exact
//! channels, local links 1..=K the patterns (spread by the same hash as with
//! one Redis). The hub sees N + K links:
//!
//! - link `s` (below N): shard `s`'s channel link, passed through as it is;
//!   a shard that fails interrupts only its own channels.
//! - link `N + j`: pattern link `j`, the *same* local link `1 + j` on every
//!   shard, folded into one. It is up while every shard's copy is; when one
//!   copy fails the hub hears `Down` once, the other copies are reset (they
//!   drop their connection, so none keeps patterns the hub thinks gone), and
//!   `Up` comes once every copy has reconnected: the hub then resubscribes
//!   the patterns on all of them as one resync, with its gap notices.
//!   A pattern's subscribers thus hear `interrupted` when any server fails:
//!   they miss that server's messages until it is back.
//!
//! `/readyz` follows the hub's rule: ready while any link holding topics is
//! up, so one failed server takes only its channels (and the patterns) out.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use bytes::Bytes;
use futures_util::future::{join_all, BoxFuture, FutureExt};
use tokio::sync::{mpsc, oneshot};

use super::jump::jump;
use super::{link_for, stable_hash, RedisBroker, RedisConfigError, RedisOptions, Request, Role};
use crate::broker::{
    Applied, Broker, BrokerError, BrokerEvent, Changes, EventSink, Publication, PublishError,
    StateMap, Topic,
};
use crate::history::{Query, Read, Rules};
use crate::metrics::Metrics;

/// The shard (index into the `WSGATE_REDIS_SHARDS` list) that owns exact
/// channel `channel` among `shards`: jump consistent hash of the channel
/// name's FNV-1a 64-bit hash. The gateway's own channels (`wsgate:...`,
/// `/wsgate/...`: node channels, the service directory's events) stay on
/// shard 0, the node-wide Redis, whose directory scripts publish them there.
/// Public so that tests and tools agree with the node.
pub fn shard_for(channel: &[u8], shards: usize) -> usize {
    if RESERVED.iter().any(|p| channel.starts_with(p)) {
        return 0;
    }
    jump(stable_hash(channel), shards)
}

/// Prefixes of the gateway's own channels, pinned to shard 0.
const RESERVED: [&[u8]; 2] = [b"wsgate:", b"/wsgate/"];

/// One pattern link as the hub sees it: the same local link on every shard.
struct Folded {
    /// Each shard's current connection generation of that link, `None`
    /// while it is down or has been told to reset and not reconnected since.
    copies: Vec<Option<u64>>,
    /// Whether the hub was told `Up` last (rather than `Down`).
    up: bool,
    /// The generation the hub was given with the last `Up`.
    generation: u64,
}

/// What every shard's event remapping shares.
struct Fold {
    shards: usize,
    pattern_links: Mutex<Vec<Folded>>,
    /// Each shard's link queues, for resets; set once every shard started.
    queues: OnceLock<Vec<Vec<mpsc::WeakSender<Request>>>>,
}

/// Locks a plain mutex, reusing it after a panic elsewhere (every critical
/// section leaves it consistent).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Fold {
    /// Shard `shard`'s local state event, in the hub's numbering; `None`
    /// when it changes nothing the hub sees.
    fn remap(&self, shard: usize, event: BrokerEvent) -> Option<BrokerEvent> {
        let local = match &event {
            BrokerEvent::Up { link, .. }
            | BrokerEvent::Down { link }
            | BrokerEvent::Reconnecting { link } => *link,
            _ => return Some(event),
        };
        if local == 0 {
            return Some(match event {
                BrokerEvent::Up { generation, .. } => BrokerEvent::Up {
                    link: shard,
                    generation,
                },
                BrokerEvent::Down { .. } => BrokerEvent::Down { link: shard },
                _ => BrokerEvent::Reconnecting { link: shard },
            });
        }
        let j = local - 1;
        let link = self.shards + j;
        let mut folded = lock(&self.pattern_links);
        let f = folded.get_mut(j)?;
        match event {
            BrokerEvent::Up { generation, .. } => {
                *f.copies.get_mut(shard)? = Some(generation);
                if f.up || f.copies.iter().any(Option::is_none) {
                    return None;
                }
                f.up = true;
                f.generation += 1;
                Some(BrokerEvent::Up {
                    link,
                    generation: f.generation,
                })
            }
            BrokerEvent::Down { .. } => {
                *f.copies.get_mut(shard)? = None;
                if !f.up {
                    return None;
                }
                f.up = false;
                for (other, copy) in f.copies.iter_mut().enumerate() {
                    if let Some(generation) = copy.take() {
                        self.reset(other, local, generation);
                    }
                }
                Some(BrokerEvent::Down { link })
            }
            _ => (!f.up).then_some(BrokerEvent::Reconnecting { link }),
        }
    }

    /// Tells shard `shard`'s link `local` to drop connection `generation`
    /// (queued behind any batch already sent to it, so nothing applied to
    /// that connection survives).
    fn reset(&self, shard: usize, local: usize, generation: u64) {
        let Some(queue) = self
            .queues
            .get()
            .and_then(|q| q.get(shard))
            .and_then(|q| q.get(local))
            .and_then(mpsc::WeakSender::upgrade)
        else {
            return;
        };
        let (done, _) = oneshot::channel();
        tokio::spawn(async move {
            let _ = queue
                .send(Request {
                    generation,
                    changes: Changes::default(),
                    done,
                    reset: true,
                })
                .await;
        });
    }

    /// The generation of each shard's copy of pattern link `j`, if the hub's
    /// `generation` of it is still current.
    fn copies(&self, j: usize, generation: u64) -> Option<Vec<u64>> {
        let folded = lock(&self.pattern_links);
        let f = folded
            .get(j)
            .filter(|f| f.up && f.generation == generation)?;
        f.copies.iter().copied().collect()
    }
}

/// The node's broker over `WSGATE_REDIS_SHARDS`.
pub struct ShardedBroker {
    shards: Vec<RedisBroker>,
    /// K: pattern links per shard.
    pattern_links: usize,
    fold: Arc<Fold>,
    history: Rules,
    /// Always empty: presence over client-side shards is refused at start-up
    /// (`WSGATE_PRESENCE` with `WSGATE_REDIS_SHARDS`, docs/presence.md).
    presence: crate::presence::Rules,
}

impl ShardedBroker {
    /// Starts one [`RedisBroker`] per URL (K + 1 links each, K from
    /// `options.pubsub_connections`), their events remapped onto `events`.
    pub fn start(
        urls: &[String],
        events: EventSink,
        metrics: Metrics,
        options: RedisOptions,
    ) -> Result<ShardedBroker, RedisConfigError> {
        let n = urls.len().max(1);
        let k = options.pubsub_connections.clamp(1, super::MAX_LINKS - 1);
        let fold = Arc::new(Fold {
            shards: n,
            pattern_links: Mutex::new(
                (0..k)
                    .map(|_| Folded {
                        copies: vec![None; n],
                        up: false,
                        generation: 0,
                    })
                    .collect(),
            ),
            queues: OnceLock::new(),
        });
        // Each pattern link keeps the budget it would have with one Redis;
        // link 0 (channels) gets a share too, which it never uses.
        let per_link = options.max_redis_patterns.div_ceil(k).max(1);
        let shard_options = RedisOptions {
            pubsub_connections: k + 1,
            max_redis_patterns: per_link * (k + 1),
            ..options.clone()
        };
        let mut shards = Vec::with_capacity(n);
        for (i, url) in urls.iter().enumerate() {
            let remap: StateMap = {
                let fold = fold.clone();
                Arc::new(move |event| fold.remap(i, event))
            };
            shards.push(RedisBroker::start_as(
                url,
                events.sibling().remapped(remap),
                metrics.clone(),
                shard_options.clone(),
                Role::Shard(i),
            )?);
        }
        let _ = fold
            .queues
            .set(shards.iter().map(RedisBroker::weak_links).collect());
        Ok(ShardedBroker {
            shards,
            pattern_links: k,
            fold,
            history: options.history,
            presence: crate::presence::Rules::default(),
        })
    }

    fn owner(&self, channel: &[u8]) -> usize {
        shard_for(channel, self.shards.len())
    }
}

impl Broker for ShardedBroker {
    fn apply(
        &self,
        link: usize,
        generation: u64,
        changes: Changes,
    ) -> BoxFuture<'static, Result<Applied, BrokerError>> {
        let n = self.shards.len();
        if let Some(shard) = self.shards.get(link) {
            return shard.apply(0, generation, changes);
        }
        let j = link - n;
        let Some(copies) = self.fold.copies(j, generation) else {
            return async { Err(BrokerError::Unavailable) }.boxed();
        };
        let applies: Vec<_> = self
            .shards
            .iter()
            .zip(copies)
            .map(|(shard, g)| shard.apply(1 + j, g, changes.clone()))
            .collect();
        async move {
            let mut applied = Applied::default();
            for result in join_all(applies).await {
                // A refusal on any server refuses the pattern: it would miss
                // that server's channels.
                for (topic, why) in result?.refused {
                    if !applied.refused.iter().any(|(t, _)| *t == topic) {
                        applied.refused.push((topic, why));
                    }
                }
            }
            Ok(applied)
        }
        .boxed()
    }

    fn links(&self) -> usize {
        self.shards.len() + self.pattern_links
    }

    /// A channel on its owner's channel link; a pattern on its folded link.
    fn link_of(&self, topic: &Topic) -> usize {
        match topic {
            Topic::Channel(name) => self.owner(name),
            Topic::Pattern(_) => self.shards.len() + link_for(topic, self.pattern_links),
        }
    }

    fn shard_of(&self, channel: &[u8]) -> Option<(usize, String)> {
        let i = self.owner(channel);
        let shard = self.shards.get(i)?;
        Some((i, format!("redis://{}", shard.addr())))
    }

    /// Each message to its channel's owner; one pipeline per server, all
    /// at once, the results put back in the callers' order (messages of one
    /// channel keep theirs: they all go to the same server, in order).
    fn publish_batch(
        &self,
        messages: Vec<Publication>,
    ) -> BoxFuture<'static, Vec<Result<u64, PublishError>>> {
        let total = messages.len();
        let mut per_shard: Vec<(Vec<usize>, Vec<Publication>)> =
            (0..self.shards.len()).map(|_| Default::default()).collect();
        for (at, m) in messages.into_iter().enumerate() {
            let (places, batch) = &mut per_shard[self.owner(&m.channel)];
            places.push(at);
            batch.push(m);
        }
        let sends: Vec<_> = per_shard
            .into_iter()
            .zip(&self.shards)
            .filter(|((places, _), _)| !places.is_empty())
            .map(|((places, batch), shard)| {
                let sent = shard.publish_batch(batch);
                async move { (places, sent.await) }
            })
            .collect();
        async move {
            let mut out: Vec<Result<u64, PublishError>> =
                (0..total).map(|_| Err(PublishError::Unavailable)).collect();
            for (places, results) in join_all(sends).await {
                for (at, result) in places.into_iter().zip(results) {
                    if let Some(slot) = out.get_mut(at) {
                        *slot = result;
                    }
                }
            }
            out
        }
        .boxed()
    }

    fn history(&self) -> &Rules {
        &self.history
    }

    /// From the channel's owner, which holds its history.
    fn read_history(
        &self,
        channel: Bytes,
        query: Query,
    ) -> BoxFuture<'static, Result<Read, BrokerError>> {
        match self.shards.get(self.owner(&channel)) {
            Some(shard) => shard.read_history(channel, query),
            None => async { Err(BrokerError::Unavailable) }.boxed(),
        }
    }

    fn presence(&self) -> &crate::presence::Rules {
        &self.presence
    }

    fn name(&self) -> &'static str {
        "redis-shards"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fold(shards: usize) -> Fold {
        Fold {
            shards,
            pattern_links: Mutex::new(vec![Folded {
                copies: vec![None; shards],
                up: false,
                generation: 0,
            }]),
            queues: OnceLock::new(),
        }
    }

    fn up(link: usize, generation: u64) -> BrokerEvent {
        BrokerEvent::Up { link, generation }
    }

    fn show(e: Option<BrokerEvent>) -> String {
        format!("{e:?}")
    }

    /// Channel links pass through renumbered; a pattern link is up once
    /// every shard's copy is, down once one fails, and up again (a new
    /// generation) only when every copy reconnected since.
    #[test]
    fn pattern_links_fold_over_the_shards() {
        let f = fold(3);
        assert_eq!(show(f.remap(2, up(0, 7))), show(Some(up(2, 7))));
        assert_eq!(show(f.remap(0, up(1, 1))), "None");
        assert_eq!(show(f.remap(1, up(1, 1))), "None");
        assert_eq!(show(f.remap(2, up(1, 1))), show(Some(up(3, 1))));
        assert_eq!(f.copies(0, 1), Some(vec![1, 1, 1]));
        let down = f.remap(1, BrokerEvent::Down { link: 1 });
        assert_eq!(show(down), show(Some(BrokerEvent::Down { link: 3 })));
        assert_eq!(f.copies(0, 1), None);
        // The others were told to reset: their late `Down`s change nothing.
        assert_eq!(show(f.remap(0, BrokerEvent::Down { link: 1 })), "None");
        assert_eq!(show(f.remap(1, up(1, 2))), "None");
        assert_eq!(show(f.remap(0, up(1, 2))), "None");
        assert_eq!(show(f.remap(2, up(1, 2))), show(Some(up(3, 2))));
        assert_eq!(f.copies(0, 2), Some(vec![2, 2, 2]));
    }

    /// The owner is the jump hash of the name's FNV-1a hash.
    #[test]
    fn channels_are_owned_by_their_jump_hash() {
        assert_eq!(shard_for(b"anything", 1), 0);
        assert_eq!(shard_for(b"news", 3), jump(stable_hash(b"news"), 3));
        assert_eq!(shard_for(b"/wsgate/services/online", 3), 0);
        assert_eq!(shard_for(b"wsgate:node:n1", 3), 0);
    }
}
