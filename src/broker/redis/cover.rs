//! Pattern coalescing: which patterns the node holds in Redis for the
//! patterns its clients hold.
//!
//! Redis matches every `PUBLISH` against every pattern it holds, so what it
//! holds is kept cheap and few (see [`crate::pattern_cost`]):
//!
//! * A *cheap* client pattern (a literal, or a literal followed by `*`s) is
//!   held as itself while the node holds fewer than `WSGATE_MAX_REDIS_PATTERNS`
//!   Redis patterns; this is the common case, and then Redis matches exactly
//!   what the client asked for.
//! * Any other client pattern (`*x*`, `news.[ab]?`) is held under the *cover*
//!   of its literal prefix `L`: the Redis pattern `L*`, which receives every
//!   channel the client pattern can match (and more). The node matches each
//!   message against the client pattern itself, with Redis's own matcher.
//! * When a new Redis pattern would exceed the budget, the two held ones
//!   (or one and the new one) with the longest common literal prefix `C` are
//!   merged: the cover `C*` replaces every held Redis pattern whose literal
//!   starts with `C`. The budget is never exceeded except for a moment, while
//!   replaced patterns wait for their replacement to be confirmed.
//!
//! Exactly-once: every client pattern is *routed* through exactly one Redis
//! pattern at any moment, and only messages arriving through that one are
//! delivered to it. A client pattern moves to a new Redis pattern only when
//! Redis confirms a `PSUBSCRIBE` of it: Redis executes commands one at a time,
//! so that confirmation sits between two publishes in the connection's
//! stream, and from there on every publish reaching the old route reaches the
//! new one too (a cover is wider than what it replaces). Nothing is lost or
//! doubled by a move, and a client pattern confirmed once stays delivered.
//! A `PSUBSCRIBE` is sent for every client pattern added, even to a Redis
//! pattern held already: its confirmation is the point from which the new
//! client pattern is routed, and what its subscriber waits for.
//!
//! The state describes one connection; a new connection starts empty (the
//! hub re-applies everything).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::pattern_cost::{is_cheap, literal_prefix};

/// Redis commands the coalescing decided on, in the order to send them:
/// every `PUNSUBSCRIBE` before every `PSUBSCRIBE`.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Commands {
    /// Patterns to `PUNSUBSCRIBE`.
    pub(super) punsubscribe: Vec<Bytes>,
    /// Patterns to `PSUBSCRIBE`.
    pub(super) psubscribe: Vec<Bytes>,
    /// What `psubscribe` holds, with the epoch each was sent for: one
    /// `PSUBSCRIBE` per held pattern and batch, found in O(1) (a batch of
    /// a resync has hundreds).
    sent: HashSet<(Bytes, u64)>,
}

/// Where a message arriving through one Redis pattern goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Route {
    /// Nobody: a pattern being let go, or not ours.
    Nobody,
    /// The client pattern of the same text, alone: Redis matched it exactly.
    Itself,
    /// These client patterns, each to be matched against the channel (the
    /// Redis pattern's own text among them needs no matching).
    Covered(Arc<[Bytes]>),
}

/// One pattern the node holds (or is about to hold) in Redis.
#[derive(Default)]
struct Held {
    /// Which subscription of this text the state is for: a `PSUBSCRIBE`
    /// confirmation only counts if it was sent for the current one.
    epoch: u64,
    /// Client patterns that belong here (moved here at the next confirmation).
    members: HashSet<Bytes>,
    /// Client patterns this one delivers to now.
    routed: HashSet<Bytes>,
    /// `routed` as a message route; `None` after a change, rebuilt lazily.
    route: Option<Route>,
}

/// One client pattern: where it belongs, and what delivers it now.
struct Client {
    home: Bytes,
    via: Option<Bytes>,
}

/// The coalescing state of one Redis connection; see the module docs.
pub(super) struct Covers {
    budget: usize,
    held: HashMap<Bytes, Held>,
    clients: HashMap<Bytes, Client>,
    /// `PSUBSCRIBE` arguments sent and not yet confirmed, in order, each with
    /// the epoch it was sent for.
    expected: VecDeque<(Bytes, u64)>,
    next_epoch: u64,
    /// Held patterns with members: what the budget counts.
    homes: usize,
}

