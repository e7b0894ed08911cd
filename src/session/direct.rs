//! A WebSocket whose outbox writes itself ([`crate::outbox::direct`]): the
//! socket is shared between the WebSocket library, which only reads (and
//! frames its own pongs and close frames), and the outbox, which writes
//! every byte, so nothing can interleave inside a frame.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::outbox::Outbox;

/// An upgraded connection the session may write directly: its socket, the
/// bytes the client sent after its upgrade request (already read by the
/// HTTP server), and the WebSocket settings.
pub struct Direct {
    /// The connection.
    pub stream: TcpStream,
    /// What was read past the upgrade request.
    pub prefix: Bytes,
    /// The WebSocket settings.
    pub config: WebSocketConfig,
    /// permessage-deflate was agreed: client messages are inflated under
    /// the library ([`crate::deflate::inflate`]).
    pub inflate: bool,
}

/// The socket as the WebSocket library sees it: reads come from the socket
/// (the prefix first), writes go to the end of the outbox.
pub struct SplitIo {
    stream: Arc<TcpStream>,
    prefix: Bytes,
    outbox: Arc<Outbox>,
}

impl SplitIo {
    /// The library's side of `stream`, writing into `outbox`.
    pub fn new(stream: Arc<TcpStream>, prefix: Bytes, outbox: Arc<Outbox>) -> SplitIo {
        SplitIo {
            stream,
            prefix: unpinned(prefix),
            outbox,
        }
    }
}

/// The bytes of `prefix` in an allocation of their own: the prefix is a
/// slice of the HTTP server's read buffer (8 KiB or more), which a slice,
/// even an empty one, keeps alive for as long as the socket lives
/// (measured: 4.5 KiB more per idle socket).
fn unpinned(prefix: Bytes) -> Bytes {
    if prefix.is_empty() {
        Bytes::new()
    } else {
        Bytes::copy_from_slice(&prefix)
    }
}

impl AsyncRead for SplitIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            if this.prefix.is_empty() {
                this.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(this.stream.poll_read_ready(cx))?;
            match this.stream.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for SplitIo {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // The library writes whole frames it built itself (pongs, close
        // frames); the outbox writes them in turn. After the outbox closed
        // they are dropped, as the socket is.
        self.outbox.push_raw(Bytes::copy_from_slice(buf));
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
