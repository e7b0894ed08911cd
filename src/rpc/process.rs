//! Service and consumer processes connected to this node: what the router
//! sends them, and the handle their connection holds.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::directory::Instance;
use super::{Event, Rpc};

/// Messages waiting for one process: the bound on the calls an instance
/// can be handed before it answers (one more is refused `Busy`), and on the
/// events and broadcasts it lags behind (beyond, they are dropped for it).
pub const MAILBOX: usize = 1024;

/// Where a call's reply goes.
#[derive(Debug, Clone)]
pub enum Origin {
    /// A caller of this node, waiting under this number.
    Local(u64),
    /// A caller of another node.
    Remote {
        /// The caller's node.
        node: Arc<str>,
        /// Its number for the call there.
        seq: u64,
    },
}

/// A call for an instance of this node.
#[derive(Debug)]
pub struct IncomingCall {
    /// Where the reply goes.
    pub origin: Origin,
    /// `service:method`.
    pub destination: String,
    /// Who calls.
    pub consumer: Option<String>,
    /// The caller's callback name.
    pub responder: Option<String>,
    /// The parameters.
    pub payload: Box<RawValue>,
    /// When the caller gives up: the instance's connection forgets the call
    /// then.
    pub deadline: Instant,
}

/// What the router sends a process.
#[derive(Debug)]
pub enum ToProcess {
    /// A call for it to answer.
    Call(IncomingCall),
    /// A frame to send as is (an event, a broadcast).
    Text(String),
}

/// One connected process, as the router knows it.
pub struct Process {
    /// Its number on this node.
    pub id: u64,
    pub(super) tx: mpsc::Sender<ToProcess>,
    /// What it registered as, once it did.
    pub(super) registered: Mutex<Option<Arc<Instance>>>,
    /// The events it subscribed to (bit [`Event::bit`]).
    pub(super) events: AtomicU8,
}

impl Process {
    /// What it registered as.
    pub fn instance(&self) -> Option<Arc<Instance>> {
        self.registered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether it asked for `event`.
    pub fn wants(&self, event: Event) -> bool {
        self.events.load(Ordering::Relaxed) & event.bit() != 0
    }
}

/// A connection's place in the router: dropping it removes the process
/// (and deregisters its instance).
pub struct ProcessHandle {
    pub(super) rpc: Rpc,
    pub(super) process: Arc<Process>,
}

impl ProcessHandle {
    /// The process.
    pub fn process(&self) -> &Arc<Process> {
        &self.process
    }

    /// From now on it receives `events` too.
    pub fn subscribe(&self, events: &[Event]) {
        let bits = events.iter().fold(0u8, |b, e| b | e.bit());
        self.process.events.fetch_or(bits, Ordering::Relaxed);
    }
}

impl Drop for ProcessHandle {
    fn drop(&mut self) {
        self.rpc.remove_process(&self.process);
    }
}
