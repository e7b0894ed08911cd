//! History: which channels keep their last messages (`WSGATE_HISTORY`), the
//! position a message has in its channel's history, and the envelope that
//! carries that position through Redis pub/sub (`docs/history.md`).
//!
//! A history channel's messages are numbered densely from 1 (*offsets*)
//! within an *epoch*: a value chosen when the channel's history is created,
//! which changes whenever that history is lost (expired, Redis restarted
//! without persistence, writes lost). A client that saw offset `n` of epoch
//! `e` can ask for everything after it; a different epoch means it cannot
//! know what it missed.
//!
//! Brokers store the messages (Redis: a Stream and a Function library,
//! `broker::redis::history`; memory: `broker::memory`); this module holds
//! what both and the hub share, and nothing that does I/O.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};

/// Most messages one recovery (`since` on subscribe) reads: a client further
/// behind is told `recovered:false` and refetches, so a reconnect costs the
/// node at most this much history.
pub const RECOVERY_LIMIT: usize = 1000;

/// Most messages one `GET /history` page returns (a larger `limit` is 400).
pub const PAGE_LIMIT: usize = 1000;

/// A `GET /history` page without `limit`.
pub const DEFAULT_PAGE: usize = 100;

/// Largest `size` a `WSGATE_HISTORY` entry accepts.
pub const MAX_SIZE: u64 = 1_000_000;

/// Longest `ttl` a `WSGATE_HISTORY` entry accepts (30 days).
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// The first bytes of every enveloped message on Redis: a byte that is never
/// valid UTF-8 (so no text or JSON consumer mistakes an envelope for its own
/// data), then a name and a layout version.
pub const MAGIC: &[u8] = b"\xffwsgate-h1:";

/// How one glob's channels keep history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// A Redis glob ([`crate::pattern::matches`]).
    pub glob: Bytes,
    /// Messages kept (approximately: Redis trims with `MAXLEN ~`).
    pub size: u64,
    /// How long a channel's history lives after its last publish.
    pub ttl: Duration,
}

/// `WSGATE_HISTORY`, parsed: the first rule whose glob matches a channel
/// decides; no rule, no history (and nothing changes for that channel).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    rules: Vec<Rule>,
}

impl Rules {
    /// Rules in the order given.
    pub fn new(rules: Vec<Rule>) -> Rules {
        Rules { rules }
    }

    /// Parses `glob:size:ttl` entries separated by commas (the glob may hold
    /// `:` itself: the last two fields are size and ttl). Errors name the
    /// entry and what is wrong with it.
    pub fn parse(raw: &str) -> Result<Rules, String> {
        let mut rules = Vec::new();
        for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            rules.push(parse_rule(entry).map_err(|why| format!("entry {entry:?}: {why}"))?);
        }
        if rules.is_empty() {
            return Err("no entries (unset it to keep no history)".to_owned());
        }
        Ok(Rules { rules })
    }

    /// The rule for `channel`, if it keeps history.
    pub fn of(&self, channel: &[u8]) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|r| crate::pattern::matches(&r.glob, channel))
    }

    /// True when no channel keeps history: every history cost is skipped.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter()
    }
}

fn parse_rule(entry: &str) -> Result<Rule, String> {
    let mut parts = entry.rsplitn(3, ':');
    let (Some(ttl), Some(size), Some(glob)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("expected glob:size:ttl, e.g. news.*:100:300s".to_owned());
    };
    if glob.is_empty() {
        return Err("the glob is empty".to_owned());
    }
    let size: u64 = size
        .parse()
        .ok()
        .filter(|n| (1..=MAX_SIZE).contains(n))
        .ok_or_else(|| format!("size {size:?} is not a whole number from 1 to {MAX_SIZE}"))?;
    let ttl = parse_ttl(ttl).ok_or_else(|| {
        format!("ttl {ttl:?} is not a duration from 1s to 30d such as 300s, 5m, 2h or 1d")
    })?;
    Ok(Rule {
        glob: Bytes::copy_from_slice(glob.as_bytes()),
        size,
        ttl,
    })
}

