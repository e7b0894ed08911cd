//! Engine.IO over a WebSocket: a client that opens with one (no `sid`: a
//! handshake, admitted like any), and the upgrade of a polling session
//! (`sid`): the client sends `2probe`, we answer `3probe` and answer its
//! held poll with a noop (`6`) so it can pause polling, it sends `5`, and
//! from then on the session's packets go over the WebSocket. A probe that
//! does not complete within [`UPGRADE_TIMEOUT`] closes that WebSocket; the
//! session stays on polling.
//!
//! Each WebSocket is driven by a pump task: frames in become packets for
//! the session (`2` answered `3`), packets queued for the client go out as
//! frames, the same shared bytes. A text frame over
//! `WSGATE_MAX_MESSAGE_BYTES` is answered with a message `{"err":..}` (up
//! to four times that size; beyond, the socket closes with 1009); a binary
//! frame or an unreadable packet likewise, and the session carries on.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, Instrument};
use warp::http::{HeaderMap, Method, Response, StatusCode};

use super::framing;
use super::polling::error_frame;
use super::socket::Refused;
use super::{Carrier, EioError, Endpoint, Query, Shared};
use crate::app::App;
use crate::metrics::Metrics;
use crate::pending::PendingSlot;
use crate::protocol::Frame;
use crate::session::{self, link, Link};
use crate::transport::admission::{admit, origin_allowed, Carrier as Via, Hello, Token};
use crate::transport::websocket::{checked, switching};

/// How long a probe may take to complete (engine.io's `upgradeTimeout`).
pub const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);

type Ws = WebSocketStream<TokioIo<Upgraded>>;

/// What engine.io answers a refused upgrade with: 400, the message as text.
fn abort(e: EioError) -> warp::reply::Response {
    let mut res = Response::new(e.message().to_owned().into());
    *res.status_mut() = StatusCode::BAD_REQUEST;
    res.headers_mut().insert(
        warp::http::header::CONTENT_TYPE,
        warp::http::HeaderValue::from_static("text/html"),
    );
    res
}

/// A WebSocket request on the Engine.IO path.
pub async fn upgrade(
    app: Arc<App>,
    endpoint: Arc<Endpoint>,
    headers: &HeaderMap,
    query: &str,
    upgrade: Option<OnUpgrade>,
    conn: &PendingSlot,
) -> warp::reply::Response {
    let q = Query::parse(query);
    match q.check() {
        Ok(Carrier::WebSocket) => {}
        Ok(_) => return abort(EioError::BadRequest),
        Err(e) => return abort(e),
    }
    let (accept, upgrade) = match checked(headers, upgrade) {
        Ok(ok) => ok,
        Err(refused) => return *refused,
    };
    let config = app
        .ws_config()
        .max_message_size(Some(endpoint.max_message_bytes.saturating_mul(4)))
        .max_frame_size(Some(endpoint.max_message_bytes.saturating_mul(4)));
    let metrics = app.metrics.clone();
    let max = endpoint.max_message_bytes;
    if let Some(sid) = q.sid {
        if !origin_allowed(&app.config, headers) {
            return crate::transport::json_error(StatusCode::FORBIDDEN, "origin not allowed");
        }
        let Some(shared) = endpoint.sids.get(sid) else {
            return abort(EioError::UnknownSid);
        };
        if shared.carrier() != Carrier::Polling {
            return abort(EioError::BadRequest);
        }
        shared.set_carrier(Carrier::Upgrading);
        conn.promote();
        let span = tracing::info_span!("eio-upgrade", sid = %shared.sid);
        tokio::spawn(
            async move {
                let Ok(upgraded) = upgrade.await else {
                    shared.set_carrier(Carrier::Polling);
                    return;
                };
                let mut ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                if probe(&mut ws, &shared).await {
                    shared.set_carrier(Carrier::WebSocket);
                    pump(ws, shared, max, metrics).await;
                } else {
                    debug!("upgrade not completed");
                    shared.set_carrier(Carrier::Polling);
                    let _ = ws.close(None).await;
                }
            }
            .instrument(span),
        );
        return switching(&accept, None);
    }
    let hello = Hello {
        method: &Method::GET,
        path: &app.config.realizehit_path,
        query,
        headers,
    };
    let admitted = match admit(&app, &hello, conn, Token::AtConnect, Via::Upgrade).await {
        Ok(admitted) => admitted,
        Err(refused) => return *refused,
    };
    let Some((shared, socket)) = endpoint.open(Carrier::WebSocket, false) else {
        return abort(EioError::BadRequest);
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
        session::run(Link::Socket(Box::new(socket)), endpoint.conversation(), ctx)
            .instrument(span.clone()),
    );
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
                    pump(ws, shared, max, metrics).await;
                }
                Err(e) => {
                    debug!(cause = %e, "upgrade failed");
                    shared.client_gone();
                }
            }
        }
        .instrument(span),
    );
    switching(&accept, None)
}

