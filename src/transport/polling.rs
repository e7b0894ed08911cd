//! Bayeux over HTTP: `long-polling` and `cross-origin-long-polling` (`POST`
//! with a JSON, form or plain-text body) and `callback-polling` (JSONP: `GET`
//! with `message=` and `jsonp=`).
//!
//! A body with a `/meta/handshake` starts a session (after the same
//! admission as a WebSocket upgrade); any other body goes to the session its
//! `clientId` names on this node, as an [`Attach::Poll`], and is answered
//! with what that session answers. A clientId no session of this node holds
//! is answered `402 Unknown client` with `advice {reconnect:"handshake"}`.
//!
//! Cross-origin: a request with an `Origin` the node allows
//! (`WSGATE_ALLOWED_ORIGINS`) gets `Access-Control-Allow-Origin` echoing it,
//! with credentials; an `OPTIONS` preflight is answered 204. A forbidden
//! origin gets 403.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tracing::{debug, Instrument};
use warp::http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};

use super::admission::{admit, origin_allowed, Carrier, Hello, Token};
use crate::app::App;
use crate::auth;
use crate::handoff;
use crate::pending::PendingSlot;
use crate::protocol::bayeux::client_id::ClientId;
use crate::protocol::bayeux::conversation::{unknown_batch, BayeuxConversation, Endpoint};
use crate::protocol::bayeux::message::{self, DecodeError, JsonpCallback, Kind};
use crate::protocol::bayeux::reply::{self, Batch};
use crate::protocol::Frame;
use crate::session::{self, Attach, Link, Poll};

/// How long a poll waits beyond the connect hold for its session's answer.
const ANSWER_SLACK: Duration = Duration::from_secs(2);

/// How a response body is wrapped.
enum Wrap {
    /// A JSON array.
    Json,
    /// A JSONP call of this callback.
    Jsonp(JsonpCallback),
}

