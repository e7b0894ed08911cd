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
//! - `POST /disconnect`, `POST /unsubscribe`: the operator API
//!   ([`operator`]), behind the same key and body bound as `/publish`.
//! - `GET /history`: a page of a history channel ([`history`]).
//! - `GET /presence`: a presence channel's members ([`presence`]).
//! - `GET /shard?channel=..`: the Redis server that owns a channel
//!   ([`shard`]), behind the publish API key.
//! - `GET /healthz` (process alive), `GET /readyz` (broker connected and
//!   synced), `GET /metrics` (Prometheus text).
//!
//! Every refusal is a JSON body `{"error": "..."}` with a fitting status.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::StreamExt;
use hyper::upgrade::OnUpgrade;
use serde::Deserialize;
use serde_json::value::RawValue;
use tracing::debug;
use warp::http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use warp::{Filter, Rejection};

use crate::app::App;
use crate::auth;
use crate::broker::Publication;
use crate::config::Config;
use crate::pending::PendingSlot;
use crate::protocol::bayeux::conversation::Endpoint;
use crate::protocol::bayeux::message::DecodeError;
use crate::protocol::bayeux::reply;
use crate::publish::{json_payload, present};
use crate::shutdown::Phase;
use crate::transport::websocket::{self, Mount};
use crate::transport::{json, json_error, polling, unauthorised};

mod dialects;
mod history;
mod operator;
mod presence;
mod shard;

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
    let ws = socket_route(app.clone(), conn.clone(), |a| {
        (Mount::Native, &a.config.ws_path)
    });
    let services = socket_route(app.clone(), conn.clone(), |a| {
        (Mount::Services, &a.config.services_path)
    });
    let more = dialects::routes(app.clone(), conn.clone());
    let sse = sse_route(app.clone(), conn.clone());
    let bayeux = bayeux_routes(app.clone(), conn.clone());
    let peer = conn.peer().ip();
    let realizehit = realizehit_routes(app.clone(), conn);
    let operator = operator::routes(app.clone());
    let history = history::route(app.clone(), peer);
    let presence = presence::route(app.clone());
    let shard = shard::route(app.clone());
    let publish = warp::path("publish").and(warp::path::end()).and(
        warp::post()
            .and(authorised_body(app.clone()))
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
            ws.or(bayeux)
                .unify()
                .or(more)
                .unify()
                .or(services)
                .unify()
                .or(sse)
                .unify()
                .or(realizehit)
                .unify()
                .or(publish)
                .unify()
                .or(operator
                    .or(history)
                    .unify()
                    .or(presence)
                    .unify()
                    .or(shard)
                    .unify()
                    .boxed())
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

/// The server-sent events endpoint (`WSGATE_SSE_PATH`): the stream on
/// `GET`, the CORS preflight on `OPTIONS`.
fn sse_route(
    app: Arc<App>,
    conn: Arc<PendingSlot>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    let with_app = {
        let app = app.clone();
        warp::any().map(move || app.clone())
    };
    let with_conn = warp::any().map(move || conn.clone());
    let on_path = warp::path::full()
        .and(with_app.clone())
        .and_then(|path: warp::path::FullPath, app: Arc<App>| async move {
            if path.as_str() == app.config.sse_path {
                Ok(())
            } else {
                Err(warp::reject::not_found())
            }
        })
        .untuple_one();
    let get = warp::get()
        .and(with_app.clone())
        .and(warp::header::headers_cloned())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(with_conn)
        .then(crate::transport::sse::serve);
    let options = warp::options()
        .and(with_app)
        .and(warp::header::headers_cloned())
        .map(|app: Arc<App>, headers: HeaderMap| polling::preflight(&app, &headers));
    on_path.and(
        get.or(options)
            .unify()
            .recover(recover_on("GET, OPTIONS", app))
            .unify(),
    )
}

/// A raw WebSocket mount: `GET` of the exact path `mount` names, upgraded
/// (strictly, and admitted as every upgrade is) to the dialect it names;
/// every other method on that path is 405. The native protocol, RoadRunner
/// and SocketStream are each one of these.
pub(crate) fn socket_route(
    app: Arc<App>,
    conn: Arc<PendingSlot>,
    mount: for<'a> fn(&'a App) -> (Mount, &'a String),
) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    let with_app = {
        let app = app.clone();
        warp::any().map(move || app.clone())
    };
    let on_path = warp::path::full()
        .and(with_app.clone())
        .and_then(
            move |path: warp::path::FullPath, app: Arc<App>| async move {
                if path.as_str() == mount(&app).1 {
                    Ok(())
                } else {
                    Err(warp::reject::not_found())
                }
            },
        )
        .untuple_one();
    on_path.and(
        warp::get()
            .and(with_app)
            .and(warp::header::headers_cloned())
            .and(warp::query::raw().or(warp::any().map(String::new)).unify())
            .and(warp::ext::optional::<OnUpgrade>())
            .then(
                move |app: Arc<App>,
                      headers: HeaderMap,
                      query: String,
                      upgrade: Option<OnUpgrade>| {
                    let conn = conn.clone();
                    async move {
                        let (mount, path) = mount(&app);
                        let path = path.clone();
                        websocket::upgrade(app, mount, &path, &headers, &query, upgrade, &conn)
                            .await
                    }
                },
            )
            .recover(recover_on("GET", app))
            .unify(),
    )
}