impl Covers {
    /// Empty state allowing `budget` Redis patterns (at least one).
    pub(super) fn new(budget: usize) -> Covers {
        Covers {
            budget: budget.max(1),
            held: HashMap::new(),
            clients: HashMap::new(),
            expected: VecDeque::new(),
            next_epoch: 0,
            homes: 0,
        }
    }

    /// Patterns held in Redis (or being subscribed or let go).
    pub(super) fn redis_patterns(&self) -> usize {
        self.held.len()
    }

    /// A client pattern to receive.
    pub(super) fn add(&mut self, pattern: Bytes, out: &mut Commands) {
        let home = match self.clients.get(&pattern) {
            Some(client) => client.home.clone(),
            None => {
                let home = self.choose(&pattern, out);
                self.join(&home, pattern.clone());
                self.clients.insert(
                    pattern,
                    Client {
                        home: home.clone(),
                        via: None,
                    },
                );
                home
            }
        };
        self.psubscribe(home, out);
    }

    /// A client pattern nobody on the node holds any more: no more deliveries
    /// to it from now on.
    pub(super) fn remove(&mut self, pattern: &Bytes, out: &mut Commands) {
        let Some(client) = self.clients.remove(pattern) else {
            return;
        };
        if let Some(held) = self.held.get_mut(&client.home) {
            if held.members.remove(pattern) && held.members.is_empty() {
                self.homes -= 1;
            }
        }
        if let Some(via) = &client.via {
            if let Some(held) = self.held.get_mut(via) {
                held.routed.remove(pattern);
                held.route = None;
            }
            self.release(via, out);
        }
        self.release(&client.home, out);
    }

    /// Redis confirmed a `PSUBSCRIBE` of `pattern`: if it was sent for the
    /// current subscription of that text, every client pattern that belongs
    /// there is routed through it from now on. `Err` when the confirmation is
    /// not the one expected next (the connection is then out of step).
    pub(super) fn confirmed(&mut self, pattern: &[u8], out: &mut Commands) -> Result<(), String> {
        let Some((sent, epoch)) = self.expected.pop_front() else {
            return Err("a psubscribe confirmation nobody asked for".to_owned());
        };
        if sent != pattern {
            return Err("psubscribe confirmations out of order".to_owned());
        }
        let Some(held) = self.held.get_mut(&sent).filter(|h| h.epoch == epoch) else {
            return Ok(()); // let go since: a later subscription of it is pending
        };
        let moving: Vec<Bytes> = held
            .members
            .iter()
            .filter(|m| !held.routed.contains(*m))
            .cloned()
            .collect();
        if moving.is_empty() {
            // A cover absorbed by a wider one before it was confirmed has
            // nothing left: let it go now that Redis holds it.
            self.release(&sent, out);
            return Ok(());
        }
        held.routed.extend(moving.iter().cloned());
        held.route = None;
        let mut released = Vec::new();
        for m in moving {
            let Some(client) = self.clients.get_mut(&m) else {
                continue;
            };
            if let Some(old) = client.via.replace(sent.clone()) {
                if let Some(h) = self.held.get_mut(&old) {
                    h.routed.remove(&m);
                    h.route = None;
                }
                released.push(old);
            }
        }
        for old in released {
            self.release(&old, out);
        }
        Ok(())
    }

    /// Redis refused the `PSUBSCRIBE` of `pattern` (an ACL, say): forgets
    /// that subscription, and drops and returns the client patterns that
    /// were waiting for it (routed nowhere yet: they are refused). Client
    /// patterns already delivered through another pattern keep that route.
    pub(super) fn refused(&mut self, pattern: &[u8], out: &mut Commands) -> Vec<Bytes> {
        if let Some(at) = self.expected.iter().position(|(p, _)| p[..] == *pattern) {
            self.expected.remove(at);
        }
        let Some(held) = self.held.get(pattern) else {
            return Vec::new();
        };
        let waiting: Vec<Bytes> = held
            .members
            .iter()
            .filter(|m| self.clients.get(*m).is_some_and(|c| c.via.is_none()))
            .cloned()
            .collect();
        for m in &waiting {
            self.remove(m, out);
        }
        waiting
    }

