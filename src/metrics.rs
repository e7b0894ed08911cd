//! Prometheus metrics, served as text on `GET /metrics`.
//!
//! One [`Metrics`] per server, built on its own registry (not the global one) so
//! several gateways in one test process do not share counters. Handles are
//! cheap clones of atomics; the hot path only ever does `inc_by` once per
//! batch, never per subscriber.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// Every `reason` of `wsgate_refused_total`, exported at 0 from the start so
/// dashboards and alerts see the series before the first refusal:
/// `max_connections`, `draining` (upgrade 503), `rate_limited` (subscribe),
/// `unauthorized` (upgrade 401), `origin` (upgrade 403), `ip_rate`,
/// `ip_connections`, `ip_table_full` (upgrade 429), `not_allowed` (subscribe
/// outside the ACLs), `publish_not_allowed` (a client publish outside
/// `WSGATE_CLIENT_PUBLISH` or the token's `publish` claim: its own reason, so
/// an operator tells refused writes from refused reads), `authz_denied`,
/// `authz_unavailable` (callback),
/// `api_key` (publish 401), `token_expired` (connection closed with 4001),
/// `max_pending` (a connection accepted beyond `WSGATE_MAX_PENDING_CONNECTIONS`,
/// answered 503 and closed), `connect_auth` (the connect backend refused)
/// and `connect_auth_unavailable` (it gave no usable answer: 503),
/// `call_not_allowed` and `calls_in_flight` (calls), `tcp_service_limit`
/// (a nodefony TCP backend connection beyond its per-client or per-node
/// bound). The pattern cost limits add theirs
/// ([`crate::pattern_cost::REASONS`]).
pub const REFUSAL_REASONS: [&str; 20] = [
    "call_not_allowed",
    "calls_in_flight",
    "tcp_service_limit",
    "connect_auth",
    "connect_auth_unavailable",
    "max_connections",
    "draining",
    "rate_limited",
    "unauthorized",
    "origin",
    "ip_rate",
    "ip_connections",
    "ip_table_full",
    "not_allowed",
    "publish_not_allowed",
    "authz_denied",
    "authz_unavailable",
    "api_key",
    "token_expired",
    "max_pending",
];

/// Every `phase` of `wsgate_http_timeouts_total`: `headers` (a request head
/// not complete within `WSGATE_HTTP_HEADER_TIMEOUT_MS`, including a silent
/// or idle kept-alive connection) and `body` (a publish body not complete
/// within `WSGATE_HTTP_BODY_TIMEOUT_MS`).
pub const HTTP_TIMEOUT_PHASES: [&str; 2] = ["headers", "body"];

/// Every `outcome` of `wsgate_connect_auth_total`: `allowed` and `refused`
/// (the backend answered), `cached_allowed` and `cached_refused` (a cached
/// verdict), `unavailable` (no usable answer in time: refused with 503).
pub const CONNECT_AUTH_OUTCOMES: [&str; 5] = [
    "allowed",
    "refused",
    "cached_allowed",
    "cached_refused",
    "unavailable",
];

