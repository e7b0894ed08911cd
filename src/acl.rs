//! Access lists: which channels and patterns a connection may subscribe to,
//! and which channels it may publish to.
//!
//! An [`Acl`] is a list of entries, each a Redis glob (an entry without glob
//! syntax is simply an exact channel name). It comes from a token's
//! `subscribe` claim or from `WSGATE_ALLOW` (subscribing), or from a token's
//! `publish` claim or `WSGATE_CLIENT_PUBLISH` (publishing: a publish reaches
//! exactly one channel, so only rule 1 below applies, see
//! [`Acl::allows_publish`]). The question it answers for a subscription is
//! stronger than "does this name look allowed": a subscription may be made
//! only if **every channel it can ever receive a message from** is matched by
//! some entry. For a channel subscription that is one channel; for a pattern
//! it is an infinite set, so the rule below accepts only patterns whose set is
//! provably contained in the entries' sets, and refuses everything else
//! (soundness over completeness):
//!
//! 1. **Channel `C`**: allowed iff some entry matches `C` under Redis's own
//!    matcher ([`crate::pattern::matches`]), so the ACL means exactly what
//!    Redis would deliver.
//! 2. **Pattern `P` without glob syntax** (none of `*`, `?`, `[`, `\`): Redis
//!    matches it against a channel byte by byte, so it receives from channel
//!    `P` only; allowed iff channel `P` is allowed (rule 1).
//! 3. **Pattern `P` equal byte for byte to an entry**: same pattern, same set.
//! 4. **Pattern `P` starting with `L`, where some entry is `L*`** (`L` free of
//!    glob syntax, followed only by one or more `*`): allowed. Proof: Redis
//!    walks pattern and channel in step from the start, and the first `|L|`
//!    bytes of `P` are plain literals, each of which must equal the channel
//!    byte at the same position, so every channel `P` matches starts with
//!    `L` (a shorter channel runs out while a literal is left, and the empty
//!    channel is never matched by a non-empty pattern). `L*` matches every
//!    channel that starts with `L`: the literals consume `L`, then either the
//!    channel is used up (trailing `*`s may match nothing) or a final `*`
//!    swallows the rest at once (no nested expansion, so Redis's nesting limit
//!    is not involved). With `L` empty (`*`) both sides are "every non-empty
//!    channel".
//!
//! Everything else is refused: `news*` against `news.*`, `news.*` against
//! `news.sport`, `n?ws.*`, `[n]ews.*`, `news\.*` (a `\` is glob syntax, never
//! part of `L`), etc. Quirks of Redis's matcher (signed-char ranges, the
//! nesting limit) appear only inside rule 1, which uses the same matcher as
//! the deliveries, or inside patterns that rules 3 and 4 treat as opaque.
//! Comparison is on bytes: a Cyrillic `е` or a full-width dot is a different
//! byte sequence from `e` or `.`, and so a different name.

use bytes::Bytes;

use crate::broker::Topic;
use crate::pattern;

/// The bytes that make a Redis pattern more than a literal: outside a class,
/// Redis's matcher gives meaning to these four and to nothing else.
const GLOB_SYNTAX: [u8; 4] = [b'*', b'?', b'[', b'\\'];

/// A list of allowed channels and patterns; see the module docs for the rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    entries: Vec<Entry>,
}

/// One entry, classified once when the list is built.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// The entry as given.
    text: Bytes,
    /// `Some(L)` when the entry is `L` followed only by `*`s, `L` literal:
    /// rule 4 lets any pattern starting with `L` through.
    prefix: Option<Bytes>,
}

impl Acl {
    /// Builds a list from its entries (claim strings or configured names).
    pub fn new<I, T>(entries: I) -> Acl
    where
        I: IntoIterator<Item = T>,
        T: AsRef<[u8]>,
    {
        Acl {
            entries: entries
                .into_iter()
                .map(|e| {
                    let text = Bytes::copy_from_slice(e.as_ref());
                    Entry {
                        prefix: literal_prefix_of_star(&text).map(|l| text.slice(..l)),
                        text,
                    }
                })
                .collect(),
        }
    }

