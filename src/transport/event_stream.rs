//! The link of a server-sent events session: a response body the session
//! writes as if it were a WebSocket.
//!
//! [`pipe`] makes two ends. The session holds the [`EventSink`], a
//! [`crate::session::link::Socket`], so the session loop drives it
//! unchanged: its outbox and slow-consumer bound, drain, shutdown, token
//! expiry and keepalive all apply. hyper holds the [`EventBody`], the
//! response's stream of chunks. Between them sits one batch at most: the
//! session writes a batch, then its flush waits until hyper has taken every
//! chunk, and only then takes the next batch from the outbox (which bounds
//! what waits, in bytes). The chunks are the frames' shared bytes, never
//! copied.
//!
//! - A text frame is written as it is (the SSE render made it a whole event).
//! - A ping is the comment line `: ping` (the heartbeat); once hyper has
//!   taken it, the sink reads a pong: the client's connection accepts
//!   bytes, the only sign of life a one-way stream gives. A client that
//!   stops reading stops taking heartbeats and is closed like a silent
//!   WebSocket (4009), or earlier as a slow consumer (4008).
//! - A close frame becomes the final `event: close`; the body ends after it.
//!
//! When the session drops the sink before hyper took everything (a client
//! that stopped reading), the body fails and the connection is dropped
//! ([`PendingSlot::end_connection`]): hyper, blocked on its write, would
//! otherwise hold it for as long as the client likes.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::Message;

use crate::pending::PendingSlot;
use crate::protocol::sse::close_event;

/// The heartbeat: an SSE comment.
const HEARTBEAT: &[u8] = b": ping\n\n";

/// What both ends share; locked only for a push or a pop, never across an
/// await.
#[derive(Default)]
struct Shared {
    /// Chunks written and not yet taken by hyper; `true` marks a heartbeat.
    chunks: VecDeque<(Bytes, bool)>,
    /// The final event is written: the body ends after the chunks.
    finished: bool,
    /// The session left before hyper took everything: the body fails.
    aborted: bool,
    /// hyper dropped the body: the client is gone.
    gone: bool,
    /// A heartbeat was taken since the sink last read a pong.
    pinged: bool,
    body: Option<Waker>,
    writer: Option<Waker>,
    reader: Option<Waker>,
}

fn wake(w: &mut Option<Waker>) {
    if let Some(w) = w.take() {
        w.wake();
    }
}

/// The session's end: a [`crate::session::link::Socket`].
pub struct EventSink {
    shared: Arc<Mutex<Shared>>,
    conn: Arc<PendingSlot>,
}

/// hyper's end: the response body, chunk by chunk.
pub struct EventBody {
    shared: Arc<Mutex<Shared>>,
}

/// A sink and the body it feeds, `first` already written (the `retry:`
/// field). `conn` is the HTTP connection carrying the response.
pub fn pipe(first: Bytes, conn: Arc<PendingSlot>) -> (EventSink, EventBody) {
    let shared = Arc::new(Mutex::new(Shared::default()));
    lock(&shared).chunks.push_back((first, false));
    (
        EventSink {
            shared: shared.clone(),
            conn,
        },
        EventBody { shared },
    )
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sink<Message> for EventSink {
    type Error = WsError;

    /// Always ready while the client is there: the session writes one
    /// batch (bounded by its outbox) and then waits in `poll_flush`.
    fn poll_ready(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        if lock(&self.shared).gone {
            return Poll::Ready(Err(WsError::ConnectionClosed));
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, message: Message) -> Result<(), WsError> {
        let mut s = lock(&self.shared);
        if s.gone {
            return Err(WsError::ConnectionClosed);
        }
        if s.finished {
            return Ok(());
        }
        let chunk = match message {
            Message::Text(text) => (Bytes::from(text), false),
            Message::Binary(bytes) => (bytes, false),
            Message::Ping(_) => (Bytes::from_static(HEARTBEAT), true),
            Message::Close(frame) => {
                s.finished = true;
                let (code, reason) = frame.map_or((1000, String::new()), |f| {
                    (u16::from(f.code), f.reason.as_str().to_owned())
                });
                let event = close_event(code, &reason);
                let Some(text) = event.as_text() else {
                    return Ok(());
                };
                (Bytes::copy_from_slice(text.as_bytes()), false)
            }
            Message::Pong(_) | Message::Frame(_) => return Ok(()),
        };
        s.chunks.push_back(chunk);
        wake(&mut s.body);
        Ok(())
    }

    /// Done when hyper has taken every chunk.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let mut s = lock(&self.shared);
        if s.gone {
            return Poll::Ready(Err(WsError::ConnectionClosed));
        }
        if s.chunks.is_empty() {
            return Poll::Ready(Ok(()));
        }
        s.writer = Some(cx.waker().clone());
        Poll::Pending
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        lock(&self.shared).finished = true;
        self.poll_flush(cx)
    }
}

impl Stream for EventSink {
    type Item = Result<Message, WsError>;

    /// A pong for each heartbeat hyper took; the end once the client is
    /// gone, or once the final event is taken.
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut s = lock(&self.shared);
        if s.gone || (s.finished && s.chunks.is_empty()) {
            return Poll::Ready(None);
        }
        if std::mem::take(&mut s.pinged) {
            return Poll::Ready(Some(Ok(Message::Pong(Bytes::new()))));
        }
        s.reader = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for EventSink {
    fn drop(&mut self) {
        let mut s = lock(&self.shared);
        if s.gone || (s.finished && s.chunks.is_empty()) {
            return;
        }
        s.aborted = true;
        s.chunks.clear();
        wake(&mut s.body);
        drop(s);
        self.conn.end_connection();
    }
}

impl Stream for EventBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut s = lock(&self.shared);
        if s.aborted {
            return Poll::Ready(Some(Err(std::io::Error::other("event stream ended"))));
        }
        if let Some((chunk, heartbeat)) = s.chunks.pop_front() {
            if heartbeat {
                s.pinged = true;
                wake(&mut s.reader);
            }
            if s.chunks.is_empty() {
                wake(&mut s.writer);
                if s.finished {
                    wake(&mut s.reader);
                }
            }
            return Poll::Ready(Some(Ok(chunk)));
        }
        if s.finished {
            return Poll::Ready(None);
        }
        s.body = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for EventBody {
    fn drop(&mut self) {
        let mut s = lock(&self.shared);
        s.gone = true;
        wake(&mut s.writer);
        wake(&mut s.reader);
    }
}
