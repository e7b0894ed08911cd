//! The HTTP surface, served by warp on the listening port.
//!
//! - `GET <WSGATE_WS_PATH>`: the WebSocket upgrade. We answer the handshake
//!   ourselves (from hyper's upgrade handle) instead of using warp's `ws()`
//!   filter, because that filter fixes tungstenite's 128 KiB per-socket read
//!   buffer; ours comes from the config (see `docs/design.md`).
//!   Before the upgrade, in this order: the `Origin` (403), draining (503),
//!   the client address's connection rate (429), the token (401), the
//!   address's open connections (429), the node's connections (503). Rate
//!   comes before the token so that guessing tokens is throttled too.
//! - `POST /publish`: publish one message or a batch through the broker;
//!   with `WSGATE_API_KEY`, only with `Authorization: Bearer <key>` (401
//!   before the body is read).
//! - `GET /healthz` (process alive), `GET /readyz` (broker connected and
//!   synced), `GET /metrics` (Prometheus text).
//!
//! Every refusal is a JSON body `{"error": "..."}` with a fitting status.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, Instrument};
use warp::http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use warp::{Filter, Rejection};

use crate::acl::Acl;
use crate::auth::{self, AuthError, Identity, Verifier};
use crate::authz::Authz;
use crate::config::Config;
use crate::forwarded;
use crate::hub::Hub;
use crate::limits::{IpLimits, IpRefusal, IpSlot};
use crate::metrics::Metrics;
use crate::protocol::{native::Native, Dialect};
use crate::session::{self, SessionContext};
use crate::shutdown::Phase;

/// What every route needs, shared by all connections.
pub struct App {
    /// The node's hub.
    pub hub: Hub,
    /// Server metrics.
    pub metrics: Metrics,
    /// Validated configuration.
    pub config: Config,
    /// Running, draining or stopping; sessions and connections watch it.
    pub phase: watch::Sender<Phase>,
    /// Live sessions. A watch (not an atomic) so shutdown can wait for zero;
    /// changed once per connect and disconnect, never per message.
    pub sessions: watch::Sender<usize>,
    /// Token verification, when a JWT key is configured.
    pub verifier: Option<Arc<Verifier>>,
    /// `WSGATE_ALLOW`, when set.
    pub allow: Option<Arc<Acl>>,
    /// The subscribe authorisation callback, when configured.
    pub authz: Option<Arc<Authz>>,
    /// Per-address connection limits.
    pub ip_limits: IpLimits,
}

