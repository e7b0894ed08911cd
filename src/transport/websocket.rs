//! The WebSocket transport: the upgrade, checked strictly, then admitted,
//! then handed to a session with the dialect its path mounts.
//!
//! We answer the handshake ourselves (from hyper's upgrade handle) instead
//! of using warp's `ws()` filter, because that filter fixes tungstenite's
//! 128 KiB per-socket read buffer; ours comes from the config (see
//! `docs/design.md`).

use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, Instrument};
use warp::http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};

use super::admission::{admit, Carrier, Hello, Token};
use super::json_error;
use crate::app::App;
use crate::auth;
use crate::deflate::inflate::InflateIo;
use crate::deflate::{offer, DeflateConversation};
use crate::pending::PendingSlot;
use crate::protocol::bayeux::conversation::{BayeuxConversation, Endpoint};
use crate::protocol::native::NativeConversation;
use crate::protocol::roadrunner::RoadRunnerConversation;
use crate::protocol::socketstream::{self, SocketStreamConversation};
use crate::protocol::Conversation;
use crate::session::direct::Direct;
use crate::session::{self, Link};

/// Which dialect a path serves (the mount table is the config plus this).
#[derive(Clone)]
pub enum Mount {
    /// The native protocol (`WSGATE_WS_PATH`).
    Native,
    /// Bayeux (`WSGATE_BAYEUX_PATH`, `WSGATE_NODEFONY_PATH`).
    Bayeux(Arc<Endpoint>),
    /// RoadRunner websockets v2 (`WSGATE_ROADRUNNER_PATH`).
    RoadRunner,
    /// SocketStream 0.4 (`WSGATE_SOCKETSTREAM_PATH`).
    SocketStream(Arc<socketstream::Endpoint>),
    /// Service and consumer processes (`WSGATE_SERVICES_PATH`): not a
    /// client session ([`super::services`]).
    Services,
}

