//! Inflating what a client compressed, under the WebSocket library.
//!
//! tungstenite knows no extensions and refuses any frame with RSV1 set. So
//! the bytes it reads pass through [`InflateIo`], which parses the client's
//! frames with [`Inflater`]: frames without RSV1 (and every control frame,
//! also between the fragments of a compressed message) go through as they
//! came; a compressed message's payload is unmasked, inflated in pieces of
//! at most [`PIECE_BYTES`], and each piece handed on as an ordinary masked
//! fragment (masking key zero, so the bytes are the inflated ones). The
//! library then joins the fragments, checks UTF-8 and counts the message
//! against its limit as it does for any fragmented message.
//!
//! Memory stays bounded: a piece is only inflated once the previous one was
//! read, and a message whose inflated (or compressed) size passes the limit
//! ends the codec's part with a frame header longer than any frame the
//! library accepts, so it reports `MessageTooLong` and the session closes
//! with 1009, as for an uncompressed message too big. Data that does not
//! inflate, or RSV1 where RFC 7692 forbids it (a continuation or control
//! frame) is handed on as a frame with RSV2 set: the library fails it with
//! 1002. The inflate state exists only while a compressed message is being
//! read (`client_no_context_takeover` is always agreed).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use flate2::{Decompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::TAIL;

/// Most bytes one output piece (an inflated fragment or a piece of a frame
/// passed through) carries.
pub const PIECE_BYTES: usize = 16 * 1024;

/// Most bytes read from the socket in one go (on the stack).
const READ_BYTES: usize = 4096;

/// Room for a fragment's header: 2 bytes, a 16-bit length, a mask.
const HEADER_ROOM: usize = 8;

/// The frame header a message too big ends with: a length no frame limit
/// admits (2^63 - 1).
const TOO_BIG: [u8; 10] = [0x82, 0x7f, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];

/// The frame a protocol violation ends with: RSV2 set, masked, empty (its
/// first two bytes, unmasked, for a client).
const VIOLATION: [u8; 6] = [0xa2, 0x80, 0, 0, 0, 0];

/// Where the parser is in the client's byte stream.
#[derive(Debug, Clone, Copy)]
enum State {
    /// Reading a frame header (its bytes so far are in `head`).
    Header,
    /// Handing on this many payload bytes unchanged.
    Pass(u64),
    /// Inflating this many payload bytes of a compressed message's frame.
    Inflate {
        left: u64,
        mask: [u8; 4],
        /// Position in the mask of the next byte.
        pos: usize,
        /// The message's last frame.
        fin: bool,
    },
    /// The last frame was read: the tail goes in, the rest comes out; this
    /// many tail bytes were fed.
    Finish(usize),
    /// Dropping this many payload bytes (the rest of a frame after a
    /// failure).
    Skip(u64),
}

/// A compressed message being read.
struct Message {
    /// Text (1) or binary (2).
    opcode: u8,
    /// A fragment of it was handed on (later ones are continuations).
    started: bool,
    /// Bytes inflated and compressed so far (both count against the limit).
    inflated: usize,
    deflated: u64,
    /// The client ended the DEFLATE stream (a block with BFINAL): anything
    /// after it is ignored.
    ended: bool,
    z: Box<Decompress>,
}

/// The frame codec: see the module docs. It does no I/O, so it can be fed
/// any bytes (the fuzz target does).
pub struct Inflater {
    limit: usize,
    /// Reading a client's frames (masked) as a server; else a server's.
    masked: bool,
    state: State,
    head: [u8; 14],
    head_len: usize,
    message: Option<Message>,
    /// Compressed messages inflated to their end.
    messages: u64,
    /// A client's inflater, kept between messages (reset for each): a load
    /// client inflates every delivery, and a fresh inflater is some 40 KiB
    /// to allocate and clear. A server drops it, so idle sockets stay small.
    spare: Option<Box<Decompress>>,
}

