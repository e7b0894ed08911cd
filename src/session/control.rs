//! What reaches a session from outside its link: orders of the operator API
//! (close, end a subscription) and the lines of the TCP backends it opened.
//!
//! A session's [`Inbox`] is created on first use (a session nobody ever
//! addresses keeps no channel), is bounded ([`INBOX_CAPACITY`]) and is read
//! by the session's own loop, so everything it carries is rendered by the
//! session's conversation in order with the rest of its answers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc::error::{SendError, TrySendError};
use tokio::sync::{oneshot, Notify};

use crate::broker::Topic;

/// Messages waiting for one session; a sender that finds it full waits (a
/// TCP backend's reader) or gives up (an operator order: then counted as not
/// delivered).
pub const INBOX_CAPACITY: usize = 64;

/// One message for a session.
#[derive(Debug)]
pub enum Control {
    /// Close the connection (the dialect's close, or its end of session).
    Close {
        /// WebSocket close code.
        code: u16,
        /// Close reason.
        reason: String,
        /// Told `true` once the session is closing.
        done: Option<oneshot::Sender<bool>>,
    },
    /// End this subscription, telling the client (`unsubscribed`).
    Revoke {
        /// The subscription.
        topic: Topic,
        /// Why, as the client is told.
        reason: String,
        /// Told whether the session held it.
        done: Option<oneshot::Sender<bool>>,
    },
    /// A line from the TCP backend of `service`, for the client.
    ServiceData {
        /// The service.
        service: String,
        /// Which of the session's connections to it read the line: one
        /// closed and opened again is a new one, and what the old one left
        /// in the inbox is dropped.
        line: u64,
        /// The line, without its end.
        data: String,
    },
    /// The TCP backend of `service` went away.
    ServiceEnded {
        /// The service.
        service: String,
        /// Which connection ended (see `ServiceData`).
        line: u64,
        /// Why, as the client is told.
        reason: String,
    },
}

/// A session's inbox: lazily created, see the module docs. A queue behind
/// a plain mutex and two notifications rather than a tokio channel: an
/// authenticated session creates it at once (the operator API must reach
/// it), and a channel's first block costs kilobytes per socket, this about a
/// hundred bytes.
#[derive(Default)]
pub struct Inbox {
    shared: Option<Arc<Shared>>,
}

struct Shared {
    /// A plain mutex: each critical section is a push or a pop.
    queue: Mutex<Queue>,
    /// Wakes the session when something was queued.
    ready: Notify,
    /// Wakes senders waiting for room (or for the end).
    room: Notify,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Control>,
    /// The session ended: nothing more is taken.
    closed: bool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The sending side of a session's [`Inbox`]; clones share it.
#[derive(Clone)]
pub struct InboxSender {
    shared: Arc<Shared>,
}

impl InboxSender {
    /// Queues `control` if there is room: `Full` when [`INBOX_CAPACITY`]
    /// messages wait, `Closed` when the session has ended.
    pub fn try_send(&self, control: Control) -> Result<(), TrySendError<Control>> {
        let mut queue = self.shared.lock();
        if queue.closed {
            return Err(TrySendError::Closed(control));
        }
        if queue.items.len() >= INBOX_CAPACITY {
            return Err(TrySendError::Full(control));
        }
        queue.items.push_back(control);
        drop(queue);
        self.shared.ready.notify_one();
        Ok(())
    }

    /// Queues `control`, waiting for room; an error once the session has
    /// ended.
    pub async fn send(&self, mut control: Control) -> Result<(), SendError<Control>> {
        loop {
            let room = self.shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.try_send(control) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(c)) => return Err(SendError(c)),
                Err(TrySendError::Full(c)) => control = c,
            }
            room.await;
        }
    }
}

impl Inbox {
    /// A sender to this session, creating the inbox on first use.
    pub fn sender(&mut self) -> InboxSender {
        let shared = self.shared.get_or_insert_with(|| {
            Arc::new(Shared {
                queue: Mutex::default(),
                ready: Notify::new(),
                room: Notify::new(),
            })
        });
        InboxSender {
            shared: shared.clone(),
        }
    }

    /// The next message if one waits (without waiting).
    pub fn try_recv(&mut self) -> Option<Control> {
        let shared = self.shared.as_ref()?;
        let next = shared.lock().items.pop_front();
        if next.is_some() {
            shared.room.notify_waiters();
        }
        next
    }

    /// The next message; pending forever while there is no inbox.
    pub async fn recv(&mut self) -> Control {
        let Some(shared) = self.shared.as_ref() else {
            return std::future::pending().await;
        };
        loop {
            let ready = shared.ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            let next = shared.lock().items.pop_front();
            if let Some(control) = next {
                shared.room.notify_waiters();
                return control;
            }
            ready.await;
        }
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        if let Some(shared) = &self.shared {
            let mut queue = shared.lock();
            queue.closed = true;
            queue.items.clear();
            drop(queue);
            shared.room.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Control {
        Control::ServiceEnded {
            service: n.to_string(),
            reason: String::new(),
            line: 0,
        }
    }

    #[tokio::test]
    async fn bounded_in_order_and_closed_with_the_session() {
        let mut inbox = Inbox::default();
        let tx = inbox.sender();
        for n in 0..INBOX_CAPACITY {
            assert!(tx.try_send(data(n)).is_ok());
        }
        assert!(matches!(tx.try_send(data(99)), Err(TrySendError::Full(_))));
        // A waiting sender gets room once the session takes one.
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(data(100)).await.is_ok() }
        });
        let first = inbox.recv().await;
        assert!(matches!(first, Control::ServiceEnded { ref service, .. } if service == "0"));
        assert!(waiting.await.unwrap());
        drop(inbox);
        assert!(matches!(tx.try_send(data(1)), Err(TrySendError::Closed(_))));
        assert!(tx.send(data(2)).await.is_err());
    }
}
