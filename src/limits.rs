//! Per-client-address limits on WebSocket upgrades.
//!
//! Two limits, each off unless configured, both checked before the upgrade
//! (HTTP 429): `WSGATE_NEW_CONNECTIONS_PER_IP_PER_SEC`, a token bucket per
//! address (burst of the same size) that every upgrade attempt spends from,
//! authenticated or not, so token guessing is throttled too; and
//! `WSGATE_MAX_CONNECTIONS_PER_IP`, open connections per address, held by an
//! [`IpSlot`] for the session's life. The address is the one
//! [`crate::forwarded::client_ip`] settles on; IPv6 clients are counted per
//! /64, because one subscriber line usually owns a whole /64 and could
//! otherwise use a fresh address per connection.
//!
//! The table is bounded (`WSGATE_MAX_TRACKED_IPS`). An entry goes as soon as
//! it holds no connection and its bucket is full again (at most a second
//! after its last attempt), so the table holds the addresses with open
//! connections plus those seen within the last second. When it is full,
//! idle entries are swept (at most every [`SWEEP_INTERVAL`]), and if none
//! can go a new address is refused (fail closed rather than grow).

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Minimum time between two sweeps of a full table: a sweep is linear in
/// the table size, and a flood of new addresses must not make every refused
/// attempt pay for one.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// Why an upgrade was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IpRefusal {
    /// Too many new connections per second from this address.
    #[error("too many new connections from your address: slow down")]
    Rate,
    /// Too many open connections from this address.
    #[error("too many connections from your address")]
    Connections,
    /// The table of tracked addresses is full.
    #[error("too many clients: try again later")]
    Full,
}

impl IpRefusal {
    /// The `wsgate_refused_total` reason label.
    pub fn metric_reason(self) -> &'static str {
        match self {
            IpRefusal::Rate => "ip_rate",
            IpRefusal::Connections => "ip_connections",
            IpRefusal::Full => "ip_table_full",
        }
    }
}

/// The per-address limits and their table; one per node, shared.
pub struct IpLimits {
    max_connections: Option<usize>,
    rate: Option<f64>,
    table: Arc<Mutex<Table>>,
}

/// Every tracked address. A plain mutex: each operation is a hash lookup
/// (or, rarely, a sweep), never held across an await.
struct Table {
    entries: HashMap<IpAddr, Entry>,
    capacity: usize,
    rate: Option<f64>,
    swept: Option<Instant>,
}

struct Entry {
    connections: usize,
    tokens: f64,
    refilled: Instant,
}

