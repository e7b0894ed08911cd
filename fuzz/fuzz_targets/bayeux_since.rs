//! The `bayeux_since` fuzz target: the checks are in `fuzz/bodies/bayeux_since.rs`
//! (shared with `tests/fuzz_bodies.rs`, which runs them on seeds with
//! `cargo test`, so they always compile); `docs/fuzzing.md` says what
//! they check.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../bodies/bayeux_since.rs"]
mod body;

fuzz_target!(|data: &[u8]| body::run(data));
