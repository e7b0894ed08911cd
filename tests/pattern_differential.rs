//! Differential test of `wsgate::pattern::matches` against a real
//! `redis-server`: the in-memory broker must deliver a publish to exactly the
//! pattern subscribers Redis itself would deliver it to.
//!
//! Random patterns and channels (seeded, so every run is the same) are drawn
//! from a small alphabet made of glob syntax (`a b c * ? [ ] ^ - \`), digits
//! and two high bytes (0xE9, 0xFF), plus a fixed set of known quirks (the
//! empty channel, empty classes, signed-`char` ranges). One connection
//! `PSUBSCRIBE`s a batch of distinct patterns; another `PUBLISH`es every
//! channel; the `pmessage`s that come back say which patterns Redis matched,
//! and that set must equal the patterns `matches` accepts, for every
//! (pattern, channel) pair. `PUBLISH`'s receiver count tells when all
//! `pmessage`s of one channel have arrived, and is checked too. A second
//! test checks the 1000-deep `*` nesting limit the same way.
//!
//! Every wait is bounded; a mismatch fails with the bytes escaped.

// Helpers outside `#[test]` fns panic on purpose too (a failed helper is a
// failed test); clippy's allow-expect-in-tests only covers test fns.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::time::{Duration, Instant};

use common::Redis;
use futures_util::StreamExt;
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};

/// Bound on any single wait on Redis (a reply, a message).
const STEP: Duration = Duration::from_secs(5);

/// Rounds of fresh random patterns and channels.
const ROUNDS: usize = 10;
/// Distinct patterns per round (one `PSUBSCRIBE` each round).
const PATTERNS: usize = 200;
/// Distinct channels per round (one `PUBLISH` each).
const CHANNELS: usize = 200;
/// Longest random pattern or channel.
const MAX_LEN: usize = 8;

/// xorshift64*: tiny, seeded, good enough to spread glob syntax around.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// One byte: glob syntax and `a b c` mostly; now and then a digit or a
    /// byte above 0x7F (which Redis ranges compare as signed `char`).
    fn byte(&mut self) -> u8 {
        const COMMON: &[u8] = b"abc*?[]^-\\";
        const RARE: &[u8] = &[b'0', b'5', b'9', 0xE9, 0xFF];
        if self.below(10) == 0 {
            RARE[self.below(RARE.len())]
        } else {
            COMMON[self.below(COMMON.len())]
        }
    }

    fn bytes(&mut self) -> Vec<u8> {
        let len = self.below(MAX_LEN + 1);
        (0..len).map(|_| self.byte()).collect()
    }
}

/// A channel a glob `pattern` is likely to match: `*` becomes 0..=2
/// random bytes, `?` and a `[...]` class one random byte, `\x` the byte
/// `x`, anything else itself; cut to [`MAX_LEN`]. Purely random channels
/// rarely match anything but `*`, so half the channels are made this way.
fn near_match(rng: &mut Rng, pattern: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < pattern.len() {
        match pattern[i] {
            b'*' => (0..rng.below(3)).for_each(|_| out.push(rng.byte())),
            b'?' => out.push(rng.byte()),
            b'[' => {
                out.push(rng.byte());
                while i + 1 < pattern.len() && pattern[i] != b']' {
                    i += 1;
                }
            }
            b'\\' if i + 1 < pattern.len() => {
                i += 1;
                out.push(pattern[i]);
            }
            b => out.push(b),
        }
        i += 1;
    }
    out.truncate(MAX_LEN);
    out
}

/// `n` distinct byte strings: the given fixed ones, then `make`'s.
fn distinct(fixed: &[&[u8]], n: usize, mut make: impl FnMut() -> Vec<u8>) -> Vec<Vec<u8>> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(n);
    for f in fixed {
        if seen.insert(f.to_vec()) {
            out.push(f.to_vec());
        }
    }
    let mut tries = 0;
    while out.len() < n {
        tries += 1;
        assert!(
            tries < 100 * n,
            "alphabet too small for {n} distinct strings"
        );
        let s = make();
        if seen.insert(s.clone()) {
            out.push(s);
        }
    }
    out
}

/// Cases worth checking every run whatever the seed draws: the empty
/// channel and pattern, empty and unterminated classes, trailing escapes,
/// and ranges across the signed-`char` boundary.
const FIXED_PATTERNS: &[&[u8]] = &[
    b"",
    b"*",
    b"**",
    b"?",
    b"\\",
    b"[",
    b"[]",
    b"[^]",
    b"[^",
    b"[a-]",
    b"[]a]",
    b"[\\]]",
    b"[a-\xff]",
    b"[\xff-a]",
    b"[\x00-\xff]",
    b"[\xe9-\xff]",
    b"[0-\xe9]",
    b"[^a-\xff]",
];
const FIXED_CHANNELS: &[&[u8]] = &[
    b"", b"a", b"]", b"-", b"\\", b"^", b"[", b"\xe9", b"\xff", b"0", b"b", b"a]",
];

