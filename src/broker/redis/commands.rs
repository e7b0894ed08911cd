//! A pipelined Redis command connection: one per node and use (the Bayeux
//! handoff store, the service directory), owned by one task.
//!
//! Calls go to the task through a bounded channel ([`REQUEST_CAPACITY`]); the
//! task pipelines them (written as they come, several waiting ones in one
//! write, at most [`MAX_IN_FLIGHT`] unanswered) and answers each in order as
//! Redis replies. Nothing waits without bound: every call gives up after
//! [`CommandOptions::timeout`] with [`CommandError::Unavailable`], and a
//! reply that does not come within it makes the task drop the connection.
//! While it is not connected (Redis down, between reconnects) the task
//! answers every call `Unavailable` at once; it reconnects with the
//! project's jittered backoff ([`crate::backoff`]) for as long as it takes.
//! The connection is named `wsgate:<node_id>:<role>`, and is opened the way
//! the broker opens its own ([`super::conn`]: same URL forms, `AUTH`,
//! `SELECT`, `CLIENT SETNAME`). The task ends on [`Commands::close`] or when
//! every handle is dropped.
//!
//! A caller that gave up (timed out) before its command was written is
//! skipped, so a late `GETDEL` does not eat a record nobody will receive.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

use super::conn::{Connected, Handshake, Security, Target};
use super::resp::Value;
use super::sentinel::Moved;
use super::stream::{ReadHalf, Stream, WriteHalf};
use super::RedisConfigError;
use crate::backoff::backoff;

/// Calls waiting for the task; further callers wait for room (within their
/// timeout).
pub(crate) const REQUEST_CAPACITY: usize = 1024;
/// Most commands written and not yet answered; beyond, calls wait in the
/// channel.
pub(crate) const MAX_IN_FLIGHT: usize = 256;
/// Waiting calls are gathered into one write up to about this many bytes.
const MAX_WRITE_BYTES: usize = 256 * 1024;
/// Bytes read per read call.
const READ_CHUNK: usize = 16 * 1024;
/// First reconnect delay; doubles per failure up to the backoff cap.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// A connection that lived less than this counts as a failure for the
/// backoff (one that Redis drops right after the handshake must not be
/// retried at the minimum pace forever).
const STABLE_AFTER: Duration = Duration::from_secs(2);

/// The command did not get a reply: Redis is down, did not answer within
/// the timeout, or the connection is closing. It may have run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CommandError {
    /// See the type docs.
    #[error("redis unavailable")]
    Unavailable,
}

/// How the connection is opened and how long calls may take.
#[derive(Debug, Clone)]
pub(crate) struct CommandOptions {
    /// `CLIENT SETNAME` value: `wsgate:<node_id>:<role>`.
    pub(crate) name: String,
    /// Bound on every call, on a connect with its handshake, on a write and
    /// on a reply: a caller must not hang on a frozen Redis.
    pub(crate) timeout: Duration,
    /// Reconnect backoff cap (`WSGATE_REDIS_BACKOFF_MAX_MS`, as the broker).
    pub(crate) backoff_max: Duration,
    /// An unfinished reply larger than this is not one this use expects:
    /// the connection is dropped rather than buffer it.
    pub(crate) max_reply_bytes: usize,
    /// The sentinels' password and the TLS files (as the broker's).
    pub(crate) security: Security,
}

/// Handle to the command connection task; clones share it.
#[derive(Clone)]
pub(crate) struct Commands {
    requests: mpsc::Sender<Request>,
    closing: Arc<watch::Sender<bool>>,
    timeout: Duration,
}

/// One command for the task and where to answer.
struct Request {
    /// The complete RESP command.
    command: Bytes,
    done: oneshot::Sender<Result<Value, CommandError>>,
}

impl Commands {
    /// Parses `url` (the broker's URL forms) and starts the task, which
    /// connects at once in the background.
    pub(crate) fn start(url: &str, options: CommandOptions) -> Result<Commands, RedisConfigError> {
        let target = Target::parse(url, &options.security)?;
        Ok(Commands::start_target(target, options))
    }

    /// Starts the task for an already parsed `target` (the broker's own
    /// connections share its [`Target`], Sentinel watch included).
    pub(crate) fn start_target(target: Target, options: CommandOptions) -> Commands {
        let (tx, rx) = mpsc::channel(REQUEST_CAPACITY);
        let (closing, closed) = watch::channel(false);
        let span =
            tracing::info_span!("redis_commands", name = %options.name, addr = %target.addr());
        let task = Task {
            name: options.name,
            target,
            timeout: options.timeout,
            backoff_max: options.backoff_max,
            max_reply_bytes: options.max_reply_bytes,
            requests: rx,
            closing: closed,
        };
        tokio::spawn(task.run().instrument(span));
        Commands {
            requests: tx,
            closing: Arc::new(closing),
            timeout: options.timeout,
        }
    }

