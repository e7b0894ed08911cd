//! Services: a registry of service instances and request/response calls
//! across nodes (`docs/services.md`).
//!
//! Service and consumer processes connect to `WSGATE_SERVICES_PATH`
//! ([`crate::transport::services`]) and register; clients of every dialect
//! call `service:method` through the session ([`crate::protocol::Request::Call`]).
//! The [`Rpc`] handle routes a call to one instance of the service: straight
//! into the instance's connection when it is on this node, otherwise
//! published on the node channel of the node that holds it
//! (`wsgate:node:<id>`), whose reply comes back on the caller's node channel.
//! Calls travel at most once and every call has a deadline.
//!
//! Where instances are is kept in a [`directory`] (Redis, with leases, or in
//! memory for the embedded broker); each node caches a view of it, kept
//! current by the directory's own events.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::broker::redis::RedisConfigError;
use crate::broker::Publication;
use crate::config::Config;
use crate::hub::Hub;
use crate::metrics::Metrics;

pub mod calls;
pub mod directory;
pub mod metrics;
mod node;
pub mod process;
pub mod view;
pub mod wire;

use calls::Calls;
use directory::{Directory, DirectoryError, Instance};
use metrics::RpcMetrics;
use process::{IncomingCall, Origin, Process, ProcessHandle, ToProcess, MAILBOX};
use view::View;
use wire::{node_channel, Wire, WireCommand, WireError, NODES_CHANNEL};

/// The events of the directory and the services, each on its own channel
/// (`/wsgate/services/<name>`) so that clients of every dialect can name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// An instance registered (each one).
    Connect,
    /// The first instance of a service cluster-wide.
    Online,
    /// An instance went away (each one).
    Disconnect,
    /// The last instance of a service cluster-wide went away.
    Offline,
    /// A process broadcast to every other.
    Broadcast,
    /// A call no instance could take.
    Unhandled,
}

impl Event {
    /// Every event, in bit order.
    pub const ALL: [Event; 6] = [
        Event::Connect,
        Event::Online,
        Event::Disconnect,
        Event::Offline,
        Event::Broadcast,
        Event::Unhandled,
    ];

    /// Its name, as processes subscribe to it.
    pub fn name(self) -> &'static str {
        match self {
            Event::Connect => "connect",
            Event::Online => "online",
            Event::Disconnect => "disconnect",
            Event::Offline => "offline",
            Event::Broadcast => "broadcast",
            Event::Unhandled => "unhandled",
        }
    }

    /// Its channel.
    pub fn channel(self) -> &'static str {
        match self {
            Event::Connect => "/wsgate/services/connect",
            Event::Online => "/wsgate/services/online",
            Event::Disconnect => "/wsgate/services/disconnect",
            Event::Offline => "/wsgate/services/offline",
            Event::Broadcast => "/wsgate/services/broadcast",
            Event::Unhandled => "/wsgate/services/unhandled",
        }
    }

    /// The event of `name`.
    pub fn from_name(name: &str) -> Option<Event> {
        Event::ALL.into_iter().find(|e| e.name() == name)
    }

    /// The event published on `channel`.
    pub fn from_channel(channel: &[u8]) -> Option<Event> {
        Event::ALL
            .into_iter()
            .find(|e| e.channel().as_bytes() == channel)
    }

    /// Its bit in a process's subscriptions.
    pub fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// Service names: what `WSGATE_TCP_SERVICES` and `register` accept.
pub fn valid_service_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Method names: the same alphabet as service names, longer allowed
/// (`[A-Za-z0-9_.-]{1,128}`).
pub fn valid_method_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// Why a call did not return a result: a closed set, so that each dialect
/// can phrase each failure its own way. [`CallError::code`] and
/// [`CallError::message`] are what `/services` and the native protocol say.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The connection may not call this `service:method` (the token's `call`
    /// claim, `WSGATE_CALL_ALLOW`).
    #[error("not allowed")]
    NotAllowed,
    /// No instance of the service is registered anywhere.
    #[error("no such service")]
    NoSuchService,
    /// The service is registered, without this method.
    #[error("no such method")]
    NoSuchMethod,
    /// The deadline passed before the service replied.
    #[error("timeout")]
    Timeout,
    /// The instance that had the call went away before replying.
    #[error("service gone")]
    ServiceGone,
    /// Too many calls in flight (this connection's, the instance's or the
    /// node's bound).
    #[error("too many calls in flight")]
    Busy,
    /// The call's parameters are larger than `WSGATE_MAX_CALL_BYTES`.
    #[error("payload too large")]
    TooLarge,
    /// Redis could not carry the call.
    #[error("broker unavailable")]
    Unavailable,
    /// The call itself is malformed (a bad service or method name).
    #[error("{0}")]
    Invalid(String),
    /// The service answered with an error of its own.
    #[error("{message}")]
    Failed {
        /// The service's code.
        code: i64,
        /// The service's message.
        message: String,
    },
}

