//! Engine.IO protocol 3 (engine.io 1.8, the server realizehit shipped):
//! polling, the WebSocket upgrade with its probe, and WebSocket-only
//! clients, at `WSGATE_REALIZEHIT_PATH` (`/ws/`).
//!
//! - A request without `sid` is a handshake (`GET` only): it passes
//!   [`admission::admit`], starts a session with an [`EioSocket`] as its
//!   link, and is answered with the open packet
//!   `0{"sid","upgrades","pingInterval","pingTimeout"}` (over polling, or as
//!   the WebSocket's first frame).
//! - `GET`/`POST` with `sid` poll and send (`polling.rs`); a WebSocket with
//!   `sid` is the upgrade (`websocket.rs`: `2probe`, `3probe`, a noop to
//!   the held poll, `5`).
//! - Errors are engine.io's: `400 {"code":0,"message":"Transport unknown"}`,
//!   `1` Session ID unknown (sids are node-local: the client handshakes
//!   again), `2` Bad handshake method, `3` Bad request; a protocol other
//!   than 3 gets `5` Unsupported protocol version.
//!
//! The session never sees packets: it reads message texts and writes
//! frames that [`framing`] already made message packets, rendered once
//! per broker message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use warp::http::{header, HeaderMap, HeaderValue, Response, StatusCode};

use crate::config::Config;
use crate::protocol::realizehit;
use crate::protocol::{Conversation, Frame, Render};

pub mod framing;
pub mod packet;
pub mod polling;
pub mod socket;
pub mod websocket;

pub use socket::{Carrier, EioSocket, Shared};

/// The render key of realizehit over Engine.IO.
const RENDER_KEY: &str = "realizehit.eio";

/// Engine.IO's error codes (engine.io 1.8's `Server.errors`, and protocol
/// 4's code 5): a closed set, each with its fixed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EioError {
    /// `transport` is neither `polling` nor `websocket`.
    UnknownTransport = 0,
    /// No session of this node has that sid.
    UnknownSid = 1,
    /// A handshake that is not a `GET`.
    BadHandshakeMethod = 2,
    /// Anything else wrong with the request.
    BadRequest = 3,
    /// `EIO` other than 3.
    UnsupportedProtocolVersion = 5,
}

impl EioError {
    /// engine.io's message for the code.
    pub fn message(self) -> &'static str {
        match self {
            EioError::UnknownTransport => "Transport unknown",
            EioError::UnknownSid => "Session ID unknown",
            EioError::BadHandshakeMethod => "Bad handshake method",
            EioError::BadRequest => "Bad request",
            EioError::UnsupportedProtocolVersion => "Unsupported protocol version",
        }
    }

    /// The 400 engine.io answers a polling request with.
    pub fn response(self, headers: &HeaderMap) -> warp::reply::Response {
        self.response_with(StatusCode::BAD_REQUEST, headers)
    }

    /// The same body with another status (413 for a body too large).
    pub fn response_with(self, status: StatusCode, headers: &HeaderMap) -> warp::reply::Response {
        let body = format!(
            "{{\"code\":{},\"message\":\"{}\"}}",
            self as u8,
            self.message()
        );
        let mut res = super::json(status, body);
        cors(headers, &mut res);
        res
    }
}

/// Sessions of this node by sid; cloning shares the map. Bounded like the
/// sessions: every entry belongs to a running one, which removes it when it
/// ends.
#[derive(Clone, Default)]
pub struct Sids {
    map: Arc<Mutex<HashMap<String, Arc<Shared>>>>,
}

impl Sids {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Shared>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The session of `sid`, on this node.
    pub fn get(&self, sid: &str) -> Option<Arc<Shared>> {
        self.lock().get(sid).cloned()
    }

    fn insert(&self, shared: Arc<Shared>) {
        self.lock().insert(shared.sid.clone(), shared);
    }

    fn remove(&self, sid: &str) {
        self.lock().remove(sid);
    }
}

/// The realizehit mount: its sessions and settings, one per node.
pub struct Endpoint {
    /// Live sessions by sid.
    pub sids: Sids,
    /// realizehit's render, as message packets (shared by every member).
    pub render: Arc<dyn Render>,
    /// `pingInterval` announced (`WSGATE_PING_INTERVAL_MS`).
    pub ping_interval: Duration,
    /// `pingTimeout` announced (`WSGATE_PONG_TIMEOUT_MS`).
    pub ping_timeout: Duration,
    /// Longest message (a POST body, a WebSocket frame), in bytes.
    pub max_message_bytes: usize,
    /// Bytes queued between a session and its transport.
    pub queue_bytes: usize,
}

