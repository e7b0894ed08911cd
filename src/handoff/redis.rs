//! The Redis handoff store: one connection per node, owned by one task.
//!
//! Calls go to the task through a bounded channel ([`REQUEST_CAPACITY`]); the
//! task pipelines them (written as they come, several waiting ones in one
//! write, at most [`MAX_IN_FLIGHT`] unanswered) and answers each in order as
//! Redis replies. Nothing waits without bound: every call gives up after
//! [`HandoffOptions::timeout`] with [`HandoffError::Unavailable`], and a
//! reply that does not come within it makes the task drop the connection.
//! While it is not connected (Redis down, between reconnects) the task
//! answers every call `Unavailable` at once; it reconnects with the
//! project's jittered backoff ([`crate::backoff`]) for as long as it takes.
//! The connection is named `wsgate:<node_id>:handoff`, and is opened the way
//! the broker opens its own (`src/broker/redis/conn.rs`: same URL forms,
//! `AUTH`, `SELECT`, `CLIENT SETNAME`). The task ends on
//! [`Handoff::close`](super::Handoff::close) or when every handle is dropped.
//!
//! A caller that gave up (timed out) before its command was written is
//! skipped, so a late `GETDEL` does not eat a record nobody will receive.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

use super::{key, HandoffError, HANDOFF_TIMEOUT, MAX_RECORD_BYTES};
use crate::backoff::backoff;
use crate::broker::redis::conn::{Handshake, Target};
use crate::broker::redis::resp::{self, Value};
use crate::broker::redis::RedisConfigError;

/// Calls waiting for the task; further callers wait for room (within their
/// timeout).
pub const REQUEST_CAPACITY: usize = 1024;
/// Most commands written and not yet answered; beyond, calls wait in the
/// channel.
pub const MAX_IN_FLIGHT: usize = 256;
/// Waiting calls are gathered into one write up to about this many bytes.
const MAX_WRITE_BYTES: usize = 256 * 1024;
/// Bytes read per read call.
const READ_CHUNK: usize = 16 * 1024;
/// An unfinished reply larger than this is not a record wsgate wrote: the
/// connection is dropped rather than buffer it.
const MAX_REPLY_BYTES: usize = MAX_RECORD_BYTES + 1024;
/// First reconnect delay; doubles per failure up to the backoff cap.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// A connection that lived less than this counts as a failure for the
/// backoff (one that Redis drops right after the handshake must not be
/// retried at the minimum pace forever).
const STABLE_AFTER: Duration = Duration::from_secs(2);

/// How the Redis store connects and how long calls may take.
#[derive(Debug, Clone)]
pub struct HandoffOptions {
    /// `WSGATE_NODE_ID`: the connection is named `wsgate:<node_id>:handoff`.
    pub node_id: String,
    /// Bound on every call, on a connect with its handshake, on a write and
    /// on a reply ([`HANDOFF_TIMEOUT`] by default): a handshake must not
    /// hang on a frozen Redis.
    pub timeout: Duration,
    /// Reconnect backoff cap (`WSGATE_REDIS_BACKOFF_MAX_MS`, as the broker).
    pub backoff_max: Duration,
}

impl HandoffOptions {
    /// Defaults for node `node_id`: [`HANDOFF_TIMEOUT`], a 1 s backoff cap
    /// (the `WSGATE_REDIS_BACKOFF_MAX_MS` default).
    pub fn new(node_id: &str) -> HandoffOptions {
        HandoffOptions {
            node_id: node_id.to_owned(),
            timeout: HANDOFF_TIMEOUT,
            backoff_max: Duration::from_secs(1),
        }
    }
}

/// Handle to the handoff connection task; clones share it.
#[derive(Clone)]
pub struct RedisHandoff {
    requests: mpsc::Sender<Request>,
    closing: Arc<watch::Sender<bool>>,
    timeout: Duration,
}

/// One command for the task and where to answer.
struct Request {
    /// The complete RESP command.
    command: Bytes,
    done: oneshot::Sender<Result<Value, HandoffError>>,
}

