//! The Redis broker: one dedicated pub/sub connection per node, as an actor.
//!
//! A single task owns the pub/sub socket. It takes [`Changes`] from a bounded
//! request channel, writes them as multi-argument `SUBSCRIBE`/`PSUBSCRIBE`/
//! `UNSUBSCRIBE`/`PUNSUBSCRIBE` commands, and answers each request once Redis
//! has confirmed every topic in it. Messages go to the hub as [`BrokerEvent`]s
//! without ever blocking the reader. When the connection is lost the task
//! reports `Down`, reconnects with capped, jittered backoff for as long as it
//! takes, and reports `Up`: the hub, whose registry is the source of truth,
//! then re-applies everything. The task ends when every handle is dropped.
//!
//! We speak RESP2 ourselves on this connection (see [`resp`]) rather than use
//! redis-rs's pub/sub types: those either do not reconnect or buffer pushes in
//! an unbounded channel, and they copy every payload. Publishing uses an
//! ordinary redis-rs [`ConnectionManager`], which also polls `PUBSUB NUMPAT`
//! for the `wsgate_redis_numpat` gauge (the pub/sub connection, in RESP2
//! subscribed mode, cannot run it).
//!
//! Client patterns are not subscribed one for one: [`cover`] decides which
//! cheap Redis patterns stand for them (at most `WSGATE_MAX_REDIS_PATTERNS`),
//! so that the cost every `PUBLISH` pays in Redis stays small whatever the
//! clients ask for.

mod cover;
mod resp;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::future::{BoxFuture, FutureExt};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn, Instrument};

use super::{
    Broker, BrokerError, BrokerEvent, BrokerMessage, Changes, CoveredMessage, EventSink, HubGone,
    Topic,
};
use crate::backoff::backoff;
use crate::metrics::Metrics;
use cover::{Commands, Covers, Route};
use resp::Value;

/// Requests waiting for the actor. Only the hub's reconciler sends, one batch
/// at a time, so a handful is plenty; a full channel makes the sender wait.
const REQUEST_CAPACITY: usize = 16;
/// First reconnect delay; doubles per failure up to [`RedisOptions::backoff_max`].
const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Bytes read from the socket per read call (the buffer grows for larger messages).
const READ_CHUNK: usize = 64 * 1024;

/// Why the Redis URL cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RedisConfigError {
    /// redis-rs could not parse the URL.
    #[error("invalid redis URL: {0}")]
    Url(#[from] redis::RedisError),
    /// Only plain TCP is supported for the pub/sub connection.
    #[error("only redis://host:port URLs are supported")]
    Unsupported,
}

/// Timing of the pub/sub connection (from [`crate::Config`]).
#[derive(Debug, Clone, Copy)]
pub struct RedisOptions {
    /// How often the connection is probed with PING.
    pub probe_interval: Duration,
    /// How long a probe, a connect or a write may take before the connection
    /// counts as dead.
    pub probe_timeout: Duration,
    /// Reconnect backoff cap (an outage costs at most this much extra).
    pub backoff_max: Duration,
    /// `WSGATE_MAX_REDIS_PATTERNS`: patterns this node may hold in Redis;
    /// client patterns beyond are coalesced (see [`cover`]).
    pub max_redis_patterns: usize,
}

/// Handle to the Redis broker actor; dropping every handle stops it.
pub struct RedisBroker {
    requests: mpsc::Sender<Request>,
    publisher: ConnectionManager,
}

struct Request {
    generation: u64,
    changes: Changes,
    done: oneshot::Sender<Result<(), BrokerError>>,
}

