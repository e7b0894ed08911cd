//! permessage-deflate (RFC 7692) for the WebSocket transport
//! (`WSGATE_COMPRESSION`, `docs/design.md`, "Compression").
//!
//! - [`offer`]: reading the client's `Sec-WebSocket-Extensions` offers and
//!   phrasing the one answer we give.
//! - [`inflate`]: a read shim under the WebSocket library that inflates the
//!   client's compressed messages within the message size limit.
//! - this file: deflating a delivery once per message ([`DeflateRender`], a
//!   render key of its own), and the conversation wrapper that gives a
//!   session that render.
//!
//! We always agree `server_no_context_takeover`: each message is deflated
//! on its own, so its compressed bytes are the same for every subscriber
//! and one deflate serves them all. We always answer
//! `client_no_context_takeover` too (RFC 7692 section 7.1.1.2 lets a server
//! add it to any accepted offer), so a socket keeps no inflate window
//! between messages: idle sockets stay small.

pub mod inflate;
pub mod offer;

use std::cell::RefCell;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use flate2::{Compress, Compression, FlushCompress};

use crate::broker::BrokerMessage;
use crate::protocol::{Answer, Conversation, Frame, Inbound, Notice, Render, Step};

/// Messages shorter than this go out uncompressed (RSV1 is per message): a
/// reply or a short delivery gains a few bytes at best, and costs a deflate.
pub const MIN_DEFLATE_BYTES: usize = 256;

/// The trailer a sync flush ends with; RFC 7692 section 7.2.1 has the
/// sender drop it and the receiver put it back.
pub const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The speed the once-per-message deflate runs at: level 1 (fastest). A
/// delivery's deflate is paid once per render key, but a channel with one
/// subscriber pays it per delivery; JSON's repetitions are caught by the
/// fast level nearly as well as by the default.
const LEVEL: u32 = 1;

/// What a client and we agreed for one socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// `server_max_window_bits` (15 when the client did not limit it).
    /// miniz_oxide always deflates with a 32 KiB window, so a message longer
    /// than `1 << window_bits` goes out uncompressed: its back references
    /// could reach further than the client agreed to keep.
    pub window_bits: u8,
}

impl Agreed {
    /// Longest message deflated under this agreement.
    pub fn max_deflate(&self) -> usize {
        1usize << self.window_bits.min(15)
    }
}

thread_local! {
    /// One compressor per thread, reset between messages: a compressor is
    /// some 300 KiB of tables, too much to build per message, and a message
    /// is deflated in one call, so nothing is kept between uses.
    static COMPRESSOR: RefCell<Option<Compress>> = const { RefCell::new(None) };
}

/// `payload` as one raw DEFLATE message without the sync-flush tail (RFC
/// 7692 section 7.2.1), or `None` when that would not be shorter.
pub fn deflate(payload: &[u8]) -> Option<Bytes> {
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let z = cell.get_or_insert_with(|| Compress::new(Compression::new(LEVEL), false));
        z.reset();
        let mut out = Vec::with_capacity(payload.len() / 2 + 64);
        loop {
            let read = usize::try_from(z.total_in()).ok()?;
            let rest = payload.get(read..)?;
            if out.len() == out.capacity() {
                out.reserve(out.capacity().max(64));
            }
            z.compress_vec(rest, &mut out, FlushCompress::Sync).ok()?;
            let done = usize::try_from(z.total_in()).ok()? == payload.len();
            // A sync flush is complete when it had room to spare.
            if done && out.len() < out.capacity() {
                break;
            }
            if out.len() > payload.len() + TAIL.len() {
                return None;
            }
        }
        if !out.ends_with(&TAIL) {
            return None;
        }
        out.truncate(out.len() - TAIL.len());
        (out.len() < payload.len()).then(|| Bytes::from(out))
    })
}

/// A frame as it goes to a member that agreed compression: a long enough
/// text frame, deflated; anything else as it was.
pub fn compressed(frame: Frame, agreed: Agreed) -> Frame {
    match &frame {
        Frame::Text(t) if t.len() >= MIN_DEFLATE_BYTES && t.len() <= agreed.max_deflate() => {
            deflate(t.as_bytes()).map_or(frame, Frame::Deflated)
        }
        _ => frame,
    }
}

/// A made key: the inner key, the window, and the key.
type KeyEntry = (&'static str, u8, &'static str);

