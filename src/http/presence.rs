//! `GET /presence?channel=..`: a presence channel's members, cluster-wide
//! (`docs/presence.md`), for backends.
//!
//! Who may read: as `GET /history` (the publish API key; or a token whose
//! subscribe ACL covers the channel; an open node is open).
//! `{"channel":..,"clients":N,"users":M,"members":[{"client":..,"user":..,"info":..},..]}`,
//! members sorted by client id.

use std::sync::Arc;

use bytes::Bytes;
use warp::filters::BoxedFilter;
use warp::http::{HeaderMap, StatusCode};
use warp::Filter;

use super::history::may_read;
use super::recover_on;
use crate::app::App;
use crate::auth;
use crate::protocol::native::push_json_str;
use crate::transport::{json, json_error};

/// `GET /presence`, boxed like `/history`.
pub(super) fn route(app: Arc<App>) -> BoxedFilter<(warp::reply::Response,)> {
    let with_app = {
        let app = app.clone();
        warp::any().map(move || app.clone())
    };
    warp::path("presence")
        .and(warp::path::end())
        .and(
            warp::get()
                .and(with_app)
                .and(warp::header::headers_cloned())
                .and(warp::query::raw().or(warp::any().map(String::new)).unify())
                .then(presence)
                .recover(recover_on("GET", app))
                .unify(),
        )
        .boxed()
}

/// The `channel` parameter (`token` is read by the credential check).
fn channel(query: &str) -> Result<Bytes, String> {
    let mut channel = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value =
            auth::percent_decode(value).ok_or("a parameter is not percent-encoded UTF-8")?;
        match auth::percent_decode(key).as_deref() {
            Some("channel") => {
                if channel.replace(value).is_some() {
                    return Err("a parameter is given twice".into());
                }
            }
            Some("token") => {}
            _ => return Err("unknown parameter: expected channel, token".into()),
        }
    }
    channel
        .filter(|c| !c.is_empty())
        .map(Bytes::from)
        .ok_or_else(|| "missing parameter \"channel\"".into())
}

async fn presence(app: Arc<App>, headers: HeaderMap, query: String) -> warp::reply::Response {
    let channel = match channel(&query) {
        Ok(c) => c,
        Err(why) => return json_error(StatusCode::BAD_REQUEST, &why),
    };
    if let Err(denied) = may_read(&app, &headers, &query, &channel) {
        return denied.response();
    }
    if !app.hub.has_presence(&channel) {
        return json_error(StatusCode::NOT_FOUND, "this channel keeps no presence");
    }
    let read = app.hub.read_presence(channel.clone());
    let members = match tokio::time::timeout(app.config.subscribe_timeout, read).await {
        Ok(Ok(members)) => members,
        Ok(Err(e)) => {
            tracing::warn!(cause = %e, "presence read failed");
            return json_error(StatusCode::SERVICE_UNAVAILABLE, "broker unavailable");
        }
        Err(_) => return json_error(StatusCode::SERVICE_UNAVAILABLE, "broker unavailable"),
    };
    let mut out = String::from("{\"channel\":");
    push_json_str(&mut out, &channel);
    out.push_str(&format!(
        ",\"clients\":{},\"users\":{},\"members\":",
        members.members.len(),
        members.users
    ));
    out.push_str(&members.json_array());
    out.push('}');
    json(StatusCode::OK, out)
}
