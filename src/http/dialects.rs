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
use tracing::debug;
use warp::http::StatusCode;
use warp::{Filter, Rejection};

use super::{authorised_body, refusal, socket_route};
use crate::app::App;
use crate::pending::PendingSlot;
use crate::protocol::roadrunner::publish;
use crate::transport::websocket::Mount;
use crate::transport::{json, json_error};

/// All of them, for one connection.
pub(super) fn routes(
    app: Arc<App>,
    conn: Arc<PendingSlot>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    let with_app = {
        let app = app.clone();
        warp::any().map(move || app.clone())
    };
    // The publish path (the sync one waits for Redis) or its `-async` twin.
    let wait = warp::path::full().and(with_app.clone()).and_then(
        |path: warp::path::FullPath, app: Arc<App>| async move {
            match path
                .as_str()
                .strip_prefix(app.config.roadrunner_publish_path.as_str())
            {
                Some("") => Ok(true),
                Some("-async") => Ok(false),
                _ => Err(warp::reject::not_found()),
            }
        },
    );
    let sockets = socket_route(app.clone(), conn.clone(), |a| {
        (Mount::RoadRunner, &a.config.roadrunner_path)
    })
    .or(socket_route(app.clone(), conn, |a| {
        (
            Mount::SocketStream(a.socketstream.clone()),
            &a.config.socketstream_path,
        )
    }))
    .unify();
    let posts = wait
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
