//! Presence: who is subscribed to a channel, cluster-wide
//! (`WSGATE_PRESENCE`, `docs/presence.md`).
//!
//! A channel matching one of the globs keeps, per subscribed connection, a
//! *member*: the connection's id, the token's `sub` (or `null`) and its
//! `info` claim (or `null`). Each node tracks its own members
//! ([`tracker::Tracker`]) and writes them to the broker in batches, with a
//! lease per node that it renews once per period: a node that dies takes
//! its members with it when its lease runs out. Join and leave events go
//! out once per event on the channel itself, in an envelope that only
//! wsgate opens, and reach the subscribers that asked for them
//! (`"join_leave":true`).
//!
//! This module holds what the tracker, the brokers, the hub and the
//! dialects share, and nothing that does I/O.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::Value;

pub mod tracker;

/// The first bytes of a join or leave event published on a presence
/// channel: `0xFF` (never UTF-8, like history's envelope), a name and a
/// layout version; the event's JSON follows.
pub const MAGIC: &[u8] = b"\xffwsgate-p1:";

/// `WSGATE_PRESENCE_LEASE_MS` when unset.
pub const DEFAULT_LEASE: Duration = Duration::from_millis(30_000);

/// Shortest lease accepted: renewals go out three times per lease, so a
/// shorter one would mostly measure Redis's round trip.
pub const MIN_LEASE: Duration = Duration::from_millis(300);

/// Longest lease accepted (one day).
pub const MAX_LEASE: Duration = Duration::from_secs(24 * 3600);

/// `WSGATE_PRESENCE`, parsed: channels matching any glob keep presence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    globs: Vec<Bytes>,
}

impl Rules {
    /// Parses comma-separated globs; an empty entry (`a,,b`) is an error,
    /// naming its place, as are control characters (no channel has them).
    pub fn parse(raw: &str) -> Result<Rules, String> {
        let mut globs = Vec::new();
        for (n, entry) in raw.split(',').enumerate() {
            let glob = entry.trim();
            if glob.is_empty() {
                return Err(format!("entry {} is empty", n + 1));
            }
            if glob.bytes().any(|b| b.is_ascii_control()) {
                return Err(format!("entry {glob:?} holds a control character"));
            }
            globs.push(Bytes::copy_from_slice(glob.as_bytes()));
        }
        Ok(Rules { globs })
    }

    /// Whether `channel` keeps presence.
    pub fn covers(&self, channel: &[u8]) -> bool {
        self.globs
            .iter()
            .any(|g| crate::pattern::matches(g, channel))
    }

    /// No channel keeps presence (then nothing on any path changes).
    pub fn is_empty(&self) -> bool {
        self.globs.is_empty()
    }
}

/// Who one member is, as the tracker records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    /// The connection's id, unique in the cluster: `<node id>:<session>`.
    pub client: String,
    /// The token's `sub`, when there is a token.
    pub user: Option<String>,
    /// The token's `info` claim, as JSON text.
    pub info: Option<String>,
}

impl Who {
    /// The member of a connection: `info` is the token's `info` claim.
    pub fn new(node: &str, session: u64, user: Option<&str>, info: Option<&Value>) -> Who {
        Who {
            client: Who::client_id(node, session),
            user: user.filter(|u| !u.is_empty()).map(str::to_owned),
            info: info.and_then(|v| serde_json::to_string(v).ok()),
        }
    }

    /// The client id of session `session` of node `node`.
    pub fn client_id(node: &str, session: u64) -> String {
        format!("{node}:{session}")
    }

    /// `{"client":..,"user":..,"info":..}` (absent ones `null`).
    pub fn json(&self) -> String {
        let mut out = String::from("{\"client\":");
        push_str(&mut out, &self.client);
        out.push_str(",\"user\":");
        match &self.user {
            Some(u) => push_str(&mut out, u),
            None => out.push_str("null"),
        }
        out.push_str(",\"info\":");
        out.push_str(self.info.as_deref().unwrap_or("null"));
        out.push('}');
        out
    }
}

fn push_str(out: &mut String, s: &str) {
    if let Ok(quoted) = serde_json::to_string(s) {
        out.push_str(&quoted);
    }
}

/// Join or leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A connection subscribed.
    Join,
    /// It unsubscribed, was revoked, disconnected, or its node died.
    Leave,
}

impl Change {
    fn action(self) -> &'static str {
        match self {
            Change::Join => "join",
            Change::Leave => "leave",
        }
    }
}

/// The start of an event of `channel` up to its member:
/// `{"action":"leave","channel":"chat","member":`.
fn event_head(change: Change, channel: &[u8]) -> String {
    let mut out = String::from("{\"action\":\"");
    out.push_str(change.action());
    out.push_str("\",\"channel\":");
    push_str(&mut out, &String::from_utf8_lossy(channel));
    out.push_str(",\"member\":");
    out
}

/// The event's JSON, as subscribers with `join_leave` receive it.
pub fn event(change: Change, channel: &[u8], member_json: &str) -> String {
    let mut out = event_head(change, channel);
    out.push_str(member_json);
    out.push('}');
    out
}

/// What is published on the channel for an event: [`MAGIC`], then its JSON.
pub fn envelope(event_json: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(MAGIC.len() + event_json.len());
    out.put_slice(MAGIC);
    out.put_slice(event_json.as_bytes());
    out.freeze()
}

