//! The subscribe authorisation callback (`WSGATE_AUTH_URL`).
//!
//! When configured, every subscribe that passed the ACLs is also put to an
//! HTTP service: the gateway POSTs
//! `{"subject":..,"claims":{..},"pattern"|"channel":..,"remote_addr":"..","ext"?:{..}}`
//! (`ext`: what a Bayeux client sent with its subscribe, when it sent one)
//! (`subject` and `claims` are `null` when JWT auth is off). A 200 allows, a
//! 403 refuses with the reply's reason (`{"reason":".."}`, or a short text
//! body); anything else, an error, or no answer within
//! `WSGATE_AUTH_TIMEOUT_MS` refuses with `authorisation unavailable`
//! (fail closed: an unreachable policy service must not mean "allow all").
//!
//! Decisions (allow and deny, never failures) are cached for
//! `WSGATE_AUTH_CACHE_TTL_MS` per (subject, topic), or per (client address,
//! topic) for anonymous clients, in a cache bounded to
//! `WSGATE_AUTH_CACHE_ENTRIES`: the callback is asked again at most once per
//! TTL per key, and a flood of distinct topics evicts the oldest entries
//! instead of growing memory. Speaks plain HTTP/1.1 through hyper's pooled
//! client (no TLS: run the service on the node or a trusted network).

use std::borrow::Cow;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::http::{header, Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::broker::Topic;
use crate::ttl_cache::Cache;

/// Largest callback reply body read, in bytes: a reason is a short sentence,
/// and a misbehaving service must not make us buffer megabytes.
const MAX_REPLY_BYTES: usize = 4096;
/// Longest reason passed on to a client, in bytes.
const MAX_REASON_BYTES: usize = 200;
/// The reason given when a 403 carries none.
const DEFAULT_REASON: &str = "not allowed";

/// The callback's verdict on one subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// 200: the subscription may be made.
    Allow,
    /// 403: refused, with the reason for the client.
    Deny(String),
}

/// Why no decision could be had; the client only ever sees
/// `authorisation unavailable`, the log sees this.
#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    /// No complete answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connecting or sending failed.
    #[error("request failed: {0}")]
    Request(#[from] hyper_util::client::legacy::Error),
    /// The reply body could not be read (or was too large).
    #[error("reading the reply failed: {0}")]
    Body(String),
    /// A status other than 200 or 403.
    #[error("unexpected status {0}")]
    Status(StatusCode),
}

/// Who is asking, for the cache key: the token's subject, or the client's
/// address when there is no token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Asker {
    /// An authenticated subject (`sub`).
    Subject(String),
    /// An anonymous client, by address.
    Anonymous(IpAddr),
}

/// What the callback is asked about one subscribe.
#[derive(Debug, Clone)]
pub struct Question<'a> {
    /// The subject, when authenticated.
    pub subject: Option<&'a str>,
    /// The verified claims, when authenticated.
    pub claims: Option<&'a Map<String, Value>>,
    /// The requested subscription.
    pub topic: &'a Topic,
    /// The client's address (after trusted proxies).
    pub remote_addr: IpAddr,
    /// What the client sent beside the subscribe, for the callback: a
    /// Bayeux `ext` object (per-subscription tokens live there), as JSON.
    pub ext: Option<&'a str>,
}

impl Question<'_> {
    fn key(&self) -> CacheKey {
        let asker = match self.subject {
            Some(s) => Asker::Subject(s.to_owned()),
            None => Asker::Anonymous(self.remote_addr),
        };
        (asker, self.topic.clone(), self.ext.map(str::to_owned))
    }

    fn body(&self) -> Bytes {
        let name = String::from_utf8_lossy(self.topic.name());
        let (pattern, channel) = match self.topic {
            Topic::Pattern(_) => (Some(name), None),
            Topic::Channel(_) => (None, Some(name)),
        };
        let body = Body {
            subject: self.subject,
            claims: self.claims,
            pattern,
            channel,
            remote_addr: self.remote_addr.to_string(),
            ext: self
                .ext
                .and_then(|e| serde_json::from_str::<&RawValue>(e).ok()),
        };
        // Strings, maps of JSON values and an address: cannot fail.
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }
}

/// The JSON body POSTed to the callback.
#[derive(Serialize)]
struct Body<'a> {
    subject: Option<&'a str>,
    claims: Option<&'a Map<String, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pattern: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<Cow<'a, str>>,
    remote_addr: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    ext: Option<&'a RawValue>,
}

/// A decision depends on who asks, for what, and what they sent with it.
type CacheKey = (Asker, Topic, Option<String>);