impl CallError {
    /// The error's code: HTTP-like for the gateway's own failures, the
    /// service's own for [`CallError::Failed`].
    pub fn code(&self) -> i64 {
        match self {
            CallError::NotAllowed => 403,
            CallError::NoSuchService | CallError::NoSuchMethod => 404,
            CallError::Timeout => 408,
            CallError::TooLarge => 413,
            CallError::Busy => 429,
            CallError::Invalid(_) => 400,
            CallError::ServiceGone | CallError::Unavailable => 503,
            CallError::Failed { code, .. } => *code,
        }
    }

    /// The error's text.
    pub fn message(&self) -> String {
        self.to_string()
    }
}

/// A call as the router takes it, from a client session or a `/services`
/// consumer.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The service.
    pub service: String,
    /// The method.
    pub method: String,
    /// The arguments, as JSON text.
    pub params: Bytes,
    /// Who calls, as the service is told (`consumer`): a consumer's
    /// registered name, or the client's token subject.
    pub consumer: Option<String>,
    /// The call's deadline, already capped by `WSGATE_CALL_TIMEOUT_MS`.
    pub timeout: Duration,
    /// The caller's callback name (the seed's `responder`), passed to the
    /// service and back.
    pub responder: Option<String>,
}

/// An order one node gives every node (the operator API's `POST
/// /disconnect` and `POST /unsubscribe`), carried on the node channels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeCommand {
    /// Close every connection of this user (the token's `sub`).
    Disconnect {
        /// The user.
        user: String,
    },
    /// End this subscription on every connection of this user.
    Unsubscribe {
        /// The user.
        user: String,
        /// The channel or pattern.
        topic: crate::broker::Topic,
    },
}

/// A [`NodeCommand`] for this node's sessions: whoever executes it answers
/// with how many connections it acted on.
#[derive(Debug)]
pub struct NodeOrder {
    /// What to do.
    pub command: NodeCommand,
    /// Where the count goes.
    pub done: tokio::sync::oneshot::Sender<u64>,
}

/// Orders for this node's sessions come out here (bounded); the server
/// hands them to the session layer.
pub type NodeOrders = mpsc::Receiver<NodeOrder>;

/// Orders from other nodes waiting for this node's executor.
const ORDER_CAPACITY: usize = 64;
/// How long an order waits for the nodes' counts (and a node for its
/// sessions): the operator API answers within about this.
const ORDER_WAIT: Duration = Duration::from_secs(1);
/// Most times a call is routed again after finding its instance's node
/// gone (a `PUBLISH` that reached nobody): at most once delivered anyway.
const MAX_ROUTES: usize = 4;

/// What a process asks to register as.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The service's name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Its methods; none for a consumer (which is not announced).
    pub methods: Vec<String>,
}

/// The node's call router; clones share it.
#[derive(Clone)]
pub struct Rpc {
    shared: Arc<Shared>,
}

struct Shared {
    node_id: Arc<str>,
    /// Distinguishes this run's instance ids from an earlier run's of the
    /// same node id.
    boot: String,
    hub: Hub,
    directory: Directory,
    view: Mutex<View>,
    processes: Mutex<HashMap<u64, Arc<Process>>>,
    /// Registered instances of this node, by instance id.
    instances: Mutex<HashMap<String, Arc<Process>>>,
    calls: Calls,
    /// Orders of this node waiting for the nodes' counts.
    orders: Mutex<HashMap<u64, mpsc::Sender<u64>>>,
    order_tx: mpsc::Sender<NodeOrder>,
    next: AtomicU64,
    call_timeout: Duration,
    max_call_bytes: usize,
    lease: Duration,
    metrics: RpcMetrics,
    closing: watch::Sender<bool>,
}

