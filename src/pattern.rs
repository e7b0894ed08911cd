//! Redis glob matching for pattern subscriptions.
//!
//! The in-memory broker has to deliver a publish to exactly the pattern
//! subscribers Redis itself would deliver it to, so [`matches()`] reproduces
//! the decision of Redis 7.0's `stringmatchlen()` (`src/util.c`, the function
//! behind `PSUBSCRIBE`, `PUBLISH`, `KEYS` and `SCAN MATCH`) byte for byte,
//! quirks included, rather than implementing some cleaner glob dialect:
//!
//! * `*` matches any run of bytes, `?` any single byte, `\x` the byte `x`
//!   literally; a trailing lone `\` matches a literal `\`.
//! * `[...]` is a byte class with `^` negation, `\` escapes and `a-z`
//!   ranges (reversed ranges are swapped). An unterminated class simply ends
//!   with the pattern, and `[]` is an empty class that matches nothing.
//! * An empty channel is only ever matched by the empty pattern: Redis's
//!   matching loop never runs when the subject is empty, so even `*` does not
//!   match it (`KEYS *` hides this by never calling the matcher; `PSUBSCRIBE *`
//!   does not).
//! * Range ends are compared as C `char`, which is signed on x86-64 Linux:
//!   bytes `0x80..=0xFF` sort *below* `0x00`, so `[\x00-\xff]` matches only
//!   `0x00` and `0xFF`. This was checked against a real x86-64
//!   `redis-server` 7.0.15. (A Redis built where `char` is unsigned, such as
//!   aarch64 Linux, would order them unsigned; see [`as_c_char`].)
//! * Redis's `skipLongerMatches` pruning (keeps `a*a*a*...b` polynomial) and
//!   its limit of 1000 nested `*` expansions (beyond which it reports no
//!   match) are reproduced, so pathological patterns agree with Redis too.
//!
//! Deliberately not provided: the case-insensitive mode (`nocase`) of the C
//! function. Pub/sub matching never uses it, and offering it would invite
//! callers to disagree with Redis.

/// Redis gives up (reports "no match") once `*` expansions nest deeper than
/// this, to bound stack use on abusive patterns; we must give up at the same
/// point to return the same answers.
const MAX_NESTING: u32 = 1000;

/// Does `channel` match the Redis glob `pattern`?
///
/// This is the question Redis answers for every `PUBLISH` against every
/// `PSUBSCRIBE` pattern; answering it identically lets the gateway route
/// messages locally without a round trip. Never panics, whatever the bytes.
#[must_use]
pub fn matches(pattern: &[u8], channel: &[u8]) -> bool {
    Search::default().run(pattern, channel, 0)
}

/// State shared by every nested `*` expansion of one [`matches()`] call.
#[derive(Default)]
struct Search {
    /// Redis's `skipLongerMatches`: set once the text after some `*` has been
    /// tried at every remaining position of the channel without success.
    /// Letting an outer `*` swallow more bytes cannot help after that, so all
    /// enclosing `*` loops give up at once; without this, backtracking over
    /// several `*`s is exponential.
    exhausted: bool,
}

impl Search {
    /// Matches `pattern` against `string`, `nesting` `*` expansions deep.
    ///
    /// Walks both inputs in step like Redis: the loop runs only while both
    /// have bytes left, and the answer is "both fully consumed".
    fn run(&mut self, mut pattern: &[u8], mut string: &[u8], nesting: u32) -> bool {
        if nesting > MAX_NESTING {
            return false;
        }
        while let (Some(&token), Some(&byte)) = (pattern.first(), string.first()) {
            if token == b'*' {
                return self.star(pattern, string, nesting);
            }
            match single(pattern, byte) {
                Some(rest) => pattern = rest,
                None => return false,
            }
            string = tail(string, 1);
            if string.is_empty() {
                // Only `*`s may be left over once the channel runs out.
                pattern = skip_stars(pattern);
                break;
            }
        }
        pattern.is_empty() && string.is_empty()
    }

    /// Handles a run of `*`s at the start of `pattern` (with `string`
    /// non-empty), trying the rest of the pattern at each remaining position.
    ///
    /// Like Redis, the rest is never tried against the empty remainder: it
    /// holds no leading `*`, so it could not match nothing anyway.
    fn star(&mut self, pattern: &[u8], string: &[u8], nesting: u32) -> bool {
        let rest = skip_stars(pattern);
        if rest.is_empty() {
            return true;
        }
        for start in 0..string.len() {
            if self.run(rest, tail(string, start), nesting + 1) {
                return true;
            }
            if self.exhausted {
                return false;
            }
        }
        self.exhausted = true;
        false
    }
}

