//! Configuration: one struct, read from the environment once.
//!
//! Every variable carries the `WSGATE_` prefix. [`Config::from_env`] reads them
//! with envy as plain strings and validates each into a typed value, so a bad
//! value produces one line naming the variable and what it accepts (`main`
//! prints it and exits with code 2). Nothing else in the crate reads the
//! environment; defaults live in [`Config::default`] (the `--help` table
//! repeats them as text, and a unit test holds the two equal).
//!
//! The known names are the fields of `RawConfig`, read from serde's derive
//! ([`raw_fields`]): a `WSGATE_*` variable that is not one of them stops
//! start-up with the nearest known name ("did you mean WSGATE_JWT_SECRET?"),
//! because a misspelt `WSGATE_JWT_SECRETS` would otherwise start an open
//! node. Kubernetes' service-link variables (`WSGATE_SERVICE_*`,
//! `WSGATE_PORT*`) are let through. Adding a variable is: a `RawConfig`
//! field, its parsing in `from_raw`, a `Config` field, a `HELP` row and a
//! README row; the unit tests fail until the last two exist.

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

use hyper::http::Uri;
use serde::Deserialize;

use crate::auth::JwtKey;
use crate::forwarded::Network;

pub mod mounts;

/// A configuration value that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A variable holds a value outside what it accepts.
    #[error("{var}={value:?} is invalid: expected {accepted}")]
    Invalid {
        /// The full variable name, e.g. `WSGATE_LISTEN`.
        var: &'static str,
        /// The rejected value as given.
        value: String,
        /// A human description of the accepted values.
        accepted: &'static str,
    },
    /// A variable's value is not valid unicode.
    #[error("{0}={1:?} is invalid: expected UTF-8 text")]
    NotUnicode(String, String),
    /// A `WSGATE_*` variable that no setting reads: most likely a misspelling,
    /// which must not silently leave a protection off.
    #[error("{var} is not a wsgate variable: {hint}")]
    Unknown {
        /// The variable as set, e.g. `WSGATE_JWT_SECRETS`.
        var: String,
        /// `did you mean WSGATE_JWT_SECRET?`, or where the names are listed.
        hint: String,
    },
    /// Two variables mount the same path: one route would hide the other.
    #[error("{first} and {second} both mount {path}: give each endpoint its own path")]
    SamePath {
        /// The first variable (or built-in route) that mounts `path`.
        first: &'static str,
        /// The other one.
        second: &'static str,
        /// The path both mount.
        path: String,
    },
    /// `WSGATE_HISTORY` holds an entry that cannot be used.
    #[error("WSGATE_HISTORY={value:?} is invalid: {why}; expected glob:size:ttl entries separated by commas, e.g. news.*:100:300s")]
    History {
        /// The value as given.
        value: String,
        /// Which entry, and what is wrong with it.
        why: String,
    },
    /// `WSGATE_PRESENCE` holds an entry that cannot be used.
    #[error("WSGATE_PRESENCE={value:?} is invalid: {why}; expected channel globs separated by commas, e.g. chat.*,lobby")]
    Presence {
        /// The value as given.
        value: String,
        /// Which entry, and what is wrong with it.
        why: String,
    },
    /// envy could not map the variables (not expected: every field is a string).
    #[error("cannot read WSGATE_* environment: {0}")]
    Env(#[from] envy::Error),
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// A credential from the environment: compared, never printed (its `Debug`
/// is redacted, so logging the config cannot leak it).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret's bytes, for comparison.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Largest `WSGATE_JWT_LEEWAY_SECS`: clock skew is seconds, not hours, and an
/// unbounded value would overflow the `now - leeway` arithmetic of token
/// validation.
pub const MAX_JWT_LEEWAY_SECS: u64 = 3600;

/// Shortest `WSGATE_API_KEY` accepted, in bytes: long enough that guessing
/// over the network is hopeless.
pub const MIN_API_KEY_BYTES: usize = 16;

/// The whole gateway configuration, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// `WSGATE_LISTEN`: address the HTTP/WebSocket server binds. Default `0.0.0.0:8080`.
    pub listen: SocketAddr,
    /// `WSGATE_REDIS_URL`: `redis[s]://[user:password@]host[:port][/db]`, or
    /// `redis[s]+sentinel://[user:password@]host:port[,host:port...]/master[/db]`
    /// (docs/redis.md). Unset means the embedded in-process broker (single
    /// node, no Redis needed).
    pub redis_url: Option<String>,
    /// `WSGATE_REDIS_SENTINEL_PASSWORD`, `WSGATE_REDIS_CA_FILE`,
    /// `WSGATE_REDIS_CERT_FILE`, `WSGATE_REDIS_KEY_FILE`: what every
    /// connection to Redis needs beyond its URL.
    pub redis_security: crate::broker::redis::Security,
    /// `WSGATE_REDIS_SHARDS`: a comma-separated list of `redis://` URLs of
    /// independent Redis servers, set instead of `WSGATE_REDIS_URL`
    /// (client-side sharding, `docs/redis.md, "Client-side sharding"`): each exact channel
    /// lives on the server its name hashes to, patterns on every one. Empty
    /// when unset. When set, `redis_url` is the first of them: it also holds
    /// what is node-wide (the service directory, Bayeux handoff records).
    pub redis_shards: Vec<String>,
    /// `WSGATE_REDIS_CLUSTER`: `redis[s]://[user:password@]host:port[,host:port...]`,
    /// seed nodes of a Redis Cluster, set instead of `WSGATE_REDIS_URL`
    /// (docs/redis.md, "Redis Cluster"): the node learns the slot map from
    /// any of them. `None` when unset.
    pub redis_cluster: Option<String>,
    /// `WSGATE_REDIS_CLUSTER_PUBSUB`: `classic` (default: `SUBSCRIBE` on any
    /// node, Redis broadcasts every `PUBLISH` cluster-wide) or `sharded`
    /// (`SSUBSCRIBE` on each slot's master, publishes as `SPUBLISH`).
    pub redis_cluster_sharded: bool,
    /// `WSGATE_REDIS_CLUSTER_PATTERNS`: `on` lets clients subscribe to
    /// patterns in sharded mode (held on a classic connection; every
    /// gateway publish then goes out as both `SPUBLISH` and `PUBLISH`).
    /// Default `off`: pattern subscribes are refused in sharded mode.
    pub redis_cluster_patterns: bool,
    /// `WSGATE_WS_PATH`: path of the WebSocket endpoint. Default `/ws`.
    pub ws_path: String,
    /// `WSGATE_BAYEUX_PATH`: the Bayeux endpoint (WebSocket and long-polling,
    /// Faye and CometD). Default `/bayeux`.
    pub bayeux_path: String,
    /// `WSGATE_NODEFONY_PATH`: the same Bayeux engine for nodefony's client.
    /// Default `/realtime`.
    pub nodefony_path: String,
    // --- RoadRunner websockets and SocketStream 0.4 (docs/dialects/roadrunner.md,
    // docs/dialects/socketstream.md).
    /// `WSGATE_ROADRUNNER_PATH`: RoadRunner websockets v2 clients. Default
    /// `/roadrunner` (an operator moving from RoadRunner sets `/ws` and
    /// moves `WSGATE_WS_PATH`).
    pub roadrunner_path: String,
    /// `WSGATE_ROADRUNNER_PUBLISH_PATH`: RoadRunner's broadcast RPC as HTTP
    /// (`POST`, and the same path plus `-async`). Default `/roadrunner/publish`.
    pub roadrunner_publish_path: String,
    /// `WSGATE_SOCKETSTREAM_PATH`: SocketStream 0.4 realtime services.
    /// Default `/socketstream`.
    pub socketstream_path: String,
    /// `WSGATE_SOCKETSTREAM_CHANNELS`: what every SocketStream connection is
    /// subscribed to on connect (comma-separated channels or globs). Default
    /// none.
    pub socketstream_channels: Vec<String>,
    // realizehit over Engine.IO 3 (docs/dialects/realizehit.md).
    /// `WSGATE_REALIZEHIT_PATH`: the Engine.IO endpoint of realizehit
    /// clients. Default `/ws/` (engine.io attaches at its path plus `/`: a
    /// client with `path: '/ws'` requests `/ws/?EIO=3&...`).
    pub realizehit_path: String,
    /// `WSGATE_REALIZEHIT_PUBLISH_PATH`: realizehit's HTTP publisher (`POST`
    /// `{pattern, payload}`, under the publish API key). Default
    /// `/realizehit/publish`.
    pub realizehit_publish_path: String,
    /// `WSGATE_BAYEUX_CONNECT_TIMEOUT_MS`: how long a `/meta/connect` is
    /// held. Default 30000.
    pub bayeux_connect_timeout: Duration,
    /// `WSGATE_BAYEUX_SESSION_TIMEOUT_MS`: how long a Bayeux session waits
    /// for its client to come back (after its last connect, or after its
    /// WebSocket closed without `/meta/disconnect`). Default 60000.
    pub bayeux_session_timeout: Duration,
    /// `WSGATE_MAX_MESSAGE_BYTES`: largest client frame, in bytes. Default 65536.
    /// Larger frames close the socket with 1009.
    pub max_message_bytes: NonZeroUsize,
    /// `WSGATE_MAX_PUBLISH_BYTES`: largest `POST /publish` body, in bytes (a
    /// batch carries many messages, so it has its own bound). Default 1048576.
    pub max_publish_bytes: NonZeroUsize,
    /// `WSGATE_MAX_SUBSCRIPTIONS`: subscriptions one connection may hold. Default 256.
    pub max_subscriptions: NonZeroUsize,
    /// `WSGATE_MAX_PATTERN_BYTES`: longest pattern or channel name, in bytes. Default 256.
    pub max_pattern_bytes: NonZeroUsize,
    /// `WSGATE_MAX_PATTERNS`: distinct patterns one node holds for all its
    /// clients; a pattern nobody on the node holds yet is refused beyond it.
    /// Bounds the node's own matching work (`docs/security.md`). Default 4096.
    pub max_patterns: NonZeroUsize,
    /// `WSGATE_MAX_PATTERNS_PER_CONNECTION`: patterns one connection may hold
    /// (channels do not count), so that a few sockets cannot use up the
    /// node's `WSGATE_MAX_PATTERNS`. Default 32.
    pub max_patterns_per_connection: NonZeroUsize,
    /// `WSGATE_MAX_PATTERN_WILDCARDS`: `?`s plus runs of `*` in one pattern. Default 4.
    pub max_pattern_wildcards: usize,
    /// `WSGATE_MAX_PATTERN_CLASSES`: `[...]` classes in one pattern. Default 2.
    pub max_pattern_classes: usize,
    /// `WSGATE_MIN_PATTERN_PREFIX_BYTES`: literal bytes a pattern must start
    /// with, unless it is a literal followed by `*`s (`*` alone included).
    /// Default 1; 0 allows `*x*`. A pattern with no literal prefix is held in
    /// Redis as `*`, so the node receives (and matches) every publish: 40
    /// sockets of `*{k}x{i}*z*` took Redis to 0.38x of its clean rate.
    pub min_pattern_prefix_bytes: usize,
    /// `WSGATE_MAX_REDIS_PATTERNS`: patterns one node holds in Redis. Redis
    /// matches every publish against every pattern it holds, so more client
    /// patterns than this are coalesced under shared literal prefixes and
    /// matched exactly on the node. Default 64.
    pub max_redis_patterns: NonZeroUsize,
    /// `WSGATE_CLIENT_QUEUE_BYTES`: outbound bytes a connection may have queued before
    /// it is closed as a slow consumer (code 4008). Default 1048576 (1 MiB).
    pub client_queue_bytes: NonZeroUsize,
    /// `WSGATE_MAX_DELIVERY_BYTES`: largest delivery frame. Default 1048576 (1 MiB),
    /// and never more than `WSGATE_CLIENT_QUEUE_BYTES` (the smaller one applies). A
    /// larger broker message is delivered to nobody; its subscribers get a gap
    /// notice with reason `message too large` instead of a 4008 close.
    pub max_delivery_bytes: NonZeroUsize,
    /// `WSGATE_WS_READ_BUFFER_BYTES`: read buffer per WebSocket, in bytes. Default 1024.
    /// It is allocated (and zero-filled) per socket, so it dominates idle memory
    /// (measured: ~5.3 KB per subscribed socket plus this); clients send small
    /// requests, and larger frames still work (read in several chunks).
    pub ws_read_buffer_bytes: NonZeroUsize,
    /// `WSGATE_SUBSCRIBE_TIMEOUT_MS`: how long a subscribe waits for the broker to
    /// confirm before it is refused with `broker unavailable`; a client publish
    /// waits at most as long. Default 5000 ms.
    pub subscribe_timeout: Duration,
    /// `WSGATE_SHUTDOWN_TIMEOUT_MS`: grace after the drain window (or after an
    /// immediate stop) for sockets to finish closing before the process exits
    /// anyway. Default 5000 ms.
    pub shutdown_timeout: Duration,
    /// `WSGATE_DRAIN_WINDOW_MS`: on SIGTERM, sockets are closed with 1012 spread
    /// evenly over this window so clients do not reconnect as a herd. Default 10000 ms.
    pub drain_window: Duration,
    /// `WSGATE_MAX_CONNECTIONS`: WebSocket connections per node; further upgrades
    /// are refused with 503. Default 20000, lowered at start-up to what the
    /// file-descriptor limit holds (see [`crate::fdlimit`]).
    pub max_connections: NonZeroUsize,
    /// Whether `WSGATE_MAX_CONNECTIONS` was set (not a variable): an explicit
    /// value that the fd limit cannot hold stops start-up instead of being
    /// lowered.
    pub max_connections_set: bool,
    /// `WSGATE_MAX_PENDING_CONNECTIONS`: HTTP connections not (yet) upgraded
    /// that the node holds at once (requests being read, keep-alive between
    /// requests); further ones are refused as they are accepted. Default 1024.
    pub max_pending_connections: NonZeroUsize,
    /// Whether `WSGATE_MAX_PENDING_CONNECTIONS` was set (not a variable).
    pub max_pending_connections_set: bool,
    /// `WSGATE_HTTP_HEADER_TIMEOUT_MS`: how long a connection may take to send
    /// a complete request head, counted from the moment the server waits for
    /// one (so it also bounds a silent new connection and an idle keep-alive
    /// connection between requests). Default 10000 ms.
    pub http_header_timeout: Duration,
    /// `WSGATE_HTTP_BODY_TIMEOUT_MS`: how long a `POST /publish` body may take
    /// to arrive in full once its head is read. Default 10000 ms.
    pub http_body_timeout: Duration,
    /// `WSGATE_SUBSCRIBE_RATE`: subscribes per second per connection (token bucket,
    /// burst of the same size), refreshes and client publishes included, since
    /// each costs the node work; excess gets `rate limited`. Default 100.
    pub subscribe_rate: NonZeroUsize,
    /// `WSGATE_PING_INTERVAL_MS`: how often the server pings each socket. Default 25000 ms.
    pub ping_interval: Duration,
    /// `WSGATE_PONG_TIMEOUT_MS`: a socket with no traffic at all (no frame, no pong)
    /// for this long is closed with 4009. Default 60000 ms.
    pub pong_timeout: Duration,
    /// `WSGATE_REDIS_PROBE_INTERVAL_MS`: how often the pub/sub connection is probed
    /// with PING. Default 1000 ms.
    pub redis_probe_interval: Duration,
    /// `WSGATE_REDIS_PROBE_TIMEOUT_MS`: a probe unanswered for this long (or a connect
    /// or write taking this long) counts as a dead connection, which is replaced.
    /// Detection time is at most interval + timeout. Default 3000 ms.
    pub redis_probe_timeout: Duration,
    /// `WSGATE_REDIS_BACKOFF_MAX_MS`: cap of the reconnect backoff (exponential from
    /// 50 ms, with jitter; retries never stop). Default 1000 ms.
    pub redis_backoff_max: Duration,
    /// `WSGATE_REDIS_PUBSUB_CONNECTIONS`: pub/sub connections per node (K),
    /// patterns spread over them by a hash of their name (exact channels on
    /// the first), because before Redis 7.2 a `PSUBSCRIBE` costs O(patterns
    /// that connection holds). `None` (`auto`, the default): enough that none
    /// holds more than 512 Redis patterns when the node holds
    /// min(`WSGATE_MAX_PATTERNS`, `WSGATE_MAX_REDIS_PATTERNS`), at most 256;
    /// 1 with the defaults. 1 to 1024 when set.
    pub redis_pubsub_connections: Option<NonZeroUsize>,
    /// `WSGATE_JWT_SECRET` (HS256, at least 32 bytes, used as its UTF-8 bytes) or
    /// `WSGATE_JWT_PUBLIC_KEY` (a PEM public key, or the path of a PEM file: RSA
    /// for RS256, P-256 for ES256). Setting either switches JWT authentication
    /// on; both at once is refused. Default: unset, no authentication.
    pub jwt_key: Option<JwtKey>,
    /// `WSGATE_JWT_AUDIENCE`: comma-separated audiences; when set, a token's
    /// `aud` must name one of them. Default: unset, `aud` not checked.
    pub jwt_audiences: Vec<String>,
    /// `WSGATE_JWT_ISSUER`: comma-separated issuers; when set, a token's `iss`
    /// must be one of them. Default: unset, `iss` not checked.
    pub jwt_issuers: Vec<String>,
    /// `WSGATE_JWT_LEEWAY_SECS`: clock skew tolerated on `exp` and `nbf`, in
    /// seconds, at most 3600; a connection is closed at `exp` plus this. Default 0.
    pub jwt_leeway: Duration,
    /// `WSGATE_ALLOW`: comma-separated channels and patterns every connection is
    /// limited to (the ACL rule of `docs/security.md`), on top of any token
    /// ACL. Default: unset, no server-wide restriction.
    pub allow: Option<Vec<String>>,
    /// `WSGATE_CLIENT_PUBLISH`: comma-separated channels and patterns (the
    /// same entries and matching as `WSGATE_ALLOW`) that clients may publish
    /// to over their own socket; with JWT authentication on, the token's
    /// `publish` claim must allow the channel too. Default: empty, so no
    /// client may publish: publishing from the internet is opted into, never
    /// inherited. Set but empty also means none (the restrictive reading,
    /// so a templating slip cannot open anything).
    pub client_publish: Vec<String>,
    /// `WSGATE_AUTH_URL`: `http://` URL of the subscribe authorisation callback.
    /// Default: unset, no callback.
    pub auth_url: Option<Uri>,
    /// `WSGATE_AUTH_TIMEOUT_MS`: how long a callback may take before the
    /// subscribe is refused with `authorisation unavailable`. Default 2000 ms.
    pub auth_timeout: Duration,
    /// `WSGATE_AUTH_CACHE_TTL_MS`: how long a callback decision is reused for
    /// the same subject and topic; 0 disables caching. Default 30000 ms.
    pub auth_cache_ttl: Duration,
    /// `WSGATE_AUTH_CACHE_ENTRIES`: most decisions cached (oldest evicted).
    /// Default 10000.
    pub auth_cache_entries: NonZeroUsize,
    /// `WSGATE_API_KEY`: when set (at least 16 bytes), `POST /publish` needs
    /// `Authorization: Bearer <key>`. Default: unset, publishing is open.
    pub api_key: Option<Secret>,
    /// `WSGATE_ALLOWED_ORIGINS`: comma-separated origins (`https://app.example`)
    /// whose browsers may connect, or `*`. Default: unset, any origin.
    pub allowed_origins: Option<Vec<String>>,
    /// `WSGATE_REQUIRE_ORIGIN`: `true` refuses upgrades without an `Origin`
    /// header (non-browser clients). Default `false`.
    pub require_origin: bool,
    /// `WSGATE_DIRECT_WRITES`: `on` lets the dispatcher write deliveries
    /// straight to an idle WebSocket (`docs/design.md`, "The direct write
    /// path"; the default, measured cheaper than the session's writes at
    /// every rate in `docs/benchmarks.md`); `off` keeps every write in the
    /// session's task.
    pub direct_writes: bool,
    /// `WSGATE_COMPRESSION`: `on` answers a client's `permessage-deflate`
    /// offer (RFC 7692; `docs/design.md`, "Compression"): deliveries are
    /// deflated once per message for every member that agreed, client
    /// messages inflated within `WSGATE_MAX_MESSAGE_BYTES`. `off` (default)
    /// ignores the offer: it costs CPU that only slow links repay.
    pub compression: bool,
    /// `WSGATE_MAX_CONNECTIONS_PER_IP`: open WebSocket connections per client
    /// address (IPv6: per /64). Default: unset, no limit.
    pub max_connections_per_ip: Option<NonZeroUsize>,
    /// `WSGATE_NEW_CONNECTIONS_PER_IP_PER_SEC`: upgrade attempts per second per
    /// client address (token bucket, same burst). Default: unset, no limit.
    pub new_connections_per_ip_per_sec: Option<NonZeroUsize>,
    /// `WSGATE_TRUSTED_PROXIES`: comma-separated addresses or CIDR blocks whose
    /// `X-Forwarded-For` is believed. Default: none.
    pub trusted_proxies: Vec<Network>,
    /// `WSGATE_MAX_TRACKED_IPS`: addresses the per-address limits track at once;
    /// when full, new addresses are refused. Default 100000.
    pub max_tracked_ips: NonZeroUsize,
    /// `WSGATE_NODE_ID`: this node's name in Redis `CLIENT LIST`
    /// (`wsgate:<node>:publish`, `wsgate:<node>:pubsub`), 1 to 64 of `A-Z a-z
    /// 0-9 . _ -`. Default: the hostname and the process id (`web-1-4242`), or
    /// random hex when the hostname is unknown.
    pub node_id: String,
    /// `WSGATE_IDEMPOTENCY_TTL_MS`: how long a `POST /publish` idempotency key
    /// is remembered (in Redis, or in memory with the embedded broker), so a
    /// retry with the same key within it is not published again. Default
    /// 300000 ms (5 minutes, as Centrifugo).
    pub idempotency_ttl: Duration,
    /// `WSGATE_LOG`: tracing filter, e.g. `info` or `wsgate=debug`. Default `info`.
    pub log: String,
    /// `WSGATE_LOG_FORMAT`: `text` or `json`. Default `text`.
    pub log_format: LogFormat,

    // Connect authorisation by a backend, and server-sent events.
    /// `WSGATE_CONNECT_AUTH_URL`: `http://` URL of the backend asked before
    /// any connection is admitted (`src/connect_auth.rs`). Default: unset.
    pub connect_auth_url: Option<Uri>,
    /// `WSGATE_CONNECT_AUTH_TIMEOUT_MS`: how long the backend may take
    /// before the connection is refused with 503. Default 2000 ms.
    pub connect_auth_timeout: Duration,
    /// `WSGATE_CONNECT_AUTH_CACHE_TTL_MS`: how long a verdict is reused for
    /// the same forwarded request; 0 disables caching. Default 10000 ms.
    pub connect_auth_cache_ttl: Duration,
    /// `WSGATE_CONNECT_AUTH_CACHE_ENTRIES`: most verdicts cached (oldest
    /// evicted). Default 10000.
    pub connect_auth_cache_entries: NonZeroUsize,
    /// `WSGATE_SSE_PATH`: path of the server-sent events endpoint (the
    /// native protocol, one way). Default `/sse`.
    pub sse_path: String,

    // Services (`docs/services.md`).
    /// `WSGATE_SERVICES_PATH`: the WebSocket endpoint of service and
    /// consumer processes. Default `/services`.
    pub services_path: String,
    /// `WSGATE_SERVICE_KEY`: the shared key a service process presents
    /// (`Authorization: Bearer <key>` or `?key=`) to register any service.
    /// Default: unset (then only a token's `services` claim lets one in).
    pub service_key: Option<Secret>,
    /// `WSGATE_CALL_ALLOW`: `service:method` globs every connection may
    /// call (besides a token's `call` claim). Default: none.
    pub call_allow: Vec<String>,
    /// `WSGATE_CALL_TIMEOUT_MS`: a call's deadline (a caller may ask for
    /// less). Default 10000 ms.
    pub call_timeout: Duration,
    /// `WSGATE_SERVICE_LEASE_MS`: how long an instance stays in the
    /// directory after its node stopped renewing it. Default 15000 ms.
    pub service_lease: Duration,
    /// `WSGATE_MAX_CALL_BYTES`: the largest call parameters or reply
    /// payload. Default 65536.
    pub max_call_bytes: NonZeroUsize,
    /// `WSGATE_MAX_CALLS_IN_FLIGHT`: calls one connection may have waiting
    /// (client or consumer); one more is refused at once. Default 64.
    pub max_calls_in_flight: NonZeroUsize,
    /// `WSGATE_TCP_SERVICES`: nodefony's TCP backends, `name=host:port`
    /// entries, reached through Bayeux's `/service/<name>`. Default: none.
    pub tcp_services: Vec<(String, String)>,
    /// `WSGATE_HISTORY`: `glob:size:ttl` entries; channels matching a glob
    /// keep their last `size` messages for `ttl` (`docs/history.md`).
    /// Default: none (no channel keeps history).
    pub history: crate::history::Rules,
    /// `WSGATE_HISTORY_READ_RATE`: history messages per second (burst of the
    /// same size) one connection's recoveries, and one reader of
    /// `GET /history`, may make the node read (`docs/history.md`, Limits).
    /// Default 1000.
    pub history_read_rate: NonZeroUsize,
    /// `WSGATE_PRESENCE`: channel globs whose subscribers are kept,
    /// cluster-wide (`docs/presence.md`). Default: none.
    pub presence: crate::presence::Rules,
    /// `WSGATE_PRESENCE_LEASE_MS`: how long a node's members outlive its
    /// last renewal (renewed every third of it). Default 30000 ms.
    pub presence_lease: Duration,
    /// `WSGATE_TCP_SERVICE_CONNECT_TIMEOUT_MS`: how long opening a client's
    /// connection to a TCP backend may take. Default 2000 ms.
    pub tcp_service_connect_timeout: Duration,
    /// `WSGATE_TCP_SERVICES_PER_CLIENT`: TCP backend connections one client
    /// may hold. Default 4.
    pub tcp_services_per_client: NonZeroUsize,
    /// `WSGATE_TCP_SERVICES_PER_NODE`: TCP backend connections one node may
    /// hold. Default 1024.
    pub tcp_services_per_node: NonZeroUsize,
    /// `WSGATE_TCP_SERVICE_LINE_BYTES`: the longest line to or from a TCP
    /// backend. Default 65536.
    pub tcp_service_line_bytes: NonZeroUsize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            redis_url: None,
            redis_security: crate::broker::redis::Security::default(),
            redis_shards: Vec::new(),
            redis_cluster: None,
            redis_cluster_sharded: false,
            redis_cluster_patterns: false,
            ws_path: "/ws".to_owned(),
            bayeux_path: "/bayeux".to_owned(),
            nodefony_path: "/realtime".to_owned(),
            roadrunner_path: "/roadrunner".to_owned(),
            roadrunner_publish_path: "/roadrunner/publish".to_owned(),
            socketstream_path: "/socketstream".to_owned(),
            socketstream_channels: Vec::new(),
            realizehit_path: "/ws/".to_owned(),
            realizehit_publish_path: "/realizehit/publish".to_owned(),
            bayeux_connect_timeout: Duration::from_millis(30_000),
            bayeux_session_timeout: Duration::from_millis(60_000),
            max_message_bytes: nz(65536),
            max_publish_bytes: nz(1024 * 1024),
            max_subscriptions: nz(256),
            max_pattern_bytes: nz(256),
            max_patterns: nz(4096),
            max_patterns_per_connection: nz(32),
            max_pattern_wildcards: 4,
            max_pattern_classes: 2,
            min_pattern_prefix_bytes: 1,
            max_redis_patterns: nz(64),
            client_queue_bytes: nz(1024 * 1024),
            max_delivery_bytes: nz(1024 * 1024),
            ws_read_buffer_bytes: nz(1024),
            subscribe_timeout: Duration::from_millis(5000),
            shutdown_timeout: Duration::from_millis(5000),
            drain_window: Duration::from_millis(10_000),
            max_connections: nz(20_000),
            max_connections_set: false,
            max_pending_connections: nz(1024),
            max_pending_connections_set: false,
            http_header_timeout: Duration::from_millis(10_000),
            http_body_timeout: Duration::from_millis(10_000),
            subscribe_rate: nz(100),
            ping_interval: Duration::from_millis(25_000),
            pong_timeout: Duration::from_millis(60_000),
            redis_probe_interval: Duration::from_millis(1000),
            redis_probe_timeout: Duration::from_millis(3000),
            redis_backoff_max: Duration::from_millis(1000),
            redis_pubsub_connections: None,
            jwt_key: None,
            jwt_audiences: Vec::new(),
            jwt_issuers: Vec::new(),
            jwt_leeway: Duration::ZERO,
            allow: None,
            client_publish: Vec::new(),
            auth_url: None,
            auth_timeout: Duration::from_millis(2000),
            auth_cache_ttl: Duration::from_millis(30_000),
            auth_cache_entries: nz(10_000),
            api_key: None,
            allowed_origins: None,
            require_origin: false,
            direct_writes: true,
            compression: false,
            max_connections_per_ip: None,
            new_connections_per_ip_per_sec: None,
            trusted_proxies: Vec::new(),
            max_tracked_ips: nz(100_000),
            node_id: default_node_id(),
            idempotency_ttl: Duration::from_millis(300_000),
            log: "info".to_owned(),
            log_format: LogFormat::Text,
            connect_auth_url: None,
            connect_auth_timeout: Duration::from_millis(2000),
            connect_auth_cache_ttl: Duration::from_millis(10_000),
            connect_auth_cache_entries: nz(10_000),
            sse_path: "/sse".to_owned(),
            services_path: "/services".to_owned(),
            service_key: None,
            call_allow: Vec::new(),
            call_timeout: Duration::from_millis(10_000),
            service_lease: Duration::from_millis(15_000),
            max_call_bytes: nz(65_536),
            max_calls_in_flight: nz(64),
            tcp_services: Vec::new(),
            history: crate::history::Rules::default(),
            history_read_rate: nz(crate::read_rate::DEFAULT_RATE),
            presence: crate::presence::Rules::default(),
            presence_lease: crate::presence::DEFAULT_LEASE,
            tcp_service_connect_timeout: Duration::from_millis(2000),
            tcp_services_per_client: nz(4),
            tcp_services_per_node: nz(1024),
            tcp_service_line_bytes: nz(65_536),
        }
    }
}