/// What a header says.
struct Head {
    fin: bool,
    rsv1: bool,
    rsv23: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: u64,
}

impl Inflater {
    /// A server's codec for client messages of at most `limit` bytes
    /// (inflated).
    pub fn new(limit: usize) -> Inflater {
        Inflater::with_role(limit, true)
    }

    /// A client's codec for a server's (unmasked) frames: the load client
    /// of `wsgate-bench --deflate`.
    pub fn for_client(limit: usize) -> Inflater {
        Inflater::with_role(limit, false)
    }

    fn with_role(limit: usize, masked: bool) -> Inflater {
        Inflater {
            limit,
            masked,
            state: State::Header,
            head: [0; 14],
            head_len: 0,
            message: None,
            messages: 0,
            spare: None,
        }
    }

    /// Payload bytes to hand on unchanged before the next header (the
    /// caller may copy them itself, then say so with [`Inflater::passed`]).
    pub fn passing(&self) -> u64 {
        match self.state {
            State::Pass(n) => n,
            _ => 0,
        }
    }

    /// `n` of the [`Inflater::passing`] bytes were handed on by the caller.
    pub fn passed(&mut self, n: usize) {
        if let State::Pass(left) = self.state {
            let left = left.saturating_sub(n as u64);
            self.state = if left == 0 {
                State::Header
            } else {
                State::Pass(left)
            };
        }
    }

    /// Whether the last frame of a message was read and what the inflater
    /// holds is still to come out (no input needed).
    pub fn finishing(&self) -> bool {
        matches!(self.state, State::Finish(_))
    }

    /// Whether a compressed message is being inflated (its inflate state
    /// is allocated).
    pub fn inflating(&self) -> bool {
        self.message.is_some()
    }