/// Locks a plain mutex, reusing it after a panic elsewhere (every critical
/// section leaves it consistent).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Rpc {
    /// Starts the router of this node: its directory (Redis when
    /// `WSGATE_REDIS_URL` is set, else in memory), its node channel, the
    /// lease renewal.
    pub fn start(
        hub: Hub,
        config: &Config,
        metrics: Metrics,
    ) -> Result<(Rpc, NodeOrders), RedisConfigError> {
        let directory = match &config.redis_url {
            Some(url) => Directory::Redis(directory::redis::RedisDirectory::start(
                url,
                &config.node_id,
                config.service_lease,
                config.subscribe_timeout.max(Duration::from_secs(1)),
                config.redis_backoff_max,
                &config.redis_security,
            )?),
            None => Directory::memory(hub.clone()),
        };
        let (order_tx, orders) = mpsc::channel(ORDER_CAPACITY);
        let rpc = Rpc {
            shared: Arc::new(Shared {
                node_id: config.node_id.as_str().into(),
                boot: boot_token(),
                hub,
                directory,
                view: Mutex::default(),
                processes: Mutex::default(),
                instances: Mutex::default(),
                calls: Calls::default(),
                orders: Mutex::default(),
                order_tx,
                next: AtomicU64::new(1),
                call_timeout: config.call_timeout,
                max_call_bytes: config.max_call_bytes.get(),
                lease: config.service_lease,
                metrics: RpcMetrics::new(&metrics),
                closing: watch::Sender::new(false),
            }),
        };
        node::start(rpc.clone());
        Ok((rpc, orders))
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.shared.node_id
    }

    /// The longest deadline a call may have (`WSGATE_CALL_TIMEOUT_MS`).
    pub fn call_timeout(&self) -> Duration {
        self.shared.call_timeout
    }

    /// The largest call parameters or reply (`WSGATE_MAX_CALL_BYTES`).
    pub fn max_call_bytes(&self) -> usize {
        self.shared.max_call_bytes
    }

    /// Calls `call.service:call.method` on one of its instances and
    /// resolves with its result (JSON text) or why not, within the call's
    /// deadline. The future owns what it needs, so a session can hold it
    /// beside its other waits.
    pub fn call(&self, call: Outgoing) -> BoxFuture<'static, Result<Bytes, CallError>> {
        let rpc = self.clone();
        async move {
            let started = Instant::now();
            rpc.shared.metrics.in_flight.inc();
            let outcome = rpc.route(call).await;
            rpc.shared.metrics.in_flight.dec();
            rpc.shared
                .metrics
                .ended(&outcome, started.elapsed().as_secs_f64());
            outcome
        }
        .boxed()
    }

    async fn route(&self, call: Outgoing) -> Result<Bytes, CallError> {
        if !valid_service_name(&call.service) {
            return Err(CallError::Invalid(format!(
                "invalid service name {:?}: expected 1 to 64 of A-Z a-z 0-9 _ -",
                call.service
            )));
        }
        if !valid_method_name(&call.method) {
            return Err(CallError::Invalid(format!(
                "invalid method name {:?}: expected 1 to 128 of A-Z a-z 0-9 _ - .",
                call.method
            )));
        }
        if call.params.len() > self.shared.max_call_bytes {
            return Err(CallError::TooLarge);
        }
        let Some(payload) = wire::raw(&call.params) else {
            return Err(CallError::Invalid("params must be JSON".into()));
        };
        let deadline = Instant::now() + call.timeout;
        let destination = format!("{}:{}", call.service, call.method);
        let mut asked_directory = false;
        for _ in 0..MAX_ROUTES {
            let picked = lock(&self.shared.view).pick(&call.service, &call.method);
            let target = match picked {
                Ok(target) => target,
                Err(CallError::NoSuchService) if !asked_directory => {
                    // The view may lag a registration that just happened.
                    asked_directory = true;
                    self.refresh(Some(&call.service)).await;
                    continue;
                }
                Err(CallError::NoSuchService) => break,
                Err(e) => return Err(e),
            };
            let seq = self.shared.next.fetch_add(1, Ordering::Relaxed);
            let node: Arc<str> = target.node.as_str().into();
            let answer =
                self.shared
                    .calls
                    .insert(seq, target.instance.as_str().into(), node.clone())?;
            let waiting = Waiting { rpc: self, seq };
            let incoming = IncomingCall {
                origin: Origin::Local(seq),
                destination: destination.clone(),
                consumer: call.consumer.clone(),
                responder: call.responder.clone(),
                payload: payload.clone(),
                deadline,
            };
            if *node == *self.shared.node_id {
                let process = lock(&self.shared.instances).get(&target.instance).cloned();
                let Some(process) = process else {
                    lock(&self.shared.view).remove(&target.service, &target.instance);
                    continue;
                };
                match process.tx.try_send(ToProcess::Call(incoming)) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => return Err(CallError::Busy),
                    Err(mpsc::error::TrySendError::Closed(_)) => continue,
                }
            } else {
                let message = Wire::Call {
                    from: self.shared.node_id.to_string(),
                    seq,
                    instance: target.instance.clone(),
                    destination: destination.clone(),
                    consumer: incoming.consumer,
                    responder: incoming.responder,
                    timeout_ms: remaining_ms(deadline),
                    payload: incoming.payload,
                };
                let sent = tokio::time::timeout_at(
                    deadline,
                    self.shared.hub.publish(Publication {
                        channel: node_channel(&node),
                        payload: message.encode(),
                        idempotency_key: None,
                    }),
                )
                .await;
                match sent {
                    Ok(Ok(0)) => {
                        // Nobody holds that node's channel: the node is gone.
                        debug!(node = %node, "node gone: its instances are dropped from the view");
                        lock(&self.shared.view).drop_node(&node);
                        continue;
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) => return Err(CallError::Unavailable),
                    Err(_) => return Err(CallError::Timeout),
                }
            }
            let outcome = tokio::time::timeout_at(deadline, answer).await;
            drop(waiting);
            return match outcome {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => Err(CallError::ServiceGone),
                Err(_) => Err(CallError::Timeout),
            };
        }
        self.unhandled(&call.service, &destination).await;
        Err(CallError::NoSuchService)
    }

    /// Publishes the `unhandled` event of a call nobody could take.
    async fn unhandled(&self, service: &str, destination: &str) {
        let payload = serde_json::json!({
            "service": service,
            "version": null,
            "instance": null,
            "node": &*self.shared.node_id,
            "destination": destination,
        });
        let published = self
            .shared
            .hub
            .publish(Publication {
                channel: Bytes::from_static(Event::Unhandled.channel().as_bytes()),
                payload: Bytes::from(payload.to_string()),
                idempotency_key: None,
            })
            .await;
        if let Err(e) = published {
            debug!(cause = %e, "unhandled event not published");
        }
    }

    /// Reads the directory again (one service, or all) into the view.
    async fn refresh(&self, service: Option<&str>) {
        match self.shared.directory.list(service).await {
            Ok(instances) => lock(&self.shared.view).replace(service, instances),
            Err(e) => debug!(cause = %e, "directory not read"),
        }
    }

    /// Whether an instance of `service` is registered anywhere (as this
    /// node's view of the directory knows).
    pub fn has_service(&self, service: &str) -> bool {
        lock(&self.shared.view).has(service)
    }

    /// The names of the services registered anywhere, sorted.
    pub fn services(&self) -> Vec<String> {
        lock(&self.shared.view).names()
    }

    /// A new process connected: its handle (dropping it removes the
    /// process) and where the router's messages for it arrive.
    pub fn connect(&self) -> (ProcessHandle, mpsc::Receiver<ToProcess>) {
        let (tx, rx) = mpsc::channel(MAILBOX);
        let process = Arc::new(Process {
            id: self.shared.next.fetch_add(1, Ordering::Relaxed),
            tx,
            registered: Mutex::new(None),
            events: AtomicU8::new(0),
        });
        lock(&self.shared.processes).insert(process.id, process.clone());
        self.shared.metrics.processes.inc();
        let handle = ProcessHandle {
            rpc: self.clone(),
            process,
        };
        (handle, rx)
    }

    /// Registers the process of `handle` as `registration` describes: a
    /// service instance (in the directory, announced) or, without methods,
    /// a consumer (known by name only). Once.
    pub async fn register(
        &self,
        handle: &ProcessHandle,
        registration: Registration,
    ) -> Result<Arc<Instance>, DirectoryError> {
        let n = self.shared.next.fetch_add(1, Ordering::Relaxed);
        let instance = Arc::new(Instance {
            service: registration.name,
            version: registration.version,
            instance: format!("{}.{}.{n}", self.shared.node_id, self.shared.boot),
            node: self.shared.node_id.to_string(),
            methods: registration.methods,
        });
        if !instance.methods.is_empty() {
            // Callable here before the directory answers: this node's own
            // callers find it at once.
            lock(&self.shared.instances).insert(instance.instance.clone(), handle.process.clone());
            if let Err(e) = self.shared.directory.register(&instance).await {
                lock(&self.shared.instances).remove(&instance.instance);
                return Err(e);
            }
            lock(&self.shared.view).add(instance.clone());
            self.shared.metrics.instances.inc();
        }
        *lock(&handle.process.registered) = Some(instance.clone());
        Ok(instance)
    }

    /// The process went away: its instance leaves the directory (its
    /// connection tells its callers `service gone`).
    fn remove_process(&self, process: &Arc<Process>) {
        lock(&self.shared.processes).remove(&process.id);
        self.shared.metrics.processes.dec();
        let Some(instance) = process.instance() else {
            return;
        };
        if instance.methods.is_empty() {
            return;
        }
        lock(&self.shared.instances).remove(&instance.instance);
        lock(&self.shared.view).remove(&instance.service, &instance.instance);
        self.shared.metrics.instances.dec();
        let directory = self.shared.directory.clone();
        tokio::spawn(async move {
            if let Err(e) = directory.deregister(&instance).await {
                // Its lease runs out instead.
                warn!(cause = %e, instance = %instance.instance, "instance not deregistered");
            }
        });
    }

    /// Counts a reply that came after its call ended (dropped).
    pub fn late_reply(&self) {
        self.shared.metrics.late_replies.inc();
    }

    /// Sends the end of a call to its caller.
    pub fn reply(&self, origin: Origin, outcome: Result<Bytes, CallError>) {
        match origin {
            Origin::Local(seq) => {
                if !self.shared.calls.complete(seq, outcome) {
                    self.shared.metrics.late_replies.inc();
                }
            }
            Origin::Remote { node, seq } => {
                let (payload, error) = match &outcome {
                    Ok(result) => (wire::raw(result), None),
                    Err(e) => (None, Some(WireError::from_error(e))),
                };
                let message = Wire::Reply {
                    seq,
                    payload,
                    error,
                };
                self.send(node_channel(&node), message.encode());
            }
        }
    }

    /// Publishes to a node channel without waiting for the outcome (a lost
    /// message is a caller's timeout).
    fn send(&self, channel: Bytes, payload: Bytes) {
        let hub = self.shared.hub.clone();
        tokio::spawn(async move {
            let publication = Publication {
                channel,
                payload,
                idempotency_key: None,
            };
            if let Err(e) = hub.publish(publication).await {
                debug!(cause = %e, "node message not published");
            }
        });
    }

    /// A process's broadcast: to every other process (of every node), and
    /// on `/wsgate/services/broadcast`.
    pub async fn broadcast(
        &self,
        from: &Instance,
        payload: &serde_json::value::RawValue,
    ) -> Result<(), CallError> {
        let mut text = serde_json::to_string(&serde_json::json!({
            "service": from.service,
            "version": from.version,
            "instance": from.instance,
            "node": from.node,
        }))
        .unwrap_or_default();
        text.pop(); // the closing brace
        text.push_str(",\"payload\":");
        text.push_str(payload.get());
        text.push('}');
        self.shared
            .hub
            .publish(Publication {
                channel: Bytes::from_static(Event::Broadcast.channel().as_bytes()),
                payload: Bytes::from(text),
                idempotency_key: None,
            })
            .await
            .map(drop)
            .map_err(|_| CallError::Unavailable)
    }

    /// Sends `command` to every node (this one included) and resolves with
    /// the sum of their counts, once each node answered or after a second.
    pub fn command(&self, command: NodeCommand) -> BoxFuture<'static, Result<u64, CallError>> {
        let rpc = self.clone();
        async move {
            let seq = rpc.shared.next.fetch_add(1, Ordering::Relaxed);
            let (tx, mut counts) = mpsc::channel(ORDER_CAPACITY);
            lock(&rpc.shared.orders).insert(seq, tx);
            let message = Wire::Order {
                from: rpc.shared.node_id.to_string(),
                seq,
                command: WireCommand::from_command(&command),
            };
            let sent = rpc
                .shared
                .hub
                .publish(Publication {
                    channel: Bytes::from_static(NODES_CHANNEL.as_bytes()),
                    payload: message.encode(),
                    idempotency_key: None,
                })
                .await;
            let nodes = match sent {
                Ok(n) => n,
                Err(_) => {
                    lock(&rpc.shared.orders).remove(&seq);
                    return Err(CallError::Unavailable);
                }
            };
            let mut total = 0;
            let until = Instant::now() + ORDER_WAIT * 2;
            for _ in 0..nodes {
                match tokio::time::timeout_at(until, counts.recv()).await {
                    Ok(Some(n)) => total += n,
                    _ => break,
                }
            }
            lock(&rpc.shared.orders).remove(&seq);
            Ok(total)
        }
        .boxed()
    }

    /// Stops the router's tasks: service connections are closed by their
    /// own tasks.
    pub fn close(&self) {
        self.shared.closing.send_replace(true);
        self.shared.directory.close();
    }
}

