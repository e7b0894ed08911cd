//! A client's lines to services: Bayeux's `/service/<name>`
//! ([`Request::ServiceSubscribe`](crate::protocol::Request::ServiceSubscribe)
//! and its siblings; `docs/dialects/bayeux.md`).
//!
//! - A nodefony TCP backend (`WSGATE_TCP_SERVICES`): a subscribe opens a TCP
//!   connection to it for this client alone, and is answered once it is
//!   connected (or could not be). A task of its own then reads the backend's
//!   lines into the session's inbox (awaiting the send is the backpressure)
//!   and writes the client's publishes to it, one line each. Unsubscribe, the
//!   session's end or the backend's end closes it; every await of the task
//!   also watches for that, so no task outlives its line.
//! - A registered service (`ctx.rpc`): a subscribe only says it exists; a
//!   publish is a JSON-RPC 2.0 call ([`crate::jsonrpc`]) through the router,
//!   acknowledged at once and answered later as data on the channel. The
//!   call is not a request of the long-poll that carried it (no origin is
//!   recorded), so that poll is answered at once and the response goes with
//!   a later connect, like a delivery.
//!
//! Both need call rights (`WSGATE_CALL_ALLOW`, the token's `call` claim),
//! never publish rights.

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::control::{Control, InboxSender};
use super::requests::{next_done, Session};
use super::SessionContext;
use crate::broker::Topic;
use crate::config::Config;
use crate::jsonrpc;
use crate::protocol::{Answer, Conversation, Refusal, ServiceOp};
use crate::rpc::{valid_method_name, valid_service_name, CallError, Outgoing};

/// Lines waiting to be written to one backend; a publish that finds this
/// many is refused (`429 rate limited`), so a backend that does not read
/// costs a bounded amount of memory.
pub const WRITE_QUEUE: usize = 4;
/// Longest one line may take to be written to a backend; past it the
/// backend counts as gone.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a closed line waits to send its end (FIN) to the backend.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);
/// The read buffer of a backend connection (a longer line is gathered
/// across reads, up to `WSGATE_TCP_SERVICE_LINE_BYTES`).
const READ_BUFFER: usize = 4096;

/// What every session of a node shares about the TCP backends: where they
/// are, the bounds, and the node's places (`WSGATE_TCP_SERVICES_PER_NODE`).
pub struct TcpBackends {
    backends: Vec<(String, String)>,
    connect_timeout: Duration,
    per_client: usize,
    line_bytes: usize,
    places: Arc<Semaphore>,
}

impl TcpBackends {
    /// The backends and bounds of `config`.
    pub fn new(config: &Config) -> TcpBackends {
        TcpBackends {
            backends: config.tcp_services.clone(),
            connect_timeout: config.tcp_service_connect_timeout,
            per_client: config.tcp_services_per_client.get(),
            line_bytes: config.tcp_service_line_bytes.get(),
            places: Arc::new(Semaphore::new(config.tcp_services_per_node.get())),
        }
    }

    /// The backends' names, in configuration order (nodefony's connect
    /// reply lists them).
    pub fn names(&self) -> Vec<String> {
        self.backends.iter().map(|(n, _)| n.clone()).collect()
    }

    fn address(&self, name: &str) -> Option<&str> {
        self.backends
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a.as_str())
    }
}

/// A session's lines: allocated on its first `/service/` request (an idle
/// session keeps one empty pointer).
#[derive(Default)]
pub struct Lines {
    open: HashMap<String, Line>,
    /// Numbers the TCP connections, so that what a closed one left in the
    /// inbox is told from the current one's.
    next: u64,
    /// TCP connections being opened, each with the origin of its subscribe.
    connecting: Option<FuturesUnordered<Connecting>>,
    /// JSON-RPC calls waiting for their services.
    calls: Option<FuturesUnordered<Calling>>,
}

