//! Writing an outbox straight to its socket (issue 13's direct write path).
//!
//! A server's WebSocket frames are unmasked, so a delivery's frame is its
//! header (2 to 10 bytes, computed from the length, on the stack) and the
//! payload bytes every subscriber of the render key shares. Whoever holds
//! the outbox's lock when frames are queued and the socket is not known to
//! be full (the hub's dispatcher at the end of a batch, or the session)
//! writes them with one non-blocking `writev`; only what the kernel did not
//! take stays queued, and only then is the session woken to wait for the
//! socket to drain. Order holds because writes always start at the front of
//! the queue, under its lock, and a partly written frame is resumed at its
//! offset before anything else.

use std::io::{self, IoSlice};

use tokio::net::TcpStream;

use super::Item;
use crate::protocol::Frame;

/// Most frames gathered into one `writev` (well under `IOV_MAX`, two
/// slices each).
pub const MAX_FRAMES_PER_WRITE: usize = 128;

/// The opcode byte (with FIN) and the payload of a queued item; `None` for
/// a mark (the session renders it).
pub fn parts(item: &Item) -> Option<(Option<u8>, &[u8])> {
    match item {
        Item::Frame(Frame::Text(t)) => Some((Some(0x81), t.as_bytes())),
        Item::Frame(Frame::Binary(b)) => Some((Some(0x82), b)),
        Item::Frame(Frame::Ping) => Some((Some(0x89), &[])),
        // FIN, RSV1 (compressed), text.
        Item::Frame(Frame::Deflated(b)) => Some((Some(0xc1), b)),
        Item::Raw(b) => Some((None, b)),
        Item::Mark(_) => None,
    }
}

/// A server frame's header for a payload of `len` bytes: its bytes in
/// `out`, and how many there are.
pub fn header(first: u8, len: usize, out: &mut [u8; 10]) -> usize {
    out[0] = first;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if let Ok(short) = u16::try_from(len) {
        out[1] = 126;
        out[2..4].copy_from_slice(&short.to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// Bytes an item takes on the wire.
pub fn wire_len(item: &Item) -> usize {
    match parts(item) {
        Some((Some(first), payload)) => header(first, payload.len(), &mut [0; 10]) + payload.len(),
        Some((None, payload)) => payload.len(),
        None => 0,
    }
}

/// Writes the frames at the front of `items` (up to the first mark, at
/// most [`MAX_FRAMES_PER_WRITE`]), the first from byte `offset` of its wire
/// form, with one non-blocking `writev`: the bytes the kernel took.
pub fn write_front<'a>(
    stream: &TcpStream,
    items: impl Iterator<Item = &'a Item>,
    offset: usize,
) -> io::Result<usize> {
    let mut headers = [[0u8; 10]; MAX_FRAMES_PER_WRITE];
    let mut lens = [0usize; MAX_FRAMES_PER_WRITE];
    let mut payloads: [&[u8]; MAX_FRAMES_PER_WRITE] = [&[]; MAX_FRAMES_PER_WRITE];
    let mut n = 0;
    for item in items.take(MAX_FRAMES_PER_WRITE) {
        let Some((first, payload)) = parts(item) else {
            break;
        };
        if let Some(first) = first {
            lens[n] = header(first, payload.len(), &mut headers[n]);
        }
        payloads[n] = payload;
        n += 1;
    }
    if n == 0 {
        return Ok(0);
    }
    let mut slices: [IoSlice<'_>; 2 * MAX_FRAMES_PER_WRITE] =
        [IoSlice::new(&[]); 2 * MAX_FRAMES_PER_WRITE];
    let mut used = 0;
    let mut skip = offset;
    for i in 0..n {
        for part in [&headers[i][..lens[i]], payloads[i]] {
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            slices[used] = IoSlice::new(&part[skip..]);
            skip = 0;
            used += 1;
        }
    }
    stream.try_write_vectored(&slices[..used])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_follow_rfc_6455_length_forms() {
        let mut h = [0; 10];
        assert_eq!(header(0x81, 5, &mut h), 2);
        assert_eq!(&h[..2], &[0x81, 5]);
        assert_eq!(header(0x82, 125, &mut h), 2);
        assert_eq!(&h[..2], &[0x82, 125]);
        assert_eq!(header(0x81, 126, &mut h), 4);
        assert_eq!(&h[..4], &[0x81, 126, 0, 126]);
        assert_eq!(header(0x81, 65535, &mut h), 4);
        assert_eq!(&h[..4], &[0x81, 126, 0xff, 0xff]);
        assert_eq!(header(0x81, 65536, &mut h), 10);
        assert_eq!(&h[..10], &[0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
    }

    #[test]
    fn wire_len_counts_header_and_payload() {
        assert_eq!(wire_len(&Item::Frame(Frame::text("abc".into()))), 5);
        assert_eq!(wire_len(&Item::Frame(Frame::Ping)), 2);
        assert_eq!(wire_len(&Item::Raw(bytes::Bytes::from_static(b"xyz"))), 3);
        // A deflated text message: FIN, RSV1, text; its compressed bytes
        // are what the queue and the wire count.
        let deflated = Item::Frame(Frame::Deflated(bytes::Bytes::from_static(&[0xab; 200])));
        assert_eq!(parts(&deflated).map(|p| p.0), Some(Some(0xc1)));
        assert_eq!(wire_len(&deflated), 4 + 200);
        assert_eq!(deflated.cost(), 200);
        assert_eq!(
            wire_len(&Item::Mark(crate::protocol::NoticeKind::Resumed)),
            0
        );
    }
}