    /// Reads client bytes from `input`, appending what the library is to
    /// read to `out` until `input` is used up or `out` holds about
    /// [`PIECE_BYTES`]; the input bytes used (the rest is to be fed again).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        let mut used = 0;
        while out.len() < PIECE_BYTES {
            match self.state {
                State::Header => {
                    let Some(head) = self.header(input, &mut used) else {
                        break;
                    };
                    self.start(head, out);
                }
                State::Pass(left) | State::Skip(left) => {
                    let room = (PIECE_BYTES - out.len()) as u64;
                    let n = left.min(room).min((input.len() - used) as u64) as usize;
                    if n == 0 && left > 0 {
                        break;
                    }
                    if matches!(self.state, State::Pass(_)) {
                        out.extend_from_slice(&input[used..used + n]);
                    }
                    used += n;
                    let left = left - n as u64;
                    self.state = match (left, self.state) {
                        (0, _) => State::Header,
                        (_, State::Pass(_)) => State::Pass(left),
                        _ => State::Skip(left),
                    };
                }
                State::Inflate {
                    left,
                    mask,
                    pos,
                    fin,
                } => {
                    if left == 0 {
                        self.state = if fin { State::Finish(0) } else { State::Header };
                        continue;
                    }
                    if used == input.len() {
                        break;
                    }
                    let take = left.min((input.len() - used).min(READ_BYTES) as u64) as usize;
                    // The message's last bytes go in with the tail, so a
                    // short message comes out as one frame.
                    let last = fin && take as u64 == left;
                    let mut chunk = [0u8; READ_BYTES + TAIL.len()];
                    for (i, (c, b)) in chunk.iter_mut().zip(&input[used..used + take]).enumerate() {
                        *c = b ^ mask[(pos + i) % 4];
                    }
                    let mut fed = take;
                    if last {
                        chunk[take..take + TAIL.len()].copy_from_slice(&TAIL);
                        fed += TAIL.len();
                    }
                    let Some(n) = self.inflate(&chunk[..fed], last, out) else {
                        self.fail(State::Skip(left), out);
                        continue;
                    };
                    let payload = n.min(take);
                    used += payload;
                    let left = left - payload as u64;
                    self.state = if self.message.is_none() {
                        // Done, or too big: the rest of the frame goes.
                        if left > 0 {
                            State::Skip(left)
                        } else {
                            State::Header
                        }
                    } else if last && n > take {
                        State::Finish(n - take)
                    } else {
                        State::Inflate {
                            left,
                            mask,
                            pos: (pos + payload) % 4,
                            fin,
                        }
                    };
                }
                State::Finish(fed) => {
                    let Some(n) = self.inflate(&TAIL[fed..], true, out) else {
                        self.fail(State::Header, out);
                        continue;
                    };
                    self.state = if self.message.is_none() {
                        State::Header // done, or too big
                    } else {
                        State::Finish(fed + n)
                    };
                }
            }
        }
        used
    }

    /// Gathers header bytes from `input`; the header once complete.
    fn header(&mut self, input: &[u8], used: &mut usize) -> Option<Head> {
        loop {
            let need = match self.head_len {
                0 | 1 => 2,
                _ => {
                    let ext = match self.head[1] & 0x7f {
                        126 => 2,
                        127 => 8,
                        _ => 0,
                    };
                    2 + ext + if self.head[1] & 0x80 != 0 { 4 } else { 0 }
                }
            };
            if self.head_len >= need {
                break;
            }
            let b = *input.get(*used)?;
            self.head[self.head_len] = b;
            self.head_len += 1;
            *used += 1;
        }
        let h = &self.head[..self.head_len];
        let (len, at) = match h[1] & 0x7f {
            126 => (u64::from(u16::from_be_bytes([h[2], h[3]])), 4),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&h[2..10]);
                (u64::from_be_bytes(b), 10)
            }
            n => (u64::from(n), 2),
        };
        let mask = (h[1] & 0x80 != 0).then(|| [h[at], h[at + 1], h[at + 2], h[at + 3]]);
        Some(Head {
            fin: h[0] & 0x80 != 0,
            rsv1: h[0] & 0x40 != 0,
            rsv23: h[0] & 0x30 != 0,
            opcode: h[0] & 0x0f,
            mask,
            len,
        })
    }

    /// Acts on a complete header.
    fn start(&mut self, head: Head, out: &mut Vec<u8>) {
        let data = head.opcode < 8;
        // Client frames are masked, a server's are not.
        let masking = head.mask.is_some() == self.masked && !head.rsv23;
        let inflate = match (&mut self.message, head.rsv1, data, masking) {
            // Control frames (masked or not, RSV1 or not: the library
            // judges them) go through, also inside a compressed message.
            (_, _, false, _) => false,
            // The first frame of a compressed message.
            (None, true, true, true) if matches!(head.opcode, 1 | 2) => {
                self.message = Some(Message {
                    opcode: head.opcode,
                    started: false,
                    inflated: 0,
                    deflated: 0,
                    ended: false,
                    z: match self.spare.take() {
                        Some(mut z) => {
                            z.reset(false);
                            z
                        }
                        None => Box::new(Decompress::new(false)),
                    },
                });
                true
            }
            // Its continuations: opcode 0, RSV1 clear (RFC 7692 section 6.1).
            (Some(_), false, true, true) if head.opcode == 0 => true,
            // Anything else inside a compressed message, or RSV1 where it
            // cannot be: fail.
            (Some(_), _, true, _) | (None, true, true, _) => {
                self.head_len = 0;
                self.fail(State::Skip(head.len), out);
                return;
            }
            // An uncompressed frame: the library judges it.
            (None, false, true, _) => false,
        };
        let header = &self.head[..self.head_len];
        self.head_len = 0;
        if !inflate {
            out.extend_from_slice(header);
            self.state = if head.len == 0 {
                State::Header
            } else {
                State::Pass(head.len)
            };
            return;
        }
        let mask = head.mask.unwrap_or([0; 4]);
        let Some(message) = &mut self.message else {
            return;
        };
        message.deflated = message.deflated.saturating_add(head.len);
        if message.deflated > self.limit as u64 {
            self.fail_too_big(State::Skip(head.len), out);
            return;
        }
        self.state = State::Inflate {
            left: head.len,
            mask,
            pos: 0,
            fin: head.fin,
        };
    }

    /// Inflates `input` (unmasked) into one fragment appended to `out`;
    /// the input bytes used, `None` when it does not inflate. With `last`,
    /// the fragment that leaves the inflater empty ends the message.
    fn inflate(&mut self, input: &[u8], last: bool, out: &mut Vec<u8>) -> Option<usize> {
        let (limit, masked) = (self.limit, self.masked);
        let message = self.message.as_mut()?;
        let room = PIECE_BYTES.saturating_sub(out.len()).max(1024);
        let start = out.len();
        out.resize(start + HEADER_ROOM + room, 0);
        let (used, made, ended) = if message.ended {
            (input.len(), 0, true)
        } else {
            let before = (message.z.total_in(), message.z.total_out());
            let flush = if last {
                FlushDecompress::Sync
            } else {
                FlushDecompress::None
            };
            let status = message
                .z
                .decompress(input, &mut out[start + HEADER_ROOM..], flush);
            let used = (message.z.total_in() - before.0) as usize;
            let made = (message.z.total_out() - before.1) as usize;
            match status {
                Ok(Status::StreamEnd) => (input.len(), made, true),
                Ok(_) => (used, made, false),
                Err(_) => {
                    out.truncate(start);
                    return None;
                }
            }
        };
        message.ended |= ended;
        message.inflated += made;
        if message.inflated > limit {
            out.truncate(start);
            self.message = None;
            out.extend_from_slice(&TOO_BIG);
            return Some(used);
        }
        // The inflater is empty when it had room left after all the tail.
        let done = last && used == input.len() && made < room;
        if made == 0 && !done {
            out.truncate(start);
            if used == 0 {
                return None; // no progress on input it was given
            }
            return Some(used);
        }
        let opcode = if message.started { 0 } else { message.opcode };
        message.started = true;
        let mut h = [0u8; HEADER_ROOM];
        h[0] = opcode | if done { 0x80 } else { 0 };
        let mask_bit = if masked { 0x80 } else { 0 };
        let key = if masked { 4 } else { 0 }; // a zero key: bytes as they are
        let hlen = if made < 126 {
            h[1] = mask_bit | made as u8;
            2 + key
        } else {
            h[1] = mask_bit | 126;
            h[2..4].copy_from_slice(&(made as u16).to_be_bytes());
            4 + key
        };
        out[start..start + hlen].copy_from_slice(&h[..hlen]);
        out.copy_within(
            start + HEADER_ROOM..start + HEADER_ROOM + made,
            start + hlen,
        );
        out.truncate(start + hlen + made);
        if done {
            if let Some(message) = self.message.take() {
                if !masked {
                    self.spare = Some(message.z);
                }
            }
            self.messages += 1;
        }
        Some(used)
    }

    /// Ends the message as a protocol violation (1002).
    fn fail(&mut self, then: State, out: &mut Vec<u8>) {
        self.message = None;
        if self.masked {
            out.extend_from_slice(&VIOLATION);
        } else {
            out.extend_from_slice(&[VIOLATION[0], 0]);
        }
        self.state = then;
    }

    /// Ends the message as too big (1009).
    fn fail_too_big(&mut self, then: State, out: &mut Vec<u8>) {
        self.message = None;
        out.extend_from_slice(&TOO_BIG);
        self.state = then;
    }
}

