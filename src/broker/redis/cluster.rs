//! Redis Cluster (`WSGATE_REDIS_CLUSTER`): the node learns the slot map
//! from any node (`CLUSTER SLOTS`) and follows it as slots move and masters
//! fail over.
//!
//! Two pub/sub modes (`WSGATE_REDIS_CLUSTER_PUBSUB`):
//!
//! - **classic**: Redis broadcasts every `PUBLISH` to every node of the
//!   cluster, so the node's K pub/sub links ([`super::link`]) connect to
//!   whichever node answers ([`super::conn::Nodes`], kept current from the
//!   slot map) and hold channels and patterns as with one Redis; a link
//!   whose node fails reconnects to another, with the usual gap notices.
//! - **sharded**: each exact channel is `SSUBSCRIBE`d on the master that
//!   owns its slot ([`super::slot`]), one pub/sub connection per master (a
//!   link actor in sharded mode), and published with `SPUBLISH`. The hub
//!   sees one link per hash slot (16384) plus the pattern links, so that a
//!   slot that moves or a master that fails interrupts exactly the channels
//!   concerned: the keeper task ([`keeper`]) turns each master connection's
//!   `Up`/`Down` into `Up`/`Down` of the slots it owns, and each change of
//!   the slot map into a `Down` of the moved slot and an `Up` on its new
//!   owner (the hub then resubscribes that slot's channels there, with
//!   `interrupted` and `resumed` notices for them only). Patterns are
//!   refused ([`PATTERNS_UNAVAILABLE`]) unless `WSGATE_REDIS_CLUSTER_PATTERNS=on`:
//!   then they live on classic links, and every gateway publish goes out as
//!   `SPUBLISH` and `PUBLISH` (one script call per message).
//!
//! The map is refreshed when a master connection is lost, when Redis
//! answers `MOVED`/`ASK`/`TRYAGAIN`/`CLUSTERDOWN` (a subscribe or a
//! publish), when Redis pushes a `sunsubscribe` (it does after a slot
//! migration, for the channels of the slot it lost), every
//! [`REFRESH_EVERY`], and every [`RETRY_EVERY`] (doubling up to
//! [`RETRY_MAX`]) while some slot has no connected owner. Publishes go to the owner of their channel's slot in
//! both modes (so that an idempotent publish's key, tagged with the slot,
//! lives there); a redirected one is sent again once the map is refreshed
//! (Redis ran nothing).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{join_all, BoxFuture, FutureExt};
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, info, warn, Instrument};

use super::conn::{Handshake, Nodes, Target};
use super::link::{Actor, Link, ShardHooks, Siblings};
use super::publish::{Mode, Publisher, Settings};
use super::resp::Value;
use super::slot::{slot_of, SLOTS};
use super::{RedisBroker, RedisConfigError, RedisOptions, Request, Role, REQUEST_CAPACITY};
use crate::broker::{
    Applied, Broker, BrokerError, BrokerEvent, Changes, EventSink, Publication, PublishError,
    StateMap, Topic,
};
use crate::history::{Query, Read, Rules};
use crate::metrics::Metrics;

/// What a pattern subscriber is told in sharded mode without
/// `WSGATE_REDIS_CLUSTER_PATTERNS=on` (sharded pub/sub has no patterns).
pub const PATTERNS_UNAVAILABLE: &str = "patterns unavailable in sharded mode";
/// The slot map is read again this often even when nothing says it changed
/// (a migration whose `sunsubscribe` push this node missed).
pub const REFRESH_EVERY: Duration = Duration::from_secs(5);
/// ... and this often while a slot has no connected owner (a failover in
/// progress: the replica is promoted after the cluster's node timeout).
pub const RETRY_EVERY: Duration = Duration::from_millis(200);
/// The wait between map reads while a slot stays unowned doubles from
/// [`RETRY_EVERY`] up to this: a failover is still seen within a second, and
/// a slot nobody serves costs one connection per second, not five.
pub const RETRY_MAX: Duration = Duration::from_secs(1);
/// Refreshes that must confirm a slot's old owner after that owner pushed
/// `sunsubscribe` for it (the node asked may not know of the move yet)
/// before its channels are subscribed there again.
const LOST_CONFIRMATIONS: u8 = 3;
/// State events from the master connections to the keeper.
const STATE_CAPACITY: usize = 1024;