impl RedisHandoff {
    /// Parses `url` (the broker's URL forms) and starts the task, which
    /// connects at once in the background.
    pub fn start(url: &str, options: HandoffOptions) -> Result<RedisHandoff, RedisConfigError> {
        let (target, _) = Target::parse(url)?;
        let (tx, rx) = mpsc::channel(REQUEST_CAPACITY);
        let (closing, closed) = watch::channel(false);
        let span = tracing::info_span!("redis_handoff", addr = %target.addr());
        let task = Task {
            name: format!("wsgate:{}:handoff", options.node_id),
            target,
            timeout: options.timeout,
            backoff_max: options.backoff_max,
            requests: rx,
            closing: closed,
        };
        tokio::spawn(task.run().instrument(span));
        Ok(RedisHandoff {
            requests: tx,
            closing: Arc::new(closing),
            timeout: options.timeout,
        })
    }

    /// `SET <key> <record> PX <ttl> NX`.
    pub(super) async fn offer(
        &self,
        client_id: &str,
        record: Bytes,
        ttl: Duration,
    ) -> Result<(), HandoffError> {
        let ttl_ms = ttl.as_millis().max(1).to_string();
        let mut command = BytesMut::new();
        let key = key(client_id);
        resp::encode_command(
            &mut command,
            [
                &b"SET"[..],
                key.as_bytes(),
                &record,
                b"PX",
                ttl_ms.as_bytes(),
                b"NX",
            ]
            .into_iter(),
        );
        match self.call(command.freeze()).await? {
            Value::Simple(ok) if ok.eq_ignore_ascii_case(b"OK") => Ok(()),
            Value::Null => Err(HandoffError::Exists),
            other => Err(refused(other)),
        }
    }

    /// `GETDEL <key>`.
    pub(super) async fn take(&self, client_id: &str) -> Result<Option<Bytes>, HandoffError> {
        let mut command = BytesMut::new();
        let key = key(client_id);
        resp::encode_command(&mut command, [&b"GETDEL"[..], key.as_bytes()].into_iter());
        match self.call(command.freeze()).await? {
            Value::Bulk(record) => Ok(Some(record)),
            Value::Null => Ok(None),
            other => Err(refused(other)),
        }
    }

    /// Stops the task: in-flight and later calls answer `Unavailable`.
    pub(super) fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Sends `command` to the task and waits for its reply, all within the
    /// timeout.
    async fn call(&self, command: Bytes) -> Result<Value, HandoffError> {
        let (done, answer) = oneshot::channel();
        let attempt = async {
            self.requests
                .send(Request { command, done })
                .await
                .map_err(|_| HandoffError::Unavailable)?;
            answer.await.map_err(|_| HandoffError::Unavailable)?
        };
        tokio::time::timeout(self.timeout, attempt)
            .await
            .unwrap_or(Err(HandoffError::Unavailable))
    }
}

