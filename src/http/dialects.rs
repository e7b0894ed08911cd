//! The routes of the RoadRunner and SocketStream dialects:
//!
//! - `GET WSGATE_ROADRUNNER_PATH`, `GET WSGATE_SOCKETSTREAM_PATH`: the
//!   WebSocket upgrade (admitted as every upgrade is), exact paths;
//! - `POST WSGATE_ROADRUNNER_PUBLISH_PATH` (and the same plus `-async`):
//!   RoadRunner's broadcast RPC as JSON, under the publish API key. The
//!   sync one answers `{"ok":true}` once Redis took every message; the
//!   async one as soon as the body is valid (while fewer than
//!   [`crate::app::ROADRUNNER_ASYNC_IN_FLIGHT`] wait for the broker; beyond that, it
//!   waits like the sync one, so nothing queues without bound).

use std::sync::Arc;

use bytes::Bytes;
use hyper::upgrade::OnUpgrade;
use tracing::debug;
use warp::http::{HeaderMap, StatusCode};
use warp::{Filter, Rejection};

use super::{authorised_body, recover_on, refusal};
use crate::app::App;
use crate::pending::PendingSlot;
use crate::protocol::roadrunner::publish;
use crate::transport::websocket::{self, Mount};
use crate::transport::{json, json_error};

/// Which of these routes a path is.
#[derive(Clone, Copy)]
enum Route {
    RoadRunner,
    SocketStream,
    Publish { wait: bool },
}

/// All of them, for one connection.
pub(super) fn routes(
    app: Arc<App>,
    conn: Arc<PendingSlot>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    let with_app = {
        let app = app.clone();
        warp::any().map(move || app.clone())
    };
    let route = warp::path::full().and(with_app.clone()).and_then(
        |path: warp::path::FullPath, app: Arc<App>| async move {
            let c = &app.config;
            let path = path.as_str();
            let publish = path.strip_prefix(c.roadrunner_publish_path.as_str());
            if publish == Some("") {
                Ok(Route::Publish { wait: true })
            } else if publish == Some("-async") {
                Ok(Route::Publish { wait: false })
            } else {
                Err(warp::reject::not_found())
            }
        },
    );
    let sockets = socket_route(app.clone(), conn.clone(), Route::RoadRunner)
        .or(socket_route(app.clone(), conn, Route::SocketStream))
        .unify();
    let posts = route
        .and_then(|route: Route| async move {
            match route {
                Route::Publish { wait } => Ok(wait),
                Route::RoadRunner | Route::SocketStream => Err(warp::reject::not_found()),
            }
        })
        .and(
            warp::post()
                .and(authorised_body(app.clone()))
                .map(Outcome::Ready)
                .recover(move |rejection: Rejection| {
                    let app = app.clone();
                    async move {
                        let res = refusal(&rejection, "POST", &app);
                        Ok::<_, std::convert::Infallible>(Outcome::Refused(res))
                    }
                })
                .unify(),
        )
        .then(|wait: bool, outcome: Outcome| async move {
            match outcome {
                Outcome::Ready(app, body) => roadrunner_publish(app, body, wait).await,
                Outcome::Refused(res) => res,
            }
        });
    sockets.or(posts).unify()
}

/// The upgrade on one dialect's path (`which`): every other method on it
/// is 405.
fn socket_route(
    app: Arc<App>,
    conn: Arc<PendingSlot>,
    which: Route,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    let with_app = {
        let app = app.clone();
        warp::any().map(move || app.clone())
    };
    let on_path = warp::path::full()
        .and(with_app.clone())
        .and_then(
            move |path: warp::path::FullPath, app: Arc<App>| async move {
                let mounted = match which {
                    Route::SocketStream => &app.config.socketstream_path,
                    _ => &app.config.roadrunner_path,
                };
                if path.as_str() == mounted {
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
                        let (mount, path) = match which {
                            Route::SocketStream => (
                                Mount::SocketStream(app.socketstream.clone()),
                                app.config.socketstream_path.clone(),
                            ),
                            _ => (Mount::RoadRunner, app.config.roadrunner_path.clone()),
                        };
                        websocket::upgrade(app, mount, &path, &headers, &query, upgrade, &conn)
                            .await
                    }
                },
            )
            .recover(recover_on("GET", app))
            .unify(),
    )
}

/// What the publish filter gathered: the request, or the refusal.
enum Outcome {
    Ready(Arc<App>, Bytes),
    Refused(warp::reply::Response),
}

/// `POST WSGATE_ROADRUNNER_PUBLISH_PATH[-async]`: see the module docs.
async fn roadrunner_publish(app: Arc<App>, body: Bytes, wait: bool) -> warp::reply::Response {
    app.metrics.publish_requests.inc();
    let publications = match publish::parse(&body, app.config.max_pattern_bytes.get()) {
        Ok(p) => p,
        Err(error) => return json_error(StatusCode::BAD_REQUEST, &error),
    };
    let ok = || json(StatusCode::OK, r#"{"ok":true}"#);
    if publications.is_empty() {
        return ok();
    }
    if !wait {
        if let Ok(permit) = app.roadrunner_async.clone().try_acquire_owned() {
            let hub = app.hub.clone();
            tokio::spawn(async move {
                for result in hub.publish_batch(publications).await {
                    if let Err(e) = result {
                        debug!(cause = %e, "RoadRunner async publish failed");
                    }
                }
                drop(permit);
            });
            return ok();
        }
        // Every place taken: this one waits for the broker, as a sync one.
    }
    let results = app.hub.publish_batch(publications).await;
    match results.iter().find_map(|r| r.as_ref().err()) {
        None => ok(),
        Some(e) => {
            let body = serde_json::json!({ "ok": false, "error": e.to_string() });
            json(StatusCode::SERVICE_UNAVAILABLE, body.to_string())
        }
    }
}
