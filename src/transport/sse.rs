//! Server-sent events: `GET <WSGATE_SSE_PATH>?channel=..&pattern=..`, the
//! native protocol one way (`docs/dialects/sse.md`).
//!
//! The query names the subscriptions (`channel=` and `pattern=`, each
//! repeatable, form-encoded as `URLSearchParams` writes them) and may carry
//! the token (`token=`, or `Authorization: Bearer`). A query that names
//! nothing, or names something unreadable, is answered 400 before any
//! stream; then the handshake passes the same admission as a WebSocket
//! upgrade (the same statuses), and the response is the stream: first a
//! `retry:` field, then the answers to the subscriptions and the
//! deliveries, as the session writes them ([`super::event_stream`]).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use bytes::Bytes;
use tracing::Instrument;
use warp::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use warp::Reply;

use super::admission::{admit, Carrier, Hello, Token};
use super::event_stream::pipe;
use super::{json_error, polling};
use crate::app::App;
use crate::auth;
use crate::broker::Topic;
use crate::pending::PendingSlot;
use crate::protocol::sse::{retry_field, LastEventId, SseConversation};
use crate::session::{self, Link};

/// EventSource's reconnection delay, before jitter: a stream the server
/// ended (drain, restart) is reopened this long after, on another node.
const RETRY_BASE_MS: u64 = 1000;
/// Up to this much is added at random, per stream, so that the clients of a
/// drained node do not all come back in the same instant.
const RETRY_JITTER_MS: u64 = 2000;

/// Serves one `GET` of the SSE path.
pub async fn serve(
    app: Arc<App>,
    headers: HeaderMap,
    query: String,
    conn: Arc<PendingSlot>,
) -> warp::reply::Response {
    let topics = match topics(&query, app.config.max_subscriptions.get()) {
        Ok(topics) => topics,
        Err(error) => {
            app.metrics.malformed_frames.inc();
            return polling::cors(&headers, json_error(StatusCode::BAD_REQUEST, &error));
        }
    };
    let hello = Hello {
        method: &Method::GET,
        path: &app.config.sse_path,
        query: &query,
        headers: &headers,
    };
    // The stream is the connection's session, as an upgrade's socket is.
    let admitted = match admit(&app, &hello, &conn, Token::AtConnect, Carrier::Upgrade).await {
        Ok(admitted) => admitted,
        Err(refused) => return polling::cors(&headers, *refused),
    };
    let client_ip = admitted.client_ip;
    let retry = Bytes::from(retry_field(RETRY_BASE_MS + jitter(RETRY_JITTER_MS)));
    let (sink, body) = pipe(retry, conn);
    // EventSource sends back the last `id:` it took when it reconnects.
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(LastEventId::parse);
    let conv = Box::new(SseConversation::new(topics, resume));
    let ctx = app.session_context(
        admitted.slot,
        admitted.ip_slot,
        client_ip,
        admitted.identity,
    );
    let span = tracing::info_span!("sse", client = %client_ip, dialect = "sse");
    tokio::spawn(session::run(Link::Socket(Box::new(sink)), conv, ctx).instrument(span));
    let mut res = warp::reply::stream(body).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    // The connection ends with the stream: it carried a session, and its
    // places went with it.
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    polling::cors(&headers, res)
}

/// The subscriptions a query names, in order; or why it cannot be served.
/// `token` is the admission's; any other parameter is ignored (cache
/// busters).
pub fn topics(query: &str, max: usize) -> Result<Vec<Topic>, String> {
    let mut topics = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let Some(key) = auth::percent_decode(key) else {
            return Err("invalid percent-encoding in the query".to_owned());
        };
        let pattern = match key.as_str() {
            "channel" => false,
            "pattern" => true,
            _ => continue,
        };
        let Some(value) = auth::percent_decode(value) else {
            return Err(format!(
                "invalid {key}: not percent-encoded UTF-8 ({value:?})"
            ));
        };
        if value.is_empty() {
            return Err(format!("empty {key}: give a name, {key}=<name>"));
        }
        if topics.len() == max {
            return Err(format!(
                "too many subscriptions: at most {max} channel= and pattern= parameters"
            ));
        }
        let name = Bytes::from(value);
        topics.push(if pattern {
            Topic::Pattern(name)
        } else {
            Topic::Channel(name)
        });
    }
    if topics.is_empty() {
        return Err("nothing to stream: give at least one channel=<name> or pattern=<glob>".into());
    }
    Ok(topics)
}

/// A random number below `bound` (std's per-process random hash keys; no
/// cryptographic need here).
fn jitter(bound: u64) -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(bound);
    h.finish() % bound.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_name_topics() {
        let t = topics("channel=a%20b&pattern=news.*&token=x&_=1&channel=c+d", 10).unwrap();
        assert_eq!(
            t,
            vec![
                Topic::Channel(Bytes::from_static(b"a b")),
                Topic::Pattern(Bytes::from_static(b"news.*")),
                Topic::Channel(Bytes::from_static(b"c d")),
            ]
        );
    }

    #[test]
    fn bad_queries_are_refused() {
        for (query, error) in [
            ("", "nothing to stream"),
            ("token=x", "nothing to stream"),
            ("channel=", "empty channel"),
            ("pattern", "empty pattern"),
            ("channel=%zz", "invalid channel"),
            ("channel=%ff", "invalid channel"),
            ("channel=a&channel=b&channel=c", "too many subscriptions"),
        ] {
            let e = topics(query, 2).unwrap_err();
            assert!(e.starts_with(error), "{query}: {e}");
        }
    }

    #[test]
    fn jitter_stays_below_its_bound() {
        assert!((0..100).all(|_| jitter(2000) < 2000));
    }
}
