//! A small cache of answers from a backend (the subscribe callback's
//! decisions, the connect backend's verdicts): a fixed time to live and a
//! fixed number of entries, so a flood of distinct keys evicts the oldest
//! answers instead of growing memory.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Answers with a fixed time to live, at most `capacity` of them.
///
/// Every entry lives exactly `ttl`, so insertion order is expiry order: a
/// queue of insertions, popped from the front, removes expired entries and,
/// when full, the oldest one. Both the map and the queue stay within
/// `capacity`. Not locked: its owner wraps it in a mutex held only for a
/// lookup or an insert, never across an await.
pub struct Cache<K, V> {
    ttl: Duration,
    capacity: usize,
    map: HashMap<K, (V, Instant)>,
    order: VecDeque<(K, Instant)>,
}

impl<K: Hash + Eq + Clone, V: Clone> Cache<K, V> {
    /// An empty cache; a zero `ttl` or `capacity` caches nothing.
    pub fn new(ttl: Duration, capacity: usize) -> Cache<K, V> {
        Cache {
            ttl,
            capacity,
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// The answer for `key`, if still fresh at `now`.
    pub fn get(&mut self, key: &K, now: Instant) -> Option<V> {
        let (value, at) = self.map.get(key)?;
        if now.duration_since(*at) < self.ttl {
            return Some(value.clone());
        }
        self.map.remove(key);
        None
    }

    /// Remembers `value` for `key` from `now`, evicting what expired and,
    /// when full, the oldest entry.
    pub fn put(&mut self, key: K, value: V, now: Instant) {
        if self.ttl.is_zero() || self.capacity == 0 {
            return;
        }
        while let Some((old, at)) = self.order.front() {
            if now.duration_since(*at) < self.ttl && self.order.len() < self.capacity {
                break;
            }
            // Remove the map entry only if it is this insertion, not a newer
            // one of the same key.
            if self.map.get(old).is_some_and(|(_, t)| t == at) {
                self.map.remove(old);
            }
            self.order.pop_front();
        }
        self.map.insert(key.clone(), (value, now));
        self.order.push_back((key, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> String {
        s.to_owned()
    }

    #[test]
    fn cache_expires_entries() {
        let mut c = Cache::new(Duration::from_secs(10), 100);
        let t0 = Instant::now();
        c.put(key("a"), 1, t0);
        assert_eq!(c.get(&key("a"), t0 + Duration::from_secs(9)), Some(1));
        assert_eq!(c.get(&key("a"), t0 + Duration::from_secs(10)), None);
        assert!(c.map.is_empty());
    }

    #[test]
    fn cache_is_bounded() {
        let mut c = Cache::new(Duration::from_secs(10), 3);
        let t0 = Instant::now();
        for (i, k) in ["a", "b", "c", "d", "e"].iter().enumerate() {
            c.put(key(k), i, t0 + Duration::from_millis(i as u64));
            assert!(c.map.len() <= 3 && c.order.len() <= 3);
        }
        assert_eq!(c.get(&key("a"), t0), None);
        assert_eq!(c.get(&key("b"), t0), None);
        assert_eq!(c.get(&key("e"), t0), Some(4));
        // Re-inserting a key keeps only the newest entry alive.
        for i in 0..10 {
            c.put(key("x"), 99, t0 + Duration::from_millis(10 + i));
        }
        assert!(c.map.len() <= 3 && c.order.len() <= 3);
        assert_eq!(c.get(&key("x"), t0), Some(99));
    }

    #[test]
    fn zero_ttl_caches_nothing() {
        let mut c = Cache::new(Duration::ZERO, 3);
        let t0 = Instant::now();
        c.put(key("a"), 1, t0);
        assert_eq!(c.get(&key("a"), t0), None);
    }
}