/// `POST <path>` (and `<path>/<type>`): long-polling.
pub async fn post(
    app: Arc<App>,
    endpoint: Arc<Endpoint>,
    path: warp::path::FullPath,
    headers: HeaderMap,
    query: String,
    body: Bytes,
    conn: Arc<PendingSlot>,
) -> warp::reply::Response {
    if !origin_allowed(&app.config, &headers) {
        app.metrics.refused.with_label_values(&["origin"]).inc();
        return forbidden_origin();
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let text = message::body_text(content_type, &body, &endpoint.limits);
    let hello = Hello {
        method: &Method::POST,
        path: path.as_str(),
        query: &query,
        headers: &headers,
    };
    let res = serve(&app, endpoint, &hello, text, &conn, Wrap::Json).await;
    cors(&headers, res)
}

/// `GET <path>?message=..&jsonp=..`: callback-polling.
pub async fn jsonp(
    app: Arc<App>,
    endpoint: Arc<Endpoint>,
    path: &str,
    headers: HeaderMap,
    query: String,
    conn: Arc<PendingSlot>,
) -> warp::reply::Response {
    let callback = message::form_value(query.as_bytes(), "jsonp")
        .ok()
        .flatten()
        .map_or(Some(JsonpCallback::default_name()), |c| {
            JsonpCallback::parse(&c)
        });
    let Some(callback) = callback else {
        return super::json_error(StatusCode::BAD_REQUEST, "invalid jsonp callback name");
    };
    if !origin_allowed(&app.config, &headers) {
        app.metrics.refused.with_label_values(&["origin"]).inc();
        return forbidden_origin();
    }
    let text = match message::form_value(query.as_bytes(), "message") {
        Ok(Some(text)) if text.len() > endpoint.limits.max_bytes => Err(DecodeError::TooLarge {
            size: text.len(),
            max: endpoint.limits.max_bytes,
        }),
        Ok(Some(text)) => Ok(text),
        Ok(None) => Err(DecodeError::NoMessageField),
        Err(e) => Err(e),
    };
    let hello = Hello {
        method: &Method::GET,
        path,
        query: &query,
        headers: &headers,
    };
    serve(&app, endpoint, &hello, text, &conn, Wrap::Jsonp(callback)).await
}

/// `OPTIONS <path>`: the CORS preflight of cross-origin long-polling.
pub fn preflight(app: &App, headers: &HeaderMap) -> warp::reply::Response {
    if !origin_allowed(&app.config, headers) || headers.get(header::ORIGIN).is_none() {
        return forbidden_origin();
    }
    let mut res = Response::new(Bytes::new().into());
    *res.status_mut() = StatusCode::NO_CONTENT;
    let h = res.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, GET, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Content-Type, Authorization, X-Requested-With"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    cors(headers, res)
}

fn forbidden_origin() -> warp::reply::Response {
    super::json_error(StatusCode::FORBIDDEN, "origin not allowed")
}

/// Adds the CORS headers for an allowed `Origin` (the caller checked it).
pub(crate) fn cors(headers: &HeaderMap, mut res: warp::reply::Response) -> warp::reply::Response {
    if let Some(origin) = headers.get(header::ORIGIN) {
        let h = res.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        h.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    res
}

/// Serves one body: a handshake starts a session, anything else goes to the
/// session it names.
async fn serve(
    app: &App,
    endpoint: Arc<Endpoint>,
    hello: &Hello<'_>,
    text: Result<String, DecodeError>,
    conn: &PendingSlot,
    wrap: Wrap,
) -> warp::reply::Response {
    let batch =
        text.and_then(|t| message::decode_json(t.as_bytes(), &endpoint.limits).map(|b| (t, b)));
    let (text, batch) = match batch {
        Ok(ok) => ok,
        Err(e) => {
            app.metrics.malformed_frames.inc();
            let status = match e {
                DecodeError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::BAD_REQUEST,
            };
            return respond(status, reply::bad_body(&e), &wrap);
        }
    };
    let handshake = batch
        .iter()
        .any(|m| matches!(m, Ok(m) if matches!(m.kind, Kind::Handshake { .. })));
    let (tx, rx) = oneshot::channel();
    let poll = Poll { text, respond: tx };
    let wait = endpoint.connect_timeout + ANSWER_SLACK;
    if handshake {
        let admitted = match admit(app, hello, conn, Token::ByDialect, Carrier::Request).await {
            Ok(admitted) => admitted,
            Err(refused) => return *refused,
        };
        let token = auth::request_token(hello.headers, hello.query).ok();
        let conv = Box::new(BayeuxConversation::new(endpoint, token));
        let client_ip = admitted.client_ip;
        let ctx = app.session_context(
            admitted.slot,
            admitted.ip_slot,
            client_ip,
            admitted.identity,
        );
        let span = tracing::info_span!("poll", client = %client_ip, dialect = "bayeux");
        tokio::spawn(session::run(Link::Poll(poll), conv, ctx).instrument(span));
    } else {
        let client_id = batch
            .iter()
            .find_map(|m| m.as_ref().ok().and_then(|m| m.client_id.clone()));
        let to = client_id.as_deref().and_then(|cid| app.clients.get(cid));
        let Some(to) = to else {
            // Issued by another node and not used yet: adopt it here.
            let cid = client_id.as_deref().and_then(ClientId::parse);
            let adopted = match &cid {
                Some(cid) => handoff::adopt(&app.handoff, cid.as_str()).await,
                None => None,
            };
            let (Some(cid), Some(identity)) = (cid, adopted) else {
                return respond(
                    StatusCode::OK,
                    unknown_batch(&batch, client_id.as_deref().unwrap_or("")),
                    &wrap,
                );
            };
            let admitted = match admit(app, hello, conn, Token::ByDialect, Carrier::Request).await {
                Ok(admitted) => admitted,
                Err(refused) => return *refused,
            };
            let conv = Box::new(BayeuxConversation::adopted(endpoint, cid));
            let client_ip = admitted.client_ip;
            let ctx = app.session_context(admitted.slot, admitted.ip_slot, client_ip, identity);
            let span = tracing::info_span!("poll", client = %client_ip, dialect = "bayeux");
            tokio::spawn(session::run(Link::Poll(poll), conv, ctx).instrument(span));
            return respond_when(rx, wait, &wrap).await;
        };
        match to.push(Attach::Poll(poll)) {
            Ok(()) => conn.promote(),
            Err(_) => {
                debug!("session did not take the poll");
                return respond(
                    StatusCode::OK,
                    unknown_batch(&batch, client_id.as_deref().unwrap_or("")),
                    &wrap,
                );
            }
        }
    }
    respond_when(rx, wait, &wrap).await
}

/// The session's answer to a poll, within `wait`.
async fn respond_when(
    rx: oneshot::Receiver<Vec<Frame>>,
    wait: Duration,
    wrap: &Wrap,
) -> warp::reply::Response {
    let frames = match tokio::time::timeout(wait, rx).await {
        Ok(Ok(frames)) => frames,
        _ => Vec::new(),
    };
    respond(StatusCode::OK, body(&frames), wrap)
}

/// The frames a session answered with, as one JSON array.
fn body(frames: &[Frame]) -> String {
    let mut batch = Batch::new();
    for frame in frames {
        if let Some(text) = frame.as_text() {
            batch.push_frame(text);
        }
    }
    batch.finish()
}

fn respond(status: StatusCode, body: String, wrap: &Wrap) -> warp::reply::Response {
    match wrap {
        Wrap::Json => super::json(status, body),
        Wrap::Jsonp(callback) => {
            // A script tag cannot read a status: always 200.
            let mut res = Response::new(reply::jsonp(callback, &body).into());
            let h = res.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/javascript; charset=utf-8"),
            );
            h.insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
            res
        }
    }
}