    /// Where a message arriving through Redis pattern `pattern` goes.
    pub(super) fn route(&mut self, pattern: &[u8]) -> Route {
        let Some(held) = self.held.get_mut(pattern) else {
            return Route::Nobody;
        };
        if let Some(route) = &held.route {
            return route.clone();
        }
        let route = match held.routed.len() {
            0 => Route::Nobody,
            1 if held.routed.contains(pattern) => Route::Itself,
            _ => {
                let mut list: Vec<Bytes> = held.routed.iter().cloned().collect();
                list.sort();
                Route::Covered(Arc::from(list))
            }
        };
        held.route = Some(route.clone());
        route
    }

    /// The Redis pattern a new client pattern should belong to.
    fn choose(&mut self, pattern: &Bytes, out: &mut Commands) -> Bytes {
        let natural = if is_cheap(pattern) {
            pattern.clone()
        } else {
            cover(literal_prefix(pattern))
        };
        if self.is_home(&natural) {
            return natural;
        }
        if self.homes < self.budget {
            return natural;
        }
        // The budget is full. A held cover of a prefix of the literal
        // receives everything the pattern needs (a scan of what is held:
        // only once coalescing has begun, never on the way there).
        let lit = literal_prefix(pattern);
        let covering = self
            .held
            .iter()
            .filter(|(text, h)| !h.members.is_empty() && is_cover_of(text, lit))
            .map(|(text, _)| text)
            .max_by_key(|text| text.len());
        if let Some(c) = covering {
            return c.clone();
        }
        self.merge(lit, natural, out)
    }

    /// The budget is full: merges the two literals (held ones, or one of them
    /// and `lit`) sharing the longest prefix under its cover, and says where
    /// the new client pattern (literal `lit`, natural home `natural`) goes.
    fn merge(&mut self, lit: &[u8], natural: Bytes, out: &mut Commands) -> Bytes {
        let mut lits: Vec<&[u8]> = self
            .held
            .iter()
            .filter(|(_, h)| !h.members.is_empty())
            .map(|(text, _)| literal_of(text))
            .collect();
        lits.push(lit);
        lits.sort_unstable();
        let common = lits
            .windows(2)
            .map(|w| common_prefix(w[0], w.get(1).copied().unwrap_or_default()))
            .max_by_key(|c| c.len())
            .unwrap_or_default()
            .to_vec();
        let wide = cover(&common);
        let absorbed: Vec<Bytes> = self
            .held
            .iter()
            .filter(|(text, h)| {
                !h.members.is_empty() && **text != wide && literal_of(text).starts_with(&common)
            })
            .map(|(text, _)| text.clone())
            .collect();
        for text in absorbed {
            let members: Vec<Bytes> = match self.held.get_mut(&text) {
                Some(h) => h.members.drain().collect(),
                None => continue,
            };
            self.homes -= 1;
            for m in members {
                if let Some(client) = self.clients.get_mut(&m) {
                    client.home = wide.clone();
                }
                self.join(&wide, m);
            }
        }
        // Whatever the new pattern's home, the cover must be subscribed: its
        // confirmation is what moves the absorbed patterns onto it.
        self.psubscribe(wide.clone(), out);
        if lit.starts_with(&common) {
            wide
        } else {
            natural
        }
    }

    /// Does `text` have members (is it some client pattern's home)?
    fn is_home(&self, text: &[u8]) -> bool {
        self.held.get(text).is_some_and(|h| !h.members.is_empty())
    }