/// Every metric the gateway exports. Names are documented in the README.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `wsgate_connections`: open WebSocket connections.
    pub connections: IntGauge,
    /// `wsgate_local_subscriptions{kind}`: subscriptions held on this node:
    /// its clients', and the services router's eight channels
    /// (`docs/services.md`).
    pub local_subscriptions: IntGaugeVec,
    /// `wsgate_broker_subscriptions{kind}`: distinct channels/patterns the
    /// broker holds for this node (after refcounting).
    pub broker_subscriptions: IntGaugeVec,
    /// `wsgate_broker_messages_total`: messages received from the broker.
    pub broker_messages: IntCounter,
    /// `wsgate_broker_messages_dropped_total`: messages dropped because the
    /// dispatcher could not keep up (its bounded buffer was full).
    pub broker_messages_dropped: IntCounter,
    /// `wsgate_broker_up{link}`: 1 while that broker link (one Redis pub/sub
    /// connection) is connected, else 0. Links are `0`..`K-1` on one Redis and
    /// `s<shard>.<i>` with `WSGATE_REDIS_SHARDS` (`i` 0: the shard's exact
    /// channels; 1..: its share of every pattern), so a partial outage shows
    /// which connection is down while `/readyz` stays 200.
    pub broker_up: IntGaugeVec,
    /// `wsgate_broker_links_up`: the broker's links (Redis pub/sub
    /// connections) connected now; below `WSGATE_REDIS_PUBSUB_CONNECTIONS`
    /// during a partial outage.
    pub broker_links_up: IntGauge,
    /// `wsgate_frames_out_total`: WebSocket frames written to clients.
    pub frames_out: IntCounter,
    /// `wsgate_slow_consumer_closes_total`: connections closed with 4008.
    pub slow_consumer_closes: IntCounter,
    /// `wsgate_publish_requests_total`: HTTP publish requests (each batch counts once).
    pub publish_requests: IntCounter,
    /// `wsgate_malformed_frames_total`: client frames answered with an error.
    pub malformed_frames: IntCounter,
    /// `wsgate_broker_state{state}`: 1 for the broker link's current state
    /// (`connected`, `down`, `reconnecting`, `resyncing`), 0 for the others.
    pub broker_state: IntGaugeVec,
    /// `wsgate_broker_reconnects_total`: broker connections made after the first.
    pub broker_reconnects: IntCounter,
    /// `wsgate_broker_resync_seconds`: time from a (re)connect until every
    /// wanted subscription was confirmed again.
    pub broker_resync_seconds: Histogram,
    /// `wsgate_gap_notices_total`: `interrupted`/`resumed` notices sent to clients.
    pub gap_notices: IntCounter,
    /// `wsgate_gap_healed_total`: messages delivered by gap healing (read
    /// from history after an outage, per topic that missed them).
    pub gap_healed: IntCounter,
    /// `wsgate_subscribes_held`: subscribe requests waiting for the broker.
    pub subscribes_held: IntGauge,
    /// `wsgate_refused_total{reason}`: requests refused by a limit or a
    /// security check; the reasons are [`REFUSAL_REASONS`].
    pub refused: IntCounterVec,
    /// `wsgate_hub_lock_hold_seconds`: how long each hold of the hub's
    /// registry lock lasted (nothing under it may grow with member counts).
    pub hub_lock_hold: Histogram,
    /// `wsgate_hub_lock_hold_max_seconds`: the longest such hold since start.
    pub hub_lock_hold_max: Gauge,
    /// `wsgate_gap_marks_seconds`: time to place an `interrupted` (or
    /// `resumed`) mark in every session's queue when the broker link drops
    /// (or the resync ends): the moment every notice has its place.
    pub gap_marks_seconds: Histogram,
    /// `wsgate_broker_refusals_total`: subscriptions the broker refused (e.g.
    /// a Redis ACL); their subscribers are told, everyone else is unaffected.
    pub broker_refusals: IntCounter,
    /// `wsgate_deliveries_too_large_total`: broker messages not delivered
    /// because their frame exceeded `WSGATE_MAX_DELIVERY_BYTES`.
    pub deliveries_too_large: IntCounter,
    /// `wsgate_pending_connections`: accepted connections not (yet)
    /// upgraded: requests being read, keep-alive between requests.
    pub pending_connections: IntGauge,
    /// `wsgate_max_connections`: the WebSocket connection cap in force
    /// (`WSGATE_MAX_CONNECTIONS`, or lower when the fd limit cannot hold it).
    pub max_connections: IntGauge,
    /// `wsgate_http_timeouts_total{phase}`: connections closed by a
    /// pre-session deadline; the phases are [`HTTP_TIMEOUT_PHASES`].
    pub http_timeouts: IntCounterVec,
    /// `wsgate_redis_numpat`: `PUBSUB NUMPAT` as Redis last reported it
    /// (distinct patterns over every client of that Redis, not just this
    /// node), polled every `WSGATE_REDIS_PROBE_INTERVAL_MS`; with the
    /// embedded broker, the patterns it holds.
    pub redis_numpat: IntGauge,
    /// `wsgate_connect_auth_total{outcome}`: handshakes put to the connect
    /// backend ([`CONNECT_AUTH_OUTCOMES`]).
    pub connect_auth: IntCounterVec,
    /// `wsgate_connect_auth_seconds`: how long the connect backend took to
    /// answer (calls only, not cache hits; timeouts count at the timeout).
    pub connect_auth_seconds: Histogram,
    /// `wsgate_redis_patterns`: patterns this node holds in Redis after
    /// coalescing (at most `WSGATE_MAX_REDIS_PATTERNS`, plus any being
    /// replaced by a wider one at that moment).
    pub redis_patterns: IntGauge,
}

