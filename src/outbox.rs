//! A connection's outbound queue, bounded in bytes.
//!
//! Producers (the hub's dispatcher, the session itself for replies) push
//! shared frames without ever waiting; the session's writer takes everything
//! queued in one go and writes it as one batch, so a burst costs one flush, not
//! one syscall per frame. When a push would pass the byte limit, the outbox
//! drops its contents, refuses all further pushes and wakes the session, which
//! closes the socket as a slow consumer: one slow client never delays another.
//!
//! Besides frames, the queue carries *marks*: "delivery was interrupted here"
//! and "delivery resumed here". The hub places one in every session's queue
//! in O(1) when the broker link drops or comes back; the session renders the
//! notice itself, from its own subscriptions, when its writer reaches the
//! mark. So an outage costs the hub one push per session, not one rendered
//! notice per subscription, and the notice still sits exactly where the gap
//! is in that client's stream.
//!
//! Deliveries are pushed with [`Outbox::push_live`], which checks the
//! subscription's start mark under the queue's lock: a session that stops the
//! subscription and then queues its unsubscribe reply can never see a delivery
//! of that topic after the reply, whatever the dispatcher was doing meanwhile,
//! and a subscription started after its reply receives only messages the node
//! received after that.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::protocol::{Frame, NoticeKind};

/// Most marks queued and not yet taken; more outages than this between two
/// writer wake-ups collapse (the session renders from its own state anyway).
const MAX_MARKS: usize = 8;

/// One queued item: a frame to write, or a place where a gap notice belongs.
#[derive(Debug, Clone)]
pub enum Item {
    /// Bytes ready for the socket.
    Frame(Frame),
    /// The session renders a gap notice of this kind here.
    Mark(NoticeKind),
}

/// See the module docs.
pub struct Outbox {
    /// Queue and accounting. A plain mutex: each critical section is a push or
    /// a swap, never an await.
    inner: Mutex<Inner>,
    /// Wakes the writer when frames arrive (one stored permit is enough: the
    /// writer takes everything queued when it wakes).
    ready: Notify,
    /// Wakes the session when the outbox overflowed, even mid-write.
    overflow: Notify,
    limit: usize,
    /// For a member that serves what it receives at once (the services
    /// router): items go to this handler, on the pusher's thread, instead of
    /// the queue, saving the hand-off to another task on every message.
    inline: Option<Inline>,
}

/// What an inline outbox calls for every item, in order. It must be short
/// and never block: it runs inside the hub's dispatcher.
pub type Inline = Box<dyn Fn(Item) + Send + Sync>;

struct Inner {
    frames: VecDeque<Item>,
    bytes: usize,
    /// Marks among `frames`.
    marks: usize,
    state: State,
    /// The publish of the last message queued with `once`.
    last_publish: u64,
}

/// Where an outbox stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Accepting frames.
    Open,
    /// A push passed the limit; the connection must be closed with 4008.
    Overflowed,
    /// The session ended; pushes are ignored.
    Closed,
}

/// Outcome of [`Outbox::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued.
    Queued,
    /// This push overflowed the limit (reported once per outbox, for counting).
    Overflowed,
    /// Not queued: the outbox had already overflowed or closed.
    Refused,
}

impl Outbox {
    /// An empty outbox holding at most `limit` bytes of frames.
    pub fn new(limit: usize) -> Outbox {
        Outbox {
            inner: Mutex::new(Inner {
                frames: VecDeque::new(),
                bytes: 0,
                marks: 0,
                state: State::Open,
                last_publish: 0,
            }),
            ready: Notify::new(),
            overflow: Notify::new(),
            limit,
            inline: None,
        }
    }