    /// Makes `home` the home of `member`, creating its entry if needed.
    fn join(&mut self, home: &Bytes, member: Bytes) {
        let epoch = &mut self.next_epoch;
        let held = self.held.entry(home.clone()).or_insert_with(|| {
            *epoch += 1;
            Held {
                epoch: *epoch,
                ..Held::default()
            }
        });
        if held.members.is_empty() {
            self.homes += 1;
        }
        held.members.insert(member);
    }

    /// Sends a `PSUBSCRIBE` of `home` (held already or not): its confirmation
    /// routes every member there. One per batch is enough: a confirmation
    /// routes every member the pattern has by then.
    fn psubscribe(&mut self, home: Bytes, out: &mut Commands) {
        let Some(held) = self.held.get(&home) else {
            return;
        };
        let entry = (home, held.epoch);
        if !out.sent.insert(entry.clone()) {
            return;
        }
        out.psubscribe.push(entry.0.clone());
        self.expected.push_back(entry);
    }

    /// Lets `text` go in Redis once nothing belongs there or is routed there.
    fn release(&mut self, text: &Bytes, out: &mut Commands) {
        let unused = self
            .held
            .get(text)
            .is_some_and(|h| h.members.is_empty() && h.routed.is_empty());
        if unused {
            self.held.remove(text);
            out.punsubscribe.push(text.clone());
        }
    }
}

/// The Redis pattern `<lit>*`.
fn cover(lit: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(lit.len() + 1);
    b.extend_from_slice(lit);
    b.extend_from_slice(b"*");
    b.freeze()
}

/// The literal a held Redis pattern stands for: its literal prefix (all of
/// it for a literal; what precedes the `*`s for a cover).
fn literal_of(text: &[u8]) -> &[u8] {
    literal_prefix(text)
}

/// Is `text` a cover (`<c>*`, only `*`s after a literal `c`) with `c` a
/// prefix of `lit`?
fn is_cover_of(text: &[u8], lit: &[u8]) -> bool {
    let c = literal_prefix(text);
    c.len() < text.len() && is_cheap(text) && lit.starts_with(c)
}