impl Endpoint {
    /// The endpoint of a node with `config`.
    pub fn new(config: &Config) -> Endpoint {
        Endpoint {
            sids: Sids::default(),
            render: Arc::new(framing::PacketRender::new(realizehit::render(), RENDER_KEY)),
            ping_interval: config.ping_interval,
            ping_timeout: config.pong_timeout,
            max_message_bytes: config.max_message_bytes.get(),
            queue_bytes: config.client_queue_bytes.get(),
        }
    }

    /// A fresh session's conversation.
    pub fn conversation(&self) -> Box<dyn Conversation> {
        Box::new(framing::PacketConversation::new(Box::new(
            realizehit::RealizehitConversation::new(self.render.clone()),
        )))
    }

    /// Registers a fresh session on `carrier` and queues its open packet.
    pub fn open(&self, carrier: Carrier, b64: bool) -> Option<(Arc<Shared>, EioSocket)> {
        let sid = crate::protocol::bayeux::client_id::ClientId::generate()
            .ok()?
            .as_str()
            .to_owned();
        let shared = Arc::new(Shared::new(
            sid.clone(),
            carrier,
            self.ping_interval + self.ping_timeout,
            self.queue_bytes,
            self.max_message_bytes.saturating_mul(4),
            b64,
        ));
        let upgrades = if carrier == Carrier::Polling {
            "[\"websocket\"]"
        } else {
            "[]"
        };
        shared.push_out(Frame::text(format!(
            "0{{\"sid\":\"{sid}\",\"upgrades\":{upgrades},\"pingInterval\":{},\"pingTimeout\":{}}}",
            self.ping_interval.as_millis(),
            self.ping_timeout.as_millis()
        )));
        self.sids.insert(shared.clone());
        let socket = EioSocket::new(shared.clone(), self.sids.clone());
        Some((shared, socket))
    }
}

/// The query parameters Engine.IO uses.
#[derive(Debug, Default)]
pub struct Query<'a> {
    /// `EIO`: the protocol version.
    pub eio: Option<&'a str>,
    /// `transport`: `polling` or `websocket`.
    pub transport: Option<&'a str>,
    /// `sid`: the session, after the handshake.
    pub sid: Option<&'a str>,
    /// `b64`: string payloads.
    pub b64: bool,
}

impl<'a> Query<'a> {
    /// Reads `EIO`, `transport`, `sid` and `b64` (values as sent: none of
    /// them needs percent-decoding).
    pub fn parse(query: &'a str) -> Query<'a> {
        let mut q = Query::default();
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "EIO" => q.eio = Some(v),
                "transport" => q.transport = Some(v),
                "sid" if !v.is_empty() => q.sid = Some(v),
                "b64" => q.b64 = !v.is_empty() && v != "0" && v != "false",
                _ => {}
            }
        }
        q
    }

    /// The transport asked for, when it is one we serve, and the version
    /// checked.
    pub fn check(&self) -> Result<Carrier, EioError> {
        if self.eio.is_some_and(|v| v != "3") {
            return Err(EioError::UnsupportedProtocolVersion);
        }
        match self.transport {
            Some("polling") => Ok(Carrier::Polling),
            Some("websocket") => Ok(Carrier::WebSocket),
            _ => Err(EioError::UnknownTransport),
        }
    }
}

/// engine.io's CORS headers on a polling response: the `Origin` echoed
/// with credentials, or `*` without one. (Admission has already refused
/// an origin the node does not allow.)
pub fn cors(headers: &HeaderMap, res: &mut warp::reply::Response) {
    let h = res.headers_mut();
    match headers.get(header::ORIGIN) {
        Some(origin) => {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        None => {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
        }
    }
}

/// A plain response: `body` with `content_type`, and the CORS headers.
pub fn respond(
    headers: &HeaderMap,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> warp::reply::Response {
    let body: Bytes = body.into();
    let mut res = Response::new(body.into());
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    cors(headers, &mut res);
    res
}
