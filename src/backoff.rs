//! Reconnect delays, shared by the Redis pub/sub actor and the client.
//!
//! Exponential from a minimum, capped, with "equal jitter": the delay is
//! drawn between half and all of the exponential step, so that many nodes
//! (or clients) that lost the same peer at the same moment do not retry in
//! lockstep, while no delay ever exceeds the cap.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// The delay before retry number `failures + 1`: `min × 2^failures`, capped
/// at `max`, then scaled by a random factor in `0.5..=1.0`.
pub fn backoff(failures: u32, min: Duration, max: Duration) -> Duration {
    let base = min.saturating_mul(1 << failures.min(16)).min(max);
    // A fresh RandomState is seeded randomly: jitter without an RNG crate.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(failures);
    let jitter = (h.finish() % 1000) as f64 / 1000.0; // 0.0 .. 1.0
    base.mul_f64(1.0 - jitter / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_min_and_stays_within_the_cap() {
        let (min, max) = (Duration::from_millis(50), Duration::from_secs(2));
        for failures in 0..40 {
            let d = backoff(failures, min, max);
            assert!(d >= min / 2 && d <= max, "{failures}: {d:?}");
        }
        assert!(backoff(0, min, max) <= min);
        assert!(backoff(3, min, max) >= Duration::from_millis(200));
        assert!(backoff(30, min, max) >= max / 2);
    }

    #[test]
    fn reconnect_policy_of_the_redis_actor() {
        let (min, max) = (Duration::from_millis(50), Duration::from_secs(1));
        for failures in 0..40 {
            let d = backoff(failures, min, max);
            assert!(d >= min / 2 && d <= max, "{failures}: {d:?}");
        }
        assert!(backoff(1, min, max) < Duration::from_millis(200));
        assert!(backoff(30, min, max) >= max / 2);
    }
}
