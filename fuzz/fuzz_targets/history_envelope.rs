//! Fuzzes `history::open`, which reads bytes any Redis publisher can send
//! on a history channel: it must never panic, the payload it hands on must
//! be the input's tail, untouched, and what `history::envelope` writes for
//! what it read must read back the same (not always the same bytes: an
//! offset with leading zeros, which only a hand-made PUBLISH sends, is read
//! as its value).

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use wsgate::history::{envelope, open};

fuzz_target!(|data: &[u8]| {
    let message = Bytes::copy_from_slice(data);
    if let Some((position, payload)) = open(&message) {
        assert!(position.offset > 0);
        assert!(message.ends_with(&payload));
        let again = envelope(&position, &payload);
        assert_eq!(open(&again), Some((position, payload)));
    }
});