impl Lines {
    /// JSON-RPC calls waiting (they count against
    /// `WSGATE_MAX_CALLS_IN_FLIGHT` with the connection's other calls).
    pub(super) fn calls_in_flight(&self) -> usize {
        self.calls.as_ref().map_or(0, FuturesUnordered::len)
    }
}

/// One line the client holds.
enum Line {
    /// A registered service: nothing is held but the name.
    Registered,
    /// A TCP connection being opened; its subscribe waits.
    Connecting {
        line: u64,
        /// The subscribe's id, for a cancelled answer.
        id: Option<String>,
    },
    /// An open TCP connection, served by its own task.
    Tcp(TcpLine),
}

/// The session's handle on a TCP connection's task: dropping it closes
/// the connection.
struct TcpLine {
    line: u64,
    writes: mpsc::Sender<Bytes>,
    _close: oneshot::Sender<()>,
}

impl Line {
    fn is_tcp(&self) -> bool {
        !matches!(self, Line::Registered)
    }
}

type Connecting = Pin<Box<dyn Future<Output = (u64, Connected)> + Send>>;
type Calling = Pin<Box<dyn Future<Output = Called> + Send>>;

/// A TCP connection attempt ended.
pub struct Connected {
    service: String,
    line: u64,
    outcome: Result<(TcpStream, OwnedSemaphorePermit), String>,
}

/// A JSON-RPC call ended.
pub struct Called {
    service: String,
    /// The Bayeux id of the publish that made it.
    id: Option<String>,
    /// The JSON-RPC id (JSON text); `None` for a notification.
    rpc_id: Option<String>,
    outcome: Result<Bytes, CallError>,
}

/// What [`next`] resolves with.
pub enum ServiceDone {
    /// A TCP connection was opened, or could not be.
    Connected(Connected),
    /// A JSON-RPC call ended.
    Called(Called),
}

/// The next connection attempt or call that ended, with the origin of the
/// request it answers (`0` for a call: nobody waits for it); `None` at once
/// when nothing waits.
pub(super) async fn next(lines: &mut Option<Box<Lines>>) -> Option<(u64, ServiceDone)> {
    let lines = lines.as_mut()?;
    let done = tokio::select! {
        Some((origin, c)) = next_done(&mut lines.connecting) => (origin, ServiceDone::Connected(c)),
        Some(c) = next_done(&mut lines.calls) => (0, ServiceDone::Called(c)),
        else => return None,
    };
    if lines
        .connecting
        .as_ref()
        .is_some_and(FuturesUnordered::is_empty)
    {
        lines.connecting = None;
    }
    if lines.calls.as_ref().is_some_and(FuturesUnordered::is_empty) {
        lines.calls = None;
    }
    Some(done)
}

/// `error` as a refusal of a service request, for the dialect to phrase
/// (Bayeux gives each [`CallError`] its code).
fn refusal(error: &CallError) -> Refusal {
    match error {
        CallError::NotAllowed => Refusal::NotAllowed,
        CallError::Unavailable => Refusal::Unavailable(error.message()),
        other => Refusal::Other(other.message()),
    }
}

/// The JSON-RPC error code of a call's failure: the spec's own for a method
/// that does not exist, the service's own for its errors, the gateway's
/// (docs/services.md) for the rest.
fn rpc_code(error: &CallError) -> i64 {
    match error {
        CallError::NoSuchMethod => jsonrpc::METHOD_NOT_FOUND,
        other => other.code(),
    }
}

