//! `GET /history?channel=..[&since=<offset>&epoch=..][&limit=..]`: a page of
//! a history channel's messages, oldest first (`docs/history.md`).
//!
//! Who may read: the publish API key (`Authorization: Bearer <key>`: any
//! history channel), or a token (`Authorization: Bearer` or `?token=`)
//! whose subscribe ACL, with `WSGATE_ALLOW`, covers the channel, exactly
//! as a socket's subscribe would be checked. A node with neither key nor
//! tokens configured is open, as its sockets are. Without `since`: the
//! newest `limit` messages; with it: up to `limit` after it, 409 if `epoch`
//! is no longer the channel's (the answer names the current one).
//!
//! Each reader (the API key, a token's `sub`, or on an open node the
//! client's address) reads at most `WSGATE_HISTORY_READ_RATE` messages per
//! second ([`crate::read_rate::Readers`]): a page takes its `limit` first
//! and gives back what it did not return; a reader short of it gets `429`
//! with `Retry-After`.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use warp::filters::BoxedFilter;
use warp::http::{header, HeaderMap, HeaderValue, StatusCode};
use warp::Filter;

use super::recover_on;
use crate::app::App;
use crate::auth;
use crate::broker::Topic;
use crate::forwarded;
use crate::history::{Query, DEFAULT_PAGE, PAGE_LIMIT};
use crate::protocol::native::{push_json_str, push_payload};
use crate::read_rate::Refused;
use crate::transport::{json, json_error, unauthorised};

/// `GET /history`, boxed: the route tree's type is near the compiler's
/// depth limit already.
pub(super) fn route(app: Arc<App>, peer: IpAddr) -> BoxedFilter<(warp::reply::Response,)> {
    let with_app = {
        let app = app.clone();
        warp::any().map(move || app.clone())
    };
    warp::path("history")
        .and(warp::path::end())
        .and(
            warp::get()
                .and(with_app)
                .and(warp::any().map(move || peer))
                .and(warp::header::headers_cloned())
                .and(warp::query::raw().or(warp::any().map(String::new)).unify())
                .then(history)
                .recover(recover_on("GET", app))
                .unify(),
        )
        .boxed()
}

/// The parameters, decoded.
struct Params {
    channel: Bytes,
    since: Option<(u64, Bytes)>,
    limit: usize,
}

fn params(query: &str) -> Result<Params, String> {
    let (mut channel, mut since, mut epoch, mut limit) = (None, None, None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value =
            auth::percent_decode(value).ok_or("a parameter is not percent-encoded UTF-8")?;
        let slot = match auth::percent_decode(key).as_deref() {
            Some("channel") => &mut channel,
            Some("since") => &mut since,
            Some("epoch") => &mut epoch,
            Some("limit") => &mut limit,
            Some("token") => continue,
            _ => {
                return Err(
                    "unknown parameter: expected channel, since, epoch, limit, token".into(),
                )
            }
        };
        if slot.replace(value).is_some() {
            return Err("a parameter is given twice".into());
        }
    }
    let channel = channel
        .filter(|c| !c.is_empty())
        .ok_or("missing parameter \"channel\"")?;
    let since = match (since, epoch) {
        (None, None) => None,
        (Some(s), Some(e)) if !e.is_empty() => Some((
            s.parse::<u64>()
                .map_err(|_| "\"since\" must be a whole number (an offset)")?,
            Bytes::from(e),
        )),
        _ => return Err("\"since\" and \"epoch\" go together".into()),
    };
    let limit = match limit {
        None => DEFAULT_PAGE,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=PAGE_LIMIT).contains(l))
            .ok_or(format!(
                "\"limit\" must be a whole number from 1 to {PAGE_LIMIT}"
            ))?,
    };
    Ok(Params {
        channel: Bytes::from(channel),
        since,
        limit,
    })
}

/// Why a request may not read a channel's history.
pub(super) enum Denied {
    /// No usable credential: 401 with this message and challenge.
    Unauthorised(&'static str, &'static str),
    /// A valid token whose ACL does not cover the channel: 403.
    Forbidden,
}

impl Denied {
    pub(super) fn response(self) -> warp::reply::Response {
        match self {
            Denied::Unauthorised(why, challenge) => unauthorised(why, challenge),
            Denied::Forbidden => json_error(StatusCode::FORBIDDEN, "not allowed"),
        }
    }
}

/// Who reads, for the read rate: the credential that allowed the read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Reader {
    /// The publish API key (every backend holding it shares one rate).
    ApiKey,
    /// A token, by its `sub`.
    Subject(String),
    /// No credential (an open node, or a token without `sub`): the
    /// client's address (IPv6 by /64).
    Address,
}

impl Reader {
    /// Its key in [`crate::read_rate::Readers`].
    fn key(&self, client_ip: IpAddr) -> String {
        match self {
            Reader::ApiKey => "key".to_owned(),
            Reader::Subject(sub) => format!("sub:{sub}"),
            Reader::Address => format!("ip:{}", crate::limits::key(client_ip)),
        }
    }
}

