//! One pub/sub link: the task that owns one of the node's pub/sub
//! connections to Redis.
//!
//! It takes [`Changes`] from a bounded request channel, writes them as
//! multi-argument `SUBSCRIBE`/`PSUBSCRIBE`/`UNSUBSCRIBE`/`PUNSUBSCRIBE`
//! commands, and answers each request once Redis has confirmed every topic in
//! it. Messages go to the hub as [`BrokerEvent`]s without ever blocking the
//! reader. When the connection is lost the task reports `Down` for its link
//! only, reconnects with capped, jittered backoff for as long as it takes
//! (retrying at once when a sibling link got through: Redis is back), and
//! reports `Up`: the hub, whose registry is the source of truth, then
//! re-applies that link's topics. The task ends when every handle is dropped.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use prometheus::IntGauge;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use super::conn::{Connected, Handshake, Target};
use super::cover::{Commands, Covers, Route};
use super::resp::{self, Value};
use super::sentinel::Moved;
use super::stream::{ReadHalf, Stream, WriteHalf};
use super::{RedisOptions, Request, NOT_PERMITTED};
use crate::backoff::backoff;
use crate::broker::{
    Applied, BrokerError, BrokerEvent, BrokerMessage, Changes, CoveredMessage, EventSink, HubGone,
    Topic,
};
use crate::metrics::Metrics;

/// First reconnect delay; doubles per failure up to [`RedisOptions::backoff_max`].
const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Bytes read from the socket per read call (the buffer grows for larger messages).
const READ_CHUNK: usize = 64 * 1024;
/// A connection that lived less than this counts as a failure for the
/// reconnect backoff: one that dies right after connecting (a refused
/// command, a proxy that drops us) must not retry at the minimum pace forever.
const STABLE_AFTER: Duration = Duration::from_secs(2);

/// What the links of one broker share: how many are connected (for the
/// `wsgate_broker_up{link}` and `wsgate_broker_links_up` gauges), and a
/// counter bumped by every successful connect, which wakes the siblings
/// waiting out their backoff (Redis is reachable again: no link should wait
/// longer than the first one that got through).
pub(super) struct Siblings {
    /// Each link's `wsgate_broker_up{link}` series.
    up: Vec<IntGauge>,
    /// Bumped on every successful connect.
    pub(super) reached: watch::Sender<u64>,
}

impl Siblings {
    /// Shared state of `links` links, none connected; their gauges are
    /// labelled `<prefix><index>`.
    pub(super) fn new(links: usize, metrics: &Metrics, prefix: &str) -> Arc<Siblings> {
        let labels: Vec<String> = (0..links).map(|i| format!("{prefix}{i}")).collect();
        Siblings::labelled(&labels, metrics)
    }

    /// Shared state of one link per label, none connected; each gauge is
    /// labelled as given (a cluster shard link: its master's address).
    pub(super) fn labelled(labels: &[String], metrics: &Metrics) -> Arc<Siblings> {
        let up = labels
            .iter()
            .map(|label| {
                let gauge = metrics.broker_up.with_label_values(&[label]);
                gauge.set(0);
                gauge
            })
            .collect();
        Arc::new(Siblings {
            up,
            reached: watch::Sender::new(0),
        })
    }

    /// Link `index` connected (`up`) or lost its connection. The links-up
    /// count is node-wide (several brokers' links add to it).
    fn set_up(&self, metrics: &Metrics, index: usize, up: bool) {
        if let Some(gauge) = self.up.get(index) {
            gauge.set(i64::from(up));
        }
        metrics.broker_links_up.add(if up { 1 } else { -1 });
    }
}

/// Everything a link task needs.
pub(super) struct Link {
    /// Its index among the broker's links (what its events name).
    pub(super) index: usize,
    /// Its `CLIENT SETNAME`.
    pub(super) name: String,
    pub(super) target: Target,
    pub(super) requests: mpsc::Receiver<Request>,
    pub(super) events: EventSink,
    pub(super) metrics: Metrics,
    pub(super) options: RedisOptions,
    /// Its share of `WSGATE_MAX_REDIS_PATTERNS`.
    pub(super) budget: usize,
    pub(super) siblings: Arc<Siblings>,
    /// Set on a Redis Cluster shard master's link (sharded pub/sub): its
    /// channels are `SSUBSCRIBE`d, and what says the slot map changed (a
    /// `MOVED` reply, a `sunsubscribe` Redis pushed) is reported here.
    pub(super) shard: Option<ShardHooks>,
}