/// Holds one of the `WSGATE_MAX_CONNECTIONS` places; gives it back on drop.
pub struct SessionSlot {
    sessions: watch::Sender<usize>,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.sessions.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl App {
    /// Shared state for a freshly started server.
    pub fn new(hub: Hub, metrics: Metrics, config: Config) -> App {
        let verifier = config.jwt_key.as_ref().map(|key| {
            Arc::new(Verifier::new(
                key,
                &config.jwt_audiences,
                &config.jwt_issuers,
                config.jwt_leeway,
            ))
        });
        let allow = config
            .allow
            .as_ref()
            .map(|entries| Arc::new(Acl::new(entries)));
        let authz = config.auth_url.as_ref().map(|url| {
            Arc::new(Authz::new(
                url.clone(),
                config.auth_timeout,
                config.auth_cache_ttl,
                config.auth_cache_entries.get(),
            ))
        });
        let ip_limits = IpLimits::new(
            config.max_connections_per_ip,
            config.new_connections_per_ip_per_sec,
            config.max_tracked_ips,
        );
        App {
            hub,
            metrics,
            config,
            phase: watch::Sender::new(Phase::Running),
            sessions: watch::Sender::new(0),
            verifier,
            allow,
            authz,
            ip_limits,
        }
    }

    /// Takes a session place, unless the node is full.
    fn admit(&self) -> Option<SessionSlot> {
        let max = self.config.max_connections.get();
        let admitted = self.sessions.send_if_modified(|n| {
            if *n >= max {
                return false;
            }
            *n += 1;
            true
        });
        admitted.then(|| SessionSlot {
            sessions: self.sessions.clone(),
        })
    }

    fn session_context(
        &self,
        slot: SessionSlot,
        ip_slot: IpSlot,
        client_ip: IpAddr,
        identity: Option<Identity>,
    ) -> SessionContext {
        SessionContext {
            ip_slot,
            client_ip,
            identity,
            verifier: self.verifier.clone(),
            allow: self.allow.clone(),
            authz: self.authz.clone(),
            hub: self.hub.clone(),
            metrics: self.metrics.clone(),
            phase: self.phase.subscribe(),
            slot,
            max_subscriptions: self.config.max_subscriptions.get(),
            max_pattern_bytes: self.config.max_pattern_bytes.get(),
            pattern_limits: crate::pattern_cost::PatternLimits {
                max_wildcards: self.config.max_pattern_wildcards,
                max_classes: self.config.max_pattern_classes,
                max_per_connection: self.config.max_patterns_per_connection.get(),
            },
            queue_bytes: self.config.client_queue_bytes.get(),
            subscribe_timeout: self.config.subscribe_timeout,
            subscribe_rate: self.config.subscribe_rate.get(),
            ping_interval: self.config.ping_interval,
            pong_timeout: self.config.pong_timeout,
        }
    }

    fn ws_config(&self) -> WebSocketConfig {
        let max = self.config.max_message_bytes.get();
        WebSocketConfig::default()
            .read_buffer_size(self.config.ws_read_buffer_bytes.get())
            .max_message_size(Some(max))
            .max_frame_size(Some(max))
            // Frames are batched by the session and flushed once per batch.
            .write_buffer_size(WRITE_BUFFER_BYTES)
    }
}

/// Outbound bytes tungstenite gathers before writing to the socket within
/// one batch: large enough that a burst goes out in few syscalls, and it is
/// only allocated on sockets that actually receive traffic.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// All routes, for a connection from `peer`.
pub fn routes(
    app: Arc<App>,
    peer: SocketAddr,
) -> impl Filter<Extract = (warp::reply::Response,), Error = std::convert::Infallible> + Clone {
    let with_app = {
        let app = app.clone();
        warp::any().map(move || app.clone())
    };
    let ws = warp::get()
        .and(warp::path::full())
        .and(with_app.clone())
        .and_then(|path: warp::path::FullPath, app: Arc<App>| async move {
            if path.as_str() == app.config.ws_path {
                Ok(app)
            } else {
                Err(warp::reject::not_found())
            }
        })
        .and(warp::header::headers_cloned())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::ext::optional::<OnUpgrade>())
        .map(
            move |app: Arc<App>, headers: HeaderMap, query: String, upgrade: Option<OnUpgrade>| {
                upgrade_ws(app, &headers, &query, upgrade, peer)
            },
        );
    let publish = warp::post()
        .and(warp::path("publish"))
        .and(warp::path::end())
        .and(with_app.clone())
        .and(warp::header::headers_cloned())
        .and_then(|app: Arc<App>, headers: HeaderMap| async move {
            if publish_authorised(&app, &headers) {
                Ok(app)
            } else {
                app.metrics.refused.with_label_values(&["api_key"]).inc();
                Err(warp::reject::custom(Unauthorised))
            }
        })
        .and(warp::body::content_length_limit(
            app.config.max_message_bytes.get() as u64,
        ))
        .and(warp::body::bytes())
        .then(publish);
    let healthz = warp::get()
        .and(warp::path("healthz"))
        .and(warp::path::end())
        .map(|| json(StatusCode::OK, r#"{"status":"ok"}"#));
    let readyz = warp::get()
        .and(warp::path("readyz"))
        .and(warp::path::end())
        .and(with_app.clone())
        .map(|app: Arc<App>| {
            if app.hub.is_ready() && *app.phase.borrow() == Phase::Running {
                json(StatusCode::OK, r#"{"ready":true}"#)
            } else {
                json(StatusCode::SERVICE_UNAVAILABLE, r#"{"ready":false}"#)
            }
        });
    let metrics = warp::get()
        .and(warp::path("metrics"))
        .and(warp::path::end())
        .and(with_app.clone())
        .map(|app: Arc<App>| {
            let mut res = Response::new(app.metrics.render().into());
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            res
        });
    let limit = app.config.max_message_bytes.get() as u64;
    warp::any()
        .and(
            ws.or(publish)
                .unify()
                .or(healthz)
                .unify()
                .or(readyz)
                .unify()
                .or(metrics)
                .unify(),
        )
        .recover(move |rejection| recover(rejection, limit))
        .unify()
}

/// A response with a JSON body.
fn json(status: StatusCode, body: impl Into<String>) -> warp::reply::Response {
    let mut res = Response::new(body.into().into());
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

fn json_error(status: StatusCode, error: &str) -> warp::reply::Response {
    json(status, serde_json::json!({ "error": error }).to_string())
}

/// A 401 with the RFC 6750 challenge header.
fn unauthorised(error: &str, challenge: &'static str) -> warp::reply::Response {
    let mut res = json_error(StatusCode::UNAUTHORIZED, error);
    res.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    res
}

/// A publish without the right API key.
#[derive(Debug)]
struct Unauthorised;

impl warp::reject::Reject for Unauthorised {}

/// Does this publish carry `Authorization: Bearer <WSGATE_API_KEY>`? Always
/// true when no key is configured.
fn publish_authorised(app: &App, headers: &HeaderMap) -> bool {
    let Some(key) = &app.config.api_key else {
        return true;
    };
    match auth::bearer(headers) {
        Ok(Some(given)) => auth::secrets_equal(given.as_bytes(), key.expose()),
        _ => false,
    }
}

/// Is the request's `Origin` acceptable? Only one `Origin` header is; a
/// missing one is unless `WSGATE_REQUIRE_ORIGIN` (non-browser clients send
/// none, and a browser always sends one on a WebSocket).
fn origin_allowed(config: &Config, headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(header::ORIGIN).iter();
    let (origin, repeated) = (values.next(), values.next().is_some());
    match (origin, repeated) {
        (_, true) => false,
        (None, false) => !config.require_origin,
        (Some(origin), false) => config.allowed_origins.as_ref().is_none_or(|allowed| {
            origin
                .to_str()
                .is_ok_and(|o| allowed.iter().any(|a| a.eq_ignore_ascii_case(o)))
        }),
    }
}

async fn recover(
    rejection: Rejection,
    limit: u64,
) -> Result<warp::reply::Response, std::convert::Infallible> {
    Ok(if rejection.find::<Unauthorised>().is_some() {
        unauthorised(
            "a valid API key is required: Authorization: Bearer <key>",
            "Bearer realm=\"wsgate\"",
        )
    } else if rejection.is_not_found() {
        json_error(StatusCode::NOT_FOUND, "not found")
    } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("body larger than {limit} bytes"),
        )
    } else if rejection.find::<warp::reject::LengthRequired>().is_some() {
        json_error(
            StatusCode::LENGTH_REQUIRED,
            "a Content-Length header is required",
        )
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        json_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
    } else {
        debug!(?rejection, "unhandled rejection");
        json_error(StatusCode::BAD_REQUEST, "bad request")
    })
}

/// Answers the WebSocket handshake and starts the session once hyper hands
/// over the connection.
fn upgrade_ws(
    app: Arc<App>,
    headers: &HeaderMap,
    query: &str,
    upgrade: Option<OnUpgrade>,
    peer: SocketAddr,
) -> warp::reply::Response {
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has(header::CONNECTION, "upgrade") || !has(header::UPGRADE, "websocket") {
        return json_error(
            StatusCode::BAD_REQUEST,
            "expected a WebSocket upgrade request",
        );
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        let mut res = json_error(
            StatusCode::BAD_REQUEST,
            "unsupported WebSocket version: expected 13",
        );
        res.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return res;
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return json_error(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
    };
    let Some(upgrade) = upgrade else {
        return json_error(StatusCode::BAD_REQUEST, "connection cannot be upgraded");
    };
    let client_ip = forwarded::client_ip(peer.ip(), headers, &app.config.trusted_proxies);
    if !origin_allowed(&app.config, headers) {
        app.metrics.refused.with_label_values(&["origin"]).inc();
        debug!(%client_ip, "upgrade refused: origin");
        return json_error(StatusCode::FORBIDDEN, "origin not allowed");
    }
    if *app.phase.borrow() != Phase::Running {
        app.metrics.refused.with_label_values(&["draining"]).inc();
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server is shutting down: connect to another node",
        );
    }
    if let Err(refusal) = app.ip_limits.attempt(client_ip) {
        return too_many(&app, client_ip, refusal);
    }
    let identity = match &app.verifier {
        None => None,
        Some(verifier) => {
            match auth::request_token(headers, query).and_then(|t| verifier.verify(&t)) {
                Ok(identity) => Some(identity),
                Err(e) => {
                    app.metrics
                        .refused
                        .with_label_values(&["unauthorized"])
                        .inc();
                    debug!(%client_ip, cause = %e, "upgrade refused: token");
                    let challenge = if e == AuthError::Missing {
                        "Bearer realm=\"wsgate\""
                    } else {
                        "Bearer realm=\"wsgate\", error=\"invalid_token\""
                    };
                    return unauthorised(&e.to_string(), challenge);
                }
            }
        }
    };
    let ip_slot = match app.ip_limits.admit(client_ip) {
        Ok(slot) => slot,
        Err(refusal) => return too_many(&app, client_ip, refusal),
    };
    let Some(slot) = app.admit() else {
        app.metrics
            .refused
            .with_label_values(&["max_connections"])
            .inc();
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many connections on this node",
        );
    };
    let accept = derive_accept_key(key.as_bytes());
    let dialect: Arc<dyn Dialect> = Arc::new(Native);
    let ctx = app.session_context(slot, ip_slot, client_ip, identity);
    let config = app.ws_config();
    let span =
        tracing::info_span!("conn", peer = %peer, client = %client_ip, dialect = dialect.name());
    tokio::spawn(
        async move {
            match upgrade.await {
                Ok(upgraded) => {
                    let ws = WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        Some(config),
                    )
                    .await;
                    session::run(ws, dialect, ctx).await;
                }
                Err(e) => debug!(cause = %e, "upgrade failed"),
            }
        }
        .instrument(span),
    );
    let mut res = Response::new(Bytes::new().into());
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = res.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    res
}

/// A 429 for a per-address limit, with `Retry-After`.
fn too_many(app: &App, client_ip: IpAddr, refusal: IpRefusal) -> warp::reply::Response {
    app.metrics
        .refused
        .with_label_values(&[refusal.metric_reason()])
        .inc();
    debug!(%client_ip, cause = %refusal, "upgrade refused: per-address limit");
    let mut res = json_error(StatusCode::TOO_MANY_REQUESTS, &refusal.to_string());
    res.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    res
}

/// One message of a publish request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishOne {
    channel: String,
    payload: Box<RawValue>,
}

