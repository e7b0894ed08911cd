//! Connect authorisation by a backend (`WSGATE_CONNECT_AUTH_URL`):
//! RoadRunner's `ws:joinServer`, Centrifugo's connect proxy, Traefik's
//! ForwardAuth.
//!
//! Before a session is admitted on any mount and transport, the gateway
//! sends the backend a `GET` of the configured URL carrying what the client
//! sent that identifies it: the headers in [`FORWARDED`] (cookies, the
//! `Authorization` header, the `Origin`, ...) as they came, and
//! `X-Forwarded-For` (the client address, after trusted proxies),
//! `X-Forwarded-Method`, `X-Forwarded-Host` and `X-Forwarded-Uri` (the path
//! and query). A 2xx lets the client in; its body, when it is a JSON object
//! with `sub`, `subscribe`, `publish` (and optionally `exp`), is the
//! connection's identity, as a verified token's claims would be. Any other
//! status is passed back to the client as the refusal: the same status, its
//! `Content-Type`, `WWW-Authenticate`, `Location` and `Retry-After`, and its
//! body up to [`MAX_BODY_BYTES`]. No answer within
//! `WSGATE_CONNECT_AUTH_TIMEOUT_MS`, a failed request, or a 2xx whose claims
//! are unusable refuses with 503 (fail closed).
//!
//! Verdicts (never failures, never a 5xx) are cached for
//! `WSGATE_CONNECT_AUTH_CACHE_TTL_MS`, keyed on everything that is forwarded,
//! in a cache bounded to `WSGATE_CONNECT_AUTH_CACHE_ENTRIES`: a reconnect
//! storm of one browser asks the backend once per TTL.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use serde_json::{Map, Value};

use crate::auth::Identity;
use crate::ttl_cache::Cache;

/// The request headers passed to the backend as the client sent them: what
/// identifies a browser or an app (its cookies, its credentials, its origin,
/// its language), and the WebSocket subprotocol it asked for. Nothing else:
/// hop-by-hop headers and the WebSocket key are none of the backend's
/// business, and a client's own `X-Forwarded-*` are replaced by ours.
pub const FORWARDED: [HeaderName; 7] = [
    header::AUTHORIZATION,
    header::COOKIE,
    header::ORIGIN,
    header::USER_AGENT,
    header::ACCEPT_LANGUAGE,
    header::REFERER,
    header::SEC_WEBSOCKET_PROTOCOL,
];

/// The backend's response headers passed back with a refusal.
const PASSED_BACK: [HeaderName; 4] = [
    header::CONTENT_TYPE,
    header::WWW_AUTHENTICATE,
    header::LOCATION,
    header::RETRY_AFTER,
];

/// Largest backend body read, in bytes (a refusal page, or an identity's
/// claims); the rest of a longer one is not read, and a refusal's body is
/// passed back cut there.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// How long an identity without `exp` lasts: the connection's life.
const NO_EXPIRY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The backend's answer to one handshake.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// A 2xx: the client may connect, as this identity when the body gave one.
    Allow(Option<Identity>),
    /// Anything else: passed back to the client as it came.
    Refuse(Refusal),
}

/// A backend refusal, as the client gets it.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The backend's status.
    pub status: StatusCode,
    /// The response headers of [`PASSED_BACK`] the backend set.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The body, at most [`MAX_BODY_BYTES`].
    pub body: Bytes,
}

/// Why no verdict could be had: the client gets 503, the log gets this.
#[derive(Debug, thiserror::Error)]
pub enum ConnectAuthError {
    /// No complete answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connecting or sending failed.
    #[error("request failed: {0}")]
    Request(#[from] hyper_util::client::legacy::Error),
    /// The request could not be built, or the reply body not read.
    #[error("{0}")]
    Http(String),
    /// A 2xx whose JSON claims do not make an identity.
    #[error("unusable identity in the 2xx body: {0}")]
    Identity(String),
}

/// What the backend is told about one handshake; also the cache key, since
/// the verdict can depend on nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Handshake {
    method: Method,
    uri: String,
    host: Option<HeaderValue>,
    client_ip: IpAddr,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Handshake {
    /// The handshake of a request for `path` and `query` with `headers`,
    /// from `client_ip` (after trusted proxies).
    pub fn new(
        method: Method,
        path: &str,
        query: &str,
        headers: &HeaderMap,
        client_ip: IpAddr,
    ) -> Handshake {
        let uri = if query.is_empty() {
            path.to_owned()
        } else {
            format!("{path}?{query}")
        };
        let forwarded = FORWARDED
            .iter()
            .flat_map(|name| {
                headers
                    .get_all(name)
                    .iter()
                    .map(move |v| (name.clone(), v.clone()))
            })
            .collect();
        Handshake {
            method,
            uri,
            host: headers.get(header::HOST).cloned(),
            client_ip,
            headers: forwarded,
        }
    }
}

/// The backend client and its verdict cache; one per node, shared.
pub struct ConnectAuth {
    client: Client<HttpConnector, Full<Bytes>>,
    url: Uri,
    timeout: Duration,
    /// Locked briefly, never across an await.
    cache: Mutex<Cache<Handshake, Verdict>>,
}

impl ConnectAuth {
    /// A client for `url` (validated by the config as `http://`).
    pub fn new(url: Uri, timeout: Duration, ttl: Duration, entries: usize) -> ConnectAuth {
        ConnectAuth {
            client: crate::authz::http_client(),
            url,
            timeout,
            cache: Mutex::new(Cache::new(ttl, entries)),
        }
    }

    /// A cached verdict for `handshake`, if one is still fresh.
    pub fn cached(&self, handshake: &Handshake) -> Option<Verdict> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(handshake, Instant::now())
    }