/// How a sharded-pub/sub link tells the cluster's slot map keeper that a
/// slot may have moved.
#[derive(Clone)]
pub(super) struct ShardHooks {
    /// This link's id among the keeper's shard links.
    pub(super) id: usize,
    /// Where this link reports redirects and pushed `sunsubscribe`s, so the
    /// keeper refreshes the slot map and takes the slots down.
    pub(super) signals: Arc<super::cluster::Signals>,
}

/// How a connected period ended.
enum Exit {
    /// Every handle is gone: stop for good.
    Shutdown,
    /// The connection failed; reconnect.
    Lost(String),
}

/// The task that owns the pub/sub connection.
pub(super) struct Actor {
    index: usize,
    name: String,
    target: Target,
    requests: mpsc::Receiver<Request>,
    events: EventSink,
    metrics: Metrics,
    options: RedisOptions,
    budget: usize,
    siblings: Arc<Siblings>,
    shard: Option<ShardHooks>,
    /// What this link last added to `wsgate_redis_patterns` (a node-wide sum).
    reported_patterns: i64,
    /// Which Redis patterns stand for which client patterns, on the current
    /// connection (empty again on every new one).
    covers: Covers,
    /// Commands the coalescing decided on while reading (letting go of
    /// patterns a wider one replaced), written once the read is handled.
    follow_up: BytesMut,
}

/// The `req` of the node's own follow-up commands: nobody waits on them.
const FOLLOW_UP: u64 = u64::MAX;

/// One command written to Redis whose replies have not all arrived. Redis
/// answers commands in order: one confirmation per topic, or one error for
/// the whole command (an ACL refuses a SUBSCRIBE if any of its channels is
/// not permitted), so the front command is always the one answered.
struct Cmd {
    /// The request it belongs to.
    req: u64,
    /// Its topics, in argument order.
    topics: Vec<Topic>,
    /// (P)SUBSCRIBE rather than (P)UNSUBSCRIBE.
    subscribe: bool,
    /// A single-pattern `PSUBSCRIBE` of a Redis pattern chosen by the
    /// coalescing ([`cover`]): its topic is the Redis pattern, and a refusal
    /// refuses the client patterns waiting for it.
    cover: bool,
    /// Confirmations still expected.
    remaining: usize,
}

/// A request from the hub, answered when all its commands are.
struct Open {
    seq: u64,
    /// Commands of this request still in flight.
    commands: usize,
    refused: Vec<(Topic, String)>,
    done: Option<oneshot::Sender<Result<Applied, BrokerError>>>,
    /// A command of it was redirected (`MOVED`, `ASK`: a cluster slot is
    /// elsewhere): answered `Unavailable`, the hub tries again.
    failed: bool,
}

/// Everything in flight on one connection.
#[derive(Default)]
struct InFlight {
    cmds: VecDeque<Cmd>,
    open: VecDeque<Open>,
    next_seq: u64,
    /// Topics of a refused multi-topic SUBSCRIBE, to send again one per
    /// command so that exactly the refused ones are known.
    resend: Vec<(u64, Topic)>,
}

impl InFlight {
    /// The Redis pattern of the front command, if it is a coalesced `PSUBSCRIBE`.
    fn front_cover(&self) -> Option<bytes::Bytes> {
        self.cmds
            .front()
            .filter(|c| c.cover)
            .and_then(|c| c.topics.first())
            .map(|t| t.name().clone())
    }

