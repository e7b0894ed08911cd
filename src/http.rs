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

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::{Buf, Bytes, BytesMut};
use futures_util::StreamExt;
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
use crate::broker::Publication;
use crate::config::Config;
use crate::forwarded;
use crate::hub::Hub;
use crate::limits::{IpLimits, IpRefusal, IpSlot};
use crate::metrics::Metrics;
use crate::pending::{Pending, PendingSlot};
use crate::protocol::{native::Native, Dialect};
use crate::publish::{json_payload, present};
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
    /// `WSGATE_CLIENT_PUBLISH`: where clients may publish over their socket
    /// (empty: nowhere).
    pub client_publish: Arc<Acl>,
    /// The subscribe authorisation callback, when configured.
    pub authz: Option<Arc<Authz>>,
    /// Per-address connection limits.
    pub ip_limits: IpLimits,
    /// Connections not (yet) upgraded, and their node-wide cap.
    pub pending: Pending,
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
        let client_publish = Arc::new(Acl::new(&config.client_publish));
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
        let pending = Pending::new(
            config.max_pending_connections.get(),
            metrics.pending_connections.clone(),
        );
        metrics
            .max_connections
            .set(i64::try_from(config.max_connections.get()).unwrap_or(i64::MAX));
        App {
            pending,
            hub,
            metrics,
            config,
            phase: watch::Sender::new(Phase::Running),
            sessions: watch::Sender::new(0),
            verifier,
            allow,
            client_publish,
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
            client_publish: self.client_publish.clone(),
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
                min_prefix: self.config.min_pattern_prefix_bytes,
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

/// All routes, for one connection (`conn`: its peer and pending place).
///
/// Each route matches its path first and then answers everything on that
/// path itself (its own `recover`): a known path with another method gets
/// 405 with `Allow`, a refused publish its own status, and only a path no
/// route knows reaches the final 404. `HEAD` is served wherever `GET` is
/// (hyper sends the headers without the body), except on the WebSocket path.
pub fn routes(
    app: Arc<App>,
    conn: Arc<PendingSlot>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = std::convert::Infallible> + Clone {
    let with_app = {
        let app = app.clone();
        warp::any().map(move || app.clone())
    };
    let on_ws_path = warp::path::full()
        .and(with_app.clone())
        .and_then(|path: warp::path::FullPath, app: Arc<App>| async move {
            if path.as_str() == app.config.ws_path {
                Ok(())
            } else {
                Err(warp::reject::not_found())
            }
        })
        .untuple_one();
    let ws = on_ws_path.and(
        warp::get()
            .and(with_app.clone())
            .and(warp::header::headers_cloned())
            .and(warp::query::raw().or(warp::any().map(String::new)).unify())
            .and(warp::ext::optional::<OnUpgrade>())
            .map(
                move |app: Arc<App>,
                      headers: HeaderMap,
                      query: String,
                      upgrade: Option<OnUpgrade>| {
                    upgrade_ws(app, &headers, &query, upgrade, &conn)
                },
            )
            .recover(recover_on("GET", app.clone()))
            .unify(),
    );
    let publish = warp::path("publish").and(warp::path::end()).and(
        warp::post()
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
            .and(body_within(
                app.config.max_publish_bytes.get() as u64,
                app.config.http_body_timeout,
            ))
            .then(publish)
            .recover(recover_on("POST", app.clone()))
            .unify(),
    );
    let get_or_head = || warp::get().or(warp::head()).unify();
    let healthz = warp::path("healthz").and(warp::path::end()).and(
        get_or_head()
            .map(|| json(StatusCode::OK, r#"{"status":"ok"}"#))
            .recover(recover_on("GET, HEAD", app.clone()))
            .unify(),
    );
    let readyz = warp::path("readyz").and(warp::path::end()).and(
        get_or_head()
            .and(with_app.clone())
            .map(|app: Arc<App>| {
                if app.hub.is_ready() && *app.phase.borrow() == Phase::Running {
                    json(StatusCode::OK, r#"{"ready":true}"#)
                } else {
                    json(StatusCode::SERVICE_UNAVAILABLE, r#"{"ready":false}"#)
                }
            })
            .recover(recover_on("GET, HEAD", app.clone()))
            .unify(),
    );
    let metrics = warp::path("metrics").and(warp::path::end()).and(
        get_or_head()
            .and(with_app.clone())
            .map(|app: Arc<App>| {
                let mut res = Response::new(app.metrics.render().into());
                res.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                res
            })
            .recover(recover_on("GET, HEAD", app.clone()))
            .unify(),
    );
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
        .recover(|rejection: Rejection| async move {
            // Every route answers for its own path: what is left is a path
            // nobody serves.
            if !rejection.is_not_found() {
                debug!(?rejection, "unhandled rejection");
            }
            Ok::<_, std::convert::Infallible>(json_error(StatusCode::NOT_FOUND, "not found"))
        })
        .unify()
}

/// The body of a request, at most `limit` bytes (by `Content-Length`, which
/// is required), read in full within `deadline` of the head: a client that
/// announces a body and sends it slowly, or not at all, gets 408 and its
/// connection closed instead of holding it open.
fn body_within(
    limit: u64,
    deadline: Duration,
) -> impl Filter<Extract = (Bytes,), Error = Rejection> + Clone {
    warp::body::content_length_limit(limit)
        .and(warp::body::stream())
        .and_then(move |stream| read_body(stream, limit, deadline))
}

/// Gathers a body stream, at most `limit` bytes, within `deadline`.
async fn read_body<S, B>(stream: S, limit: u64, deadline: Duration) -> Result<Bytes, Rejection>
where
    S: futures_util::Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let read = async move {
        let mut stream = std::pin::pin!(stream);
        let mut body = BytesMut::new();
        while let Some(chunk) = stream.next().await {
            let mut chunk = chunk.map_err(|_| warp::reject::custom(BodyUnreadable))?;
            while chunk.has_remaining() {
                let part = chunk.chunk();
                let n = part.len();
                if body.len() + n > limit {
                    return Err(warp::reject::custom(BodyUnreadable));
                }
                body.extend_from_slice(part);
                chunk.advance(n);
            }
        }
        Ok(body.freeze())
    };
    match tokio::time::timeout(deadline, read).await {
        Ok(result) => result,
        Err(_) => Err(warp::reject::custom(BodyTimeout)),
    }
}

/// A request body that did not arrive within `WSGATE_HTTP_BODY_TIMEOUT_MS`.
#[derive(Debug)]
struct BodyTimeout;

impl warp::reject::Reject for BodyTimeout {}

/// A request body that broke off, or outgrew its `Content-Length`.
#[derive(Debug)]
struct BodyUnreadable;

impl warp::reject::Reject for BodyUnreadable {}

/// The `recover` of one route: its rejections as responses; `allow` lists
/// the methods the route serves (for 405).
fn recover_on(
    allow: &'static str,
    app: Arc<App>,
) -> impl Fn(Rejection) -> std::future::Ready<Result<warp::reply::Response, std::convert::Infallible>>
       + Clone
       + Send
       + Sync
       + 'static {
    move |rejection| std::future::ready(Ok(refusal(&rejection, allow, &app)))
}

/// The response for a rejection on a known path.
fn refusal(rejection: &Rejection, allow: &'static str, app: &App) -> warp::reply::Response {
    if rejection.find::<Unauthorised>().is_some() {
        unauthorised(
            "a valid API key is required: Authorization: Bearer <key>",
            "Bearer realm=\"wsgate\"",
        )
    } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        let limit = app.config.max_publish_bytes.get();
        json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("body larger than {limit} bytes"),
        )
    } else if rejection.find::<warp::reject::LengthRequired>().is_some() {
        json_error(
            StatusCode::LENGTH_REQUIRED,
            "a Content-Length header is required",
        )
    } else if rejection.find::<BodyTimeout>().is_some() {
        app.metrics.http_timeouts.with_label_values(&["body"]).inc();
        let timeout = app.config.http_body_timeout.as_millis();
        let mut res = json_error(
            StatusCode::REQUEST_TIMEOUT,
            &format!("request body not received within {timeout} ms"),
        );
        // The rest of the body may still come: never read it as a request.
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        res
    } else if rejection.find::<BodyUnreadable>().is_some() {
        let mut res = json_error(StatusCode::BAD_REQUEST, "request body could not be read");
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        res
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        let mut res = json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("method not allowed: use {allow}"),
        );
        res.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allow));
        res
    } else {
        debug!(?rejection, "unhandled rejection");
        json_error(StatusCode::BAD_REQUEST, "bad request")
    }
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