/// The line a publish writes: a JSON string's content, anything else as
/// its JSON text (whose line breaks can only be whitespace, written as
/// spaces); with its `\n`.
fn line_text(data: &[u8], max: usize) -> Result<Bytes, Refusal> {
    let text = String::from_utf8_lossy(data);
    let line: Cow<'_, str> = match serde_json::from_str::<String>(&text) {
        Ok(s) if s.contains(['\n', '\r']) => {
            return Err(Refusal::Other("a line cannot hold a line break".into()))
        }
        Ok(s) => Cow::Owned(s),
        Err(_) if text.contains(['\n', '\r']) => Cow::Owned(text.replace(['\n', '\r'], " ")),
        Err(_) => text,
    };
    if line.len() > max {
        return Err(Refusal::Other(CallError::TooLarge.message()));
    }
    let mut out = Vec::with_capacity(line.len() + 1);
    out.extend_from_slice(line.as_bytes());
    out.push(b'\n');
    Ok(Bytes::from(out))
}

impl Session {
    fn service_ack(
        &self,
        conv: &mut dyn Conversation,
        kind: ServiceOp,
        service: &str,
        id: Option<&str>,
        error: Option<&Refusal>,
    ) {
        let ack = Answer::ServiceAck {
            kind,
            service,
            id,
            error,
        };
        self.answer(conv, ack);
    }

    /// May this connection open a line to `service`: call every method of
    /// it (a call glob covering `<service>:*`)?
    fn may_open(&self, ctx: &SessionContext, service: &str) -> bool {
        let all = Topic::Pattern(Bytes::from(format!("{service}:*")));
        ctx.call_allow.allows(&all) || self.identity().is_some_and(|id| id.call_acl.allows(&all))
    }

    /// May this connection call `service:method`?
    pub(super) fn may_call(&self, ctx: &SessionContext, destination: &str) -> bool {
        ctx.call_allow.allows_publish(destination.as_bytes())
            || self
                .identity()
                .is_some_and(|id| id.call_acl.allows_publish(destination.as_bytes()))
    }

    fn lines(&mut self) -> &mut Lines {
        self.lines.get_or_insert_with(Box::default)
    }

    /// Whether `service` is something a line can be opened to here.
    fn exists(ctx: &SessionContext, service: &str) -> bool {
        ctx.tcp.address(service).is_some()
            || (valid_service_name(service) && ctx.rpc.has_service(service))
    }

    /// Opens a line: to a TCP backend (answered once connected), or to a
    /// registered service (answered at once).
    pub(super) fn service_subscribe(
        &mut self,
        ctx: &SessionContext,
        conv: &mut dyn Conversation,
        service: String,
        id: Option<String>,
    ) {
        let refused = |s: &Session, conv: &mut dyn Conversation, error: Refusal| {
            s.service_ack(
                conv,
                ServiceOp::Subscribe,
                &service,
                id.as_deref(),
                Some(&error),
            )
        };
        if !Self::exists(ctx, &service) {
            return refused(self, conv, refusal(&CallError::NoSuchService));
        }
        if !self.may_open(ctx, &service) {
            ctx.metrics
                .refused
                .with_label_values(&["call_not_allowed"])
                .inc();
            return refused(self, conv, Refusal::NotAllowed);
        }
        if self
            .lines
            .as_ref()
            .is_some_and(|l| l.open.contains_key(&service))
        {
            return refused(self, conv, Refusal::AlreadySubscribed);
        }
        if !self.take_token() {
            ctx.metrics
                .refused
                .with_label_values(&["rate_limited"])
                .inc();
            return refused(self, conv, Refusal::RateLimited);
        }
        let Some(address) = ctx.tcp.address(&service).map(str::to_owned) else {
            self.lines().open.insert(service.clone(), Line::Registered);
            return self.service_ack(conv, ServiceOp::Subscribe, &service, id.as_deref(), None);
        };
        let held = self
            .lines
            .as_ref()
            .map_or(0, |l| l.open.values().filter(|l| l.is_tcp()).count());
        if held >= ctx.tcp.per_client {
            ctx.metrics
                .refused
                .with_label_values(&["tcp_service_limit"])
                .inc();
            let limit = format!("service connection limit reached ({})", ctx.tcp.per_client);
            return refused(self, conv, Refusal::Other(limit));
        }
        let Ok(permit) = ctx.tcp.places.clone().try_acquire_owned() else {
            ctx.metrics
                .refused
                .with_label_values(&["tcp_service_limit"])
                .inc();
            let full = "too many service connections on this node".to_owned();
            return refused(self, conv, Refusal::Unavailable(full));
        };
        let origin = self.started();
        let timeout = ctx.tcp.connect_timeout;
        let lines = self.lines();
        lines.next += 1;
        let line = lines.next;
        lines
            .open
            .insert(service.clone(), Line::Connecting { line, id });
        lines
            .connecting
            .get_or_insert_with(FuturesUnordered::new)
            .push(Box::pin(async move {
                let outcome =
                    match tokio::time::timeout(timeout, TcpStream::connect(&address)).await {
                        Ok(Ok(stream)) => Ok((stream, permit)),
                        Ok(Err(e)) => Err(format!("service unavailable ({e})")),
                        Err(_) => Err("service unavailable (connect timeout)".to_owned()),
                    };
                let connected = Connected {
                    service,
                    line,
                    outcome,
                };
                (origin, connected)
            }));
    }

