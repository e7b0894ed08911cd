//! The Redis broker: K dedicated pub/sub connections per node (*links*),
//! each owned by an actor ([`link`]), plus one connection for publishing.
//!
//! Why K: before Redis 7.2 a client's pattern set is a linked list, so a
//! `PSUBSCRIBE` of one pattern costs O(patterns that connection already
//! holds), and resubscribing P patterns on one connection costs O(P²) in
//! Redis (100k patterns: 32 s on 7.0). Spread over K connections, the same
//! resync costs O(P²/K). Every topic lives on exactly one link, chosen by a
//! stable hash of its name ([`RedisBroker::link_of`]): patterns spread over
//! all K, exact channels (O(1) per `SUBSCRIBE` in every Redis) stay on link
//! 0. Each link has its own refcounted subscriptions, batching, PING probes,
//! coalescing ([`cover`], with its share of `WSGATE_MAX_REDIS_PATTERNS`) and
//! gap notices; a link that fails reports `Down` for its own topics only.
//! `WSGATE_REDIS_PUBSUB_CONNECTIONS` sets K; by default it follows from how
//! many patterns the node may hold in Redis ([`auto_links`]), so a node that
//! coalesces into few Redis patterns keeps one connection.
//!
//! We speak RESP2 ourselves on these connections (see [`resp`]) rather than use
//! redis-rs's pub/sub types: those either do not reconnect or buffer pushes in
//! an unbounded channel, and they copy every payload. Publishing has its own
//! connection and task ([`publish`]), which knows whether a failed publish
//! reached Redis. Every connection of the node (these, and the Bayeux
//! handoff store's) is opened by [`conn`]: the same URL forms (single Redis,
//! Sentinel, TLS: docs/redis.md) and handshake.

pub mod cluster;
pub(crate) mod commands;
pub(crate) mod conn;
mod cover;
pub(crate) mod history;
pub mod jump;
mod link;
pub(crate) mod presence;
mod publish;
pub(crate) mod resp;
mod sentinel;
pub mod shards;
pub mod slot;
mod stream;

use std::time::Duration;

use bytes::Bytes;

use futures_util::future::{BoxFuture, FutureExt};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, Instrument};

use super::{Applied, Broker, BrokerError, Changes, EventSink, Publication, PublishError, Topic};
use crate::history::{Query, Read, Rules};
use crate::metrics::Metrics;
pub use conn::Security;
use conn::Target;
use link::{Actor, Link, Siblings};

/// Requests waiting for one link's actor. Only the hub's reconciler sends,
/// one batch per link at a time, so a handful is plenty; a full channel
/// makes the sender wait.
const REQUEST_CAPACITY: usize = 16;
/// What subscribers of a topic refused by a Redis ACL are told.
pub const NOT_PERMITTED: &str = "not permitted by Redis";

/// Most patterns [`auto_links`] lets one link hold: measured on Redis 7.0
/// (docs/benchmarks.md, "Pattern resync over K connections"), where each
/// `PSUBSCRIBE` scans the connection's list, a few hundred patterns per
/// connection keep that scan below Redis's fixed cost per command.
pub const AUTO_PATTERNS_PER_LINK: usize = 512;
/// Most links [`auto_links`] opens.
pub const AUTO_MAX_LINKS: usize = 256;
/// Most links `WSGATE_REDIS_PUBSUB_CONNECTIONS` may ask for.
pub const MAX_LINKS: usize = 1024;

/// The default K: enough links that none holds more than
/// [`AUTO_PATTERNS_PER_LINK`] Redis patterns when the node holds all it may
/// (`WSGATE_MAX_PATTERNS` client patterns, coalesced into at most
/// `WSGATE_MAX_REDIS_PATTERNS`), at most [`AUTO_MAX_LINKS`]. With the
/// defaults (4096 and 64) that is one link: coalescing already keeps what
/// one connection holds small.
pub fn auto_links(max_patterns: usize, max_redis_patterns: usize) -> usize {
    let held = max_patterns.min(max_redis_patterns);
    held.div_ceil(AUTO_PATTERNS_PER_LINK)
        .clamp(1, AUTO_MAX_LINKS)
}

