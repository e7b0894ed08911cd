//! The one admission every handshake passes, whatever the transport: see
//! [`admit`].

use std::net::IpAddr;
use std::time::Instant;

use tracing::{debug, warn};
use warp::http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};

use super::{json_error, unauthorised};
use crate::app::App;
use crate::auth::{self, AuthError, Identity};
use crate::config::Config;
use crate::connect_auth::{Handshake, Verdict};
use crate::forwarded;
use crate::limits::{IpRefusal, IpSlot};
use crate::pending::PendingSlot;
use crate::session::SessionSlot;
use crate::shutdown::Phase;

/// When a transport's token is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token {
    /// At connect time (the native protocol): refused with 401 without one.
    AtConnect,
    /// By the dialect, later (Bayeux checks it at `/meta/handshake`).
    ByDialect,
}

/// How the handshake relates to its TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    /// A WebSocket upgrade: the connection becomes the session and hands it
    /// its per-address place.
    Upgrade,
    /// An HTTP request (a Bayeux handshake by `POST`): the session lives
    /// beyond the connection and takes a per-address place of its own.
    Request,
}

/// The request a handshake came in, as the gates see it.
#[derive(Clone, Copy)]
pub struct Hello<'a> {
    /// `GET` (an upgrade, JSONP, an event stream) or `POST` (a long-poll).
    pub method: &'a Method,
    /// The request path.
    pub path: &'a str,
    /// The raw query string (without `?`), possibly empty.
    pub query: &'a str,
    /// The request headers.
    pub headers: &'a HeaderMap,
}

/// What admission grants: the session's places and who it is.
pub struct Admitted {
    /// Its place among the node's connections.
    pub slot: SessionSlot,
    /// Its place among its address's connections.
    pub ip_slot: IpSlot,
    /// The client's address (after trusted proxies).
    pub client_ip: IpAddr,
    /// The verified token, for [`Token::AtConnect`] with authentication on.
    pub identity: Option<Identity>,
}

/// Admits a new session, or answers why not, in this order: the `Origin`
/// (403), draining (503), the client address's connection rate (429), the
/// token (401, for [`Token::AtConnect`]), the address's open connections
/// (429), the node's connections (503), and last the connect backend
/// (`WSGATE_CONNECT_AUTH_URL`: its refusal as it came, or 503 without an
/// answer). Rate comes before the token so that guessing tokens is
/// throttled too; the backend comes after every cheap gate so that nothing
/// a gate refuses reaches it (see `docs/security.md`).
///
/// The backend's identity (a 2xx body with claims) becomes the session's
/// only when JWT authentication is off; with it on, the token proves who
/// the client is and the backend only decides whether it may connect.
pub async fn admit(
    app: &App,
    hello: &Hello<'_>,
    conn: &PendingSlot,
    token: Token,
    carrier: Carrier,
) -> Result<Admitted, Box<warp::reply::Response>> {
    let (headers, query) = (hello.headers, hello.query);
    let client_ip = forwarded::client_ip(conn.peer().ip(), headers, &app.config.trusted_proxies);
    if !origin_allowed(&app.config, headers) {
        app.metrics.refused.with_label_values(&["origin"]).inc();
        debug!(%client_ip, "handshake refused: origin");
        return Err(Box::new(json_error(
            StatusCode::FORBIDDEN,
            "origin not allowed",
        )));
    }
    if *app.phase.borrow() != Phase::Running {
        app.metrics.refused.with_label_values(&["draining"]).inc();
        return Err(Box::new(json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server is shutting down: connect to another node",
        )));
    }
    if let Err(refusal) = app.ip_limits.attempt(client_ip) {
        return Err(Box::new(too_many(app, client_ip, refusal)));
    }
    let identity = match (&app.verifier, token) {
        (Some(verifier), Token::AtConnect) => {
            match auth::request_token(headers, query).and_then(|t| verifier.verify(&t)) {
                Ok(identity) => Some(identity),
                Err(e) => {
                    app.metrics
                        .refused
                        .with_label_values(&["unauthorized"])
                        .inc();
                    debug!(%client_ip, cause = %e, "handshake refused: token");
                    let challenge = if e == AuthError::Missing {
                        "Bearer realm=\"wsgate\""
                    } else {
                        "Bearer realm=\"wsgate\", error=\"invalid_token\""
                    };
                    return Err(Box::new(unauthorised(&e.to_string(), challenge)));
                }
            }
        }
        _ => None,
    };
    // A connection counted per address since it was accepted hands that
    // place to its session when it becomes one (an upgrade); one from a
    // trusted proxy, or a session that outlives its request, is counted now
    // by the client address. Either way the place is taken only once the
    // session is certain, so a refused handshake leaves the (still pending)
    // connection its place.
    let fresh_ip_slot = if carrier == Carrier::Upgrade && conn.has_ip_slot() {
        None
    } else {
        match app.ip_limits.admit(client_ip) {
            Ok(slot) => Some(slot),
            Err(refusal) => return Err(Box::new(too_many(app, client_ip, refusal))),
        }
    };
    let Some(slot) = app.admit() else {
        app.metrics
            .refused
            .with_label_values(&["max_connections"])
            .inc();
        return Err(Box::new(json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many connections on this node",
        )));
    };
    let backend = connect(app, hello, client_ip).await?;
    let identity = if app.verifier.is_none() {
        backend
    } else {
        identity
    };
    let Some(ip_slot) = fresh_ip_slot.or_else(|| conn.take_ip_slot()) else {
        // Unreachable: the connection held a place a moment ago and only
        // this upgrade takes it; refuse rather than run uncounted.
        return Err(Box::new(json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "try again",
        )));
    };
    // From here the connection carries a session, no longer pending.
    conn.promote();
    Ok(Admitted {
        slot,
        ip_slot,
        client_ip,
        identity,
    })
}

