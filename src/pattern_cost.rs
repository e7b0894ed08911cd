//! What a pattern costs, and the limits that keep that cost bounded.
//!
//! Redis matches every `PUBLISH` against every distinct pattern any client
//! holds (`O(patterns)` per message, whoever the message is for), and a
//! crafted pattern such as `*0x1*z*` costs about ten times a plain `news.*`
//! (figures in `docs/security.md`). Left alone, a few anonymous sockets could
//! slow the shared Redis for every node and every other user of it. Three
//! defences, from the cheapest:
//!
//! 1. **Shape** ([`PatternLimits::check`]): at most
//!    `WSGATE_MAX_PATTERN_WILDCARDS` wildcards (`?`, and each run of `*`) and
//!    `WSGATE_MAX_PATTERN_CLASSES` `[...]` classes per pattern; a class must
//!    be closed (Redis silently ends an unterminated one with the pattern,
//!    which is never what a client meant).
//! 2. **Count**: `WSGATE_MAX_PATTERNS_PER_CONNECTION` per socket (checked by
//!    the session with [`connection_refusal`]) and `WSGATE_MAX_PATTERNS`
//!    distinct patterns per node (checked by the hub's registry).
//! 3. **Coalescing** (the Redis broker, `src/broker/redis/cover.rs`): Redis
//!    only ever holds *cheap* patterns ([`is_cheap`]: a literal, or a literal
//!    followed by `*`), at most `WSGATE_MAX_REDIS_PATTERNS` of them per node;
//!    any other client pattern is subscribed as the cover of its
//!    [`literal_prefix`] and matched exactly on the node.
//!
//! Every refusal names its limit and is counted in
//! `wsgate_refused_total{reason}` under [`Refusal::reason`].

use crate::broker::Topic;

/// Counter label of a node that holds `WSGATE_MAX_PATTERNS` patterns already.
pub const REASON_NODE: &str = "node_patterns";
/// Counter label of a connection at `WSGATE_MAX_PATTERNS_PER_CONNECTION`.
pub const REASON_CONNECTION: &str = "connection_patterns";
/// Counter label of a pattern over `WSGATE_MAX_PATTERN_WILDCARDS`.
pub const REASON_WILDCARDS: &str = "pattern_wildcards";
/// Counter label of a pattern over `WSGATE_MAX_PATTERN_CLASSES`.
pub const REASON_CLASSES: &str = "pattern_classes";
/// Counter label of a pattern with an unterminated `[` class.
pub const REASON_SYNTAX: &str = "pattern_syntax";
/// Counter label of a pattern under `WSGATE_MIN_PATTERN_PREFIX_BYTES`.
pub const REASON_PREFIX: &str = "pattern_prefix";

/// Every refusal label this module produces, for the metrics' zero series.
pub const REASONS: [&str; 6] = [
    REASON_NODE,
    REASON_CONNECTION,
    REASON_WILDCARDS,
    REASON_CLASSES,
    REASON_SYNTAX,
    REASON_PREFIX,
];

/// A subscribe refused for its pattern's cost: what to tell the client, and
/// the counter label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The `wsgate_refused_total` label, one of [`REASONS`].
    pub reason: &'static str,
    /// The subscribe reply's `error`.
    pub message: String,
}

/// The per-pattern and per-connection limits, from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatternLimits {
    /// `WSGATE_MAX_PATTERN_WILDCARDS`: `?`s plus runs of `*`.
    pub max_wildcards: usize,
    /// `WSGATE_MAX_PATTERN_CLASSES`: `[...]` classes.
    pub max_classes: usize,
    /// `WSGATE_MAX_PATTERNS_PER_CONNECTION`: patterns one socket may hold.
    pub max_per_connection: usize,
    /// `WSGATE_MIN_PATTERN_PREFIX_BYTES`: literal bytes before the first
    /// wildcard, required of every pattern that is not cheap.
    pub min_prefix: usize,
}

/// What one pattern is made of, counted the way Redis reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Shape {
    /// `?`s plus runs of consecutive `*`s (`**` means the same as `*`).
    pub wildcards: usize,
    /// `[...]` classes.
    pub classes: usize,
    /// A `[` whose class runs to the end of the pattern without a `]`.
    pub unterminated: bool,
}