/// Why the Redis URL cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RedisConfigError {
    /// redis-rs could not parse the URL.
    #[error("invalid redis URL: {0}")]
    Url(#[from] redis::RedisError),
    /// A scheme or address form the node does not speak.
    #[error(
        "only redis://, rediss://, redis+sentinel:// and rediss+sentinel:// URLs are supported"
    )]
    Unsupported,
    /// A `redis+sentinel://` URL that does not name sentinels and a master.
    #[error("invalid sentinel URL ({0}): the form is redis+sentinel://[user:password@]host:port[,host:port...]/master[/db]")]
    Sentinel(String),
    /// A `WSGATE_REDIS_CLUSTER` URL that does not name seed nodes.
    #[error("invalid cluster URL ({0}): the form is redis[s]://[user:password@]host:port[,host:port...]")]
    Cluster(String),
    /// A TLS file is missing or unusable (the node refuses to start).
    #[error("redis TLS: {0}")]
    Tls(String),
}

/// Timing and naming of the node's Redis connections (from [`crate::Config`]).
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// How often each pub/sub connection is probed with PING.
    pub probe_interval: Duration,
    /// How long a probe, a connect or a write may take before the connection
    /// counts as dead.
    pub probe_timeout: Duration,
    /// Reconnect backoff cap (an outage costs at most this much extra).
    pub backoff_max: Duration,
    /// `WSGATE_NODE_ID`: connections are named `wsgate:<node_id>:<role>`.
    pub node_id: String,
    /// How long publish idempotency keys live in Redis.
    pub idempotency_ttl: Duration,
    /// `WSGATE_MAX_REDIS_PATTERNS`: patterns this node may hold in Redis,
    /// shared evenly by the links; client patterns beyond are coalesced
    /// (see [`cover`]).
    pub max_redis_patterns: usize,
    /// K, the pub/sub connections (`WSGATE_REDIS_PUBSUB_CONNECTIONS`, or
    /// [`auto_links`]); at least 1.
    pub pubsub_connections: usize,
    /// `WSGATE_HISTORY`: channels whose publishes go through the Function
    /// library and whose history can be read ([`history`]).
    pub history: Rules,
    /// `WSGATE_PRESENCE`: channels whose members are kept ([`presence`]).
    pub presence: crate::presence::Rules,
    /// The sentinels' password and the TLS files, for every connection.
    pub security: Security,
}

/// Largest reply a history read may bring (a recovery reads at most
/// [`crate::history::RECOVERY_LIMIT`] messages): a larger one drops the
/// history connection and the read fails, rather than buffer without bound.
const MAX_HISTORY_REPLY_BYTES: usize = 64 << 20;

/// The `CLIENT SETNAME` of pub/sub link `index`: `wsgate:<node>:pubsub` for
/// link 0 (the only one when K = 1), `wsgate:<node>:pubsub-<index>` beyond,
/// so an operator can tell them apart in `CLIENT LIST` (and kill one).
pub fn link_name(node_id: &str, index: usize) -> String {
    if index == 0 {
        format!("wsgate:{node_id}:pubsub")
    } else {
        format!("wsgate:{node_id}:pubsub-{index}")
    }
}

/// Handle to the Redis broker's link actors; dropping every handle stops them.
pub struct RedisBroker {
    links: Vec<mpsc::Sender<Request>>,
    /// `host:port`, for `GET /shard` (never the credentials).
    addr: String,
    publisher: publish::Publisher,
    history: Rules,
    /// History reads, on their own connection (`wsgate:<node>:history`);
    /// `None` without history rules.
    reader: Option<history::Reader>,
    presence_rules: crate::presence::Rules,
    /// Presence batches and reads, on their own connection
    /// (`wsgate:<node>:presence`); `None` without presence rules.
    presence: Option<presence::Store>,
}

