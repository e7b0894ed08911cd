//! The in-memory handoff store, for the embedded broker's single node.
//!
//! There is no other node to adopt a session, but the Bayeux code runs the
//! same way on both stores (offer at the handshake, take or withdraw at the
//! first message), so the semantics are Redis's: `SET NX` with a TTL,
//! `GETDEL`. The map is bounded in entries ([`MAX_ENTRIES`]): expired records
//! are purged on every insert, oldest expiry first, and an offer into a full
//! store of live records is refused ([`HandoffError::Full`]) rather than
//! evicting a session a client is about to use.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::HandoffError;

/// Most records held at once: about 100 bytes plus the record each (a few
/// hundred bytes of claims), so tens of MiB at worst. Records live for a
/// handshake's TTL (seconds), so this many unclaimed handshakes at once is
/// already an attack or a broken client.
pub const MAX_ENTRIES: usize = 100_000;

/// The in-process store; cloning gives another handle to the same map.
#[derive(Clone)]
pub struct MemoryHandoff {
    /// A plain mutex: held only for map operations, never across an await.
    inner: Arc<Mutex<Store>>,
}

/// The records, and their expiries in order for purging.
struct Store {
    max: usize,
    records: HashMap<String, Entry>,
    /// `(expires, seq, client_id)` of every record, soonest first; `seq`
    /// makes equal instants distinct.
    expiries: BTreeSet<(Instant, u64, String)>,
    next_seq: u64,
}

struct Entry {
    record: Bytes,
    expires: Instant,
    seq: u64,
}

impl MemoryHandoff {
    /// An empty store holding at most `max` records.
    pub fn new(max: usize) -> MemoryHandoff {
        MemoryHandoff {
            inner: Arc::new(Mutex::new(Store {
                max,
                records: HashMap::new(),
                expiries: BTreeSet::new(),
                next_seq: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        // Every method leaves the store consistent between statements that
        // can only panic on allocation failure: reuse it after a panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `SET client_id record PX ttl NX`.
    pub(super) fn offer(
        &self,
        client_id: &str,
        record: Bytes,
        ttl: Duration,
    ) -> Result<(), HandoffError> {
        self.lock().offer(client_id, record, ttl, Instant::now())
    }

    /// `GETDEL client_id`.
    pub(super) fn take(&self, client_id: &str) -> Option<Bytes> {
        self.lock().take(client_id, Instant::now())
    }

    /// Records held, expired ones not yet purged included.
    pub fn len(&self) -> usize {
        self.lock().records.len()
    }

    /// True when no record is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Store {
    fn offer(
        &mut self,
        client_id: &str,
        record: Bytes,
        ttl: Duration,
        now: Instant,
    ) -> Result<(), HandoffError> {
        self.purge(now);
        if self.records.contains_key(client_id) {
            return Err(HandoffError::Exists);
        }
        if self.records.len() >= self.max {
            return Err(HandoffError::Full);
        }
        // A TTL beyond what an Instant can hold is a year: still far longer
        // than any handshake waits.
        let expires = now
            .checked_add(ttl)
            .or_else(|| now.checked_add(Duration::from_secs(86_400 * 365)))
            .unwrap_or(now);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.expiries.insert((expires, seq, client_id.to_owned()));
        self.records.insert(
            client_id.to_owned(),
            Entry {
                record,
                expires,
                seq,
            },
        );
        Ok(())
    }

    fn take(&mut self, client_id: &str, now: Instant) -> Option<Bytes> {
        let entry = self.records.remove(client_id)?;
        self.expiries
            .remove(&(entry.expires, entry.seq, client_id.to_owned()));
        (entry.expires > now).then_some(entry.record)
    }

    /// Drops every record expired at `now`.
    fn purge(&mut self, now: Instant) {
        while let Some(first) = self.expiries.first() {
            if first.0 > now {
                break;
            }
            if let Some((_, _, id)) = self.expiries.pop_first() {
                self.records.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(max: usize) -> Store {
        Store {
            max,
            records: HashMap::new(),
            expiries: BTreeSet::new(),
            next_seq: 0,
        }
    }

    const TTL: Duration = Duration::from_secs(10);

    #[test]
    fn offer_then_take_once() {
        let mut s = store(10);
        let t0 = Instant::now();
        s.offer("a", Bytes::from_static(b"rec"), TTL, t0).unwrap();
        assert_eq!(
            s.offer("a", Bytes::from_static(b"other"), TTL, t0),
            Err(HandoffError::Exists)
        );
        assert_eq!(s.take("a", t0), Some(Bytes::from_static(b"rec")));
        assert_eq!(s.take("a", t0), None);
        assert_eq!(s.take("never", t0), None);
        assert!(s.records.is_empty() && s.expiries.is_empty());
    }

    #[test]
    fn records_expire() {
        let mut s = store(10);
        let t0 = Instant::now();
        s.offer("a", Bytes::from_static(b"1"), TTL, t0).unwrap();
        // Expired but not purged yet: a take finds nothing, and cleans up.
        assert_eq!(s.take("a", t0 + TTL), None);
        assert!(s.records.is_empty() && s.expiries.is_empty());
        // An expired record does not block an offer of the same id.
        s.offer("b", Bytes::from_static(b"1"), TTL, t0).unwrap();
        s.offer("b", Bytes::from_static(b"2"), TTL, t0 + TTL)
            .unwrap();
        assert_eq!(s.take("b", t0 + TTL), Some(Bytes::from_static(b"2")));
    }

    #[test]
    fn full_of_live_records_refuses_and_purges_expired_ones_first() {
        let mut s = store(3);
        let t0 = Instant::now();
        let short = Duration::from_secs(1);
        s.offer("a", Bytes::new(), short, t0).unwrap();
        s.offer("b", Bytes::new(), TTL, t0).unwrap();
        s.offer("c", Bytes::new(), short, t0).unwrap();
        assert_eq!(s.offer("d", Bytes::new(), TTL, t0), Err(HandoffError::Full));
        // Once a and c expired, the insert purges them and fits.
        let later = t0 + short;
        s.offer("d", Bytes::new(), TTL, later).unwrap();
        assert_eq!(s.records.len(), 2);
        assert_eq!(s.expiries.len(), 2);
        assert!(s.take("b", later).is_some());
        assert!(s.take("d", later).is_some());
        assert!(s.take("a", later).is_none());
    }

    #[test]
    fn equal_expiries_stay_distinct() {
        let mut s = store(10);
        let t0 = Instant::now();
        for id in ["a", "b", "c"] {
            s.offer(id, Bytes::new(), TTL, t0).unwrap();
        }
        assert_eq!(s.expiries.len(), 3);
        assert!(s.take("b", t0).is_some());
        assert_eq!(s.expiries.len(), 2);
        s.purge(t0 + TTL);
        assert!(s.records.is_empty() && s.expiries.is_empty());
    }

    #[test]
    fn a_huge_ttl_does_not_overflow() {
        let mut s = store(1);
        let t0 = Instant::now();
        s.offer("a", Bytes::new(), Duration::MAX, t0).unwrap();
        assert!(s.take("a", t0).is_some());
    }

    #[tokio::test]
    async fn the_handle_is_one_shared_store() {
        let h = MemoryHandoff::new(MAX_ENTRIES);
        let other = h.clone();
        h.offer("x", Bytes::from_static(b"r"), TTL).unwrap();
        assert_eq!(other.len(), 1);
        let (a, b) = tokio::join!(async { h.take("x") }, async { other.take("x") });
        assert_eq!(a.is_some() as u8 + b.is_some() as u8, 1);
        assert!(h.is_empty());
    }
}
