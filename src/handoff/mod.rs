//! The Bayeux handoff store: a fresh session issued by one node, adoptable
//! by exactly one node.
//!
//! A Bayeux client handshakes over HTTP and gets a clientId, then may open its
//! WebSocket (or send its next poll) to a different node behind the load
//! balancer. So the node that answers a handshake [offers](Handoff::offer)
//! the fresh session: a [`Record`] (the token's claims and expiry, and which
//! node issued it) stored under the clientId with a TTL. Whichever node sees
//! the clientId first [takes](Handoff::take) the record, with one atomic
//! fetch-and-delete, and serves the session from then on with the same
//! identity; every later take of it finds nothing.
//!
//! The rule that makes it exactly one: **every** node, the issuing one
//! included, takes the record before serving the session. The issuing node
//! does it through [`Handoff::withdraw`] when the client's first message
//! comes back to it (and so before that message can subscribe): `true`, and
//! the session is its own for good; `false`, and another node adopted it
//! (or it expired), so the issuing node drops its copy and answers the
//! clientId like any other unknown one (`402 Unknown client`). There is no
//! window in which two nodes both believe they hold it, because both
//! decisions are the same atomic operation on the same key. A session that
//! has subscriptions has been taken, so no other node can ever adopt it.
//!
//! Two implementations, chosen like the broker is ([`Handoff::for_config`]):
//! [`redis`] (`GETDEL`, one connection per node) when `WSGATE_REDIS_URL` is
//! set, [`memory`] (a bounded map) for the embedded broker's single node.
//!
//! Redis is trusted with identities: whoever can write the
//! `wsgate:bayeux:handoff:*` keys can create a session with any claims,
//! as whoever can `PUBLISH` can send any message. Protect Redis accordingly
//! (`docs/security.md`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::auth::{AuthError, Identity};
use crate::broker::redis::RedisConfigError;
use crate::config::Config;

pub mod memory;
pub mod redis;

pub use memory::MemoryHandoff;
pub use redis::{HandoffOptions, RedisHandoff};

/// The Redis key of a clientId's record starts with this (the same
/// `wsgate:` namespace as the publish idempotency keys).
pub const KEY_PREFIX: &str = "wsgate:bayeux:handoff:";

/// How long one call may take before it answers
/// [`HandoffError::Unavailable`] (the default of [`HandoffOptions::timeout`]):
/// a handshake or a first message waits this long at most for Redis.
pub const HANDOFF_TIMEOUT: Duration = Duration::from_secs(1);

/// Longest clientId accepted. Issued ids are 32 hex digits; a client can
/// send anything, and a take of a longer one answers "no record" without
/// asking Redis, so a client cannot make the node build huge keys.
pub const MAX_CLIENT_ID_BYTES: usize = 64;

/// Largest record accepted by [`Handoff::offer`] and [`Record::decode`]:
/// claims come from a token in a request head (at most 64 KiB), so a larger
/// record is not one wsgate wrote.
pub const MAX_RECORD_BYTES: usize = 128 * 1024;

/// Why a handoff operation did not give an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandoffError {
    /// Redis is down, did not answer within the timeout, or the node is
    /// stopping. Nothing is known to have happened, but it may have: an offer
    /// may have been stored (it expires with its TTL), a take may have
    /// removed the record (then nobody has it, and the client re-handshakes).
    #[error("handoff store unavailable")]
    Unavailable,
    /// [`Handoff::offer`]: a record under this clientId exists already. Ids
    /// are 128 random bits, so this is a bug or a forgery, never a collision
    /// in practice: issue another id.
    #[error("a handoff record for this client id exists already")]
    Exists,
    /// [`Handoff::offer`] on the in-memory store: it holds
    /// [`memory::MAX_ENTRIES`] live records.
    #[error("handoff store full")]
    Full,
    /// [`Handoff::offer`]: the clientId is empty or longer than
    /// [`MAX_CLIENT_ID_BYTES`], or the record larger than [`MAX_RECORD_BYTES`].
    #[error("client id or record out of bounds")]
    Invalid,
    /// Redis answered with an error (out of memory, an ACL, a Redis older
    /// than 6.2 without `GETDEL`).
    #[error("redis refused a handoff command: {0}")]
    Refused(String),
}

/// A node's handoff store. A closed enum rather than a trait object: there
/// are exactly two, and the server picks one at start-up as it picks the
/// broker. Cloning is cheap (a handle); every clone is the same store.
#[derive(Clone)]
pub enum Handoff {
    /// Records in Redis, shared by every node.
    Redis(RedisHandoff),
    /// Records in this process (one node, the embedded broker).
    Memory(MemoryHandoff),
}

