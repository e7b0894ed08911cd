//! The server: listener, accept loop, and the shutdown sequence.
//!
//! [`bind`] opens the listening socket with a deep backlog (tokio's default of
//! 128 drops SYNs under a connection storm). [`run`] builds the broker and the
//! hub and serves HTTP/1.1 with upgrades on every accepted connection. When
//! the shutdown future resolves it decides, tells, waits:
//!
//! 1. `Drain` (SIGTERM): the phase becomes draining: `/readyz` answers 503 at
//!    once, upgrades are refused, and sessions close with 1012 spread over
//!    `WSGATE_DRAIN_WINDOW_MS`, while the listener keeps answering health
//!    checks. `Immediate` (Ctrl-C): the phase becomes stopping, and every
//!    session closes now with 1001.
//! 2. Wait until no session is left, at most the window plus
//!    `WSGATE_SHUTDOWN_TIMEOUT_MS`.
//! 3. Stop accepting, let HTTP connections finish, close the hub (which drops
//!    the broker and its Redis connections).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::app::App;
use crate::broker::memory::MemoryBroker;
use crate::broker::redis::shards::ShardedBroker;
use crate::broker::redis::{RedisBroker, RedisConfigError, RedisOptions};
use crate::broker::{Broker, EventSink, EVENT_CAPACITY};
use crate::config::Config;
use crate::handoff::Handoff;
use crate::http;
use crate::hub::{Hub, HubOptions};
use crate::metrics::Metrics;
use crate::rpc::Rpc;
use crate::shutdown::{Phase, Stop};

