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

pub mod direct;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::net::TcpStream;
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
    /// Bytes already framed (the WebSocket library's own pongs and close
    /// frames), for a direct outbox only.
    Raw(Bytes),
}

impl Item {
    /// Bytes it costs in the queue's budget.
    fn cost(&self) -> usize {
        match self {
            Item::Frame(f) => f.len(),
            Item::Raw(b) => b.len(),
            Item::Mark(_) => 0,
        }
    }
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
    /// The socket this outbox writes itself ([`direct`]), if it does.
    direct: Option<Arc<TcpStream>>,
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
    /// Direct outboxes: bytes of the front frame already written.
    offset: usize,
    /// Direct outboxes: the socket took less than offered; nobody writes
    /// until the session saw it writable again.
    blocked: bool,
}

impl Inner {
    /// `n` more bytes of the front went out: drops what is complete; the
    /// frames completed.
    fn consume(&mut self, mut n: usize) -> u64 {
        let mut done = 0;
        while let Some(front) = self.frames.front() {
            if matches!(front, Item::Mark(_)) {
                break; // never part of a write
            }
            let left = direct::wire_len(front) - self.offset;
            if n < left {
                self.offset += n;
                break;
            }
            n -= left;
            self.offset = 0;
            self.bytes -= front.cost();
            self.frames.pop_front();
            done += 1;
        }
        done
    }
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
    /// Queued in a direct outbox that was idle, without waking anyone: the
    /// pusher writes it ([`Outbox::write_out`]) when its batch is done.
    Deferred,
}