/// The Bayeux endpoints (`WSGATE_BAYEUX_PATH`, `WSGATE_NODEFONY_PATH`, each
/// also with `/handshake`, `/connect`, `/subscribe`, `/unsubscribe` or
/// `/disconnect` appended, as CometD does): a WebSocket upgrade or JSONP on
/// `GET`, long-polling on `POST`, the CORS preflight on `OPTIONS`.
fn bayeux_routes(
    app: Arc<App>,
    conn: Arc<PendingSlot>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    let with_app = {
        let app = app.clone();
        warp::any().map(move || app.clone())
    };
    let with_conn = warp::any().map(move || conn.clone());
    let mount = warp::path::full().and(with_app.clone()).and_then(
        |path: warp::path::FullPath, app: Arc<App>| async move {
            let path = path.as_str();
            let under = |base: &str| {
                path == base
                    || path.strip_prefix(base).is_some_and(|rest| {
                        matches!(
                            rest,
                            "/" | "/handshake"
                                | "/connect"
                                | "/subscribe"
                                | "/unsubscribe"
                                | "/disconnect"
                        )
                    })
            };
            if under(&app.config.bayeux_path) {
                Ok(app.bayeux.clone())
            } else if under(&app.config.nodefony_path) {
                Ok(app.nodefony.clone())
            } else {
                Err(warp::reject::not_found())
            }
        },
    );
    let query = || warp::query::raw().or(warp::any().map(String::new)).unify();
    let get = warp::get()
        .and(with_app.clone())
        .and(mount.clone())
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .and(query())
        .and(warp::ext::optional::<OnUpgrade>())
        .and(with_conn.clone())
        .then(
            |app: Arc<App>,
             endpoint: Arc<Endpoint>,
             path: warp::path::FullPath,
             headers: HeaderMap,
             query: String,
             upgrade: Option<OnUpgrade>,
             conn: Arc<PendingSlot>| async move {
                let path = path.as_str();
                if headers.contains_key(header::UPGRADE) {
                    let mount = Mount::Bayeux(endpoint);
                    websocket::upgrade(app, mount, path, &headers, &query, upgrade, &conn).await
                } else {
                    polling::jsonp(app, endpoint, path, headers, query, conn).await
                }
            },
        );
    let post = warp::post()
        .and(with_app.clone())
        .and(mount.clone())
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .and(query())
        .and(body_upto(
            app.config.max_message_bytes.get() as u64,
            app.config.http_body_timeout,
        ))
        .and(with_conn)
        .then(polling::post);
    let options = warp::options()
        .and(with_app.clone())
        .and(mount.clone())
        .and(warp::header::headers_cloned())
        .map(|app: Arc<App>, _: Arc<Endpoint>, headers: HeaderMap| {
            polling::preflight(&app, &headers)
        });
    mount.and(
        get.or(post)
            .unify()
            .or(options)
            .unify()
            .recover(move |rejection: Rejection| {
                let app = app.clone();
                async move { Ok::<_, std::convert::Infallible>(bayeux_refusal(&rejection, &app)) }
            })
            .unify(),
    )
    .map(|_: Arc<Endpoint>, res: warp::reply::Response| res)
}