/// Constant non-zero defaults; `max(1)` keeps this total without a panic path.
const fn nz(n: usize) -> NonZeroUsize {
    match NonZeroUsize::new(n) {
        Some(v) => v,
        None => NonZeroUsize::MIN,
    }
}

/// The environment as envy sees it: every field an optional string, so that
/// validation (and its error message) is ours rather than serde's.
#[derive(Deserialize, Default)]
struct RawConfig {
    listen: Option<String>,
    redis_url: Option<String>,
    redis_sentinel_password: Option<String>,
    redis_ca_file: Option<String>,
    redis_cert_file: Option<String>,
    redis_key_file: Option<String>,
    redis_shards: Option<String>,
    redis_cluster: Option<String>,
    redis_cluster_pubsub: Option<String>,
    redis_cluster_patterns: Option<String>,
    ws_path: Option<String>,
    bayeux_path: Option<String>,
    nodefony_path: Option<String>,
    roadrunner_path: Option<String>,
    roadrunner_publish_path: Option<String>,
    socketstream_path: Option<String>,
    socketstream_channels: Option<String>,
    realizehit_path: Option<String>,
    realizehit_publish_path: Option<String>,
    bayeux_connect_timeout_ms: Option<String>,
    bayeux_session_timeout_ms: Option<String>,
    max_message_bytes: Option<String>,
    max_publish_bytes: Option<String>,
    max_subscriptions: Option<String>,
    max_pattern_bytes: Option<String>,
    max_patterns: Option<String>,
    max_patterns_per_connection: Option<String>,
    max_pattern_wildcards: Option<String>,
    max_pattern_classes: Option<String>,
    min_pattern_prefix_bytes: Option<String>,
    max_redis_patterns: Option<String>,
    client_queue_bytes: Option<String>,
    max_delivery_bytes: Option<String>,
    ws_read_buffer_bytes: Option<String>,
    subscribe_timeout_ms: Option<String>,
    shutdown_timeout_ms: Option<String>,
    drain_window_ms: Option<String>,
    max_connections: Option<String>,
    max_pending_connections: Option<String>,
    http_header_timeout_ms: Option<String>,
    http_body_timeout_ms: Option<String>,
    subscribe_rate: Option<String>,
    ping_interval_ms: Option<String>,
    pong_timeout_ms: Option<String>,
    redis_probe_interval_ms: Option<String>,
    redis_probe_timeout_ms: Option<String>,
    redis_backoff_max_ms: Option<String>,
    redis_pubsub_connections: Option<String>,
    jwt_secret: Option<String>,
    jwt_public_key: Option<String>,
    jwt_audience: Option<String>,
    jwt_issuer: Option<String>,
    jwt_leeway_secs: Option<String>,
    allow: Option<String>,
    client_publish: Option<String>,
    auth_url: Option<String>,
    auth_timeout_ms: Option<String>,
    auth_cache_ttl_ms: Option<String>,
    auth_cache_entries: Option<String>,
    api_key: Option<String>,
    allowed_origins: Option<String>,
    require_origin: Option<String>,
    direct_writes: Option<String>,
    compression: Option<String>,
    max_connections_per_ip: Option<String>,
    new_connections_per_ip_per_sec: Option<String>,
    trusted_proxies: Option<String>,
    max_tracked_ips: Option<String>,
    node_id: Option<String>,
    idempotency_ttl_ms: Option<String>,
    log: Option<String>,
    log_format: Option<String>,
    connect_auth_url: Option<String>,
    connect_auth_timeout_ms: Option<String>,
    connect_auth_cache_ttl_ms: Option<String>,
    connect_auth_cache_entries: Option<String>,
    sse_path: Option<String>,
    services_path: Option<String>,
    service_key: Option<String>,
    call_allow: Option<String>,
    call_timeout_ms: Option<String>,
    service_lease_ms: Option<String>,
    max_call_bytes: Option<String>,
    max_calls_in_flight: Option<String>,
    tcp_services: Option<String>,
    history: Option<String>,
    history_read_rate: Option<String>,
    presence: Option<String>,
    presence_lease_ms: Option<String>,
    tcp_service_connect_timeout_ms: Option<String>,
    tcp_services_per_client: Option<String>,
    tcp_services_per_node: Option<String>,
    tcp_service_line_bytes: Option<String>,
}

