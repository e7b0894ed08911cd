//! Fuzzes permessage-deflate's two readers of client bytes: the inflating
//! frame codec (`wsgate::deflate::inflate::Inflater`) and the
//! `Sec-WebSocket-Extensions` offer parser (`wsgate::deflate::offer`).
//!
//! Checks, for any input:
//! - the codec never panics and never spins: each `feed` either uses
//!   input or makes output, and its output stays within one piece
//!   (`PIECE_BYTES` plus a few headers) however much the input inflates;
//! - what it makes, fed all at once or in small steps, is the same
//!   messages: the joined payload of the data frames it emits is the same
//!   byte string (frame boundaries may differ);
//! - the offer parser never panics, and our answer to an accepted offer
//!   is itself an offer we accept, with the same window.
//!
//! Input: byte 0 picks the step size, the rest is the client's stream (and,
//! as text, a header value).

#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate::deflate::inflate::{Inflater, PIECE_BYTES};
use wsgate::deflate::offer;

const LIMIT: usize = 64 * 1024;

/// Runs the codec over `input` in `step`-byte reads, draining its output
/// after each feed as the shim does; everything it made.
fn run(input: &[u8], step: usize) -> Vec<u8> {
    let mut codec = Inflater::new(LIMIT);
    let mut all = Vec::new();
    let mut pending = Vec::new();
    for piece in input.chunks(step.max(1)) {
        pending.extend_from_slice(piece);
        loop {
            let mut out = Vec::new();
            let used = codec.feed(&pending, &mut out);
            assert!(out.len() <= PIECE_BYTES + 64, "one piece: {}", out.len());
            pending.drain(..used);
            let progress = used > 0 || !out.is_empty();
            all.extend_from_slice(&out);
            if !progress && !codec.finishing() {
                break;
            }
            assert!(progress, "no progress while finishing");
        }
    }
    all
}

/// The messages the data frames in `wire` make, joined: only whole ones
/// (a message cut by a failure, "too big", or the end of input is dropped:
/// where a failure is seen depends on the reads), up to the first frame that
/// does not parse.
fn data(mut wire: &[u8]) -> Vec<u8> {
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
            message.extend(wire[at..at + len].iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
            if wire[0] & 0x80 != 0 {
                joined.append(&mut message);
            }
        }
        wire = &wire[at + len..];
    }
    joined
}

fuzz_target!(|input: &[u8]| {
    let Some((&step, stream)) = input.split_first() else {
        return;
    };
    let whole = run(stream, stream.len());
    let stepped = run(stream, usize::from(step % 16) + 1);
    assert_eq!(data(&whole), data(&stepped), "same messages whatever the reads");

    if let Some((agreed, answer)) = offer::negotiate([stream]) {
        let again = offer::negotiate([answer.as_bytes()]).expect("our answer is acceptable");
        assert_eq!(again.0, agreed);
    }
});
