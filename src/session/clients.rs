//! Sessions that outlive their links, by key (a Bayeux clientId): where a
//! long-poll or a WebSocket naming one finds it on this node.
//!
//! Bounded like the sessions themselves: every entry belongs to a running
//! session, which holds one of `WSGATE_MAX_CONNECTIONS` places, and removes
//! its entry when it ends ([`Binding`]'s drop).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::link::Attach;

/// Links queued for one session before a sender waits (a client has one
/// connect and a request or two in flight; more is abuse).
pub const ATTACH_CAPACITY: usize = 8;

/// See the module docs. Cloning shares the map.
#[derive(Clone, Default)]
pub struct Clients {
    map: Arc<Mutex<HashMap<String, mpsc::Sender<Attach>>>>,
}

impl Clients {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<Attach>>> {
        // Each critical section is one map operation: a poisoned lock is
        // still consistent.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The session known by `key`, if it runs on this node.
    pub fn get(&self, key: &str) -> Option<mpsc::Sender<Attach>> {
        self.lock().get(key).cloned()
    }

    /// Whether a session is known by `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.lock().contains_key(key)
    }

    /// How many sessions are known.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes a session findable by `key`, unless another one is already.
    pub fn bind(&self, key: String, to: mpsc::Sender<Attach>) -> Option<Binding> {
        let mut map = self.lock();
        if map.contains_key(&key) {
            return None;
        }
        map.insert(key.clone(), to);
        Some(Binding {
            clients: self.clone(),
            key,
        })
    }
}

/// A session's entry in [`Clients`]; removed on drop.
pub struct Binding {
    clients: Clients,
    key: String,
}

impl Binding {
    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl Drop for Binding {
    fn drop(&mut self) {
        self.clients.lock().remove(&self.key);
    }
}