impl Config {
    /// K, the pub/sub connections this node opens: the variable, or its
    /// `auto` value.
    pub fn pubsub_connections(&self) -> usize {
        self.redis_pubsub_connections.map_or_else(
            || {
                crate::broker::redis::auto_links(
                    self.max_patterns.get(),
                    self.max_redis_patterns.get(),
                )
            },
            NonZeroUsize::get,
        )
    }

    /// Reads and validates every `WSGATE_*` variable of the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        // `std::env::vars()` panics on a value that is not unicode, anywhere in
        // the environment; read raw, keep ours, and refuse a bad one of ours.
        let mut vars = Vec::new();
        for (key, value) in std::env::vars_os() {
            let Some(key) = key.to_str().filter(|k| k.starts_with("WSGATE_")) else {
                continue;
            };
            match value.into_string() {
                Ok(value) => vars.push((key.to_owned(), value)),
                Err(raw) => {
                    return Err(ConfigError::NotUnicode(
                        key.to_owned(),
                        raw.to_string_lossy().into_owned(),
                    ))
                }
            }
        }
        Self::from_vars(vars)
    }

    /// Same as [`Config::from_env`] over explicit pairs (names with the prefix),
    /// so tests can check validation without touching the process environment.
    pub fn from_vars<I>(vars: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let vars: Vec<(String, String)> = vars.into_iter().collect();
        // Sorted, so that with several unknown names the error is stable.
        let mut names: Vec<&str> = vars.iter().map(|(k, _)| k.as_str()).collect();
        names.sort_unstable();
        for name in names {
            check_known(name)?;
        }
        Self::from_raw(envy::prefixed("WSGATE_").from_iter::<_, RawConfig>(vars)?)
    }

    fn from_raw(raw: RawConfig) -> Result<Config, ConfigError> {
        let d = Config::default();
        let jwt_key = jwt_key(raw.jwt_secret, raw.jwt_public_key)?;
        let jwt_audiences = list(raw.jwt_audience);
        let jwt_issuers = list(raw.jwt_issuer);
        if jwt_key.is_none() && !(jwt_audiences.is_empty() && jwt_issuers.is_empty()) {
            let (var, value) = if jwt_audiences.is_empty() {
                ("WSGATE_JWT_ISSUER", jwt_issuers.join(","))
            } else {
                ("WSGATE_JWT_AUDIENCE", jwt_audiences.join(","))
            };
            return Err(invalid(
                var,
                value,
                "to be set only together with WSGATE_JWT_SECRET or WSGATE_JWT_PUBLIC_KEY",
            ));
        }
        let redis_shards = redis_shards(raw.redis_shards)?;
        let sharded = !redis_shards.is_empty();
        let redis_cluster = redis_cluster(raw.redis_cluster)?;
        let clustered = redis_cluster.is_some();
        if clustered {
            let (var, value) = match (&raw.redis_url, &redis_shards) {
                (Some(url), _) if !url.is_empty() => ("WSGATE_REDIS_URL", url.clone()),
                (_, shards) if !shards.is_empty() => ("WSGATE_REDIS_SHARDS", shards.join(",")),
                _ => ("", String::new()),
            };
            if !var.is_empty() {
                return Err(invalid(
                    var,
                    value,
                    "unset when WSGATE_REDIS_CLUSTER is set (one Redis topology only)",
                ));
            }
        }
        let redis_cluster_sharded = parse_or(
            raw.redis_cluster_pubsub,
            false,
            "WSGATE_REDIS_CLUSTER_PUBSUB",
            |v| match v {
                "classic" => Some(false),
                "sharded" => Some(true),
                _ => None,
            },
            "classic or sharded",
        )?;
        let redis_cluster_patterns = parse_or(
            raw.redis_cluster_patterns,
            false,
            "WSGATE_REDIS_CLUSTER_PATTERNS",
            |v| match v {
                "on" => Some(true),
                "off" => Some(false),
                _ => None,
            },
            "on or off",
        )?;
        let config = Config {
            jwt_key,
            jwt_audiences,
            jwt_issuers,
            jwt_leeway: parse_or(
                raw.jwt_leeway_secs,
                d.jwt_leeway,
                "WSGATE_JWT_LEEWAY_SECS",
                |v| {
                    v.parse::<u64>()
                        .ok()
                        .filter(|s| *s <= MAX_JWT_LEEWAY_SECS)
                        .map(Duration::from_secs)
                },
                "a whole number of seconds, at most 3600",
            )?,
            allow: match raw.allow {
                None => None,
                Some(v) => Some(non_empty_list(
                    v,
                    "WSGATE_ALLOW",
                    "a comma-separated list of channels and patterns (unset for no restriction)",
                )?),
            },
            client_publish: list(raw.client_publish),
            auth_url: match raw.auth_url {
                None => None,
                Some(v) => Some(http_url(v)?),
            },
            auth_timeout: millis_or(
                raw.auth_timeout_ms,
                d.auth_timeout,
                "WSGATE_AUTH_TIMEOUT_MS",
            )?,
            auth_cache_ttl: parse_or(
                raw.auth_cache_ttl_ms,
                d.auth_cache_ttl,
                "WSGATE_AUTH_CACHE_TTL_MS",
                |v| v.parse::<u64>().ok().map(Duration::from_millis),
                "a whole number of milliseconds (0 disables the cache)",
            )?,
            auth_cache_entries: bytes_or(
                raw.auth_cache_entries,
                d.auth_cache_entries,
                "WSGATE_AUTH_CACHE_ENTRIES",
            )?,
            api_key: match raw.api_key {
                None => None,
                Some(v) if v.len() >= MIN_API_KEY_BYTES => Some(Secret(v)),
                Some(_) => {
                    return Err(invalid(
                        "WSGATE_API_KEY",
                        REDACTED.to_owned(),
                        "a key of at least 16 bytes (unset for an open publish API)",
                    ))
                }
            },
            allowed_origins: match raw.allowed_origins {
                None => None,
                Some(v) => {
                    let origins = non_empty_list(
                        v,
                        "WSGATE_ALLOWED_ORIGINS",
                        "a comma-separated list of origins such as https://app.example, or *",
                    )?;
                    // `*` anywhere means any origin: the same as unset. A
                    // trailing `/` is dropped: browsers never send one.
                    let origins: Vec<String> = origins
                        .into_iter()
                        .map(|o| o.trim_end_matches('/').to_owned())
                        .collect();
                    (!origins.iter().any(|o| o == "*")).then_some(origins)
                }
            },
            direct_writes: parse_or(
                raw.direct_writes,
                d.direct_writes,
                "WSGATE_DIRECT_WRITES",
                |v| match v {
                    "on" => Some(true),
                    "off" => Some(false),
                    _ => None,
                },
                "on or off",
            )?,
            compression: parse_or(
                raw.compression,
                d.compression,
                "WSGATE_COMPRESSION",
                |v| match v {
                    "on" => Some(true),
                    "off" => Some(false),
                    _ => None,
                },
                "on or off",
            )?,
            require_origin: parse_or(
                raw.require_origin,
                d.require_origin,
                "WSGATE_REQUIRE_ORIGIN",
                |v| match v {
                    "true" | "1" => Some(true),
                    "false" | "0" => Some(false),
                    _ => None,
                },
                "true or false",
            )?,
            max_connections_per_ip: optional_count(
                raw.max_connections_per_ip,
                "WSGATE_MAX_CONNECTIONS_PER_IP",
            )?,
            new_connections_per_ip_per_sec: optional_count(
                raw.new_connections_per_ip_per_sec,
                "WSGATE_NEW_CONNECTIONS_PER_IP_PER_SEC",
            )?,
            trusted_proxies: match raw.trusted_proxies {
                None => Vec::new(),
                Some(v) => {
                    let mut nets = Vec::new();
                    for item in list(Some(v.clone())) {
                        match Network::parse(&item) {
                            Some(n) => nets.push(n),
                            None => return Err(invalid(
                                "WSGATE_TRUSTED_PROXIES",
                                v,
                                "comma-separated IP addresses or CIDR blocks such as 10.0.0.0/8",
                            )),
                        }
                    }
                    nets
                }
            },
            max_tracked_ips: bytes_or(
                raw.max_tracked_ips,
                d.max_tracked_ips,
                "WSGATE_MAX_TRACKED_IPS",
            )?,
            listen: parse_or(
                raw.listen,
                d.listen,
                "WSGATE_LISTEN",
                |v| v.parse().ok(),
                "a socket address such as 0.0.0.0:8080 or 127.0.0.1:9000",
            )?,
            redis_url: match (raw.redis_url.filter(|v| !v.is_empty()), &redis_shards) {
                (None, shards) => shards.first().cloned(),
                (Some(url), shards) if !shards.is_empty() => {
                    return Err(invalid(
                        "WSGATE_REDIS_URL",
                        url,
                        "unset when WSGATE_REDIS_SHARDS is set (one or the other)",
                    ));
                }
                (Some(url), _)
                    if [
                        "redis://",
                        "rediss://",
                        "redis+sentinel://",
                        "rediss+sentinel://",
                    ]
                    .iter()
                    .any(|s| url.starts_with(s)) =>
                {
                    Some(url)
                }
                (Some(url), _) => {
                    return Err(invalid(
                        "WSGATE_REDIS_URL",
                        url,
                        "a URL of the form redis[s]://[user:password@]host[:port][/db] or \
                         redis[s]+sentinel://[user:password@]host:port[,host:port...]/master[/db], \
                         or unset for the embedded broker",
                    ));
                }
            },
            redis_security: crate::broker::redis::Security {
                sentinel_password: raw.redis_sentinel_password.filter(|v| !v.is_empty()),
                ca_file: raw.redis_ca_file.filter(|v| !v.is_empty()).map(Into::into),
                cert_file: raw
                    .redis_cert_file
                    .filter(|v| !v.is_empty())
                    .map(Into::into),
                key_file: raw.redis_key_file.filter(|v| !v.is_empty()).map(Into::into),
            },
            redis_shards,
            redis_cluster,
            redis_cluster_sharded,
            redis_cluster_patterns,
            ws_path: parse_or(
                raw.ws_path,
                d.ws_path,
                "WSGATE_WS_PATH",
                endpoint_path,
                "an absolute path such as /ws (not / itself, no query)",
            )?,
            bayeux_path: parse_or(
                raw.bayeux_path,
                d.bayeux_path,
                "WSGATE_BAYEUX_PATH",
                endpoint_path,
                "an absolute path such as /bayeux (not / itself, no query)",
            )?,
            nodefony_path: parse_or(
                raw.nodefony_path,
                d.nodefony_path,
                "WSGATE_NODEFONY_PATH",
                endpoint_path,
                "an absolute path such as /realtime (not / itself, no query)",
            )?,
            // RoadRunner and SocketStream.
            roadrunner_path: parse_or(
                raw.roadrunner_path,
                d.roadrunner_path,
                "WSGATE_ROADRUNNER_PATH",
                endpoint_path,
                "an absolute path such as /roadrunner (not / itself, no query)",
            )?,
            roadrunner_publish_path: parse_or(
                raw.roadrunner_publish_path,
                d.roadrunner_publish_path,
                "WSGATE_ROADRUNNER_PUBLISH_PATH",
                endpoint_path,
                "an absolute path such as /roadrunner/publish (not / itself, no query)",
            )?,
            socketstream_path: parse_or(
                raw.socketstream_path,
                d.socketstream_path,
                "WSGATE_SOCKETSTREAM_PATH",
                endpoint_path,
                "an absolute path such as /socketstream (not / itself, no query)",
            )?,
            socketstream_channels: list(raw.socketstream_channels),
            realizehit_path: parse_or(
                raw.realizehit_path,
                d.realizehit_path,
                "WSGATE_REALIZEHIT_PATH",
                endpoint_path,
                "an absolute path such as /ws/ (not / itself, no query)",
            )?,
            realizehit_publish_path: parse_or(
                raw.realizehit_publish_path,
                d.realizehit_publish_path,
                "WSGATE_REALIZEHIT_PUBLISH_PATH",
                endpoint_path,
                "an absolute path such as /realizehit/publish (not / itself, no query)",
            )?,
            bayeux_connect_timeout: millis_or(
                raw.bayeux_connect_timeout_ms,
                d.bayeux_connect_timeout,
                "WSGATE_BAYEUX_CONNECT_TIMEOUT_MS",
            )?,
            bayeux_session_timeout: millis_or(
                raw.bayeux_session_timeout_ms,
                d.bayeux_session_timeout,
                "WSGATE_BAYEUX_SESSION_TIMEOUT_MS",
            )?,
            max_message_bytes: bytes_or(
                raw.max_message_bytes,
                d.max_message_bytes,
                "WSGATE_MAX_MESSAGE_BYTES",
            )?,
            max_publish_bytes: bytes_or(
                raw.max_publish_bytes,
                d.max_publish_bytes,
                "WSGATE_MAX_PUBLISH_BYTES",
            )?,
            max_subscriptions: bytes_or(
                raw.max_subscriptions,
                d.max_subscriptions,
                "WSGATE_MAX_SUBSCRIPTIONS",
            )?,
            max_pattern_bytes: bytes_or(
                raw.max_pattern_bytes,
                d.max_pattern_bytes,
                "WSGATE_MAX_PATTERN_BYTES",
            )?,
            max_patterns: bytes_or(raw.max_patterns, d.max_patterns, "WSGATE_MAX_PATTERNS")?,
            max_patterns_per_connection: bytes_or(
                raw.max_patterns_per_connection,
                d.max_patterns_per_connection,
                "WSGATE_MAX_PATTERNS_PER_CONNECTION",
            )?,
            max_pattern_wildcards: count_or(
                raw.max_pattern_wildcards,
                d.max_pattern_wildcards,
                "WSGATE_MAX_PATTERN_WILDCARDS",
            )?,
            max_pattern_classes: count_or(
                raw.max_pattern_classes,
                d.max_pattern_classes,
                "WSGATE_MAX_PATTERN_CLASSES",
            )?,
            min_pattern_prefix_bytes: count_or(
                raw.min_pattern_prefix_bytes,
                d.min_pattern_prefix_bytes,
                "WSGATE_MIN_PATTERN_PREFIX_BYTES",
            )?,
            max_redis_patterns: bytes_or(
                raw.max_redis_patterns,
                d.max_redis_patterns,
                "WSGATE_MAX_REDIS_PATTERNS",
            )?,
            client_queue_bytes: bytes_or(
                raw.client_queue_bytes,
                d.client_queue_bytes,
                "WSGATE_CLIENT_QUEUE_BYTES",
            )?,
            max_delivery_bytes: bytes_or(
                raw.max_delivery_bytes,
                d.max_delivery_bytes,
                "WSGATE_MAX_DELIVERY_BYTES",
            )?,
            ws_read_buffer_bytes: bytes_or(
                raw.ws_read_buffer_bytes,
                d.ws_read_buffer_bytes,
                "WSGATE_WS_READ_BUFFER_BYTES",
            )?,
            subscribe_timeout: millis_or(
                raw.subscribe_timeout_ms,
                d.subscribe_timeout,
                "WSGATE_SUBSCRIBE_TIMEOUT_MS",
            )?,
            shutdown_timeout: millis_or(
                raw.shutdown_timeout_ms,
                d.shutdown_timeout,
                "WSGATE_SHUTDOWN_TIMEOUT_MS",
            )?,
            drain_window: parse_or(
                raw.drain_window_ms,
                d.drain_window,
                "WSGATE_DRAIN_WINDOW_MS",
                |v| v.parse::<u64>().ok().map(Duration::from_millis),
                "a whole number of milliseconds (0 closes every socket at once)",
            )?,
            max_connections_set: raw.max_connections.as_ref().is_some_and(|v| !v.is_empty()),
            max_connections: bytes_or(
                raw.max_connections,
                d.max_connections,
                "WSGATE_MAX_CONNECTIONS",
            )?,
            max_pending_connections_set: raw
                .max_pending_connections
                .as_ref()
                .is_some_and(|v| !v.is_empty()),
            max_pending_connections: bytes_or(
                raw.max_pending_connections,
                d.max_pending_connections,
                "WSGATE_MAX_PENDING_CONNECTIONS",
            )?,
            http_header_timeout: millis_or(
                raw.http_header_timeout_ms,
                d.http_header_timeout,
                "WSGATE_HTTP_HEADER_TIMEOUT_MS",
            )?,
            http_body_timeout: millis_or(
                raw.http_body_timeout_ms,
                d.http_body_timeout,
                "WSGATE_HTTP_BODY_TIMEOUT_MS",
            )?,
            subscribe_rate: bytes_or(
                raw.subscribe_rate,
                d.subscribe_rate,
                "WSGATE_SUBSCRIBE_RATE",
            )?,
            ping_interval: millis_or(
                raw.ping_interval_ms,
                d.ping_interval,
                "WSGATE_PING_INTERVAL_MS",
            )?,
            pong_timeout: millis_or(
                raw.pong_timeout_ms,
                d.pong_timeout,
                "WSGATE_PONG_TIMEOUT_MS",
            )?,
            redis_probe_interval: millis_or(
                raw.redis_probe_interval_ms,
                d.redis_probe_interval,
                "WSGATE_REDIS_PROBE_INTERVAL_MS",
            )?,
            redis_probe_timeout: millis_or(
                raw.redis_probe_timeout_ms,
                d.redis_probe_timeout,
                "WSGATE_REDIS_PROBE_TIMEOUT_MS",
            )?,
            redis_backoff_max: millis_or(
                raw.redis_backoff_max_ms,
                d.redis_backoff_max,
                "WSGATE_REDIS_BACKOFF_MAX_MS",
            )?,
            redis_pubsub_connections: parse_or(
                raw.redis_pubsub_connections,
                d.redis_pubsub_connections,
                "WSGATE_REDIS_PUBSUB_CONNECTIONS",
                |v| match v {
                    "auto" => Some(None),
                    n => n
                        .parse::<NonZeroUsize>()
                        .ok()
                        .filter(|n| n.get() <= crate::broker::redis::MAX_LINKS)
                        .map(Some),
                },
                "auto, or a whole number from 1 to 1024",
            )?,
            node_id: parse_or(
                raw.node_id,
                d.node_id,
                "WSGATE_NODE_ID",
                |v| valid_node_id(v).then(|| v.to_owned()),
                "1 to 64 characters of A-Z a-z 0-9 . _ - (unset: hostname-pid)",
            )?,
            idempotency_ttl: millis_or(
                raw.idempotency_ttl_ms,
                d.idempotency_ttl,
                "WSGATE_IDEMPOTENCY_TTL_MS",
            )?,
            log: parse_or(
                raw.log,
                d.log,
                "WSGATE_LOG",
                |v| {
                    tracing_subscriber::EnvFilter::try_new(v)
                        .ok()
                        .map(|_| v.to_owned())
                },
                "a tracing filter such as info, debug or wsgate=debug,warn",
            )?,
            log_format: parse_or(
                raw.log_format,
                d.log_format,
                "WSGATE_LOG_FORMAT",
                |v| match v {
                    "text" => Some(LogFormat::Text),
                    "json" => Some(LogFormat::Json),
                    _ => None,
                },
                "text or json",
            )?,
            connect_auth_url: match raw.connect_auth_url {
                None => None,
                Some(v) => Some(http_url_for("WSGATE_CONNECT_AUTH_URL", v)?),
            },
            connect_auth_timeout: millis_or(
                raw.connect_auth_timeout_ms,
                d.connect_auth_timeout,
                "WSGATE_CONNECT_AUTH_TIMEOUT_MS",
            )?,
            connect_auth_cache_ttl: parse_or(
                raw.connect_auth_cache_ttl_ms,
                d.connect_auth_cache_ttl,
                "WSGATE_CONNECT_AUTH_CACHE_TTL_MS",
                |v| v.parse::<u64>().ok().map(Duration::from_millis),
                "a whole number of milliseconds (0 disables the cache)",
            )?,
            connect_auth_cache_entries: bytes_or(
                raw.connect_auth_cache_entries,
                d.connect_auth_cache_entries,
                "WSGATE_CONNECT_AUTH_CACHE_ENTRIES",
            )?,
            sse_path: parse_or(
                raw.sse_path,
                d.sse_path,
                "WSGATE_SSE_PATH",
                endpoint_path,
                "an absolute path such as /sse (not / itself, no query)",
            )?,
            services_path: parse_or(
                raw.services_path,
                d.services_path,
                "WSGATE_SERVICES_PATH",
                endpoint_path,
                "an absolute path such as /services (not / itself, no query)",
            )?,
            service_key: match raw.service_key {
                None => None,
                Some(v) if v.len() >= MIN_API_KEY_BYTES => Some(Secret(v)),
                Some(_) => {
                    return Err(invalid(
                        "WSGATE_SERVICE_KEY",
                        REDACTED.to_owned(),
                        "a key of at least 16 bytes (unset: only tokens with a services claim)",
                    ))
                }
            },
            call_allow: list(raw.call_allow),
            call_timeout: millis_or(
                raw.call_timeout_ms,
                d.call_timeout,
                "WSGATE_CALL_TIMEOUT_MS",
            )?,
            service_lease: millis_or(
                raw.service_lease_ms,
                d.service_lease,
                "WSGATE_SERVICE_LEASE_MS",
            )?,
            max_call_bytes: bytes_or(
                raw.max_call_bytes,
                d.max_call_bytes,
                "WSGATE_MAX_CALL_BYTES",
            )?,
            max_calls_in_flight: bytes_or(
                raw.max_calls_in_flight,
                d.max_calls_in_flight,
                "WSGATE_MAX_CALLS_IN_FLIGHT",
            )?,
            history: match raw.history.filter(|v| !v.trim().is_empty()) {
                None => crate::history::Rules::default(),
                // Its Function library and streams would have to be called
                // on each channel's slot owner.
                Some(v) if clustered => {
                    return Err(invalid(
                        "WSGATE_HISTORY",
                        v,
                        "unset when WSGATE_REDIS_CLUSTER is set (history over Redis Cluster is not supported yet)",
                    ));
                }
                Some(v) => crate::history::Rules::parse(&v)
                    .map_err(|why| ConfigError::History { value: v, why })?,
            },
            history_read_rate: bytes_or(
                raw.history_read_rate,
                d.history_read_rate,
                "WSGATE_HISTORY_READ_RATE",
            )?,
            presence: match raw.presence.filter(|v| !v.trim().is_empty()) {
                None => crate::presence::Rules::default(),
                Some(v) if clustered => {
                    return Err(invalid(
                        "WSGATE_PRESENCE",
                        v,
                        "unset when WSGATE_REDIS_CLUSTER is set (presence over Redis Cluster is not supported yet)",
                    ));
                }
                // Its store and its join/leave events would live on one
                // server while the channels' subscribers are on their owners.
                Some(v) if sharded => {
                    return Err(invalid(
                        "WSGATE_PRESENCE",
                        v,
                        "unset when WSGATE_REDIS_SHARDS is set (presence over client-side shards is not supported yet)",
                    ));
                }
                Some(v) => crate::presence::Rules::parse(&v)
                    .map_err(|why| ConfigError::Presence { value: v, why })?,
            },
            presence_lease: parse_or(
                raw.presence_lease_ms,
                d.presence_lease,
                "WSGATE_PRESENCE_LEASE_MS",
                |v| {
                    v.parse::<u64>()
                        .ok()
                        .map(Duration::from_millis)
                        .filter(|l| {
                            (crate::presence::MIN_LEASE..=crate::presence::MAX_LEASE).contains(l)
                        })
                },
                "a whole number of milliseconds from 300 to 86400000",
            )?,
            tcp_services: match raw.tcp_services {
                None => Vec::new(),
                Some(v) => tcp_services(&v)?,
            },
            tcp_service_connect_timeout: millis_or(
                raw.tcp_service_connect_timeout_ms,
                d.tcp_service_connect_timeout,
                "WSGATE_TCP_SERVICE_CONNECT_TIMEOUT_MS",
            )?,
            tcp_services_per_client: bytes_or(
                raw.tcp_services_per_client,
                d.tcp_services_per_client,
                "WSGATE_TCP_SERVICES_PER_CLIENT",
            )?,
            tcp_services_per_node: bytes_or(
                raw.tcp_services_per_node,
                d.tcp_services_per_node,
                "WSGATE_TCP_SERVICES_PER_NODE",
            )?,
            tcp_service_line_bytes: bytes_or(
                raw.tcp_service_line_bytes,
                d.tcp_service_line_bytes,
                "WSGATE_TCP_SERVICE_LINE_BYTES",
            )?,
        };
        mounts::check(&config)?;
        Ok(config)
    }
}

