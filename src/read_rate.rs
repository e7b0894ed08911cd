//! How fast one reader may make the node read history
//! (`WSGATE_HISTORY_READ_RATE`, `docs/history.md`, Limits).
//!
//! A history read costs the node (and Redis) in proportion to the messages
//! it returns, so the bound is in messages, not requests: a token bucket of
//! `rate` messages that refills `rate` per second. Recoveries (`since` on a
//! subscribe, in every dialect) spend from their connection's [`Bucket`];
//! `GET /history` spends from its credential's bucket in [`Readers`] (the
//! token's `sub`, the API key, or, on an open node, the client's address).
//! A read takes what it may return before it starts and gives back what it
//! did not return once it ends, so the bucket measures messages read, and a
//! burst of concurrent reads cannot overdraw it.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::limits::SWEEP_INTERVAL;

/// `WSGATE_HISTORY_READ_RATE` when unset: one full recovery
/// ([`crate::history::RECOVERY_LIMIT`]) or one full page per second.
pub const DEFAULT_RATE: usize = 1000;

/// Most readers [`Readers`] tracks: a flood of distinct credentials or
/// addresses evicts idle ones, then is refused, instead of growing memory.
pub const MAX_READERS: usize = 65_536;

/// A token bucket of messages: holds at most `rate`, refills `rate` per
/// second. Not locked: a session owns its own; [`Readers`] locks its map.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: f64,
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    /// A full bucket of `rate` messages (at least one).
    pub fn new(rate: usize, now: Instant) -> Bucket {
        let rate = rate.max(1) as f64;
        Bucket {
            rate,
            tokens: rate,
            refilled: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let earned = now.saturating_duration_since(self.refilled).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.rate);
        self.refilled = now;
    }

    /// Whole messages it holds now.
    pub fn available(&mut self, now: Instant) -> usize {
        self.refill(now);
        self.tokens.floor().max(0.0) as usize
    }

    /// Takes up to `want` messages and says how many it took: all of them,
    /// what the bucket holds when that is less, 0 when it is empty.
    pub fn take_up_to(&mut self, want: usize, now: Instant) -> usize {
        self.refill(now);
        let took = (self.tokens.floor().max(0.0) as usize).min(want);
        self.tokens -= took as f64;
        took
    }

    /// Takes exactly `want` messages, or nothing and how long until the
    /// bucket holds them (`want` above the bucket's size waits for a full
    /// bucket: the read is then cut to that size by its caller).
    pub fn take(&mut self, want: usize, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        let want = (want as f64).min(self.rate);
        if self.tokens >= want {
            self.tokens -= want;
            return Ok(());
        }
        Err(Duration::from_secs_f64((want - self.tokens) / self.rate))
    }

    /// Gives back `n` messages taken and not read.
    pub fn refund(&mut self, n: usize, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens + n as f64).min(self.rate);
    }

    /// Full again: forgetting it changes no future answer.
    fn is_full(&self, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.refilled).as_secs_f64() * self.rate
            >= self.rate
    }
}

/// Why [`Readers::take`] refused a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// This reader's bucket is short: retry after this long.
    Rate(Duration),
    /// [`MAX_READERS`] readers are busy: retry a little later.
    Full,
}

impl Refused {
    /// Whole seconds for `Retry-After` (at least 1).
    pub fn retry_after_secs(self) -> u64 {
        match self {
            Refused::Rate(wait) => wait.as_secs_f64().ceil().max(1.0) as u64,
            Refused::Full => 1,
        }
    }
}

/// One bucket per reader of `GET /history`, at most `capacity` of them,
/// behind a mutex held only for a lookup (never across an await).
pub struct Readers {
    rate: usize,
    capacity: usize,
    table: Mutex<Table>,
}

struct Table {
    buckets: HashMap<String, Bucket>,
    swept: Option<Instant>,
}

impl Readers {
    /// Buckets of `rate` messages per second, at most `capacity` readers.
    pub fn new(rate: usize, capacity: usize) -> Readers {
        Readers {
            rate,
            capacity: capacity.max(1),
            table: Mutex::new(Table {
                buckets: HashMap::new(),
                swept: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `want` messages from `reader`'s bucket (see [`Bucket::take`]).
    /// A new reader finds a full bucket; when the table is full, readers
    /// whose buckets are full again are forgotten first (at most every
    /// [`SWEEP_INTERVAL`]), and if none can go the read is refused.
    pub fn take(&self, reader: &str, want: usize) -> Result<(), Refused> {
        let now = Instant::now();
        let mut table = self.lock();
        if !table.buckets.contains_key(reader) && table.buckets.len() >= self.capacity {
            let due = table
                .swept
                .is_none_or(|at| now.duration_since(at) >= SWEEP_INTERVAL);
            if due {
                table.swept = Some(now);
                table.buckets.retain(|_, b| !b.is_full(now));
            }
            if table.buckets.len() >= self.capacity {
                return Err(Refused::Full);
            }
        }
        let rate = self.rate;
        table
            .buckets
            .entry(reader.to_owned())
            .or_insert_with(|| Bucket::new(rate, now))
            .take(want, now)
            .map_err(Refused::Rate)
    }

    /// Gives back `n` messages `reader` took and did not read; a bucket
    /// full again is forgotten.
    pub fn refund(&self, reader: &str, n: usize) {
        let now = Instant::now();
        let mut table = self.lock();
        let full = table.buckets.get_mut(reader).is_some_and(|b| {
            b.refund(n, now);
            b.is_full(now)
        });
        if full {
            table.buckets.remove(reader);
        }
    }

    /// Readers tracked now (for tests).
    pub fn tracked(&self) -> usize {
        self.lock().buckets.len()
    }

    /// The size of every reader's bucket (the most one read may take).
    pub fn rate(&self) -> usize {
        self.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_spends_refills_and_refunds() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100, t0);
        assert_eq!(b.take_up_to(60, t0), 60);
        assert_eq!(b.take_up_to(60, t0), 40);
        assert_eq!(b.take_up_to(60, t0), 0);
        b.refund(10, t0);
        assert_eq!(b.take_up_to(60, t0), 10);
        // 100 per second: 0.5 s later, 50.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(b.take_up_to(60, t1), 50);
        let wait = b.take(20, t1).unwrap_err();
        assert!((wait.as_secs_f64() - 0.2).abs() < 1e-6, "{wait:?}");
        // Never more than its size.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!(b.take_up_to(1000, t2), 100);
        assert!(
            b.take(1000, t2 + Duration::from_secs(1)).is_ok(),
            "capped at size"
        );
    }

    #[test]
    fn readers_are_separate_and_bounded() {
        let r = Readers::new(10, 2);
        assert_eq!(r.take("a", 10), Ok(()));
        let Err(Refused::Rate(wait)) = r.take("a", 5) else {
            panic!("not refused");
        };
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500));
        assert_eq!(Refused::Rate(wait).retry_after_secs(), 1);
        assert_eq!(r.take("b", 3), Ok(()));
        // Two readers tracked, neither full: a third is refused.
        assert_eq!(r.take("c", 1), Err(Refused::Full));
        // b gets its 3 back: full again, forgotten, room for c.
        r.refund("b", 3);
        assert_eq!(r.tracked(), 1);
        assert_eq!(r.take("c", 1), Ok(()));
    }
}