/// One batch of changes for one link's connection `generation`; or, with
/// `reset`, the order to drop that connection (and reconnect) instead.
struct Request {
    generation: u64,
    changes: Changes,
    done: oneshot::Sender<Result<Applied, BrokerError>>,
    /// Drop connection `generation` rather than apply anything: a sharded
    /// broker's pattern link does this on every shard when one shard's copy
    /// failed ([`shards`]), so that all copies resync from nothing together.
    reset: bool,
}

/// Which part a [`RedisBroker`] plays in the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The node's only Redis (`WSGATE_REDIS_URL`).
    Whole,
    /// Shard `i` of `WSGATE_REDIS_SHARDS`: its links' gauges are labelled
    /// `s<i>.<link>`, and only shard 0 polls `PUBSUB NUMPAT` (every shard
    /// holds the same patterns).
    Shard(usize),
    /// The classic pub/sub links of a Redis Cluster (any node): gauges
    /// labelled `classic.<link>`.
    Classic,
}

impl RedisBroker {
    /// Parses `url` and starts K link actors (each with a sink of its own
    /// on `events`'s channel); they connect in the background.
    pub fn start(
        url: &str,
        events: EventSink,
        metrics: Metrics,
        options: RedisOptions,
    ) -> Result<RedisBroker, RedisConfigError> {
        RedisBroker::start_as(url, events, metrics, options, Role::Whole)
    }

    /// [`RedisBroker::start`], as `role`.
    pub(crate) fn start_as(
        url: &str,
        events: EventSink,
        metrics: Metrics,
        options: RedisOptions,
        role: Role,
    ) -> Result<RedisBroker, RedisConfigError> {
        let target = Target::parse(url, &options.security)?;
        RedisBroker::start_target(url, target, events, metrics, options, role)
    }

    /// [`RedisBroker::start_as`] on a target already parsed (`url` only
    /// serves history and presence, refused with a cluster).
    pub(crate) fn start_target(
        url: &str,
        target: Target,
        events: EventSink,
        metrics: Metrics,
        options: RedisOptions,
        role: Role,
    ) -> Result<RedisBroker, RedisConfigError> {
        let addr = target.addr();
        let publisher = publish::Publisher::start(publish::Settings {
            target: target.clone(),
            client_name: format!("wsgate:{}:publish", options.node_id),
            timeout: options.probe_timeout,
            idempotency_ttl: options.idempotency_ttl,
            history: options.history.clone(),
            mode: publish::Mode::Plain,
        });
        let reader = if options.history.is_empty() {
            None
        } else {
            let commands = commands::Commands::start(
                url,
                commands::CommandOptions {
                    name: format!("wsgate:{}:history", options.node_id),
                    timeout: options.probe_timeout,
                    backoff_max: options.backoff_max,
                    max_reply_bytes: MAX_HISTORY_REPLY_BYTES,
                    security: options.security.clone(),
                },
            )?;
            Some(history::Reader::new(
                commands,
                &history::library(&options.history),
            ))
        };
        let presence = if options.presence.is_empty() {
            None
        } else {
            let commands = commands::Commands::start(
                url,
                commands::CommandOptions {
                    name: format!("wsgate:{}:presence", options.node_id),
                    timeout: options.probe_timeout,
                    backoff_max: options.backoff_max,
                    max_reply_bytes: MAX_HISTORY_REPLY_BYTES,
                    security: options.security.clone(),
                },
            )?;
            Some(presence::Store::new(commands))
        };
        let k = options.pubsub_connections.clamp(1, MAX_LINKS);
        let budget = options.max_redis_patterns.div_ceil(k).max(1);
        let prefix = match role {
            Role::Whole => String::new(),
            Role::Shard(i) => format!("s{i}."),
            Role::Classic => "classic.".to_owned(),
        };
        let siblings = Siblings::new(k, &metrics, &prefix);
        let mut links = Vec::with_capacity(k);
        for index in 0..k {
            let (tx, rx) = mpsc::channel(REQUEST_CAPACITY);
            let actor = Actor::new(Link {
                index,
                name: link_name(&options.node_id, index),
                target: target.clone(),
                requests: rx,
                events: events.sibling(),
                metrics: metrics.clone(),
                options: options.clone(),
                budget,
                siblings: siblings.clone(),
                shard: None,
            });
            let span = tracing::info_span!("redis_pubsub", link = index, addr = %actor.addr());
            tokio::spawn(actor.run().instrument(span));
            links.push(tx);
        }
        drop(events);
        let polls = matches!(role, Role::Whole | Role::Shard(0) | Role::Classic);
        if let Some(first) = links.first().filter(|_| polls) {
            let numpat = commands::Commands::start_target(
                target,
                commands::CommandOptions {
                    name: format!("wsgate:{}:numpat", options.node_id),
                    timeout: options.probe_interval.min(options.probe_timeout),
                    backoff_max: options.backoff_max,
                    max_reply_bytes: 1024,
                    security: options.security.clone(),
                },
            );
            tokio::spawn(
                poll_numpat(
                    numpat,
                    first.downgrade(),
                    metrics.clone(),
                    options.probe_interval,
                )
                .instrument(tracing::info_span!("redis_numpat")),
            );
        }
        Ok(RedisBroker {
            links,
            addr,
            publisher,
            history: options.history,
            reader,
            presence_rules: options.presence,
            presence,
        })
    }
}