    /// Stops the task: in-flight and later calls answer `Unavailable`.
    pub(crate) fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Sends `command` (complete RESP) to the task and waits for its reply,
    /// all within the timeout.
    pub(crate) async fn call(&self, command: Bytes) -> Result<Value, CommandError> {
        let (done, answer) = oneshot::channel();
        let attempt = async {
            self.requests
                .send(Request { command, done })
                .await
                .map_err(|_| CommandError::Unavailable)?;
            answer.await.map_err(|_| CommandError::Unavailable)?
        };
        tokio::time::timeout(self.timeout, attempt)
            .await
            .unwrap_or(Err(CommandError::Unavailable))
    }
}

/// How a connected period ended.
enum End {
    /// Closed, or every handle is gone.
    Shutdown,
    /// The connection failed; reconnect.
    Lost(String),
}

/// A command written whose reply has not arrived.
struct InFlight {
    done: oneshot::Sender<Result<Value, CommandError>>,
    /// The reply must have come by then, or the connection counts as dead.
    deadline: Instant,
}

/// The task that owns the connection.
struct Task {
    target: Target,
    /// `CLIENT SETNAME` value.
    name: String,
    timeout: Duration,
    backoff_max: Duration,
    max_reply_bytes: usize,
    requests: mpsc::Receiver<Request>,
    closing: watch::Receiver<bool>,
}

impl Task {
    async fn run(mut self) {
        let mut failures: u32 = 0;
        loop {
            let attempt = tokio::time::timeout(self.timeout, connect(&self.target, &self.name));
            let Some(connected) =
                refuse_while(&mut self.requests, &mut self.closing, attempt).await
            else {
                return;
            };
            match connected {
                Ok(Ok((stream, moved))) => {
                    if failures > 0 {
                        info!(after = failures, "redis command connection restored");
                    }
                    let since = Instant::now();
                    match self.serve(stream, moved).await {
                        End::Shutdown => return,
                        End::Lost(cause) => warn!(%cause, "redis command connection lost"),
                    }
                    if since.elapsed() >= STABLE_AFTER {
                        failures = 0;
                    } else {
                        failures = failures.saturating_add(1);
                    }
                }
                Ok(Err(cause)) => failures = self.failed(failures, &cause),
                Err(_) => failures = self.failed(failures, "connect or handshake timed out"),
            }
            let pause = tokio::time::sleep(backoff(failures, BACKOFF_MIN, self.backoff_max));
            if refuse_while(&mut self.requests, &mut self.closing, pause)
                .await
                .is_none()
            {
                return;
            }
        }
    }

    /// Counts a failed connect, logging the first of a series and every tenth.
    fn failed(&self, failures: u32, cause: &str) -> u32 {
        let failures = failures.saturating_add(1);
        if failures == 1 || failures % 10 == 0 {
            warn!(%cause, failures, "cannot connect to redis for commands");
        }
        failures
    }

    /// Serves one connected period.
    async fn serve(&mut self, stream: Stream, mut moved: Moved) -> End {
        let (mut rd, mut wr) = stream.split();
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let mut out = BytesMut::new();
        let mut inflight: VecDeque<InFlight> = VecDeque::new();
        let end = loop {
            let deadline = inflight.front().map(|f| f.deadline);
            tokio::select! {
                // Reading first: a connection Redis closed is seen before a
                // command is written to it.
                biased;
                () = closed(&mut self.closing) => break End::Shutdown,
                () = moved.wait() => break End::Lost("sentinel announced a new master".to_owned()),
                read = read_some(&mut rd, &mut buf) => {
                    if let Err(cause) = read.and_then(|()| drain(&mut buf, &mut inflight, self.max_reply_bytes)) {
                        break End::Lost(cause);
                    }
                }
                () = sleep_until(deadline), if deadline.is_some() => {
                    break End::Lost(format!("no reply within {:?}", self.timeout));
                }
                req = self.requests.recv(), if inflight.len() < MAX_IN_FLIGHT => {
                    let Some(req) = req else { break End::Shutdown };
                    if let Err(cause) = self.write(req, &mut wr, &mut out, &mut inflight).await {
                        break End::Lost(cause);
                    }
                }
            }
        };
        for f in inflight {
            let _ = f.done.send(Err(CommandError::Unavailable));
        }
        end
    }

