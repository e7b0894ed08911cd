//! What reaches a session from outside its link: orders of the operator API
//! (close, end a subscription) and the lines of the TCP backends it opened.
//!
//! A session's [`Inbox`] is created on first use (a session nobody ever
//! addresses keeps no channel), is bounded ([`INBOX_CAPACITY`]) and is read
//! by the session's own loop, so everything it carries is rendered by the
//! session's conversation in order with the rest of its answers.

use tokio::sync::{mpsc, oneshot};

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

/// A session's inbox: lazily created, see the module docs.
#[derive(Default)]
pub struct Inbox {
    channel: Option<(mpsc::Sender<Control>, mpsc::Receiver<Control>)>,
}

impl Inbox {
    /// A sender to this session, creating the channel on first use.
    pub fn sender(&mut self) -> mpsc::Sender<Control> {
        let (tx, _) = self
            .channel
            .get_or_insert_with(|| mpsc::channel(INBOX_CAPACITY));
        tx.clone()
    }

    /// The next message; pending forever while there is no channel.
    pub async fn recv(&mut self) -> Control {
        match self.channel.as_mut() {
            // The session holds a sender itself, so this never ends.
            Some((_, rx)) => match rx.recv().await {
                Some(control) => control,
                None => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }
}