/// What a broker stores for one member: `<node>\n<leave event>`. The node
/// lets a reaper drop a dead node's members; the leave event is what the
/// reaper publishes for each, and holds the member's JSON
/// ([`member_of`]).
pub fn stored(node: &str, channel: &[u8], member_json: &str) -> Bytes {
    let leave = event(Change::Leave, channel, member_json);
    let mut out = BytesMut::with_capacity(node.len() + 1 + leave.len());
    out.put_slice(node.as_bytes());
    out.put_u8(b'\n');
    out.put_slice(leave.as_bytes());
    out.freeze()
}

/// The member JSON inside a stored leave event of `channel` (what a
/// broker's read returns, its node already stripped); `None` if it is not
/// one (nothing but wsgate writes these keys, but Redis is shared).
pub fn member_of<'a>(channel: &[u8], leave_event: &'a [u8]) -> Option<&'a str> {
    member_after(&event_head(Change::Leave, channel), leave_event)
}

/// [`member_of`] with the channel's leave head already built (a read of
/// many members builds it once).
fn member_after<'a>(head: &str, leave_event: &'a [u8]) -> Option<&'a str> {
    let rest = leave_event.strip_prefix(head.as_bytes())?;
    let member = rest.strip_suffix(b"}")?;
    std::str::from_utf8(member).ok()
}

/// A channel's members as a presence read found them: their JSON, sorted
/// by client id (so answers are stable), with the count of distinct users.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Members {
    /// Each member's JSON object.
    pub members: Vec<String>,
    /// Distinct non-null `user`s among them.
    pub users: usize,
}

impl Members {
    /// From a broker read of `channel` (stored leave events); entries that
    /// are not wsgate's are skipped.
    pub fn from_read(channel: &[u8], read: &[Bytes]) -> Members {
        #[derive(serde::Deserialize)]
        struct Ids<'a> {
            #[serde(borrow)]
            client: std::borrow::Cow<'a, str>,
            #[serde(borrow)]
            user: Option<std::borrow::Cow<'a, str>>,
        }
        let head = event_head(Change::Leave, channel);
        let mut rows: Vec<(String, Option<String>, String)> = read
            .iter()
            .filter_map(|raw| {
                let json = member_after(&head, raw)?;
                let ids: Ids<'_> = serde_json::from_str(json).ok()?;
                Some((
                    ids.client.into_owned(),
                    ids.user.map(|u| u.into_owned()),
                    json.to_owned(),
                ))
            })
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let mut users: Vec<&str> = rows.iter().filter_map(|r| r.1.as_deref()).collect();
        users.sort_unstable();
        users.dedup();
        let users = users.len();
        Members {
            members: rows.into_iter().map(|r| r.2).collect(),
            users,
        }
    }

    /// `[member,...]`.
    pub fn json_array(&self) -> String {
        let mut out =
            String::with_capacity(2 + self.members.iter().map(|m| m.len() + 1).sum::<usize>());
        out.push('[');
        for (i, m) in self.members.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(m);
        }
        out.push(']');
        out
    }
}

/// One member's change for the broker: what it writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Store `stored` ([`stored`]) under `client` on `channel`.
    Join {
        /// The presence channel.
        channel: Bytes,
        /// The member's client id.
        client: String,
        /// What to store.
        stored: Bytes,
    },
    /// Remove `client` from `channel`; `last`: it was this node's last
    /// member there (the node stops listing the channel as its own).
    Leave {
        /// The presence channel.
        channel: Bytes,
        /// The member's client id.
        client: String,
        /// The node has no other member on `channel`.
        last: bool,
    },
}

/// One round trip of a node's presence to its broker: renews the node's
/// lease, applies `ops` (or, with `reset`, replaces every member of the
/// node by `ops`' joins), publishes `events`, and reaps nodes whose lease
/// ran out.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `WSGATE_NODE_ID`.
    pub node: std::sync::Arc<str>,
    /// `WSGATE_PRESENCE_LEASE_MS`.
    pub lease: Duration,
    /// Drop everything the broker holds of this node first (at start, and
    /// after the broker lost the node: its lease ran out, or Redis
    /// restarted); `ops` then hold the node's whole table.
    pub reset: bool,
    /// Member changes, in order.
    pub ops: Vec<Op>,
    /// `(channel, envelope)` events to publish, in order, after `ops`.
    pub events: Vec<(Bytes, Bytes)>,
}

/// What a broker found when applying a [`Batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synced {
    /// Applied.
    Done,
    /// Not applied: the broker no longer knew this node (its lease had run
    /// out, or Redis lost it); send a reset.
    Lost,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_match() {
        let rules = Rules::parse("chat.*, room").unwrap();
        assert!(rules.covers(b"chat.a"));
        assert!(rules.covers(b"room"));
        assert!(!rules.covers(b"news"));
        assert_eq!(Rules::parse("a,,b").unwrap_err(), "entry 2 is empty");
    }

    #[test]
    fn stored_member_round_trips() {
        let who = Who::new("n1", 7, Some("alice"), Some(&serde_json::json!({"n":1})));
        let json = who.json();
        assert_eq!(json, r#"{"client":"n1:7","user":"alice","info":{"n":1}}"#);
        let stored = stored("n1", b"chat.\"x\"", &json);
        let nl = stored.iter().position(|b| *b == b'\n').unwrap();
        let leave = &stored[nl + 1..];
        assert_eq!(member_of(b"chat.\"x\"", leave), Some(json.as_str()));
        assert_eq!(member_of(b"other", leave), None);
        let m = Members::from_read(b"chat.\"x\"", &[Bytes::copy_from_slice(leave)]);
        assert_eq!(m.users, 1);
        assert_eq!(m.json_array(), format!("[{json}]"));
    }
}