/// The probe exchange; `true` once the client sent `5`.
async fn probe(ws: &mut Ws, shared: &Shared) -> bool {
    let exchange = async {
        let mut probed = false;
        while let Some(Ok(frame)) = ws.next().await {
            match frame {
                Message::Text(t) if !probed && t.as_str() == "2probe" => {
                    if ws.send(Message::Text("3probe".into())).await.is_err() {
                        return false;
                    }
                    probed = true;
                    // Answers the held poll: the client pauses polling.
                    shared.push_out(Frame::Text("6".into()));
                }
                Message::Text(t) if probed && t.as_str() == "5" => return true,
                Message::Ping(_) | Message::Pong(_) => {}
                _ => return false,
            }
        }
        false
    };
    tokio::time::timeout(UPGRADE_TIMEOUT, exchange)
        .await
        .unwrap_or(false)
}

/// Drives the WebSocket of a session until either side ends.
async fn pump(mut ws: Ws, shared: Arc<Shared>, max: usize, metrics: Metrics) {
    let refuse = |why: &str| {
        metrics.malformed_frames.inc();
        shared.push_out(framing::message(error_frame(why)));
    };
    loop {
        tokio::select! {
            frame = ws.next() => {
                let text = match frame {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Binary(_))) => {
                        refuse("binary packets are not supported: send text");
                        continue;
                    }
                    Some(Ok(Message::Close(_))) | None => {
                        shared.client_gone();
                        break;
                    }
                    Some(Err(e)) => {
                        debug!(cause = %e, "read failed");
                        shared.client_gone();
                        // Tell the client why when it can hear it (1009).
                        if let link::End::Close(code, reason) = link::read_error(e) {
                            let _ = ws.close(Some(close_frame(code, reason.into_owned()))).await;
                        }
                        break;
                    }
                    Some(Ok(_)) => continue,
                };
                if text.len() > max {
                    refuse(&format!("message too large: {} bytes, at most {max}", text.len()));
                    continue;
                }
                match shared.received(&[text.as_str()]) {
                    Ok(()) => {}
                    Err(Refused::Codec(e)) => refuse(&e.to_string()),
                    Err(Refused::Full) => refuse("too many messages in flight: wait for the replies"),
                }
            }
            _ = shared.out_ready.notified() => {
                let closing = shared.session_closed();
                for frame in shared.take_out() {
                    if ws.feed(link::message(frame)).await.is_err() {
                        shared.client_gone();
                        return;
                    }
                }
                if ws.flush().await.is_err() {
                    shared.client_gone();
                    return;
                }
                if closing {
                    let _ = ws.close(None).await;
                    return;
                }
            }
        }
    }
}

fn close_frame(code: u16, reason: String) -> tokio_tungstenite::tungstenite::protocol::CloseFrame {
    tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: code.into(),
        reason: reason.into(),
    }
}
