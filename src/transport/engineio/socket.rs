//! One Engine.IO session (a sid) as the session loop sees it: a WebSocket
//! ([`EioSocket`], a `Stream` and `Sink` of messages) whose far side is
//! whatever transport the client uses at the moment: polling requests, or
//! the WebSocket it upgraded to (or opened with).
//!
//! Between the two sides sits [`Shared`]: the packets queued for the
//! client (bounded in bytes: a full queue makes the session's writes wait,
//! so its outbox fills and a client that stops polling ends as a slow
//! consumer, close 4008), the messages the client sent (bounded too), and
//! the liveness clock: a session whose client sends no packet for
//! `pingInterval + pingTimeout` ends, as engine.io's does. The lock is
//! only ever held for a queue operation, never across an `.await`.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_util::{Sink, Stream};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::Message;

use super::packet::{self, CodecError, Kind};
use super::Sids;
use crate::protocol::Frame;

/// Which transport the client uses now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    /// Polling requests.
    Polling,
    /// Polling, while a WebSocket probe is under way.
    Upgrading,
    /// A WebSocket (after the upgrade, or from the start).
    WebSocket,
}

/// Why the client's packets were not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// A packet could not be read.
    Codec(CodecError),
    /// The session has this many bytes of messages not yet read: the client
    /// sends faster than it is served.
    Full,
}

/// What both sides share; see the module docs.
pub struct Shared {
    /// The session id.
    pub sid: String,
    state: Mutex<State>,
    /// Packets were queued for the client (a held poll or the WebSocket
    /// pump waits for this).
    pub out_ready: Notify,
    /// Silence after which the client counts as gone.
    silence: Duration,
    /// Bytes of packets queued for the client before the session waits.
    out_cap: usize,
    /// Bytes of client messages queued before more are refused.
    in_cap: usize,
    /// Whether polling responses are string payloads (`b64=1`).
    pub b64: bool,
}

struct State {
    out: VecDeque<Frame>,
    out_bytes: usize,
    inbound: VecDeque<String>,
    in_bytes: usize,
    pong_owed: bool,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
    carrier: Carrier,
    /// A poll is being held.
    polling: bool,
    /// The client closed, or went silent: the session's stream ends.
    client_closed: bool,
    /// The session ended (its close packet is queued).
    session_closed: bool,
    last_seen: Instant,
}