    /// A list that allows nothing (a token without a `subscribe` claim).
    pub fn nothing() -> Acl {
        Acl::default()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the list allows nothing at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// May a subscription to `topic` be made? True only if every channel it
    /// can receive from is matched by an entry (module docs).
    pub fn allows(&self, topic: &Topic) -> bool {
        match topic {
            Topic::Channel(name) => self.allows_channel(name),
            Topic::Pattern(p) => self.allows_pattern(p),
        }
    }

    /// May a message be published to `channel`? A publish goes to one
    /// channel, whatever bytes it holds (Redis channels are bytes, so
    /// `news.*` is just a name here), so this is rule 1: some entry matches
    /// it under Redis's matcher. The same list thus means the same thing
    /// for publishing as for subscribing to that channel.
    pub fn allows_publish(&self, channel: &[u8]) -> bool {
        self.allows_channel(channel)
    }

    /// Rule 1: some entry matches the channel, as Redis would match it.
    fn allows_channel(&self, channel: &[u8]) -> bool {
        self.entries
            .iter()
            .any(|e| pattern::matches(&e.text, channel))
    }

    /// Rules 2 to 4.
    fn allows_pattern(&self, p: &[u8]) -> bool {
        if is_literal(p) {
            return self.allows_channel(p);
        }
        self.entries
            .iter()
            .any(|e| e.text.as_ref() == p || e.prefix.as_ref().is_some_and(|l| p.starts_with(l)))
    }
}

/// True when `name` contains no glob syntax, so as a pattern it matches the
/// channel of the same bytes and nothing else.
pub fn is_literal(name: &[u8]) -> bool {
    !name.iter().any(|b| GLOB_SYNTAX.contains(b))
}

/// For an entry of the form `L*` (one or more trailing `*`, `L` literal),
/// the length of `L`.
fn literal_prefix_of_star(entry: &[u8]) -> Option<usize> {
    let l = entry.len() - entry.iter().rev().take_while(|&&b| b == b'*').count();
    let (prefix, stars) = entry.split_at(l);
    (!stars.is_empty() && is_literal(prefix)).then_some(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(p: &[u8]) -> Topic {
        Topic::Pattern(Bytes::copy_from_slice(p))
    }

    fn chan(c: &[u8]) -> Topic {
        Topic::Channel(Bytes::copy_from_slice(c))
    }

    fn acl(entries: &[&str]) -> Acl {
        Acl::new(entries.iter().map(|e| e.as_bytes()))
    }

    /// Runs `(entries, topic, expected)` cases, reporting all failures at once.
    fn check(cases: &[(&[&str], Topic, bool)]) {
        let failures: Vec<String> = cases
            .iter()
            .filter(|(entries, topic, want)| acl(entries).allows(topic) != *want)
            .map(|(entries, topic, want)| {
                format!(
                    "{entries:?} allows {} {:?}: expected {want}",
                    topic.kind(),
                    topic.name().escape_ascii().to_string()
                )
            })
            .collect();
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn classifies_entries() {
        assert_eq!(literal_prefix_of_star(b"news.*"), Some(5));
        assert_eq!(literal_prefix_of_star(b"news.**"), Some(5));
        assert_eq!(literal_prefix_of_star(b"*"), Some(0));
        assert_eq!(literal_prefix_of_star(b"news"), None);
        assert_eq!(literal_prefix_of_star(b"news\\*"), None);
        assert_eq!(literal_prefix_of_star(b"n?ws.*"), None);
        assert_eq!(literal_prefix_of_star(b"*.x"), None);
        assert_eq!(literal_prefix_of_star(b""), None);
        assert!(is_literal(b"a]^-b"));
        assert!(!is_literal(b"a\\b"));
    }

    #[test]
    fn channels_are_matched_by_redis_semantics() {
        check(&[
            (&["news.sport"], chan(b"news.sport"), true),
            (&["news.sport"], chan(b"news.sports"), false),
            (&["news.*"], chan(b"news.sport"), true),
            (&["news.*"], chan(b"news."), true),
            (&["news.*"], chan(b"news"), false),
            (&["news.*"], chan(b"newsX"), false),
            (&["user.[0-9]"], chan(b"user.7"), true),
            (&["user.[0-9]"], chan(b"user.x"), false),
            // An escaped entry means the literal byte.
            (&["a\\*"], chan(b"a*"), true),
            (&["a\\*"], chan(b"ab"), false),
            // Look-alikes are other bytes.
            (&["news.*"], chan("nеws.a".as_bytes()), false),
            (&["news.*"], chan("news．a".as_bytes()), false),
            (&[], chan(b"x"), false),
            (&[""], chan(b"x"), false),
        ]);
    }

    #[test]
    fn publishing_is_rule_one() {
        let a = acl(&["chat.*", "alerts"]);
        assert!(a.allows_publish(b"chat.room1"));
        assert!(a.allows_publish(b"alerts"));
        // A pattern-like channel is a name like any other: matched, not expanded.
        assert!(a.allows_publish(b"chat.*"));
        assert!(!a.allows_publish(b"*"));
        assert!(!a.allows_publish(b"chat"));
        assert!(!a.allows_publish(b"alerts.x"));
        assert!(!Acl::nothing().allows_publish(b"alerts"));
    }

    #[test]
    fn patterns_need_a_proof() {
        check(&[
            // Rule 3: identical.
            (&["news.*"], pat(b"news.*"), true),
            (&["user.[0-9]"], pat(b"user.[0-9]"), true),
            (&["*.x"], pat(b"*.x"), true),
            // Rule 4: inside a literal prefix.
            (&["news.*"], pat(b"news.sport.*"), true),
            (&["news.*"], pat(b"news.[a-z]*"), true),
            (&["news.*"], pat(b"news.?"), true),
            (&["news.*"], pat(b"news.\\*"), true),
            (&["news.**"], pat(b"news.a*"), true),
            (&["*"], pat(b"anything*"), true),
            (&["*"], pat(b"*"), true),
            (&["*"], pat(b"[^a]"), true),
            // Rule 2: a literal pattern is its channel.
            (&["news.*"], pat(b"news.sport"), true),
            (&["news.sport"], pat(b"news.sport"), true),
            (&["news.sport"], pat(b"news.spor]"), false),
            // Refused: could reach channels outside.
            (&["news.*"], pat(b"news*"), false),
            (&["news.*"], pat(b"*"), false),
            (&["news.*"], pat(b"**"), false),
            (&["news.*"], pat(b"?"), false),
            (&["news.*"], pat(b"n?ws.*"), false),
            (&["news.*"], pat(b"[n]ews.*"), false),
            (&["news.*"], pat(b"news\\.*"), false),
            (&["news.*"], pat(b"[a-z]*"), false),
            (&["news.*"], pat(b"news.[!-~]*"), true),
            (&["news.*"], pat(b"new[s].*"), false),
            (&["news.sport"], pat(b"news.*"), false),
            (&["news.sport"], pat(b"news.spor?"), false),
            (&["news.sport"], pat(b"news.sport*"), false),
            (&["news\\*"], pat(b"news\\*x"), false),
            (&["user.[0-9]"], pat(b"user.[0-9]*"), false),
            (&["user.[0-9]"], pat(b"user.*"), false),
            (&["*.x"], pat(b"a*.x"), false),
            (&[], pat(b"*"), false),
            (&[""], pat(b"*"), false),
            (&["news.*"], pat("nеws.*".as_bytes()), false),
            (&["news.*"], pat("news．*".as_bytes()), false),
        ]);
    }

    /// A small deterministic generator (xorshift64*), so the property tests
    /// need no crate and every failure reproduces.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn string(&mut self, alphabet: &[u8], max: usize) -> Vec<u8> {
            let len = self.below(max + 1);
            (0..len)
                .map(|_| alphabet[self.below(alphabet.len())])
                .collect()
        }
    }

    /// Bytes that exercise every branch of the matcher, plus a high byte
    /// (signed-char ranges) and the literals the entries are built from.
    const PATTERN_BYTES: &[u8] = b"ab.*?[]^-\\\xc3";
    const CHANNEL_BYTES: &[u8] = b"ab.*?[]^-\\\xc3\x00";

    /// Entries that look like real ACLs: prefixes, exact names, odd globs.
    fn random_acl(rng: &mut Rng) -> Acl {
        let n = 1 + rng.below(3);
        Acl::new((0..n).map(|_| {
            let mut e = rng.string(b"ab.", 3);
            match rng.below(4) {
                0 => e.push(b'*'),
                1 => {}
                2 => e.extend(rng.string(PATTERN_BYTES, 3)),
                _ => e = rng.string(PATTERN_BYTES, 4),
            }
            e
        }))
    }

    /// Soundness, checked against the matcher itself: whenever the ACL allows
    /// a pattern, every channel the pattern matches is matched by an entry.
    fn assert_sound(acl: &Acl, p: &[u8], channel: &[u8]) {
        if acl.allows(&pat(p)) && pattern::matches(p, channel) {
            assert!(
                acl.allows(&chan(channel)),
                "ACL {acl:?} allowed pattern {:?}, which matches channel {:?} outside it",
                p.escape_ascii().to_string(),
                channel.escape_ascii().to_string()
            );
        }
    }

    #[test]
    fn allowed_patterns_never_reach_outside_channels_random() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut allowed = 0u32;
        for _ in 0..4000 {
            let acl = random_acl(&mut rng);
            for _ in 0..20 {
                // Patterns that extend the entries' prefixes are the
                // interesting ones: build half of them that way.
                let p = if rng.below(2) == 0 {
                    let mut p = rng.string(b"ab.", 3);
                    p.extend(rng.string(PATTERN_BYTES, 4));
                    p
                } else {
                    rng.string(PATTERN_BYTES, 6)
                };
                if p.is_empty() {
                    continue;
                }
                if acl.allows(&pat(&p)) {
                    allowed += 1;
                }
                for _ in 0..30 {
                    let c = rng.string(CHANNEL_BYTES, 7);
                    assert_sound(&acl, &p, &c);
                }
                // Channels the pattern is likely to match: the pattern's own
                // bytes with glob tokens replaced by literals.
                let c: Vec<u8> = p
                    .iter()
                    .filter(|b| !GLOB_SYNTAX.contains(b) && **b != b']')
                    .copied()
                    .collect();
                assert_sound(&acl, &p, &c);
            }
        }
        // The test means something only if many patterns were allowed.
        assert!(allowed > 5000, "only {allowed} patterns were allowed");
    }

