//! Fuzzes `Native::delivery`: for any topic, channel and payload bytes the
//! rendered frame must be one valid JSON object (as `serde_json` reads it)
//! that carries the payload without losing a byte, as docs/protocol.md says.
//!
//! Input layout: byte 0 = flags (bit 0: pattern subscription; bit 1: nest
//! the payload, see below), byte 1 = length of the pattern, byte 2 = length
//! of the channel, then the pattern, the channel, and the rest is the
//! payload. Whatever is missing is empty. With bit 1 set, the first payload
//! byte `d` is taken off and the payload is wrapped in `d` levels of `[`
//! `]`: deep nesting, which byte-level mutation alone rarely builds, is
//! where JSON readers have limits.

#![no_main]

use base64::Engine as _;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use wsgate::broker::{BrokerMessage, Topic};
use wsgate::protocol::native::Native;
use wsgate::protocol::Frame;

/// Splits `n` bytes off the front of `data` (fewer if it is shorter).
fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, tail) = data.split_at(n.min(data.len()));
    *data = tail;
    head
}

fuzz_target!(|data: &[u8]| {
    let mut data = data;
    let header = take(&mut data, 3);
    let flags = header.first().copied().unwrap_or(0);
    let pattern_len = header.get(1).copied().unwrap_or(0) as usize;
    let channel_len = header.get(2).copied().unwrap_or(0) as usize;
    let pattern = take(&mut data, pattern_len);
    let channel = take(&mut data, channel_len);
    let nested;
    let payload = if flags & 2 == 2 {
        let depth = take(&mut data, 1).first().copied().unwrap_or(0) as usize;
        nested = [&b"[".repeat(depth), data, &b"]".repeat(depth)].concat();
        &nested[..]
    } else {
        data
    };

    let topic = if flags & 1 == 1 {
        Topic::Pattern(Bytes::copy_from_slice(pattern))
    } else {
        Topic::Channel(Bytes::copy_from_slice(channel))
    };
    let msg = BrokerMessage {
        topic: topic.clone(),
        channel: Bytes::copy_from_slice(channel),
        payload: Bytes::copy_from_slice(payload),
        // Without a history position: no `offset` or `epoch` keys (below).
        position: None,
    };
    let frame = Native.delivery(&msg);
    let Frame::Text(text) = frame else {
        panic!("delivery is not a text frame: {frame:?}");
    };
    let text: &str = text.as_str();

    // 1. The whole frame is valid JSON, and an object.
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => panic!("delivery frame is not valid JSON ({e}): {text:?}"),
    };
    let Value::Object(obj) = value else {
        panic!("delivery frame is not a JSON object: {text:?}");
    };

    // 2. The envelope: action, channel, pattern (only for patterns), no extras.
    assert_eq!(obj.get("action"), Some(&Value::from("message")), "{text}");
    let lossy = |b: &[u8]| Value::from(String::from_utf8_lossy(b).into_owned());
    assert_eq!(obj.get("channel"), Some(&lossy(channel)), "{text}");
    match &topic {
        Topic::Pattern(p) => assert_eq!(obj.get("pattern"), Some(&lossy(p)), "{text}"),
        Topic::Channel(_) => assert!(!obj.contains_key("pattern"), "{text}"),
    }
    for key in obj.keys() {
        assert!(
            ["action", "pattern", "channel", "payload", "encoding"].contains(&key.as_str()),
            "unexpected key {key:?} in {text}"
        );
    }

    // 3. The payload round-trips.
    let got = obj.get("payload").expect("no payload field");
    match obj.get("encoding") {
        Some(enc) => {
            assert_eq!(enc, &Value::from("base64"), "{text}");
            assert!(
                std::str::from_utf8(payload).is_err(),
                "UTF-8 payload sent as base64: {text}"
            );
            let Value::String(b64) = got else {
                panic!("base64 payload is not a string: {text}");
            };
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .expect("payload is not valid base64");
            assert_eq!(decoded, payload, "base64 payload differs: {text}");
        }
        None => {
            let original = std::str::from_utf8(payload)
                .unwrap_or_else(|_| panic!("non-UTF-8 payload without encoding: {text}"));
            match serde_json::from_str::<Value>(original) {
                // Deeper than the gateway embeds (serde_json's limit minus the
                // frame's own level): delivered as a string instead.
                Ok(parsed) if depth(&parsed) > 126 => {
                    assert_eq!(got, &Value::from(original), "deep payload not stringified: {text}");
                }
                Ok(parsed) => {
                    assert_eq!(got, &parsed, "JSON payload changed: {text}");
                    // Embedded byte for byte, as the docs promise.
                    assert!(
                        text.contains(original),
                        "JSON payload not embedded verbatim: {text}"
                    );
                }
                Err(_) => {
                    assert_eq!(
                        got,
                        &Value::from(original),
                        "text payload not carried as the same string: {text}"
                    );
                }
            }
        }
    }
});

/// Nesting depth of a JSON value (a scalar is 0, `[]` is 1).
fn depth(v: &Value) -> usize {
    match v {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}
