//! Connections accepted but not (yet) upgraded to a WebSocket.
//!
//! Every accepted TCP connection is *pending* until it becomes a session:
//! while hyper reads a request head, a `/publish` body, or waits between
//! keep-alive requests. Pending connections cost a file descriptor and up to
//! a read buffer each and are bounded three ways:
//!
//! - time: hyper's header-read deadline (`WSGATE_HTTP_HEADER_TIMEOUT_MS`,
//!   which also runs while a kept-alive connection waits for its next
//!   request) and the publish body deadline (`WSGATE_HTTP_BODY_TIMEOUT_MS`);
//! - node-wide: at most `WSGATE_MAX_PENDING_CONNECTIONS` at once ([`Pending`]);
//!   a connection beyond it is answered 503 and closed as it is accepted;
//! - per address: a pending connection holds one of its address's
//!   `WSGATE_MAX_CONNECTIONS_PER_IP` places ([`IpSlot`]), which the upgrade
//!   hands over to the session, so an address holds at most that many
//!   connections, upgraded or not. Connections from a trusted proxy are not
//!   counted by the proxy's own address (it carries many clients); their
//!   client is counted at the upgrade, from `X-Forwarded-For`.
//!
//! Refusals at accept time are written straight to the socket (the request
//! has not been read): one small write, then a lingering close (our side
//! shut, the client's bytes read and dropped for at most [`LINGER`]) so the
//! client reads the answer instead of a reset. At most [`MAX_LINGERING`]
//! refused connections linger at once; beyond that they are closed at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::limits::IpSlot;

/// Longest a refused connection is kept to read the client's request away.
pub const LINGER: Duration = Duration::from_millis(500);
/// Refused connections lingering at once, at most: a flood of refusals must
/// not hold file descriptors of its own.
pub const MAX_LINGERING: usize = 64;
/// Most bytes read away from a refused connection.
const LINGER_BYTES: usize = 64 * 1024;

/// The node-wide count of pending connections and its cap.
pub struct Pending {
    max: usize,
    count: Arc<AtomicUsize>,
    lingering: Arc<AtomicUsize>,
    gauge: IntGauge,
}

impl Pending {
    /// A cap of `max` pending connections, mirrored into `gauge`
    /// (`wsgate_pending_connections`).
    pub fn new(max: usize, gauge: IntGauge) -> Pending {
        gauge.set(0);
        Pending {
            max,
            count: Arc::new(AtomicUsize::new(0)),
            lingering: Arc::new(AtomicUsize::new(0)),
            gauge,
        }
    }

    /// Pending connections now.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Takes a pending place for the connection from `peer`, holding
    /// `ip_slot` (its address's place, if counted); `None` when the node is
    /// full.
    pub fn admit(&self, peer: SocketAddr, ip_slot: Option<IpSlot>) -> Option<PendingSlot> {
        let taken = self
            .count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok();
        if !taken {
            return None;
        }
        self.gauge.inc();
        Some(PendingSlot {
            peer,
            ip_slot: Mutex::new(ip_slot),
            held: Mutex::new(Some((self.count.clone(), self.gauge.clone()))),
            ended: tokio::sync::Notify::new(),
        })
    }

    /// Answers a refused connection with `status` and `{"error": error}`
    /// and closes it, lingering when the budget allows.
    pub async fn refuse(
        &self,
        stream: TcpStream,
        status: &'static str,
        error: &str,
        retry_after: bool,
    ) {
        let body = serde_json::json!({ "error": error }).to_string();
        let retry = if retry_after {
            "Retry-After: 1\r\n"
        } else {
            ""
        };
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{retry}\
             Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        // One plain non-blocking write: a fresh socket's send buffer takes
        // this small answer whole (if not, the client gets a bare close,
        // which is a refusal too). Through the std socket, because tokio's
        // `try_write` refuses before the reactor has seen the socket writable.
        let Ok(std) = stream.into_std() else {
            return;
        };
        let _ = std::io::Write::write(&mut &std, response.as_bytes());
        let lingering = self
            .lingering
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_LINGERING).then_some(n + 1)
            })
            .is_ok();
        if !lingering {
            return;
        }
        let budget = self.lingering.clone();
        tokio::spawn(async move {
            if let Ok(stream) = TcpStream::from_std(std) {
                linger(stream).await;
            }
            budget.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// Shuts our side and reads the client's bytes away until it closes, for at
/// most [`LINGER`]: closing a socket with unread input sends a reset, which
/// can destroy the answer before the client has read it.
async fn linger(mut stream: TcpStream) {
    // tokio's shutdown of a TCP stream is `shutdown(Write)`: a FIN, at once.
    let _ = stream.shutdown().await;
    let drain = async {
        let mut buf = [0u8; 4096];
        let mut total = 0;
        while total < LINGER_BYTES {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// One pending connection: its node-wide place and, if counted, its
/// address's place. Both are given back when it is dropped (the connection
/// ended) or [`promote`](PendingSlot::promote)d (it became a session).
pub struct PendingSlot {
    peer: SocketAddr,
    ip_slot: Mutex<Option<IpSlot>>,
    held: Mutex<Option<(Arc<AtomicUsize>, IntGauge)>>,
    ended: tokio::sync::Notify,
}

impl PendingSlot {
    /// The TCP peer of the connection.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Whether the connection holds its address's place (it was counted
    /// per address when accepted).
    pub fn has_ip_slot(&self) -> bool {
        self.ip_slot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Hands the address's place over to the session being created (the
    /// session then holds it for its life); `None` when the connection was
    /// not counted per address (a trusted proxy) or it was taken already.
    pub fn take_ip_slot(&self) -> Option<IpSlot> {
        self.ip_slot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// The connection is a session from now on: it leaves the pending count
    /// (its session slot bounds it instead). Idempotent.
    ///
    /// The WebSocket upgrade calls this when it admits the session. Hook for
    /// transports that hold an HTTP request open as their session (a
    /// Bayeux/CometD long-poll): call this when the held request takes its
    /// session slot, after [`take_ip_slot`](PendingSlot::take_ip_slot), so
    /// that a held poll counts as its session and not as pending.
    pub fn promote(&self) {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((count, gauge)) = held {
            count.fetch_sub(1, Ordering::AcqRel);
            gauge.dec();
        }
    }
}

impl PendingSlot {
    /// Drops the connection now, whatever hyper is doing with it: a
    /// response streamed as a session (server-sent events) whose session
    /// ended while the client stopped reading would otherwise hold it, with
    /// hyper blocked on a write, for as long as the client likes.
    pub fn end_connection(&self) {
        self.ended.notify_one();
    }

    /// Resolves once [`end_connection`](PendingSlot::end_connection) was
    /// called (the connection's task then drops it).
    pub async fn ended(&self) {
        self.ended.notified().await;
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.promote();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 1))
    }

    #[test]
    fn the_cap_holds_and_places_come_back() {
        let gauge = IntGauge::new("p", "p").unwrap();
        let p = Pending::new(2, gauge.clone());
        let a = p.admit(peer(), None).unwrap();
        let b = p.admit(peer(), None).unwrap();
        assert!(p.admit(peer(), None).is_none());
        assert_eq!((p.count(), gauge.get()), (2, 2));
        a.promote();
        a.promote();
        assert_eq!((p.count(), gauge.get()), (1, 1));
        let c = p.admit(peer(), None).unwrap();
        drop(a);
        drop((b, c));
        assert_eq!((p.count(), gauge.get()), (0, 0));
    }
}
