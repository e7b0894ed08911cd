//! `GET /shard?channel=..`: which Redis server owns a channel, so that a
//! publisher outside the gateway (`redis-cli PUBLISH`) can publish where the
//! channel's subscribers are (`docs/redis.md, "Client-side sharding"`). Answers
//! `{"channel":..,"shard":i,"url":"redis://host:port"}`, never the
//! credentials; with one Redis, shard 0 and that server. Behind the publish
//! API key, as `/publish` is: it tells where to publish.

use std::sync::Arc;

use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::Filter;

use super::recover_on;
use crate::app::App;
use crate::auth;
use crate::transport::{json, json_error};

/// `GET /shard` (and `HEAD`), boxed like the other small routes.
pub(super) fn route(app: Arc<App>) -> BoxedFilter<(warp::reply::Response,)> {
    warp::path("shard")
        .and(warp::path::end())
        .and(
            warp::get()
                .or(warp::head())
                .unify()
                .and(super::with_api_key(app.clone()))
                .and(warp::query::raw().or(warp::any().map(String::new)).unify())
                .map(|app: Arc<App>, query: String| answer(&app, &query))
                .recover(recover_on("GET, HEAD", app))
                .unify(),
        )
        .boxed()
}

fn answer(app: &App, query: &str) -> warp::reply::Response {
    let channel = match channel(query) {
        Ok(c) => c,
        Err(why) => return json_error(StatusCode::BAD_REQUEST, why),
    };
    match app.hub.shard_of(channel.as_bytes()) {
        Some((shard, url)) => json(
            StatusCode::OK,
            serde_json::json!({"channel": channel, "shard": shard, "url": url}).to_string(),
        ),
        None => json_error(
            StatusCode::NOT_FOUND,
            "no Redis: the embedded broker holds every channel",
        ),
    }
}

/// The one parameter, percent-decoded.
fn channel(query: &str) -> Result<String, &'static str> {
    let mut channel = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value =
            auth::percent_decode(value).ok_or("a parameter is not percent-encoded UTF-8")?;
        match auth::percent_decode(key).as_deref() {
            Some("channel") if channel.is_none() => channel = Some(value),
            Some("channel") => return Err("a parameter is given twice"),
            _ => return Err("unknown parameter: expected channel"),
        }
    }
    channel
        .filter(|c| !c.is_empty())
        .ok_or("missing parameter \"channel\"")
}