/// The render key of `inner`'s deliveries deflated under `agreed`: members
/// must not share renderings with the uncompressed key nor with another
/// window. Keys are `&'static str`, so each distinct pair is made once and
/// kept (a handful: dialects times windows).
fn key_for(inner: &'static str, agreed: Agreed) -> &'static str {
    static KEYS: OnceLock<Mutex<Vec<KeyEntry>>> = OnceLock::new();
    let keys = KEYS.get_or_init(|| Mutex::new(Vec::new()));
    let mut keys = match keys.lock() {
        Ok(k) => k,
        Err(poisoned) => poisoned.into_inner(),
    };
    if let Some((_, _, key)) = keys
        .iter()
        .find(|(k, w, _)| *k == inner && *w == agreed.window_bits)
    {
        return key;
    }
    let key: &'static str = Box::leak(format!("{inner}+deflate{}", agreed.window_bits).into());
    keys.push((inner, agreed.window_bits, key));
    key
}

/// A dialect's render whose frames are deflated once per message, under a
/// render key of its own (the hub knows only the key).
pub struct DeflateRender {
    inner: Arc<dyn Render>,
    agreed: Agreed,
    key: &'static str,
}

impl DeflateRender {
    /// Wraps `inner` for members that agreed `agreed`.
    pub fn new(inner: Arc<dyn Render>, agreed: Agreed) -> DeflateRender {
        let key = key_for(inner.key(), agreed);
        DeflateRender { inner, agreed, key }
    }
}

impl Render for DeflateRender {
    fn key(&self) -> &'static str {
        self.key
    }

    fn delivery(&self, message: &BrokerMessage) -> Option<Frame> {
        self.inner
            .delivery(message)
            .map(|f| compressed(f, self.agreed))
    }

    fn notice(&self, notice: &Notice<'_>) -> Option<Frame> {
        self.inner
            .notice(notice)
            .map(|f| compressed(f, self.agreed))
    }

    fn once_per_publish(&self) -> bool {
        self.inner.once_per_publish()
    }
}

/// A dialect's conversation whose deliveries are deflated: only its render
/// changes. Replies stay as the dialect made them (short, and made once per
/// connection, they would gain little for a deflate each).
pub struct DeflateConversation {
    inner: Box<dyn Conversation>,
    render: Arc<dyn Render>,
}

impl DeflateConversation {
    /// Wraps `inner` for a socket that agreed `agreed`.
    pub fn new(inner: Box<dyn Conversation>, agreed: Agreed) -> DeflateConversation {
        let render = Arc::new(DeflateRender::new(inner.render(), agreed));
        DeflateConversation { inner, render }
    }
}

impl Conversation for DeflateConversation {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn render(&self) -> Arc<dyn Render> {
        self.render.clone()
    }

    fn open(&mut self, steps: &mut Vec<Step>) {
        self.inner.open(steps)
    }

    fn decode(&mut self, inbound: Inbound<'_>, steps: &mut Vec<Step>) {
        self.inner.decode(inbound, steps)
    }

    fn answer(&mut self, answer: Answer<'_>, out: &mut Vec<Frame>) {
        self.inner.answer(answer, out)
    }

    fn release(&mut self) -> Option<Frame> {
        self.inner.release()
    }

    fn linger(&self) -> Option<Duration> {
        self.inner.linger()
    }

    fn key(&self) -> Option<&str> {
        self.inner.key()
    }

    fn adopt(&mut self, key: &str) -> bool {
        self.inner.adopt(key)
    }

    fn unknown(&mut self, inbound: Inbound<'_>, key: &str) -> Option<Frame> {
        self.inner.unknown(inbound, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Decompress, FlushDecompress};

    fn inflate(data: &[u8]) -> Vec<u8> {
        let mut z = Decompress::new(false);
        let mut input = data.to_vec();
        input.extend_from_slice(&TAIL);
        let mut out = Vec::with_capacity(1 << 20);
        z.decompress_vec(&input, &mut out, FlushDecompress::Sync)
            .unwrap();
        out
    }

    #[test]
    fn deflate_round_trips_without_the_tail() {
        let text = r#"{"type":"message","channel":"news","data":"#.repeat(40);
        let d = deflate(text.as_bytes()).unwrap();
        assert!(d.len() < text.len() / 4, "{} of {}", d.len(), text.len());
        assert!(!d.ends_with(&TAIL));
        assert_eq!(inflate(&d), text.as_bytes());
        // The compressor is reused: a second message is independent.
        let again = deflate(text.as_bytes()).unwrap();
        assert_eq!(again, d);
    }

    #[test]
    fn incompressible_or_short_frames_stay_as_they_are() {
        let agreed = Agreed { window_bits: 15 };
        let short = Frame::text("x".repeat(MIN_DEFLATE_BYTES - 1));
        assert_eq!(compressed(short.clone(), agreed), short);
        let long = Frame::text("y".repeat(1000));
        assert!(matches!(
            compressed(long.clone(), agreed),
            Frame::Deflated(_)
        ));
        let small_window = Agreed { window_bits: 9 };
        assert_eq!(compressed(long.clone(), small_window), long);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..2000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert_eq!(deflate(&noise), None);
    }

    #[test]
    fn keys_differ_by_window_and_are_made_once() {
        let a = key_for("native", Agreed { window_bits: 15 });
        let b = key_for("native", Agreed { window_bits: 15 });
        let c = key_for("native", Agreed { window_bits: 10 });
        assert!(std::ptr::eq(a, b));
        assert_eq!(a, "native+deflate15");
        assert_ne!(a, c);
    }
}