    /// A TCP connection attempt ended: the subscribe is answered, and on
    /// success the connection's task starts (after the answer, so that the
    /// backend's first line follows it).
    pub(super) fn service_connected(
        &mut self,
        ctx: &SessionContext,
        conv: &mut dyn Conversation,
        done: Connected,
    ) {
        let Connected {
            service,
            line,
            outcome,
        } = done;
        let current = self.lines.as_ref().is_some_and(|l| {
            matches!(l.open.get(&service), Some(Line::Connecting { line: n, .. }) if *n == line)
        });
        if !current {
            return; // unsubscribed meanwhile, and already answered
        }
        let id = match self.lines().open.remove(&service) {
            Some(Line::Connecting { id, .. }) => id,
            _ => None,
        };
        let (stream, permit) = match outcome {
            Ok(open) => open,
            Err(why) => {
                let error = Refusal::Unavailable(why);
                let id = id.as_deref();
                return self.service_ack(conv, ServiceOp::Subscribe, &service, id, Some(&error));
            }
        };
        self.service_ack(conv, ServiceOp::Subscribe, &service, id.as_deref(), None);
        let (writes, queued) = mpsc::channel(WRITE_QUEUE);
        let (close, closed) = oneshot::channel();
        let task = LineTask {
            service: service.clone(),
            line,
            max: ctx.tcp.line_bytes,
            inbox: self.inbox(),
            queued,
            closed,
            permit: Some(permit),
        };
        tokio::spawn(task.run(stream));
        let tcp = TcpLine {
            line,
            writes,
            _close: close,
        };
        self.lines().open.insert(service, Line::Tcp(tcp));
    }

    /// Closes a line (idempotent, as Bayeux's unsubscribe is); a subscribe
    /// still connecting is answered `cancelled` first.
    pub(super) fn service_unsubscribe(
        &mut self,
        conv: &mut dyn Conversation,
        service: String,
        id: Option<String>,
    ) {
        let removed = self.lines.as_mut().and_then(|l| l.open.remove(&service));
        match removed {
            None => {
                let error = Refusal::NotSubscribed;
                let id = id.as_deref();
                return self.service_ack(conv, ServiceOp::Unsubscribe, &service, id, Some(&error));
            }
            Some(Line::Connecting { id: pending, .. }) => {
                let error = Refusal::Cancelled;
                let pending = pending.as_deref();
                self.service_ack(conv, ServiceOp::Subscribe, &service, pending, Some(&error));
            }
            // Dropping a TCP line's handle closes its connection.
            Some(Line::Registered | Line::Tcp(_)) => {}
        }
        self.service_ack(conv, ServiceOp::Unsubscribe, &service, id.as_deref(), None);
        self.shrink_lines();
    }