impl Handoff {
    /// Redis when `WSGATE_REDIS_URL` is set (the broker's URL, node id and
    /// backoff cap), else the in-memory store: the same choice as the
    /// broker's. Must run inside a Tokio runtime (it spawns the connection
    /// task).
    pub fn for_config(config: &Config) -> Result<Handoff, RedisConfigError> {
        match &config.redis_url {
            Some(url) => Handoff::redis(
                url,
                HandoffOptions {
                    backoff_max: config.redis_backoff_max,
                    security: config.redis_security.clone(),
                    ..HandoffOptions::new(&config.node_id)
                },
            ),
            None => Ok(Handoff::memory()),
        }
    }

    /// The Redis store at `url` (the URL forms the broker accepts); it
    /// connects in the background. Must run inside a Tokio runtime.
    pub fn redis(url: &str, options: HandoffOptions) -> Result<Handoff, RedisConfigError> {
        RedisHandoff::start(url, options).map(Handoff::Redis)
    }

    /// An empty in-memory store holding at most [`memory::MAX_ENTRIES`].
    pub fn memory() -> Handoff {
        Handoff::Memory(MemoryHandoff::new(memory::MAX_ENTRIES))
    }

    /// Records a fresh session under `client_id` for `ttl` (at least 1 ms),
    /// unless a record is there already. Redis: `SET <key> <record> PX <ttl>
    /// NX`. Call it before the handshake reply goes out, so that no other
    /// node can see the clientId before its record exists.
    pub async fn offer(
        &self,
        client_id: &str,
        record: Bytes,
        ttl: Duration,
    ) -> Result<(), HandoffError> {
        if !valid_client_id(client_id) || record.len() > MAX_RECORD_BYTES {
            return Err(HandoffError::Invalid);
        }
        let ttl = ttl.max(Duration::from_millis(1));
        match self {
            Handoff::Redis(r) => r.offer(client_id, record, ttl).await,
            Handoff::Memory(m) => m.offer(client_id, record, ttl),
        }
    }

    /// Atomically fetches and deletes the record of `client_id` (Redis:
    /// `GETDEL`, Redis 6.2 or newer): `Some` to exactly one caller across all
    /// nodes, which then serves the session; `None` when no node issued it,
    /// it expired, or it was taken already (answer `402 Unknown client`).
    pub async fn take(&self, client_id: &str) -> Result<Option<Bytes>, HandoffError> {
        if !valid_client_id(client_id) {
            return Ok(None);
        }
        match self {
            Handoff::Redis(r) => r.take(client_id).await,
            Handoff::Memory(m) => Ok(m.take(client_id)),
        }
    }

    /// The issuing node's [`take`](Handoff::take) of its own record, before
    /// it serves the session itself (its first message came back to it): the
    /// record is deleted, so nobody else can adopt the session from now on.
    /// `true`: it was still there, the session is this node's; `false`:
    /// another node adopted it or it expired, so this node must drop its copy
    /// and answer the clientId as unknown. On `Unavailable` the node cannot
    /// know: refuse the message (the client retries or re-handshakes) rather
    /// than risk two nodes serving one session.
    pub async fn withdraw(&self, client_id: &str) -> Result<bool, HandoffError> {
        self.take(client_id).await.map(|r| r.is_some())
    }

    /// Stops the Redis connection task now (calls made afterwards answer
    /// `Unavailable`), as the server's shutdown closes the hub: sessions
    /// still holding a handle must not keep a Redis connection open after the
    /// node stopped. Nothing to do for the in-memory store. The task also
    /// ends when the last handle is dropped.
    pub fn close(&self) {
        if let Handoff::Redis(r) = self {
            r.close();
        }
    }

    /// `redis` or `memory`, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Handoff::Redis(_) => "redis",
            Handoff::Memory(_) => "memory",
        }
    }
}

/// A clientId a record may be stored under: non-empty, at most
/// [`MAX_CLIENT_ID_BYTES`].
fn valid_client_id(client_id: &str) -> bool {
    !client_id.is_empty() && client_id.len() <= MAX_CLIENT_ID_BYTES
}

/// The Redis key of `client_id`'s record.
pub fn key(client_id: &str) -> String {
    format!("{KEY_PREFIX}{client_id}")
}

