//! Fuzzes `wsgate::pattern::matches`, the Redis glob matcher.
//!
//! Checks: it never panics; it answers within libFuzzer's `-timeout`; it
//! agrees with `redis_stringmatchlen` below, a line-by-line transliteration
//! of Redis's C `stringmatchlen()` (src/util.c of Redis 7.0 with the
//! CVE-2024-31228 nesting limit, as Debian's 7.0.15 ships it, signed
//! `char` as on x86-64, reads past the end seeing the NUL terminator as C
//! does); and two laws: every channel matches itself with every byte
//! `\`-escaped, and `*` matches exactly the non-empty channels.
//!
//! Input: two little-endian bytes give the pattern length (modulo what is
//! left), then two repeat bytes for the pattern and the channel, then the
//! pattern, then the channel. A repeat byte `r` of 0xF0 or more repeats its
//! string `128 * (r - 0xEF)` times (else once), cut to [`CAP`] bytes, so that
//! long, self-similar inputs (`*a*a*a...` past Redis's 1000-deep `*`
//! nesting limit, long runs of `a`) are a few bytes away for the fuzzer.
//!
//! The cap keeps each run well inside `-timeout=2` under ASan: matching is
//! O(pattern × channel) in the worst case, in Redis as here (a 7 KiB
//! pattern against an 8 KiB channel costs Redis 7.0.15 ~100 ms per
//! `PUBLISH`, and `matches` ~75 ms in release). wsgate itself caps
//! patterns and channels at `WSGATE_MAX_PATTERN_BYTES` (256).

#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate::pattern::matches;

/// A C string view: the byte at `i`, or the NUL terminator past the end.
fn at(s: &[u8], i: usize) -> i32 {
    // `char` is signed on x86-64: sign-extend as C's int promotion does.
    i32::from(s.get(i).map_or(0, |&b| b as i8))
}

/// Redis's `stringmatchlen()` with `nocase` = 0, kept as close to the C as
/// Rust allows: `p`/`s` index into the inputs, `plen`/`slen` count down.
fn redis_stringmatchlen(pattern: &[u8], string: &[u8]) -> bool {
    let mut skip_longer_matches = false;
    imp(
        pattern,
        0,
        pattern.len() as isize,
        string,
        0,
        string.len() as isize,
        &mut skip_longer_matches,
        0,
    )
}

#[allow(clippy::too_many_arguments)]
fn imp(
    pat: &[u8],
    mut p: usize,
    mut plen: isize,
    st: &[u8],
    mut s: usize,
    mut slen: isize,
    skip_longer_matches: &mut bool,
    nesting: u32,
) -> bool {
    if nesting > 1000 {
        return false;
    }
    while plen != 0 && slen != 0 {
        match at(pat, p) as u8 {
            b'*' => {
                while plen != 0 && at(pat, p + 1) == i32::from(b'*') {
                    p += 1;
                    plen -= 1;
                }
                if plen == 1 {
                    return true;
                }
                while slen != 0 {
                    if imp(
                        pat,
                        p + 1,
                        plen - 1,
                        st,
                        s,
                        slen,
                        skip_longer_matches,
                        nesting + 1,
                    ) {
                        return true;
                    }
                    if *skip_longer_matches {
                        return false;
                    }
                    s += 1;
                    slen -= 1;
                }
                *skip_longer_matches = true;
                return false;
            }
            b'?' => {
                s += 1;
                slen -= 1;
            }
            b'[' => {
                p += 1;
                plen -= 1;
                let not = at(pat, p) == i32::from(b'^');
                if not {
                    p += 1;
                    plen -= 1;
                }
                let mut matched = false;
                loop {
                    if at(pat, p) == i32::from(b'\\') && plen >= 2 {
                        p += 1;
                        plen -= 1;
                        if at(pat, p) == at(st, s) {
                            matched = true;
                        }
                    } else if at(pat, p) == i32::from(b']') {
                        break;
                    } else if plen == 0 {
                        p -= 1;
                        plen += 1;
                        break;
                    } else if plen >= 3 && at(pat, p + 1) == i32::from(b'-') {
                        let mut start = at(pat, p);
                        let mut end = at(pat, p + 2);
                        let c = at(st, s);
                        if start > end {
                            std::mem::swap(&mut start, &mut end);
                        }
                        p += 2;
                        plen -= 2;
                        if c >= start && c <= end {
                            matched = true;
                        }
                    } else if at(pat, p) == at(st, s) {
                        matched = true;
                    }
                    p += 1;
                    plen -= 1;
                }
                if not {
                    matched = !matched;
                }
                if !matched {
                    return false;
                }
                s += 1;
                slen -= 1;
            }
            other => {
                if other == b'\\' && plen >= 2 {
                    p += 1;
                    plen -= 1;
                }
                if at(pat, p) != at(st, s) {
                    return false;
                }
                s += 1;
                slen -= 1;
            }
        }
        p += 1;
        plen -= 1;
        if slen == 0 {
            while at(pat, p) == i32::from(b'*') {
                p += 1;
                plen -= 1;
            }
            break;
        }
    }
    plen == 0 && slen == 0
}

/// Longest pattern or channel after repetition.
const CAP: usize = 2560;

fuzz_target!(|data: &[u8]| {
    let Some(([l0, l1, rp, rc], rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let split = usize::from(u16::from_le_bytes([*l0, *l1])) % (rest.len() + 1);
    let (pattern, channel) = rest.split_at(split);
    let repeat = |bytes: &[u8], times: u8| {
        let times = match times {
            0xF0.. => 128 * usize::from(times - 0xEF),
            _ => 1,
        };
        let mut out = bytes.repeat(times);
        out.truncate(CAP);
        out
    };
    let (pattern, channel) = (&repeat(pattern, *rp)[..], &repeat(channel, *rc)[..]);

    let got = matches(pattern, channel);
    let want = redis_stringmatchlen(pattern, channel);
    assert_eq!(
        got,
        want,
        "matches({:?}, {:?}) = {got}, Redis's stringmatchlen says {want}",
        pattern.escape_ascii().to_string(),
        channel.escape_ascii().to_string()
    );

    let escaped: Vec<u8> = channel.iter().flat_map(|&b| [b'\\', b]).collect();
    assert!(
        matches(&escaped, channel),
        "escaped channel does not match itself: {:?}",
        channel.escape_ascii().to_string()
    );
    assert_eq!(matches(b"*", channel), !channel.is_empty());
    // The same with the pattern as the channel: any bytes go both ways.
    let _ = matches(channel, pattern);
});