impl RedisBroker {
    /// Parses `url` and starts the pub/sub actor; it connects in the background.
    pub fn start(
        url: &str,
        events: mpsc::Sender<BrokerEvent>,
        metrics: Metrics,
        options: RedisOptions,
    ) -> Result<RedisBroker, RedisConfigError> {
        let client = redis::Client::open(url)?;
        let info = client.get_connection_info();
        let (host, port) = match info.addr() {
            redis::ConnectionAddr::Tcp(host, port) => (host.clone(), *port),
            _ => return Err(RedisConfigError::Unsupported),
        };
        let auth = info.redis_settings().password().map(|password| {
            let user = info.redis_settings().username().map(str::to_owned);
            (user, password.to_owned())
        });
        let publisher = ConnectionManager::new_lazy_with_config(
            client,
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(options.probe_timeout))
                .set_response_timeout(Some(options.probe_timeout))
                .set_number_of_retries(1),
        )?;
        let (tx, rx) = mpsc::channel(REQUEST_CAPACITY);
        tokio::spawn(
            poll_numpat(
                publisher.clone(),
                tx.downgrade(),
                metrics.clone(),
                options.probe_interval,
            )
            .instrument(tracing::info_span!("redis_numpat")),
        );
        let actor = Actor {
            host,
            port,
            auth,
            requests: rx,
            events: EventSink::new(events, metrics.clone()),
            metrics,
            options,
            covers: Covers::new(options.max_redis_patterns),
            follow_up: BytesMut::new(),
        };
        let span =
            tracing::info_span!("redis_pubsub", addr = %format!("{}:{}", actor.host, actor.port));
        tokio::spawn(actor.run().instrument(span));
        Ok(RedisBroker {
            requests: tx,
            publisher,
        })
    }
}