/// Pending connections the kernel queues for us.
const BACKLOG: i32 = 4096;
/// Longest pause after a failed accept (e.g. out of file descriptors).
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Largest read buffer hyper keeps per connection, so the largest request
/// head: ample for tokens and cookies, and it bounds what a connection that
/// never finishes its headers can make us hold (hyper's default is ~400 KB;
/// 1024 pending connections x 64 KiB = 64 MiB at worst).
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listening socket could not be opened.
    #[error("cannot listen: {0}")]
    Bind(#[from] std::io::Error),
    /// `WSGATE_REDIS_URL` is unusable.
    #[error(transparent)]
    Redis(#[from] RedisConfigError),
}

/// Binds `addr` with `SO_REUSEADDR` and a backlog of [`BACKLOG`].
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// What every Redis broker (single, shards, Cluster) takes from the config.
fn redis_options(config: &Config) -> RedisOptions {
    RedisOptions {
        probe_interval: config.redis_probe_interval,
        probe_timeout: config.redis_probe_timeout,
        backoff_max: config.redis_backoff_max,
        node_id: config.node_id.clone(),
        idempotency_ttl: config.idempotency_ttl,
        max_redis_patterns: config.max_redis_patterns.get(),
        pubsub_connections: config.pubsub_connections(),
        history: config.history.clone(),
        presence: config.presence.clone(),
        security: config.redis_security.clone(),
    }
}

/// The broker over `WSGATE_REDIS_CLUSTER` (outside [`run`], whose future
/// is deep enough already).
fn start_cluster(
    config: &Config,
    events: EventSink,
    metrics: &Metrics,
) -> Result<Arc<dyn Broker>, RedisConfigError> {
    let options = redis_options(config);
    let seeds = config.redis_cluster.as_deref().unwrap_or_default();
    Ok(Arc::new(
        crate::broker::redis::cluster::ClusterBroker::start(
            seeds,
            config.redis_cluster_sharded,
            config.redis_cluster_patterns,
            events,
            metrics.clone(),
            options,
        )?,
    ))
}

/// Serves until `shutdown` resolves, then shuts down in order.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = Stop>,
) -> Result<(), ServerError> {
    let metrics = Metrics::new();
    let (events_tx, events_rx) = mpsc::channel(EVENT_CAPACITY);
    let queued = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let events_tx = EventSink::new(events_tx, metrics.clone(), queued.clone());
    let broker: Arc<dyn Broker> = match &config.redis_url {
        _ if config.redis_cluster.is_some() => start_cluster(&config, events_tx, &metrics)?,
        Some(url) => {
            let options = redis_options(&config);
            if config.redis_shards.is_empty() {
                Arc::new(RedisBroker::start(
                    url,
                    events_tx,
                    metrics.clone(),
                    options,
                )?)
            } else {
                Arc::new(ShardedBroker::start(
                    &config.redis_shards,
                    events_tx,
                    metrics.clone(),
                    options,
                )?)
            }
        }
        None => Arc::new(
            MemoryBroker::new(events_tx, metrics.clone(), config.idempotency_ttl)
                .with_history(config.history.clone())
                .with_presence(config.presence.clone()),
        ),
    };
    info!(addr = %listener.local_addr()?, broker = broker.name(), "listening");
    info!("{}", protections(&config));
    let hub_options = HubOptions {
        max_delivery_bytes: config
            .max_delivery_bytes
            .get()
            .min(config.client_queue_bytes.get()),
        heal_timeout: config.subscribe_timeout,
    };
    let hub = Hub::start(broker, events_rx, queued, metrics.clone(), hub_options);
    hub.set_max_patterns(config.max_patterns.get());
    hub.start_presence(&config.node_id, config.presence_lease);
    let handoff = Handoff::for_config(&config)?;
    let (rpc, node_orders) = Rpc::start(hub.clone(), &config, metrics.clone())?;
    let app = Arc::new(App::new(
        hub.clone(),
        metrics,
        config,
        handoff.clone(),
        rpc.clone(),
    ));
    // The operator API's orders (from any node, this one too) for this
    // node's sessions.
    let executor = tokio::spawn(crate::session::users::serve(app.users.clone(), node_orders));

    let mut accepting = Box::pin(accept_loop(&listener, &app));
    let stop = tokio::select! {
        stop = shutdown => stop,
        _ = &mut accepting => Stop::Immediate,
    };
    let (phase, deadline) = match stop {
        Stop::Drain => {
            let window = app.config.drain_window;
            info!(
                ?window,
                "draining: closing sockets with 1012 over the window"
            );
            (
                Phase::Draining {
                    started: std::time::Instant::now(),
                    window,
                },
                window + app.config.shutdown_timeout,
            )
        }
        Stop::Immediate => {
            info!("stopping: closing sockets with 1001");
            (Phase::Stopping, app.config.shutdown_timeout)
        }
    };
    app.phase.send_replace(phase);
    let mut sessions = app.sessions.subscribe();
    let drained = async { sessions.wait_for(|n| *n == 0).await.is_ok() };
    tokio::select! {
        // Keep answering health checks (503) and refusing upgrades meanwhile.
        _ = &mut accepting => {}
        r = tokio::time::timeout(deadline, drained) => {
            if r.is_err() {
                warn!(?deadline, remaining = *app.sessions.borrow(), "sessions still open at the shutdown deadline");
            }
        }
    }
    app.phase.send_replace(Phase::Stopping);
    drop(accepting);
    drop(listener);
    hub.close();
    handoff.close();
    rpc.close();
    executor.abort();
    info!("stopped");
    Ok(())
}

/// Spawns one connection's task. A plain function, so that the deep
/// future of the HTTP routes is laid out once, in this crate (under its
/// `recursion_limit`), rather than in every crate that calls the generic
/// [`run`] (each test binary).
#[inline(never)]
fn spawn_connection(stream: TcpStream, peer: SocketAddr, app: Arc<App>) {
    tokio::spawn(serve_connection(stream, peer, app));
}