fn esc(bytes: &[u8]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}

/// Awaits `fut`, failing the test if it takes longer than [`STEP`].
async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {STEP:?}: {what}"))
}

/// `PUBSUB NUMPAT` on the publisher connection.
async fn numpat(publisher: &mut MultiplexedConnection) -> i64 {
    let cmd = redis::cmd("PUBSUB").arg("NUMPAT").to_owned();
    bounded("PUBSUB NUMPAT", cmd.query_async(publisher))
        .await
        .expect("PUBSUB NUMPAT")
}

/// A subscriber and a publisher connection to one private Redis.
struct Pair {
    sink: PubSubSink,
    stream: PubSubStream,
    publisher: MultiplexedConnection,
}

impl Pair {
    async fn connect(redis: &Redis) -> Pair {
        let client = redis::Client::open(redis.url()).expect("client");
        let (sink, stream) = bounded("pubsub connect", client.get_async_pubsub())
            .await
            .expect("pubsub connection")
            .split();
        let publisher = bounded("connect", client.get_multiplexed_async_connection())
            .await
            .expect("publisher connection");
        Pair {
            sink,
            stream,
            publisher,
        }
    }

    /// Subscribes to exactly `patterns` (distinct), checked with NUMPAT.
    async fn psubscribe(&mut self, patterns: &[Vec<u8>]) {
        bounded("PSUBSCRIBE", self.sink.psubscribe(patterns))
            .await
            .expect("PSUBSCRIBE");
        assert_eq!(
            numpat(&mut self.publisher).await,
            patterns.len() as i64,
            "PUBSUB NUMPAT after subscribing"
        );
    }

    async fn punsubscribe(&mut self, patterns: &[Vec<u8>]) {
        bounded("PUNSUBSCRIBE", self.sink.punsubscribe(patterns))
            .await
            .expect("PUNSUBSCRIBE");
        assert_eq!(
            numpat(&mut self.publisher).await,
            0,
            "NUMPAT after PUNSUBSCRIBE"
        );
    }

    /// Publishes to `channel` and returns the patterns Redis delivered it
    /// through, as indices into `patterns`, checking that as many `pmessage`s
    /// arrive as `PUBLISH` counted receivers and that each is this publish.
    async fn redis_matches(
        &mut self,
        patterns: &HashMap<Vec<u8>, usize>,
        channel: &[u8],
        tag: &str,
    ) -> BTreeSet<usize> {
        let cmd = redis::cmd("PUBLISH").arg(channel).arg(tag).to_owned();
        let receivers: i64 = bounded("PUBLISH", cmd.query_async(&mut self.publisher))
            .await
            .expect("PUBLISH");
        let mut got = BTreeSet::new();
        for _ in 0..receivers {
            let msg = bounded(
                &format!(
                    "pmessage {} of {receivers} for {}",
                    got.len() + 1,
                    esc(channel)
                ),
                self.stream.next(),
            )
            .await
            .expect("pub/sub stream ended");
            let pattern: Vec<u8> = msg.get_pattern().expect("a pmessage has a pattern");
            let msg_channel: Vec<u8> = msg.get_channel().expect("channel");
            assert_eq!(
                (msg_channel.as_slice(), msg.get_payload_bytes()),
                (channel, tag.as_bytes()),
                "a pmessage of another publish arrived (pattern {})",
                esc(&pattern)
            );
            let index = *patterns
                .get(&pattern)
                .unwrap_or_else(|| panic!("pmessage for unknown pattern {}", esc(&pattern)));
            assert!(
                got.insert(index),
                "pattern {} delivered {} twice",
                esc(&pattern),
                esc(channel)
            );
        }
        got
    }

    /// Nothing more may arrive once every publish was accounted for.
    async fn expect_no_more_messages(&mut self) {
        if let Ok(Some(msg)) =
            tokio::time::timeout(Duration::from_millis(100), self.stream.next()).await
        {
            panic!("unexpected extra message: {msg:?}");
        }
    }
}

/// What one comparison run saw.
#[derive(Default)]
struct Tally {
    /// (pattern, channel) pairs compared.
    comparisons: usize,
    /// Pairs Redis delivered (so the test is not all "no match").
    delivered: usize,
    /// One line per disagreement.
    mismatches: Vec<String>,
}

