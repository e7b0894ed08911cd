//! The publish connection: one connection (TCP or TLS) per node for `PUBLISH`
//! (and the idempotent-publish script), owned by one task.
//!
//! Why not redis-rs's `ConnectionManager`: after a failure it cannot say
//! whether a command reached Redis (a reset before the write and a reset
//! after it surface as the same I/O error), and it returns nothing of a
//! pipeline that failed part-way. This task knows, for every message:
//!
//! - written and answered: the reply (a receiver count, or Redis's refusal);
//! - written, then the connection failed or the reply was late: it *may*
//!   have been published, and is never sent again by the gateway;
//! - never written completely (no connection, the connect failed, or the
//!   socket was already dead so the write did not take the whole command):
//!   surely not published (Redis runs only complete commands, and the
//!   connection is dropped), so it may be retried.
//!
//! The task reads while idle, so a connection Redis closed (restart, `CLIENT
//! KILL`, `timeout`) is noticed and replaced before the next publish, not by
//! failing it. Jobs (one HTTP request's messages each) from concurrent
//! requests are pipelined: written as they come, several waiting jobs in one
//! write, and answered in order as Redis replies. A batch costs one round
//! trip.
//!
//! Idempotent publishes run [`SCRIPT`] (`SET NX` + `PUBLISH` in one atomic
//! script), loaded with `SCRIPT LOAD` on every new connection and called with
//! `EVALSHA` (`EVAL` if the load failed or Redis lost the script). Publishes
//! to history channels (`WSGATE_HISTORY`) are `FCALL wsgate_publish` instead,
//! idempotency included ([`history`]); the library is loaded with `FUNCTION
//! LOAD REPLACE` in the same handshake. Other channels' commands are unchanged.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

use super::conn::{Connected, Handshake, Target};
use super::history;
use super::resp::{self, Value};
use super::sentinel::Moved;
use super::stream::{ReadHalf, Stream, WriteHalf};
use crate::broker::{Publication, PublishError};
use crate::history::Rules;

/// Jobs waiting for the task; further HTTP requests wait for room.
const JOB_CAPACITY: usize = 1024;
/// Most jobs written and not yet answered; beyond, new jobs wait in the channel.
const MAX_IN_FLIGHT: usize = 1024;
/// Waiting jobs are gathered into one write up to about this many bytes.
const MAX_WRITE_BYTES: usize = 256 * 1024;
/// Bytes read per read call (replies are small).
const READ_CHUNK: usize = 16 * 1024;

/// Every idempotency key in Redis starts with this, then
/// `<channel length>:<channel>:<client's key>`, so keys are per channel and
/// unambiguous whatever bytes the channel holds.
pub(super) const IDEMPOTENCY_PREFIX: &str = "wsgate:idempotency:";

/// `KEYS[1]`: the idempotency key; `ARGV`: channel, payload, TTL in ms.
/// Publishes unless the key exists, and remembers the receiver count under
/// the key for the TTL; a repeat returns the remembered count. The key is
/// claimed before the publish, so a write refused for lack of memory (OOM)
/// fails before anything is published; a refused `PUBLISH` (ACL) releases it.
pub(super) const SCRIPT: &str = "\
if not redis.call('SET', KEYS[1], '', 'NX', 'PX', ARGV[3]) then
  return tonumber(redis.call('GET', KEYS[1]))
end
local n = redis.pcall('PUBLISH', ARGV[1], ARGV[2])
if type(n) == 'table' and n.err then
  redis.call('DEL', KEYS[1])
  return n
end
redis.call('SET', KEYS[1], n, 'PX', ARGV[3])
return n
";

/// The same script for a Redis Cluster node, publishing with `publish`
/// (a Lua expression of `ARGV[1]` and `ARGV[2]`: `PUBLISH`, `SPUBLISH`, or
/// their sum): the key carries the channel's slot tag, so the script runs on
/// the channel's owner, where `SPUBLISH` is allowed.
fn cluster_script(publish: &str) -> String {
    SCRIPT.replace("redis.pcall('PUBLISH', ARGV[1], ARGV[2])", publish)
}

/// `SPUBLISH` then `PUBLISH` of one message, their receivers summed (a
/// cluster in sharded mode with patterns on); `KEYS[1]` only routes it to
/// the channel's owner.
const BOTH: &str = "\
local s = redis.pcall('SPUBLISH', ARGV[1], ARGV[2])
if type(s) == 'table' and s.err then return s end
local p = redis.pcall('PUBLISH', ARGV[1], ARGV[2])
if type(p) == 'table' and p.err then return p end
return s + p
";