/// The callback client and its decision cache; one per node, shared.
pub struct Authz {
    client: Client<HttpConnector, Full<Bytes>>,
    url: Uri,
    timeout: Duration,
    /// Locked briefly, never across an await (lookups and inserts only).
    cache: Mutex<Cache<CacheKey, Decision>>,
}

impl Authz {
    /// A client for `url` (validated by the config as `http://`).
    pub fn new(url: Uri, timeout: Duration, ttl: Duration, entries: usize) -> Authz {
        Authz {
            client: http_client(),
            url,
            timeout,
            cache: Mutex::new(Cache::new(ttl, entries)),
        }
    }

    /// A cached decision for `question`, if one is still fresh.
    pub fn cached(&self, question: &Question<'_>) -> Option<Decision> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(&question.key(), Instant::now())
    }

    /// Asks the callback (without looking at the cache) and caches the
    /// decision. The returned future owns everything it needs, so the session
    /// can keep serving other requests while it runs.
    pub fn ask(
        self: &Arc<Self>,
        question: &Question<'_>,
    ) -> impl Future<Output = Result<Decision, AuthzError>> + Send + 'static {
        let this = self.clone();
        let key = question.key();
        let body = question.body();
        async move {
            let decision = tokio::time::timeout(this.timeout, this.post(body))
                .await
                .map_err(|_| AuthzError::Timeout(this.timeout))??;
            let mut cache = this.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.put(key, decision.clone(), Instant::now());
            Ok(decision)
        }
    }

    async fn post(&self, body: Bytes) -> Result<Decision, AuthzError> {
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| AuthzError::Body(e.to_string()))?;
        let reply = self.client.request(request).await?;
        let status = reply.status();
        if status == StatusCode::OK {
            return Ok(Decision::Allow);
        }
        if status != StatusCode::FORBIDDEN {
            return Err(AuthzError::Status(status));
        }
        let body = Limited::new(reply.into_body(), MAX_REPLY_BYTES)
            .collect()
            .await
            .map_err(|e| AuthzError::Body(e.to_string()))?
            .to_bytes();
        Ok(Decision::Deny(reason(&body)))
    }
}

/// The plain HTTP/1.1 client every backend call uses (this callback and the
/// connect backend, [`crate::connect_auth`]): hyper's pooled client, idle
/// connections kept 30 s so a busy node reuses them.
pub fn http_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http()
}

/// The client-facing reason of a 403 body: `{"reason":".."}` (or
/// `{"error":".."}`), else the body as text; control characters removed,
/// length capped, `not allowed` when nothing is left.
fn reason(body: &[u8]) -> String {
    let from_json = serde_json::from_slice::<Value>(body).ok().and_then(|v| {
        ["reason", "error"]
            .iter()
            .find_map(|k| v.get(k).and_then(Value::as_str).map(str::to_owned))
    });
    let text = from_json.unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    let mut out = String::new();
    for c in text.trim().chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > MAX_REASON_BYTES {
            break;
        }
        out.push(c);
    }
    if out.is_empty() {
        DEFAULT_REASON.to_owned()
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_short_and_clean() {
        assert_eq!(reason(br#"{"reason":"no way"}"#), "no way");
        assert_eq!(reason(br#"{"error":"nope"}"#), "nope");
        assert_eq!(reason(b"plain text\n"), "plain text");
        assert_eq!(reason(b""), "not allowed");
        assert_eq!(reason(b"a\x1b[31mb"), "a[31mb");
        assert_eq!(reason(&[b'x'; 1000]).len(), MAX_REASON_BYTES);
    }

    #[test]
    fn question_bodies_carry_every_field() {
        let topic = Topic::Pattern(Bytes::from_static(b"news.*"));
        let mut claims = Map::new();
        claims.insert("sub".into(), Value::from("u1"));
        let q = Question {
            subject: Some("u1"),
            claims: Some(&claims),
            topic: &topic,
            remote_addr: "10.0.0.1".parse().unwrap(),
            ext: None,
        };
        let v: Value = serde_json::from_slice(&q.body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"subject":"u1","claims":{"sub":"u1"},"pattern":"news.*","remote_addr":"10.0.0.1"})
        );
        let anon = Question {
            subject: None,
            claims: None,
            ..q
        };
        let v: Value = serde_json::from_slice(&anon.body()).unwrap();
        assert_eq!(v["subject"], Value::Null);
        assert_eq!(anon.key().0, Asker::Anonymous("10.0.0.1".parse().unwrap()));
    }
}