/// Accepts until cancelled (the caller drops it).
async fn accept_loop(listener: &TcpListener, app: &Arc<App>) {
    let mut backoff = Duration::from_millis(5);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                spawn_connection(stream, peer, app.clone());
            }
            Err(e) => {
                error!(cause = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

/// One line saying which protections are on, logged at start-up: an
/// operator sees at once whether this node is open (no token, open publish).
pub fn protections(c: &Config) -> String {
    let auth = match &c.jwt_key {
        Some(key) => format!("jwt {:?}", key.algorithm()),
        None => "none (anyone may connect)".to_owned(),
    };
    let or_off = |v: Option<std::num::NonZeroUsize>| v.map_or("off".to_owned(), |n| n.to_string());
    format!(
        "protections: auth={auth} api_key={} origins={} require_origin={} acl={} authz={} \
         max_connections={} max_pending_connections={} max_connections_per_ip={} \
         new_connections_per_ip_per_sec={} trusted_proxies={} http_header_timeout_ms={} \
         http_body_timeout_ms={} client_publish={}",
        if c.api_key.is_some() {
            "on"
        } else {
            "off (publish is open)"
        },
        c.allowed_origins
            .as_ref()
            .map_or("any".to_owned(), |o| o.join(",")),
        c.require_origin,
        c.allow.as_ref().map_or("off".to_owned(), |a| format!(
            "WSGATE_ALLOW={}",
            a.join(",")
        )),
        c.auth_url
            .as_ref()
            .map_or("off".to_owned(), |u| u.to_string()),
        c.max_connections,
        c.max_pending_connections,
        or_off(c.max_connections_per_ip),
        or_off(c.new_connections_per_ip_per_sec),
        c.trusted_proxies.len(),
        c.http_header_timeout.as_millis(),
        c.http_body_timeout.as_millis(),
        if c.client_publish.is_empty() {
            "off".to_owned()
        } else {
            c.client_publish.join(",")
        },
    )
}

/// Serves HTTP on one connection until it ends, is upgraded, or shutdown.
///
/// First the connection is admitted as pending (see [`crate::pending`]): it
/// takes a place of its address (unless it comes from a trusted proxy) and
/// a node-wide pending place, or is answered 429/503 and closed. hyper then
/// reads requests under `WSGATE_HTTP_HEADER_TIMEOUT_MS`, which runs whenever
/// it waits for a request head: on a new connection, mid-headers, and
/// between keep-alive requests.
async fn serve_connection(stream: TcpStream, peer: SocketAddr, app: Arc<App>) {
    let _ = stream.set_nodelay(true);
    let proxy = app
        .config
        .trusted_proxies
        .iter()
        .any(|n| n.contains(peer.ip()));
    let ip_slot = if proxy {
        None
    } else {
        match app.ip_limits.admit(peer.ip()) {
            Ok(slot) => Some(slot),
            Err(refusal) => {
                app.metrics
                    .refused
                    .with_label_values(&[refusal.metric_reason()])
                    .inc();
                debug!(%peer, cause = %refusal, "connection refused: per-address limit");
                let error = refusal.to_string();
                app.pending
                    .refuse(stream, "429 Too Many Requests", &error, true)
                    .await;
                return;
            }
        }
    };
    let Some(slot) = app.pending.admit(peer, ip_slot) else {
        app.metrics
            .refused
            .with_label_values(&["max_pending"])
            .inc();
        debug!(%peer, "connection refused: too many pending connections");
        app.pending
            .refuse(
                stream,
                "503 Service Unavailable",
                "too many connections being set up on this node: try again",
                true,
            )
            .await;
        return;
    };
    let slot = Arc::new(slot);
    let mut phase = app.phase.subscribe();
    let header_timeout = app.config.http_header_timeout;
    let metrics = app.metrics.clone();
    let ending = slot.clone();
    let service = TowerToHyperService::new(warp::service(http::routes(app, slot)));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        // A streamed session ended with its client not reading: drop it.
        _ = ending.ended() => return,
        _ = crate::shutdown::stopping(&mut phase) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            metrics.http_timeouts.with_label_values(&["headers"]).inc();
        }
        debug!(%peer, cause = %e, "http connection ended with error");
    }
}
