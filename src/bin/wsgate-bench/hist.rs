//! A small log-linear latency histogram (values in microseconds).
//!
//! Values below 256 µs get a bucket each; above, every power of two is split
//! into 128 equal buckets, so a bucket is at most 1/128 (0.8%) of its values
//! wide. Values beyond 2^36 µs (19 hours) are clamped. The bucket array is
//! allocated on the first record, so a socket that never receives anything
//! costs nothing.

/// Linear buckets below `2^SUB_BITS`; `2^(SUB_BITS-1)` buckets per octave above.
const SUB_BITS: u32 = 8;
/// Largest exponent kept: values are clamped below `2^MAX_EXP`.
const MAX_EXP: u32 = 36;
const LINEAR: usize = 1 << SUB_BITS;
const HALF: usize = 1 << (SUB_BITS - 1);
const BUCKETS: usize = LINEAR + (MAX_EXP - SUB_BITS) as usize * HALF;

/// Counts of values by bucket, plus exact count, sum, min and max.
#[derive(Clone, Default)]
pub(crate) struct Hist {
    counts: Vec<u64>,
    total: u64,
    sum: u128,
    max: u64,
    min: u64,
}

/// Bucket index of `v`.
fn index(v: u64) -> usize {
    let v = v.min((1u64 << MAX_EXP) - 1);
    if v < LINEAR as u64 {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // >= SUB_BITS
    let shift = e - (SUB_BITS - 1); // >= 1
    let m = (v >> shift) as usize; // in [HALF, LINEAR)
    LINEAR + (shift as usize - 1) * HALF + (m - HALF)
}

/// Lowest value and width of bucket `i`.
fn bounds(i: usize) -> (u64, u64) {
    if i < LINEAR {
        return (i as u64, 1);
    }
    let shift = ((i - LINEAR) / HALF + 1) as u32;
    let m = ((i - LINEAR) % HALF + HALF) as u64;
    (m << shift, 1u64 << shift)
}

impl Hist {
    /// Records one value.
    pub(crate) fn record(&mut self, v: u64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS];
            self.min = u64::MAX;
        }
        if let Some(c) = self.counts.get_mut(index(v)) {
            *c += 1;
        }
        self.total += 1;
        self.sum += u128::from(v);
        self.max = self.max.max(v);
        self.min = self.min.min(v);
    }

    /// Adds every value of `other`.
    pub(crate) fn merge(&mut self, other: &Hist) {
        if other.total == 0 {
            return;
        }
        if self.counts.is_empty() {
            *self = other.clone();
            return;
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += *b;
        }
        self.total += other.total;
        self.sum += other.sum;
        self.max = self.max.max(other.max);
        self.min = self.min.min(other.min);
    }

    /// Number of values recorded.
    pub(crate) fn count(&self) -> u64 {
        self.total
    }

    /// Largest value recorded (exact), 0 if none.
    pub(crate) fn max(&self) -> u64 {
        self.max
    }

    /// Mean (exact), 0 if none.
    pub(crate) fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// The value at quantile `q` (0..=1): the middle of its bucket, never
    /// above the exact maximum nor below the exact minimum. 0 if empty.
    pub(crate) fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += *c;
            if seen >= rank {
                let (low, width) = bounds(i);
                return (low + (width - 1) / 2).clamp(self.min, self.max);
            }
        }
        self.max
    }
}

/// Histograms shared by many tasks: each thread records into its own shard
/// (an uncontended lock on a histogram that stays in that core's cache),
/// rather than each socket touching its own cold histogram.
pub(crate) struct Sharded {
    shards: Vec<std::sync::Mutex<Hist>>,
}

/// Shards per [`Sharded`]; threads beyond this share shards (still correct).
const SHARDS: usize = 32;

thread_local! {
    static SHARD: usize = {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % SHARDS
    };
}

impl Sharded {
    pub(crate) fn new() -> Sharded {
        Sharded {
            shards: (0..SHARDS).map(|_| Default::default()).collect(),
        }
    }

    /// Records `v` in this thread's shard.
    pub(crate) fn record(&self, v: u64) {
        let i = SHARD.with(|s| *s);
        if let Some(Ok(mut h)) = self.shards.get(i).map(|m| m.lock()) {
            h.record(v);
        }
    }

    /// All shards merged.
    pub(crate) fn merged(&self) -> Hist {
        let mut all = Hist::default();
        for s in &self.shards {
            if let Ok(h) = s.lock() {
                all.merge(&h);
            }
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_narrow() {
        let mut prev = (0u64, 1u64);
        for i in 1..BUCKETS {
            let (low, width) = bounds(i);
            assert_eq!(low, prev.0 + prev.1, "bucket {i}");
            assert_eq!(index(low), i);
            assert_eq!(index(low + width - 1), i);
            if low >= LINEAR as u64 {
                assert!(width as f64 / low as f64 <= 1.0 / 128.0 + 1e-12);
            }
            prev = (low, width);
        }
    }

    #[test]
    fn quantiles_within_one_percent() {
        let mut h = Hist::default();
        for v in 1..=100_000u64 {
            h.record(v);
        }
        for (q, want) in [(0.5, 50_000.0), (0.9, 90_000.0), (0.99, 99_000.0)] {
            let got = h.quantile(q) as f64;
            assert!((got - want).abs() / want < 0.01, "q{q}: {got}");
        }
        assert_eq!(h.max(), 100_000);
        assert_eq!(h.quantile(1.0), 100_000);
        let mut m = Hist::default();
        m.merge(&h);
        m.merge(&h);
        assert_eq!(m.count(), 200_000);
    }
}