    /// An outbox that queues nothing: every frame and mark goes to
    /// `handler` as it is pushed (it never overflows).
    pub fn inline(handler: Inline) -> Outbox {
        Outbox {
            inline: Some(handler),
            ..Outbox::new(usize::MAX)
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every critical section leaves `Inner` consistent, so a poisoned lock
        // (a panic elsewhere while holding it) is safe to reuse.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether nothing is queued (frames or marks).
    pub fn is_empty(&self) -> bool {
        self.lock().frames.is_empty()
    }

    /// Queues `frame` without waiting.
    pub fn push(&self, frame: Frame) -> Pushed {
        let inner = self.lock();
        self.push_locked(inner, frame)
    }

    /// Queues delivery number `seq` unless, when the queue's lock is held,
    /// the subscription's `since` says it is not for it (not started, ended,
    /// or started after the node received this message): see the module docs.
    /// Gap notices pass `seq` [`u64::MAX`] - 1: for any live subscription.
    ///
    /// `once`: the number of the publish this message belongs to, for a
    /// connection that takes one message per publish (Bayeux: a client whose
    /// subscriptions `/foo/bar` and `/foo/*` both match gets it once). A
    /// second message of the same publish is refused.
    pub fn push_live(
        &self,
        frame: Frame,
        since: &AtomicU64,
        seq: u64,
        once: Option<u64>,
    ) -> Pushed {
        let mut inner = self.lock();
        if seq <= since.load(Ordering::Acquire) {
            return Pushed::Refused;
        }
        if let Some(publish) = once {
            if inner.last_publish == publish {
                return Pushed::Refused;
            }
            inner.last_publish = publish;
        }
        self.push_locked(inner, frame)
    }

    fn push_locked(&self, mut inner: std::sync::MutexGuard<'_, Inner>, frame: Frame) -> Pushed {
        let len = frame.len();
        if inner.state != State::Open {
            return Pushed::Refused;
        }
        if let Some(handler) = &self.inline {
            drop(inner);
            handler(Item::Frame(frame));
            return Pushed::Queued;
        }
        if inner.bytes + len > self.limit {
            inner.state = State::Overflowed;
            inner.frames = VecDeque::new();
            inner.bytes = 0;
            inner.marks = 0;
            drop(inner);
            self.overflow.notify_one();
            return Pushed::Overflowed;
        }
        inner.bytes += len;
        let was_empty = inner.frames.is_empty();
        inner.frames.push_back(Item::Frame(frame));
        drop(inner);
        // Only the first frame of a batch needs to wake the writer: it takes
        // everything queued when it runs, and checks again after each write.
        if was_empty {
            self.ready.notify_one();
        }
        Pushed::Queued
    }

    /// Places a gap mark (costs no bytes; at most [`MAX_MARKS`] wait at once,
    /// and one of a kind right after another of the same kind is redundant).
    pub fn mark(&self, kind: NoticeKind) {
        let mut inner = self.lock();
        if inner.state != State::Open {
            return;
        }
        if let Some(handler) = &self.inline {
            drop(inner);
            handler(Item::Mark(kind));
            return;
        }
        if inner.marks >= MAX_MARKS {
            return;
        }
        if matches!(inner.frames.back(), Some(Item::Mark(k)) if *k == kind) {
            return;
        }
        inner.marks += 1;
        let was_empty = inner.frames.is_empty();
        inner.frames.push_back(Item::Mark(kind));
        drop(inner);
        if was_empty {
            self.ready.notify_one();
        }
    }

    /// Moves every queued item into `batch` (appending) and returns the state.
    pub fn take(&self, batch: &mut VecDeque<Item>) -> State {
        let mut inner = self.lock();
        if batch.is_empty() {
            std::mem::swap(&mut inner.frames, batch);
        } else {
            batch.append(&mut inner.frames);
        }
        inner.bytes = 0;
        inner.marks = 0;
        inner.state
    }

    /// Stops accepting frames and frees what is queued.
    pub fn close(&self) {
        let mut inner = self.lock();
        inner.state = State::Closed;
        inner.frames = VecDeque::new();
        inner.bytes = 0;
        inner.marks = 0;
    }

    /// Resolves when a frame may have been queued since the last [`Outbox::take`].
    pub async fn ready(&self) {
        self.ready.notified().await
    }

    /// Resolves when the outbox has overflowed.
    pub async fn overflowed(&self) {
        self.overflow.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize) -> Frame {
        Frame::text("x".repeat(n))
    }

    #[test]
    fn overflow_drops_everything_and_refuses_further_pushes() {
        let out = Outbox::new(10);
        assert_eq!(out.push(frame(6)), Pushed::Queued);
        assert_eq!(out.push(frame(4)), Pushed::Queued);
        assert_eq!(out.push(frame(1)), Pushed::Overflowed);
        assert_eq!(out.push(frame(1)), Pushed::Refused);
        let mut batch = VecDeque::new();
        assert_eq!(out.take(&mut batch), State::Overflowed);
        assert!(batch.is_empty());
    }

    #[test]
    fn take_frees_the_budget_and_keeps_order() {
        let out = Outbox::new(10);
        out.push(frame(5));
        out.push(frame(5));
        let mut batch = VecDeque::new();
        assert_eq!(out.take(&mut batch), State::Open);
        let lens: Vec<usize> = batch
            .iter()
            .map(|i| match i {
                Item::Frame(f) => f.len(),
                Item::Mark(_) => 0,
            })
            .collect();
        assert_eq!(lens, [5, 5]);
        out.push(frame(1));
        out.take(&mut batch);
        assert_eq!(batch.len(), 3);
        assert_eq!(out.push(frame(10)), Pushed::Queued);
    }

    #[test]
    fn a_dead_subscription_gets_nothing() {
        let out = Outbox::new(10);
        let since = AtomicU64::new(u64::MAX);
        assert_eq!(out.push_live(frame(1), &since, 5, None), Pushed::Refused);
        since.store(5, Ordering::Release);
        assert_eq!(
            out.push_live(frame(1), &since, 5, None),
            Pushed::Refused,
            "received before the start"
        );
        assert_eq!(out.push_live(frame(1), &since, 6, None), Pushed::Queued);
    }

    #[test]
    fn marks_keep_their_place_and_are_bounded() {
        let out = Outbox::new(10);
        out.push(frame(1));
        out.mark(NoticeKind::Interrupted);
        out.mark(NoticeKind::Interrupted);
        out.push(frame(2));
        out.mark(NoticeKind::Resumed);
        for _ in 0..20 {
            out.mark(NoticeKind::Interrupted);
            out.mark(NoticeKind::Resumed);
        }
        let mut batch = VecDeque::new();
        out.take(&mut batch);
        assert!(matches!(batch[0], Item::Frame(_)));
        assert!(matches!(batch[1], Item::Mark(NoticeKind::Interrupted)));
        assert!(matches!(batch[2], Item::Frame(_)));
        assert!(matches!(batch[3], Item::Mark(NoticeKind::Resumed)));
        assert_eq!(batch.len(), 2 + MAX_MARKS);
    }

    #[test]
    fn closed_refuses() {
        let out = Outbox::new(10);
        out.close();
        assert_eq!(out.push(frame(1)), Pushed::Refused);
    }

    #[tokio::test]
    async fn push_wakes_the_writer() {
        let out = std::sync::Arc::new(Outbox::new(10));
        let o = out.clone();
        let waiter = tokio::spawn(async move { o.ready().await });
        out.push(frame(1));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
