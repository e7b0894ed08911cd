//! The `presence_event` fuzz target: the checks are in `fuzz/bodies/presence_event.rs`
//! (shared with `tests/fuzz_bodies.rs`, which runs them on seeds with
//! `cargo test`, so they always compile); `docs/fuzzing.md` says what
//! they check.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../bodies/presence_event.rs"]
mod body;

fuzz_target!(|data: &[u8]| body::run(data));