    /// The front command got one confirmation (or, with `refused`, its error;
    /// `clients`: for a coalesced `PSUBSCRIBE`, the client patterns refused).
    fn answer(&mut self, refused: Option<String>, clients: Vec<bytes::Bytes>) -> Result<(), Exit> {
        let Some(cmd) = self.cmds.front_mut() else {
            return Err(Exit::Lost("reply with nothing in flight".to_owned()));
        };
        match refused {
            None => {
                cmd.remaining -= 1;
                if cmd.remaining > 0 {
                    return Ok(());
                }
            }
            Some(why) => {
                if !cmd.subscribe {
                    // Redis's state after a refused unsubscribe is unknown: start over.
                    return Err(Exit::Lost(format!("redis refused an unsubscribe: {why}")));
                }
                let reason = if why.starts_with("NOPERM") {
                    NOT_PERMITTED.to_owned()
                } else {
                    format!("refused by Redis: {why}")
                };
                let req = cmd.req;
                if cmd.cover {
                    if let Some(open) = self.open.iter_mut().find(|o| o.seq == req) {
                        for c in clients {
                            open.refused.push((Topic::Pattern(c), reason.clone()));
                        }
                    }
                } else if cmd.topics.len() == 1 {
                    let topic = cmd.topics[0].clone();
                    if let Some(open) = self.open.iter_mut().find(|o| o.seq == req) {
                        open.refused.push((topic, reason));
                    }
                } else {
                    let n = cmd.topics.len();
                    for topic in cmd.topics.drain(..) {
                        self.resend.push((req, topic));
                    }
                    if let Some(open) = self.open.iter_mut().find(|o| o.seq == req) {
                        open.commands += n;
                    }
                }
            }
        }
        let Some(cmd) = self.cmds.pop_front() else {
            return Ok(());
        };
        self.command_done(cmd.req);
        Ok(())
    }

    fn command_done(&mut self, req: u64) {
        let Some(at) = self.open.iter().position(|o| o.seq == req) else {
            return;
        };
        let open = &mut self.open[at];
        open.commands -= 1;
        if open.commands == 0 {
            if let Some(open) = self.open.remove(at) {
                if let Some(done) = open.done {
                    let _ = done.send(if open.failed {
                        Err(BrokerError::Unavailable)
                    } else {
                        Ok(Applied {
                            refused: open.refused,
                        })
                    });
                }
            }
        }
    }

    /// The front command was redirected to another cluster node: none of
    /// its topics was applied, and its request fails as a whole.
    fn redirected(&mut self) -> Result<(), Exit> {
        let Some(cmd) = self.cmds.pop_front() else {
            return Err(Exit::Lost("reply with nothing in flight".to_owned()));
        };
        if let Some(open) = self.open.iter_mut().find(|o| o.seq == cmd.req) {
            open.failed = true;
        }
        self.command_done(cmd.req);
        Ok(())
    }

    /// Whether a `sunsubscribe` for `channel` answers the front command
    /// (else Redis pushed it: the channel's slot left this node).
    fn expects_sunsubscribe(&self, channel: &Bytes) -> bool {
        self.cmds.front().is_some_and(|c| {
            !c.subscribe
                && c.topics
                    .iter()
                    .any(|t| matches!(t, Topic::Channel(n) if n == channel))
        })
    }

    /// The connection ended: nothing in flight will be answered.
    fn fail(self) {
        for open in self.open {
            if let Some(done) = open.done {
                let _ = done.send(Err(BrokerError::ConnectionLost));
            }
        }
    }
}

impl Actor {
    /// The task of `link`, ready to [`Actor::run`].
    pub(super) fn new(link: Link) -> Actor {
        Actor {
            index: link.index,
            name: link.name,
            target: link.target,
            requests: link.requests,
            events: link.events,
            metrics: link.metrics,
            options: link.options,
            budget: link.budget,
            siblings: link.siblings,
            shard: link.shard,
            reported_patterns: 0,
            covers: Covers::new(link.budget),
            follow_up: BytesMut::new(),
        }
    }

    /// Where it connects, for its tracing span.
    pub(super) fn addr(&self) -> String {
        self.target.addr().to_string()
    }

    /// Keeps `wsgate_redis_patterns` the sum of every link's count.
    fn report_patterns(&mut self, now: usize) {
        let now = now as i64;
        self.metrics
            .redis_patterns
            .add(now - self.reported_patterns);
        self.reported_patterns = now;
    }