    #[test]
    fn allowed_patterns_never_reach_outside_channels_exhaustive() {
        // Every pattern of up to 3 bytes over a syntax-rich alphabet, against
        // every channel of up to 3 bytes, for a few typical ACLs.
        let pattern_alphabet = b"a.*?[]^\\";
        let channel_alphabet = b"a.b*[\\";
        let mut patterns = vec![Vec::new()];
        for _ in 0..3 {
            let longer: Vec<Vec<u8>> = patterns
                .iter()
                .filter(|p| p.len() < 3)
                .flat_map(|p| {
                    pattern_alphabet.iter().map(move |b| {
                        let mut q = p.clone();
                        q.push(*b);
                        q
                    })
                })
                .collect();
            patterns.extend(longer);
            patterns.sort();
            patterns.dedup();
        }
        let mut channels = vec![Vec::new()];
        for _ in 0..3 {
            let longer: Vec<Vec<u8>> = channels
                .iter()
                .filter(|c| c.len() < 3)
                .flat_map(|c| {
                    channel_alphabet.iter().map(move |b| {
                        let mut d = c.clone();
                        d.push(*b);
                        d
                    })
                })
                .collect();
            channels.extend(longer);
            channels.sort();
            channels.dedup();
        }
        for entries in [
            &["a.*"][..],
            &["a*"],
            &["a."],
            &["*"],
            &["a.b", "b*"],
            &["a\\*"],
            &["[a]*"],
            &["?"],
        ] {
            let acl = acl(entries);
            for p in patterns.iter().filter(|p| !p.is_empty()) {
                for c in &channels {
                    assert_sound(&acl, p, c);
                }
            }
        }
    }
}
