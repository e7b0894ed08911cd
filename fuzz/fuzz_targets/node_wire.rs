//! Fuzzes the node channel wire (`wsgate::rpc::wire`): what one node reads
//! from another's `PUBLISH` (or anyone's, Redis being trusted but not
//! always careful).
//!
//! Checks, for any input: `Wire::decode` never panics, and whatever it
//! accepts encodes to bytes that decode to a message encoding to the same
//! bytes (so a relayed reply or order means what it meant).

#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate::rpc::wire::Wire;

fuzz_target!(|data: &[u8]| {
    let Some(message) = Wire::decode(data) else {
        return;
    };
    let once = message.encode();
    let again = Wire::decode(&once).expect("an encoded message decodes");
    assert_eq!(again.encode(), once);
});