// realizehit over Engine.IO 3 (docs/dialects/realizehit.md).

/// realizehit: the Engine.IO endpoint (`WSGATE_REALIZEHIT_PATH`: polling
/// `GET`/`POST`, the WebSocket on `GET` with `Upgrade`, the CORS preflight)
/// and the HTTP publisher (`POST WSGATE_REALIZEHIT_PUBLISH_PATH`, under the
/// publish API key, answered in plain text).
fn realizehit_routes(
    app: Arc<App>,
    conn: Arc<PendingSlot>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    use crate::protocol::realizehit::publish as rh;
    use crate::transport::engineio;
    let with_app = {
        let app = app.clone();
        warp::any().map(move || app.clone())
    };
    let with_conn = warp::any().map(move || conn.clone());
    let on = |pick: fn(&Config) -> &str| {
        warp::path::full()
            .and(with_app.clone())
            .and_then(
                move |path: warp::path::FullPath, app: Arc<App>| async move {
                    if path.as_str() == pick(&app.config) {
                        Ok(())
                    } else {
                        Err(warp::reject::not_found())
                    }
                },
            )
            .untuple_one()
    };
    let query = || warp::query::raw().or(warp::any().map(String::new)).unify();
    let get = warp::get()
        .and(with_app.clone())
        .and(warp::header::headers_cloned())
        .and(query())
        .and(warp::ext::optional::<OnUpgrade>())
        .and(with_conn)
        .then(
            |app: Arc<App>,
             headers: HeaderMap,
             query: String,
             upgrade: Option<OnUpgrade>,
             conn: Arc<PendingSlot>| async move {
                let endpoint = app.realizehit.clone();
                if headers.contains_key(header::UPGRADE) {
                    engineio::websocket::upgrade(app, endpoint, &headers, &query, upgrade, &conn)
                        .await
                } else {
                    engineio::polling::get(app, endpoint, headers, query, conn).await
                }
            },
        );
    let post = warp::post()
        .and(with_app.clone())
        .and(warp::header::headers_cloned())
        .and(query())
        .and(body_upto(
            app.config.max_message_bytes.get() as u64 * 4,
            app.config.http_body_timeout,
        ))
        .map(
            |app: Arc<App>, headers: HeaderMap, query: String, body: Bytes| {
                engineio::polling::post(&app, &app.realizehit, &headers, &query, &body)
            },
        );
    let options = warp::options()
        .and(with_app.clone())
        .and(warp::header::headers_cloned())
        .map(|app: Arc<App>, headers: HeaderMap| polling::preflight(&app, &headers));
    let eio = on(|c| &c.realizehit_path).and(
        get.or(post)
            .unify()
            .or(options)
            .unify()
            .recover(recover_on("GET, POST, OPTIONS", app.clone()))
            .unify(),
    );
    let publish = on(|c| &c.realizehit_publish_path).and(
        warp::post()
            .and(authorised_body(app.clone()))
            .then(|app: Arc<App>, body: Bytes| async move {
                app.metrics.publish_requests.inc();
                let text = |status: StatusCode, body: &'static str| {
                    let mut res = Response::new(body.into());
                    *res.status_mut() = status;
                    res.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("text/html; charset=utf-8"),
                    );
                    res
                };
                match rh::parse(&body) {
                    Err(why) => text(StatusCode::BAD_REQUEST, why),
                    Ok(publication) => match app.hub.publish(publication).await {
                        Ok(_) => text(StatusCode::OK, rh::QUEUED),
                        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, rh::FAILED),
                    },
                }
            })
            .recover(recover_on("POST", app.clone()))
            .unify(),
    );
    eio.or(publish).unify()
}