impl Metrics {
    /// Creates and registers every metric on a fresh registry.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let m = Metrics {
            connections: IntGauge::new("wsgate_connections", "Open WebSocket connections")
                .unwrap_or_else(never),
            local_subscriptions: IntGaugeVec::new(
                Opts::new(
                    "wsgate_local_subscriptions",
                    "Client subscriptions held on this node",
                ),
                &["kind"],
            )
            .unwrap_or_else(never),
            broker_subscriptions: IntGaugeVec::new(
                Opts::new(
                    "wsgate_broker_subscriptions",
                    "Distinct channels/patterns the broker holds for this node",
                ),
                &["kind"],
            )
            .unwrap_or_else(never),
            broker_messages: IntCounter::new(
                "wsgate_broker_messages_total",
                "Messages received from the broker",
            )
            .unwrap_or_else(never),
            broker_messages_dropped: IntCounter::new(
                "wsgate_broker_messages_dropped_total",
                "Broker messages dropped because dispatch could not keep up",
            )
            .unwrap_or_else(never),
            broker_links_up: IntGauge::new(
                "wsgate_broker_links_up",
                "broker links (Redis pub/sub connections) connected now",
            )
            .unwrap_or_else(never),
            broker_up: IntGaugeVec::new(
                Opts::new("wsgate_broker_up", "1 while that broker link is connected"),
                &["link"],
            )
            .unwrap_or_else(never),
            frames_out: IntCounter::new(
                "wsgate_frames_out_total",
                "WebSocket frames written to clients",
            )
            .unwrap_or_else(never),
            slow_consumer_closes: IntCounter::new(
                "wsgate_slow_consumer_closes_total",
                "Connections closed with 4008 because their queue overflowed",
            )
            .unwrap_or_else(never),
            publish_requests: IntCounter::new(
                "wsgate_publish_requests_total",
                "HTTP publish requests",
            )
            .unwrap_or_else(never),
            malformed_frames: IntCounter::new(
                "wsgate_malformed_frames_total",
                "Client frames answered with an error",
            )
            .unwrap_or_else(never),
            broker_state: IntGaugeVec::new(
                Opts::new(
                    "wsgate_broker_state",
                    "1 for the broker link's current state",
                ),
                &["state"],
            )
            .unwrap_or_else(never),
            broker_reconnects: IntCounter::new(
                "wsgate_broker_reconnects_total",
                "Broker connections made after the first",
            )
            .unwrap_or_else(never),
            broker_resync_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "wsgate_broker_resync_seconds",
                    "Time from a broker (re)connect until every wanted subscription was confirmed",
                )
                .buckets(vec![
                    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
            )
            .unwrap_or_else(never),
            gap_healed: IntCounter::new(
                "wsgate_gap_healed_total",
                "Messages delivered by gap healing, read from history",
            )
            .unwrap_or_else(never),
            gap_notices: IntCounter::new("wsgate_gap_notices_total", "Gap notices sent to clients")
                .unwrap_or_else(never),
            subscribes_held: IntGauge::new(
                "wsgate_subscribes_held",
                "Subscribe requests waiting for the broker",
            )
            .unwrap_or_else(never),
            refused: IntCounterVec::new(
                Opts::new(
                    "wsgate_refused_total",
                    "Requests refused by a limit or a security check",
                ),
                &["reason"],
            )
            .unwrap_or_else(never),
            hub_lock_hold: Histogram::with_opts(
                HistogramOpts::new(
                    "wsgate_hub_lock_hold_seconds",
                    "How long each hold of the hub's registry lock lasted",
                )
                .buckets(vec![
                    1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2, 0.1,
                ]),
            )
            .unwrap_or_else(never),
            hub_lock_hold_max: Gauge::new(
                "wsgate_hub_lock_hold_max_seconds",
                "Longest hold of the hub's registry lock since start",
            )
            .unwrap_or_else(never),
            gap_marks_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "wsgate_gap_marks_seconds",
                    "Time to place an outage mark in every session's queue",
                )
                .buckets(vec![1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0]),
            )
            .unwrap_or_else(never),
            broker_refusals: IntCounter::new(
                "wsgate_broker_refusals_total",
                "Subscriptions the broker refused",
            )
            .unwrap_or_else(never),
            deliveries_too_large: IntCounter::new(
                "wsgate_deliveries_too_large_total",
                "Broker messages not delivered because they exceed WSGATE_MAX_DELIVERY_BYTES",
            )
            .unwrap_or_else(never),
            pending_connections: IntGauge::new(
                "wsgate_pending_connections",
                "Accepted connections not (yet) upgraded to a WebSocket",
            )
            .unwrap_or_else(never),
            max_connections: IntGauge::new(
                "wsgate_max_connections",
                "WebSocket connection cap in force on this node",
            )
            .unwrap_or_else(never),
            http_timeouts: IntCounterVec::new(
                Opts::new(
                    "wsgate_http_timeouts_total",
                    "Connections closed by a deadline before becoming a session",
                ),
                &["phase"],
            )
            .unwrap_or_else(never),
            redis_numpat: IntGauge::new(
                "wsgate_redis_numpat",
                "PUBSUB NUMPAT as Redis last reported it",
            )
            .unwrap_or_else(never),
            redis_patterns: IntGauge::new(
                "wsgate_redis_patterns",
                "Patterns this node holds in Redis after coalescing",
            )
            .unwrap_or_else(never),
            connect_auth: IntCounterVec::new(
                Opts::new(
                    "wsgate_connect_auth_total",
                    "Handshakes put to the connect backend, by outcome",
                ),
                &["outcome"],
            )
            .unwrap_or_else(never),
            connect_auth_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "wsgate_connect_auth_seconds",
                    "Time the connect backend took to answer",
                )
                .buckets(vec![
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
            )
            .unwrap_or_else(never),
            registry,
        };
        m.register_all();
        m
    }

    fn register_all(&self) {
        let collectors: [Box<dyn prometheus::core::Collector>; 30] = [
            Box::new(self.connect_auth.clone()),
            Box::new(self.connect_auth_seconds.clone()),
            Box::new(self.connections.clone()),
            Box::new(self.local_subscriptions.clone()),
            Box::new(self.broker_subscriptions.clone()),
            Box::new(self.broker_messages.clone()),
            Box::new(self.broker_messages_dropped.clone()),
            Box::new(self.broker_up.clone()),
            Box::new(self.broker_links_up.clone()),
            Box::new(self.frames_out.clone()),
            Box::new(self.slow_consumer_closes.clone()),
            Box::new(self.publish_requests.clone()),
            Box::new(self.malformed_frames.clone()),
            Box::new(self.broker_state.clone()),
            Box::new(self.broker_reconnects.clone()),
            Box::new(self.broker_resync_seconds.clone()),
            Box::new(self.gap_notices.clone()),
            Box::new(self.gap_healed.clone()),
            Box::new(self.subscribes_held.clone()),
            Box::new(self.refused.clone()),
            Box::new(self.hub_lock_hold.clone()),
            Box::new(self.hub_lock_hold_max.clone()),
            Box::new(self.gap_marks_seconds.clone()),
            Box::new(self.broker_refusals.clone()),
            Box::new(self.deliveries_too_large.clone()),
            Box::new(self.pending_connections.clone()),
            Box::new(self.max_connections.clone()),
            Box::new(self.http_timeouts.clone()),
            Box::new(self.redis_numpat.clone()),
            Box::new(self.redis_patterns.clone()),
        ];
        for c in collectors {
            // Names are distinct constants on a fresh registry: this cannot fail.
            let _ = self.registry.register(c);
        }
        for kind in ["channel", "pattern"] {
            self.local_subscriptions.with_label_values(&[kind]).set(0);
            self.broker_subscriptions.with_label_values(&[kind]).set(0);
        }
        for reason in REFUSAL_REASONS.iter().chain(&crate::pattern_cost::REASONS) {
            self.refused.with_label_values(&[reason]).inc_by(0);
        }
        for outcome in CONNECT_AUTH_OUTCOMES {
            self.connect_auth.with_label_values(&[outcome]).inc_by(0);
        }
        for phase in HTTP_TIMEOUT_PHASES {
            self.http_timeouts.with_label_values(&[phase]).inc_by(0);
        }
    }

    /// Adds a collector of another module (the services router's) to this
    /// server's registry; a duplicate name is ignored.
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) {
        let _ = self.registry.register(collector);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec only fails on invalid metric families, which the
        // constants above are not; an empty body is the safe fallback.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Metric constructors only fail on invalid names or label sets, which are
/// compile-time constants here; reaching this is a programming error.
fn never<T>(e: prometheus::Error) -> T {
    unreachable!("invalid metric definition: {e}")
}