/// Which commands publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// One Redis (or a shard): `PUBLISH`.
    Plain,
    /// A Redis Cluster node owning the channels sent to it: `PUBLISH`
    /// (classic) or `SPUBLISH` (sharded), or both (sharded with
    /// patterns); idempotency keys carry the channel's slot tag.
    Cluster {
        /// `SPUBLISH` rather than `PUBLISH`.
        sharded: bool,
        /// `SPUBLISH` and `PUBLISH` (with `sharded`).
        both: bool,
    },
}

impl Mode {
    /// The idempotent script this mode loads.
    fn script(self) -> std::borrow::Cow<'static, str> {
        match self {
            Mode::Plain | Mode::Cluster { sharded: false, .. } => SCRIPT.into(),
            Mode::Cluster { both: true, .. } => {
                cluster_script(&format!("(function()\n{BOTH}end)()")).into()
            }
            Mode::Cluster { .. } => {
                cluster_script("redis.pcall('SPUBLISH', ARGV[1], ARGV[2])").into()
            }
        }
    }
}

/// Where and how to connect.
pub(super) struct Settings {
    /// Redis, from the URL; `SELECT`s its database (idempotency keys live in it).
    pub(super) target: Target,
    /// `CLIENT SETNAME` value, `wsgate:<node>:publish`.
    pub(super) client_name: String,
    /// Bound on a connect with its handshake, on a write, and on a reply.
    pub(super) timeout: Duration,
    /// How long idempotency keys live.
    pub(super) idempotency_ttl: Duration,
    /// `WSGATE_HISTORY`: publishes to these channels go through the
    /// Function library ([`history`]), loaded on every new connection.
    pub(super) history: Rules,
    /// Which commands publish.
    pub(super) mode: Mode,
}

/// Why one message was not confirmed (inside this module; callers see
/// [`PublishError`]).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    /// Never completely written: surely not published. `retry`: trying again
    /// at once may work (the connection was found dead, Redis lost the
    /// script), unlike after a connect that just timed out.
    NotSent { retry: bool },
    /// Written, then the connection failed.
    Lost,
    /// Written, no reply within the timeout.
    TimedOut,
    /// Redis answered with an error.
    Refused(String),
}

impl Failure {
    fn into_error(self) -> PublishError {
        match self {
            Failure::NotSent { .. } => PublishError::Unavailable,
            Failure::Lost => PublishError::Lost,
            Failure::TimedOut => PublishError::TimedOut,
            Failure::Refused(reason) => PublishError::Refused(reason),
        }
    }
}

type Results = Vec<Result<u64, Failure>>;

/// One request's messages and where to answer.
struct Job {
    messages: Vec<Publication>,
    done: oneshot::Sender<Results>,
}

impl Job {
    fn fail(self, failure: Failure) {
        let results = vec![Err(failure); self.messages.len()];
        let _ = self.done.send(results);
    }
}

/// Handle to the publish task; the task ends when every handle is gone.
#[derive(Clone)]
pub(super) struct Publisher {
    jobs: mpsc::Sender<Job>,
}

impl Publisher {
    /// Starts the task; it connects when the first publish comes.
    pub(super) fn start(settings: Settings) -> Publisher {
        let (tx, rx) = mpsc::channel(JOB_CAPACITY);
        let span = tracing::info_span!("redis_publish", addr = %settings.target.addr());
        let task = Task {
            ttl_arg: Bytes::from(settings.idempotency_ttl.as_millis().max(1).to_string()),
            script: settings.mode.script(),
            settings,
            jobs: rx,
            sha: None,
            failures: 0,
        };
        tokio::spawn(task.run().instrument(span));
        Publisher { jobs: tx }
    }

    /// Publishes `messages` in order; one result per message. What surely did
    /// not reach Redis is tried once more on a fresh connection, but only a
    /// tail of the batch (everything from the first failure on), so the
    /// order of what is published never changes.
    pub(super) async fn publish(
        &self,
        messages: Vec<Publication>,
    ) -> Vec<Result<u64, PublishError>> {
        let mut results = self.attempt(messages.clone()).await;
        let first_failure = results.iter().position(Result::is_err);
        if let Some(from) = first_failure {
            let all_retryable = results[from..]
                .iter()
                .all(|r| matches!(r, Err(Failure::NotSent { retry: true })));
            if all_retryable {
                results.truncate(from);
                results.extend(self.attempt(messages[from..].to_vec()).await);
            }
        }
        results
            .into_iter()
            .map(|r| r.map_err(Failure::into_error))
            .collect()
    }

