//! This node's sessions by user (the token's `sub`), and the executor of the
//! operator's orders on them (`POST /disconnect`, `POST /unsubscribe`).
//!
//! A session registers its inbox ([`super::Inbox`]) under its subject when
//! it gets an identity (at connect, on a Bayeux handshake, on adoption from
//! another node) and unregisters when it ends ([`Registration`]'s drop, or
//! [`super::Session::leave`]): the map holds one entry per live
//! authenticated session, so it is bounded as the sessions are.
//!
//! Every node executes each order on its own sessions ([`serve`]): it
//! hands each session of the user a [`Control`], waits a short while
//! ([`ACT_TIMEOUT`]) for each to say whether it acted, and answers the
//! order with that count. A session whose inbox is full (64 messages not
//! yet read) is not waited for and not counted. No lock is held across an
//! await: the inboxes are copied out first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use tokio::sync::oneshot;

use super::control::{Control, InboxSender};
use crate::rpc::{NodeCommand, NodeOrder, NodeOrders};

/// Close code of a connection the operator disconnected (`POST
/// /disconnect`); documented in `docs/protocol.md`.
pub const CLOSE_DISCONNECTED: u16 = 4010;
/// Close reason of a connection the operator disconnected.
pub const DISCONNECTED: &str = "disconnected by the server";
/// What a client is told of a subscription the operator ended (`POST
/// /unsubscribe`).
pub const UNSUBSCRIBED: &str = "unsubscribed by the server";

/// How long a node waits for its sessions to say they acted on an order:
/// well within the second the router gives every node to answer.
pub const ACT_TIMEOUT: Duration = Duration::from_millis(500);

/// Orders one node executes at once; more wait in the (bounded) order
/// channel.
pub const ORDERS_AT_ONCE: usize = 16;

/// One registered session.
struct Entry {
    /// The hub's id of the session (unique per process).
    id: u64,
    inbox: InboxSender,
}

/// See the module docs. Cloning shares the map.
#[derive(Clone, Default)]
pub struct Users {
    map: Arc<Mutex<HashMap<String, Vec<Entry>>>>,
}

impl Users {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Vec<Entry>>> {
        // Each critical section is one map operation: a poisoned lock is
        // still consistent.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers session `id` of `user`, reachable through `inbox`, until
    /// the returned registration is dropped.
    pub fn register(&self, user: &str, id: u64, inbox: InboxSender) -> Registration {
        self.lock()
            .entry(user.to_owned())
            .or_default()
            .push(Entry { id, inbox });
        Registration {
            users: self.clone(),
            user: user.to_owned(),
            id,
        }
    }

    /// The inboxes of `user`'s sessions on this node, copied out.
    fn inboxes(&self, user: &str) -> Vec<InboxSender> {
        self.lock()
            .get(user)
            .map(|entries| entries.iter().map(|e| e.inbox.clone()).collect())
            .unwrap_or_default()
    }

    /// How many sessions of `user` are registered on this node.
    pub fn sessions_of(&self, user: &str) -> usize {
        self.lock().get(user).map_or(0, Vec::len)
    }

    /// How many users have a session on this node.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no session is registered.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn unregister(&self, user: &str, id: u64) {
        let mut map = self.lock();
        if let Some(entries) = map.get_mut(user) {
            entries.retain(|e| e.id != id);
            if entries.is_empty() {
                map.remove(user);
            }
        }
    }
}

/// A session's entry in [`Users`]; removed on drop.
pub struct Registration {
    users: Users,
    user: String,
    id: u64,
}

impl Registration {
    /// The user it is registered under.
    pub fn user(&self) -> &str {
        &self.user
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.users.unregister(&self.user, self.id);
    }
}

/// Acts on `command` for this node's sessions of its user: how many acted
/// (closed, or held the subscription and ended it) within [`ACT_TIMEOUT`].
pub async fn act(users: &Users, command: &NodeCommand) -> u64 {
    let user = match command {
        NodeCommand::Disconnect { user } | NodeCommand::Unsubscribe { user, .. } => user,
    };
    let mut answers = Vec::new();
    for inbox in users.inboxes(user) {
        let (done, answer) = oneshot::channel();
        let control = match command {
            NodeCommand::Disconnect { .. } => Control::Close {
                code: CLOSE_DISCONNECTED,
                reason: DISCONNECTED.to_owned(),
                done: Some(done),
            },
            NodeCommand::Unsubscribe { topic, .. } => Control::Revoke {
                topic: topic.clone(),
                reason: UNSUBSCRIBED.to_owned(),
                done: Some(done),
            },
        };
        // Full: the session is not reading its inbox; not counted.
        if inbox.try_send(control).is_ok() {
            answers.push(answer);
        }
    }
    let deadline = tokio::time::Instant::now() + ACT_TIMEOUT;
    let mut acted = 0;
    for answer in answers {
        // Past the deadline, an answer already given still counts.
        if let Ok(Ok(true)) = tokio::time::timeout_at(deadline, answer).await {
            acted += 1;
        }
    }
    acted
}