    /// What the client sends on a line: one line for a TCP backend, a
    /// JSON-RPC call for a registered service.
    pub(super) fn service_publish(
        &mut self,
        ctx: &SessionContext,
        conv: &mut dyn Conversation,
        service: String,
        data: Bytes,
        id: Option<String>,
    ) {
        let refused = |s: &Session, conv: &mut dyn Conversation, error: Refusal| {
            s.service_ack(
                conv,
                ServiceOp::Publish,
                &service,
                id.as_deref(),
                Some(&error),
            )
        };
        if ctx.tcp.address(&service).is_some() {
            if !self.may_open(ctx, &service) {
                ctx.metrics
                    .refused
                    .with_label_values(&["call_not_allowed"])
                    .inc();
                return refused(self, conv, Refusal::NotAllowed);
            }
            let Some(Line::Tcp(tcp)) = self.lines.as_ref().and_then(|l| l.open.get(&service))
            else {
                return refused(self, conv, Refusal::NotSubscribed);
            };
            let text = match line_text(&data, ctx.tcp.line_bytes) {
                Ok(text) => text,
                Err(error) => return refused(self, conv, error),
            };
            return match tcp.writes.try_send(text) {
                Ok(()) => self.service_ack(conv, ServiceOp::Publish, &service, id.as_deref(), None),
                // The client writes faster than the backend reads.
                Err(mpsc::error::TrySendError::Full(_)) => {
                    refused(self, conv, Refusal::RateLimited)
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    let gone = "service connection closed".to_owned();
                    refused(self, conv, Refusal::Unavailable(gone))
                }
            };
        }
        if !Self::exists(ctx, &service) {
            return refused(self, conv, refusal(&CallError::NoSuchService));
        }
        let call = match std::str::from_utf8(&data).map(jsonrpc::parse) {
            Ok(Ok(call)) => call,
            Ok(Err(invalid)) => {
                self.service_ack(conv, ServiceOp::Publish, &service, id.as_deref(), None);
                let response = invalid.response();
                return self.service_data(conv, &service, id.as_deref(), &response);
            }
            Err(_) => {
                self.service_ack(conv, ServiceOp::Publish, &service, id.as_deref(), None);
                let response = jsonrpc::error(None, jsonrpc::PARSE_ERROR, "parse error");
                return self.service_data(conv, &service, id.as_deref(), &response);
            }
        };
        let destination = format!("{service}:{}", call.method);
        if let Some(error) = self.call_refusal(ctx, &destination, call.params.len()) {
            return refused(self, conv, refusal(&error));
        }
        self.service_ack(conv, ServiceOp::Publish, &service, id.as_deref(), None);
        if !valid_method_name(&call.method) {
            let Some(rpc_id) = call.id.as_deref() else {
                return;
            };
            let response = jsonrpc::error(
                Some(rpc_id),
                jsonrpc::METHOD_NOT_FOUND,
                &CallError::NoSuchMethod.message(),
            );
            return self.service_data(conv, &service, id.as_deref(), &response);
        }
        let deadline = ctx.rpc.call_timeout();
        let outgoing = Outgoing {
            service: service.clone(),
            method: call.method,
            params: call.params,
            consumer: self.identity().map(|i| i.subject.clone()),
            timeout: deadline,
            responder: None,
        };
        let done = ctx.rpc.call(outgoing);
        let rpc_id = call.id;
        self.lines()
            .calls
            .get_or_insert_with(FuturesUnordered::new)
            .push(Box::pin(async move {
                Called {
                    service,
                    id,
                    rpc_id,
                    outcome: done.await,
                }
            }));
    }

    fn service_data(
        &self,
        conv: &mut dyn Conversation,
        service: &str,
        id: Option<&str>,
        data: &str,
    ) {
        self.answer(conv, Answer::ServiceData { service, id, data });
    }

