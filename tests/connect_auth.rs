//! Connect authorisation by a backend (`WSGATE_CONNECT_AUTH_URL`) against a
//! real (tiny) HTTP server the test starts.
//!
//! The backend records every request's head and answers by the `who`
//! cookie: `anon` 204; `alice` 200 with claims (`sub`, `subscribe`);
//! `deny` 401 with a JSON body and `WWW-Authenticate`; `teapot` 418 with a
//! text body; `big` 403 with 100 KB; `bad` 200 with unusable claims; `slow`
//! never; no cookie 403. Caching is proven by counting its requests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::sse::{refused, subscribed, SseStream};
use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use wsgate::Config;

/// One request the backend saw: method, target, headers (lower-case names).
#[derive(Debug, Clone)]
struct Seen {
    line: String,
    headers: HashMap<String, String>,
}

struct Backend {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Backend {
    async fn start() -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                connections.spawn(answer(stream, log.clone()));
            }
        });
        Backend { addr, seen, task }
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn last(&self) -> Seen {
        self.seen.lock().unwrap().last().cloned().unwrap()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves requests on one connection (keep-alive) until it closes.
async fn answer(mut stream: TcpStream, log: Arc<Mutex<Vec<Seen>>>) {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let head = loop {
            if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw[..at]).into_owned();
                raw.drain(..at + 4);
                break head;
            }
            match stream.read(&mut buf).await {
                Ok(n) if n > 0 => raw.extend_from_slice(&buf[..n]),
                _ => return,
            }
        };
        let mut lines = head.lines();
        let line = lines.next().unwrap_or_default().to_owned();
        let headers: HashMap<String, String> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let who = headers
            .get("cookie")
            .and_then(|c| c.split("; ").find_map(|kv| kv.strip_prefix("who=")))
            .unwrap_or("")
            .to_owned();
        log.lock().unwrap().push(Seen { line, headers });
        let (status, extra, body): (&str, &str, String) = match who.as_str() {
            "anon" => ("204 No Content", "", String::new()),
            "alice" => (
                "200 OK",
                "Content-Type: application/json\r\n",
                json!({"sub": "alice", "subscribe": ["news.*"]}).to_string(),
            ),
            "deny" => (
                "401 Unauthorized",
                "Content-Type: application/json\r\nWWW-Authenticate: Cookie realm=\"app\"\r\n",
                r#"{"error":"log in first"}"#.to_owned(),
            ),
            "teapot" => (
                "418 I'm a teapot",
                "Content-Type: text/plain\r\n",
                "short and stout".to_owned(),
            ),
            "big" => ("403 Forbidden", "", "x".repeat(100_000)),
            "bad" => ("200 OK", "", r#"{"sub":"b","subscribe":"news"}"#.to_owned()),
            "slow" => {
                tokio::time::sleep(Duration::from_secs(60)).await;
                return;
            }
            _ => ("403 Forbidden", "", "no cookie".to_owned()),
        };
        let response = format!(
            "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if stream.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn gateway(backend: &Backend, ttl: Duration) -> Gateway {
    Gateway::start(Config {
        connect_auth_url: Some(format!("http://{}/connect", backend.addr).parse().unwrap()),
        connect_auth_timeout: Duration::from_millis(300),
        connect_auth_cache_ttl: ttl,
        ..test_config(None)
    })
    .await
}

const HANDSHAKE: &str = r#"[{"channel":"/meta/handshake","version":"1.0","supportedConnectionTypes":["long-polling"],"id":"1"}]"#;

#[tokio::test]
async fn a_2xx_lets_in_on_every_transport_with_the_request_forwarded() {
    let backend = Backend::start().await;
    let gw = gateway(&backend, Duration::ZERO).await;
    let cookie = [("Cookie", "who=anon; theme=dark"), ("User-Agent", "t/1")];
    // Native WebSocket.
    let mut ws = Client::try_connect(gw.addr, "/ws?x=1", &cookie)
        .await
        .unwrap();
    ws.subscribe("news").await;
    let seen = backend.last();
    assert_eq!(seen.line, "GET /connect HTTP/1.1");
    assert_eq!(seen.headers["cookie"], "who=anon; theme=dark");
    assert_eq!(seen.headers["user-agent"], "t/1");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-method"], "GET");
    assert_eq!(seen.headers["x-forwarded-uri"], "/ws?x=1");
    assert_eq!(seen.headers["x-forwarded-host"], gw.addr.to_string());
    assert!(!seen.headers.contains_key("sec-websocket-key"), "{seen:?}");
    // Bayeux handshake over POST.
    let (status, body) = http_with(gw.addr, "POST", "/bayeux", &cookie, Some(HANDSHAKE)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""successful":true"#), "{body}");
    let seen = backend.last();
    assert_eq!(seen.headers["x-forwarded-method"], "POST");
    assert_eq!(seen.headers["x-forwarded-uri"], "/bayeux");
    // Server-sent events.
    let mut s = SseStream::open(gw.addr, "/sse?channel=news", &cookie).await;
    assert_eq!(s.status, 200);
    s.next_event().await.unwrap();
    assert_eq!(s.next_event().await.unwrap(), subscribed("channel", "news"));
    assert_eq!(
        backend.last().headers["x-forwarded-uri"],
        "/sse?channel=news"
    );
    assert_eq!(backend.count(), 3);
    assert_eq!(
        metric_value(gw.addr, r#"wsgate_connect_auth_total{outcome="allowed"}"#).await,
        Some(3.0)
    );
}

#[tokio::test]
async fn refusals_are_passed_back_with_status_headers_and_body() {
    let backend = Backend::start().await;
    let gw = gateway(&backend, Duration::ZERO).await;
    let refused = Client::try_connect(gw.addr, "/ws", &[("Cookie", "who=deny")])
        .await
        .err()
        .unwrap();
    assert_eq!(refused.status, 401);
    assert_eq!(refused.body, r#"{"error":"log in first"}"#);
    assert_eq!(refused.headers["www-authenticate"], r#"Cookie realm="app""#);
    assert_eq!(refused.headers["content-type"], "application/json");
    let mut s = SseStream::open(gw.addr, "/sse?channel=a", &[("Cookie", "who=teapot")]).await;
    assert_eq!(s.status, 418);
    assert_eq!(s.header("content-type").as_deref(), Some("text/plain"));
    assert_eq!(s.body_text().await, "short and stout");
    let (status, body) = http_with(gw.addr, "POST", "/bayeux", &[], Some(HANDSHAKE)).await;
    assert_eq!((status, body.as_str()), (403, "no cookie"));
    // A long body is cut at 16 KiB.
    let big = [("Cookie", "who=big")];
    let (status, body) = http_with(gw.addr, "GET", "/sse?channel=a", &big, None).await;
    assert_eq!((status, body.len()), (403, 16 * 1024));
    assert_eq!(
        metric_value(gw.addr, r#"wsgate_refused_total{reason="connect_auth"}"#).await,
        Some(4.0)
    );
}

async fn upgrade_with_cookie(addr: SocketAddr, cookie: &str) -> (u16, String) {
    match Client::try_connect(addr, "/ws", &[("Cookie", cookie)]).await {
        Ok(_) => (101, String::new()),
        Err(r) => (r.status, r.body),
    }
}

#[tokio::test]
async fn no_answer_or_unusable_claims_fail_closed() {
    let backend = Backend::start().await;
    let gw = gateway(&backend, Duration::from_secs(60)).await;
    let unavailable = r#"{"error":"connect authorisation unavailable"}"#;
    for cookie in ["who=slow", "who=bad"] {
        let started = std::time::Instant::now();
        let (status, body) = upgrade_with_cookie(gw.addr, cookie).await;
        assert_eq!((status, body.as_str()), (503, unavailable), "{cookie}");
        assert!(started.elapsed() < Duration::from_secs(2), "{cookie}");
    }
    // Failures are not cached: asked again.
    let before = backend.count();
    upgrade_with_cookie(gw.addr, "who=bad").await;
    assert_eq!(backend.count(), before + 1);
    // A backend that is not there at all.
    let gone = Gateway::start(Config {
        connect_auth_url: Some(
            format!("http://127.0.0.1:{}/c", free_port())
                .parse()
                .unwrap(),
        ),
        ..test_config(None)
    })
    .await;
    let mut s = SseStream::open(gone.addr, "/sse?channel=a", &[]).await;
    assert_eq!(s.status, 503);
    assert_eq!(s.body_text().await, unavailable);
    assert_eq!(
        metric_value(
            gw.addr,
            r#"wsgate_connect_auth_total{outcome="unavailable"}"#
        )
        .await,
        Some(3.0)
    );
}

#[tokio::test]
async fn verdicts_are_cached_per_forwarded_request() {
    let backend = Backend::start().await;
    let gw = gateway(&backend, Duration::from_secs(60)).await;
    for _ in 0..3 {
        Client::try_connect(gw.addr, "/ws", &[("Cookie", "who=anon")])
            .await
            .unwrap();
        assert_eq!(upgrade_with_cookie(gw.addr, "who=deny").await.0, 401);
    }
    assert_eq!(backend.count(), 2, "one ask per distinct request");
    // Anything forwarded that differs is a different question.
    Client::try_connect(gw.addr, "/ws?v=2", &[("Cookie", "who=anon")])
        .await
        .unwrap();
    Client::try_connect(
        gw.addr,
        "/ws",
        &[("Cookie", "who=anon"), ("User-Agent", "other")],
    )
    .await
    .unwrap();
    assert_eq!(backend.count(), 4);
    assert_eq!(
        metric_value(
            gw.addr,
            r#"wsgate_connect_auth_total{outcome="cached_allowed"}"#
        )
        .await,
        Some(2.0)
    );
    assert_eq!(
        metric_value(
            gw.addr,
            r#"wsgate_connect_auth_total{outcome="cached_refused"}"#
        )
        .await,
        Some(2.0)
    );
}

#[tokio::test]
async fn the_backend_identity_applies_its_acl() {
    let backend = Backend::start().await;
    let gw = gateway(&backend, Duration::ZERO).await;
    let alice = [("Cookie", "who=alice")];
    let mut s = SseStream::open(gw.addr, "/sse?channel=news.a&channel=other", &alice).await;
    assert_eq!(s.status, 200);
    s.next_event().await.unwrap();
    let mut events = vec![s.next_event().await.unwrap(), s.next_event().await.unwrap()];
    events.sort();
    let mut want = vec![
        subscribed("channel", "news.a"),
        refused("channel", "other", "not allowed"),
    ];
    want.sort();
    assert_eq!(events, want);
    let mut ws = Client::try_connect(gw.addr, "/ws", &alice).await.unwrap();
    let reply = ws
        .request(json!({"action": "subscribe", "channel": "other"}))
        .await;
    assert_eq!(
        reply,
        json!({"action": "subscribe", "channel": "other", "status": false, "error": "not allowed"})
    );
    ws.subscribe("news.b").await;
    // An anonymous client of the same node is not limited (no JWT auth).
    let mut anon = Client::try_connect(gw.addr, "/ws", &[("Cookie", "who=anon")])
        .await
        .unwrap();
    anon.subscribe("other").await;
}