/// What an unexpected reply means to the caller.
fn refused(reply: Value) -> HandoffError {
    match reply {
        Value::Error(e) => HandoffError::Refused(String::from_utf8_lossy(&e).into_owned()),
        other => HandoffError::Refused(format!("unexpected reply {other:?}")),
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
    done: oneshot::Sender<Result<Value, HandoffError>>,
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
                Ok(Ok(stream)) => {
                    if failures > 0 {
                        info!(after = failures, "handoff connection restored");
                    }
                    let since = Instant::now();
                    match self.serve(stream).await {
                        End::Shutdown => return,
                        End::Lost(cause) => warn!(%cause, "handoff connection lost"),
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
            warn!(%cause, failures, "cannot connect to redis for the handoff store");
        }
        failures
    }

    /// Serves one connected period.
    async fn serve(&mut self, stream: TcpStream) -> End {
        let (mut rd, mut wr) = stream.into_split();
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
                read = read_some(&mut rd, &mut buf) => {
                    if let Err(cause) = read.and_then(|()| drain(&mut buf, &mut inflight)) {
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
            let _ = f.done.send(Err(HandoffError::Unavailable));
        }
        end
    }

    /// Writes `first` and whatever else is waiting (within the limits),
    /// skipping calls whose caller already gave up. On a failed write every
    /// gathered call is answered `Unavailable`.
    async fn write(
        &mut self,
        first: Request,
        wr: &mut OwnedWriteHalf,
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
        let written = tokio::time::timeout(self.timeout, wr.write_all(out)).await;
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
                let _ = done.send(Err(HandoffError::Unavailable));
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
async fn connect(target: &Target, name: &str) -> Result<TcpStream, String> {
    let handshake = Handshake::new(target, name, true);
    let (stream, replies) = handshake.run(target).await?;
    for (step, reply) in replies {
        match (step, reply) {
            ("CLIENT SETNAME", Value::Error(e)) => warn!(
                error = %String::from_utf8_lossy(&e),
                "CLIENT SETNAME refused: the handoff connection is unnamed"
            ),
            (step, Value::Error(e)) => {
                return Err(format!("{step} refused: {}", String::from_utf8_lossy(&e)))
            }
            _ => {}
        }
    }
    Ok(stream)
}

/// Hands every complete reply in `buf` to the call it answers, in order.
fn drain(buf: &mut BytesMut, inflight: &mut VecDeque<InFlight>) -> Result<(), String> {
    while let Some(value) = resp::parse(buf).map_err(|e| e.to_string())? {
        let Some(front) = inflight.pop_front() else {
            return Err(format!("reply without a request: {value:?}"));
        };
        let _ = front.done.send(Ok(value));
    }
    if buf.len() > MAX_REPLY_BYTES {
        return Err(format!("reply larger than {MAX_REPLY_BYTES} bytes"));
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
                    let _ = req.done.send(Err(HandoffError::Unavailable));
                }
                None => return None,
            },
        }
    }
}

/// Resolves once the store was closed or every handle is gone.
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
async fn read_some(rd: &mut OwnedReadHalf, buf: &mut BytesMut) -> Result<(), String> {
    buf.reserve(READ_CHUNK);
    match rd.read_buf(buf).await {
        Ok(0) => Err("connection closed by redis".to_owned()),
        Ok(_) => Ok(()),
        Err(e) => {
            debug!(cause = %e, "handoff read failed");
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
        drain(&mut buf, &mut inflight).unwrap();
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
        assert!(drain(&mut buf, &mut inflight).is_err());
        let mut garbage = BytesMut::from(&b"?\r\n"[..]);
        assert!(drain(&mut garbage, &mut VecDeque::new()).is_err());
    }

    #[test]
    fn an_unfinished_huge_reply_drops_the_connection() {
        let mut buf = BytesMut::from(format!("${}\r\n", MAX_REPLY_BYTES * 2).as_bytes());
        buf.extend_from_slice(&vec![b'x'; MAX_REPLY_BYTES + 1]);
        assert!(drain(&mut buf, &mut VecDeque::new()).is_err());
    }

    #[test]
    fn unexpected_replies_are_refusals() {
        assert_eq!(
            refused(Value::Error(Bytes::from_static(
                b"ERR unknown command 'GETDEL'"
            ))),
            HandoffError::Refused("ERR unknown command 'GETDEL'".into())
        );
        assert!(matches!(
            refused(Value::Integer(1)),
            HandoffError::Refused(_)
        ));
    }

    #[tokio::test]
    async fn nothing_listening_is_unavailable_within_the_timeout() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let options = HandoffOptions {
            timeout: Duration::from_millis(200),
            ..HandoffOptions::new("t")
        };
        let h = RedisHandoff::start(&format!("redis://127.0.0.1:{port}"), options).unwrap();
        let started = std::time::Instant::now();
        assert_eq!(h.take("c").await, Err(HandoffError::Unavailable));
        assert!(started.elapsed() < Duration::from_millis(500));
        h.close();
        assert_eq!(h.take("c").await, Err(HandoffError::Unavailable));
    }
}
