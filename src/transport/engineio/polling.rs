//! Engine.IO polling: the handshake `GET`, the held `GET` that takes what
//! is queued for the client, and the `POST` that carries its packets.
//!
//! A held poll is answered as soon as anything is queued, and with a noop
//! (`6`) after `pingInterval` otherwise (the client polls again at once);
//! a second poll while one is held is a bad request, as in engine.io.
//! A `POST` is answered `ok`; one whose payload cannot be read, or that
//! carries a binary packet, is answered `400 Bad request` and its session
//! gets a message packet `{"err":..}` saying why (it lives on); one larger
//! than `WSGATE_MAX_MESSAGE_BYTES` likewise, with 413.

use std::sync::Arc;

use bytes::Bytes;
use tracing::Instrument;
use warp::http::{header, HeaderMap, Method, StatusCode};

use super::socket::{payload, Refused};
use super::{respond, Carrier, EioError, Endpoint, Query};
use crate::app::App;
use crate::pending::PendingSlot;
use crate::protocol::Frame;
use crate::session::{self, Link};
use crate::transport::admission::{admit, origin_allowed, Carrier as Via, Hello, Token};

/// `GET`: a handshake without `sid`, a poll with one.
pub async fn get(
    app: Arc<App>,
    endpoint: Arc<Endpoint>,
    headers: HeaderMap,
    query: String,
    conn: Arc<PendingSlot>,
) -> warp::reply::Response {
    let q = Query::parse(&query);
    let carrier = match q.check() {
        Ok(c) => c,
        Err(e) => return e.response(&headers),
    };
    if carrier != Carrier::Polling {
        // A WebSocket asked for without an upgrade.
        return EioError::BadRequest.response(&headers);
    }
    match q.sid {
        None => handshake(&app, &endpoint, &headers, &query, q.b64, &conn).await,
        Some(sid) => {
            if !origin_allowed(&app.config, &headers) {
                return crate::transport::json_error(StatusCode::FORBIDDEN, "origin not allowed");
            }
            poll(&endpoint, &headers, sid, &conn).await
        }
    }
}

/// Admits a polling client and answers with its open packet.
async fn handshake(
    app: &App,
    endpoint: &Endpoint,
    headers: &HeaderMap,
    query: &str,
    b64: bool,
    conn: &PendingSlot,
) -> warp::reply::Response {
    let hello = Hello {
        method: &Method::GET,
        path: &app.config.realizehit_path,
        query,
        headers,
    };
    let admitted = match admit(app, &hello, conn, Token::AtConnect, Via::Request).await {
        Ok(admitted) => admitted,
        Err(refused) => return *refused,
    };
    let Some((shared, socket)) = endpoint.open(Carrier::Polling, b64) else {
        return EioError::BadRequest.response(headers);
    };
    let client_ip = admitted.client_ip;
    let ctx = app.session_context(
        admitted.slot,
        admitted.ip_slot,
        client_ip,
        admitted.identity,
    );
    let span = tracing::info_span!("eio", client = %client_ip, dialect = "realizehit");
    tokio::spawn(
        session::run(Link::Socket(Box::new(socket)), endpoint.conversation(), ctx).instrument(span),
    );
    let frames = shared.take_out();
    let mut res = body(headers, &frames, b64);
    if let Ok(cookie) = format!("io={}; Path=/; HttpOnly", shared.sid).parse() {
        res.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    res
}

/// A held poll: answered with what is queued, at once or as it comes.
async fn poll(
    endpoint: &Endpoint,
    headers: &HeaderMap,
    sid: &str,
    conn: &PendingSlot,
) -> warp::reply::Response {
    let Some(shared) = endpoint.sids.get(sid) else {
        return EioError::UnknownSid.response(headers);
    };
    if shared.carrier() == Carrier::WebSocket || !shared.start_poll() {
        return EioError::BadRequest.response(headers);
    }
    conn.promote();
    let _held = Held(&shared);
    let b64 = shared.b64;
    let wait = tokio::time::sleep(endpoint.ping_interval);
    tokio::pin!(wait);
    let frames = loop {
        let frames = shared.take_out();
        if !frames.is_empty() {
            break frames;
        }
        tokio::select! {
            _ = shared.out_ready.notified() => {}
            _ = &mut wait => break vec![Frame::Text("6".into())],
        }
    };
    body(headers, &frames, b64)
}

/// A held poll, released however its request ends (a client that hangs
/// up drops the handler's future).
struct Held<'a>(&'a super::Shared);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.end_poll();
    }
}

/// `POST` with `sid`: the client's packets.
pub fn post(
    app: &App,
    endpoint: &Endpoint,
    headers: &HeaderMap,
    query: &str,
    body: &Bytes,
) -> warp::reply::Response {
    let q = Query::parse(query);
    if let Err(e) = q.check() {
        return e.response(headers);
    }
    let Some(sid) = q.sid else {
        return EioError::BadHandshakeMethod.response(headers);
    };
    if !origin_allowed(&app.config, headers) {
        return crate::transport::json_error(StatusCode::FORBIDDEN, "origin not allowed");
    }
    let Some(shared) = endpoint.sids.get(sid) else {
        return EioError::UnknownSid.response(headers);
    };
    if shared.carrier() == Carrier::WebSocket || q.transport != Some("polling") {
        return EioError::BadRequest.response(headers);
    }
    let refuse = |status: StatusCode, why: &str| {
        app.metrics.malformed_frames.inc();
        shared.push_out(super::framing::message(error_frame(why)));
        EioError::BadRequest.response_with(status, headers)
    };
    if body.len() > endpoint.max_message_bytes {
        let why = format!(
            "message too large: {} bytes, at most {}",
            body.len(),
            endpoint.max_message_bytes
        );
        return refuse(StatusCode::PAYLOAD_TOO_LARGE, &why);
    }
    let binary = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/octet-stream");
    let packets = if binary {
        super::packet::decode_binary_payload(body)
    } else {
        match std::str::from_utf8(body) {
            Ok(text) => super::packet::decode_string_payload(text),
            Err(_) => Err(super::packet::CodecError::Utf8),
        }
    };
    let packets = match packets {
        Ok(p) => p,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let texts: Vec<&str> = packets.iter().map(String::as_str).collect();
    match shared.received(&texts) {
        Ok(()) => respond(headers, "text/html", Bytes::from_static(b"ok")),
        Err(Refused::Codec(e)) => refuse(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(Refused::Full) => refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "too many messages in flight: wait for the replies",
        ),
    }
}

/// A transport-level refusal in the dialect's error shape (`{"err":..}`,
/// no id: it answers no request).
pub fn error_frame(why: &str) -> Frame {
    crate::protocol::realizehit::reply::error(None, why)
}

/// The response carrying `frames` as a payload.
fn body(headers: &HeaderMap, frames: &[Frame], b64: bool) -> warp::reply::Response {
    let bytes = payload(frames, b64);
    let content_type = if b64 {
        "text/plain; charset=UTF-8"
    } else {
        "application/octet-stream"
    };
    respond(headers, content_type, bytes)
}
