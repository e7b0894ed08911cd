//! wsgate: a horizontally scaled WebSocket gateway over Redis pub/sub.
//!
//! Clients connect over WebSocket and subscribe to exact channels or Redis
//! glob patterns. Each node refcounts those interests and mirrors them into
//! Redis (`SUBSCRIBE` / `PSUBSCRIBE`) once per node, then fans every Redis
//! message out to its sockets: rendered once, the same bytes queued to every
//! subscriber. Anyone publishes with `redis-cli PUBLISH` or `POST /publish`.
//! Run N nodes behind any load balancer; Redis is the only shared state.
//!
//! # Layout
//!
//! - [`config`]: the one `Config`, read from `WSGATE_*` variables.
//! - [`server`]: listener, accept loop, shutdown sequence.
//! - [`shutdown`]: the process stop signal (Ctrl-C or SIGTERM).
//! - [`app`]: what every route and transport shares (hub, config, gates).
//! - [`http`]: warp routes: the endpoints, publish, health, metrics.
//! - [`transport`]: WebSocket upgrades and Bayeux long-polling, behind one
//!   admission.
//! - [`auth`]: JWT verification into an `Identity`; the API key comparison.
//! - [`acl`]: the allow rule for channels and patterns (token claims,
//!   `WSGATE_ALLOW`, `WSGATE_CLIENT_PUBLISH`).
//! - [`publish`]: what `POST /publish` and a client's own publish share: the
//!   payload rule, who may publish over a socket, the broker path.
//! - [`authz`]: the subscribe authorisation callback and its bounded cache.
//! - [`connect_auth`]: the connect backend (`WSGATE_CONNECT_AUTH_URL`) every
//!   handshake may be put to; [`ttl_cache`]: the bounded cache both share.
//! - [`forwarded`]: the client's address, through trusted proxies' `X-Forwarded-For`.
//! - [`limits`]: per-address connection count and connection rate.
//! - [`pending`]: connections not yet upgraded: their node-wide cap and refusals.
//! - [`fdlimit`]: raising the open-file limit and fitting the connection caps in it.
//! - [`session`]: one client session over its links (a WebSocket, long-polls),
//!   dialect-blind: limits, ACLs, the callback, hub calls.
//! - [`outbox`]: a connection's byte-bounded queue of shared frames and gap marks.
//! - [`deflate`]: permessage-deflate: the offer, deliveries deflated once per
//!   message, client messages inflated under the WebSocket library.
//! - [`protocol`]: the dialect contract (`Conversation`, `Render`, requests and
//!   answers), the native JSON dialect and Bayeux.
//! - [`history`]: `WSGATE_HISTORY` rules, offsets and epochs, the Redis envelope.
//! - [`hub`]: per-node registry, refcounts, reconciler and fan-out.
//! - [`rpc`]: services: the directory of instances (Redis with leases, or
//!   memory), calls routed across nodes over node channels, the events.
//! - [`broker`]: the `Broker` trait; Redis and in-memory implementations.
//! - [`handoff`]: fresh Bayeux sessions adoptable by exactly one node (Redis
//!   `GETDEL`, or in memory).
//! - [`pattern`]: Redis's glob matcher, for the in-memory broker.
//! - [`pattern_cost`]: pattern shape and count limits; what Redis may hold cheaply.
//! - [`metrics`]: Prometheus metrics.
//! - [`client`]: a reconnecting native-protocol client (tests, load, services).
//! - [`backoff`]: jittered exponential reconnect delays (broker and client).
//! - [`jsonrpc`]: the JSON-RPC 2.0 codec of Bayeux's `/service/<name>` calls.
//!
//! # What it does not do
//!
//! It stores no messages except for channels configured for history
//! (`WSGATE_HISTORY`, `docs/history.md`): Redis pub/sub is at-most-once, and
//! so is wsgate elsewhere (calls too are at most once, `docs/services.md`).
//! It does not speak Redis Cluster's sharded pub/sub, TLS to Redis, or
//! HTTP/2 WebSockets, and does not terminate TLS itself (put it behind a TLS
//! proxy). Every dialect (native, Bayeux for Faye, CometD and nodefony,
//! realizehit over Engine.IO, RoadRunner, SocketStream, SSE) is served by
//! the same sessions (`docs/dialects/`). Security (tokens, ACLs, the
//! callback, limits) is described in `docs/security.md`.
// The HTTP routes' future is deeply nested (warp filters): laid out here
// (server::spawn_connection), it needs more than the default 128.
#![recursion_limit = "256"]

pub mod acl;
pub mod app;
pub mod auth;
pub mod authz;
pub mod backoff;
pub mod broker;
pub mod client;
pub mod config;
pub mod connect_auth;
pub mod deflate;
pub mod fdlimit;
pub mod forwarded;
pub mod handoff;
pub mod history;
pub mod http;
pub mod hub;
pub mod jsonrpc;
pub mod limits;
pub mod metrics;
pub mod outbox;
pub mod pattern;
pub mod pattern_cost;
pub mod pending;
pub mod presence;
pub mod protocol;
pub mod publish;
pub mod read_rate;
pub mod rpc;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod transport;
pub mod ttl_cache;

pub use config::Config;
