//! The `sse_last_event_id` fuzz target: the checks are in `fuzz/bodies/sse_last_event_id.rs`
//! (shared with `tests/fuzz_bodies.rs`, which runs them on seeds with
//! `cargo test`, so they always compile); `docs/fuzzing.md` says what
//! they check.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../bodies/sse_last_event_id.rs"]
mod body;

fuzz_target!(|data: &[u8]| body::run(data));