/// Longest `WSGATE_NODE_ID`: it goes into Redis client names.
const MAX_NODE_ID_BYTES: usize = 64;

/// Can `id` name a node? Redis refuses spaces and newlines in client names;
/// we keep to characters that need no quoting anywhere.
fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_NODE_ID_BYTES
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The default node id: `<hostname>-<pid>` (hostname cut to what
/// [`valid_node_id`] accepts), or 16 random hex digits without a hostname.
fn default_node_id() -> String {
    let pid = std::process::id();
    let host = ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|path| std::fs::read_to_string(path).ok())
        .map(|h| {
            h.trim()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                .take(MAX_NODE_ID_BYTES - 11)
                .collect::<String>()
        })
        .filter(|h| !h.is_empty());
    match host {
        Some(host) => format!("{host}-{pid}"),
        None => {
            use std::hash::{BuildHasher, Hasher};
            // A fresh RandomState is seeded randomly: no RNG crate needed.
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(pid);
            format!("{:016x}", h.finish())
        }
    }
}

/// Every field of [`RawConfig`], as serde's derive lists them: the one source
/// of the known variable names (`WSGATE_` + the field in capitals), so a
/// variable added to `RawConfig` is known to the unknown-name check without
/// any other list to update.
pub fn raw_fields() -> &'static [&'static str] {
    let mut probe = FieldNames(None);
    // The probe refuses every call; only the field list it saw matters.
    let _ = RawConfig::deserialize(&mut probe);
    probe.0.unwrap_or(&[])
}

