//! Jump consistent hash (Lamping and Veach, "A Fast, Minimal Memory,
//! Consistent Hash Algorithm", 2014): which of `buckets` Redis shards owns a
//! channel. Chosen over `hash % n` because adding an (n+1)-th shard moves
//! only 1/(n+1) of the channels, and over a hash ring because it needs no
//! state and spreads evenly.

/// The bucket in `0..buckets` of `key` (0 when `buckets` is 0 or 1): the
/// published algorithm, step for step.
pub fn jump(mut key: u64, buckets: usize) -> usize {
    let buckets = i64::try_from(buckets).unwrap_or(i64::MAX);
    let (mut b, mut j): (i64, i64) = (-1, 0);
    while j < buckets {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    usize::try_from(b).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference values of ClickHouse's `jumpConsistentHash` tests
    /// (tests/queries/0_stateless/00580_consistent_hashing_functions), an
    /// implementation of the paper's code.
    #[test]
    fn matches_the_published_reference_values() {
        assert_eq!(jump(1, 1), 0);
        assert_eq!(jump(42, 57), 43);
        assert_eq!(jump(256, 1024), 520);
        assert_eq!(jump(3_735_883_980, 1), 0);
        assert_eq!(jump(3_735_883_980, 666), 361);
        assert_eq!(jump(16_045_690_984_833_335_023, 255), 237);
    }

    /// Growing from n to n + 1 buckets moves a key only to the new bucket.
    #[test]
    fn growing_moves_keys_only_to_the_new_bucket() {
        for key in 0..10_000u64 {
            let key = key.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let (before, after) = (jump(key, 3), jump(key, 4));
            assert!(after == before || after == 3, "{key}: {before} -> {after}");
        }
        assert_eq!(jump(7, 0), 0);
    }
}