/// What a handoff record holds, for nodes that agree on it: the verified
/// claims, when the token expires, and who issued the session. The store
/// itself only moves bytes; this is the format wsgate's Bayeux sessions
/// write, JSON so that an operator can read it with `redis-cli GET`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Every claim of the token the handshake presented, as verified (its
    /// `sub` is the subject, its `subscribe` the ACL); `None` when the node
    /// runs without authentication.
    pub claims: Option<Map<String, Value>>,
    /// When the token stops being valid (`exp` plus the leeway), in
    /// milliseconds since the Unix epoch; `None` without authentication.
    /// The adopting node closes the session then, as the issuing one would.
    pub expires_at_ms: Option<u64>,
    /// `WSGATE_NODE_ID` of the node that issued the clientId (for logs and
    /// for the issuing node to tell its own records from adopted ones).
    pub issued_by: String,
}

/// The session a fresh key stands for, when this node may adopt it:
/// `Some(identity)` (the inner `None`: no authentication) once the
/// record is taken here; `None` when there is nothing to adopt (never
/// issued, adopted elsewhere, expired, unreadable, or the store is
/// unreachable, which is answered like an unknown key).
pub async fn adopt(handoff: &Handoff, key: &str) -> Option<Option<Identity>> {
    let bytes = handoff.take(key).await.ok()??;
    let record = Record::decode(&bytes).ok()?;
    if record.expired(SystemTime::now()) {
        return None;
    }
    record.identity().ok()
}

/// Why stored bytes are not a [`Record`], or its identity not usable.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Larger than [`MAX_RECORD_BYTES`].
    #[error("handoff record too large")]
    TooLarge,
    /// Not the JSON of a [`Record`].
    #[error("malformed handoff record: {0}")]
    Malformed(String),
    /// Claims without an expiry, or an expiry without claims.
    #[error("handoff record has claims and expiry out of step")]
    Inconsistent,
    /// The claims do not make an identity (no `sub`, a bad `subscribe`).
    #[error("handoff record claims: {0}")]
    Claims(#[from] AuthError),
}

impl Record {
    /// The record of a session issued by `node_id` to `identity` (`None`:
    /// the node runs without authentication).
    pub fn new(identity: Option<&Identity>, node_id: &str) -> Record {
        Record {
            claims: identity.map(|i| i.claims.clone()),
            expires_at_ms: identity.map(|i| to_ms(i.expires_at)),
            issued_by: node_id.to_owned(),
        }
    }

    /// The bytes stored in the handoff store.
    pub fn encode(&self) -> Bytes {
        // Serialising maps with string keys and JSON values cannot fail;
        // should it ever, an empty record decodes as malformed (no panic).
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Reads stored bytes back; any bytes at all give a record or an error,
    /// never a panic (JSON nesting is bounded by serde_json's limit of 128).
    pub fn decode(bytes: &[u8]) -> Result<Record, RecordError> {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(RecordError::TooLarge);
        }
        serde_json::from_slice(bytes).map_err(|e| RecordError::Malformed(e.to_string()))
    }

    /// The `sub` claim, if the record has claims that carry one.
    pub fn subject(&self) -> Option<&str> {
        self.claims.as_ref()?.get("sub")?.as_str()
    }

    /// True once the token has expired at `now` (never without one): the
    /// adopting node treats such a clientId like one that expired.
    pub fn expired(&self, now: SystemTime) -> bool {
        self.expires_at_ms.is_some_and(|at| at <= to_ms(now))
    }

    /// The identity the issuing node verified, rebuilt from the claims
    /// exactly as [`crate::auth::Verifier::verify`] builds it (subject, ACL,
    /// expiry): `None` for a session without authentication.
    pub fn identity(&self) -> Result<Option<Identity>, RecordError> {
        match (&self.claims, self.expires_at_ms) {
            (None, None) => Ok(None),
            (Some(claims), Some(at)) => {
                let expires_at = UNIX_EPOCH
                    .checked_add(Duration::from_millis(at))
                    .ok_or(RecordError::Inconsistent)?;
                Ok(Some(Identity::from_claims(claims.clone(), expires_at)?))
            }
            _ => Err(RecordError::Inconsistent),
        }
    }
}