/// A rejection on a Bayeux path: a body over `WSGATE_MAX_MESSAGE_BYTES` is
/// answered the Bayeux way (`400:body too large:Bad request`, status 413),
/// anything else as on every route.
fn bayeux_refusal(rejection: &Rejection, app: &App) -> warp::reply::Response {
    let too_large = rejection.find::<warp::reject::PayloadTooLarge>().is_some()
        || rejection.find::<BodyTooLarge>().is_some();
    if too_large {
        let max = app.config.max_message_bytes.get();
        let error = DecodeError::TooLarge { size: max + 1, max };
        return json(StatusCode::PAYLOAD_TOO_LARGE, reply::bad_body(&error));
    }
    refusal(rejection, "GET, POST, OPTIONS", app)
}

/// The body of a request, at most `limit` bytes (by `Content-Length`, which
/// is required), read in full within `deadline` of the head: a client that
/// announces a body and sends it slowly, or not at all, gets 408 and its
/// connection closed instead of holding it open.
/// The publish API's gate, then its body: the key checked first (401
/// before any byte of the body is read), then at most
/// `WSGATE_MAX_PUBLISH_BYTES` within `WSGATE_HTTP_BODY_TIMEOUT_MS`. Every
/// publish path (`/publish`, realizehit's, RoadRunner's) passes it.
pub(crate) fn authorised_body(
    app: Arc<App>,
) -> impl Filter<Extract = (Arc<App>, Bytes), Error = Rejection> + Clone {
    let (limit, deadline) = (
        app.config.max_publish_bytes.get() as u64,
        app.config.http_body_timeout,
    );
    with_api_key(app).and(body_within(limit, deadline))
}

/// The app, once the request carries the publish API key (when one is
/// configured); else the request is refused and counted. Shared by every
/// route behind that key.
fn with_api_key(
    app: Arc<App>,
) -> impl Filter<Extract = (Arc<App>,), Error = warp::Rejection> + Clone {
    warp::any()
        .map(move || app.clone())
        .and(warp::header::headers_cloned())
        .and_then(|app: Arc<App>, headers: HeaderMap| async move {
            if publish_authorised(&app, &headers) {
                Ok(app)
            } else {
                app.metrics.refused.with_label_values(&["api_key"]).inc();
                Err(warp::reject::custom(Unauthorised))
            }
        })
}

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
                    return Err(warp::reject::custom(BodyTooLarge));
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

/// A body longer than its route's limit, declared or (chunked) as it came.
#[derive(Debug)]
struct BodyTooLarge;

impl warp::reject::Reject for BodyTooLarge {}

/// A body of at most `limit` bytes, with or without `Content-Length`
/// (CometD's Node client sends chunked bodies), read within `deadline`.
fn body_upto(
    limit: u64,
    deadline: Duration,
) -> impl Filter<Extract = (Bytes,), Error = Rejection> + Clone {
    warp::header::optional::<u64>("content-length")
        .and_then(move |declared: Option<u64>| async move {
            match declared {
                Some(n) if n > limit => Err(warp::reject::custom(BodyTooLarge)),
                _ => Ok(()),
            }
        })
        .untuple_one()
        .and(warp::body::stream())
        .and_then(move |stream| read_body(stream, limit, deadline))
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
    } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some()
        || rejection.find::<BodyTooLarge>().is_some()
    {
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
