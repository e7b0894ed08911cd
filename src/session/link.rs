//! How a session reaches its client: a WebSocket it reads and writes, or a
//! series of HTTP long-polls, each answered with what the outbox holds.
//!
//! The transports build these; the session loop drives them. A session that
//! outlives its link (Bayeux) receives the next one as an [`Attach`].

use std::borrow::Cow;
use std::collections::VecDeque;
use std::task::{ready, Context, Poll as TaskPoll};
use std::time::Duration;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data as OpData, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame as WsFrame;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tracing::debug;

use super::CLOSE_SLOW_CONSUMER;
use crate::outbox::{Out, Outbox};
use crate::protocol::Frame;

/// How long a closing handshake may take before the socket is just dropped:
/// a client that stopped reading gets this long to drain what is in flight
/// and see the close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// A WebSocket as the session uses it; boxed so that one session type
/// serves every socket (production's upgraded connection, tests' pairs).
pub trait Socket:
    Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Send + Unpin
{
}

impl<S> Socket for S where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Send + Unpin
{
}

/// A boxed [`Socket`].
pub type BoxSocket = Box<dyn Socket>;

/// One long-poll: the text the client sent, and where its answer goes. The
/// answer is the frames the outbox held when the poll was done; the
/// transport joins them into one body.
pub struct Poll {
    /// The request body, as text.
    pub text: String,
    /// The answer.
    pub respond: oneshot::Sender<Vec<Frame>>,
}

/// A link handed to a session that is already running.
pub enum Attach {
    /// A WebSocket, with the message that named this session, to be served
    /// first.
    Socket(BoxSocket, String),
    /// A long-poll.
    Poll(Poll),
}

/// Why the session loop stopped, and how to close the socket.
pub enum End {
    /// The socket failed or ended: nothing more to send.
    Gone,
    /// The client sent a close frame: answer it (same code) and end.
    ClientClosed,
    /// Close with this code and reason.
    Close(u16, Cow<'static, str>),
}

/// How a failed read ends the session: protocol errors get the close code
/// RFC 6455 gives them (1002, 1007 for invalid UTF-8, 1009 for too big), so
/// the client learns why instead of seeing the connection vanish.
pub fn read_error(e: WsError) -> End {
    match e {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
            End::Close(1009, "message too big".into())
        }
        WsError::Capacity(e) => End::Close(1009, e.to_string().into()),
        WsError::Utf8(_) => End::Close(1007, "invalid UTF-8 in a text message".into()),
        WsError::Protocol(p) => End::Close(1002, close_reason(p.to_string()).into()),
        e => {
            debug!(cause = %e, "read failed");
            End::Gone
        }
    }
}