    /// Connects, serves and reconnects until every handle is dropped.
    pub(super) async fn run(mut self) {
        let mut failures: u32 = 0;
        let mut generation: u64 = 0;
        let link = self.index;
        let mut reached = self.siblings.reached.subscribe();
        loop {
            // From here on, a sibling's connect ends this link's next pause.
            reached.mark_unchanged();
            match self.connect().await {
                Ok(Some((stream, moved))) => {
                    let connected_at = Instant::now();
                    generation += 1;
                    info!(generation, "connected");
                    self.siblings.reached.send_modify(|n| *n += 1);
                    reached.mark_unchanged();
                    if self
                        .events
                        .state(BrokerEvent::Up { link, generation })
                        .await
                        .is_err()
                    {
                        return;
                    }
                    self.siblings.set_up(&self.metrics, link, true);
                    let exit = self.serve(stream, moved, generation).await;
                    self.siblings.set_up(&self.metrics, link, false);
                    // Only a connection that lasted resets the backoff.
                    if connected_at.elapsed() >= STABLE_AFTER {
                        failures = 0;
                    } else {
                        failures = failures.saturating_add(1);
                    }
                    // Tell the hub before anything else: every subscription is gone.
                    if self.events.state(BrokerEvent::Down { link }).await.is_err() {
                        return;
                    }
                    match exit {
                        Exit::Shutdown => return,
                        Exit::Lost(cause) => warn!(%cause, "pub/sub connection lost"),
                    }
                }
                Ok(None) => return,
                Err(cause) => {
                    failures = failures.saturating_add(1);
                    if failures == 1 || failures % 10 == 0 {
                        warn!(%cause, failures, "cannot connect to redis");
                    }
                }
            }
            let pause = backoff(failures, BACKOFF_MIN, self.options.backoff_max);
            // A sibling that connected since this link's last attempt (or
            // since its own connect) ends the pause: Redis is back.
            let sibling_back = async {
                if reached.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            let pause = async {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = sibling_back => {}
                }
            };
            if self.refuse_while(pause).await.is_none() {
                return;
            }
            if self
                .events
                .state(BrokerEvent::Reconnecting { link })
                .await
                .is_err()
            {
                return;
            }
        }
    }