/// `300s`, `5m`, `2h`, `1d`: whole units, at least a second, at most [`MAX_TTL`].
fn parse_ttl(raw: &str) -> Option<Duration> {
    let split = raw.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = raw.split_at(split);
    let n: u64 = n.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    let ttl = Duration::from_secs(secs);
    (secs > 0 && ttl <= MAX_TTL).then_some(ttl)
}

/// Where a message sits in its channel's history.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    /// 1 for the first message of the epoch, then +1 per message.
    pub offset: u64,
    /// The history's epoch: ASCII letters and digits.
    pub epoch: Bytes,
}

/// Where a recovering subscribe resumes: per channel, the last position
/// the client has (one entry for a channel subscribe; for a pattern, the
/// channels it names, each matching the pattern).
pub type Since = Vec<(Bytes, Position)>;

/// Most channels one pattern subscribe's `since` map may name.
pub const MAX_SINCE_CHANNELS: usize = 64;

/// Longest epoch an envelope may carry (ours are 16 to 24 characters).
pub const MAX_EPOCH_BYTES: usize = 64;

/// The Redis message for `payload` at `position`:
/// `MAGIC <offset in decimal> ":" <epoch> ":" <payload>`. The broker's Lua
/// builds the same bytes; this one is for the in-memory broker and tests.
pub fn envelope(position: &Position, payload: &[u8]) -> Bytes {
    let offset = position.offset.to_string();
    let mut out = BytesMut::with_capacity(
        MAGIC.len() + offset.len() + position.epoch.len() + 2 + payload.len(),
    );
    out.put_slice(MAGIC);
    out.put_slice(offset.as_bytes());
    out.put_u8(b':');
    out.put_slice(&position.epoch);
    out.put_u8(b':');
    out.put_slice(payload);
    out.freeze()
}

/// Reads an envelope: its position and the payload inside (a slice of
/// `message`, no copy). `None` for anything else, delivered as it is.
pub fn open(message: &Bytes) -> Option<(Position, Bytes)> {
    let rest = message.strip_prefix(MAGIC)?;
    let colon = rest.iter().position(|&b| b == b':')?;
    let digits = &rest[..colon];
    if digits.is_empty() || digits.len() > 20 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let offset: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    if offset == 0 {
        return None;
    }
    let after = &rest[colon + 1..];
    let colon2 = after.iter().position(|&b| b == b':')?;
    let epoch = &after[..colon2];
    if epoch.is_empty()
        || epoch.len() > MAX_EPOCH_BYTES
        || !epoch.iter().all(u8::is_ascii_alphanumeric)
    {
        return None;
    }
    let epoch_at = MAGIC.len() + colon + 1;
    let payload_at = epoch_at + colon2 + 1;
    Some((
        Position {
            offset,
            epoch: message.slice(epoch_at..epoch_at + epoch.len()),
        },
        message.slice(payload_at..),
    ))
}

/// One stored message, as recovery and `GET /history` return it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its offset in the epoch of the read that returned it.
    pub offset: u64,
    /// The payload as published.
    pub payload: Bytes,
}

/// What a read of one channel's history found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// The history's epoch now (created by the read if the channel had none).
    pub epoch: Bytes,
    /// The newest offset in the epoch (0: nothing published yet).
    pub top: u64,
    /// Messages asked for, oldest first.
    pub entries: Vec<Entry>,
}

/// How to read a channel's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// The newest `limit` messages.
    Latest {
        /// At most this many.
        limit: usize,
    },
    /// Up to `limit` messages after `offset` of `epoch`. When `epoch` is the
    /// current one but `offset` is above the top (the store lost writes the
    /// client saw), the read changes the epoch, so every client learns that
    /// history was reset.
    After {
        /// The last offset the reader has.
        offset: u64,
        /// The epoch it belongs to.
        epoch: Bytes,
        /// At most this many.
        limit: usize,
    },
}