impl IpLimits {
    /// Limits as configured; `None` switches a limit off.
    pub fn new(
        max_connections: Option<NonZeroUsize>,
        per_second: Option<NonZeroUsize>,
        capacity: NonZeroUsize,
    ) -> IpLimits {
        let rate = per_second.map(|r| r.get() as f64);
        IpLimits {
            max_connections: max_connections.map(NonZeroUsize::get),
            rate,
            table: Arc::new(Mutex::new(Table {
                entries: HashMap::new(),
                capacity: capacity.get(),
                rate,
                swept: None,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Spends one new-connection token of `ip`'s bucket.
    pub fn attempt(&self, ip: IpAddr) -> Result<(), IpRefusal> {
        let Some(rate) = self.rate else {
            return Ok(());
        };
        let now = Instant::now();
        let mut table = self.lock();
        let entry = table.entry(key(ip), now)?;
        let earned = now.duration_since(entry.refilled).as_secs_f64() * rate;
        entry.tokens = (entry.tokens + earned).min(rate);
        entry.refilled = now;
        if entry.tokens < 1.0 {
            return Err(IpRefusal::Rate);
        }
        entry.tokens -= 1.0;
        Ok(())
    }

    /// Takes one of `ip`'s connection places for as long as the slot lives.
    pub fn admit(&self, ip: IpAddr) -> Result<IpSlot, IpRefusal> {
        let Some(max) = self.max_connections else {
            return Ok(IpSlot { held: None });
        };
        let ip = key(ip);
        let mut table = self.lock();
        let entry = table.entry(ip, Instant::now())?;
        if entry.connections >= max {
            return Err(IpRefusal::Connections);
        }
        entry.connections += 1;
        Ok(IpSlot {
            held: Some((self.table.clone(), ip)),
        })
    }

    /// Addresses currently tracked (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.lock().entries.len()
    }
}

impl Table {
    /// The entry of `ip`, created if there is room.
    fn entry(&mut self, ip: IpAddr, now: Instant) -> Result<&mut Entry, IpRefusal> {
        if !self.entries.contains_key(&ip) && self.entries.len() >= self.capacity {
            let due = self
                .swept
                .is_none_or(|at| now.duration_since(at) >= SWEEP_INTERVAL);
            if due {
                self.swept = Some(now);
                let rate = self.rate;
                self.entries.retain(|_, e| !e.idle(rate, now));
            }
            if self.entries.len() >= self.capacity {
                return Err(IpRefusal::Full);
            }
        }
        let rate = self.rate.unwrap_or(0.0);
        Ok(self.entries.entry(ip).or_insert(Entry {
            connections: 0,
            tokens: rate,
            refilled: now,
        }))
    }

    fn release_if_idle(&mut self, ip: IpAddr, now: Instant) {
        let rate = self.rate;
        if self.entries.get(&ip).is_some_and(|e| e.idle(rate, now)) {
            self.entries.remove(&ip);
        }
    }
}

impl Entry {
    /// Holds nothing worth remembering: no connection, and a bucket that is
    /// full again (forgetting it then changes no future decision).
    fn idle(&self, rate: Option<f64>, now: Instant) -> bool {
        self.connections == 0
            && rate.is_none_or(|r| {
                self.tokens + now.duration_since(self.refilled).as_secs_f64() * r >= r
            })
    }
}

/// One open connection counted against its address; released on drop.
pub struct IpSlot {
    held: Option<(Arc<Mutex<Table>>, IpAddr)>,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let Some((table, ip)) = self.held.take() else {
            return;
        };
        let mut table = table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = table.entries.get_mut(&ip) {
            e.connections = e.connections.saturating_sub(1);
        }
        table.release_if_idle(ip, Instant::now());
    }
}

/// The unit limits are counted in: the address, or its /64 for IPv6.
/// The address a limit counts `ip` under: itself, or its /64 for IPv6
/// (see the module docs).
pub(crate) fn key(ip: IpAddr) -> IpAddr {
    match crate::forwarded::canonical(ip) {
        IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            IpAddr::from(octets)
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: usize) -> Option<NonZeroUsize> {
        NonZeroUsize::new(n)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn counts_connections_and_forgets_idle_addresses() {
        let l = IpLimits::new(nz(2), None, NonZeroUsize::MIN.saturating_add(99));
        let a = ip("1.1.1.1");
        let s1 = l.admit(a).unwrap();
        let s2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).err(), Some(IpRefusal::Connections));
        let other = l.admit(ip("2.2.2.2")).unwrap();
        drop(s1);
        let s3 = l.admit(a).unwrap();
        assert_eq!(l.tracked(), 2);
        drop((s2, s3, other));
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn rate_limits_attempts_per_address() {
        let l = IpLimits::new(None, nz(3), NonZeroUsize::MIN.saturating_add(99));
        let a = ip("1.1.1.1");
        for _ in 0..3 {
            l.attempt(a).unwrap();
        }
        assert_eq!(l.attempt(a), Err(IpRefusal::Rate));
        l.attempt(ip("2.2.2.2")).unwrap();
        // Without a connection limit nothing is held per connection.
        let slot = l.admit(a).unwrap();
        assert!(slot.held.is_none());
    }

    #[test]
    fn ipv6_is_counted_per_64() {
        let l = IpLimits::new(nz(1), None, NonZeroUsize::MIN.saturating_add(99));
        let _s = l.admit(ip("2001:db8:1:2::1")).unwrap();
        assert_eq!(
            l.admit(ip("2001:db8:1:2:ffff::9")).err(),
            Some(IpRefusal::Connections)
        );
        assert!(l.admit(ip("2001:db8:1:3::1")).is_ok());
        // Mapped IPv4 is IPv4.
        let _v4 = l.admit(ip("9.9.9.9")).unwrap();
        assert_eq!(
            l.admit(ip("::ffff:9.9.9.9")).err(),
            Some(IpRefusal::Connections)
        );
    }

    #[test]
    fn the_table_is_bounded() {
        let l = IpLimits::new(nz(5), nz(5), NonZeroUsize::MIN.saturating_add(2));
        let held: Vec<IpSlot> = (1..=3)
            .map(|i| l.admit(ip(&format!("10.0.0.{i}"))).unwrap())
            .collect();
        assert_eq!(l.admit(ip("10.0.0.4")).err(), Some(IpRefusal::Full));
        assert_eq!(l.attempt(ip("10.0.0.4")), Err(IpRefusal::Full));
        assert_eq!(l.tracked(), 3);
        drop(held);
        assert_eq!(l.tracked(), 0);
        assert!(l.admit(ip("10.0.0.4")).is_ok());
    }
}