    /// A JSON-RPC call ended: its response, unless it was a notification.
    pub(super) fn service_called(&mut self, conv: &mut dyn Conversation, done: Called) {
        self.shrink_lines();
        let Some(rpc_id) = done.rpc_id.as_deref() else {
            return;
        };
        let response = match &done.outcome {
            Ok(result) => jsonrpc::result(Some(rpc_id), result),
            Err(e) => jsonrpc::error(Some(rpc_id), rpc_code(e), &e.message()),
        };
        self.service_data(conv, &done.service, done.id.as_deref(), &response);
    }

    /// Whether `line` is the open TCP connection to `service`.
    fn is_current(&self, service: &str, line: u64) -> bool {
        self.lines
            .as_ref()
            .is_some_and(|l| matches!(l.open.get(service), Some(Line::Tcp(t)) if t.line == line))
    }

    /// A line the backend wrote, for the client (unless that connection
    /// was closed meanwhile).
    pub(super) fn service_line(
        &mut self,
        conv: &mut dyn Conversation,
        service: &str,
        line: u64,
        data: &str,
    ) {
        if self.is_current(service, line) {
            self.service_data(conv, service, None, data);
        }
    }

    /// The backend went away: the client is told, and no longer holds it.
    pub(super) fn service_ended(
        &mut self,
        conv: &mut dyn Conversation,
        service: &str,
        line: u64,
        reason: &str,
    ) {
        if !self.is_current(service, line) {
            return;
        }
        if let Some(lines) = self.lines.as_mut() {
            lines.open.remove(service);
        }
        self.shrink_lines();
        self.answer(conv, Answer::ServiceEnded { service, reason });
    }

    /// Gives the lines' allocation back once nothing is held or awaited.
    fn shrink_lines(&mut self) {
        let idle = self.lines.as_ref().is_some_and(|l| {
            l.open.is_empty()
                && l.connecting.is_none()
                && l.calls.as_ref().is_none_or(FuturesUnordered::is_empty)
        });
        if idle {
            self.lines = None;
        }
    }
}

/// One TCP connection's task: reads the backend's lines into the session's
/// inbox, writes the client's lines to it, and ends when the session closes
/// the line (`closed`), when the session is gone, or when the backend ends
/// (then telling the session why).
struct LineTask {
    service: String,
    line: u64,
    max: usize,
    inbox: InboxSender,
    queued: mpsc::Receiver<Bytes>,
    closed: oneshot::Receiver<()>,
    /// This connection's place among `WSGATE_TCP_SERVICES_PER_NODE`, given
    /// back as soon as the line ends (before its FIN or its end notice: once
    /// the backend or the client sees the end, the place is free).
    permit: Option<OwnedSemaphorePermit>,
}

/// What one read of the backend gave.
enum Read {
    /// A whole line (its end taken off).
    Line(String),
    /// Part of a line, kept for the next read.
    More,
    /// The end of the stream (after a last line without its `\n`, if any).
    Eof(Option<String>),
    /// A line longer than the bound.
    TooLong,
}

