//! Sessions that outlive their links, by key (a Bayeux clientId): where a
//! long-poll or a WebSocket naming one finds it on this node.
//!
//! Bounded like the sessions themselves: every entry belongs to a running
//! session, which holds one of `WSGATE_MAX_CONNECTIONS` places, and removes
//! its entry when it ends ([`Binding`]'s drop). Each entry is an [`Inbox`]:
//! a few links queued for the session. Not a tokio `mpsc` channel: that
//! allocates a 32-slot block and a padded header (1.8 KiB) per session
//! whatever its capacity, measured as most of a Bayeux socket's extra idle
//! memory (docs/benchmarks.md), while an empty inbox holds no buffer at all.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::link::Attach;

/// Links queued for one session before more are refused (a client has one
/// connect and a request or two in flight; more is abuse).
pub const ATTACH_CAPACITY: usize = 8;

/// The links waiting for one session; see the module docs.
#[derive(Default)]
pub struct Inbox {
    /// `None` once the session ended: nothing more is taken.
    queue: Mutex<Option<VecDeque<Attach>>>,
    ready: Notify,
}

impl Inbox {
    fn new() -> Inbox {
        Inbox {
            queue: Mutex::new(Some(VecDeque::new())),
            ready: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<VecDeque<Attach>>> {
        // Each critical section is one queue operation: a poisoned lock is
        // still consistent.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands `link` to the session without waiting; given back when the
    /// session has [`ATTACH_CAPACITY`] links queued or has ended.
    pub fn push(&self, link: Attach) -> Result<(), Attach> {
        let mut queue = self.lock();
        match queue.as_mut() {
            Some(q) if q.len() < ATTACH_CAPACITY => q.push_back(link),
            _ => return Err(link),
        }
        drop(queue);
        self.ready.notify_one();
        Ok(())
    }

    /// The next link handed over (for the session).
    pub async fn next(&self) -> Attach {
        loop {
            if let Some(link) = self.lock().as_mut().and_then(VecDeque::pop_front) {
                return link;
            }
            self.ready.notified().await;
        }
    }

    /// The session ended: later pushes are refused, and what was queued is
    /// dropped (a poll's answer channel closes, which answers it).
    fn close(&self) {
        let left = self.lock().take();
        drop(left);
    }
}

/// See the module docs. Cloning shares the map.
#[derive(Clone, Default)]
pub struct Clients {
    map: Arc<Mutex<HashMap<String, Arc<Inbox>>>>,
}

impl Clients {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Inbox>>> {
        // Each critical section is one map operation: a poisoned lock is
        // still consistent.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The session known by `key`, if it runs on this node.
    pub fn get(&self, key: &str) -> Option<Arc<Inbox>> {
        self.lock().get(key).cloned()
    }

    /// Makes a session findable by `key`, unless another one is already.
    pub fn bind(&self, key: String) -> Option<Binding> {
        let mut map = self.lock();
        if map.contains_key(&key) {
            return None;
        }
        let inbox = Arc::new(Inbox::new());
        map.insert(key.clone(), inbox.clone());
        Some(Binding {
            clients: self.clone(),
            key,
            inbox,
        })
    }
}

/// A session's entry in [`Clients`], and its inbox; removed (and the inbox
/// closed) on drop.
pub struct Binding {
    clients: Clients,
    key: String,
    inbox: Arc<Inbox>,
}

impl Binding {
    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The links handed to this session.
    pub fn inbox(&self) -> &Inbox {
        &self.inbox
    }
}

impl Drop for Binding {
    fn drop(&mut self) {
        self.clients.lock().remove(&self.key);
        self.inbox.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::link::Poll;
    use tokio::sync::oneshot;

    fn poll(text: &str) -> Attach {
        let (respond, _) = oneshot::channel();
        Attach::Poll(Poll {
            text: text.to_owned(),
            respond,
        })
    }

    fn text(link: Attach) -> String {
        match link {
            Attach::Poll(p) => p.text,
            Attach::Socket(_, t) => t,
        }
    }

    #[tokio::test]
    async fn an_inbox_is_bounded_ordered_and_closed_with_its_binding() {
        let clients = Clients::default();
        let binding = clients.bind("k".into()).expect("a free key");
        assert!(clients.bind("k".into()).is_none(), "one session per key");
        let inbox = clients.get("k").expect("bound");
        for i in 0..ATTACH_CAPACITY {
            assert!(inbox.push(poll(&i.to_string())).is_ok());
        }
        assert!(inbox.push(poll("one too many")).is_err());
        assert_eq!(text(binding.inbox().next().await), "0");
        assert_eq!(text(binding.inbox().next().await), "1");
        drop(binding);
        assert!(clients.get("k").is_none());
        assert!(inbox.push(poll("late")).is_err(), "closed with the session");
    }
}
