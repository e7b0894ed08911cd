//! Fuzzes the Engine.IO 3 codec (`wsgate::transport::engineio::packet`)
//! and the realizehit conversation behind it.
//!
//! Checks, for any input:
//! - `decode_string_payload`, `decode_binary_payload` and `decode_packet`
//!   never panic;
//! - payloads round-trip: every packet text a decoder returns, framed again
//!   by `push_string_packet` / `push_binary_packet`, decodes to the same
//!   packets (so the length prefixes count UTF-8 bytes both ways);
//! - a string payload's lengths agree with an independent count: the
//!   framed body of a packet is `len:` plus two wire bytes per byte from
//!   0x80;
//! - every packet decoded is served by a realizehit conversation (wrapped
//!   as message packets) without panicking, and every frame it writes is
//!   a `4` followed by one valid JSON value.
//!
//! Input: the bytes, read as a string payload (when UTF-8) and as a binary
//! payload.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use wsgate::protocol::{Conversation, Frame, Inbound, Step};
use wsgate::transport::engineio::framing::PacketConversation;
use wsgate::transport::engineio::packet::{
    decode_binary_payload, decode_packet, decode_string_payload, push_binary_packet,
    push_string_packet, Kind,
};
use wsgate::protocol::realizehit::{self, RealizehitConversation};

fn check_frame(f: &Frame) {
    let text = f.as_text().expect("a text frame");
    let json = text.strip_prefix('4').expect("a message packet");
    serde_json::from_str::<Value>(json).expect("one JSON value");
}

fn serve(packets: &[String]) {
    let mut conv = PacketConversation::new(Box::new(RealizehitConversation::new(
        realizehit::render(),
    )));
    for p in packets {
        let Ok(packet) = decode_packet(p) else {
            continue;
        };
        if packet.kind != Kind::Message {
            continue;
        }
        let mut steps = Vec::new();
        conv.decode(Inbound::Text(packet.data), &mut steps);
        for step in &steps {
            if let Step::Reply(f) | Step::Malformed(f) = step {
                check_frame(f);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(packets) = decode_string_payload(text) {
            let mut body = Vec::new();
            let mut wire = 0usize;
            for p in &packets {
                push_string_packet(&mut body, p);
                let bytes = p.len();
                wire += bytes.to_string().len() + 1 + bytes + p.bytes().filter(|b| *b >= 0x80).count();
            }
            assert_eq!(body.len(), wire);
            let again = std::str::from_utf8(&body).expect("framing writes UTF-8");
            let empty = packets.is_empty();
            match decode_string_payload(again) {
                Ok(back) => assert_eq!(back, packets),
                Err(_) => assert!(empty, "a re-framed payload failed to decode"),
            }
            serve(&packets);
        }
    }
    if let Ok(packets) = decode_binary_payload(data) {
        let mut body = Vec::new();
        for p in &packets {
            push_binary_packet(&mut body, p);
        }
        assert_eq!(decode_binary_payload(&body).expect("re-framed"), packets);
        serve(&packets);
    }
});