/// The link of `topic` among `links`: channels on link 0, patterns by a
/// stable hash of their text. Public so that tests and tools can tell which
/// of a node's connections (named by [`link_name`]) holds a pattern.
pub fn link_for(topic: &Topic, links: usize) -> usize {
    match topic {
        Topic::Channel(_) => 0,
        Topic::Pattern(p) => (stable_hash(p) % links.max(1) as u64) as usize,
    }
}

/// A stable 64-bit hash of a topic name (FNV-1a): the same link for the
/// same pattern on every node and every start, whatever Rust's hasher does.
fn stable_hash(name: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl RedisBroker {
    /// Where this broker's Redis is, as `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Weak handles on the link actors' request queues (weak: they must not
    /// keep the actors alive once the broker is dropped).
    fn weak_links(&self) -> Vec<mpsc::WeakSender<Request>> {
        self.links.iter().map(mpsc::Sender::downgrade).collect()
    }
}

/// Hands one batch to a link's actor for its connection `generation` and
/// waits for what Redis confirmed: the one way every broker over links
/// (single Redis, shards, Cluster) applies changes.
async fn send_changes(
    requests: &mpsc::Sender<Request>,
    generation: u64,
    changes: Changes,
) -> Result<Applied, BrokerError> {
    let (done, confirmed) = oneshot::channel();
    requests
        .send(Request {
            generation,
            changes,
            done,
            reset: false,
        })
        .await
        .map_err(|_| BrokerError::Unavailable)?;
    confirmed.await.map_err(|_| BrokerError::ConnectionLost)?
}

impl Broker for RedisBroker {
    fn apply(
        &self,
        link: usize,
        generation: u64,
        changes: Changes,
    ) -> BoxFuture<'static, Result<Applied, BrokerError>> {
        let requests = self.links.get(link).cloned();
        async move {
            let requests = requests.ok_or(BrokerError::Unavailable)?;
            send_changes(&requests, generation, changes).await
        }
        .boxed()
    }

    fn links(&self) -> usize {
        self.links.len()
    }

    /// Channels on link 0; patterns by [`stable_hash`] over every link.
    fn link_of(&self, topic: &Topic) -> usize {
        link_for(topic, self.links.len())
    }

    /// One server owns everything.
    fn shard_of(&self, _channel: &[u8]) -> Option<(usize, String)> {
        Some((0, format!("redis://{}", self.addr)))
    }

    fn publish_batch(
        &self,
        messages: Vec<Publication>,
    ) -> BoxFuture<'static, Vec<Result<u64, PublishError>>> {
        let publisher = self.publisher.clone();
        async move { publisher.publish(messages).await }.boxed()
    }

    fn history(&self) -> &Rules {
        &self.history
    }

    fn presence(&self) -> &crate::presence::Rules {
        &self.presence_rules
    }

    fn sync_presence(
        &self,
        batch: crate::presence::Batch,
    ) -> BoxFuture<'static, Result<crate::presence::Synced, BrokerError>> {
        let store = self.presence.clone();
        async move {
            match store {
                Some(store) => store.sync(&batch).await,
                None => Err(BrokerError::Refused(
                    "presence is not configured".to_owned(),
                )),
            }
        }
        .boxed()
    }

    fn read_presence(&self, channel: Bytes) -> BoxFuture<'static, Result<Vec<Bytes>, BrokerError>> {
        let store = self.presence.clone();
        async move {
            match store {
                Some(store) => store.read(&channel).await,
                None => Err(BrokerError::Refused(
                    "presence is not configured".to_owned(),
                )),
            }
        }
        .boxed()
    }

    fn read_history(
        &self,
        channel: Bytes,
        query: Query,
    ) -> BoxFuture<'static, Result<Read, BrokerError>> {
        let reader = self.reader.clone();
        let ttl = self.history.of(&channel).map(|r| r.ttl.as_millis());
        async move {
            match (reader, ttl) {
                (Some(reader), Some(ttl)) => reader.read(&channel, &query, ttl).await,
                _ => Err(BrokerError::Refused(
                    "no history for this channel".to_owned(),
                )),
            }
        }
        .boxed()
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}

