//! The server: listener, accept loop, and the shutdown sequence.
//!
//! [`bind`] opens the listening socket with a deep backlog (tokio's default of
//! 128 drops SYNs under a connection storm). [`run`] builds the broker and the
//! hub, serves HTTP/1.1 with upgrades on every accepted connection, and on the
//! shutdown future: stops accepting, tells every session and connection to
//! close, waits for them up to `WSGATE_SHUTDOWN_TIMEOUT_MS`, then closes the
//! hub (which drops the broker).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::broker::memory::MemoryBroker;
use crate::broker::redis::{RedisBroker, RedisConfigError};
use crate::broker::{Broker, EVENT_CAPACITY};
use crate::config::Config;
use crate::http::{self, App};
use crate::hub::Hub;
use crate::metrics::Metrics;

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
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let metrics = Metrics::new();
    let (events_tx, events_rx) = mpsc::channel(EVENT_CAPACITY);
    let broker: Arc<dyn Broker> = match &config.redis_url {
        Some(url) => Arc::new(RedisBroker::start(url, events_tx, metrics.clone())?),
        None => Arc::new(MemoryBroker::new(events_tx, metrics.clone())),
    };
    info!(addr = %listener.local_addr()?, broker = broker.name(), "listening");
    let hub = Hub::start(broker, events_rx, metrics.clone());
    let (shutdown_tx, _) = watch::channel(false);
    let app = Arc::new(App {
        hub: hub.clone(),
        metrics,
        config,
        shutdown: shutdown_tx,
    });

    accept_loop(&listener, &app, shutdown).await;
    drop(listener);

    info!("shutting down: closing connections");
    app.shutdown.send_replace(true);
    let timeout = app.config.shutdown_timeout;
    if tokio::time::timeout(timeout, app.shutdown.closed())
        .await
        .is_err()
    {
        warn!(
            ?timeout,
            remaining = app.shutdown.receiver_count(),
            "connections still open at shutdown deadline"
        );
    }
    hub.close();
    info!("stopped");
    Ok(())
}

async fn accept_loop(listener: &TcpListener, app: &Arc<App>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => r,
        };
        match accepted {
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
    let mut shutdown = app.shutdown.subscribe();
    let service = TowerToHyperService::new(warp::service(http::routes(app, peer)));
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = crate::shutdown::requested(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(%peer, cause = %e, "http connection ended with error");
    }
}