    async fn attempt(&self, messages: Vec<Publication>) -> Results {
        let n = messages.len();
        let (done, answer) = oneshot::channel();
        if self.jobs.send(Job { messages, done }).await.is_err() {
            return vec![Err(Failure::NotSent { retry: false }); n];
        }
        // The task dropped the job without answering: only if it panicked,
        // perhaps after writing. Assume the worst.
        answer.await.unwrap_or_else(|_| vec![Err(Failure::Lost); n])
    }
}

/// A job written to Redis whose replies have not all arrived.
struct InFlight {
    done: oneshot::Sender<Results>,
    expected: usize,
    results: Results,
    /// The reply must have come by then, or the connection counts as dead.
    deadline: Instant,
}

impl InFlight {
    fn fail(mut self, failure: Failure) {
        while self.results.len() < self.expected {
            self.results.push(Err(failure.clone()));
        }
        let _ = self.done.send(self.results);
    }
}

/// How a connected period ended.
enum End {
    /// The connection failed; connect again for the next job.
    Lost,
    /// Every handle is gone.
    Shutdown,
}

/// The task that owns the connection.
struct Task {
    settings: Settings,
    jobs: mpsc::Receiver<Job>,
    /// The idempotent publish script of this mode ([`Mode::script`]), made
    /// once: sent with `SCRIPT LOAD` on connect, and with `EVAL` when Redis
    /// gave no SHA1.
    script: std::borrow::Cow<'static, str>,
    /// SHA1 of that script as Redis reported it on this connection.
    sha: Option<Bytes>,
    /// The idempotency TTL in ms, as the script argument.
    ttl_arg: Bytes,
    /// Consecutive failed connects, for logging.
    failures: u32,
}

impl Task {
    async fn run(mut self) {
        // Connect at once, so the connection is ready (and named in `CLIENT
        // LIST`) before the first publish; after a loss, on demand.
        if let Ok(conn) = self.connect_logged().await {
            if let End::Shutdown = self.serve(conn, None).await {
                return;
            }
        }
        while let Some(job) = self.jobs.recv().await {
            let conn = match self.connect_logged().await {
                Ok(conn) => conn,
                Err(retry) => {
                    job.fail(Failure::NotSent { retry });
                    // Whatever queued meanwhile would only wait for the next
                    // attempt one by one: answer it now.
                    while let Ok(job) = self.jobs.try_recv() {
                        job.fail(Failure::NotSent { retry: false });
                    }
                    continue;
                }
            };
            if let End::Shutdown = self.serve(conn, Some(job)).await {
                return;
            }
        }
    }

    /// [`Task::connect`], logging the first failure of a series, every
    /// hundredth, and the recovery. `Err(retry)`.
    async fn connect_logged(&mut self) -> Result<(Stream, Moved), bool> {
        match self.connect().await {
            Ok(conn) => {
                if self.failures > 0 {
                    info!(after = self.failures, "publish connection restored");
                }
                self.failures = 0;
                Ok(conn)
            }
            Err((cause, retry)) => {
                self.failures = self.failures.saturating_add(1);
                if self.failures == 1 || self.failures % 100 == 0 {
                    warn!(%cause, failures = self.failures, "cannot connect to redis for publishing");
                }
                Err(retry)
            }
        }
    }