/// Who reads, when the request may read `channel` (see the module docs).
pub(super) fn may_read(
    app: &App,
    headers: &HeaderMap,
    query: &str,
    channel: &Bytes,
) -> Result<Reader, Denied> {
    let bearer = auth::bearer(headers).ok().flatten();
    if let (Some(key), Some(given)) = (&app.config.api_key, &bearer) {
        if auth::secrets_equal(given.as_bytes(), key.expose()) {
            return Ok(Reader::ApiKey);
        }
    }
    let Some(verifier) = &app.verifier else {
        if app.config.api_key.is_none() {
            return Ok(Reader::Address); // an open node
        }
        return Err(Denied::Unauthorised("API key required", "Bearer"));
    };
    let token = auth::request_token(headers, query)
        .map_err(|_| Denied::Unauthorised("a token or the API key is required", "Bearer"))?;
    let identity = verifier
        .verify(&token)
        .map_err(|_| Denied::Unauthorised("invalid token", "Bearer error=\"invalid_token\""))?;
    let topic = Topic::Channel(channel.clone());
    let server = app.allow.as_ref().is_none_or(|acl| acl.allows(&topic));
    if server && identity.acl.allows(&topic) {
        Ok(if identity.subject.is_empty() {
            Reader::Address
        } else {
            Reader::Subject(identity.subject)
        })
    } else {
        app.metrics
            .refused
            .with_label_values(&["not_allowed"])
            .inc();
        Err(Denied::Forbidden)
    }
}

/// `429` for a reader short of its read rate, with `Retry-After`.
fn too_fast(refused: Refused) -> warp::reply::Response {
    let why = match refused {
        Refused::Rate(_) => "history read rate exceeded",
        Refused::Full => "too many history readers: try again later",
    };
    let mut res = json_error(StatusCode::TOO_MANY_REQUESTS, why);
    res.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(refused.retry_after_secs()),
    );
    res
}

async fn history(
    app: Arc<App>,
    peer: IpAddr,
    headers: HeaderMap,
    query: String,
) -> warp::reply::Response {
    let p = match params(&query) {
        Ok(p) => p,
        Err(why) => return json_error(StatusCode::BAD_REQUEST, &why),
    };
    let reader = match may_read(&app, &headers, &query, &p.channel) {
        Ok(reader) => reader,
        Err(denied) => return denied.response(),
    };
    if app.hub.history_rule(&p.channel).is_none() {
        return json_error(StatusCode::NOT_FOUND, "this channel keeps no history");
    }
    // A page is at most one full bucket.
    let limit = p.limit.min(app.history_readers.rate());
    let client_ip = forwarded::client_ip(peer, &headers, &app.config.trusted_proxies);
    let reader = reader.key(client_ip);
    if let Err(refused) = app.history_readers.take(&reader, limit) {
        app.metrics
            .refused
            .with_label_values(&["history_rate"])
            .inc();
        return too_fast(refused);
    }
    let q = match &p.since {
        None => Query::Latest { limit },
        Some((offset, epoch)) => Query::After {
            offset: *offset,
            epoch: epoch.clone(),
            limit,
        },
    };
    let read = app.hub.read_history(p.channel.clone(), q);
    let read = tokio::time::timeout(app.config.subscribe_timeout, read).await;
    // What the read did not return goes back (a failed one read nothing;
    // one that timed out keeps its share: it may still run).
    let returned = match &read {
        Ok(Ok(read)) => read.entries.len(),
        Ok(Err(_)) => 0,
        Err(_) => limit,
    };
    app.history_readers
        .refund(&reader, limit.saturating_sub(returned));
    let read = match read {
        Ok(Ok(read)) => read,
        Ok(Err(e)) => {
            tracing::warn!(cause = %e, "history read failed");
            return json_error(StatusCode::SERVICE_UNAVAILABLE, "broker unavailable");
        }
        Err(_) => return json_error(StatusCode::SERVICE_UNAVAILABLE, "broker unavailable"),
    };
    let mut out = String::with_capacity(
        64 + read
            .entries
            .iter()
            .map(|e| e.payload.len() + 24)
            .sum::<usize>(),
    );
    if let Some((_, epoch)) = &p.since {
        if *epoch != read.epoch {
            out.push_str("{\"error\":\"epoch changed\",\"epoch\":");
            push_json_str(&mut out, &read.epoch);
            out.push('}');
            return json(StatusCode::CONFLICT, out);
        }
    }
    out.push_str("{\"channel\":");
    push_json_str(&mut out, &p.channel);
    out.push_str(",\"epoch\":");
    push_json_str(&mut out, &read.epoch);
    out.push_str(",\"top\":");
    out.push_str(&read.top.to_string());
    out.push_str(",\"messages\":[");
    for (i, entry) in read.entries.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"offset\":");
        out.push_str(&entry.offset.to_string());
        out.push_str(",\"payload\":");
        push_payload(&mut out, &entry.payload);
        out.push('}');
    }
    out.push_str("]}");
    json(StatusCode::OK, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_strict() {
        let p = params("channel=news.sport&since=41&epoch=e1&limit=5").unwrap();
        assert_eq!(&p.channel[..], b"news.sport");
        assert_eq!(p.since, Some((41, Bytes::from_static(b"e1"))));
        assert_eq!(p.limit, 5);
        let p = params("channel=a%20b").unwrap();
        assert_eq!(
            (&p.channel[..], p.since, p.limit),
            (&b"a b"[..], None, DEFAULT_PAGE)
        );
        for bad in [
            "",
            "since=1&epoch=e",
            "channel=a&since=1",
            "channel=a&epoch=e",
            "channel=a&since=x&epoch=e",
            "channel=a&limit=0",
            "channel=a&limit=1001",
            "channel=a&channel=b",
            "channel=a&other=1",
        ] {
            assert!(params(bad).is_err(), "{bad:?}");
        }
    }
}