/// Puts the handshake to the connect backend, when one is configured: the
/// identity its 2xx gave (if any), or the response the client gets.
async fn connect(
    app: &App,
    hello: &Hello<'_>,
    client_ip: IpAddr,
) -> Result<Option<crate::auth::Identity>, Box<warp::reply::Response>> {
    let Some(backend) = &app.connect_auth else {
        return Ok(None);
    };
    let handshake = Handshake::new(
        hello.method.clone(),
        hello.path,
        hello.query,
        hello.headers,
        client_ip,
    );
    let outcome = |o: &str| app.metrics.connect_auth.with_label_values(&[o]).inc();
    let verdict = match backend.cached(&handshake) {
        Some(verdict) => {
            outcome(match verdict {
                Verdict::Allow(_) => "cached_allowed",
                Verdict::Refuse(_) => "cached_refused",
            });
            verdict
        }
        None => {
            let started = Instant::now();
            let asked = backend.ask(handshake).await;
            app.metrics
                .connect_auth_seconds
                .observe(started.elapsed().as_secs_f64());
            match asked {
                Ok(verdict) => {
                    outcome(match verdict {
                        Verdict::Allow(_) => "allowed",
                        Verdict::Refuse(_) => "refused",
                    });
                    verdict
                }
                Err(e) => {
                    outcome("unavailable");
                    app.metrics
                        .refused
                        .with_label_values(&["connect_auth_unavailable"])
                        .inc();
                    warn!(%client_ip, cause = %e, "connect backend gave no verdict");
                    return Err(Box::new(json_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "connect authorisation unavailable",
                    )));
                }
            }
        }
    };
    match verdict {
        Verdict::Allow(identity) => Ok(identity),
        Verdict::Refuse(refusal) => {
            app.metrics
                .refused
                .with_label_values(&["connect_auth"])
                .inc();
            debug!(%client_ip, status = %refusal.status, "handshake refused by the connect backend");
            let mut res = Response::new(refusal.body.into());
            *res.status_mut() = refusal.status;
            for (name, value) in refusal.headers {
                res.headers_mut().insert(name, value);
            }
            Err(Box::new(res))
        }
    }
}

/// Is the request's `Origin` acceptable? Only one `Origin` header is; a
/// missing one is unless `WSGATE_REQUIRE_ORIGIN` (non-browser clients send
/// none, and a browser always sends one on a WebSocket).
pub fn origin_allowed(config: &Config, headers: &HeaderMap) -> bool {
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

/// A 429 for a per-address limit, with `Retry-After`.
pub fn too_many(app: &App, client_ip: IpAddr, refusal: IpRefusal) -> warp::reply::Response {
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