    /// Connects and runs the handshake (`AUTH`, `SELECT`, `CLIENT SETNAME`,
    /// `SCRIPT LOAD`) within the timeout: the replies also prove Redis
    /// alive. `Err((cause, retry))`.
    async fn connect(&mut self) -> Result<(Stream, Moved), (String, bool)> {
        let s = &self.settings;
        let mut handshake = Handshake::new(&s.target, &s.client_name, true);
        handshake.push("SCRIPT LOAD", &[b"SCRIPT", b"LOAD", self.script.as_bytes()]);
        let library = (!s.history.is_empty()).then(|| history::library(&s.history));
        if let Some(library) = &library {
            handshake.push(
                "FUNCTION LOAD",
                &[b"FUNCTION", b"LOAD", b"REPLACE", library.as_bytes()],
            );
        }
        let attempt = handshake.run(&s.target);
        let Connected {
            stream,
            replies,
            moved,
        } = match tokio::time::timeout(s.timeout, attempt).await {
            Err(_) => return Err(("connect or handshake timed out".to_owned(), false)),
            Ok(Err(cause)) => return Err((cause, true)),
            Ok(Ok(done)) => done,
        };
        self.sha = None;
        for (step, reply) in replies {
            match (step, reply) {
                ("SCRIPT LOAD", Value::Bulk(sha)) => self.sha = Some(sha),
                ("SCRIPT LOAD", other) => {
                    debug!(reply = ?other, "SCRIPT LOAD failed: idempotent publishes use EVAL")
                }
                ("FUNCTION LOAD", Value::Error(e)) => warn!(
                    error = %String::from_utf8_lossy(&e),
                    "FUNCTION LOAD refused (Redis 7 or later is needed): publishes to history channels will fail"
                ),
                ("CLIENT SETNAME", Value::Error(e)) => warn!(
                    error = %String::from_utf8_lossy(&e),
                    "CLIENT SETNAME refused: the publish connection is unnamed"
                ),
                (step, Value::Error(e)) => {
                    return Err((
                        format!("{step} refused: {}", String::from_utf8_lossy(&e)),
                        true,
                    ))
                }
                _ => {}
            }
        }
        Ok((stream, moved))
    }

    /// Serves one connected period, starting with `first`.
    async fn serve(&mut self, (stream, mut moved): (Stream, Moved), first: Option<Job>) -> End {
        let (mut rd, mut wr) = stream.split();
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let mut out = BytesMut::new();
        let mut inflight: VecDeque<InFlight> = VecDeque::new();
        let mut next = first;
        let end = loop {
            if let Some(job) = next.take() {
                if let Err(end) = self.write(job, &mut wr, &mut out, &mut inflight).await {
                    break end;
                }
                continue;
            }
            let deadline = inflight.front().map(|f| f.deadline);
            tokio::select! {
                // Reading first: a connection Redis already closed is seen
                // before a job is written to it.
                biased;
                read = read_some(&mut rd, &mut buf) => {
                    if let Err(cause) = read {
                        if !inflight.is_empty() {
                            warn!(%cause, "publish connection lost with publishes in flight");
                        } else {
                            debug!(%cause, "idle publish connection closed");
                        }
                        break (End::Lost, Failure::Lost);
                    }
                    if let Err(cause) = self.drain(&mut buf, &mut inflight) {
                        warn!(%cause, "publish connection dropped");
                        break (End::Lost, Failure::Lost);
                    }
                }
                () = moved.wait() => {
                    info!("sentinel announced a new master: publish connection dropped");
                    break (End::Lost, Failure::Lost);
                }
                () = sleep_until(deadline), if deadline.is_some() => {
                    warn!(timeout = ?self.settings.timeout, "no publish reply in time: connection dropped");
                    break (End::Lost, Failure::TimedOut);
                }
                job = self.jobs.recv(), if inflight.len() < MAX_IN_FLIGHT => match job {
                    Some(job) => next = Some(job),
                    None => break (End::Shutdown, Failure::Lost),
                },
            }
        };
        let (end, failure) = end;
        for job in inflight {
            job.fail(failure.clone());
        }
        end
    }

    /// Writes `job` and whatever else is waiting (within the limits); on a
    /// failed write, answers what was written as maybe published and the
    /// rest as not sent.
    async fn write(
        &mut self,
        job: Job,
        wr: &mut WriteHalf,
        out: &mut BytesMut,
        inflight: &mut VecDeque<InFlight>,
    ) -> Result<(), (End, Failure)> {
        out.clear();
        // Per job, the offset in `out` where each of its messages ends.
        let mut batch: Vec<(Job, Vec<usize>)> = Vec::new();
        let mut job = Some(job);
        while let Some(j) = job.take() {
            let ends = j
                .messages
                .iter()
                .map(|m| {
                    self.encode(out, m);
                    out.len()
                })
                .collect();
            batch.push((j, ends));
            if out.len() < MAX_WRITE_BYTES && inflight.len() + batch.len() < MAX_IN_FLIGHT {
                job = self.jobs.try_recv().ok();
            }
        }
        let timeout = self.settings.timeout;
        match write_tracked(wr, out, timeout).await {
            Ok(()) => {
                let deadline = Instant::now() + timeout;
                for (job, _) in batch {
                    let expected = job.messages.len();
                    if expected == 0 {
                        let _ = job.done.send(Vec::new());
                        continue;
                    }
                    inflight.push_back(InFlight {
                        done: job.done,
                        expected,
                        results: Vec::with_capacity(expected),
                        deadline,
                    });
                }
                Ok(())
            }
            Err((written, cause, timed_out)) => {
                warn!(%cause, written, of = out.len(), "publish write failed: connection dropped");
                let sent = if timed_out {
                    Failure::TimedOut
                } else {
                    Failure::Lost
                };
                for (job, ends) in batch {
                    let results = ends
                        .iter()
                        .map(|&end| {
                            Err(if end <= written {
                                sent.clone()
                            } else {
                                Failure::NotSent { retry: !timed_out }
                            })
                        })
                        .collect();
                    let _ = job.done.send(results);
                }
                Err((End::Lost, Failure::Lost))
            }
        }
    }