/// A stream whose reads go through an [`Inflater`]; writes go straight
/// through.
pub struct InflateIo<S> {
    inner: S,
    /// `None`: reads go straight through (nothing was agreed).
    codec: Option<Inflater>,
    /// Client bytes read but not yet taken by the codec (only while it has
    /// output waiting; empty, with no allocation, otherwise).
    input: Vec<u8>,
    /// Bytes for the library not yet read by it, from `sent` on.
    output: Vec<u8>,
    sent: usize,
}

impl<S> InflateIo<S> {
    /// `inner`, inflating client messages of at most `limit` bytes.
    pub fn new(inner: S, limit: usize) -> InflateIo<S> {
        InflateIo::with(inner, Some(Inflater::new(limit)))
    }

    /// `inner` with reads going straight through until
    /// [`InflateIo::inflate_server`] (a client's stream: its handshake is
    /// read before it knows what was agreed).
    pub fn plain(inner: S) -> InflateIo<S> {
        InflateIo::with(inner, None)
    }

    /// From now on, inflates a server's messages of at most `limit` bytes.
    pub fn inflate_server(&mut self, limit: usize) {
        self.codec = Some(Inflater::for_client(limit));
    }

    /// The stream underneath.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Compressed messages inflated so far.
    pub fn inflated(&self) -> u64 {
        self.codec.as_ref().map_or(0, |c| c.messages)
    }

