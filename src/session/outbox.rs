//! A connection's outbound queue, bounded in bytes.
//!
//! Producers (the hub's dispatcher, the session itself for replies) push
//! shared frames without ever waiting; the session's writer takes everything
//! queued in one go and writes it as one batch, so a burst costs one flush, not
//! one syscall per frame. When a push would pass the byte limit, the outbox
//! drops its contents, refuses all further pushes and wakes the session, which
//! closes the socket as a slow consumer: one slow client never delays another.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::protocol::Frame;

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
}

struct Inner {
    frames: VecDeque<Frame>,
    bytes: usize,
    state: State,
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
                state: State::Open,
            }),
            ready: Notify::new(),
            overflow: Notify::new(),
            limit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every critical section leaves `Inner` consistent, so a poisoned lock
        // (a panic elsewhere while holding it) is safe to reuse.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `frame` without waiting.
    pub fn push(&self, frame: Frame) -> Pushed {
        let len = frame.len();
        let mut inner = self.lock();
        if inner.state != State::Open {
            return Pushed::Refused;
        }
        if inner.bytes + len > self.limit {
            inner.state = State::Overflowed;
            inner.frames = VecDeque::new();
            inner.bytes = 0;
            drop(inner);
            self.overflow.notify_one();
            return Pushed::Overflowed;
        }
        inner.bytes += len;
        let was_empty = inner.frames.is_empty();
        inner.frames.push_back(frame);
        drop(inner);
        // Only the first frame of a batch needs to wake the writer: it takes
        // everything queued when it runs, and checks again after each write.
        if was_empty {
            self.ready.notify_one();
        }
        Pushed::Queued
    }

    /// Moves every queued frame into `batch` (appending) and returns the state.
    pub fn take(&self, batch: &mut VecDeque<Frame>) -> State {
        let mut inner = self.lock();
        if batch.is_empty() {
            std::mem::swap(&mut inner.frames, batch);
        } else {
            batch.append(&mut inner.frames);
        }
        inner.bytes = 0;
        inner.state
    }

    /// Stops accepting frames and frees what is queued.
    pub fn close(&self) {
        let mut inner = self.lock();
        inner.state = State::Closed;
        inner.frames = VecDeque::new();
        inner.bytes = 0;
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
    use tokio_tungstenite::tungstenite::Message;

    fn frame(n: usize) -> Frame {
        Message::Text("x".repeat(n).into())
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
        assert_eq!(batch.iter().map(|f| f.len()).collect::<Vec<_>>(), [5, 5]);
        out.push(frame(1));
        out.take(&mut batch);
        assert_eq!(batch.len(), 3);
        assert_eq!(out.push(frame(10)), Pushed::Queued);
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