    /// Appends the command for `m`: `PUBLISH`, or the idempotent script,
    /// or, on a history channel, `FCALL wsgate_publish`.
    fn encode(&self, out: &mut BytesMut, m: &Publication) {
        let rules = &self.settings.history;
        if let Some(rule) = (!rules.is_empty()).then(|| rules.of(&m.channel)).flatten() {
            let size = rule.size.to_string();
            let ttl = rule.ttl.as_millis().to_string();
            let key = m
                .idempotency_key
                .as_ref()
                .map(|key| idempotency_key(&m.channel, key));
            let once = key.as_deref().map(|k| (k, &self.ttl_arg[..]));
            history::encode_publish(
                out,
                &m.channel,
                &m.payload,
                size.as_bytes(),
                ttl.as_bytes(),
                once,
            );
            return;
        }
        let mode = self.settings.mode;
        let Some(key) = &m.idempotency_key else {
            match mode {
                Mode::Plain | Mode::Cluster { sharded: false, .. } => {
                    resp::encode_command(out, [&b"PUBLISH"[..], &m.channel, &m.payload].into_iter())
                }
                Mode::Cluster { both: false, .. } => resp::encode_command(
                    out,
                    [&b"SPUBLISH"[..], &m.channel, &m.payload].into_iter(),
                ),
                Mode::Cluster { .. } => {
                    let route = format!(
                        "wsgate:publish:{{{}}}",
                        super::slot::tag_for(super::slot::slot_of(&m.channel))
                    );
                    resp::encode_command(
                        out,
                        [
                            &b"EVAL"[..],
                            BOTH.as_bytes(),
                            b"1",
                            route.as_bytes(),
                            &m.channel,
                            &m.payload,
                        ]
                        .into_iter(),
                    )
                }
            }
            return;
        };
        let redis_key = match mode {
            Mode::Plain => idempotency_key(&m.channel, key),
            Mode::Cluster { .. } => cluster_idempotency_key(&m.channel, key),
        };
        let (command, script): (&[u8], &[u8]) = match &self.sha {
            Some(sha) => (b"EVALSHA", sha),
            None => (b"EVAL", self.script.as_bytes()),
        };
        resp::encode_command(
            out,
            [
                command,
                script,
                b"1",
                &redis_key,
                &m.channel,
                &m.payload,
                &self.ttl_arg,
            ]
            .into_iter(),
        );
    }

    /// Hands every complete reply in `buf` to the job it answers.
    fn drain(
        &mut self,
        buf: &mut BytesMut,
        inflight: &mut VecDeque<InFlight>,
    ) -> Result<(), String> {
        let mut readonly = false;
        while let Some(value) = resp::parse(buf).map_err(|e| e.to_string())? {
            let Some(front) = inflight.front_mut() else {
                return Err(format!("reply without a request: {value:?}"));
            };
            readonly |= matches!(&value, Value::Error(e) if e.starts_with(b"READONLY"));
            front.results.push(self.result(value));
            if front.results.len() == front.expected {
                if let Some(done) = inflight.pop_front() {
                    let _ = done.done.send(done.results);
                }
            }
        }
        if readonly {
            // A failover demoted this server: connect again (behind
            // Sentinel, to the new master).
            return Err("READONLY: the server is a replica now".to_owned());
        }
        Ok(())
    }

    /// What one reply says about its message.
    fn result(&mut self, value: Value) -> Result<u64, Failure> {
        match value {
            Value::Integer(n) => Ok(u64::try_from(n).unwrap_or(0)),
            // A replica refused the write: nothing ran; the connection is
            // replaced (see `drain`) and the caller retries there.
            Value::Error(e) if e.starts_with(b"READONLY") => Err(Failure::NotSent { retry: true }),
            Value::Error(e) if e.starts_with(b"NOSCRIPT") => {
                // Redis lost the script (SCRIPT FLUSH): nothing ran. EVAL
                // from now on; the caller retries.
                self.sha = None;
                Err(Failure::NotSent { retry: true })
            }
            Value::Error(e) => Err(Failure::Refused(String::from_utf8_lossy(&e).into_owned())),
            // Only the script answers nil: the key holds a value it did not write.
            Value::Null => Err(Failure::Refused(format!(
                "{IDEMPOTENCY_PREFIX}* key holds a value wsgate did not write"
            ))),
            other => Err(Failure::Refused(format!("unexpected reply {other:?}"))),
        }
    }
}