/// `redis[s]://[user:password@]host:port[,host:port...]` split into a
/// template URL for [`Target::parse`] (credentials, TLS) and the seeds.
pub fn seeds(url: &str) -> Result<(String, Vec<(String, u16)>), RedisConfigError> {
    let bad = |why: &str| RedisConfigError::Cluster(why.to_owned());
    let (scheme, rest) = url.split_once("://").ok_or(RedisConfigError::Unsupported)?;
    if scheme != "redis" && scheme != "rediss" {
        return Err(RedisConfigError::Unsupported);
    }
    let (userinfo, hosts) = match rest.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), rest),
    };
    if hosts.contains('/') {
        return Err(bad("no /db: a cluster has database 0 only"));
    }
    let mut nodes = Vec::new();
    for node in hosts.split(',') {
        let (host, port) = node
            .trim()
            .rsplit_once(':')
            .ok_or_else(|| bad("each node needs host:port"))?;
        let port: u16 = port.parse().map_err(|_| bad("a bad port"))?;
        let host = host.trim_matches(['[', ']']);
        if host.is_empty() || port == 0 {
            return Err(bad("an empty host"));
        }
        nodes.push((host.to_owned(), port));
    }
    let (h, p) = nodes.first().ok_or_else(|| bad("no node"))?;
    // An IPv6 address goes back into brackets in a URL.
    let h = if h.contains(':') {
        format!("[{h}]")
    } else {
        h.clone()
    };
    Ok((format!("{scheme}://{userinfo}{h}:{p}"), nodes))
}

/// Whether a Redis error says the slot is (for now) elsewhere.
pub(super) fn is_redirect(error: &str) -> bool {
    ["MOVED ", "ASK ", "TRYAGAIN", "CLUSTERDOWN"]
        .iter()
        .any(|p| error.starts_with(p))
}

/// What the shard links tell the keeper, without waiting.
#[derive(Default)]
pub(super) struct Signals {
    /// `(link id, slot)`: that link's master pushed `sunsubscribe` for a
    /// channel of that slot, or redirected a command on it (`MOVED`, `ASK`,
    /// ...). At most one entry per link and slot.
    lost: Mutex<HashSet<(usize, u16)>>,
    /// Something says the map changed.
    refresh: AtomicBool,
    wake: Notify,
}