/// Matches one non-`*` token at the start of `pattern` against `byte`,
/// returning the pattern after that token, or `None` if it does not match.
fn single(pattern: &[u8], byte: u8) -> Option<&[u8]> {
    match pattern {
        [b'?', rest @ ..] => Some(rest),
        [b'[', body @ ..] => class(body, byte),
        // An escape needs a byte after it; a trailing `\` is itself literal.
        [b'\\', literal, rest @ ..] | [literal, rest @ ..] => (*literal == byte).then_some(rest),
        [] => None,
    }
}

/// Matches `byte` against a character class whose body (after the `[`)
/// starts `body`, returning the pattern after the class on success.
///
/// The order of the checks is Redis's, and it decides the odd cases: an
/// escape wins over `]`, `]` closes even as the first member (so `[]` is
/// empty), running out of pattern ends the class silently, and a range needs
/// all three of its bytes present (`[a-]` is the range `a`..`]`).
fn class(body: &[u8], byte: u8) -> Option<&[u8]> {
    let (negated, mut rest) = match body {
        [b'^', rest @ ..] => (true, rest),
        _ => (false, body),
    };
    let mut found = false;
    loop {
        rest = match rest {
            [b'\\', member, after @ ..] => {
                found |= *member == byte;
                after
            }
            [b']', after @ ..] => break (found != negated).then_some(after),
            [] => break (found != negated).then_some(rest),
            [start, b'-', end, after @ ..] => {
                found |= in_range(*start, *end, byte);
                after
            }
            [member, after @ ..] => {
                found |= *member == byte;
                after
            }
        };
    }
}

/// Is `byte` within the inclusive range between `start` and `end`, in
/// either order?
///
/// Redis compares the bytes as C `char`, signed on x86-64, so bytes of
/// `0x80` and above sort before `0x00`; [`as_c_char`] reproduces that.
fn in_range(start: u8, end: u8, byte: u8) -> bool {
    let (a, b) = (as_c_char(start), as_c_char(end));
    let (low, high) = if a <= b { (a, b) } else { (b, a) };
    (low..=high).contains(&as_c_char(byte))
}

/// Reinterprets a byte the way a signed C `char` holds it, because that is
/// the ordering Redis's range check uses on x86-64, where it was verified.
/// This is the one place to change to mimic an unsigned-`char` Redis build.
fn as_c_char(byte: u8) -> i8 {
    i8::from_ne_bytes([byte])
}

/// Drops leading `*`s: a run of them means the same as one, and trailing
/// ones may match nothing once the channel is used up.
fn skip_stars(pattern: &[u8]) -> &[u8] {
    let stars = pattern.iter().take_while(|&&b| b == b'*').count();
    tail(pattern, stars)
}

