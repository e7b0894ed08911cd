//! Stopping: the process signals, and the phase every connection watches.
//!
//! [`signal`] resolves on SIGTERM (→ [`Stop::Drain`]: what orchestrators send
//! before replacing a node) or Ctrl-C/SIGINT (→ [`Stop::Immediate`]: an
//! operator at a terminal). [`crate::server::run`] turns that into a [`Phase`]
//! on a watch channel: while draining, `/readyz` answers 503, upgrades are
//! refused, and each session closes with 1012 at its own moment within the
//! drain window; when stopping, every session closes at once with 1001.

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::warn;

/// How the process was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Close sockets spread over the drain window (SIGTERM).
    Drain,
    /// Close every socket now (Ctrl-C, tests).
    Immediate,
}

/// Where the server is in its life; sessions and connections watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Serving.
    Running,
    /// Closing sessions with 1012, each at `started + window × (its slot)`.
    Draining {
        /// When the drain began.
        started: Instant,
        /// How long the drain lasts.
        window: Duration,
    },
    /// Closing everything now with 1001.
    Stopping,
}

impl Phase {
    /// When a session with `id` should close during a drain: ids are spread
    /// over the window by the golden-ratio sequence, which fills it evenly
    /// whatever the ids are, without counting sessions.
    pub fn close_at(&self, id: u64) -> Option<Instant> {
        match *self {
            Phase::Running => None,
            Phase::Stopping => Some(Instant::now()),
            Phase::Draining { started, window } => {
                let slot = (id as f64 * 0.618_033_988_749_895).fract();
                Some(started + window.mul_f64(slot))
            }
        }
    }
}

/// Resolves when the process is asked to stop, saying how.
pub async fn signal() -> Stop {
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
        _ = ctrl_c => Stop::Immediate,
        _ = term => Stop::Drain,
    }
}

/// Resolves once the phase is [`Phase::Stopping`] or the sender is gone.
pub async fn stopping(rx: &mut watch::Receiver<Phase>) {
    let _ = rx.wait_for(|p| *p == Phase::Stopping).await;
}

/// Resolves once the phase leaves [`Phase::Running`] (or the sender is gone).
pub async fn leaving_running(rx: &mut watch::Receiver<Phase>) {
    let _ = rx.wait_for(|p| *p != Phase::Running).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_slots_spread_evenly_over_the_window() {
        let started = Instant::now();
        let window = Duration::from_secs(10);
        let phase = Phase::Draining { started, window };
        let mut per_second = [0u32; 10];
        for id in 1..=1000u64 {
            let at = phase.close_at(id).unwrap() - started;
            assert!(at < window);
            per_second[at.as_secs() as usize] += 1;
        }
        for n in per_second {
            assert!((90..=110).contains(&n), "{per_second:?}");
        }
        assert_eq!(Phase::Running.close_at(1), None);
    }
}