/// Executes one order on this node's sessions and answers it with the count.
pub async fn execute(users: Users, order: NodeOrder) {
    let acted = act(&users, &order.command).await;
    // The router gave up waiting: nobody to tell.
    let _ = order.done.send(acted);
}

/// Executes the orders for this node's sessions until the router stops
/// sending them, [`ORDERS_AT_ONCE`] at a time.
pub async fn serve(users: Users, mut orders: NodeOrders) {
    let mut running = FuturesUnordered::new();
    loop {
        tokio::select! {
            order = orders.recv(), if running.len() < ORDERS_AT_ONCE => match order {
                Some(order) => running.push(execute(users.clone(), order)),
                None => break,
            },
            Some(()) = running.next(), if !running.is_empty() => {}
        }
    }
    while running.next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::Topic;
    use crate::session::control::Inbox;
    use bytes::Bytes;
    use tokio::sync::mpsc;

    #[test]
    fn registrations_are_removed_on_drop() {
        let users = Users::default();
        let mut inbox = Inbox::default();
        let tx = inbox.sender();
        let a = users.register("alice", 1, tx.clone());
        let b = users.register("alice", 2, tx.clone());
        let c = users.register("bob", 3, tx);
        assert_eq!((users.len(), users.sessions_of("alice")), (2, 2));
        drop(a);
        assert_eq!(users.sessions_of("alice"), 1);
        drop(b);
        drop(c);
        assert!(users.is_empty());
    }

    #[tokio::test]
    async fn orders_reach_the_users_sessions_and_count_those_that_acted() {
        let users = Users::default();
        let (mut rx1, mut rx2, mut rx3) = (Inbox::default(), Inbox::default(), Inbox::default());
        let (alice1, alice2, bob) = (rx1.sender(), rx2.sender(), rx3.sender());
        let _r1 = users.register("alice", 1, alice1);
        let _r2 = users.register("alice", 2, alice2);
        let _r3 = users.register("bob", 3, bob);
        let topic = Topic::Channel(Bytes::from_static(b"news"));
        // Session 1 held it, session 2 did not.
        let answering = tokio::spawn(async move {
            for (rx, held) in [(&mut rx1, true), (&mut rx2, false)] {
                match rx.recv().await {
                    Control::Revoke {
                        topic,
                        reason,
                        done: Some(done),
                    } => {
                        assert_eq!(topic, Topic::Channel(Bytes::from_static(b"news")));
                        assert_eq!(reason, UNSUBSCRIBED);
                        let _ = done.send(held);
                    }
                    other => panic!("{other:?}"),
                }
            }
        });
        let command = NodeCommand::Unsubscribe {
            user: "alice".into(),
            topic,
        };
        assert_eq!(act(&users, &command).await, 1);
        assert!(answering.await.is_ok());
        assert!(rx3.try_recv().is_none(), "bob is not alice");
        // Nobody answers in time: nothing counted, after the timeout.
        tokio::time::pause();
        let disconnect = NodeCommand::Disconnect { user: "bob".into() };
        assert_eq!(act(&users, &disconnect).await, 0);
        match rx3.try_recv() {
            Some(Control::Close { code, reason, .. }) => {
                assert_eq!((code, &*reason), (CLOSE_DISCONNECTED, DISCONNECTED))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            act(
                &users,
                &NodeCommand::Disconnect {
                    user: "carol".into()
                }
            )
            .await,
            0
        );
    }

    #[tokio::test]
    async fn an_order_is_answered_with_the_count() {
        let users = Users::default();
        let mut rx = Inbox::default();
        let _r = users.register("alice", 1, rx.sender());
        tokio::spawn(async move {
            if let Control::Close { done: Some(d), .. } = rx.recv().await {
                let _ = d.send(true);
            }
        });
        let (orders_tx, orders) = mpsc::channel(4);
        let server = tokio::spawn(serve(users, orders));
        let (done, count) = oneshot::channel();
        let order = NodeOrder {
            command: NodeCommand::Disconnect {
                user: "alice".into(),
            },
            done,
        };
        assert!(orders_tx.send(order).await.is_ok());
        assert_eq!(count.await, Ok(1));
        drop(orders_tx);
        assert!(server.await.is_ok(), "serve ends with its orders");
    }
}