    /// Runs `fut` while answering every request with `Unavailable`; `None` if
    /// the handles are all gone (shutdown).
    async fn refuse_while<T>(&mut self, fut: impl std::future::Future<Output = T>) -> Option<T> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return Some(out),
                req = self.requests.recv() => match req {
                    Some(req) => { let _ = req.done.send(Err(BrokerError::Unavailable)); }
                    None => return None,
                },
            }
        }
    }

    /// Connects, authenticates and checks that Redis answers a PING, all
    /// within the probe timeout (a frozen Redis still accepts TCP connections
    /// through the kernel; the PING is what proves it alive). `Ok(None)` means
    /// shutdown was requested meanwhile.
    async fn connect(&mut self) -> Result<Option<(Stream, Moved)>, String> {
        // Pub/sub ignores databases: no SELECT.
        let mut handshake = Handshake::new(&self.target, &self.name, false);
        handshake.push("PING", &[b"PING"]);
        let target = self.target.clone();
        let attempt = async move {
            let Connected {
                stream,
                replies,
                moved,
            } = handshake.run(&target).await?;
            for (_, reply) in replies {
                if !matches!(reply, Value::Simple(_)) {
                    return Err(format!("handshake refused: {reply:?}"));
                }
            }
            Ok::<_, String>((stream, moved))
        };
        match self
            .refuse_while(tokio::time::timeout(self.options.probe_timeout, attempt))
            .await
        {
            None => Ok(None),
            Some(Ok(result)) => result.map(Some),
            Some(Err(_)) => Err("connect or handshake timed out".to_owned()),
        }
    }

    /// Serves one connected period until the connection fails or shutdown.
    /// Queues the coalescing's own `PUNSUBSCRIBE`s, written after the read
    /// that decided them; nobody waits for their confirmations.
    fn follow_ups(&mut self, follow: Commands, inflight: &mut InFlight) {
        if follow.punsubscribe.is_empty() {
            return;
        }
        encode(&mut self.follow_up, b"PUNSUBSCRIBE", &follow.punsubscribe);
        inflight.cmds.push_back(Cmd {
            req: FOLLOW_UP,
            topics: follow
                .punsubscribe
                .into_iter()
                .map(Topic::Pattern)
                .collect(),
            subscribe: false,
            cover: false,
            remaining: 0,
        });
        if let Some(cmd) = inflight.cmds.back_mut() {
            cmd.remaining = cmd.topics.len();
        }
    }

    async fn serve(&mut self, stream: Stream, mut moved: Moved, generation: u64) -> Exit {
        self.covers = Covers::new(self.budget);
        self.follow_up.clear();
        let (mut rd, mut wr) = stream.split();
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let mut out = BytesMut::new();
        let mut inflight = InFlight::default();
        let mut probe = tokio::time::interval(self.options.probe_interval);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // When the outstanding PING was sent; `None` when none is outstanding.
        let mut pinged: Option<Instant> = None;
        // When Redis last sent anything. A busy Redis (e.g. working through a
        // large PSUBSCRIBE batch, which costs O(patterns held) per pattern
        // before Redis 7.2) answers our PING late but is alive: any byte read
        // since the PING counts as a sign of life.
        let mut last_read = Instant::now();
        let write_timeout = self.options.probe_timeout;
        let exit = loop {
            tokio::select! {
                () = moved.wait() => break Exit::Lost("sentinel announced a new master".to_owned()),
                req = self.requests.recv() => {
                    let Some(req) = req else { break Exit::Shutdown };
                    if req.reset && req.generation == generation {
                        let _ = req.done.send(Ok(Applied::default()));
                        break Exit::Lost("reset: the same link of another shard failed".to_owned());
                    }
                    if req.generation != generation || req.reset {
                        let _ = req.done.send(Err(BrokerError::Unavailable));
                        continue;
                    }
                    out.clear();
                    let cmds = encode_changes(&mut out, &req.changes, &mut self.covers, self.shard.is_some());
                    self.report_patterns(self.covers.redis_patterns());
                    if cmds.is_empty() {
                        let _ = req.done.send(Ok(Applied::default()));
                        continue;
                    }
                    let seq = inflight.next_seq;
                    inflight.next_seq += 1;
                    inflight.open.push_back(Open { seq, commands: cmds.len(), refused: Vec::new(), done: Some(req.done), failed: false });
                    for (topics, subscribe, cover) in cmds {
                        let remaining = topics.len();
                        inflight.cmds.push_back(Cmd { req: seq, topics, subscribe, cover, remaining });
                    }
                    if let Err(cause) = write_within(&mut wr, &out, write_timeout).await {
                        break Exit::Lost(cause);
                    }
                }
                read = read_some(&mut rd, &mut buf) => {
                    last_read = Instant::now();
                    if let Err(cause) = read {
                        break Exit::Lost(cause);
                    }
                    if let Err(exit) = self.drain(&mut buf, &mut inflight, &mut pinged) {
                        break exit;
                    }
                    if !self.follow_up.is_empty() {
                        self.report_patterns(self.covers.redis_patterns());
                        let written = write_within(&mut wr, &self.follow_up, write_timeout).await;
                        self.follow_up.clear();
                        if let Err(cause) = written {
                            break Exit::Lost(cause);
                        }
                    }
                    if !inflight.resend.is_empty() {
                        out.clear();
                        let sharded = self.shard.is_some();
                        for (req, topic) in inflight.resend.drain(..) {
                            let args: [&[u8]; 2] = [subscribe_command(&topic, sharded), topic.name()];
                            resp::encode_command(&mut out, args.into_iter());
                            inflight.cmds.push_back(Cmd { req, topics: vec![topic], subscribe: true, cover: false, remaining: 1 });
                        }
                        if let Err(cause) = write_within(&mut wr, &out, write_timeout).await {
                            break Exit::Lost(cause);
                        }
                    }
                }
                tick = probe.tick() => {
                    if self.events.flush_gap().is_err() {
                        break Exit::Shutdown;
                    }
                    // Ages are measured between ticks (the PING is stamped with
                    // the tick that sent it), so the timeout expires exactly on a
                    // tick: detection within interval + timeout, not one more interval.
                    let now = tick.into_std();
                    match pinged {
                        Some(at) if now.duration_since(at.max(last_read)) >= self.options.probe_timeout => {
                            break Exit::Lost(format!("no PING reply within {:?}", self.options.probe_timeout));
                        }
                        Some(_) => {}
                        None => {
                            out.clear();
                            resp::encode_command(&mut out, [&b"PING"[..]].into_iter());
                            if let Err(cause) = write_within(&mut wr, &out, write_timeout).await {
                                break Exit::Lost(cause);
                            }
                            pinged = Some(now);
                        }
                    }
                }
            }
        };
        inflight.fail();
        self.report_patterns(0);
        exit
    }

    /// Handles every complete value in `buf`.
    fn drain(
        &mut self,
        buf: &mut BytesMut,
        inflight: &mut InFlight,
        pinged: &mut Option<Instant>,
    ) -> Result<(), Exit> {
        while let Some(value) = resp::parse(buf).map_err(|e| Exit::Lost(e.to_string()))? {
            self.handle(value, inflight, pinged)?;
        }
        Ok(())
    }

    fn handle(
        &mut self,
        value: Value,
        inflight: &mut InFlight,
        pinged: &mut Option<Instant>,
    ) -> Result<(), Exit> {
        let items = match value {
            Value::Array(items) => items,
            // PING on a connection with no subscriptions (RESP2 normal mode).
            Value::Simple(s) if s.eq_ignore_ascii_case(b"PONG") => {
                *pinged = None;
                return Ok(());
            }
            Value::Error(e) => {
                // A refused (P)SUBSCRIBE: Redis applied none of its topics.
                // Only those topics' subscribers are told; the connection and
                // everyone else's delivery carry on.
                let msg = String::from_utf8_lossy(&e).into_owned();
                if let Some(shard) = &self.shard {
                    if super::cluster::is_redirect(&msg) {
                        // The command's slots are not (or no longer) held
                        // here: each goes `Down` (its subscribers are told
                        // `interrupted`) until the refreshed map brings it
                        // back on its owner and the hub resubscribes it. A
                        // failed apply alone would leave the slot `Up`.
                        debug!(reason = %msg, "cluster redirect: the slot map is refreshed");
                        let slots: Vec<u16> = inflight
                            .cmds
                            .front()
                            .map(|c| {
                                c.topics
                                    .iter()
                                    .map(|t| super::slot::slot_of(t.name()))
                                    .collect()
                            })
                            .unwrap_or_default();
                        for slot in slots {
                            shard.signals.lost(shard.id, slot);
                        }
                        shard.signals.refresh();
                        return inflight.redirected();
                    }
                }
                debug!(reason = %msg, "redis refused a command");
                let clients = match inflight.front_cover() {
                    Some(pattern) => {
                        let mut follow = Commands::default();
                        let clients = self.covers.refused(&pattern, &mut follow);
                        self.follow_ups(follow, inflight);
                        clients
                    }
                    None => Vec::new(),
                };
                return inflight.answer(Some(msg), clients);
            }
            other => return Err(Exit::Lost(format!("unexpected reply {other:?}"))),
        };
        let mut items = items.into_iter();
        let kind = match items.next() {
            Some(Value::Bulk(kind)) => kind,
            other => return Err(Exit::Lost(format!("unexpected push {other:?}"))),
        };
        match (&kind[..], items.next(), items.next(), items.next()) {
            (
                b"message" | b"smessage",
                Some(Value::Bulk(channel)),
                Some(Value::Bulk(payload)),
                None,
            ) => {
                let topic = Topic::Channel(channel.clone());
                self.deliver(BrokerMessage {
                    topic,
                    channel,
                    payload,
                    position: None,
                })
            }
            (
                b"pmessage",
                Some(Value::Bulk(pattern)),
                Some(Value::Bulk(channel)),
                Some(Value::Bulk(payload)),
            ) => match self.covers.route(&pattern) {
                Route::Nobody => Ok(()),
                Route::Itself => self.deliver(BrokerMessage {
                    topic: Topic::Pattern(pattern),
                    channel,
                    payload,
                    position: None,
                }),
                Route::Covered(patterns) => self
                    .events
                    .covered(CoveredMessage {
                        via: pattern,
                        patterns,
                        channel,
                        payload,
                    })
                    .map_err(|HubGone| Exit::Shutdown),
            },
            (b"sunsubscribe", Some(Value::Bulk(channel)), _, _)
                if !inflight.expects_sunsubscribe(&channel) =>
            {
                // Pushed by Redis: the channel's slot moved off this node.
                if let Some(shard) = &self.shard {
                    let slot = super::slot::slot_of(&channel);
                    info!(slot, "redis dropped a sharded subscription: its slot moved");
                    shard.signals.lost(shard.id, slot);
                }
                Ok(())
            }
            (
                b"subscribe" | b"psubscribe" | b"unsubscribe" | b"punsubscribe" | b"ssubscribe"
                | b"sunsubscribe",
                topic,
                _,
                _,
            ) => {
                if let (b"psubscribe", Some(Value::Bulk(pattern))) = (&kind[..], &topic) {
                    let mut follow = Commands::default();
                    self.covers
                        .confirmed(pattern, &mut follow)
                        .map_err(Exit::Lost)?;
                    self.follow_ups(follow, inflight);
                }
                inflight.answer(None, Vec::new())
            }
            (b"pong", _, _, _) => {
                *pinged = None;
                Ok(())
            }
            _ => Err(Exit::Lost(format!(
                "unexpected push {:?}",
                String::from_utf8_lossy(&kind)
            ))),
        }
    }

    /// Hands a message to the hub without waiting: a full buffer drops it
    /// (counted, and announced to its subscribers as a gap).
    fn deliver(&mut self, msg: BrokerMessage) -> Result<(), Exit> {
        self.events.message(msg).map_err(|HubGone| Exit::Shutdown)
    }
}