/// Every known `WSGATE_*` variable name, in declaration order.
pub fn known_variables() -> Vec<String> {
    raw_fields()
        .iter()
        .map(|f| format!("WSGATE_{}", f.to_ascii_uppercase()))
        .collect()
}

/// A serde deserializer that only records the field list a derived struct
/// passes to `deserialize_struct`.
struct FieldNames(Option<&'static [&'static str]>);

impl<'de> serde::Deserializer<'de> for &mut FieldNames {
    type Error = serde::de::value::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(serde::de::Error::custom("field names only"))
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0 = Some(fields);
        Err(serde::de::Error::custom("field names only"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

/// Refuses a `WSGATE_*` name no setting reads. Kubernetes injects
/// `WSGATE_SERVICE_*` and `WSGATE_PORT*` for a Service named `wsgate`
/// (service links): those are not ours and are let through.
fn check_known(var: &str) -> Result<(), ConfigError> {
    let Some(field) = var.strip_prefix("WSGATE_") else {
        return Ok(());
    };
    let field = field.to_ascii_lowercase();
    let fields = raw_fields();
    if fields.contains(&field.as_str()) {
        return Ok(());
    }
    if var.starts_with("WSGATE_SERVICE_") || var == "WSGATE_PORT" || var.starts_with("WSGATE_PORT_")
    {
        return Ok(());
    }
    let nearest = fields
        .iter()
        .map(|f| (edit_distance(&field, f), *f))
        .min_by_key(|(d, _)| *d)
        // Close enough to be a slip: a few edits, fewer than a third of the name.
        .filter(|(d, f)| *d <= 3.max(f.len() / 3));
    let hint = match nearest {
        Some((_, f)) => format!("did you mean WSGATE_{}?", f.to_ascii_uppercase()),
        None => "wsgate --help lists the variables".to_owned(),
    };
    Err(ConfigError::Unknown {
        var: var.to_owned(),
        hint,
    })
}

/// Levenshtein distance over bytes (names are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.bytes().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

/// One row of `wsgate --help`: a [`RawConfig`] field, its default as one
/// would write it in the environment (empty: unset), and what it does.
/// Unit tests check that every field has a row and that each default, set
/// explicitly, gives [`Config::default`].
struct Help {
    field: &'static str,
    default: &'static str,
    meaning: &'static str,
}

const fn help(field: &'static str, default: &'static str, meaning: &'static str) -> Help {
    Help {
        field,
        default,
        meaning,
    }
}

/// The rows of `wsgate --help`, in the order printed.
const HELP: &[Help] = &[
    help(
        "listen",
        "0.0.0.0:8080",
        "address to bind (HTTP and WebSocket)",
    ),
    help(
        "redis_url",
        "",
        "redis[s]://[user:password@]host[:port][/db] or redis[s]+sentinel://[user:password@]host:port,.../master[/db]; unset: embedded in-process broker (one node)",
    ),
    help(
        "redis_sentinel_password",
        "",
        "AUTH password of the sentinels themselves",
    ),
    help(
        "redis_ca_file",
        "",
        "PEM CA bundle for rediss:// (required with TLS)",
    ),
    help(
        "redis_cert_file",
        "",
        "PEM client certificate for rediss:// (with WSGATE_REDIS_KEY_FILE)",
    ),
    help(
        "redis_key_file",
        "",
        "PEM private key of WSGATE_REDIS_CERT_FILE",
    ),
    help(
        "redis_shards",
        "",
        "redis:// or rediss:// URLs, comma-separated, instead of redis_url: each channel on the server its name hashes to (docs/redis.md, client-side sharding)",
    ),
    help(
        "redis_cluster",
        "",
        "redis[s]://[user:password@]host:port[,host:port...]: Redis Cluster seed nodes, instead of redis_url (docs/redis.md, Redis Cluster)",
    ),
    help(
        "redis_cluster_pubsub",
        "classic",
        "classic (SUBSCRIBE/PUBLISH on any node) or sharded (SSUBSCRIBE on each slot's master, SPUBLISH)",
    ),
    help(
        "redis_cluster_patterns",
        "off",
        "on: allow patterns in sharded mode (a classic connection; every publish sent as SPUBLISH and PUBLISH)",
    ),
    help("ws_path", "/ws", "WebSocket endpoint path"),
    help(
        "bayeux_path",
        "/bayeux",
        "Bayeux endpoint (WebSocket and long-polling: Faye, CometD)",
    ),
    help(
        "nodefony_path",
        "/realtime",
        "the Bayeux endpoint for nodefony's client",
    ),
    // RoadRunner and SocketStream.
    help(
        "roadrunner_path",
        "/roadrunner",
        "RoadRunner websockets v2 endpoint",
    ),
    help(
        "roadrunner_publish_path",
        "/roadrunner/publish",
        "RoadRunner broadcast publish (POST; the same path plus -async answers at once)",
    ),
    help(
        "socketstream_path",
        "/socketstream",
        "SocketStream 0.4 realtime services endpoint",
    ),
    help(
        "socketstream_channels",
        "",
        "channels or globs every SocketStream connection is subscribed to on connect",
    ),
    help(
        "realizehit_path",
        "/ws/",
        "realizehit's Engine.IO 3 endpoint (polling and WebSocket)",
    ),
    help(
        "realizehit_publish_path",
        "/realizehit/publish",
        "realizehit's HTTP publisher: POST {pattern, payload}",
    ),
    help(
        "bayeux_connect_timeout_ms",
        "30000",
        "how long a Bayeux /meta/connect is held",
    ),
    help(
        "bayeux_session_timeout_ms",
        "60000",
        "how long a Bayeux session waits for its client to come back",
    ),
    help(
        "max_message_bytes",
        "65536",
        "largest client frame (larger: close 1009)",
    ),
    help(
        "max_publish_bytes",
        "1048576",
        "largest POST /publish body (larger: 413)",
    ),
    help("max_subscriptions", "256", "subscriptions per connection"),
    help(
        "max_pattern_bytes",
        "256",
        "longest pattern or channel name",
    ),
    help(
        "client_queue_bytes",
        "1048576",
        "outbound bytes queued per connection before it is closed with 4008",
    ),
    help(
        "max_patterns_per_connection",
        "32",
        "patterns per connection (channels do not count)",
    ),
    help(
        "max_patterns",
        "4096",
        "distinct patterns per node; a pattern new to the node is refused beyond it",
    ),
    help(
        "max_pattern_wildcards",
        "4",
        "? plus runs of * in one pattern",
    ),
    help(
        "min_pattern_prefix_bytes",
        "1",
        "literal bytes a pattern must start with, unless it is a literal followed by * (0: any)",
    ),
    help(
        "max_pattern_classes",
        "2",
        "[...] classes in one pattern (an unterminated [ is always refused)",
    ),
    help(
        "max_redis_patterns",
        "64",
        "patterns one node holds in Redis; client patterns are coalesced beyond",
    ),
    help(
        "node_id",
        "",
        "this node's name in Redis CLIENT LIST (wsgate:<id>:pubsub|publish); unset: hostname-pid",
    ),
    help(
        "idempotency_ttl_ms",
        "300000",
        "how long a publish idempotency_key is remembered",
    ),
    help(
        "max_delivery_bytes",
        "1048576",
        "largest delivery frame (never above client_queue_bytes); larger: a 'message too large' gap notice",
    ),
    help(
        "ws_read_buffer_bytes",
        "1024",
        "read buffer per socket (dominates idle memory)",
    ),
    help(
        "subscribe_timeout_ms",
        "5000",
        "how long a subscribe (or a client publish) waits for the broker",
    ),
    help(
        "shutdown_timeout_ms",
        "5000",
        "grace after the drain window for sockets to close",
    ),
    help(
        "drain_window_ms",
        "10000",
        "on SIGTERM, sockets close with 1012 spread over this window",
    ),
    help(
        "max_connections",
        "20000",
        "WebSocket connections per node (lowered to fit the fd limit unless set)",
    ),
    help(
        "max_pending_connections",
        "1024",
        "HTTP connections not yet upgraded, per node; further ones are refused",
    ),
    help(
        "http_header_timeout_ms",
        "10000",
        "deadline for a request head; also bounds silent and idle keep-alive connections",
    ),
    help(
        "http_body_timeout_ms",
        "10000",
        "deadline for a POST /publish body once its head is read",
    ),
    help(
        "subscribe_rate",
        "100",
        "subscribes, refreshes and client publishes per second per connection",
    ),
    help("ping_interval_ms", "25000", "server ping to every socket"),
    help(
        "pong_timeout_ms",
        "60000",
        "a socket silent this long is closed with 4009",
    ),
    help(
        "redis_probe_interval_ms",
        "1000",
        "PING on the pub/sub connection",
    ),
    help(
        "redis_probe_timeout_ms",
        "3000",
        "unanswered PING this long: the connection is replaced",
    ),
    help("redis_backoff_max_ms", "1000", "reconnect backoff cap"),
    help(
        "redis_pubsub_connections",
        "auto",
        "pub/sub connections per node (1-1024); auto: from the pattern caps",
    ),
    help(
        "jwt_secret",
        "",
        "HS256 secret (at least 32 bytes); turns JWT auth on",
    ),
    help(
        "jwt_public_key",
        "",
        "PEM public key, text or file path (RS256, ES256); turns JWT auth on",
    ),
    help("jwt_audience", "", "comma-separated accepted audiences"),
    help("jwt_issuer", "", "comma-separated accepted issuers"),
    help(
        "jwt_leeway_secs",
        "0",
        "clock skew allowed on exp/nbf, seconds (at most 3600)",
    ),
    help(
        "allow",
        "",
        "comma-separated channels and patterns every connection is limited to",
    ),
    help(
        "client_publish",
        "",
        "comma-separated channels and patterns clients may publish to over their socket (unset: none)",
    ),
    help("auth_url", "", "http:// subscribe authorisation callback"),
    help("auth_timeout_ms", "2000", "callback deadline"),
    help(
        "auth_cache_ttl_ms",
        "30000",
        "how long a callback decision is reused (0: never)",
    ),
    help(
        "auth_cache_entries",
        "10000",
        "most cached callback decisions",
    ),
    help(
        "api_key",
        "",
        "at least 16 bytes; POST /publish then needs Authorization: Bearer <key>",
    ),
    help(
        "allowed_origins",
        "",
        "comma-separated origins allowed to open sockets, or *",
    ),
    help(
        "direct_writes",
        "on",
        "on: the dispatcher writes deliveries straight to idle sockets; off: the session task writes",
    ),
    help(
        "compression",
        "off",
        "on: answer permessage-deflate offers, deflating each delivery once for every socket that agreed",
    ),
    help(
        "require_origin",
        "false",
        "true also refuses upgrades without Origin",
    ),
    help(
        "max_connections_per_ip",
        "",
        "open connections per client address (IPv6: per /64)",
    ),
    help(
        "new_connections_per_ip_per_sec",
        "",
        "upgrade attempts per second per client address",
    ),
    help(
        "trusted_proxies",
        "",
        "comma-separated addresses or CIDR blocks whose X-Forwarded-For is believed",
    ),
    help(
        "max_tracked_ips",
        "100000",
        "addresses the per-address limits track at once",
    ),
    help(
        "log",
        "info",
        "tracing filter, e.g. debug or wsgate=debug,warn",
    ),
    help("log_format", "text", "text or json"),
    help(
        "connect_auth_url",
        "",
        "http:// backend asked before any connection is admitted (2xx lets in)",
    ),
    help("connect_auth_timeout_ms", "2000", "connect backend deadline (then 503)"),
    help(
        "connect_auth_cache_ttl_ms",
        "10000",
        "how long a connect verdict is reused (0: never)",
    ),
    help(
        "connect_auth_cache_entries",
        "10000",
        "most cached connect verdicts",
    ),
    help("sse_path", "/sse", "server-sent events endpoint path (native protocol)"),
    help(
        "services_path",
        "/services",
        "WebSocket endpoint of service and consumer processes",
    ),
    help(
        "service_key",
        "",
        "shared key a service process presents to register (Bearer or ?key=)",
    ),
    help("call_allow", "", "service:method globs every connection may call"),
    help(
        "history",
        "",
        "glob:size:ttl entries: matching channels keep their last size messages for ttl",
    ),
    help(
        "history_read_rate",
        "1000",
        "history messages per second one connection's recoveries (or one GET /history reader) may read",
    ),
    help(
        "presence",
        "",
        "channel globs whose subscribers are kept cluster-wide (presence)",
    ),
    help(
        "presence_lease_ms",
        "30000",
        "how long a dead node's presence members stay listed",
    ),
    help("call_timeout_ms", "10000", "a call's deadline (callers may ask less)"),
    help(
        "service_lease_ms",
        "15000",
        "how long a dead node's service instances stay listed",
    ),
    help("max_call_bytes", "65536", "largest call parameters or reply"),
    help(
        "max_calls_in_flight",
        "64",
        "calls one connection may have waiting",
    ),
    help(
        "tcp_services",
        "",
        "nodefony TCP backends: name=host:port,... (Bayeux /service/<name>)",
    ),
    help(
        "tcp_service_connect_timeout_ms",
        "2000",
        "deadline to open a client's TCP backend connection",
    ),
    help("tcp_services_per_client", "4", "TCP backend connections per client"),
    help("tcp_services_per_node", "1024", "TCP backend connections per node"),
    help(
        "tcp_service_line_bytes",
        "65536",
        "longest line to or from a TCP backend",
    ),
];

/// The text of `wsgate --help`: usage, then every variable with its default.
/// Built from [`raw_fields`], so a variable without a [`HELP`] row is still
/// listed (and a unit test fails until it gets one).
pub fn help_text() -> String {
    let mut out = format!(
        "wsgate {}: {}\n\n\
         Usage: wsgate [--help | --version]\n\n\
         Configured by environment variables only (README.md, \"Configuration\");\n\
         an unknown WSGATE_* variable or a bad value stops start-up with exit code 2.\n\n",
        env!("CARGO_PKG_VERSION"),
        env!("CARGO_PKG_DESCRIPTION"),
    );
    out.push_str(&format!(
        "  {:<40} {:<14} {}\n",
        "variable", "default", "meaning"
    ));
    for field in raw_fields() {
        let row = HELP.iter().find(|h| h.field == *field);
        let (default, meaning) = match row {
            Some(h) if h.default.is_empty() => ("unset", h.meaning),
            Some(h) => (h.default, h.meaning),
            None => ("", "(see README.md)"),
        };
        let name = format!("WSGATE_{}", field.to_ascii_uppercase());
        out.push_str(&format!("  {name:<40} {default:<14} {meaning}\n"));
    }
    out
}

/// Shown instead of a secret's value in an error.
const REDACTED: &str = "[redacted]";

/// The JWT key from `WSGATE_JWT_SECRET` or `WSGATE_JWT_PUBLIC_KEY` (not both).
/// Unlike other variables, a set but empty value is an error, not "unset":
/// a templating slip must not switch authentication off.
fn jwt_key(
    secret: Option<String>,
    public_key: Option<String>,
) -> Result<Option<JwtKey>, ConfigError> {
    match (secret, public_key) {
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(invalid(
            "WSGATE_JWT_PUBLIC_KEY",
            "(set)".to_owned(),
            "to be unset when WSGATE_JWT_SECRET is set: configure one key",
        )),
        (Some(secret), None) => JwtKey::secret(&secret)
            .map(Some)
            .map_err(|accepted| invalid("WSGATE_JWT_SECRET", REDACTED.to_owned(), accepted)),
        (None, Some(value)) => {
            let pem = if value.trim_start().starts_with("-----BEGIN") {
                // Environments that cannot hold newlines often pass `\n`.
                Ok(value.replace("\\n", "\n").into_bytes())
            } else {
                std::fs::read(value.trim())
            };
            pem.ok()
                .and_then(|pem| JwtKey::public_pem(&pem).ok())
                .map(Some)
                .ok_or_else(|| {
                    let shown = if value.len() > 60 { "(PEM text)".to_owned() } else { value };
                    invalid(
                        "WSGATE_JWT_PUBLIC_KEY",
                        shown,
                        "a PEM public key (RSA for RS256, or P-256 EC for ES256), or the path of a file holding one",
                    )
                })
        }
    }
}

/// Comma-separated items, trimmed, empty ones dropped.
fn list(raw: Option<String>) -> Vec<String> {
    raw.iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `WSGATE_REDIS_SHARDS`: `redis://` or `rediss://` URLs separated by
/// commas, each once; empty when unset. (Sentinel per shard is not offered:
/// each shard is one server.)
fn redis_shards(raw: Option<String>) -> Result<Vec<String>, ConfigError> {
    let accepted = "redis:// or rediss:// URLs separated by commas, each server once, e.g. \
                    redis://10.0.0.1:6379,redis://10.0.0.2:6379";
    let Some(raw) = raw.filter(|v| !v.is_empty()) else {
        return Ok(Vec::new());
    };
    let urls = non_empty_list(raw.clone(), "WSGATE_REDIS_SHARDS", accepted)?;
    let distinct: std::collections::HashSet<&String> = urls.iter().collect();
    if distinct.len() != urls.len()
        || urls
            .iter()
            .any(|u| !(u.starts_with("redis://") || u.starts_with("rediss://")))
    {
        return Err(invalid("WSGATE_REDIS_SHARDS", raw, accepted));
    }
    Ok(urls)
}

/// `WSGATE_REDIS_CLUSTER`: `redis://` or `rediss://`, optional credentials,
/// then `host:port` seed nodes separated by commas (no database: a cluster
/// has only database 0). `None` when unset.
fn redis_cluster(raw: Option<String>) -> Result<Option<String>, ConfigError> {
    let accepted = "redis[s]://[user:password@]host:port[,host:port...], e.g. \
                    redis://10.0.0.1:7000,10.0.0.2:7000 (seed nodes of the cluster; no /db)";
    let Some(raw) = raw.filter(|v| !v.trim().is_empty()) else {
        return Ok(None);
    };
    match crate::broker::redis::cluster::seeds(raw.trim()) {
        Ok(_) => Ok(Some(raw.trim().to_owned())),
        Err(_) => Err(invalid("WSGATE_REDIS_CLUSTER", raw, accepted)),
    }
}

/// `WSGATE_TCP_SERVICES`: `name=host:port` entries; names as service names
/// (`[A-Za-z0-9_-]{1,64}`), each once.
fn tcp_services(raw: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let accepted = "name=host:port entries separated by commas, e.g. random=127.0.0.1:1315 \
                    (names of letters, digits, _ and -, each once)";
    let mut out: Vec<(String, String)> = Vec::new();
    for entry in list(Some(raw.to_owned())) {
        let parsed = entry.split_once('=').and_then(|(name, addr)| {
            let (name, addr) = (name.trim(), addr.trim());
            let host_port = addr
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            (crate::rpc::valid_service_name(name) && host_port)
                .then(|| (name.to_owned(), addr.to_owned()))
        });
        match parsed {
            Some(pair) if !out.iter().any(|(n, _)| *n == pair.0) => out.push(pair),
            _ => return Err(invalid("WSGATE_TCP_SERVICES", raw.to_owned(), accepted)),
        }
    }
    Ok(out)
}

/// A list that must have at least one item once set.
fn non_empty_list(
    raw: String,
    var: &'static str,
    accepted: &'static str,
) -> Result<Vec<String>, ConfigError> {
    let items = list(Some(raw.clone()));
    if items.is_empty() {
        return Err(invalid(var, raw, accepted));
    }
    Ok(items)
}

/// A limit that is off when unset.
fn optional_count(
    raw: Option<String>,
    var: &'static str,
) -> Result<Option<NonZeroUsize>, ConfigError> {
    match raw {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| invalid(var, v, "a whole number greater than 0 (unset for no limit)")),
    }
}

/// `WSGATE_AUTH_URL`: plain `http://` with a host (hyper's client, no TLS).
fn http_url(raw: String) -> Result<Uri, ConfigError> {
    http_url_for("WSGATE_AUTH_URL", raw)
}

/// A backend URL in `var`: plain `http://` with a host.
fn http_url_for(var: &'static str, raw: String) -> Result<Uri, ConfigError> {
    raw.trim()
        .parse::<Uri>()
        .ok()
        .filter(|u| u.scheme_str() == Some("http") && u.host().is_some())
        .ok_or_else(|| {
            invalid(
                var,
                raw,
                "an http:// URL such as http://127.0.0.1:9000/authorise (https is not supported)",
            )
        })
}

fn invalid(var: &'static str, value: String, accepted: &'static str) -> ConfigError {
    ConfigError::Invalid {
        var,
        value,
        accepted,
    }
}

/// An endpoint path: absolute, not `/` itself, no query or fragment.
fn endpoint_path(v: &str) -> Option<String> {
    (v.starts_with('/') && v.len() > 1 && !v.contains(['?', '#', ' '])).then(|| v.to_owned())
}

/// An unset (or empty) variable takes the default; a set one must parse.
fn parse_or<T>(
    raw: Option<String>,
    default: T,
    var: &'static str,
    parse: impl FnOnce(&str) -> Option<T>,
    accepted: &'static str,
) -> Result<T, ConfigError> {
    match raw.filter(|v| !v.is_empty()) {
        None => Ok(default),
        Some(v) => parse(v.trim()).ok_or_else(|| invalid(var, v, accepted)),
    }
}

fn bytes_or(
    raw: Option<String>,
    default: NonZeroUsize,
    var: &'static str,
) -> Result<NonZeroUsize, ConfigError> {
    parse_or(
        raw,
        default,
        var,
        |v| v.parse().ok(),
        "a whole number greater than 0",
    )
}

/// A count where 0 is meaningful (0 wildcards: literal patterns only).
fn count_or(raw: Option<String>, default: usize, var: &'static str) -> Result<usize, ConfigError> {
    parse_or(
        raw,
        default,
        var,
        |v| v.parse().ok(),
        "a whole number (0 or more)",
    )
}

fn millis_or(
    raw: Option<String>,
    default: Duration,
    var: &'static str,
) -> Result<Duration, ConfigError> {
    parse_or(
        raw,
        default,
        var,
        |v| {
            v.parse::<u64>()
                .ok()
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis)
        },
        "a whole number of milliseconds greater than 0",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let c = vars(&[]).unwrap();
        assert_eq!(c.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.redis_url, None);
        assert_eq!(c.ws_path, "/ws");
        assert_eq!(c.max_message_bytes.get(), 65536);
        assert_eq!(c.max_subscriptions.get(), 256);
        assert_eq!(c.max_pattern_bytes.get(), 256);
        assert_eq!(c.client_queue_bytes.get(), 1 << 20);
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.max_patterns.get(), 4096);
        assert_eq!(c.max_patterns_per_connection.get(), 32);
        assert_eq!(c.max_pattern_wildcards, 4);
        assert_eq!(c.max_pattern_classes, 2);
        assert_eq!(c.max_redis_patterns.get(), 64);
    }

    /// A cluster's seeds instead of one URL, never with another topology;
    /// its pub/sub mode and the patterns option; history and presence
    /// refused with it.
    #[test]
    fn redis_cluster_is_its_own_topology() {
        let c = vars(&[("WSGATE_REDIS_CLUSTER", "redis://u:p@a:7000,b:7001")]).unwrap();
        assert_eq!(
            c.redis_cluster.as_deref(),
            Some("redis://u:p@a:7000,b:7001")
        );
        assert_eq!(c.redis_url, None);
        assert!(!c.redis_cluster_sharded && !c.redis_cluster_patterns);
        let c = vars(&[
            ("WSGATE_REDIS_CLUSTER", "rediss://a:7000"),
            ("WSGATE_REDIS_CLUSTER_PUBSUB", "sharded"),
            ("WSGATE_REDIS_CLUSTER_PATTERNS", "on"),
        ])
        .unwrap();
        assert!(c.redis_cluster_sharded && c.redis_cluster_patterns);
        for (other, value) in [
            ("WSGATE_REDIS_URL", "redis://a:1"),
            ("WSGATE_REDIS_SHARDS", "redis://a:1,redis://b:2"),
        ] {
            let err = vars(&[("WSGATE_REDIS_CLUSTER", "redis://a:7000"), (other, value)])
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(other) && err.contains("WSGATE_REDIS_CLUSTER"),
                "{err}"
            );
        }
        for bad in [
            "http://a:1",
            "redis://a:7000/2",
            "redis://a:x",
            "redis://",
            "redis://a:1,,b:2",
        ] {
            let err = vars(&[("WSGATE_REDIS_CLUSTER", bad)])
                .map(|_| ())
                .unwrap_err();
            assert!(
                err.to_string().contains("WSGATE_REDIS_CLUSTER"),
                "{bad}: {err}"
            );
        }
        let err = vars(&[("WSGATE_REDIS_CLUSTER_PUBSUB", "both")])
            .map(|_| ())
            .unwrap_err();
        assert!(err.to_string().contains("classic or sharded"), "{err}");
        for var in ["WSGATE_HISTORY", "WSGATE_PRESENCE"] {
            let err = vars(&[("WSGATE_REDIS_CLUSTER", "redis://a:7000"), (var, "chat.*")])
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(err.contains(var) && err.contains("Redis Cluster"), "{err}");
        }
    }