/// A close reason fits in a control frame: at most 123 bytes.
fn close_reason(mut text: String) -> String {
    if text.len() > 123 {
        let mut cut = 123;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

/// What [`poll_io`] made happen.
pub enum Io {
    /// The batch in progress was written and flushed: this many frames.
    Wrote(u64),
    /// Writing failed: the socket is gone.
    WriteFailed(WsError),
    /// The client sent something (or the stream ended).
    Read(Option<Result<Message, WsError>>),
}

/// The batch being written to the socket, fed frame by frame as the sink
/// accepts them and then flushed; it lives across `select!` iterations so a
/// blocked write never blocks anything else.
#[derive(Default)]
pub struct Writer {
    /// Frames not yet fed to the sink.
    pub batch: VecDeque<Frame>,
    fed: u64,
    flushing: bool,
}

impl Writer {
    /// A batch is in progress (no new one is taken until it is flushed).
    pub fn busy(&self) -> bool {
        self.flushing
    }

    /// Starts writing what `batch` holds, if anything.
    pub fn start(&mut self) {
        self.flushing = !self.batch.is_empty();
    }
}

/// The WebSocket message for a frame: the same shared bytes.
pub fn message(frame: Frame) -> Message {
    match frame {
        Frame::Text(t) => Message::Text(t),
        Frame::Binary(b) => Message::Binary(b),
        Frame::Ping => Message::Ping(bytes::Bytes::new()),
        Frame::Deflated(b) => {
            let mut frame = WsFrame::message(b, OpCode::Data(OpData::Text), true);
            frame.header_mut().rsv1 = true;
            Message::Frame(frame)
        }
    }
}

/// Makes write progress, then reads: whichever completes first is returned.
pub fn poll_io(ws: &mut BoxSocket, w: &mut Writer, cx: &mut Context<'_>) -> TaskPoll<Io> {
    if w.flushing {
        match poll_write(ws, w, cx) {
            TaskPoll::Ready(Ok(n)) => return TaskPoll::Ready(Io::Wrote(n)),
            TaskPoll::Ready(Err(e)) => return TaskPoll::Ready(Io::WriteFailed(e)),
            TaskPoll::Pending => {}
        }
    }
    ws.poll_next_unpin(cx).map(Io::Read)
}

fn poll_write(
    ws: &mut BoxSocket,
    w: &mut Writer,
    cx: &mut Context<'_>,
) -> TaskPoll<Result<u64, WsError>> {
    while !w.batch.is_empty() {
        ready!(ws.poll_ready_unpin(cx))?;
        if let Some(frame) = w.batch.pop_front() {
            ws.start_send_unpin(message(frame))?;
            w.fed += 1;
        }
    }
    ready!(ws.poll_flush_unpin(cx))?;
    w.flushing = false;
    TaskPoll::Ready(Ok(std::mem::take(&mut w.fed)))
}

/// Ends the socket as `end` says: a client's close is answered (tungstenite
/// queued the echo; it only needs flushing), a close of ours goes out after
/// `rest` (what was queued, unless the client is too slow to be worth
/// waiting for), and either takes at most [`CLOSE_GRACE`].
pub async fn finish(ws: &mut BoxSocket, mut writer: Writer, rest: VecDeque<Frame>, end: End) {
    let (code, reason) = match end {
        End::Gone => return,
        End::ClientClosed => {
            let _ = tokio::time::timeout(CLOSE_GRACE, async {
                ws.flush().await?;
                while let Some(msg) = ws.next().await {
                    msg?;
                }
                Ok::<(), WsError>(())
            })
            .await;
            return;
        }
        End::Close(code, reason) => (code, reason),
    };
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into_owned().into(),
    };
    let slow = code == CLOSE_SLOW_CONSUMER;
    let handshake = async {
        if !slow {
            writer.batch.extend(rest);
            for frame in writer.batch.drain(..) {
                ws.feed(message(frame)).await?;
            }
        }
        ws.send(Message::Close(Some(frame))).await?;
        while let Some(msg) = ws.next().await {
            msg?;
        }
        Ok::<(), WsError>(())
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, handshake).await;
}

/// [`finish`] for a socket whose outbox writes itself: what is queued goes
/// out first, then the close frame (the library frames it into the
/// outbox), each write waiting for the socket to drain, all within
/// [`CLOSE_GRACE`] (a slow consumer's queue holds at most the rest of a
/// frame begun before it overflowed).
pub async fn finish_direct(ws: &mut BoxSocket, outbox: &Outbox, stream: &TcpStream, end: End) {
    let close = match end {
        End::Gone => return,
        // The library queued its echo of the client's close: flushing it
        // hands it to the outbox.
        End::ClientClosed => None,
        End::Close(code, reason) => Some(CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into_owned().into(),
        }),
    };
    if !outbox.reopen_for_close() {
        return;
    }
    let handshake = async {
        match close {
            Some(frame) => ws.send(Message::Close(Some(frame))).await?,
            None => ws.flush().await?,
        }
        loop {
            match outbox.write_out().1 {
                Out::Done => break,
                Out::Blocked => {
                    stream.writable().await?;
                    outbox.unblock();
                }
                // Nobody renders notices any more.
                Out::Mark => {
                    outbox.take_mark();
                }
                Out::Failed => return Ok(()),
            }
        }
        while let Some(msg) = ws.next().await {
            msg?;
        }
        Ok::<(), WsError>(())
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, handshake).await;
}