impl Signals {
    /// The slot map should be read again soon.
    pub(super) fn refresh(&self) {
        self.refresh.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Link `id`'s master dropped, or would not take, the subscriptions of
    /// `slot`: the slot goes `Down` until a map read brings it back.
    pub(super) fn lost(&self, id: usize, slot: u16) {
        lock(&self.lost).insert((id, slot));
        self.refresh();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One hash slot as the hub's link `slot`.
#[derive(Clone, Copy, Default)]
struct SlotState {
    /// The shard link (master connection) that owns it, by id.
    owner: Option<usize>,
    /// Whether the hub was told `Up` last.
    up: bool,
    /// The generation the hub was given with that `Up`.
    hub_generation: u64,
    /// The owner's connection generation at that `Up`.
    shard_generation: u64,
}

impl SlotState {
    /// Slot `slot` is up on its owner's connection `shard_generation`: the
    /// hub's `Up` for it, under a new generation.
    fn raise(&mut self, slot: usize, shard_generation: u64) -> BrokerEvent {
        self.up = true;
        self.hub_generation += 1;
        self.shard_generation = shard_generation;
        BrokerEvent::Up {
            link: slot,
            generation: self.hub_generation,
        }
    }
}

/// One master's sharded pub/sub connection.
struct Shard {
    addr: (String, u16),
    requests: mpsc::Sender<Request>,
    /// Its connection generation while connected.
    up: Option<u64>,
}

/// The slot map as the node follows it.
struct Table {
    /// Each slot's master address (index into `masters`), from the last
    /// map read; for routing publishes in both modes.
    owner_addr: Vec<Option<u32>>,
    masters: Vec<(String, u16)>,
    /// Sharded mode: each slot as the hub's link.
    slots: Vec<SlotState>,
    shards: HashMap<usize, Shard>,
    next_id: usize,
    /// Slots whose owner pushed `sunsubscribe`, with how many refreshes
    /// confirmed that owner since.
    lost: HashMap<u16, u8>,
    /// A map has been read.
    known: bool,
}

struct Shared {
    table: Mutex<Table>,
    signals: Arc<Signals>,
    /// Bumped after every map read (a redirected publish waits for it).
    refreshed: watch::Sender<u64>,
    publishers: Mutex<HashMap<(String, u16), Publisher>>,
    template: Target,
    seeds: Vec<(String, u16)>,
    nodes: Arc<Nodes>,
    options: RedisOptions,
    metrics: Metrics,
    mode: Mode,
    sharded: bool,
}

/// The node's broker over a Redis Cluster (see the module docs).
pub struct ClusterBroker {
    shared: Arc<Shared>,
    /// Classic mode: every topic; sharded mode with patterns: the patterns.
    classic: Option<RedisBroker>,
    sharded: bool,
    history: Rules,
    presence: crate::presence::Rules,
}

impl ClusterBroker {
    /// Parses the seeds and starts the keeper (and the classic links); all
    /// connect in the background.
    pub fn start(
        url: &str,
        sharded: bool,
        patterns: bool,
        events: EventSink,
        metrics: Metrics,
        options: RedisOptions,
    ) -> Result<ClusterBroker, RedisConfigError> {
        let (template_url, seeds) = seeds(url)?;
        let template = Target::parse(&template_url, &options.security)?;
        let nodes = Arc::new(Nodes::new(seeds.clone()));
        let classic = if !sharded || patterns {
            let offset = if sharded { SLOTS } else { 0 };
            let sink = if offset == 0 {
                events.sibling()
            } else {
                let remap: StateMap = Arc::new(move |event| {
                    Some(match event {
                        BrokerEvent::Up { link, generation } => BrokerEvent::Up {
                            link: link + offset,
                            generation,
                        },
                        BrokerEvent::Down { link } => BrokerEvent::Down {
                            link: link + offset,
                        },
                        BrokerEvent::Reconnecting { link } => BrokerEvent::Reconnecting {
                            link: link + offset,
                        },
                        other => other,
                    })
                });
                events.sibling().remapped(remap)
            };
            Some(RedisBroker::start_target(
                &template_url,
                Target::any(&template, nodes.clone()),
                sink,
                metrics.clone(),
                options.clone(),
                Role::Classic,
            )?)
        } else {
            None
        };
        let shared = Arc::new(Shared {
            table: Mutex::new(Table {
                owner_addr: vec![None; SLOTS],
                masters: Vec::new(),
                slots: vec![SlotState::default(); SLOTS],
                shards: HashMap::new(),
                next_id: 0,
                lost: HashMap::new(),
                known: false,
            }),
            signals: Arc::new(Signals::default()),
            refreshed: watch::Sender::new(0),
            publishers: Mutex::new(HashMap::new()),
            template,
            seeds,
            nodes,
            mode: Mode::Cluster {
                sharded,
                both: sharded && patterns,
            },
            sharded,
            options: options.clone(),
            metrics,
        });
        let (state_tx, state_rx) = mpsc::channel(STATE_CAPACITY);
        tokio::spawn(
            keeper(
                Arc::downgrade(&shared),
                events,
                state_tx,
                state_rx,
                sharded && !patterns,
            )
            .instrument(tracing::info_span!("redis_cluster")),
        );
        Ok(ClusterBroker {
            shared,
            classic,
            sharded,
            history: options.history,
            presence: options.presence,
        })
    }
}

/// Reads `CLUSTER SLOTS` from the first node that answers: the masters
/// known, then their replicas, then the seeds.
async fn read_map(shared: &Shared) -> Result<Map, String> {
    let mut candidates: Vec<(String, u16)> = {
        let t = lock(&shared.table);
        t.masters.clone()
    };
    for node in shared.nodes.list().iter().chain(shared.seeds.iter()) {
        if !candidates.contains(node) {
            candidates.push(node.clone());
        }
    }
    let mut last = "no node to ask".to_owned();
    for (host, port) in candidates {
        let target = Target::node(&shared.template, &host, port);
        let name = format!("wsgate:{}:cluster", shared.options.node_id);
        let mut handshake = Handshake::new(&target, &name, false);
        handshake.push("CLUSTER SLOTS", &[b"CLUSTER", b"SLOTS"]);
        let asked = host.clone();
        let attempt = async move {
            let connected = handshake.run(&target).await?;
            let reply = connected
                .replies
                .into_iter()
                .last()
                .map(|(_, v)| v)
                .ok_or("no reply")?;
            parse_slots(reply, &asked)
        };
        match tokio::time::timeout(shared.options.probe_timeout, attempt).await {
            Ok(Ok(map)) if !map.ranges.is_empty() => return Ok(map),
            Ok(Ok(_)) => last = format!("{host}:{port}: no slots assigned"),
            Ok(Err(e)) => last = format!("{host}:{port}: {e}"),
            Err(_) => last = format!("{host}:{port}: no answer in time"),
        }
    }
    Err(last)
}

/// A `CLUSTER SLOTS` reply: each range with its master and replicas.
#[derive(Debug, Default, PartialEq, Eq)]
struct Map {
    ranges: Vec<(u16, u16, (String, u16))>,
    replicas: Vec<(String, u16)>,
}

/// Parses `CLUSTER SLOTS` (an empty host means the node asked, `asked`).
fn parse_slots(reply: Value, asked: &str) -> Result<Map, String> {
    let Value::Array(entries) = reply else {
        return Err(format!("CLUSTER SLOTS: unexpected reply {reply:?}"));
    };
    let node = |v: &Value| -> Option<(String, u16)> {
        let Value::Array(items) = v else { return None };
        let host = match items.first()? {
            Value::Bulk(h) if h.is_empty() || &h[..] == b"?" => asked.to_owned(),
            Value::Bulk(h) => String::from_utf8_lossy(h).into_owned(),
            _ => return None,
        };
        let port = match items.get(1)? {
            Value::Integer(p) => u16::try_from(*p).ok()?,
            _ => return None,
        };
        Some((host, port))
    };
    let mut map = Map::default();
    for entry in entries {
        let Value::Array(items) = entry else {
            return Err("CLUSTER SLOTS: an entry is not an array".to_owned());
        };
        let (Some(Value::Integer(start)), Some(Value::Integer(end)), Some(master)) =
            (items.first(), items.get(1), items.get(2).and_then(node))
        else {
            return Err("CLUSTER SLOTS: a malformed entry".to_owned());
        };
        let (Ok(start), Ok(end)) = (u16::try_from(*start), u16::try_from(*end)) else {
            return Err("CLUSTER SLOTS: a slot out of range".to_owned());
        };
        if start > end || usize::from(end) >= SLOTS {
            return Err("CLUSTER SLOTS: a slot out of range".to_owned());
        }
        map.ranges.push((start, end, master));
        map.replicas.extend(items.iter().skip(3).filter_map(node));
    }
    Ok(map)
}

/// Follows the slot map and derives the hub's slot links (see the module
/// docs); ends when the broker is dropped.
async fn keeper(
    shared: Weak<Shared>,
    mut hub: EventSink,
    state_tx: mpsc::Sender<BrokerEvent>,
    mut states: mpsc::Receiver<BrokerEvent>,
    refuse_patterns: bool,
) {
    let messages = hub.sibling();
    if refuse_patterns {
        // The pattern link: always up, refusing every pattern.
        if hub
            .state(BrokerEvent::Up {
                link: SLOTS,
                generation: 1,
            })
            .await
            .is_err()
        {
            return;
        }
    }
    let mut tick = tokio::time::interval(REFRESH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut due = true;
    // While the map is unsettled: when to read it again (a fixed deadline,
    // not pushed back by events), and the wait after that read, doubling
    // from RETRY_EVERY up to RETRY_MAX.
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut backoff = RETRY_EVERY;
    loop {
        if !due {
            let retry = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending::<()>().await,
                }
            };
            let Some(signals) = shared.upgrade().map(|s| s.signals.clone()) else {
                return;
            };
            tokio::select! {
                event = states.recv() => {
                    let Some(event) = event else { return };
                    let Some(s) = shared.upgrade() else { return };
                    let (out, lost_link) = s.shard_state(event);
                    due |= lost_link;
                    if send_all(&mut hub, out).await.is_err() {
                        return;
                    }
                }
                () = signals.wake.notified() => {}
                _ = tick.tick() => due = true,
                () = retry => {
                    retry_at = None;
                    due = true;
                }
            }
        }
        let Some(s) = shared.upgrade() else { return };
        let out = s.take_lost();
        if send_all(&mut hub, out).await.is_err() {
            return;
        }
        due |= s.signals.refresh.swap(false, Ordering::AcqRel);
        if !due {
            continue;
        }
        due = false;
        match read_map(&s).await {
            Ok(map) => {
                let (out, settled) = s.apply_map(map, &messages, &state_tx);
                debug!(events = out.len(), settled, "cluster slot map read");
                if settled {
                    retry_at = None;
                    backoff = RETRY_EVERY;
                } else {
                    retry_at = Some(tokio::time::Instant::now() + backoff);
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
                s.refreshed.send_modify(|n| *n += 1);
                if send_all(&mut hub, out).await.is_err() {
                    return;
                }
            }
            Err(cause) => {
                retry_at = Some(tokio::time::Instant::now() + backoff);
                backoff = (backoff * 2).min(RETRY_MAX);
                warn!(%cause, "cannot read the cluster slot map");
            }
        }
    }
}

async fn send_all(hub: &mut EventSink, events: Vec<BrokerEvent>) -> Result<(), ()> {
    for event in events {
        hub.state(event).await.map_err(|_| ())?;
    }
    Ok(())
}

impl Shared {
    /// A master connection's `Up`/`Down` (link = its id) as slot events;
    /// and whether it was lost (the map should be read again).
    fn shard_state(&self, event: BrokerEvent) -> (Vec<BrokerEvent>, bool) {
        let mut t = lock(&self.table);
        let mut out = Vec::new();
        match event {
            BrokerEvent::Up { link, generation } => {
                let Some(shard) = t.shards.get_mut(&link) else {
                    return (out, false);
                };
                shard.up = Some(generation);
                let table = &mut *t;
                for slot in 0..SLOTS {
                    let s = &mut table.slots[slot];
                    if s.owner == Some(link) && !table.lost.contains_key(&(slot as u16)) {
                        if s.up {
                            out.push(BrokerEvent::Down { link: slot });
                        }
                        out.push(s.raise(slot, generation));
                    }
                }
                (out, false)
            }
            BrokerEvent::Down { link } => {
                let Some(shard) = t.shards.get_mut(&link) else {
                    return (out, false);
                };
                shard.up = None;
                for (slot, s) in t.slots.iter_mut().enumerate() {
                    if s.owner == Some(link) && s.up {
                        s.up = false;
                        out.push(BrokerEvent::Down { link: slot });
                    }
                }
                (out, true)
            }
            _ => (out, false),
        }
    }

    /// Slots whose master pushed `sunsubscribe`: `Down` now (their
    /// channels are no longer held there); the next map read decides where
    /// they come back.
    fn take_lost(&self) -> Vec<BrokerEvent> {
        let lost: Vec<(usize, u16)> = lock(&self.signals.lost).drain().collect();
        if lost.is_empty() {
            return Vec::new();
        }
        let mut t = lock(&self.table);
        let mut out = Vec::new();
        for (id, slot) in lost {
            let s = &mut t.slots[usize::from(slot)];
            if s.owner != Some(id) {
                continue;
            }
            if s.up {
                s.up = false;
                out.push(BrokerEvent::Down {
                    link: usize::from(slot),
                });
            }
            t.lost.entry(slot).or_insert(0);
        }
        out
    }

    /// Takes a new map: moved slots go down and come up on their new
    /// owner; masters gone are let go, new ones connected. Returns the hub's
    /// events and whether every slot has a connected owner.
    fn apply_map(
        &self,
        map: Map,
        events: &EventSink,
        states: &mpsc::Sender<BrokerEvent>,
    ) -> (Vec<BrokerEvent>, bool) {
        let mut t = lock(&self.table);
        let mut masters: Vec<(String, u16)> = Vec::new();
        let mut owner_addr = vec![None; SLOTS];
        for (start, end, master) in &map.ranges {
            let at = match masters.iter().position(|m| m == master) {
                Some(at) => at,
                None => {
                    masters.push(master.clone());
                    masters.len() - 1
                }
            };
            for slot in *start..=*end {
                owner_addr[usize::from(slot)] = Some(at as u32);
            }
        }
        let mut candidates = masters.clone();
        for n in map.replicas.iter().chain(self.seeds.iter()) {
            if !candidates.contains(n) {
                candidates.push(n.clone());
            }
        }
        self.nodes.set(candidates);
        // Publishers of addresses that are no longer masters go (their
        // tasks end with their last handle): failovers and moves do not
        // grow the map.
        lock(&self.publishers).retain(|addr, _| masters.contains(addr));
        let moved = t
            .owner_addr
            .iter()
            .zip(&owner_addr)
            .filter(|(old, new)| {
                old.and_then(|i| t.masters.get(i as usize))
                    != new.and_then(|i| masters.get(i as usize))
            })
            .count();
        if moved > 0 && t.known {
            info!(
                slots = moved,
                masters = masters.len(),
                "cluster slot map changed"
            );
        }
        t.owner_addr = owner_addr;
        t.masters = masters;
        t.known = true;
        if !self.sharded {
            return (Vec::new(), true);
        }
        let mut out = Vec::new();
        let mut settled = true;
        let table = &mut *t;
        for slot in 0..SLOTS {
            let want = table.owner_addr[slot].and_then(|i| table.masters.get(i as usize).cloned());
            let current = table.slots[slot]
                .owner
                .and_then(|id| table.shards.get(&id).map(|s| s.addr.clone()));
            let lost = table.lost.get_mut(&(slot as u16));
            if want == current {
                if let Some(confirmations) = lost {
                    // Pushed out, yet the map still names the same owner:
                    // perhaps the node asked has not heard of the move.
                    *confirmations += 1;
                    if *confirmations < LOST_CONFIRMATIONS {
                        settled = false;
                        continue;
                    }
                    table.lost.remove(&(slot as u16));
                    let s = &mut table.slots[slot];
                    if let Some(g) = s
                        .owner
                        .and_then(|id| table.shards.get(&id))
                        .and_then(|sh| sh.up)
                    {
                        out.push(s.raise(slot, g));
                    }
                }
                if !table.slots[slot].up {
                    settled = false;
                }
                continue;
            }
            table.lost.remove(&(slot as u16));
            let s = &mut table.slots[slot];
            if s.up {
                s.up = false;
                out.push(BrokerEvent::Down { link: slot });
            }
            let Some(addr) = want else {
                s.owner = None;
                settled = false;
                continue;
            };
            let id = match table.shards.iter().find(|(_, sh)| sh.addr == addr) {
                Some((id, _)) => *id,
                None => {
                    let id = table.next_id;
                    table.next_id += 1;
                    let requests = self.start_shard(id, &addr, events, states);
                    table.shards.insert(
                        id,
                        Shard {
                            addr: addr.clone(),
                            requests,
                            up: None,
                        },
                    );
                    id
                }
            };
            let s = &mut table.slots[slot];
            s.owner = Some(id);
            match table.shards.get(&id).and_then(|sh| sh.up) {
                Some(g) => {
                    out.push(s.raise(slot, g));
                }
                None => settled = false,
            }
        }
        // Masters that own nothing any more: their connections end.
        let owning: HashSet<usize> = table.slots.iter().filter_map(|s| s.owner).collect();
        table.shards.retain(|id, sh| {
            let keep = owning.contains(id);
            if !keep {
                info!(addr = %format!("{}:{}", sh.addr.0, sh.addr.1), "cluster master owns no slot any more: its connection ends");
            }
            keep
        });
        (out, settled)
    }

    /// Starts master `addr`'s sharded pub/sub link as shard link `id`.
    fn start_shard(
        &self,
        id: usize,
        addr: &(String, u16),
        events: &EventSink,
        states: &mpsc::Sender<BrokerEvent>,
    ) -> mpsc::Sender<Request> {
        let (tx, rx) = mpsc::channel(REQUEST_CAPACITY);
        let label = format!("{}:{}", addr.0, addr.1);
        let relabel: StateMap = Arc::new(move |event| {
            Some(match event {
                BrokerEvent::Up { generation, .. } => BrokerEvent::Up {
                    link: id,
                    generation,
                },
                BrokerEvent::Down { .. } => BrokerEvent::Down { link: id },
                BrokerEvent::Reconnecting { .. } => BrokerEvent::Reconnecting { link: id },
                other => other,
            })
        });
        let sink = events.sibling().remapped(relabel).diverted(states.clone());
        let actor = Actor::new(Link {
            index: 0,
            name: format!("wsgate:{}:shard", self.options.node_id),
            target: Target::node(&self.template, &addr.0, addr.1),
            requests: rx,
            events: sink,
            metrics: self.metrics.clone(),
            options: self.options.clone(),
            budget: 1,
            siblings: Siblings::labelled(&[format!("shard:{label}")], &self.metrics),
            shard: Some(ShardHooks {
                id,
                signals: self.signals.clone(),
            }),
        });
        let span = tracing::info_span!("redis_shard", addr = %label);
        info!(addr = %label, "connecting to cluster master");
        tokio::spawn(actor.run().instrument(span));
        tx
    }

    /// The publisher of master `addr` (started on first use).
    fn publisher(&self, addr: &(String, u16)) -> Publisher {
        let mut publishers = lock(&self.publishers);
        publishers
            .entry(addr.clone())
            .or_insert_with(|| {
                Publisher::start(Settings {
                    target: Target::node(&self.template, &addr.0, addr.1),
                    client_name: format!("wsgate:{}:publish", self.options.node_id),
                    timeout: self.options.probe_timeout,
                    idempotency_ttl: self.options.idempotency_ttl,
                    history: Rules::default(),
                    mode: self.mode,
                })
            })
            .clone()
    }

    /// The master owning `channel`'s slot, from the last map read.
    fn owner_of(&self, channel: &[u8]) -> Option<(String, u16)> {
        let t = lock(&self.table);
        t.owner_addr[usize::from(slot_of(channel))].and_then(|i| t.masters.get(i as usize).cloned())
    }

    /// Waits (at most the probe timeout) for a map read after `seen`.
    async fn wait_refresh(&self, seen: u64) {
        let mut rx = self.refreshed.subscribe();
        let _ = tokio::time::timeout(self.options.probe_timeout, rx.wait_for(|n| *n > seen)).await;
    }
}

/// Publishes `messages` through each owner's publisher; one result per
/// message in order. Redirected ones (Redis ran nothing) are sent again
/// after the map is read again, twice at most.
async fn publish_routed(
    shared: Arc<Shared>,
    messages: Vec<Publication>,
) -> Vec<Result<u64, PublishError>> {
    let mut out: Vec<Result<u64, PublishError>> = (0..messages.len())
        .map(|_| Err(PublishError::Unavailable))
        .collect();
    let mut todo: Vec<usize> = (0..messages.len()).collect();
    for attempt in 0..3 {
        let seen = *shared.refreshed.borrow();
        if !lock(&shared.table).known {
            shared.signals.refresh();
            shared.wait_refresh(seen).await;
        }
        let mut groups: HashMap<(String, u16), (Vec<usize>, Vec<Publication>)> = HashMap::new();
        for &at in &todo {
            let m = &messages[at];
            match shared.owner_of(&m.channel) {
                Some(addr) => {
                    let g = groups.entry(addr).or_default();
                    g.0.push(at);
                    g.1.push(m.clone());
                }
                None => out[at] = Err(PublishError::Unavailable),
            }
        }
        let sends: Vec<_> = groups
            .into_iter()
            .map(|(addr, (places, batch))| {
                let publisher = shared.publisher(&addr);
                async move { (places, publisher.publish(batch).await) }
            })
            .collect();
        let mut again = Vec::new();
        let mut unavailable = false;
        for (places, results) in join_all(sends).await {
            for (at, result) in places.into_iter().zip(results) {
                match &result {
                    Err(PublishError::Refused(why)) if is_redirect(why) => again.push(at),
                    Err(
                        PublishError::Unavailable | PublishError::Lost | PublishError::TimedOut,
                    ) => unavailable = true,
                    _ => {}
                }
                out[at] = result;
            }
        }
        if unavailable || !again.is_empty() {
            shared.signals.refresh();
        }
        if again.is_empty() || attempt == 2 {
            break;
        }
        debug!(
            messages = again.len(),
            "publishes redirected: sent again after a map read"
        );
        again.sort_unstable();
        todo = again;
        shared.wait_refresh(seen).await;
    }
    out
}

impl Broker for ClusterBroker {
    fn apply(
        &self,
        link: usize,
        generation: u64,
        changes: Changes,
    ) -> BoxFuture<'static, Result<Applied, BrokerError>> {
        if !self.sharded {
            return match &self.classic {
                Some(c) => c.apply(link, generation, changes),
                None => async { Err(BrokerError::Unavailable) }.boxed(),
            };
        }
        if link >= SLOTS {
            return match &self.classic {
                Some(c) => c.apply(link - SLOTS, generation, changes),
                None => async move {
                    Ok(Applied {
                        refused: changes
                            .subscribe
                            .into_iter()
                            .map(|t| (t, PATTERNS_UNAVAILABLE.to_owned()))
                            .collect(),
                    })
                }
                .boxed(),
            };
        }
        let target = {
            let t = lock(&self.shared.table);
            let s = t.slots[link];
            if s.up && s.hub_generation == generation {
                s.owner
                    .and_then(|id| t.shards.get(&id))
                    .map(|sh| (sh.requests.clone(), s.shard_generation))
            } else {
                None
            }
        };
        async move {
            let (requests, generation) = target.ok_or(BrokerError::Unavailable)?;
            super::send_changes(&requests, generation, changes).await
        }
        .boxed()
    }

    /// Classic: the classic links. Sharded: one per hash slot, then the
    /// pattern links (one refusing link without patterns).
    fn links(&self) -> usize {
        match (&self.classic, self.sharded) {
            (Some(c), false) => c.links(),
            (Some(c), true) => SLOTS + c.links(),
            (None, _) => SLOTS + 1,
        }
    }

    fn link_of(&self, topic: &Topic) -> usize {
        match (topic, &self.classic, self.sharded) {
            (_, Some(c), false) => c.link_of(topic),
            (Topic::Channel(name), _, true) => usize::from(slot_of(name)),
            (Topic::Pattern(_), Some(c), true) => SLOTS + c.link_of(topic),
            (Topic::Pattern(_), None, _) => SLOTS,
            (Topic::Channel(_), None, false) => 0,
        }
    }

    /// The slot and the master that owns it (`GET /shard`).
    fn shard_of(&self, channel: &[u8]) -> Option<(usize, String)> {
        let (host, port) = self.shared.owner_of(channel)?;
        Some((
            usize::from(slot_of(channel)),
            format!("redis://{host}:{port}"),
        ))
    }

    fn publish_batch(
        &self,
        messages: Vec<Publication>,
    ) -> BoxFuture<'static, Vec<Result<u64, PublishError>>> {
        publish_routed(self.shared.clone(), messages).boxed()
    }

    fn history(&self) -> &Rules {
        &self.history
    }

    fn read_history(
        &self,
        _channel: Bytes,
        _query: Query,
    ) -> BoxFuture<'static, Result<Read, BrokerError>> {
        async {
            Err(BrokerError::Refused(
                "no history over Redis Cluster".to_owned(),
            ))
        }
        .boxed()
    }