    /// Writes `first` and whatever else is waiting (within the limits),
    /// skipping calls whose caller already gave up. On a failed write every
    /// gathered call is answered `Unavailable`.
    async fn write(
        &mut self,
        first: Request,
        wr: &mut WriteHalf,
        out: &mut BytesMut,
        inflight: &mut VecDeque<InFlight>,
    ) -> Result<(), String> {
        out.clear();
        let mut batch = Vec::new();
        let mut next = Some(first);
        while let Some(req) = next.take() {
            if !req.done.is_closed() {
                out.extend_from_slice(&req.command);
                batch.push(req.done);
            }
            if out.len() < MAX_WRITE_BYTES && inflight.len() + batch.len() < MAX_IN_FLIGHT {
                next = self.requests.try_recv().ok();
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        let written = tokio::time::timeout(self.timeout, async {
            wr.write_all(out).await?;
            wr.flush().await
        })
        .await;
        let failure = match written {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!(
                "write to redis took longer than {:?}",
                self.timeout
            )),
        };
        if let Some(cause) = failure {
            for done in batch {
                let _ = done.send(Err(CommandError::Unavailable));
            }
            return Err(cause);
        }
        let deadline = Instant::now() + self.timeout;
        inflight.extend(batch.into_iter().map(|done| InFlight { done, deadline }));
        Ok(())
    }
}

/// Connects and runs the handshake (`AUTH`, `SELECT`, `CLIENT SETNAME`);
/// the caller bounds it.
async fn connect(target: &Target, name: &str) -> Result<(Stream, Moved), String> {
    let handshake = Handshake::new(target, name, true);
    let Connected {
        stream,
        replies,
        moved,
    } = handshake.run(target).await?;
    for (step, reply) in replies {
        match (step, reply) {
            ("CLIENT SETNAME", Value::Error(e)) => warn!(
                error = %String::from_utf8_lossy(&e),
                "CLIENT SETNAME refused: the command connection is unnamed"
            ),
            (step, Value::Error(e)) => {
                return Err(format!("{step} refused: {}", String::from_utf8_lossy(&e)))
            }
            _ => {}
        }
    }
    Ok((stream, moved))
}

/// Hands every complete reply in `buf` to the call it answers, in order.
fn drain(
    buf: &mut BytesMut,
    inflight: &mut VecDeque<InFlight>,
    max_reply_bytes: usize,
) -> Result<(), String> {
    while let Some(value) = super::resp::parse(buf).map_err(|e| e.to_string())? {
        let Some(front) = inflight.pop_front() else {
            return Err(format!("reply without a request: {value:?}"));
        };
        let _ = front.done.send(Ok(value));
    }
    if buf.len() > max_reply_bytes {
        return Err(format!("reply larger than {max_reply_bytes} bytes"));
    }
    Ok(())
}

/// Runs `fut` while answering every call `Unavailable` (not connected);
/// `None` on shutdown (closed, or every handle gone).
async fn refuse_while<T>(
    requests: &mut mpsc::Receiver<Request>,
    closing: &mut watch::Receiver<bool>,
    fut: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::pin!(fut);
    loop {
        tokio::select! {
            biased;
            () = closed(closing) => return None,
            out = &mut fut => return Some(out),
            req = requests.recv() => match req {
                Some(req) => {
                    let _ = req.done.send(Err(CommandError::Unavailable));
                }
                None => return None,
            },
        }
    }
}

/// Resolves once the connection was closed or every handle is gone.
async fn closed(closing: &mut watch::Receiver<bool>) {
    let _ = closing.wait_for(|c| *c).await;
}

/// Waits until `deadline` (forever without one; the branch is disabled then).
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Reads at least one byte into `buf`; EOF is an error (Redis closed on us).
async fn read_some(rd: &mut ReadHalf, buf: &mut BytesMut) -> Result<(), String> {
    buf.reserve(READ_CHUNK);
    match rd.read_buf(buf).await {
        Ok(0) => Err("connection closed by redis".to_owned()),
        Ok(_) => Ok(()),
        Err(e) => {
            debug!(cause = %e, "redis command read failed");
            Err(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_go_to_their_calls_in_order_and_strays_are_errors() {
        let mut inflight = VecDeque::new();
        let mut answers = Vec::new();
        for _ in 0..2 {
            let (done, answer) = oneshot::channel();
            inflight.push_back(InFlight {
                done,
                deadline: Instant::now(),
            });
            answers.push(answer);
        }
        let mut buf = BytesMut::from(&b"+OK\r\n$1\r\nr\r\n$-1"[..]);
        drain(&mut buf, &mut inflight, 1024).unwrap();
        assert!(inflight.is_empty());
        let mut got = Vec::new();
        for mut a in answers {
            got.push(a.try_recv().unwrap().unwrap());
        }
        assert_eq!(
            got,
            [
                Value::Simple(Bytes::from_static(b"OK")),
                Value::Bulk(Bytes::from_static(b"r"))
            ]
        );
        // The rest of `$-1\r\n` arrives with nobody waiting.
        buf.extend_from_slice(b"\r\n");
        assert!(drain(&mut buf, &mut inflight, 1024).is_err());
        let mut garbage = BytesMut::from(&b"?\r\n"[..]);
        assert!(drain(&mut garbage, &mut VecDeque::new(), 1024).is_err());
    }

    #[test]
    fn an_unfinished_huge_reply_drops_the_connection() {
        let mut buf = BytesMut::from(&b"$4096\r\n"[..]);
        buf.extend_from_slice(&[b'x'; 2000]);
        assert!(drain(&mut buf, &mut VecDeque::new(), 1024).is_err());
    }
}