/// Answers the WebSocket handshake and starts the session once hyper hands
/// over the connection.
///
/// The handshake is checked strictly first (RFC 6455 section 4.2.1), each
/// failure a 400 saying what is wrong: a `Host`, `Connection: Upgrade` and
/// `Upgrade: websocket`, `Sec-WebSocket-Version: 13` (else also answered
/// with the version we speak), and one `Sec-WebSocket-Key` that is the
/// base64 of 16 bytes.
pub async fn upgrade(
    app: Arc<App>,
    mount: Mount,
    path: &str,
    headers: &HeaderMap,
    query: &str,
    upgrade: Option<OnUpgrade>,
    conn: &PendingSlot,
) -> warp::reply::Response {
    let peer = conn.peer();
    let (accept, upgrade) = match checked(headers, upgrade) {
        Ok(ok) => ok,
        Err(refused) => return *refused,
    };
    // Only dialects whose session ends with its socket: a lingering Bayeux
    // session may be handed sockets that did not agree.
    let deflate = match mount {
        Mount::Native | Mount::RoadRunner | Mount::SocketStream(_) if app.config.compression => {
            offer::negotiate(
                headers
                    .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
                    .iter()
                    .map(HeaderValue::as_bytes),
            )
        }
        _ => None,
    };
    let token = match &mount {
        Mount::Native | Mount::RoadRunner | Mount::SocketStream(_) => Token::AtConnect,
        Mount::Bayeux(_) | Mount::Services => Token::ByDialect,
    };
    let hello = Hello {
        method: &Method::GET,
        path,
        query,
        headers,
    };
    let admitted = match admit(&app, &hello, conn, token, Carrier::Upgrade).await {
        Ok(admitted) => admitted,
        Err(refused) => return *refused,
    };
    let client_ip = admitted.client_ip;
    let conv: Box<dyn Conversation> = match mount {
        Mount::Services => {
            return super::services::accept(
                app,
                admitted,
                headers,
                query,
                upgrade,
                switching(&accept, None),
            )
        }
        Mount::Native => Box::new(NativeConversation),
        Mount::Bayeux(endpoint) => {
            let token = auth::request_token(headers, query).ok();
            Box::new(BayeuxConversation::new(endpoint, token))
        }
        Mount::RoadRunner => Box::new(RoadRunnerConversation::new()),
        Mount::SocketStream(endpoint) => Box::new(SocketStreamConversation::new(endpoint)),
    };
    let conv: Box<dyn Conversation> = match &deflate {
        Some((agreed, _)) => Box::new(DeflateConversation::new(conv, *agreed)),
        None => conv,
    };
    let inflate = deflate.is_some();
    let ctx = app.session_context(
        admitted.slot,
        admitted.ip_slot,
        client_ip,
        admitted.identity,
    );
    let config = app.ws_config();
    // A session that outlives its socket (Bayeux) keeps the session task's
    // writes: its outbox outlives the socket too.
    let direct = app.config.direct_writes && !conv.may_linger();
    let span =
        tracing::info_span!("conn", peer = %peer, client = %client_ip, dialect = conv.name());
    tokio::spawn(
        async move {
            let upgraded = match upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    debug!(cause = %e, "upgrade failed");
                    return;
                }
            };
            let link = if direct {
                match upgraded.downcast::<TokioIo<TcpStream>>() {
                    Ok(parts) => Ok(Link::Direct(Box::new(Direct {
                        stream: parts.io.into_inner(),
                        prefix: parts.read_buf,
                        config,
                        inflate,
                    }))),
                    Err(upgraded) => {
                        debug!("not a plain TCP connection: the session task writes");
                        Err(upgraded)
                    }
                }
            } else {
                Err(upgraded)
            };
            let link = match link {
                Ok(link) => link,
                Err(upgraded) if inflate => {
                    let limit = config.max_message_size.unwrap_or(usize::MAX);
                    let io = InflateIo::new(TokioIo::new(upgraded), limit);
                    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
                    Link::Socket(Box::new(ws))
                }
                Err(upgraded) => {
                    let ws = WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        Some(config),
                    )
                    .await;
                    Link::Socket(Box::new(ws))
                }
            };
            // The session is a task of its own, so this one's state (the
            // upgrade, the context it was given) is freed now, not kept
            // beside the session's for the socket's whole life.
            tokio::spawn(session::run(link, conv, ctx).in_current_span());
        }
        .instrument(span),
    );
    switching(&accept, deflate.as_ref().map(|(_, answer)| answer.as_str()))
}

/// Checks an upgrade request strictly (see [`upgrade`]): the
/// `Sec-WebSocket-Accept` value and the upgrade handle, or the 400.
pub fn checked(
    headers: &HeaderMap,
    upgrade: Option<OnUpgrade>,
) -> Result<(String, OnUpgrade), Box<warp::reply::Response>> {
    let refuse = |why: &str| Err(Box::new(json_error(StatusCode::BAD_REQUEST, why)));
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if headers.get(header::HOST).is_none_or(|h| h.is_empty()) {
        return refuse("missing Host header");
    }
    if !has(header::CONNECTION, "upgrade") || !has(header::UPGRADE, "websocket") {
        return refuse("expected a WebSocket upgrade request");
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
        return Err(Box::new(res));
    }
    let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let Some(key) = keys.next() else {
        return refuse("missing Sec-WebSocket-Key");
    };
    let nonce_ok = base64::engine::general_purpose::STANDARD
        .decode(key.as_bytes())
        .is_ok_and(|nonce| nonce.len() == 16);
    if keys.next().is_some() || !nonce_ok {
        return refuse("invalid Sec-WebSocket-Key: expected one, the base64 of 16 random bytes");
    }
    let Some(upgrade) = upgrade else {
        return refuse("connection cannot be upgraded");
    };
    Ok((derive_accept_key(key.as_bytes()), upgrade))
}

/// The `101 Switching Protocols` answer, with the extension agreed (our
/// `Sec-WebSocket-Extensions` answer), if any.
pub fn switching(accept: &str, extensions: Option<&str>) -> warp::reply::Response {
    let mut res = Response::new(Bytes::new().into());
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = res.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(v) = extensions.and_then(|e| HeaderValue::from_str(e).ok()) {
        h.insert(header::SEC_WEBSOCKET_EXTENSIONS, v);
    }
    res
}