fn common_prefix<'a>(a: &'a [u8], b: &[u8]) -> &'a [u8] {
    let n = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    a.get(..n).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pattern::matches;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn strs(v: &[Bytes]) -> Vec<String> {
        v.iter()
            .map(|x| String::from_utf8_lossy(x).into_owned())
            .collect()
    }

    /// Once every confirmation is in, nothing is held for nobody.
    fn no_zombies(c: &Covers) {
        for (text, h) in &c.held {
            assert!(
                !h.members.is_empty() || !h.routed.is_empty(),
                "{:?} held for nobody",
                String::from_utf8_lossy(text)
            );
        }
    }

    /// A fake Redis connection: applies commands in order and confirms.
    struct Sim {
        covers: Covers,
        redis: HashSet<Bytes>,
    }

    impl Sim {
        fn new(budget: usize) -> Sim {
            Sim {
                covers: Covers::new(budget),
                redis: HashSet::new(),
            }
        }

        /// Runs `out` as Redis would, confirming every `PSUBSCRIBE` in order;
        /// follow-up commands run too.
        fn run(&mut self, mut out: Commands) {
            loop {
                for p in &out.punsubscribe {
                    self.redis.remove(p);
                }
                let mut next = Commands::default();
                for p in &out.psubscribe {
                    self.redis.insert(p.clone());
                    self.covers.confirmed(p, &mut next).unwrap();
                }
                if next == Commands::default() {
                    return;
                }
                out = next;
            }
        }

        fn add(&mut self, p: &str) {
            let mut out = Commands::default();
            self.covers.add(b(p), &mut out);
            self.run(out);
        }

        fn remove(&mut self, p: &str) {
            let mut out = Commands::default();
            self.covers.remove(&b(p), &mut out);
            self.run(out);
        }

        /// Every client pattern a publish to `channel` is delivered to.
        fn deliveries(&mut self, channel: &str) -> Vec<String> {
            let mut got = Vec::new();
            let held: Vec<Bytes> = self.redis.iter().cloned().collect();
            for r in held {
                if !matches(&r, channel.as_bytes()) {
                    continue;
                }
                match self.covers.route(&r) {
                    Route::Nobody => {}
                    Route::Itself => got.push(String::from_utf8_lossy(&r).into_owned()),
                    Route::Covered(list) => {
                        for p in list.iter() {
                            if *p == r || matches(p, channel.as_bytes()) {
                                got.push(String::from_utf8_lossy(p).into_owned());
                            }
                        }
                    }
                }
            }
            got.sort();
            got
        }

        fn redis(&self) -> Vec<String> {
            let mut v: Vec<Bytes> = self.redis.iter().cloned().collect();
            v.sort();
            strs(&v)
        }
    }

    fn expected(patterns: &[&str], channel: &str) -> Vec<String> {
        let mut v: Vec<String> = patterns
            .iter()
            .filter(|p| matches(p.as_bytes(), channel.as_bytes()))
            .map(|p| (*p).to_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn cheap_patterns_are_held_as_themselves() {
        let mut s = Sim::new(4);
        s.add("news.*");
        s.add("news.sport.*");
        s.add("alerts");
        assert_eq!(s.redis(), ["alerts", "news.*", "news.sport.*"]);
        assert_eq!(s.deliveries("news.sport.x"), ["news.*", "news.sport.*"]);
        assert_eq!(s.covers.route(b"news.*"), Route::Itself);
    }

    #[test]
    fn costly_patterns_are_held_under_their_literal_prefix() {
        let mut s = Sim::new(4);
        s.add("*0x1*z*");
        s.add("*0x2*z*");
        s.add("news.*9x9*z*");
        s.add("news.*");
        assert_eq!(s.redis(), ["*", "news.*"]);
        assert_eq!(s.deliveries("a0x1bz"), ["*0x1*z*"]);
        assert_eq!(s.deliveries("news.9x9z"), ["news.*", "news.*9x9*z*"]);
        assert_eq!(s.deliveries("news.0x2z"), ["*0x2*z*", "news.*"]);
    }

    #[test]
    fn the_budget_merges_the_closest_literals() {
        let mut s = Sim::new(3);
        for p in ["user.1.*", "user.2.*", "news.*", "user.3.*"] {
            s.add(p);
        }
        assert_eq!(s.redis(), ["news.*", "user.*"]);
        s.add("alerts.*");
        s.add("alarm.*");
        assert_eq!(s.redis(), ["al*", "news.*", "user.*"]);
        let all = [
            "user.1.*", "user.2.*", "news.*", "user.3.*", "alerts.*", "alarm.*",
        ];
        for ch in [
            "user.1.x", "user.3.", "user.4.x", "news.", "alerts.a", "alarm.b", "al",
        ] {
            assert_eq!(s.deliveries(ch), expected(&all, ch), "{ch}");
        }
    }

    #[test]
    fn removing_patterns_lets_redis_patterns_go() {
        let mut s = Sim::new(2);
        for p in ["a.1.*", "a.2.*", "b.*"] {
            s.add(p);
        }
        assert_eq!(s.redis(), ["a.*", "b.*"]);
        s.remove("a.1.*");
        assert_eq!(s.redis(), ["a.*", "b.*"]);
        s.remove("a.2.*");
        assert_eq!(s.redis(), ["b.*"]);
        s.remove("b.*");
        assert!(s.redis().is_empty());
        assert_eq!(s.covers.redis_patterns(), 0);
        assert!(s.covers.clients.is_empty() && s.covers.expected.is_empty());
    }

    #[test]
    fn a_merge_moves_routes_only_at_the_confirmation() {
        let mut c = Covers::new(1);
        let mut out = Commands::default();
        c.add(b("ab.*"), &mut out);
        assert_eq!(strs(&out.psubscribe), ["ab.*"]);
        c.confirmed(b"ab.*", &mut Commands::default()).unwrap();
        let mut out = Commands::default();
        c.add(b("ac.*"), &mut out);
        assert_eq!(strs(&out.psubscribe), ["a*"]);
        assert!(out.punsubscribe.is_empty());
        // Until Redis confirms `a*`, `ab.*` still delivers through itself.
        assert_eq!(c.route(b"ab.*"), Route::Itself);
        assert_eq!(c.route(b"a*"), Route::Nobody);
        let mut after = Commands::default();
        c.confirmed(b"a*", &mut after).unwrap();
        assert_eq!(strs(&after.punsubscribe), ["ab.*"]);
        assert_eq!(c.route(b"ab.*"), Route::Nobody);
        assert_eq!(
            c.route(b"a*"),
            Route::Covered(Arc::from(vec![b("ab.*"), b("ac.*")]))
        );
    }

    #[test]
    fn a_stale_confirmation_routes_nothing() {
        let mut c = Covers::new(4);
        let mut out = Commands::default();
        c.add(b("x*y"), &mut out); // under `x*`
        c.remove(&b("x*y"), &mut out);
        c.add(b("x*z"), &mut out);
        assert_eq!(strs(&out.punsubscribe), ["x*"]);
        assert_eq!(strs(&out.psubscribe), ["x*", "x*"]);
        // The first confirmation was for the subscription let go since.
        c.confirmed(b"x*", &mut Commands::default()).unwrap();
        assert_eq!(c.route(b"x*"), Route::Nobody);
        c.confirmed(b"x*", &mut Commands::default()).unwrap();
        assert_eq!(c.route(b"x*"), Route::Covered(Arc::from(vec![b("x*z")])));
        assert!(c.confirmed(b"x*", &mut Commands::default()).is_err());
    }

    /// Commands on the wire, then processed by Redis one at a time while
    /// publishes keep arriving: with confirmations late, deliveries are
    /// still never doubled, and a confirmed client pattern never misses one.
    #[test]
    fn late_confirmations_never_lose_or_double() {
        enum Cmd {
            /// The pattern, and the add it completes (name, which add).
            Psub(Bytes, Option<(&'static str, u64)>),
            Punsub(Bytes),
        }
        let pool = [
            "a.*", "a.b.*", "a.*x*", "ab*", "b.*", "b.?", "*x*", "*", "c", "c.*", "d.e.*g",
            "?.e.*", "de*", "a", "e.*",
        ];
        let channels = [
            "a.", "a.b", "a.x", "ab", "b.x", "c", "c.d", "d.e.g", "x", "de", "a", "q.e.r",
        ];
        for (budget, mut seed) in [(1, 0x2545_F491_4F6C_DD1D_u64), (2, 7), (4, 99), (2, 12345)] {
            let mut next = move || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            let mut c = Covers::new(budget);
            let mut redis: HashSet<Bytes> = HashSet::new();
            let mut wire: VecDeque<Cmd> = VecDeque::new();
            let mut held: Vec<&str> = Vec::new();
            let mut confirmed: HashSet<&str> = HashSet::new();
            let mut adds: HashMap<&str, u64> = HashMap::new();
            let mut n_adds = 0;
            let enqueue =
                |wire: &mut VecDeque<Cmd>, out: Commands, tag: Option<(&'static str, u64)>| {
                    wire.extend(out.punsubscribe.into_iter().map(Cmd::Punsub));
                    let n = out.psubscribe.len();
                    for (i, p) in out.psubscribe.into_iter().enumerate() {
                        wire.push_back(Cmd::Psub(p, if i + 1 == n { tag } else { None }));
                    }
                };
            // 3000 random steps, then Redis works through what is left.
            for step in 0.. {
                let op = match (step < 3000, wire.is_empty()) {
                    (true, _) => next() % 3,
                    (false, false) => 1,
                    (false, true) => break,
                };
                match op {
                    0 => {
                        let p = pool[(next() % pool.len() as u64) as usize];
                        let mut out = Commands::default();
                        if let Some(i) = held.iter().position(|h| *h == p) {
                            held.swap_remove(i);
                            confirmed.remove(p);
                            c.remove(&b(p), &mut out);
                            enqueue(&mut wire, out, None);
                        } else {
                            held.push(p);
                            c.add(b(p), &mut out);
                            n_adds += 1;
                            adds.insert(p, n_adds);
                            enqueue(&mut wire, out, Some((p, n_adds)));
                        }
                    }
                    1 => match wire.pop_front() {
                        Some(Cmd::Punsub(p)) => {
                            redis.remove(&p);
                        }
                        Some(Cmd::Psub(p, tag)) => {
                            redis.insert(p.clone());
                            let mut out = Commands::default();
                            c.confirmed(&p, &mut out).unwrap();
                            enqueue(&mut wire, out, None);
                            // Only the current add of a pattern still held.
                            if let Some((t, n)) = tag {
                                if held.contains(&t) && adds.get(t) == Some(&n) {
                                    confirmed.insert(t);
                                }
                            }
                        }
                        None => {}
                    },
                    _ => {
                        let ch = channels[(next() % channels.len() as u64) as usize];
                        let mut got: Vec<&str> = Vec::new();
                        for r in redis.iter().filter(|r| matches(r, ch.as_bytes())) {
                            let list: Vec<Bytes> = match c.route(r) {
                                Route::Nobody => Vec::new(),
                                Route::Itself => vec![r.clone()],
                                Route::Covered(l) => l.to_vec(),
                            };
                            for p in list.iter().filter(|p| matches(p, ch.as_bytes())) {
                                let name = pool.iter().find(|x| x.as_bytes() == &p[..]).unwrap();
                                assert!(held.contains(name), "{name} removed, still delivered");
                                got.push(name);
                            }
                        }
                        let mut unique = got.clone();
                        unique.sort_unstable();
                        unique.dedup();
                        assert_eq!(unique.len(), got.len(), "doubled on {ch}: {got:?}");
                        for p in &confirmed {
                            if matches(p.as_bytes(), ch.as_bytes()) {
                                assert!(got.contains(p), "{p} missed {ch} (budget {budget})");
                            }
                        }
                    }
                }
            }
            no_zombies(&c);
            assert!(
                redis.len() <= budget,
                "budget {budget}: {} held",
                redis.len()
            );
            let mut ours: Vec<&Bytes> = c.held.keys().collect();
            let mut theirs: Vec<&Bytes> = redis.iter().collect();
            ours.sort();
            theirs.sort();
            assert_eq!(ours, theirs);
        }
    }

    /// Random adds and removes against a budget: after every step, Redis
    /// holds at most the budget (plus patterns being replaced), and every
    /// publish reaches exactly the client patterns that match it, once.
    #[test]
    fn random_churn_delivers_exactly_once() {
        let pool = [
            "a.*", "a.b.*", "a.b.c", "a.*x*", "ab*", "b.*", "b.?", "b.[xy]*", "*x*", "*", "c",
            "c.*", "c.d.*", "d.e.f.*", "d.e.*g", "?.e.*", "de*", "a", "b", "e.*",
        ];
        let channels = [
            "a.", "a.b", "a.b.c", "a.x", "ab", "b.x", "b.y", "b.xq", "c", "c.d.e", "d.e.f.g",
            "d.e.g", "x", "de", "a", "b", "e.x", "q.e.r",
        ];
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for budget in [1, 2, 3, 5, 8] {
            let mut s = Sim::new(budget);
            let mut held: Vec<&str> = Vec::new();
            for _ in 0..400 {
                let p = pool[(next() % pool.len() as u64) as usize];
                if let Some(i) = held.iter().position(|h| *h == p) {
                    held.swap_remove(i);
                    s.remove(p);
                } else {
                    held.push(p);
                    s.add(p);
                }
                assert!(s.covers.homes <= budget, "budget {budget}");
                assert_eq!(s.covers.redis_patterns(), s.redis.len());
                assert!(s.redis.len() <= budget, "budget {budget}: {:?}", s.redis());
                no_zombies(&s.covers);
                for ch in channels {
                    assert_eq!(
                        s.deliveries(ch),
                        expected(&held, ch),
                        "budget {budget} {ch}"
                    );
                }
            }
        }
    }
}