/// Whether a recovery after `since` is complete with `read` (same epoch,
/// nothing trimmed between `since` and the first entry, nothing beyond the
/// limit): `false` means the client must refetch.
pub fn recovered(since: &Position, read: &Read, limit: usize) -> bool {
    if read.epoch != since.epoch || since.offset > read.top {
        return false;
    }
    let missed = read.top - since.offset;
    if missed == 0 {
        return true;
    }
    if missed > limit as u64 {
        return false;
    }
    read.entries
        .first()
        .is_some_and(|e| e.offset == since.offset + 1)
        && read.entries.len() as u64 == missed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_strictly() {
        let r = Rules::parse("news.*:100:300s, a:b:*:5:5m,x:1:1d").unwrap();
        let all: Vec<_> = r.iter().cloned().collect();
        assert_eq!(all[0].glob, Bytes::from_static(b"news.*"));
        assert_eq!(all[0].size, 100);
        assert_eq!(all[0].ttl, Duration::from_secs(300));
        assert_eq!(all[1].glob, Bytes::from_static(b"a:b:*"));
        assert_eq!(all[1].ttl, Duration::from_secs(300));
        assert_eq!(all[2].ttl, Duration::from_secs(86_400));
        assert_eq!(r.of(b"news.sport").map(|r| r.size), Some(100));
        assert_eq!(r.of(b"a:b:c").map(|r| r.size), Some(5));
        assert!(r.of(b"other").is_none());
        for bad in [
            "",
            " , ",
            "news.*",
            "news.*:100",
            ":100:300s",
            "n:0:300s",
            "n:1000001:300s",
            "n:-1:300s",
            "n:10:300",
            "n:10:0s",
            "n:10:31d",
            "n:10:5x",
            "n:10:s",
            "n:10:1.5m",
        ] {
            assert!(Rules::parse(bad).is_err(), "{bad:?} accepted");
        }
        let why = Rules::parse("ok:1:1s,n:10:300").unwrap_err();
        assert!(why.contains("\"n:10:300\"") && why.contains("ttl"), "{why}");
    }

    #[test]
    fn envelopes_round_trip_and_reject_lookalikes() {
        let p = Position {
            offset: 42,
            epoch: Bytes::from_static(b"e1"),
        };
        let env = envelope(&p, b"{\"x\":1}");
        assert_eq!(&env[..], b"\xffwsgate-h1:42:e1:{\"x\":1}");
        let (q, payload) = open(&env).unwrap();
        assert_eq!(q, p);
        assert_eq!(&payload[..], b"{\"x\":1}");
        // A payload holding colons is untouched.
        let (_, payload) = open(&envelope(&p, b"a:b:")).unwrap();
        assert_eq!(&payload[..], b"a:b:");
        for bad in [
            &b"{\"x\":1}"[..],
            b"\xffwsgate-h1:",
            b"\xffwsgate-h1:0:e:x",
            b"\xffwsgate-h1:x:e:x",
            b"\xffwsgate-h1:1::x",
            b"\xffwsgate-h1:1:e-1:x",
            b"\xffwsgate-h1:1:e",
            b"\xffwsgate-h1:99999999999999999999999:e:x",
        ] {
            assert!(open(&Bytes::copy_from_slice(bad)).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn recovery_is_complete_only_without_holes() {
        let e = Bytes::from_static(b"e1");
        let since = Position {
            offset: 2,
            epoch: e.clone(),
        };
        let entries = |from: u64, to: u64| {
            (from..=to)
                .map(|offset| Entry {
                    offset,
                    payload: Bytes::new(),
                })
                .collect()
        };
        let read = |top, entries| Read {
            epoch: e.clone(),
            top,
            entries,
        };
        assert!(recovered(&since, &read(2, vec![]), 10));
        assert!(recovered(&since, &read(5, entries(3, 5)), 10));
        assert!(!recovered(&since, &read(5, entries(4, 5)), 10), "trimmed");
        assert!(
            !recovered(&since, &read(20, entries(3, 12)), 10),
            "too far behind"
        );
        assert!(!recovered(&since, &read(1, vec![]), 10), "writes lost");
        let other = Read {
            epoch: Bytes::from_static(b"e2"),
            top: 5,
            entries: entries(3, 5),
        };
        assert!(!recovered(&since, &other, 10), "epoch changed");
    }
}