/// Compares Redis and `matches` on every pair of `patterns` × `channels`,
/// adding to `tally`.
async fn compare(
    pair: &mut Pair,
    patterns: &[Vec<u8>],
    channels: &[Vec<u8>],
    round: usize,
    tally: &mut Tally,
) {
    let index: HashMap<Vec<u8>, usize> = patterns
        .iter()
        .enumerate()
        .map(|(i, p)| (p.clone(), i))
        .collect();
    assert_eq!(index.len(), patterns.len(), "patterns must be distinct");
    pair.psubscribe(patterns).await;
    for (ci, channel) in channels.iter().enumerate() {
        let by_redis = pair
            .redis_matches(&index, channel, &format!("{round}/{ci}"))
            .await;
        tally.delivered += by_redis.len();
        for (pi, pattern) in patterns.iter().enumerate() {
            tally.comparisons += 1;
            let ours = wsgate::pattern::matches(pattern, channel);
            let theirs = by_redis.contains(&pi);
            if ours != theirs {
                tally.mismatches.push(format!(
                    "pattern {} channel {}: Redis {theirs}, wsgate {ours}",
                    esc(pattern),
                    esc(channel)
                ));
            }
        }
    }
    pair.expect_no_more_messages().await;
    pair.punsubscribe(patterns).await;
}

fn report(tally: &Tally) {
    assert!(
        tally.mismatches.is_empty(),
        "{} of {} (pattern, channel) pairs disagree with Redis:\n{}",
        tally.mismatches.len(),
        tally.comparisons,
        tally
            .mismatches
            .iter()
            .take(50)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test]
async fn random_patterns_match_like_redis() {
    let started = Instant::now();
    let redis = Redis::start().await;
    let mut pair = Pair::connect(&redis).await;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut tally = Tally::default();
    for round in 0..ROUNDS {
        // The fixed cases go in the first round only; later rounds are all random.
        let (fp, fc) = if round == 0 {
            (FIXED_PATTERNS, FIXED_CHANNELS)
        } else {
            (&[][..], &[][..])
        };
        let patterns = distinct(fp, PATTERNS, || rng.bytes());
        let channels = distinct(fc, CHANNELS, || {
            if rng.below(2) == 0 {
                rng.bytes()
            } else {
                let p = &patterns[rng.below(patterns.len())];
                near_match(&mut rng, p)
            }
        });
        compare(&mut pair, &patterns, &channels, round, &mut tally).await;
    }
    eprintln!(
        "pattern differential: {} comparisons, {} delivered by Redis, {} mismatches, {:?}",
        tally.comparisons,
        tally.delivered,
        tally.mismatches.len(),
        started.elapsed()
    );
    assert_eq!(tally.comparisons, ROUNDS * PATTERNS * CHANNELS);
    // A generator that made nearly everything match, or nothing, would
    // test little: demand a real mix (this seed: about 1.6% of pairs match,
    // some 1,900 deliveries).
    assert!(
        tally.delivered > tally.comparisons / 100 && tally.delivered < tally.comparisons / 2,
        "unbalanced sample: {} of {} pairs matched",
        tally.delivered,
        tally.comparisons
    );
    report(&tally);
}

/// `"*a"` repeated `n` times: `n` nested `*` expansions to match.
fn star_chain(n: usize) -> Vec<u8> {
    b"*a".repeat(n)
}

#[tokio::test]
async fn star_nesting_limit_matches_redis() {
    // Redis (with the CVE-2024-31228 fix, as Debian's 7.0.15 has it) gives
    // up past 1000 nested `*` expansions; `matches` claims to do the same.
    let redis = Redis::start().await;
    let mut pair = Pair::connect(&redis).await;
    let patterns: Vec<Vec<u8>> = [999, 1000, 1001, 1002, 1500]
        .into_iter()
        .map(star_chain)
        .collect();
    let channels: Vec<Vec<u8>> = [999, 1000, 1001, 1100, 2000]
        .into_iter()
        .map(|n| vec![b'a'; n])
        .collect();
    let mut tally = Tally::default();
    compare(&mut pair, &patterns, &channels, 0, &mut tally).await;
    assert_eq!(tally.comparisons, 25);
    report(&tally);
    // The limit is really exercised: the 1000-chain matches 1000 `a`s and
    // the 1001-chain matches nothing, by both accounts.
    assert!(wsgate::pattern::matches(&star_chain(1000), &[b'a'; 1000]));
    assert!(!wsgate::pattern::matches(&star_chain(1001), &[b'a'; 1100]));
}