/// Where [`Outbox::write_out`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Out {
    /// Everything queued is written.
    Done,
    /// The socket is full: the session waits for it to drain.
    Blocked,
    /// A gap mark is at the front: the session renders it.
    Mark,
    /// The socket failed.
    Failed,
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
                offset: 0,
                blocked: false,
            }),
            ready: Notify::new(),
            overflow: Notify::new(),
            limit,
            inline: None,
            direct: None,
        }
    }

    /// An outbox that writes itself to `stream` ([`direct`]).
    pub fn direct(limit: usize, stream: Arc<TcpStream>) -> Outbox {
        Outbox {
            direct: Some(stream),
            ..Outbox::new(limit)
        }
    }

    /// The socket a direct outbox writes to.
    pub fn stream(&self) -> Option<&Arc<TcpStream>> {
        self.direct.as_ref()
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
        self.push_checked(frame, since, seq, once, false)
    }

    /// As [`Outbox::push_live`], but a direct outbox that was idle is not
    /// woken: the caller gets [`Pushed::Deferred`] and writes it with
    /// [`Outbox::write_out`] once its batch is done, so what one batch
    /// brings for a socket goes out in one write.
    pub fn push_deferred(
        &self,
        frame: Frame,
        since: &AtomicU64,
        seq: u64,
        once: Option<u64>,
    ) -> Pushed {
        self.push_checked(frame, since, seq, once, true)
    }

    fn push_checked(
        &self,
        frame: Frame,
        since: &AtomicU64,
        seq: u64,
        once: Option<u64>,
        defer: bool,
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
        let defer = defer && self.direct.is_some() && inner.frames.is_empty() && !inner.blocked;
        match self.push_item(inner, Item::Frame(frame), !defer) {
            Pushed::Queued if defer => Pushed::Deferred,
            pushed => pushed,
        }
    }

    /// Queues bytes already framed (a direct outbox's WebSocket library
    /// writes through this).
    pub fn push_raw(&self, bytes: Bytes) -> Pushed {
        if bytes.is_empty() {
            return Pushed::Queued;
        }
        let inner = self.lock();
        self.push_item(inner, Item::Raw(bytes), true)
    }

    fn push_locked(&self, inner: std::sync::MutexGuard<'_, Inner>, frame: Frame) -> Pushed {
        self.push_item(inner, Item::Frame(frame), true)
    }

    fn push_item(
        &self,
        mut inner: std::sync::MutexGuard<'_, Inner>,
        item: Item,
        wake: bool,
    ) -> Pushed {
        let len = item.cost();
        if inner.state != State::Open {
            return Pushed::Refused;
        }
        if let Some(handler) = &self.inline {
            drop(inner);
            handler(item);
            return Pushed::Queued;
        }
        if inner.bytes + len > self.limit {
            inner.state = State::Overflowed;
            // A direct outbox keeps the rest of a frame it began writing,
            // so the stream stays whole for the close frame.
            let begun = (inner.offset > 0)
                .then(|| inner.frames.pop_front())
                .flatten();
            inner.frames = VecDeque::new();
            inner.bytes = 0;
            inner.marks = 0;
            if let Some(front) = begun {
                inner.bytes = front.cost();
                inner.frames.push_back(front);
            } else {
                inner.offset = 0;
            }
            drop(inner);
            self.overflow.notify_one();
            return Pushed::Overflowed;
        }
        inner.bytes += len;
        let was_empty = inner.frames.is_empty();
        inner.frames.push_back(item);
        drop(inner);
        // Only the first frame of a batch needs to wake the writer: it takes
        // everything queued when it runs, and checks again after each write.
        if was_empty && wake {
            self.ready.notify_one();
        }
        Pushed::Queued
    }

    /// Direct outboxes: writes what is queued, from the front, until it is
    /// all written, the socket is full, or a mark comes; the frames written
    /// and where it stopped. Any thread may call it; the lock keeps the
    /// order. A socket already known to be full is not tried again until
    /// [`Outbox::unblock`].
    pub fn write_out(&self) -> (u64, Out) {
        let Some(stream) = &self.direct else {
            return (0, Out::Done);
        };
        let mut inner = self.lock();
        let mut frames = 0;
        loop {
            if inner.state != State::Open {
                return (frames, Out::Failed);
            }
            if inner.blocked {
                return (frames, Out::Blocked);
            }
            match inner.frames.front() {
                None => return (frames, Out::Done),
                Some(Item::Mark(_)) => return (frames, Out::Mark),
                Some(_) => {}
            }
            let offset = inner.offset;
            match direct::write_front(stream, inner.frames.iter(), offset) {
                Ok(0) => return (frames, Out::Failed),
                Ok(n) => frames += inner.consume(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    inner.blocked = true;
                    return (frames, Out::Blocked);
                }
                Err(_) => return (frames, Out::Failed),
            }
        }
    }

    /// Direct outboxes: the socket was seen writable: writing may go on.
    pub fn unblock(&self) {
        self.lock().blocked = false;
    }

    /// Direct outboxes: the mark at the front, taken (the session renders
    /// it and puts the notice back with [`Outbox::push_front`]).
    pub fn take_mark(&self) -> Option<NoticeKind> {
        let mut inner = self.lock();
        match inner.frames.front() {
            Some(Item::Mark(kind)) => {
                let kind = *kind;
                inner.frames.pop_front();
                inner.marks -= 1;
                Some(kind)
            }
            _ => None,
        }
    }

    /// Direct outboxes: puts a rendered notice at the front (where its mark
    /// was), within the budget like any frame.
    pub fn push_front(&self, frame: Frame) -> Pushed {
        let mut inner = self.lock();
        if inner.state != State::Open {
            return Pushed::Refused;
        }
        inner.bytes += frame.len();
        inner.frames.push_front(Item::Frame(frame));
        Pushed::Queued
    }

    /// Where it stands.
    pub fn state(&self) -> State {
        self.lock().state
    }

    /// Direct outboxes, once the session ended: an overflowed outbox (empty
    /// but for the rest of a frame it began) takes bytes again, so the close
    /// frame can follow; `false` if it was closed.
    pub fn reopen_for_close(&self) -> bool {
        let mut inner = self.lock();
        if inner.state == State::Overflowed {
            inner.state = State::Open;
        }
        inner.state == State::Open
    }

    /// Wakes the session, as a first push would.
    pub fn wake(&self) {
        self.ready.notify_one();
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
        let lens: Vec<usize> = batch.iter().map(Item::cost).collect();
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

    /// A connected loopback pair: the server side for a direct outbox.
    async fn pair() -> (Arc<TcpStream>, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Arc::new(server), client)
    }

    /// The wire form of a server text frame.
    fn wire(text: &str) -> Vec<u8> {
        let mut h = [0; 10];
        let n = direct::header(0x81, text.len(), &mut h);
        let mut v = h[..n].to_vec();
        v.extend_from_slice(text.as_bytes());
        v
    }

    async fn read_exactly(client: &mut TcpStream, n: usize) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0; n];
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            client.read_exact(&mut buf),
        )
        .await
        .expect("in time")
        .expect("read");
        buf
    }

    /// Writes `out` until it is all written, waiting for the socket.
    async fn write_all(out: &Outbox, server: &TcpStream) {
        loop {
            match out.write_out().1 {
                Out::Done => return,
                Out::Blocked => {
                    server.writable().await.unwrap();
                    out.unblock();
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn direct_writes_frames_in_order_and_stops_at_a_mark() {
        let (server, mut client) = pair().await;
        let out = Outbox::direct(1 << 20, server);
        let since = AtomicU64::new(0);
        assert_eq!(
            out.push_deferred(Frame::text("one".into()), &since, 1, None),
            Pushed::Deferred
        );
        assert_eq!(
            out.push_deferred(Frame::text("two".into()), &since, 2, None),
            Pushed::Queued
        );
        out.mark(NoticeKind::Interrupted);
        out.push(Frame::text("three".into()));
        assert_eq!(out.write_out(), (2, Out::Mark));
        assert_eq!(out.take_mark(), Some(NoticeKind::Interrupted));
        out.push_front(Frame::text("notice".into()));
        out.push_raw(Bytes::from_static(&[0x8a, 0]));
        assert_eq!(out.write_out(), (3, Out::Done));
        let mut expected = wire("one");
        expected.extend(wire("two"));
        expected.extend(wire("notice"));
        expected.extend(wire("three"));
        expected.extend([0x8a, 0]);
        assert_eq!(read_exactly(&mut client, expected.len()).await, expected);
        assert!(out.is_empty());
    }

    #[tokio::test]
    async fn a_full_socket_keeps_the_rest_and_resumes_mid_frame() {
        let (server, mut client) = pair().await;
        let out = Outbox::direct(64 << 20, server.clone());
        let text = "y".repeat(100_000);
        let mut frames = 0;
        let blocked = loop {
            out.push(Frame::text(text.clone()));
            frames += 1;
            match out.write_out() {
                (_, Out::Done) if frames < 400 => continue,
                (_, out) => break out,
            }
        };
        assert_eq!(blocked, Out::Blocked, "the kernel's buffers filled up");
        // Nobody tries a full socket until it was seen writable.
        assert_eq!(out.write_out(), (0, Out::Blocked));
        let reader = tokio::spawn(async move {
            let one = wire(&"y".repeat(100_000));
            for _ in 0..frames {
                assert_eq!(read_exactly(&mut client, one.len()).await, one);
            }
        });
        write_all(&out, &server).await;
        reader.await.unwrap();
    }

    #[tokio::test]
    async fn an_overflow_keeps_the_frame_begun_for_the_close() {
        let (server, mut client) = pair().await;
        let out = Outbox::direct(1 << 20, server.clone());
        let text = "z".repeat(200_000);
        let blocked = loop {
            if out.push(Frame::text(text.clone())) == Pushed::Overflowed {
                break false;
            }
            if out.write_out().1 == Out::Blocked {
                break true;
            }
        };
        assert!(blocked);
        while out.push(Frame::text(text.clone())) != Pushed::Overflowed {}
        assert_eq!(out.state(), State::Overflowed);
        assert!(out.reopen_for_close());
        out.push_raw(Bytes::from_static(&[0x88, 0]));
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut all = Vec::new();
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                client.read_to_end(&mut all),
            )
            .await;
            all
        });
        write_all(&out, &server).await;
        drop(out);
        drop(server);
        let all = reader.await.unwrap();
        // Whole frames, then the close frame.
        let one = wire(&text);
        assert_eq!(all.len() % one.len(), 2, "whole frames and the close");
        assert_eq!(&all[all.len() - 2..], &[0x88, 0]);
        for chunk in all[..all.len() - 2].chunks(one.len()) {
            assert_eq!(chunk, &one[..]);
        }
    }
}