    fn presence(&self) -> &crate::presence::Rules {
        &self.presence
    }

    fn name(&self) -> &'static str {
        "redis-cluster"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_seeds_keep_their_brackets_in_the_template() {
        let (template, nodes) = seeds("redis://[::1]:7000,[::1]:7001").unwrap();
        assert_eq!(template, "redis://[::1]:7000");
        assert_eq!(nodes, [("::1".to_owned(), 7000), ("::1".to_owned(), 7001)]);
        assert!(Target::parse(&template, &crate::broker::redis::Security::default()).is_ok());
        assert!(matches!(
            seeds("redis://a:7000/0"),
            Err(RedisConfigError::Cluster(_))
        ));
    }

    #[test]
    fn seeds_keep_credentials_and_tls_in_the_template() {
        let (template, nodes) = seeds("rediss://u:p@a:7000,b:7001").unwrap();
        assert_eq!(template, "rediss://u:p@a:7000");
        assert_eq!(nodes, [("a".to_owned(), 7000), ("b".to_owned(), 7001)]);
        for bad in [
            "redis://a",
            "redis://a:7000/1",
            "http://a:1",
            "redis://:1",
            "redis://a:1,",
        ] {
            assert!(seeds(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cluster_slots_replies_parse() {
        let node = |h: &str, p: i64| {
            Value::Array(vec![
                Value::Bulk(Bytes::from(h.to_owned())),
                Value::Integer(p),
                Value::Bulk(Bytes::from_static(b"id")),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Integer(0),
                Value::Integer(5460),
                node("10.0.0.1", 7000),
                node("10.0.0.2", 7003),
            ]),
            Value::Array(vec![
                Value::Integer(5461),
                Value::Integer(16383),
                node("", 7001),
            ]),
        ]);
        let map = parse_slots(reply, "seed").unwrap();
        assert_eq!(
            map.ranges,
            [
                (0, 5460, ("10.0.0.1".to_owned(), 7000)),
                (5461, 16383, ("seed".to_owned(), 7001))
            ]
        );
        assert_eq!(map.replicas, [("10.0.0.2".to_owned(), 7003)]);
        assert!(parse_slots(Value::Integer(1), "x").is_err());
    }

    #[test]
    fn redirects_are_told_apart_from_refusals() {
        assert!(is_redirect("MOVED 3999 127.0.0.1:6381"));
        assert!(is_redirect("ASK 3999 127.0.0.1:6381"));
        assert!(is_redirect("CLUSTERDOWN The cluster is down"));
        assert!(!is_redirect("NOPERM this user has no permissions"));
    }
}