/// Milliseconds since the Unix epoch (0 before it, saturating far after).
fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn identity() -> Identity {
        let claims = json!({"sub":"alice","exp":4_000_000_000u64,"subscribe":["news.*"]});
        let Value::Object(claims) = claims else {
            unreachable!()
        };
        Identity::from_claims(claims, UNIX_EPOCH + Duration::from_secs(4_000_000_000)).unwrap()
    }

    #[test]
    fn a_record_round_trips_with_the_same_identity() {
        let id = identity();
        let record = Record::new(Some(&id), "node-a");
        let back = Record::decode(&record.encode()).unwrap();
        assert_eq!(back, record);
        assert_eq!(back.subject(), Some("alice"));
        assert_eq!(back.issued_by, "node-a");
        let again = back.identity().unwrap().unwrap();
        assert_eq!(again.subject, id.subject);
        assert_eq!(again.claims, id.claims);
        assert_eq!(again.expires_at, id.expires_at);
        let topic = crate::broker::Topic::Channel(Bytes::from_static(b"news.x"));
        assert!(again.acl.allows(&topic) && id.acl.allows(&topic));
        let other = crate::broker::Topic::Channel(Bytes::from_static(b"other"));
        assert!(!again.acl.allows(&other));
        assert!(!back.expired(SystemTime::now()));
        assert!(back.expired(UNIX_EPOCH + Duration::from_secs(4_000_000_000)));
    }

    #[test]
    fn a_record_without_authentication() {
        let record = Record::new(None, "n");
        assert_eq!(
            &record.encode()[..],
            br#"{"claims":null,"expires_at_ms":null,"issued_by":"n"}"#
        );
        let back = Record::decode(&record.encode()).unwrap();
        assert!(back.identity().unwrap().is_none());
        assert_eq!(back.subject(), None);
        assert!(!back.expired(SystemTime::now()));
    }

    #[test]
    fn bad_bytes_are_errors_never_panics() {
        let deep = "[".repeat(10_000);
        let huge = vec![b' '; MAX_RECORD_BYTES + 1];
        let cases: Vec<&[u8]> = vec![
            b"",
            b"\xff\xfe",
            b"null",
            b"[]",
            b"{}",
            br#"{"claims":1,"expires_at_ms":null,"issued_by":"n"}"#,
            br#"{"claims":null,"expires_at_ms":-1,"issued_by":"n"}"#,
            br#"{"claims":null,"expires_at_ms":null,"issued_by":"n","x":1}"#,
            br#"{"claims":null,"expires_at_ms":null,"issued_by":"n"} trailing"#,
            deep.as_bytes(),
            &huge,
        ];
        for bad in cases {
            assert!(
                Record::decode(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // Decodes, but its identity is unusable.
        for (claims, at) in [
            (Some(json!({"exp": 1})), Some(1)),
            (Some(json!({"sub": "a", "subscribe": "x"})), Some(1)),
            (Some(json!({"sub": "a"})), None),
            (None, Some(1)),
        ] {
            let record = Record {
                claims: claims.and_then(|c| c.as_object().cloned()),
                expires_at_ms: at,
                issued_by: "n".into(),
            };
            let back = Record::decode(&record.encode()).unwrap();
            assert!(back.identity().is_err(), "{back:?}");
        }
    }

    #[test]
    fn keys_and_bounds() {
        assert_eq!(key("abc"), "wsgate:bayeux:handoff:abc");
        assert!(valid_client_id(&"a".repeat(MAX_CLIENT_ID_BYTES)));
        assert!(!valid_client_id(&"a".repeat(MAX_CLIENT_ID_BYTES + 1)));
        assert!(!valid_client_id(""));
    }

    #[tokio::test]
    async fn the_enum_bounds_ids_and_records_before_the_store() {
        let h = Handoff::memory();
        let long = "a".repeat(MAX_CLIENT_ID_BYTES + 1);
        let rec = Bytes::from_static(b"r");
        let ttl = Duration::from_secs(5);
        assert_eq!(
            h.offer(&long, rec.clone(), ttl).await,
            Err(HandoffError::Invalid)
        );
        assert_eq!(
            h.offer("", rec.clone(), ttl).await,
            Err(HandoffError::Invalid)
        );
        let big = Bytes::from(vec![b'x'; MAX_RECORD_BYTES + 1]);
        assert_eq!(h.offer("c", big, ttl).await, Err(HandoffError::Invalid));
        assert_eq!(h.take(&long).await, Ok(None));
        // A zero TTL is one millisecond, not "forever" nor an error.
        h.offer("z", rec.clone(), Duration::ZERO).await.unwrap();
        h.offer("c", rec.clone(), ttl).await.unwrap();
        assert_eq!(h.withdraw("c").await, Ok(true));
        assert_eq!(h.withdraw("c").await, Ok(false));
        assert_eq!(h.name(), "memory");
        h.close();
    }
}
