//! The process's stop signal.
//!
//! [`signal`] resolves on Ctrl-C (SIGINT) or SIGTERM, whichever comes first;
//! `main` hands it to [`crate::server::run`], which then stops accepting,
//! tells every session to close with 1001, and waits (bounded) for them.

use tracing::warn;

/// Resolves when the process is asked to stop.
pub async fn signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            warn!(cause = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                warn!(cause = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// Resolves once `rx` turns `true`, or its sender is gone (which also means
/// the server is stopping). Owns nothing across the await, so it is `Send`.
pub async fn requested(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}