/// Reads what is available into `partial`: a line when one is complete.
/// Cancel-safe: the only wait is `fill_buf`, and nothing is consumed
/// before it returns.
async fn read_line(
    reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    partial: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Read> {
    let buf = reader.fill_buf().await?;
    if buf.is_empty() {
        let last = (!partial.is_empty()).then(|| take_line(partial));
        return Ok(Read::Eof(last));
    }
    let (taken, complete) = match buf.iter().position(|&b| b == b'\n') {
        Some(at) => (at, true),
        None => (buf.len(), false),
    };
    if partial.len() + taken > max {
        return Ok(Read::TooLong);
    }
    partial.extend_from_slice(&buf[..taken]);
    reader.consume(taken + usize::from(complete));
    Ok(if complete {
        Read::Line(take_line(partial))
    } else {
        Read::More
    })
}

/// The gathered line as text (a `\r` before its `\n` dropped, bytes that
/// are not UTF-8 replaced), leaving `partial` empty.
fn take_line(partial: &mut Vec<u8>) -> String {
    if partial.last() == Some(&b'\r') {
        partial.pop();
    }
    let text = String::from_utf8_lossy(partial).into_owned();
    partial.clear();
    text
}

impl LineTask {
    async fn run(mut self, stream: TcpStream) {
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::with_capacity(READ_BUFFER.min(self.max.max(1)), read);
        let mut partial = Vec::new();
        let ended: Option<String> = loop {
            tokio::select! {
                _ = &mut self.closed => break None,
                read = read_line(&mut reader, &mut partial, self.max) => match read {
                    Ok(Read::Line(data)) => {
                        if !self.deliver(data).await {
                            break None;
                        }
                    }
                    Ok(Read::More) => {}
                    Ok(Read::Eof(last)) => {
                        if let Some(data) = last {
                            if !self.deliver(data).await {
                                break None;
                            }
                        }
                        break Some("service closed the connection".to_owned());
                    }
                    Ok(Read::TooLong) => {
                        break Some(format!("line too long (max {} bytes)", self.max));
                    }
                    Err(e) => break Some(format!("service connection failed ({e})")),
                },
                line = self.queued.recv() => {
                    let Some(line) = line else { break None };
                    let written = tokio::time::timeout(WRITE_TIMEOUT, write.write_all(&line));
                    tokio::select! {
                        _ = &mut self.closed => break None,
                        done = written => match done {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => break Some(format!("service connection failed ({e})")),
                            Err(_) => break Some("service did not read in time".to_owned()),
                        },
                    }
                }
            }
        };
        drop(self.permit.take());
        match ended {
            Some(reason) => {
                let end = Control::ServiceEnded {
                    service: std::mem::take(&mut self.service),
                    line: self.line,
                    reason,
                };
                tokio::select! {
                    _ = self.inbox.send(end) => {}
                    _ = &mut self.closed => {}
                }
            }
            None => {
                // Closed by the session: end the stream properly, briefly.
                let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, write.shutdown()).await;
            }
        }
    }

    /// Hands a line to the session, waiting for room in its inbox (the
    /// backpressure on the backend); `false` when the line was closed or
    /// the session is gone meanwhile.
    async fn deliver(&mut self, data: String) -> bool {
        let control = Control::ServiceData {
            service: self.service.clone(),
            line: self.line,
            data,
        };
        tokio::select! {
            sent = self.inbox.send(control) => sent.is_ok(),
            _ = &mut self.closed => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_lines() {
        let line = |data: &str| line_text(data.as_bytes(), 16);
        assert_eq!(line(r#""hello""#), Ok(Bytes::from_static(b"hello\n")));
        assert_eq!(line(r#""\u00e9""#), Ok(Bytes::from("\u{e9}\n")));
        assert_eq!(line(r#"{"a":1}"#), Ok(Bytes::from_static(b"{\"a\":1}\n")));
        assert_eq!(line("[1,\n2]"), Ok(Bytes::from_static(b"[1, 2]\n")));
        assert_eq!(line("42"), Ok(Bytes::from_static(b"42\n")));
        assert!(line(r#""a\nb""#).is_err());
        assert_eq!(
            line(r#""0123456789abcdef""#),
            Ok(Bytes::from("0123456789abcdef\n"))
        );
        assert_eq!(
            line(r#""0123456789abcdefg""#),
            Err(Refusal::Other("payload too large".into()))
        );
    }

    #[test]
    fn call_errors_as_json_rpc_codes() {
        assert_eq!(rpc_code(&CallError::NoSuchMethod), -32601);
        assert_eq!(rpc_code(&CallError::Timeout), 408);
        let failed = CallError::Failed {
            code: -32001,
            message: "card declined".into(),
        };
        assert_eq!(rpc_code(&failed), -32001);
    }
}
