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

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::broker::memory::MemoryBroker;
use crate::broker::redis::{RedisBroker, RedisConfigError, RedisOptions};
use crate::broker::{Broker, EVENT_CAPACITY};
use crate::config::Config;
use crate::http::{self, App};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::shutdown::{Phase, Stop};

/// Pending connections the kernel queues for us.
const BACKLOG: i32 = 4096;
/// Longest pause after a failed accept (e.g. out of file descriptors).
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

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

/// Serves until `shutdown` resolves, then shuts down in order.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = Stop>,
) -> Result<(), ServerError> {
    let metrics = Metrics::new();
    let (events_tx, events_rx) = mpsc::channel(EVENT_CAPACITY);
    let broker: Arc<dyn Broker> = match &config.redis_url {
        Some(url) => {
            let options = RedisOptions {
                probe_interval: config.redis_probe_interval,
                probe_timeout: config.redis_probe_timeout,
                backoff_max: config.redis_backoff_max,
                max_redis_patterns: config.max_redis_patterns.get(),
            };
            Arc::new(RedisBroker::start(
                url,
                events_tx,
                metrics.clone(),
                options,
            )?)
        }
        None => Arc::new(MemoryBroker::new(events_tx, metrics.clone())),
    };
    info!(addr = %listener.local_addr()?, broker = broker.name(), "listening");
    let hub = Hub::start(broker, events_rx, metrics.clone());
    hub.set_max_patterns(config.max_patterns.get());
    let app = Arc::new(App::new(hub.clone(), metrics, config));

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
    info!("stopped");
    Ok(())
}

/// Accepts until cancelled (the caller drops it).
async fn accept_loop(listener: &TcpListener, app: &Arc<App>) {
    let mut backoff = Duration::from_millis(5);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                tokio::spawn(serve_connection(stream, peer, app.clone()));
            }
            Err(e) => {
                error!(cause = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

/// Serves HTTP on one connection until it ends, is upgraded, or shutdown.
async fn serve_connection(stream: TcpStream, peer: SocketAddr, app: Arc<App>) {
    let _ = stream.set_nodelay(true);
    let mut phase = app.phase.subscribe();
    let service = TowerToHyperService::new(warp::service(http::routes(app, peer)));
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = crate::shutdown::stopping(&mut phase) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(%peer, cause = %e, "http connection ended with error");
    }
}