impl Shared {
    /// A fresh session's shared state, on `carrier`.
    pub fn new(
        sid: String,
        carrier: Carrier,
        silence: Duration,
        out_cap: usize,
        in_cap: usize,
        b64: bool,
    ) -> Shared {
        Shared {
            sid,
            state: Mutex::new(State {
                out: VecDeque::new(),
                out_bytes: 0,
                inbound: VecDeque::new(),
                in_bytes: 0,
                pong_owed: false,
                read_waker: None,
                write_waker: None,
                carrier,
                polling: false,
                client_closed: false,
                session_closed: false,
                last_seen: Instant::now(),
            }),
            out_ready: Notify::new(),
            silence,
            out_cap,
            in_cap,
            b64,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Each critical section is one queue operation: a poisoned lock is
        // still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The transport the client uses now.
    pub fn carrier(&self) -> Carrier {
        self.lock().carrier
    }

    /// Moves the client to `carrier`.
    pub fn set_carrier(&self, carrier: Carrier) {
        self.lock().carrier = carrier;
        // The pump of a fresh WebSocket drains what polling left.
        self.out_ready.notify_one();
    }

    /// Marks a poll as held; `false` when one already is (the client
    /// overlaps its polls).
    pub fn start_poll(&self) -> bool {
        let mut st = self.lock();
        !std::mem::replace(&mut st.polling, true)
    }

    /// The held poll was answered.
    pub fn end_poll(&self) {
        self.lock().polling = false;
    }

    /// Whether the session has ended (its close packet is queued).
    pub fn session_closed(&self) -> bool {
        self.lock().session_closed
    }

    /// Queues a packet for the client, beyond the bound (the transport's own
    /// answers: pongs, noops, errors; each is small and answers a packet).
    pub fn push_out(&self, frame: Frame) {
        let mut st = self.lock();
        st.out_bytes += frame.len();
        st.out.push_back(frame);
        drop(st);
        self.out_ready.notify_one();
    }

    /// Takes every packet queued for the client.
    pub fn take_out(&self) -> Vec<Frame> {
        let mut st = self.lock();
        st.out_bytes = 0;
        let frames: Vec<Frame> = st.out.drain(..).collect();
        let waker = st.write_waker.take();
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
        frames
    }

    /// The client sent these packets (one polling payload, or one WebSocket
    /// frame): all are taken, or none. A ping is answered, a message goes
    /// to the session, a close ends it.
    pub fn received(&self, packets: &[&str]) -> Result<(), Refused> {
        let mut decoded = Vec::with_capacity(packets.len());
        let mut bytes = 0;
        for p in packets {
            let p = packet::decode_packet(p).map_err(Refused::Codec)?;
            if p.kind == Kind::Message {
                bytes += p.data.len();
            }
            decoded.push(p);
        }
        let mut st = self.lock();
        st.last_seen = Instant::now();
        if st.in_bytes + bytes > self.in_cap && bytes > 0 {
            return Err(Refused::Full);
        }
        let mut pongs = 0;
        for p in decoded {
            match p.kind {
                Kind::Ping => pongs += 1,
                Kind::Message => {
                    st.in_bytes += p.data.len();
                    st.inbound.push_back(p.data.to_owned());
                }
                Kind::Close => st.client_closed = true,
                Kind::Open | Kind::Pong | Kind::Upgrade | Kind::Noop => {}
            }
        }
        for _ in 0..pongs {
            st.out_bytes += 1;
            st.out.push_back(Frame::Text("3".into()));
        }
        let waker = st.read_waker.take();
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
        if pongs > 0 {
            self.out_ready.notify_one();
        }
        Ok(())
    }

    /// The client's transport is gone for good (a WebSocket that closed
    /// after the upgrade): the session ends.
    pub fn client_gone(&self) {
        let mut st = self.lock();
        st.client_closed = true;
        let waker = st.read_waker.take();
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// The session's side; see the module docs. Dropping it (the session
/// ended) queues the close packet and forgets the sid.
pub struct EioSocket {
    shared: Arc<Shared>,
    sids: Sids,
    timer: Pin<Box<tokio::time::Sleep>>,
    armed: Option<Instant>,
}

impl EioSocket {
    /// The session's side of `shared`, registered in `sids`.
    pub fn new(shared: Arc<Shared>, sids: Sids) -> EioSocket {
        EioSocket {
            shared,
            sids,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed: None,
        }
    }

    fn close(&self) {
        let mut st = self.shared.lock();
        if st.session_closed {
            return;
        }
        st.session_closed = true;
        st.out_bytes += 1;
        st.out.push_back(Frame::Text("1".into()));
        drop(st);
        self.shared.out_ready.notify_one();
    }
}

impl Drop for EioSocket {
    fn drop(&mut self) {
        self.close();
        self.sids.remove(&self.shared.sid);
    }
}

impl Stream for EioSocket {
    type Item = Result<Message, WsError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let mut st = this.shared.lock();
        if let Some(text) = st.inbound.pop_front() {
            st.in_bytes = st.in_bytes.saturating_sub(text.len());
            return Poll::Ready(Some(Ok(Message::Text(text.into()))));
        }
        if std::mem::take(&mut st.pong_owed) {
            return Poll::Ready(Some(Ok(Message::Pong(bytes::Bytes::new()))));
        }
        if st.client_closed || st.session_closed {
            return Poll::Ready(None);
        }
        let deadline = st.last_seen + this.shared.silence;
        st.read_waker = Some(cx.waker().clone());
        drop(st);
        if Instant::now() >= deadline {
            this.shared.client_gone();
            return Poll::Ready(None);
        }
        if this.armed != Some(deadline) {
            this.armed = Some(deadline);
            this.timer.as_mut().reset(deadline.into());
        }
        if this.timer.as_mut().poll(cx).is_ready() {
            // Fired for the deadline armed; a packet since moved it on.
            this.armed = None;
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

impl Sink<Message> for EioSocket {
    type Error = WsError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let mut st = self.shared.lock();
        if st.session_closed || st.client_closed {
            return Poll::Ready(Err(WsError::ConnectionClosed));
        }
        if st.out_bytes >= self.shared.out_cap {
            st.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), WsError> {
        match item {
            Message::Text(t) => {
                let mut st = self.shared.lock();
                st.out_bytes += t.len();
                st.out.push_back(Frame::Text(t));
                drop(st);
                self.shared.out_ready.notify_one();
            }
            Message::Ping(_) => {
                // The session's keepalive: Engine.IO's liveness is the
                // client's pings (see `poll_next`), so answer it here.
                let mut st = self.shared.lock();
                st.pong_owed = true;
                if let Some(w) = st.read_waker.take() {
                    w.wake();
                }
            }
            Message::Close(_) => self.close(),
            Message::Binary(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Poll::Ready(Ok(()))
    }
}

/// The packets of `frames` as one polling response body: a string payload
/// (`b64`) or a binary one.
pub fn payload(frames: &[Frame], b64: bool) -> Vec<u8> {
    let mut body = Vec::new();
    for f in frames {
        if let Some(text) = f.as_text() {
            if b64 {
                packet::push_string_packet(&mut body, text);
            } else {
                packet::push_binary_packet(&mut body, text);
            }
        }
    }
    body
}