/// Removes a call from the waiting table when its wait ends, however it
/// ends (answered, timed out, or dropped with its session).
struct Waiting<'a> {
    rpc: &'a Rpc,
    seq: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.rpc.shared.calls.remove(self.seq);
    }
}

/// Milliseconds left until `deadline` (at least 1).
fn remaining_ms(deadline: Instant) -> u64 {
    let left = deadline.saturating_duration_since(Instant::now());
    u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// A short random token (from the process's hasher seed and the clock).
fn boot_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    format!("{:08x}", h.finish() as u32)
}

/// Used by [`node`]: answer a call for an instance of this node.
impl Rpc {
    fn shared(&self) -> &Shared {
        &self.shared
    }

    /// A call from another node for an instance here.
    fn incoming(&self, call: Wire) {
        let Wire::Call {
            from,
            seq,
            instance,
            destination,
            consumer,
            responder,
            timeout_ms,
            payload,
        } = call
        else {
            return;
        };
        let origin = Origin::Remote {
            node: from.as_str().into(),
            seq,
        };
        let process = lock(&self.shared.instances).get(&instance).cloned();
        let Some(process) = process else {
            return self.reply(origin, Err(CallError::ServiceGone));
        };
        let incoming = IncomingCall {
            origin: origin.clone(),
            destination,
            consumer,
            responder,
            payload,
            deadline: Instant::now() + Duration::from_millis(timeout_ms),
        };
        match process.tx.try_send(ToProcess::Call(incoming)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.reply(origin, Err(CallError::Busy)),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.reply(origin, Err(CallError::ServiceGone))
            }
        }
    }

    /// An order from a node (this one too): executed by this node's
    /// sessions, the count sent back.
    fn order(&self, from: String, seq: u64, command: WireCommand) {
        let rpc = self.clone();
        tokio::spawn(async move {
            let n = match command.into_command() {
                Some(command) => {
                    let (done, count) = oneshot::channel();
                    let order = NodeOrder { command, done };
                    match tokio::time::timeout(ORDER_WAIT, rpc.shared.order_tx.send(order)).await {
                        Ok(Ok(())) => tokio::time::timeout(ORDER_WAIT, count)
                            .await
                            .ok()
                            .and_then(Result::ok)
                            .unwrap_or(0),
                        _ => 0,
                    }
                }
                None => 0,
            };
            rpc.send(node_channel(&from), Wire::Count { seq, n }.encode());
        });
    }

    /// A node's count for an order of this node.
    fn count(&self, seq: u64, n: u64) {
        if let Some(tx) = lock(&self.shared.orders).get(&seq) {
            let _ = tx.try_send(n);
        }
    }
}