/// Answers the WebSocket handshake and starts the session once hyper hands
/// over the connection.
///
/// The handshake is checked strictly first (RFC 6455 section 4.2.1), each
/// failure a 400 saying what is wrong: a `Host`, `Connection: Upgrade` and
/// `Upgrade: websocket`, `Sec-WebSocket-Version: 13` (else also answered
/// with the version we speak), and one `Sec-WebSocket-Key` that is the
/// base64 of 16 bytes.
fn upgrade_ws(
    app: Arc<App>,
    headers: &HeaderMap,
    query: &str,
    upgrade: Option<OnUpgrade>,
    conn: &PendingSlot,
) -> warp::reply::Response {
    let peer = conn.peer();
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if headers.get(header::HOST).is_none_or(|h| h.is_empty()) {
        return json_error(StatusCode::BAD_REQUEST, "missing Host header");
    }
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
    let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let Some(key) = keys.next() else {
        return json_error(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
    };
    let nonce_ok = base64::engine::general_purpose::STANDARD
        .decode(key.as_bytes())
        .is_ok_and(|nonce| nonce.len() == 16);
    if keys.next().is_some() || !nonce_ok {
        return json_error(
            StatusCode::BAD_REQUEST,
            "invalid Sec-WebSocket-Key: expected one, the base64 of 16 random bytes",
        );
    }
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
    // A connection counted per address since it was accepted hands that
    // place to its session; one from a trusted proxy is counted now, by the
    // client address the proxy reported. Either way the place is taken only
    // once the session is certain, so a refused upgrade leaves the (still
    // pending) connection its place.
    let fresh_ip_slot = if conn.has_ip_slot() {
        None
    } else {
        match app.ip_limits.admit(client_ip) {
            Ok(slot) => Some(slot),
            Err(refusal) => return too_many(&app, client_ip, refusal),
        }
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
    let Some(ip_slot) = fresh_ip_slot.or_else(|| conn.take_ip_slot()) else {
        // Unreachable: the connection held a place a moment ago and only
        // this upgrade takes it; refuse rather than run uncounted.
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "try again");
    };
    // From here the connection is a session, no longer pending.
    conn.promote();
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

/// Longest `idempotency_key`, in bytes.
const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;

/// The accepted shapes, for error messages.
const PUBLISH_USAGE: &str = r#"expected {"channel": string, "payload": any JSON} (or "payload_text": string instead of "payload"; optional "idempotency_key": string), or {"messages": [such objects, ...]}"#;

/// One message of a publish request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishOne {
    channel: String,
    // `null` is a payload like any other: only a missing field is `None`.
    #[serde(default, deserialize_with = "present")]
    payload: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    payload_text: Option<String>,
    #[serde(default, deserialize_with = "present")]
    idempotency_key: Option<String>,
}

/// The body of `POST /publish`: one message, or a batch. (A flat struct
/// rather than an untagged enum: `RawValue` cannot pass through serde's
/// buffering of untagged content.)
///
/// The batch entries stay raw text here and are parsed one by one, so an
/// entry's error can name its index.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody<'a> {
    channel: Option<String>,
    #[serde(default, deserialize_with = "present")]
    payload: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    payload_text: Option<String>,
    #[serde(default, deserialize_with = "present")]
    idempotency_key: Option<String>,
    #[serde(borrow)]
    messages: Option<Vec<&'a RawValue>>,
}