/// Reads `pattern` with Redis's tokenisation (`src/pattern.rs`): `\x` is a
/// literal `x`, `[` opens a class that an unescaped `]` closes (even right
/// after the `[`, so `[]` is an empty class), and inside a class `\` escapes.
#[must_use]
pub fn shape(pattern: &[u8]) -> Shape {
    let mut s = Shape::default();
    let mut i = 0;
    let mut after_star = false;
    while let Some(&b) = pattern.get(i) {
        i += 1;
        let star = b == b'*';
        match b {
            b'*' if !after_star => s.wildcards += 1,
            b'?' => s.wildcards += 1,
            b'\\' => i += 1,
            b'[' => {
                s.classes += 1;
                if pattern.get(i) == Some(&b'^') {
                    i += 1;
                }
                // Redis's order of checks (see `crate::pattern`): an escape,
                // then `]`, then the end, then a three-byte range, which may
                // swallow a `]` (`[a-]` is the range `a`..`]`, still open).
                loop {
                    match (pattern.get(i), pattern.get(i + 1), pattern.get(i + 2)) {
                        (Some(b'\\'), Some(_), _) => i += 2,
                        (Some(b']'), _, _) => {
                            i += 1;
                            break;
                        }
                        (None, _, _) => {
                            s.unterminated = true;
                            break;
                        }
                        (Some(_), Some(b'-'), Some(_)) => i += 3,
                        (Some(_), _, _) => i += 1,
                    }
                }
            }
            _ => {}
        }
        after_star = star;
    }
    s
}

impl PatternLimits {
    /// Why `pattern` may not be subscribed at all, if it may not.
    pub fn check(&self, pattern: &[u8]) -> Result<(), Refusal> {
        let s = shape(pattern);
        if s.unterminated {
            return Err(Refusal {
                reason: REASON_SYNTAX,
                message: "invalid pattern: unterminated [ class".to_owned(),
            });
        }
        if !is_cheap(pattern) && literal_prefix(pattern).len() < self.min_prefix {
            // Its cover would be `*`: the node would receive every publish.
            return Err(Refusal {
                reason: REASON_PREFIX,
                message: format!(
                    "pattern must start with at least {} literal byte(s) before its first wildcard (or be a literal followed by *)",
                    self.min_prefix
                ),
            });
        }
        if s.wildcards > self.max_wildcards {
            return Err(Refusal {
                reason: REASON_WILDCARDS,
                message: format!(
                    "pattern has too many wildcards ({}, max {})",
                    s.wildcards, self.max_wildcards
                ),
            });
        }
        if s.classes > self.max_classes {
            return Err(Refusal {
                reason: REASON_CLASSES,
                message: format!(
                    "pattern has too many [...] classes ({}, max {})",
                    s.classes, self.max_classes
                ),
            });
        }
        Ok(())
    }
}

/// Why a connection holding `held` may not subscribe to `topic`, if it may
/// not: the pattern's shape, then the connection's pattern count. Channels
/// always pass (an exact channel costs Redis one hash lookup).
pub fn connection_refusal<'a>(
    limits: &PatternLimits,
    topic: &Topic,
    held: impl Iterator<Item = &'a Topic>,
) -> Option<Refusal> {
    let Topic::Pattern(pattern) = topic else {
        return None;
    };
    if let Err(refusal) = limits.check(pattern) {
        return Some(refusal);
    }
    let patterns = held.filter(|t| matches!(t, Topic::Pattern(_))).count();
    (patterns >= limits.max_per_connection).then(|| Refusal {
        reason: REASON_CONNECTION,
        message: format!(
            "pattern limit reached ({} per connection)",
            limits.max_per_connection
        ),
    })
}

/// The refusal of a pattern that would take the node past `max` distinct
/// patterns (`WSGATE_MAX_PATTERNS`).
#[must_use]
pub fn node_refusal(max: usize) -> Refusal {
    Refusal {
        reason: REASON_NODE,
        message: format!("too many patterns on this node ({max})"),
    }
}

/// Is `b` glob syntax for Redis outside a class?
fn is_glob(b: u8) -> bool {
    matches!(b, b'*' | b'?' | b'[' | b'\\')
}