/// The Redis key of idempotency key `key` on `channel`.
fn idempotency_key(channel: &[u8], key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(IDEMPOTENCY_PREFIX.len() + 8 + channel.len() + key.len());
    k.extend_from_slice(IDEMPOTENCY_PREFIX.as_bytes());
    k.extend_from_slice(channel.len().to_string().as_bytes());
    k.push(b':');
    k.extend_from_slice(channel);
    k.push(b':');
    k.extend_from_slice(key);
    k
}

/// [`idempotency_key`] in a Redis Cluster: after the prefix, the hashtag of
/// the channel's slot ([`super::slot::tag_for`]), so the key lives where
/// the channel is published.
fn cluster_idempotency_key(channel: &[u8], key: &[u8]) -> Vec<u8> {
    let tag = super::slot::tag_for(super::slot::slot_of(channel));
    let plain = idempotency_key(channel, key);
    let (prefix, rest) = plain.split_at(IDEMPOTENCY_PREFIX.len());
    let mut k = Vec::with_capacity(plain.len() + tag.len() + 3);
    k.extend_from_slice(prefix);
    k.push(b'{');
    k.extend_from_slice(tag.as_bytes());
    k.extend_from_slice(b"}:");
    k.extend_from_slice(rest);
    k
}

/// Waits until `deadline` (forever without one; the branch is disabled then).
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Writes all of `bytes` within `limit`, or says how many bytes the kernel
/// took before the failure (`(written, cause, timed_out)`): a command not
/// wholly written never runs.
async fn write_tracked(
    wr: &mut WriteHalf,
    bytes: &[u8],
    limit: Duration,
) -> Result<(), (usize, String, bool)> {
    let deadline = Instant::now() + limit;
    let mut written = 0;
    while written < bytes.len() {
        match tokio::time::timeout_at(deadline, wr.write(&bytes[written..])).await {
            Ok(Ok(0)) => return Err((written, "write returned 0".to_owned(), false)),
            Ok(Ok(n)) => written += n,
            Ok(Err(e)) => return Err((written, e.to_string(), false)),
            Err(_) => {
                return Err((
                    written,
                    format!("write to redis took longer than {limit:?}"),
                    true,
                ))
            }
        }
    }
    // TLS may hold the last record until flushed (a no-op on TCP).
    match tokio::time::timeout_at(deadline, wr.flush()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err((written, e.to_string(), false)),
        Err(_) => Err((
            written,
            format!("write to redis took longer than {limit:?}"),
            true,
        )),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_are_per_channel_and_unambiguous() {
        assert_eq!(idempotency_key(b"a:b", b"c"), b"wsgate:idempotency:3:a:b:c");
        assert_ne!(idempotency_key(b"a", b"b:c"), idempotency_key(b"a:b", b"c"));
    }

    /// In a cluster the key hashes to the channel's slot, whatever the
    /// channel's name holds.
    #[test]
    fn cluster_idempotency_keys_live_in_the_channel_slot() {
        use super::super::slot::slot_of;
        for channel in [&b"news"[..], b"a}b", b"{}", b"x{tag}y", b""] {
            let k = cluster_idempotency_key(channel, b"k1");
            assert_eq!(slot_of(&k), slot_of(channel), "{channel:?}");
            assert!(k.starts_with(IDEMPOTENCY_PREFIX.as_bytes()));
        }
        assert!(Mode::Cluster {
            sharded: true,
            both: false
        }
        .script()
        .contains("SPUBLISH"));
    }

    #[test]
    fn failures_map_to_what_the_caller_is_told() {
        assert_eq!(
            Failure::NotSent { retry: true }.into_error(),
            PublishError::Unavailable
        );
        assert!(Failure::Lost.into_error().maybe_published());
        assert!(Failure::TimedOut.into_error().maybe_published());
        assert!(!Failure::Refused("x".into()).into_error().maybe_published());
        assert!(!Failure::NotSent { retry: false }
            .into_error()
            .maybe_published());
    }
}