impl Broker for RedisBroker {
    fn apply(
        &self,
        generation: u64,
        changes: Changes,
    ) -> BoxFuture<'static, Result<(), BrokerError>> {
        let requests = self.requests.clone();
        async move {
            let (done, confirmed) = oneshot::channel();
            requests
                .send(Request {
                    generation,
                    changes,
                    done,
                })
                .await
                .map_err(|_| BrokerError::Unavailable)?;
            confirmed.await.map_err(|_| BrokerError::ConnectionLost)?
        }
        .boxed()
    }

    fn publish(
        &self,
        channel: Bytes,
        payload: Bytes,
    ) -> BoxFuture<'static, Result<u64, BrokerError>> {
        let mut conn = self.publisher.clone();
        async move {
            // The connection manager notices a dead connection only when a
            // command fails on it, then reconnects: one retry makes the first
            // publish after an outage succeed instead of failing for nothing.
            let mut last = None;
            for _ in 0..2 {
                let mut cmd = redis::cmd("PUBLISH");
                cmd.arg(&channel[..]).arg(&payload[..]);
                match cmd.query_async::<u64>(&mut conn).await {
                    Ok(n) => return Ok(n),
                    // A timeout may have published already: never repeat it.
                    Err(e) if e.is_timeout() => {
                        last = Some(e);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            if let Some(e) = last {
                debug!(cause = %e, "publish failed");
            }
            Err(BrokerError::Unavailable)
        }
        .boxed()
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}

/// How a connected period ended.
enum Exit {
    /// Every handle is gone: stop for good.
    Shutdown,
    /// The connection failed; reconnect.
    Lost(String),
}

/// The task that owns the pub/sub connection.
struct Actor {
    host: String,
    port: u16,
    auth: Option<(Option<String>, String)>,
    requests: mpsc::Receiver<Request>,
    events: EventSink,
    metrics: Metrics,
    options: RedisOptions,
    /// Which Redis patterns stand for which client patterns, on the current
    /// connection (empty again on every new one).
    covers: Covers,
    /// Commands the coalescing decided on while reading (letting go of
    /// patterns a wider one replaced), written once the read is handled.
    follow_up: BytesMut,
}

/// A request written to Redis whose confirmations have not all arrived.
struct InFlight {
    /// One confirmation per topic argument; Redis sends them in order.
    remaining: usize,
    /// `None` for the node's own follow-up commands: nobody waits on them.
    done: Option<oneshot::Sender<Result<(), BrokerError>>>,
}

impl Actor {
    async fn run(mut self) {
        let mut failures: u32 = 0;
        let mut generation: u64 = 0;
        loop {
            match self.connect().await {
                Ok(Some(stream)) => {
                    failures = 0;
                    generation += 1;
                    info!(generation, "connected");
                    if self
                        .events
                        .state(BrokerEvent::Up { generation })
                        .await
                        .is_err()
                    {
                        return;
                    }
                    self.metrics.broker_up.set(1);
                    let exit = self.serve(stream, generation).await;
                    self.metrics.broker_up.set(0);
                    // Tell the hub before anything else: every subscription is gone.
                    if self.events.state(BrokerEvent::Down).await.is_err() {
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
            if self.refuse_while(tokio::time::sleep(pause)).await.is_none() {
                return;
            }
            if self.events.state(BrokerEvent::Reconnecting).await.is_err() {
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
    async fn connect(&mut self) -> Result<Option<TcpStream>, String> {
        let addr = (self.host.clone(), self.port);
        let auth = self.auth.clone();
        let attempt = async move {
            let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            stream.set_nodelay(true).map_err(|e| e.to_string())?;
            let mut cmd = BytesMut::new();
            if let Some((user, password)) = &auth {
                let mut args: Vec<&[u8]> = vec![b"AUTH"];
                args.extend(user.as_deref().map(str::as_bytes));
                args.push(password.as_bytes());
                resp::encode_command(&mut cmd, args.into_iter());
            }
            resp::encode_command(&mut cmd, [&b"PING"[..]].into_iter());
            stream.write_all(&cmd).await.map_err(|e| e.to_string())?;
            let mut buf = BytesMut::with_capacity(256);
            let mut replies = if auth.is_some() { 2 } else { 1 };
            while replies > 0 {
                if stream.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
                    return Err("connection closed during handshake".to_owned());
                }
                while let Some(v) = resp::parse(&mut buf).map_err(|e| e.to_string())? {
                    match v {
                        Value::Simple(_) => replies -= 1,
                        other => return Err(format!("handshake refused: {other:?}")),
                    }
                }
            }
            Ok::<_, String>(stream)
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
    async fn serve(&mut self, stream: TcpStream, generation: u64) -> Exit {
        self.covers = Covers::new(self.options.max_redis_patterns);
        self.follow_up.clear();
        let (mut rd, mut wr) = stream.into_split();
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let mut out = BytesMut::new();
        let mut inflight: VecDeque<InFlight> = VecDeque::new();
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
                req = self.requests.recv() => {
                    let Some(req) = req else { break Exit::Shutdown };
                    if req.generation != generation {
                        let _ = req.done.send(Err(BrokerError::Unavailable));
                        continue;
                    }
                    out.clear();
                    let expected = encode_changes(&mut out, &req.changes, &mut self.covers);
                    self.metrics.redis_patterns.set(self.covers.redis_patterns() as i64);
                    if expected == 0 {
                        let _ = req.done.send(Ok(()));
                        continue;
                    }
                    inflight.push_back(InFlight { remaining: expected, done: Some(req.done) });
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
                        self.metrics.redis_patterns.set(self.covers.redis_patterns() as i64);
                        let written = write_within(&mut wr, &self.follow_up, write_timeout).await;
                        self.follow_up.clear();
                        if let Err(cause) = written {
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
        for req in inflight {
            if let Some(done) = req.done {
                let _ = done.send(Err(BrokerError::ConnectionLost));
            }
        }
        self.metrics.redis_patterns.set(0);
        exit
    }

    /// Handles every complete value in `buf`.
    fn drain(
        &mut self,
        buf: &mut BytesMut,
        inflight: &mut VecDeque<InFlight>,
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
        inflight: &mut VecDeque<InFlight>,
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
                // A refused (P)SUBSCRIBE leaves Redis's state unknown to us; a
                // fresh connection makes it known (empty) again and the hub resyncs.
                let msg = String::from_utf8_lossy(&e).into_owned();
                if let Some(done) = inflight.pop_front().and_then(|req| req.done) {
                    let _ = done.send(Err(BrokerError::Refused(msg.clone())));
                }
                return Err(Exit::Lost(format!("redis refused a command: {msg}")));
            }
            other => return Err(Exit::Lost(format!("unexpected reply {other:?}"))),
        };
        let mut items = items.into_iter();
        let kind = match items.next() {
            Some(Value::Bulk(kind)) => kind,
            other => return Err(Exit::Lost(format!("unexpected push {other:?}"))),
        };
        match (&kind[..], items.next(), items.next(), items.next()) {
            (b"message", Some(Value::Bulk(channel)), Some(Value::Bulk(payload)), None) => {
                let topic = Topic::Channel(channel.clone());
                self.deliver(BrokerMessage {
                    topic,
                    channel,
                    payload,
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
            (b"subscribe" | b"psubscribe" | b"unsubscribe" | b"punsubscribe", topic, _, _) => {
                if let (b"psubscribe", Some(Value::Bulk(pattern))) = (&kind[..], &topic) {
                    let mut follow = Commands::default();
                    self.covers
                        .confirmed(pattern, &mut follow)
                        .map_err(Exit::Lost)?;
                    if !follow.punsubscribe.is_empty() {
                        inflight.push_back(InFlight {
                            remaining: follow.punsubscribe.len(),
                            done: None,
                        });
                        encode(&mut self.follow_up, b"PUNSUBSCRIBE", &follow.punsubscribe);
                    }
                }
                if let Some(front) = inflight.front_mut() {
                    front.remaining -= 1;
                    if front.remaining == 0 {
                        if let Some(done) = inflight.pop_front().and_then(|req| req.done) {
                            let _ = done.send(Ok(()));
                        }
                    }
                }
                Ok(())
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
async fn write_within(
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    bytes: &[u8],
    limit: Duration,
) -> Result<(), String> {
    match tokio::time::timeout(limit, wr.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("write to redis took longer than {limit:?}")),
    }
}

/// Reads at least one byte into `buf`; EOF is an error (Redis closed on us).
async fn read_some(
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    buf: &mut BytesMut,
) -> Result<(), String> {
    buf.reserve(READ_CHUNK);
    match rd.read_buf(buf).await {
        Ok(0) => Err("connection closed by redis".to_owned()),
        Ok(_) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// Encodes `changes` as up to four commands; returns the number of
/// confirmations Redis will send (one per argument). Channels are sent as
/// they are; patterns go through `covers`, which decides what Redis holds
/// for them (every removal is decided before any addition, so that a
/// `PUNSUBSCRIBE` never follows a `PSUBSCRIBE` of the same batch).
fn encode_changes(out: &mut BytesMut, changes: &Changes, covers: &mut Covers) -> usize {
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
    let groups: [(&[u8], Vec<Bytes>); 4] = [
        (b"UNSUBSCRIBE", channels(&changes.unsubscribe)),
        (b"PUNSUBSCRIBE", patterns.punsubscribe),
        (b"SUBSCRIBE", channels(&changes.subscribe)),
        (b"PSUBSCRIBE", patterns.psubscribe),
    ];
    let mut expected = 0;
    for (command, names) in groups {
        expected += names.len();
        encode(out, command, &names);
    }
    expected
}

/// Appends `command names...` to `out`, unless there are no names.
fn encode(out: &mut BytesMut, command: &[u8], names: &[Bytes]) {
    if names.is_empty() {
        return;
    }
    resp::encode_command(
        out,
        std::iter::once(command)
            .chain(names.iter().map(|n| &n[..]))
            .collect::<Vec<_>>()
            .into_iter(),
    );
}

/// Keeps `wsgate_redis_numpat` at what Redis reports, polling `PUBSUB
/// NUMPAT` (O(1) in Redis) every `interval` on the publishing connection,
/// until the broker is dropped. A failed poll leaves the last value.
async fn poll_numpat(
    mut conn: ConnectionManager,
    alive: mpsc::WeakSender<Request>,
    metrics: Metrics,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if alive.upgrade().is_none() {
            return;
        }
        match redis::cmd("PUBSUB")
            .arg("NUMPAT")
            .query_async::<i64>(&mut conn)
            .await
        {
            Ok(n) => metrics.redis_numpat.set(n),
            Err(e) => debug!(cause = %e, "PUBSUB NUMPAT failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `b?` is not cheap for Redis: it is held as the cover `b*`.
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
        assert_eq!(encode_changes(&mut out, &changes, &mut Covers::new(64)), 4);
        assert_eq!(
            &out[..],
            &b"*2\r\n$11\r\nUNSUBSCRIBE\r\n$1\r\nd\r\n*2\r\n$9\r\nSUBSCRIBE\r\n$1\r\nc\r\n*3\r\n$10\r\nPSUBSCRIBE\r\n$2\r\na*\r\n$2\r\nb*\r\n"[..]
        );
    }
}