async fn publish(app: Arc<App>, body: Bytes) -> warp::reply::Response {
    app.metrics.publish_requests.inc();
    let limit = app.config.max_publish_bytes.get();
    if body.len() > limit {
        return json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("body larger than {limit} bytes"),
        );
    }
    let (messages, batch) = match parse_publish(&app.config, &body) {
        Ok(parsed) => parsed,
        Err(error) => return json_error(StatusCode::BAD_REQUEST, &error),
    };
    let results = if batch {
        app.hub.publish_batch(messages).await
    } else {
        let mut messages = messages;
        match messages.pop() {
            Some(message) => vec![app.hub.publish(message).await],
            None => Vec::new(),
        }
    };
    let receivers: Vec<Option<u64>> = results.iter().map(|r| r.as_ref().ok().copied()).collect();
    let failed = results
        .iter()
        .enumerate()
        .find_map(|(i, r)| r.as_ref().err().map(|e| (i, e)));
    let Some((index, first)) = failed else {
        let body = if batch {
            serde_json::json!({ "receivers": receivers })
        } else {
            serde_json::json!({ "receivers": receivers.first().copied().flatten() })
        };
        return json(StatusCode::OK, body.to_string());
    };
    // Anything not confirmed: say what was published, and whether what was
    // not may have been anyway (then only a retry with the same
    // idempotency_key is safe).
    let published = receivers.iter().filter(|r| r.is_some()).count();
    let maybe = results
        .iter()
        .any(|r| r.as_ref().is_err_and(|e| e.maybe_published()));
    let body = if batch {
        serde_json::json!({
            "error": format!("messages[{index}]: {first}"),
            "receivers": receivers,
            "published": published,
            "maybe_published": maybe,
        })
    } else {
        serde_json::json!({
            "error": first.to_string(),
            "published": published,
            "maybe_published": maybe,
        })
    };
    json(StatusCode::SERVICE_UNAVAILABLE, body.to_string())
}