    fn with(inner: S, codec: Option<Inflater>) -> InflateIo<S> {
        InflateIo {
            inner,
            codec,
            input: Vec::new(),
            output: Vec::new(),
            sent: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for InflateIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(codec) = this.codec.as_mut() else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        loop {
            if this.sent < this.output.len() {
                let n = (this.output.len() - this.sent).min(buf.remaining());
                buf.put_slice(&this.output[this.sent..this.sent + n]);
                this.sent += n;
                if this.sent == this.output.len() {
                    // Idle sockets keep no buffers.
                    this.output = Vec::new();
                    this.sent = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if !this.input.is_empty() || codec.finishing() {
                let used = codec.feed(&this.input, &mut this.output);
                this.input.drain(..used);
                if this.input.is_empty() {
                    this.input = Vec::new();
                }
                if !this.output.is_empty() || used > 0 {
                    continue;
                }
            }
            // A long frame passed through: straight into the library's
            // buffer, when all of it is payload.
            if this.input.is_empty() && codec.passing() >= buf.remaining() as u64 {
                let before = buf.filled().len();
                ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                codec.passed(buf.filled().len() - before);
                return Poll::Ready(Ok(()));
            }
            let mut stack = [0u8; READ_BYTES];
            let mut read = ReadBuf::new(&mut stack);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            let got = read.filled();
            if got.is_empty() {
                return Poll::Ready(Ok(())); // end of stream
            }
            let used = codec.feed(got, &mut this.output);
            this.input.extend_from_slice(&got[used..]);
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for InflateIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deflate::deflate;

    /// A masked client frame.
    fn frame(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut v = vec![first];
        match payload.len() {
            n if n < 126 => v.push(0x80 | n as u8),
            n if n < 65536 => {
                v.push(0x80 | 126);
                v.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                v.push(0x80 | 127);
                v.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        v.extend_from_slice(&mask);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        v
    }

    /// Everything the codec makes of `input`, fed `step` bytes at a time,
    /// its output drained after each call as the shim does.
    fn run(limit: usize, input: &[u8], step: usize) -> Vec<u8> {
        let mut codec = Inflater::new(limit);
        let mut all = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        for piece in input.chunks(step) {
            pending.extend_from_slice(piece);
            loop {
                let mut out = Vec::new();
                let used = codec.feed(&pending, &mut out);
                pending.drain(..used);
                assert!(out.len() <= PIECE_BYTES + 2 * HEADER_ROOM + TOO_BIG.len());
                all.extend_from_slice(&out);
                if out.is_empty() && (pending.is_empty() || used == 0) && !codec.finishing() {
                    break;
                }
            }
        }
        all
    }

    /// A frame's first byte and unmasked payload.
    type Raw = (u8, Vec<u8>);

    /// The frames in `wire`.
    fn frames(mut wire: &[u8]) -> Vec<Raw> {
        let mut v = Vec::new();
        while !wire.is_empty() {
            let (len, mut at) = match wire[1] & 0x7f {
                126 => (u16::from_be_bytes([wire[2], wire[3]]) as usize, 4),
                127 => (
                    u64::from_be_bytes(wire[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                n => (n as usize, 2),
            };
            if len > 1 << 40 {
                v.push((wire[0], b"TOO BIG".to_vec()));
                return v;
            }
            let mask = if wire[1] & 0x80 != 0 {
                at += 4;
                wire[at - 4..at].try_into().unwrap()
            } else {
                [0; 4]
            };
            let payload = wire[at..at + len]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            v.push((wire[0], payload));
            wire = &wire[at + len..];
        }
        v
    }

    /// The data frames of one message joined, and the control frames.
    fn message(wire: &[u8]) -> (u8, Vec<u8>, Vec<Raw>) {
        let mut first = None;
        let mut data = Vec::new();
        let mut control = Vec::new();
        for (b0, payload) in frames(wire) {
            assert_eq!(b0 & 0x70, 0, "no reserved bits handed on");
            if b0 & 0x0f >= 8 {
                control.push((b0, payload));
                continue;
            }
            first.get_or_insert(b0 & 0x0f);
            data.extend_from_slice(&payload);
        }
        (first.unwrap_or(0), data, control)
    }

    fn json(n: usize) -> String {
        let mut s = String::from("[");
        for i in 0..n {
            s.push_str(&format!(r#"{{"id":{i},"name":"item {i}","ok":true}},"#));
        }
        s.push_str("0]");
        s
    }

    #[test]
    fn a_fragmented_compressed_message_with_a_ping_between_comes_out_whole() {
        let text = json(2000);
        let d = deflate(text.as_bytes()).unwrap();
        let (a, rest) = d.split_at(d.len() / 3);
        let (b, c) = rest.split_at(rest.len() / 2);
        let mut wire = frame(0x41, a, [1, 2, 3, 4]); // RSV1, text, not FIN
        wire.extend(frame(0x89, b"hi", [5, 6, 7, 8]));
        wire.extend(frame(0x00, b, [9, 9, 9, 9]));
        wire.extend(frame(0x80, c, [7, 0, 7, 0]));
        for step in [1, 7, 4096, wire.len()] {
            let out = run(1 << 20, &wire, step);
            let (opcode, data, control) = message(&out);
            assert_eq!(opcode, 1);
            assert_eq!(data, text.as_bytes(), "step {step}");
            assert_eq!(control, vec![(0x89, b"hi".to_vec())]);
            let fs = frames(&out);
            assert_eq!(
                fs.last().map(|f| f.0),
                Some(0x80),
                "ends with a FIN continuation"
            );
        }
    }

    #[test]
    fn a_short_compressed_message_is_one_frame() {
        let text = r#"{"type":"subscribe","channel":"news"}"#.repeat(10);
        let d = deflate(text.as_bytes()).unwrap();
        let out = run(1 << 20, &frame(0xc1, &d, [3, 1, 4, 1]), 4096);
        assert_eq!(frames(&out), vec![(0x81, text.into_bytes())]);
    }

    #[test]
    fn a_client_reads_a_servers_unmasked_frames() {
        let text = json(100);
        let d = deflate(text.as_bytes()).unwrap();
        let mut wire = vec![0xc1, 126];
        wire.extend_from_slice(&(d.len() as u16).to_be_bytes());
        wire.extend_from_slice(&d);
        let mut codec = Inflater::for_client(1 << 20);
        let mut out = Vec::new();
        assert_eq!(codec.feed(&wire, &mut out), wire.len());
        let mut want = vec![0x81, 126];
        want.extend_from_slice(&(text.len() as u16).to_be_bytes());
        want.extend_from_slice(text.as_bytes());
        assert_eq!(out, want, "unmasked, RSV1 cleared");
        assert_eq!(codec.messages, 1);
        // A masked frame from a server is the library's to refuse.
        let masked = frame(0xc1, &d, [1, 2, 3, 4]);
        let mut out = Vec::new();
        codec.feed(&masked, &mut out);
        assert_eq!(out, [0xa2, 0x00]);
    }

    #[test]
    fn uncompressed_frames_go_through_byte_for_byte() {
        let mut wire = frame(0x81, b"hello", [1, 2, 3, 4]);
        wire.extend(frame(0x82, &vec![7u8; 70_000], [4, 3, 2, 1]));
        wire.extend(frame(0x88, &[3, 232], [0, 0, 0, 1]));
        for step in [1, 100, wire.len()] {
            assert_eq!(run(1 << 20, &wire, step), wire);
        }
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let zeros = vec![0u8; 50 << 20];
        let mut z = flate2::Compress::new(flate2::Compression::best(), false);
        let mut d = Vec::with_capacity(1 << 20);
        z.compress_vec(&zeros, &mut d, flate2::FlushCompress::Sync)
            .unwrap();
        assert!(d.len() < 100_000);
        let limit = 64 * 1024;
        let mut wire = frame(0xc1, &d, [1, 1, 1, 1]);
        wire.extend(frame(0x88, &[3, 232], [0, 0, 0, 1]));
        let out = run(limit, &wire, 4096);
        assert!(out.len() < limit + 2 * PIECE_BYTES, "{}", out.len());
        assert!(out.ends_with(&[&TOO_BIG[..], &frame(0x88, &[3, 232], [0, 0, 0, 1])].concat()));
        // Compressed bytes count too.
        let big = frame(0xc1, &vec![0u8; limit + 1], [0; 4]);
        assert_eq!(run(limit, &big, 4096), TOO_BIG);
    }

    /// Found by the fuzz target: compressed lengths summed past u64.
    #[test]
    fn huge_compressed_lengths_are_too_big_not_an_overflow() {
        let ok = deflate(json(20).as_bytes()).unwrap();
        let mut wire = frame(0x41, &ok[..10], [0; 4]);
        wire.extend_from_slice(&[0x00, 0xff]);
        wire.extend_from_slice(&[0xff; 8]);
        wire.extend_from_slice(&[0; 4]);
        let out = run(1 << 20, &wire, 4096);
        assert!(out.ends_with(&TOO_BIG), "{out:?}");
    }

    #[test]
    fn rsv1_where_it_cannot_be_and_bad_data_are_violations() {
        let ok = deflate(json(20).as_bytes()).unwrap();
        for wire in [
            frame(0xc9, b"", [0; 4]), // RSV1 on a ping
            frame(0xc0, &ok, [0; 4]), // RSV1 on a continuation
            [frame(0x41, &ok, [0; 4]), frame(0xc0, &ok, [0; 4])].concat(),
            [frame(0x41, &ok, [0; 4]), frame(0x81, b"x", [0; 4])].concat(),
            frame(0xc1, &[0xff; 20], [0; 4]), // not DEFLATE
        ] {
            let out = run(1 << 20, &wire, 4096);
            let control_rsv1 = wire[0] == 0xc9;
            if control_rsv1 {
                assert_eq!(out, wire, "the library judges control frames");
            } else {
                assert!(out.ends_with(&VIOLATION), "{out:?}");
            }
        }
    }

    /// The fuzz target's property (fuzz/fuzz_targets/deflate.rs), on
    /// mutations of a real stream: the same whole messages whatever the
    /// reads.
    #[test]
    fn reads_of_any_size_make_the_same_messages() {
        let text = json(300);
        let d = deflate(text.as_bytes()).unwrap();
        let (a, b) = d.split_at(d.len() / 2);
        let mut base = frame(0x41, a, [1, 2, 3, 4]);
        base.extend(frame(0x89, b"hi", [5, 6, 7, 8]));
        base.extend(frame(0x80, b, [9, 9, 9, 9]));
        base.extend(frame(0x81, b"plain", [0, 1, 0, 1]));
        base.extend(frame(0xc1, &deflate(&vec![b'a'; 100_000]).unwrap(), [2; 4]));
        base.extend(frame(0xc1, &d, [3; 4]));
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..120 {
            let mut input = base.clone();
            for _ in 0..(round % 4) {
                let at = rand() as usize % input.len();
                input[at] ^= 1 << (rand() % 8);
            }
            let whole = joined(&run(LIMIT, &input, input.len()));
            let stepped = joined(&run(LIMIT, &input, (rand() % 16 + 1) as usize));
            assert_eq!(whole, stepped, "round {round}");
            if round == 0 {
                assert!(whole.starts_with(text.as_bytes()));
            }
        }
    }

    const LIMIT: usize = 64 * 1024;

    /// The messages the data frames in `wire` make (see the fuzz target).
    fn joined(mut wire: &[u8]) -> Vec<u8> {
        let mut joined = Vec::new();
        let mut message = Vec::new();
        while wire.len() >= 2 {
            let (len, mut at) = match wire[1] & 0x7f {
                126 if wire.len() >= 4 => (u64::from(u16::from_be_bytes([wire[2], wire[3]])), 4),
                127 if wire.len() >= 10 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&wire[2..10]);
                    (u64::from_be_bytes(b), 10)
                }
                126 | 127 => break,
                n => (u64::from(n), 2),
            };
            let mut mask = [0u8; 4];
            if wire[1] & 0x80 != 0 {
                if wire.len() < at + 4 {
                    break;
                }
                mask.copy_from_slice(&wire[at..at + 4]);
                at += 4;
            }
            if len > (wire.len() - at) as u64 {
                break;
            }
            let len = len as usize;
            let opcode = wire[0] & 0x0f;
            if wire[0] & 0x70 != 0 {
                message.clear(); // a failure (or a client's reserved bits)
            } else if opcode < 8 {
                message.extend(
                    wire[at..at + len]
                        .iter()
                        .enumerate()
                        .map(|(i, b)| b ^ mask[i % 4]),
                );
                if wire[0] & 0x80 != 0 {
                    joined.append(&mut message);
                }
            }
            wire = &wire[at + len..];
        }
        joined
    }

    #[tokio::test]
    async fn tungstenite_reads_what_the_shim_makes() {
        use futures_util::StreamExt;
        use tokio::io::AsyncWriteExt;
        use tokio_tungstenite::tungstenite::error::{CapacityError, Error};
        use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
        use tokio_tungstenite::tungstenite::Message as WsMessage;

        let limit = 64 * 1024;
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let config = WebSocketConfig::default()
            .max_message_size(Some(limit))
            .max_frame_size(Some(limit));
        let io = InflateIo::new(server, limit);
        let mut ws =
            tokio_tungstenite::WebSocketStream::from_raw_socket(io, Role::Server, Some(config))
                .await;
        let text = json(500);
        let d = deflate(text.as_bytes()).unwrap();
        let writer = tokio::spawn(async move {
            client
                .write_all(&frame(0xc1, &d, [9, 8, 7, 6]))
                .await
                .unwrap();
            let bomb = deflate(&vec![b'a'; limit * 4]).unwrap();
            client
                .write_all(&frame(0xc1, &bomb, [1, 2, 3, 4]))
                .await
                .unwrap();
            client
        });
        let wait = std::time::Duration::from_secs(10);
        let first = tokio::time::timeout(wait, ws.next()).await.unwrap();
        assert_eq!(first.unwrap().unwrap(), WsMessage::Text(text.into()));
        let second = tokio::time::timeout(wait, ws.next()).await.unwrap();
        assert!(
            matches!(
                second,
                Some(Err(Error::Capacity(CapacityError::MessageTooLong { .. })))
            ),
            "{second:?}"
        );
        drop(writer.await.unwrap());
    }
}