/// The bytes before the first glob syntax (`*`, `?`, `[`, `\`): every channel
/// `pattern` matches starts with them (the argument of rule 4 of the ACL rule
/// in `docs/security.md`), so the Redis pattern `<prefix>*` receives at least
/// everything `pattern` does.
#[must_use]
pub fn literal_prefix(pattern: &[u8]) -> &[u8] {
    let end = pattern.iter().position(|&b| is_glob(b));
    pattern
        .get(..end.unwrap_or(pattern.len()))
        .unwrap_or(pattern)
}

/// Is `pattern` cheap for Redis to match against every publish? A literal
/// (compared byte by byte, failing at the first difference) or a literal
/// followed only by `*`s (the same, then done). Everything else (a leading
/// `*`, a `?`, a class, an escape, a `*` followed by more) may make Redis
/// walk the whole channel, and is coalesced instead.
#[must_use]
pub fn is_cheap(pattern: &[u8]) -> bool {
    let rest = pattern
        .get(literal_prefix(pattern).len()..)
        .unwrap_or_default();
    rest.iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    const LIMITS: PatternLimits = PatternLimits {
        max_wildcards: 4,
        max_classes: 2,
        max_per_connection: 2,
        min_prefix: 0,
    };

    /// Issue 10: `*{k}x{i}*z*` has no literal prefix, so its cover is `*`
    /// (the node receives every publish): refused by default; cheap
    /// patterns (`*` alone, `news.*`) and anchored ones are fine.
    #[test]
    fn unanchored_patterns_need_a_literal_prefix() {
        let limits = PatternLimits {
            min_prefix: 1,
            ..LIMITS
        };
        for ok in [&b"*"[..], b"news.*", b"a*x*", b"n?ws", b"news.[ab]"] {
            assert_eq!(limits.check(ok), Ok(()), "{}", String::from_utf8_lossy(ok));
        }
        for bad in [&b"*x*"[..], b"*0x1*z*", b"?a", b"[ab]c", b"*.error"] {
            let refusal = limits.check(bad).expect_err("refused");
            assert_eq!(refusal.reason, REASON_PREFIX);
        }
        assert_eq!(LIMITS.check(b"*x*"), Ok(()), "0 allows them");
    }

    fn s(p: &[u8]) -> (usize, usize, bool) {
        let s = shape(p);
        (s.wildcards, s.classes, s.unterminated)
    }

    #[test]
    fn shapes_are_counted_as_redis_reads_them() {
        assert_eq!(s(b"news.sport"), (0, 0, false));
        assert_eq!(s(b"news.*"), (1, 0, false));
        assert_eq!(s(b"news.**"), (1, 0, false), "a run of * is one");
        assert_eq!(s(b"*a*"), (2, 0, false));
        assert_eq!(s(b"*0x1*z*"), (3, 0, false));
        assert_eq!(s(b"a?b?"), (2, 0, false));
        assert_eq!(s(b"\\*\\?\\["), (0, 0, false), "escapes are literals");
        assert_eq!(s(b"a\\"), (0, 0, false), "a trailing \\ is a literal");
        assert_eq!(s(b"[ab]"), (0, 1, false));
        assert_eq!(s(b"[^a-z]?"), (1, 1, false));
        assert_eq!(
            s(b"[*?]"),
            (0, 1, false),
            "syntax inside a class is a member"
        );
        assert_eq!(s(b"[]a]"), (0, 1, false), "[] is an empty class, then a]");
        assert_eq!(s(b"[\\]]"), (0, 1, false), "an escaped ] does not close");
        assert_eq!(s(b"[a-"), (0, 1, true));
        assert_eq!(s(b"news.*9x9*z*[a-"), (3, 1, true));
        assert_eq!(s(b"["), (0, 1, true));
        assert_eq!(s(b"[^"), (0, 1, true));
        assert_eq!(s(b"[\\"), (0, 1, true), "a lone \\ cannot close it");
        assert_eq!(s(b"[\\]"), (0, 1, true));
        assert_eq!(s(b"a]b"), (0, 0, false), "] outside a class is a literal");
        assert_eq!(s(b"[a-]"), (0, 1, true), "the range a..] leaves it open");
        assert_eq!(s(b"[a-]]"), (0, 1, false));
        assert_eq!(s(b"[-a]"), (0, 1, false));
        assert_eq!(s(b"[a-c-e]"), (0, 1, false));
    }

    #[test]
    fn check_names_the_limit() {
        assert_eq!(LIMITS.check(b"*a*b*c*"), Ok(()));
        let e = LIMITS.check(b"*a*b*c*d*").unwrap_err();
        assert_eq!(e.reason, REASON_WILDCARDS);
        assert_eq!(e.message, "pattern has too many wildcards (5, max 4)");
        let e = LIMITS.check(b"[a][b][c]").unwrap_err();
        assert_eq!(e.reason, REASON_CLASSES);
        assert_eq!(e.message, "pattern has too many [...] classes (3, max 2)");
        let e = LIMITS.check(b"news.*9x9*z*[a-").unwrap_err();
        assert_eq!(e.reason, REASON_SYNTAX);
        assert_eq!(e.message, "invalid pattern: unterminated [ class");
    }

    #[test]
    fn the_connection_count_covers_patterns_only() {
        let p = |s: &'static str| Topic::Pattern(Bytes::from_static(s.as_bytes()));
        let c = |s: &'static str| Topic::Channel(Bytes::from_static(s.as_bytes()));
        let held = [p("a.*"), c("b"), c("c")];
        assert_eq!(connection_refusal(&LIMITS, &p("d.*"), held.iter()), None);
        let held = [p("a.*"), p("b.*"), c("c")];
        let e = connection_refusal(&LIMITS, &p("d.*"), held.iter()).unwrap();
        assert_eq!(e.reason, REASON_CONNECTION);
        assert_eq!(e.message, "pattern limit reached (2 per connection)");
        assert_eq!(connection_refusal(&LIMITS, &c("[a-"), held.iter()), None);
    }

    #[test]
    fn literal_prefixes_and_cheapness() {
        assert_eq!(literal_prefix(b"news.*"), b"news.");
        assert_eq!(literal_prefix(b"news.sport"), b"news.sport");
        assert_eq!(literal_prefix(b"*x"), b"");
        assert_eq!(literal_prefix(b"a?b"), b"a");
        assert_eq!(literal_prefix(b"a[b]"), b"a");
        assert_eq!(literal_prefix(b"a\\*b"), b"a");
        assert_eq!(literal_prefix(b"a]^-b*"), b"a]^-b");
        for cheap in [&b"news.*"[..], b"news.**", b"news", b"*", b"a]b"] {
            assert!(is_cheap(cheap), "{cheap:?}");
        }
        for costly in [&b"*x"[..], b"a*b", b"a?", b"a[b]", b"a\\*", b"news.*9x9*z*"] {
            assert!(!is_cheap(costly), "{costly:?}");
        }
    }

    #[test]
    fn every_channel_a_pattern_matches_starts_with_its_literal_prefix() {
        // The coalescing rests on this: exhaustively over short patterns and
        // channels of a small alphabet, with Redis's own matcher.
        let alphabet = [b'a', b'b', b'*', b'?', b'[', b']', b'^', b'-', b'\\'];
        let mut patterns = vec![Vec::new()];
        for _ in 0..4 {
            let longer: Vec<Vec<u8>> = patterns
                .iter()
                .filter(|p| p.len() == patterns.last().map_or(0, Vec::len))
                .flat_map(|p| {
                    alphabet.iter().map(move |&b| {
                        let mut q = p.clone();
                        q.push(b);
                        q
                    })
                })
                .collect();
            patterns.extend(longer);
        }
        let channels: Vec<Vec<u8>> = patterns.iter().filter(|c| c.len() <= 3).cloned().collect();
        for p in patterns.iter().filter(|p| !p.is_empty()) {
            let prefix = literal_prefix(p);
            let mut cover = prefix.to_vec();
            cover.push(b'*');
            for c in &channels {
                if crate::pattern::matches(p, c) {
                    assert!(c.starts_with(prefix), "{p:?} matched {c:?}");
                    assert!(crate::pattern::matches(&cover, c), "{p:?} {c:?}");
                }
            }
        }
    }
}