    /// Asks the backend (without looking at the cache), within the timeout,
    /// and caches the verdict unless it is a 5xx.
    pub async fn ask(&self, handshake: Handshake) -> Result<Verdict, ConnectAuthError> {
        let verdict = tokio::time::timeout(self.timeout, self.get(&handshake))
            .await
            .map_err(|_| ConnectAuthError::Timeout(self.timeout))??;
        let cacheable = match &verdict {
            Verdict::Allow(_) => true,
            Verdict::Refuse(r) => !r.status.is_server_error(),
        };
        if cacheable {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.put(handshake, verdict.clone(), Instant::now());
        }
        Ok(verdict)
    }

    async fn get(&self, handshake: &Handshake) -> Result<Verdict, ConnectAuthError> {
        let mut request = Request::builder().method(Method::GET).uri(self.url.clone());
        for (name, value) in &handshake.headers {
            request = request.header(name, value);
        }
        request = request
            .header("x-forwarded-for", handshake.client_ip.to_string())
            .header("x-forwarded-method", handshake.method.as_str())
            .header("x-forwarded-uri", handshake.uri.as_str());
        if let Some(host) = &handshake.host {
            request = request.header("x-forwarded-host", host);
        }
        let request = request
            .body(Full::new(Bytes::new()))
            .map_err(|e| ConnectAuthError::Http(e.to_string()))?;
        let reply = self.client.request(request).await?;
        let status = reply.status();
        let headers: Vec<(HeaderName, HeaderValue)> = PASSED_BACK
            .iter()
            .filter_map(|name| reply.headers().get(name).map(|v| (name.clone(), v.clone())))
            .collect();
        let body = read_bounded(reply.into_body()).await?;
        if status.is_success() {
            return identity(&body).map(Verdict::Allow);
        }
        Ok(Verdict::Refuse(Refusal {
            status,
            headers,
            body,
        }))
    }
}

/// Reads a body up to [`MAX_BODY_BYTES`]; what is beyond is left unread.
async fn read_bounded(mut body: hyper::body::Incoming) -> Result<Bytes, ConnectAuthError> {
    let mut out = BytesMut::new();
    while out.len() < MAX_BODY_BYTES {
        let Some(frame) = body.frame().await else {
            break;
        };
        let frame = frame.map_err(|e| ConnectAuthError::Http(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            let room = MAX_BODY_BYTES - out.len();
            out.extend_from_slice(&data[..data.len().min(room)]);
        }
    }
    Ok(out.freeze())
}

/// The identity a 2xx body carries: a JSON object naming at least one of
/// `sub`, `subscribe`, `publish` is read as a token's claims would be (`sub`
/// required then, `exp` optional, in seconds since the epoch); any other
/// body (empty, text, JSON without those) admits the client anonymously.
pub fn identity(body: &[u8]) -> Result<Option<Identity>, ConnectAuthError> {
    let Ok(Value::Object(claims)) = serde_json::from_slice::<Value>(body) else {
        return Ok(None);
    };
    if !["sub", "subscribe", "publish"]
        .iter()
        .any(|k| claims.contains_key(*k))
    {
        return Ok(None);
    }
    let expires_at = expiry(&claims)?;
    let identity = Identity::from_claims(claims, expires_at)
        .map_err(|e| ConnectAuthError::Identity(e.to_string()))?;
    if identity.remaining().is_zero() {
        return Err(ConnectAuthError::Identity("exp has passed".into()));
    }
    Ok(Some(identity))
}

fn expiry(claims: &Map<String, Value>) -> Result<SystemTime, ConnectAuthError> {
    let bad = || ConnectAuthError::Identity("exp must be a number of seconds".into());
    match claims.get("exp") {
        None => Ok(SystemTime::now() + NO_EXPIRY),
        Some(Value::Number(n)) => {
            let secs = n.as_u64().ok_or_else(bad)?;
            UNIX_EPOCH
                .checked_add(Duration::from_secs(secs))
                .ok_or_else(bad)
        }
        Some(_) => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::Topic;

    #[test]
    fn bodies_without_claims_admit_anonymously() {
        for body in [&b""[..], b"OK", b"{}", b"[1]", br#"{"user":"x"}"#] {
            assert!(identity(body).unwrap().is_none(), "{body:?}");
        }
    }

    #[test]
    fn claims_make_an_identity() {
        let id = identity(br#"{"sub":"u1","subscribe":["news.*"]}"#)
            .unwrap()
            .unwrap();
        assert_eq!(id.subject, "u1");
        assert!(id
            .acl
            .allows(&Topic::Channel(Bytes::from_static(b"news.a"))));
        assert!(!id.acl.allows(&Topic::Channel(Bytes::from_static(b"other"))));
        assert!(id.remaining() > Duration::from_secs(3600));
    }

    #[test]
    fn bad_claims_fail_closed() {
        for body in [
            &br#"{"subscribe":["a"]}"#[..],
            br#"{"sub":"u","subscribe":"a"}"#,
            br#"{"sub":"u","exp":1}"#,
            br#"{"sub":"u","exp":"soon"}"#,
        ] {
            assert!(identity(body).is_err(), "{body:?}");
        }
    }

    #[test]
    fn the_handshake_forwards_only_the_listed_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("s=1"));
        h.insert(header::HOST, HeaderValue::from_static("gw"));
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert(header::SEC_WEBSOCKET_KEY, HeaderValue::from_static("k"));
        let hs = Handshake::new(Method::GET, "/ws", "a=1", &h, [10, 0, 0, 1].into());
        assert_eq!(hs.uri, "/ws?a=1");
        assert_eq!(
            hs.headers,
            vec![(header::COOKIE, HeaderValue::from_static("s=1"))]
        );
    }
}