/// Keeps `wsgate_redis_numpat` at what Redis reports, polling `PUBSUB
/// NUMPAT` (O(1) in Redis) every `interval` on a command connection of its
/// own (`wsgate:<node>:numpat`; the pub/sub one, in RESP2 subscribed mode,
/// cannot run it), until the broker is dropped. A failed poll leaves the
/// last value; the connection reconnects by itself.
async fn poll_numpat(
    conn: commands::Commands,
    alive: mpsc::WeakSender<Request>,
    metrics: Metrics,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cmd = bytes::BytesMut::new();
    resp::encode_command(&mut cmd, [&b"PUBSUB"[..], b"NUMPAT"].into_iter());
    let cmd = cmd.freeze();
    loop {
        tick.tick().await;
        if alive.upgrade().is_none() {
            conn.close();
            return;
        }
        match conn.call(cmd.clone()).await {
            Ok(resp::Value::Integer(n)) => metrics.redis_numpat.set(n),
            other => debug!(outcome = ?other, "PUBSUB NUMPAT failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default K: one link while coalescing keeps Redis's share small,
    /// more as the node may hold more Redis patterns, capped.
    #[test]
    fn auto_links_follow_the_pattern_budget() {
        assert_eq!(auto_links(4096, 64), 1);
        assert_eq!(auto_links(100, 1_000_000), 1);
        assert_eq!(auto_links(4096, 4096), 8);
        assert_eq!(auto_links(1_000_000, 1_000_000), AUTO_MAX_LINKS);
    }

    /// Link names keep the single-connection name for link 0.
    #[test]
    fn link_names() {
        assert_eq!(link_name("n1", 0), "wsgate:n1:pubsub");
        assert_eq!(link_name("n1", 7), "wsgate:n1:pubsub-7");
    }

    /// The hash is FNV-1a, fixed: the same link on every node.
    #[test]
    fn stable_hash_is_fixed() {
        assert_eq!(stable_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