/// `bytes` without its first `n` bytes (empty if it is shorter), so that
/// advancing can never panic.
fn tail(bytes: &[u8], n: usize) -> &[u8] {
    bytes.get(n..).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::matches;

    /// Runs a table of `(pattern, channel, expected)` cases, reporting every
    /// failure at once rather than stopping at the first.
    fn check(cases: &[(&[u8], &[u8], bool)]) {
        let failures: Vec<String> = cases
            .iter()
            .filter(|(p, c, want)| matches(p, c) != *want)
            .map(|(p, c, want)| {
                format!(
                    "matches({:?}, {:?}) should be {want}",
                    p.escape_ascii().to_string(),
                    c.escape_ascii().to_string()
                )
            })
            .collect();
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn empty_inputs() {
        check(&[
            (b"", b"", true),
            (b"", b"a", false),
            (b"a", b"", false),
            // The matching loop never runs on an empty channel, so only the
            // empty pattern matches it; `*` and `**` do not (Redis 7.0.15).
            (b"*", b"", false),
            (b"**", b"", false),
            (b"?", b"", false),
            (b"[^]", b"", false),
            (b"\\", b"", false),
        ]);
    }

    #[test]
    fn literals() {
        check(&[
            (b"hello", b"hello", true),
            (b"hello", b"hell", false),
            (b"hello", b"helloo", false),
            (b"hello", b"Hello", false),
            (b"news.sport", b"news.sport", true),
            (b"a\x00b", b"a\x00b", true),
            (b"a\x00b", b"a\x00c", false),
            (b"\xff\x80", b"\xff\x80", true),
            (b"\xff\x80", b"\xff\x81", false),
        ]);
    }

    #[test]
    fn question_mark() {
        check(&[
            (b"h?llo", b"hello", true),
            (b"h?llo", b"hallo", true),
            (b"h?llo", b"hxllo", true),
            (b"h?llo", b"hllo", false),
            (b"h?llo", b"heello", false),
            (b"?", b"\xff", true),
            (b"??", b"a", false),
            (b"?", b"ab", false),
        ]);
    }

    #[test]
    fn star() {
        check(&[
            (b"*", b"a", true),
            (b"*", b"anything at all", true),
            (b"**", b"abc", true),
            (b"***", b"x", true),
            (b"a*", b"a", true),
            (b"a*", b"abc", true),
            (b"a*", b"", false),
            (b"a*", b"ba", false),
            (b"a**", b"a", true),
            (b"*a", b"a", true),
            (b"*a", b"bba", true),
            (b"*a", b"ab", false),
            (b"h*llo", b"hllo", true),
            (b"h*llo", b"heeeello", true),
            (b"h*llo", b"hello!", false),
            (b"a**b", b"ab", true),
            (b"a**b", b"axxb", true),
            (b"*?", b"", false),
            (b"*?", b"a", true),
            (b"*?", b"ab", true),
            (b"?*", b"a", true),
            (b"*b*", b"abc", true),
            (b"*b*", b"b", true),
            (b"*b*", b"ac", false),
            (b"news.*", b"news.sport", true),
            (b"news.*", b"news.", true),
            (b"news.*", b"news", false),
            (b"*.*.*", b"a.b.c", true),
            (b"*.*.*", b"a.b", false),
        ]);
    }

    #[test]
    fn classes() {
        check(&[
            (b"h[ae]llo", b"hello", true),
            (b"h[ae]llo", b"hallo", true),
            (b"h[ae]llo", b"hillo", false),
            (b"h[^e]llo", b"hallo", true),
            (b"h[^e]llo", b"hbllo", true),
            (b"h[^e]llo", b"hello", false),
            (b"h[a-b]llo", b"hallo", true),
            (b"h[a-b]llo", b"hbllo", true),
            (b"h[a-b]llo", b"hcllo", false),
            (b"[b-a]", b"a", true),
            (b"[b-a]", b"b", true),
            (b"[b-a]", b"c", false),
            (b"[a-c0-2x]", b"1", true),
            (b"[a-c0-2x]", b"x", true),
            (b"[a-c0-2x]", b"3", false),
            (b"[^a-c]", b"b", false),
            (b"[^a-c]", b"d", true),
            (b"[abc]", b"ab", false),
            (b"[a]*", b"abc", true),
            // A `-` first or after a range is just a member.
            (b"[-a]", b"-", true),
            (b"[a-c-e]", b"-", true),
            (b"[a-c-e]", b"d", false),
        ]);
    }

    #[test]
    fn odd_classes() {
        check(&[
            // `^` is taken as negation, then `]` closes an empty class.
            (b"[^]", b"x", true),
            (b"[^]", b"]", true),
            (b"[^]", b"xy", false),
            // `]` right after `[` closes an empty class: nothing matches.
            (b"[]", b"x", false),
            (b"[]", b"]", false),
            (b"[]a]", b"a]", false),
            (b"[]a]", b"]", false),
            (b"[]a]", b"a", false),
            // `[a-]` has three bytes left, so it is the range `]`..`a`.
            (b"[a-]", b"]", true),
            (b"[a-]", b"_", true),
            (b"[a-]", b"a", true),
            (b"[a-]", b"-", false),
            (b"[a-]", b"b", false),
            (b"[a-]x", b"ax", false),
            // A `^` that is not first is a member.
            (b"[a^]", b"^", true),
            // `[` inside a class is a member.
            (b"[[]", b"[", true),
        ]);
    }

    #[test]
    fn unterminated_classes() {
        check(&[
            (b"[abc", b"a", true),
            (b"[abc", b"b", true),
            (b"[abc", b"c", true),
            (b"[abc", b"d", false),
            (b"[abc", b"ab", false),
            (b"[abc", b"", false),
            // An empty class at the end matches no byte...
            (b"a[", b"a", false),
            (b"a[", b"ab", false),
            (b"a[", b"a[", false),
            (b"[", b"[", false),
            // ...and negating it matches any one byte.
            (b"a[^", b"ab", true),
            (b"a[^", b"a", false),
            (b"a[^", b"abc", false),
            // Too few bytes left for a range: `a` and `-` are members.
            (b"[a-", b"a", true),
            (b"[a-", b"-", true),
            (b"[a-", b"b", false),
            (b"[a-c", b"b", true),
            // A lone trailing `\` in a class is a member.
            (b"[\\", b"\\", true),
            (b"[a\\", b"\\", true),
        ]);
    }

    #[test]
    fn escapes() {
        check(&[
            (b"h\\*llo", b"h*llo", true),
            (b"h\\*llo", b"hello", false),
            (b"h\\*llo", b"hllo", false),
            (b"\\?", b"?", true),
            (b"\\?", b"a", false),
            (b"\\[a]", b"[a]", true),
            (b"\\[a]", b"a", false),
            (b"\\\\", b"\\", true),
            (b"\\\\", b"\\\\", false),
            (b"\\a", b"a", true),
            (b"\\", b"\\", true),
            (b"a\\", b"a\\", true),
            (b"a\\", b"a", false),
            (b"[\\]]", b"]", true),
            (b"[\\]]", b"\\", false),
            (b"[\\]", b"]", true),
            (b"[\\-]", b"-", true),
            (b"[\\-]", b"\\", false),
            (b"[a\\-c]", b"b", false),
            (b"[a\\-c]", b"-", true),
            (b"[^\\]]", b"]", false),
            (b"[^\\]]", b"x", true),
            (b"*\\*", b"ab*", true),
            (b"*\\*", b"ab", false),
        ]);
    }

    #[test]
    fn high_bytes() {
        check(&[
            (b"[\x80-\xff]", b"\x90", true),
            (b"[\x80-\xff]", b"\xff", true),
            (b"[\x80-\xff]", b"a", false),
            (b"[\xff-\x80]", b"\x90", true),
            (b"?", b"\xc3", true),
            (b"[^a]", b"\xc3", true),
            (b"[\xc3]", b"\xc3", true),
            (b"\xc3*", b"\xc3\xa9", true),
            // Redis compares range ends as signed C `char` (x86-64), so
            // `\x00-\xff` is the range -1..=0: only those two bytes.
            (b"[\x00-\xff]", b"\x00", true),
            (b"[\x00-\xff]", b"\xff", true),
            (b"[\x00-\xff]", b"a", false),
            (b"[\x00-\xff]", b"\x80", false),
            (b"[a-\xff]", b"\x00", true),
            (b"[a-\xff]", b"a", true),
            (b"[a-\xff]", b"b", false),
            (b"[a-\xff]", b"\x80", false),
            (b"[\x80-\x7f]", b"\x00", true),
            (b"[\x80-\x7f]", b"\xff", true),
        ]);
    }

    #[test]
    fn pathological_patterns_finish() {
        let many_a = [b'a'; 5000];
        let mut near_miss = many_a.to_vec();
        near_miss.push(b'c');
        let mut hit = many_a.to_vec();
        hit.push(b'b');
        check(&[
            (b"a*a*a*a*a*a*a*a*a*a*b", &many_a, false),
            (b"a*a*a*a*a*a*a*a*a*a*b", &near_miss, false),
            (b"a*a*a*a*a*a*a*a*a*a*b", &hit, true),
            (b"*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b", &many_a, false),
            (b"*?*?*?*?*?*?*?*?*?*?*?*?*?*?*?*?*?*?*?*?c", &many_a, false),
        ]);
    }

    /// `"*a"` repeated `stars` times, then matched against `len` `a`s.
    fn star_chain(stars: usize, len: usize) -> bool {
        matches(&b"*a".repeat(stars), &vec![b'a'; len])
    }

    #[test]
    fn nesting_limit_matches_redis() {
        // Redis allows 1000 nested `*` expansions and reports no match past
        // that, even where an unlimited matcher would succeed.
        assert!(star_chain(1000, 1000));
        assert!(star_chain(1000, 1100));
        assert!(!star_chain(1001, 1001));
        assert!(!star_chain(1001, 1100));
        assert!(!star_chain(3000, 3000));
        // Stars that never nest (one literal run each) are not limited.
        assert!(matches(&b"a".repeat(3000), &b"a".repeat(3000)));
    }

    #[test]
    fn never_panics_on_syntax_fragments() {
        // Every short pattern over the syntax bytes, against a few channels:
        // the answer does not matter here, only that there is one.
        let alphabet = [b'*', b'?', b'[', b']', b'^', b'-', b'\\', b'a', 0xff];
        let channels: [&[u8]; 5] = [b"", b"a", b"]", b"a-\\", b"\xff\x00"];
        let mut pattern = Vec::new();
        for x in alphabet {
            for y in alphabet {
                for z in alphabet {
                    pattern.clear();
                    pattern.extend([x, y, z]);
                    for len in 0..=pattern.len() {
                        for c in channels {
                            let _ = matches(&pattern[..len], c);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn literal_patterns_match_only_themselves() {
        for p in [&b"news.sport"[..], b"a-b]^c", b"", b"\xff\x00"] {
            assert!(matches(p, p));
            let mut longer = p.to_vec();
            longer.push(b'x');
            assert!(!matches(p, &longer));
        }
    }
}