    /// Shards instead of one URL, never both; the first shard is the
    /// node-wide Redis.
    #[test]
    fn redis_shards_replace_the_redis_url() {
        let c = vars(&[(
            "WSGATE_REDIS_SHARDS",
            "redis://a:1, redis://b:2,redis://c:3",
        )])
        .unwrap();
        assert_eq!(
            c.redis_shards,
            ["redis://a:1", "redis://b:2", "redis://c:3"]
        );
        assert_eq!(c.redis_url.as_deref(), Some("redis://a:1"));
        let both = vars(&[
            ("WSGATE_REDIS_SHARDS", "redis://a:1,redis://b:2"),
            ("WSGATE_REDIS_URL", "redis://a:1"),
        ]);
        let err = both.map(|_| ()).unwrap_err().to_string();
        assert!(
            err.contains("WSGATE_REDIS_URL") && err.contains("WSGATE_REDIS_SHARDS"),
            "{err}"
        );
    }

    #[test]
    fn values_are_parsed() {
        let c = vars(&[
            ("WSGATE_LISTEN", "127.0.0.1:9"),
            ("WSGATE_REDIS_URL", "redis://127.0.0.1:7000/0"),
            ("WSGATE_MAX_SUBSCRIPTIONS", "3"),
            ("WSGATE_LOG_FORMAT", "json"),
            ("WSGATE_SUBSCRIBE_TIMEOUT_MS", "250"),
        ])
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:9".parse().unwrap());
        assert_eq!(c.redis_url.as_deref(), Some("redis://127.0.0.1:7000/0"));
        assert_eq!(c.max_subscriptions.get(), 3);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.subscribe_timeout, Duration::from_millis(250));
        let c = vars(&[
            ("WSGATE_MAX_PATTERNS", "10"),
            ("WSGATE_MAX_PATTERNS_PER_CONNECTION", "3"),
            ("WSGATE_MAX_PATTERN_WILDCARDS", "0"),
            ("WSGATE_MAX_PATTERN_CLASSES", "7"),
            ("WSGATE_MAX_REDIS_PATTERNS", "5"),
        ])
        .unwrap();
        assert_eq!(c.max_patterns.get(), 10);
        assert_eq!(c.max_patterns_per_connection.get(), 3);
        assert_eq!(c.max_pattern_wildcards, 0);
        assert_eq!(c.max_pattern_classes, 7);
        assert_eq!(c.max_redis_patterns.get(), 5);
    }

    #[test]
    fn a_bad_value_names_the_variable_and_the_accepted_values() {
        let long_node_id = "n".repeat(65);
        for (var, value, expect) in [
            ("WSGATE_LISTEN", "nowhere", "socket address"),
            ("WSGATE_MAX_MESSAGE_BYTES", "0", "greater than 0"),
            ("WSGATE_MAX_SUBSCRIPTIONS", "-4", "whole number"),
            ("WSGATE_LOG_FORMAT", "xml", "text or json"),
            ("WSGATE_REDIS_URL", "http://x", "redis[s]+sentinel://"),
            (
                "WSGATE_REDIS_SHARDS",
                "redis://a,http://b",
                "rediss:// URLs",
            ),
            (
                "WSGATE_REDIS_SHARDS",
                "redis://a,redis://a",
                "each server once",
            ),
            ("WSGATE_WS_PATH", "ws", "absolute path"),
            ("WSGATE_LOG", "[[[", "tracing filter"),
            ("WSGATE_JWT_SECRET", "short", "32 bytes"),
            ("WSGATE_JWT_SECRET", "", "32 bytes"),
            (
                "WSGATE_JWT_PUBLIC_KEY",
                "/nonexistent.pem",
                "PEM public key",
            ),
            (
                "WSGATE_JWT_PUBLIC_KEY",
                "-----BEGIN PUBLIC KEY-----\nxx",
                "PEM public key",
            ),
            ("WSGATE_JWT_AUDIENCE", "gw", "only together"),
            ("WSGATE_ALLOW", " , ", "comma-separated"),
            ("WSGATE_AUTH_URL", "https://x/a", "http://"),
            ("WSGATE_AUTH_URL", "/relative", "http://"),
            ("WSGATE_API_KEY", "short", "16 bytes"),
            (
                "WSGATE_JWT_LEEWAY_SECS",
                "18446744073709551615",
                "at most 3600",
            ),
            ("WSGATE_ALLOWED_ORIGINS", "", "origins"),
            ("WSGATE_REQUIRE_ORIGIN", "yes", "true or false"),
            ("WSGATE_MAX_CONNECTIONS_PER_IP", "0", "greater than 0"),
            (
                "WSGATE_NEW_CONNECTIONS_PER_IP_PER_SEC",
                "",
                "greater than 0",
            ),
            ("WSGATE_TRUSTED_PROXIES", "10.0.0.0/8,proxy", "CIDR"),
            ("WSGATE_NODE_ID", "web 1", "A-Z a-z 0-9"),
            ("WSGATE_NODE_ID", long_node_id.as_str(), "1 to 64"),
            ("WSGATE_IDEMPOTENCY_TTL_MS", "0", "greater than 0"),
            ("WSGATE_MAX_PATTERNS", "0", "greater than 0"),
            ("WSGATE_MAX_PATTERNS_PER_CONNECTION", "x", "greater than 0"),
            ("WSGATE_MAX_PATTERN_WILDCARDS", "-1", "0 or more"),
            ("WSGATE_MAX_PATTERN_CLASSES", "two", "0 or more"),
            ("WSGATE_MAX_REDIS_PATTERNS", "0", "greater than 0"),
            ("WSGATE_HISTORY", "news.*:100", "glob:size:ttl"),
            ("WSGATE_HISTORY", "news.*:100:300", "ttl \"300\""),
            ("WSGATE_HISTORY", "a:1:1s,news.*:0:5m", "size \"0\""),
        ] {
            let err = vars(&[(var, value)]).unwrap_err().to_string();
            assert!(err.starts_with(var), "{err}");
            assert!(err.contains(expect), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn history_rules() {
        assert!(vars(&[]).unwrap().history.is_empty());
        let c = vars(&[("WSGATE_HISTORY", "news.*:100:300s,chat.*:10:1h")]).unwrap();
        let rule = c.history.of(b"chat.room").unwrap();
        assert_eq!((rule.size, rule.ttl), (10, Duration::from_secs(3600)));
        assert!(c.history.of(b"other").is_none());
    }

    #[test]
    fn presence_rules_and_lease() {
        let d = vars(&[]).unwrap();
        assert!(d.presence.is_empty());
        assert_eq!(d.presence_lease, Duration::from_millis(30_000));
        let c = vars(&[
            ("WSGATE_PRESENCE", "chat.*,lobby"),
            ("WSGATE_PRESENCE_LEASE_MS", "1000"),
        ])
        .unwrap();
        assert!(c.presence.covers(b"chat.a") && c.presence.covers(b"lobby"));
        assert_eq!(c.presence_lease, Duration::from_millis(1000));
        let bad = vars(&[("WSGATE_PRESENCE", "chat.*,,x")])
            .unwrap_err()
            .to_string();
        assert!(
            bad.contains("WSGATE_PRESENCE=\"chat.*,,x\" is invalid: entry 2 is empty"),
            "{bad}"
        );
        let bad = vars(&[("WSGATE_PRESENCE_LEASE_MS", "10")])
            .unwrap_err()
            .to_string();
        assert!(bad.contains("WSGATE_PRESENCE_LEASE_MS"), "{bad}");
    }

    #[test]
    fn node_id_and_idempotency_ttl() {
        let d = vars(&[]).unwrap();
        assert!(valid_node_id(&d.node_id), "{}", d.node_id);
        assert!(
            d.node_id.ends_with(&format!("-{}", std::process::id())) || d.node_id.len() == 16,
            "{}",
            d.node_id
        );
        assert_eq!(d.idempotency_ttl, Duration::from_secs(300));
        let c = vars(&[
            ("WSGATE_NODE_ID", "web-1.eu_west"),
            ("WSGATE_IDEMPOTENCY_TTL_MS", "1500"),
        ])
        .unwrap();
        assert_eq!(c.node_id, "web-1.eu_west");
        assert_eq!(c.idempotency_ttl, Duration::from_millis(1500));
    }

    #[test]
    fn secrets_never_appear_in_errors_or_debug() {
        let err = vars(&[("WSGATE_API_KEY", "hunter2")])
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        let err = vars(&[("WSGATE_JWT_SECRET", "tooshort-secret")])
            .unwrap_err()
            .to_string();
        assert!(!err.contains("tooshort"), "{err}");
        let c = vars(&[
            ("WSGATE_API_KEY", "0123456789abcdef-key"),
            ("WSGATE_JWT_SECRET", "0123456789abcdef0123456789abcdef-jwt"),
        ])
        .unwrap();
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("-key") && !debug.contains("-jwt"),
            "{debug}"
        );
    }

    #[test]
    fn security_values_are_parsed() {
        let c = vars(&[
            ("WSGATE_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
            ("WSGATE_JWT_AUDIENCE", "gw, gw2"),
            ("WSGATE_JWT_LEEWAY_SECS", "5"),
            ("WSGATE_ALLOW", "news.*, alerts"),
            ("WSGATE_AUTH_URL", "http://127.0.0.1:9/auth"),
            ("WSGATE_AUTH_CACHE_TTL_MS", "0"),
            (
                "WSGATE_ALLOWED_ORIGINS",
                "https://a.example,https://b.example/",
            ),
            ("WSGATE_MAX_CONNECTIONS_PER_IP", "10"),
            ("WSGATE_TRUSTED_PROXIES", "127.0.0.1, 10.0.0.0/8"),
        ])
        .unwrap();
        assert!(c.jwt_key.is_some());
        assert_eq!(c.jwt_audiences, ["gw", "gw2"]);
        assert_eq!(c.jwt_leeway, Duration::from_secs(5));
        assert_eq!(
            c.allow.as_deref(),
            Some(&["news.*".to_owned(), "alerts".to_owned()][..])
        );
        assert_eq!(c.auth_url.unwrap().port_u16(), Some(9));
        assert_eq!(c.auth_cache_ttl, Duration::ZERO);
        assert_eq!(
            c.allowed_origins.unwrap(),
            ["https://a.example", "https://b.example"]
        );
        assert_eq!(c.max_connections_per_ip.unwrap().get(), 10);
        assert_eq!(c.trusted_proxies.len(), 2);
        let star = vars(&[("WSGATE_ALLOWED_ORIGINS", "*")]).unwrap();
        assert_eq!(star.allowed_origins, None);
        let both = vars(&[
            ("WSGATE_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
            ("WSGATE_JWT_PUBLIC_KEY", "/x.pem"),
        ]);
        assert!(both.unwrap_err().to_string().contains("one key"));
        let d = vars(&[]).unwrap();
        assert!(d.jwt_key.is_none() && d.allow.is_none() && d.api_key.is_none());
        assert!(d.allowed_origins.is_none() && d.max_connections_per_ip.is_none());
    }

    #[test]
    fn client_publish_is_a_list_like_allow_and_empty_means_none() {
        let c = vars(&[("WSGATE_CLIENT_PUBLISH", " chat.*, alerts ,")]).unwrap();
        assert_eq!(c.client_publish, ["chat.*", "alerts"]);
        // Unset, empty or only separators: nobody may publish (never an error,
        // since none is already the most restrictive reading).
        for value in [None, Some(""), Some(" , ")] {
            let pairs: Vec<(&str, &str)> = value
                .map(|v| vec![("WSGATE_CLIENT_PUBLISH", v)])
                .unwrap_or_default();
            assert!(vars(&pairs).unwrap().client_publish.is_empty(), "{value:?}");
        }
    }

    #[test]
    fn unknown_variables_are_refused_with_the_nearest_name() {
        for (var, expect) in [
            ("WSGATE_JWT_SECRETS", "did you mean WSGATE_JWT_SECRET?"),
            ("WSGATE_APIKEY", "did you mean WSGATE_API_KEY?"),
            (
                "WSGATE_MAX_CONECTIONS",
                "did you mean WSGATE_MAX_CONNECTIONS?",
            ),
            (
                "WSGATE_ALLOWED_ORIGIN",
                "did you mean WSGATE_ALLOWED_ORIGINS?",
            ),
            (
                "WSGATE_HTTP_HEADER_TIMEOUT",
                "did you mean WSGATE_HTTP_HEADER_TIMEOUT_MS?",
            ),
            (
                "WSGATE_COMPLETELY_DIFFERENT",
                "wsgate --help lists the variables",
            ),
        ] {
            let err = vars(&[(var, "5")]).unwrap_err().to_string();
            assert_eq!(err, format!("{var} is not a wsgate variable: {expect}"));
        }
        // Lower case is what envy maps too: known, not refused.
        assert_eq!(
            vars(&[("WSGATE_max_subscriptions", "3")])
                .unwrap()
                .max_subscriptions
                .get(),
            3
        );
    }

    #[test]
    fn kubernetes_service_link_variables_are_ignored() {
        let c = vars(&[
            ("WSGATE_SERVICE_HOST", "10.96.0.12"),
            ("WSGATE_SERVICE_PORT", "80"),
            ("WSGATE_SERVICE_PORT_HTTP", "80"),
            ("WSGATE_PORT", "tcp://10.96.0.12:80"),
            ("WSGATE_PORT_80_TCP", "tcp://10.96.0.12:80"),
            ("WSGATE_PORT_80_TCP_PROTO", "tcp"),
            ("WSGATE_PORT_80_TCP_PORT", "80"),
            ("WSGATE_PORT_80_TCP_ADDR", "10.96.0.12"),
        ])
        .unwrap();
        assert_eq!(format!("{c:?}"), format!("{:?}", Config::default()));
        // Only those prefixes: a near miss of them is still refused.
        assert!(vars(&[("WSGATE_PORTS", "1")]).is_err());
    }

    #[test]
    fn the_known_names_come_from_the_raw_config() {
        let fields = raw_fields();
        assert!(fields.len() >= 40, "{fields:?}");
        for f in [
            "listen",
            "jwt_secret",
            "api_key",
            "max_connections",
            "log_format",
        ] {
            assert!(fields.contains(&f), "{f}");
        }
        assert!(known_variables().contains(&"WSGATE_HTTP_HEADER_TIMEOUT_MS".to_owned()));
    }

    #[test]
    fn every_variable_has_exactly_one_help_row() {
        let fields = raw_fields();
        for f in fields {
            let rows = HELP.iter().filter(|h| h.field == *f).count();
            assert_eq!(
                rows,
                1,
                "WSGATE_{}: add one row to HELP",
                f.to_ascii_uppercase()
            );
        }
        for h in HELP {
            assert!(
                fields.contains(&h.field),
                "HELP row {} is not a variable",
                h.field
            );
        }
        let text = help_text();
        for name in known_variables() {
            assert!(text.contains(&name), "{name} missing from --help");
        }
        assert!(!text.contains("(see README.md)"), "{text}");
    }

    #[test]
    fn every_help_default_is_the_real_default() {
        let normal = |mut c: Config| {
            c.max_connections_set = false;
            c.max_pending_connections_set = false;
            format!("{c:?}")
        };
        let default = normal(Config::default());
        for h in HELP.iter().filter(|h| !h.default.is_empty()) {
            let var = format!("WSGATE_{}", h.field.to_ascii_uppercase());
            let c = vars(&[(&var, h.default)]).unwrap_or_else(|e| panic!("{var}: {e}"));
            assert_eq!(normal(c), default, "{var}={} is not the default", h.default);
        }
    }

    #[test]
    fn the_readme_documents_every_variable() {
        let readme = include_str!("../README.md");
        let section = readme
            .split("## Configuration")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .unwrap_or_default();
        let mut documented: Vec<String> = section
            .lines()
            .filter_map(|l| l.strip_prefix("| `WSGATE_"))
            .filter_map(|l| l.split('`').next())
            .map(|n| format!("WSGATE_{n}"))
            .collect();
        documented.sort();
        let mut known = known_variables();
        known.sort();
        assert_eq!(documented, known, "README's Configuration table");
    }

    #[test]
    fn http_hardening_values_are_parsed() {
        let c = vars(&[
            ("WSGATE_HTTP_HEADER_TIMEOUT_MS", "250"),
            ("WSGATE_HTTP_BODY_TIMEOUT_MS", "300"),
            ("WSGATE_MAX_PENDING_CONNECTIONS", "7"),
            ("WSGATE_MAX_PUBLISH_BYTES", "99"),
            ("WSGATE_MAX_CONNECTIONS", "20000"),
        ])
        .unwrap();
        assert_eq!(c.http_header_timeout, Duration::from_millis(250));
        assert_eq!(c.http_body_timeout, Duration::from_millis(300));
        assert_eq!(c.max_pending_connections.get(), 7);
        assert!(c.max_pending_connections_set);
        assert_eq!(c.max_publish_bytes.get(), 99);
        assert!(c.max_connections_set);
        let d = vars(&[]).unwrap();
        assert!(!d.max_connections_set && !d.max_pending_connections_set);
        assert_eq!(d.max_publish_bytes.get(), 1 << 20);
        assert_eq!(d.http_header_timeout, Duration::from_secs(10));
        for var in [
            "WSGATE_HTTP_HEADER_TIMEOUT_MS",
            "WSGATE_MAX_PENDING_CONNECTIONS",
        ] {
            assert!(vars(&[(var, "0")]).is_err(), "{var}");
        }
    }
}