/// The body of `POST /publish`: one message, or a batch. (A flat struct
/// rather than an untagged enum: `RawValue` cannot pass through serde's
/// buffering of untagged content.)
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    channel: Option<String>,
    // `null` is a payload like any other: only a missing field is `None`.
    #[serde(default, deserialize_with = "present")]
    payload: Option<Box<RawValue>>,
    messages: Option<Vec<PublishOne>>,
}

/// Deserialises a field that is present, whatever its value (even `null`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

async fn publish(app: Arc<App>, body: Bytes) -> warp::reply::Response {
    app.metrics.publish_requests.inc();
    let limit = app.config.max_message_bytes.get();
    if body.len() > limit {
        return json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("body larger than {limit} bytes"),
        );
    }
    let parsed = serde_json::from_slice::<PublishBody>(&body).ok();
    let (messages, batch) = match parsed.map(|b| (b.channel, b.payload, b.messages)) {
        Some((Some(channel), Some(payload), None)) => {
            (vec![PublishOne { channel, payload }], false)
        }
        Some((None, None, Some(messages))) if !messages.is_empty() => (messages, true),
        _ => {
            return json_error(
                StatusCode::BAD_REQUEST,
                r#"expected {"channel": string, "payload": any} or {"messages": [{"channel": string, "payload": any}, ...]}"#,
            );
        }
    };
    let mut prepared = Vec::with_capacity(messages.len());
    for m in messages {
        if m.channel.is_empty() || m.channel.len() > app.config.max_pattern_bytes.get() {
            let max = app.config.max_pattern_bytes.get();
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("channel must be 1 to {max} bytes"),
            );
        }
        prepared.push((Bytes::from(m.channel), payload_bytes(&m.payload)));
    }
    let mut receivers = Vec::with_capacity(prepared.len());
    for (channel, payload) in prepared {
        match app.hub.publish(channel, payload).await {
            Ok(n) => receivers.push(n),
            Err(e) => {
                let body =
                    serde_json::json!({ "error": e.to_string(), "published": receivers.len() });
                return json(StatusCode::SERVICE_UNAVAILABLE, body.to_string());
            }
        }
    }
    let body = if batch {
        serde_json::json!({ "receivers": receivers })
    } else {
        serde_json::json!({ "receivers": receivers.first() })
    };
    json(StatusCode::OK, body.to_string())
}

/// A JSON string payload is published as its text; anything else as the JSON
/// text the client sent (byte for byte, key order kept).
fn payload_bytes(raw: &RawValue) -> Bytes {
    match serde_json::from_str::<String>(raw.get()) {
        Ok(text) => Bytes::from(text),
        Err(_) => Bytes::copy_from_slice(raw.get().as_bytes()),
    }
}