/// Writes `bytes` or fails after `limit`: a frozen Redis stops reading, and a
/// write that never finishes must not hang the connection's task.
async fn write_within(wr: &mut WriteHalf, bytes: &[u8], limit: Duration) -> Result<(), String> {
    let write = async {
        wr.write_all(bytes).await?;
        // TLS may hold the last record until flushed (a no-op on TCP).
        wr.flush().await
    };
    match tokio::time::timeout(limit, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("write to redis took longer than {limit:?}")),
    }
}

/// Reads at least one byte into `buf`; EOF is an error (Redis closed on us).
async fn read_some(rd: &mut ReadHalf, buf: &mut BytesMut) -> Result<(), String> {
    buf.reserve(READ_CHUNK);
    match rd.read_buf(buf).await {
        Ok(0) => Err("connection closed by redis".to_owned()),
        Ok(_) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// The command that subscribes `topic` (`sharded`: a channel of a cluster
/// shard's link).
fn subscribe_command(topic: &Topic, sharded: bool) -> &'static [u8] {
    match topic {
        Topic::Channel(_) if sharded => b"SSUBSCRIBE",
        Topic::Channel(_) => b"SUBSCRIBE",
        Topic::Pattern(_) => b"PSUBSCRIBE",
    }
}

/// `names` as one command each slot's channels (`SSUBSCRIBE` takes
/// channels of one slot only), else as one command.
fn by_slot(names: Vec<Bytes>, sharded: bool) -> Vec<Vec<Bytes>> {
    if !sharded || names.is_empty() {
        return vec![names];
    }
    let mut groups: std::collections::BTreeMap<u16, Vec<Bytes>> = Default::default();
    for n in names {
        groups.entry(super::slot::slot_of(&n)).or_default().push(n);
    }
    groups.into_values().collect()
}

/// Encodes `changes`: channels as up to two batched commands; patterns go
/// through `covers`, which decides what Redis holds for them (every removal
/// before any addition, so a `PUNSUBSCRIBE` never follows a `PSUBSCRIBE` of
/// the same batch), each `PSUBSCRIBE` alone so that a refusal names exactly
/// one Redis pattern. Returns each command's topics (Redis confirms each
/// one), whether it subscribes, and whether it is a coalesced `PSUBSCRIBE`.
/// `sharded`: channels as `SSUBSCRIBE`/`SUNSUBSCRIBE`, one per slot.
fn encode_changes(
    out: &mut BytesMut,
    changes: &Changes,
    covers: &mut Covers,
    sharded: bool,
) -> Vec<(Vec<Topic>, bool, bool)> {
    let (unsub, sub): (&[u8], &[u8]) = if sharded {
        (b"SUNSUBSCRIBE", b"SSUBSCRIBE")
    } else {
        (b"UNSUBSCRIBE", b"SUBSCRIBE")
    };
    let channels = |topics: &[Topic]| -> Vec<Bytes> {
        topics
            .iter()
            .filter_map(|t| match t {
                Topic::Channel(n) => Some(n.clone()),
                Topic::Pattern(_) => None,
            })
            .collect()
    };
    let mut patterns = Commands::default();
    for t in &changes.unsubscribe {
        if let Topic::Pattern(p) = t {
            covers.remove(p, &mut patterns);
        }
    }
    for t in &changes.subscribe {
        if let Topic::Pattern(p) = t {
            covers.add(p.clone(), &mut patterns);
        }
    }
    let mut cmds = Vec::new();
    for unsubscribe in by_slot(channels(&changes.unsubscribe), sharded) {
        if unsubscribe.is_empty() {
            continue;
        }
        encode(out, unsub, &unsubscribe);
        cmds.push((
            unsubscribe.into_iter().map(Topic::Channel).collect(),
            false,
            false,
        ));
    }
    if !patterns.punsubscribe.is_empty() {
        encode(out, b"PUNSUBSCRIBE", &patterns.punsubscribe);
        cmds.push((
            patterns
                .punsubscribe
                .into_iter()
                .map(Topic::Pattern)
                .collect(),
            false,
            false,
        ));
    }
    for subscribe in by_slot(channels(&changes.subscribe), sharded) {
        if subscribe.is_empty() {
            continue;
        }
        encode(out, sub, &subscribe);
        cmds.push((
            subscribe.into_iter().map(Topic::Channel).collect(),
            true,
            false,
        ));
    }
    for p in patterns.psubscribe {
        encode(out, b"PSUBSCRIBE", std::slice::from_ref(&p));
        cmds.push((vec![Topic::Pattern(p)], true, true));
    }
    cmds
}

/// Appends `command names...` to `out`, unless there are no names.
fn encode(out: &mut BytesMut, command: &[u8], names: &[Bytes]) {
    if names.is_empty() {
        return;
    }
    let args: Vec<&[u8]> = std::iter::once(command)
        .chain(names.iter().map(|n| &n[..]))
        .collect();
    resp::encode_command(out, args.into_iter());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Channels are batched; each pattern is its own `PSUBSCRIBE` (so a
    /// refusal names one), and `b?`, not cheap for Redis, is held as `b*`.
    #[test]
    fn changes_become_batched_commands() {
        let mut out = BytesMut::new();
        let changes = Changes {
            subscribe: vec![
                Topic::Pattern(Bytes::from_static(b"a*")),
                Topic::Channel(Bytes::from_static(b"c")),
                Topic::Pattern(Bytes::from_static(b"b?")),
            ],
            unsubscribe: vec![Topic::Channel(Bytes::from_static(b"d"))],
        };
        let cmds = encode_changes(&mut out, &changes, &mut Covers::new(64), false);
        let counts: Vec<(usize, bool, bool)> =
            cmds.iter().map(|(t, s, c)| (t.len(), *s, *c)).collect();
        assert_eq!(
            counts,
            [
                (1, false, false),
                (1, true, false),
                (1, true, true),
                (1, true, true)
            ]
        );
        assert_eq!(
            &out[..],
            &b"*2\r\n$11\r\nUNSUBSCRIBE\r\n$1\r\nd\r\n*2\r\n$9\r\nSUBSCRIBE\r\n$1\r\nc\r\n*2\r\n$10\r\nPSUBSCRIBE\r\n$2\r\na*\r\n*2\r\n$10\r\nPSUBSCRIBE\r\n$2\r\nb*\r\n"[..]
        );
    }
}
