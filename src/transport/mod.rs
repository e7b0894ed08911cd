//! Transports: how a client's bytes reach its session.
//!
//! - [`websocket`]: the upgrade (strict RFC 6455 checks), on the native path
//!   and on the Bayeux paths;
//! - [`polling`]: Bayeux over HTTP: `POST` long-polling (same-origin and
//!   cross-origin, with CORS) and `callback-polling` (JSONP `GET`).
//!
//! Every handshake of every transport passes [`admission::admit`]: origin,
//! drain, the address's connection rate, the token when the transport
//! demands one at connect time, the address's open connections, the node's
//! connections. A transport is separate from the dialect it carries.

use warp::http::{header, HeaderValue, Response, StatusCode};

pub mod admission;
pub mod engineio;
pub mod event_stream;
pub mod polling;
pub mod services;
pub mod sse;
pub mod websocket;

/// A response with a JSON body.
pub fn json(status: StatusCode, body: impl Into<String>) -> warp::reply::Response {
    let mut res = Response::new(body.into().into());
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

/// A response `{"error": ..}` with `status`.
pub fn json_error(status: StatusCode, error: &str) -> warp::reply::Response {
    json(status, serde_json::json!({ "error": error }).to_string())
}

/// A 401 with the RFC 6750 challenge header.
pub fn unauthorised(error: &str, challenge: &'static str) -> warp::reply::Response {
    let mut res = json_error(StatusCode::UNAUTHORIZED, error);
    res.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    res
}