/// The messages of a publish body (and whether it was the batch form), or a
/// reason to refuse it. Nothing is published unless every message is valid.
/// Errors say what is wrong and where: serde's message (which names an
/// unknown field and the expected ones) with the line and column in the
/// body, and for a batch entry its index (`messages[2]: ...`).
fn parse_publish(config: &Config, body: &[u8]) -> Result<(Vec<Publication>, bool), String> {
    let parsed = serde_json::from_slice::<PublishBody<'_>>(body)
        .map_err(|e| format!("invalid body: {e}"))?;
    match parsed {
        PublishBody {
            channel: Some(channel),
            payload,
            payload_text,
            idempotency_key,
            messages: None,
        } => {
            let one = PublishOne {
                channel,
                payload,
                payload_text,
                idempotency_key,
            };
            Ok((vec![publication(config, one)?], false))
        }
        PublishBody {
            channel: None,
            payload: None,
            payload_text: None,
            idempotency_key: None,
            messages: Some(entries),
        } => {
            if entries.is_empty() {
                return Err(r#""messages" must hold at least one message"#.to_owned());
            }
            let mut all = Vec::with_capacity(entries.len());
            for (i, raw) in entries.into_iter().enumerate() {
                let one = serde_json::from_str::<PublishOne>(raw.get())
                    .map_err(|e| format!("messages[{i}]: {}", relocate(&e, body, raw.get())))?;
                all.push(publication(config, one).map_err(|e| format!("messages[{i}]: {e}"))?);
            }
            Ok((all, true))
        }
        PublishBody {
            channel: None,
            messages: None,
            ..
        } => Err(format!(r#"missing field "channel": {PUBLISH_USAGE}"#)),
        _ => Err(format!(
            r#""messages" cannot be combined with other fields: {PUBLISH_USAGE}"#
        )),
    }
}

/// One validated message. `payload` is published as the JSON text sent, byte
/// for byte (a string with its quotes: every subscriber gets back the value
/// that was published); `payload_text` as its raw text.
fn publication(config: &Config, m: PublishOne) -> Result<Publication, String> {
    let max = config.max_pattern_bytes.get();
    if m.channel.is_empty() || m.channel.len() > max {
        return Err(format!("channel must be 1 to {max} bytes"));
    }
    let payload = match (m.payload, m.payload_text) {
        (Some(raw), None) => json_payload(&raw),
        (None, Some(text)) => Bytes::from(text),
        (Some(_), Some(_)) => {
            return Err(r#"give either "payload" or "payload_text", not both"#.to_owned())
        }
        (None, None) => return Err(format!(r#"missing field "payload": {PUBLISH_USAGE}"#)),
    };
    let idempotency_key = match m.idempotency_key {
        Some(k) if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY_BYTES => {
            return Err(format!(
                "idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes"
            ))
        }
        k => k.map(Bytes::from),
    };
    Ok(Publication {
        channel: Bytes::from(m.channel),
        payload,
        idempotency_key,
    })
}

/// serde's error for a part of `body` (a borrowed slice of it), with the
/// position moved from the part to the whole body.
fn relocate(e: &serde_json::Error, body: &[u8], part: &str) -> String {
    let text = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let Some(message) = text.strip_suffix(&suffix) else {
        return text;
    };
    let offset = (part.as_ptr() as usize).wrapping_sub(body.as_ptr() as usize);
    let Some(before) = body.get(..offset) else {
        return text;
    };
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let column = offset
        - before
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |i| i + 1);
    let (line, column) = if e.line() <= 1 {
        (line, column + e.column())
    } else {
        (line + e.line() - 1, e.column())
    };
    format!("{message} at line {line} column {column}")
}
