//! Hardening of the HTTP surface (issue 10): deadlines for every phase before
//! a session exists (slow and unfinished requests of each kind), the pending
//! connection caps, routing (404, 405, HEAD), publish body errors that say
//! where, the separate publish body limit, and the strict WebSocket handshake.
//!
//! Everything runs over raw TCP against a real in-process gateway, so each
//! byte on the wire is the test's choice. "Closed by the deadline" is proven
//! by the end of the stream (EOF or reset) arriving after the deadline and
//! within a bound, while a normal client keeps being served meanwhile.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use wsgate::Config;

/// The lowered pre-session deadline of these tests.
const DEADLINE: Duration = Duration::from_millis(600);
/// How late after the deadline a close may come (scheduling, CI noise).
const SLACK: Duration = Duration::from_secs(3);

fn nz(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap()
}

fn timeouts_config() -> Config {
    Config {
        http_header_timeout: DEADLINE,
        http_body_timeout: DEADLINE,
        ..test_config(None)
    }
}

/// Connects from `source` (any loopback address) to `addr`.
async fn connect_from(source: IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    tokio::time::timeout(WAIT, socket.connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect")
}

/// Reads until the server ends the stream (EOF or reset) and returns what
/// arrived before it and when it ended; panics if it is still open after
/// `bound`.
async fn read_until_closed(stream: &mut TcpStream, bound: Duration) -> (Vec<u8>, Instant) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    let ended = tokio::time::timeout(bound, read_all)
        .await
        .unwrap_or_else(|_| panic!("connection still open after {bound:?}"));
    (got, ended)
}

/// One response read off a kept-alive connection: status, head, body (by
/// Content-Length).
async fn read_response(stream: &mut TcpStream) -> (u16, String, String) {
    read_response_to(stream, "GET").await
}

/// [`read_response`] to a request of `method` (a HEAD response has no body
/// whatever its Content-Length says).
async fn read_response_to(stream: &mut TcpStream, method: &str) -> (u16, String, String) {
    let head_request = method == "HEAD";
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            let text = String::from_utf8_lossy(&raw).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = header_value(head, "content-length")
                    .and_then(|v| v.parse::<usize>().ok())
                    .filter(|_| !head_request)
                    .unwrap_or(0);
                if body.len() >= length {
                    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
                    return (status, head.to_owned(), body[..length].to_owned());
                }
            }
            let n = stream.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed before a full response: {text:?}");
            raw.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("no response in time")
}

fn header_value(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

/// A normal client is served while slow connections are held: subscribe,
/// publish over HTTP, receive.
async fn normal_client_is_served(gw: &Gateway) {
    let mut c = gw.client().await;
    c.subscribe("served").await;
    let r = gw.publish(json!({"channel":"served","payload":1})).await;
    assert_eq!(r.0, 200, "{r:?}");
    assert_eq!(
        c.recv().await,
        json!({"action":"message","channel":"served","payload":1})
    );
}

/// Asserts the stream is ended by the server after about the deadline:
/// not before it (with 100 ms of timer slack), and within `SLACK` of it.
async fn assert_closed_by_deadline(stream: &mut TcpStream, since: Instant) -> Vec<u8> {
    let (got, ended) = read_until_closed(stream, DEADLINE + SLACK).await;
    let after = ended.duration_since(since);
    assert!(
        after + Duration::from_millis(100) >= DEADLINE,
        "closed after {after:?}, before the {DEADLINE:?} deadline"
    );
    got
}

async fn timeouts(gw: &Gateway, phase: &str) -> f64 {
    let series = format!("wsgate_http_timeouts_total{{phase=\"{phase}\"}}");
    metric_value(gw.addr, &series).await.unwrap()
}

// ---------------------------------------------------------------- 1. slow requests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_headers_are_closed_at_the_header_deadline() {
    let gw = Gateway::start(timeouts_config()).await;
    let mut slow = TcpStream::connect(gw.addr).await.unwrap();
    let since = Instant::now();
    slow.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        .await
        .unwrap();
    normal_client_is_served(&gw).await;
    // More header bytes do not extend the deadline: it is for the whole head.
    tokio::time::sleep(DEADLINE / 2).await;
    let _ = slow.write_all(b"Connection: Upgrade\r\n").await;
    let got = assert_closed_by_deadline(&mut slow, since).await;
    assert_eq!(got, b"", "nothing is answered to an unfinished head");
    assert!(timeouts(&gw, "headers").await >= 1.0);
    normal_client_is_served(&gw).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_at_the_header_deadline() {
    let gw = Gateway::start(timeouts_config()).await;
    let mut silent = TcpStream::connect(gw.addr).await.unwrap();
    let since = Instant::now();
    normal_client_is_served(&gw).await;
    assert_eq!(assert_closed_by_deadline(&mut silent, since).await, b"");
    assert!(timeouts(&gw, "headers").await >= 1.0);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_publish_body_is_answered_408_and_closed() {
    let gw = Gateway::start(timeouts_config()).await;
    let mut c = gw.client().await;
    c.psubscribe("*").await;
    let mut short = TcpStream::connect(gw.addr).await.unwrap();
    // Content-Length 100, 14 bytes sent.
    short
        .write_all(
            b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"channel\":\"a\"",
        )
        .await
        .unwrap();
    let since = Instant::now();
    normal_client_is_served(&gw).await;
    let got = assert_closed_by_deadline(&mut short, since).await;
    let text = String::from_utf8(got).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response");
    assert!(head.starts_with("HTTP/1.1 408 "), "{head}");
    assert_eq!(header_value(head, "connection").as_deref(), Some("close"));
    assert_eq!(
        serde_json::from_str::<Value>(body).unwrap(),
        json!({"error": format!("request body not received within {} ms", DEADLINE.as_millis())})
    );
    assert_eq!(timeouts(&gw, "body").await, 1.0);
    // Nothing was published from it: the next message on `*` is the marker.
    gw.publish(json!({"channel":"marker","payload":0})).await;
    let next = loop {
        let v = c.recv().await;
        if v["channel"] != "served" {
            break v;
        }
    };
    assert_eq!(next["channel"], "marker");
    drop(c);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_at_the_header_deadline() {
    let gw = Gateway::start(timeouts_config()).await;
    let mut idle = TcpStream::connect(gw.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (status, head, body) = read_response(&mut idle).await;
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"status":"ok"}"#),
        "{head}"
    );
    assert_eq!(header_value(&head, "connection"), None, "kept alive");
    let since = Instant::now();
    normal_client_is_served(&gw).await;
    assert_eq!(assert_closed_by_deadline(&mut idle, since).await, b"");
    gw.stop().await;
}

// ---------------------------------------------------------------- 1. pending caps

/// Opens silent connections from `source` until one is refused with
/// `status` as it is accepted; returns the ones held open (each admitted as
/// pending) and the raw refusal. A connection is taken as admitted when no
/// refusal arrives within 300 ms; one taken so wrongly only costs another
/// round, since the loop ends on a refusal seen, never on a guess.
async fn fill_until_refused(
    addr: SocketAddr,
    source: IpAddr,
    status: u16,
) -> (Vec<TcpStream>, String) {
    let prefix = format!("HTTP/1.1 {status} ");
    let deadline = Instant::now() + WAIT;
    let mut held = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "never refused with {status} ({} connections held)",
            held.len()
        );
        let mut s = connect_from(source, addr).await;
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        let closed = tokio::time::timeout(Duration::from_millis(300), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        match closed {
            Err(_) => held.push(s),
            Ok(()) => {
                let text = String::from_utf8_lossy(&got).into_owned();
                assert!(text.starts_with(&prefix), "refused otherwise: {text:?}");
                return (held, text);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_connections_are_capped_counted_and_refused() {
    let gw = Gateway::start(Config {
        max_pending_connections: nz(2),
        ..test_config(None)
    })
    .await;
    let addr = gw.addr;
    // Sessions are not pending: three of them leave room for /metrics.
    let mut sessions = Vec::new();
    for _ in 0..3 {
        sessions.push(gw.client().await);
    }
    let m = gw.metrics().await;
    assert!(m.contains("\nwsgate_connections 3\n"), "{m}");
    // Only this very /metrics request is pending.
    assert!(m.contains("\nwsgate_pending_connections 1\n"), "{m}");

    // Silent connections fill the two places; the next one is answered 503
    // as it is accepted.
    let (silent, refused) = fill_until_refused(addr, "127.0.0.1".parse().unwrap(), 503).await;
    assert!(silent.len() >= 2, "{}", silent.len());
    let (head, body) = refused.split_once("\r\n\r\n").unwrap();
    assert_eq!(header_value(head, "retry-after").as_deref(), Some("1"));
    assert_eq!(
        serde_json::from_str::<Value>(body).unwrap(),
        json!({"error": "too many connections being set up on this node: try again"})
    );
    // Sessions still work meanwhile.
    let mut c = sessions.pop().unwrap();
    assert_eq!(
        c.request(json!({"action":"ping"})).await["action"],
        json!("pong")
    );

    drop(silent);
    wait_until("/metrics answers again", WAIT, || async move {
        metric_value(addr, "wsgate_pending_connections").await == Some(1.0)
    })
    .await;
    let refusals = metric_value(addr, "wsgate_refused_total{reason=\"max_pending\"}")
        .await
        .unwrap();
    assert!(refusals >= 1.0, "{refusals}");
    drop((c, sessions));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_connections_count_toward_the_per_address_limit() {
    let gw = Gateway::start(Config {
        max_connections_per_ip: Some(nz(2)),
        ..test_config(None)
    })
    .await;
    let addr = gw.addr;
    let here: IpAddr = "127.0.0.1".parse().unwrap();
    let elsewhere: IpAddr = "127.0.0.2".parse().unwrap();
    // Silent connections from one address take its two places (none is
    // upgraded); the next one is answered 429 as it is accepted.
    let (silent, refused) = fill_until_refused(addr, here, 429).await;
    assert!(silent.len() >= 2, "{}", silent.len());
    let (head, body) = refused.split_once("\r\n\r\n").unwrap();
    assert_eq!(header_value(head, "retry-after").as_deref(), Some("1"));
    assert_eq!(
        serde_json::from_str::<Value>(body).unwrap(),
        json!({"error": "too many connections from your address"})
    );
    // Another address is not affected.
    let mut other = connect_from(elsewhere, addr).await;
    other
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (status, _, metrics) = read_response(&mut other).await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("\nwsgate_pending_connections 3\n"),
        "{metrics}"
    );
    let line = "wsgate_refused_total{reason=\"ip_connections\"} ";
    let refusals: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(line))
        .unwrap()
        .parse()
        .unwrap();
    assert!(refusals >= 1.0);

    // Upgrading hands the connection's place to the session: two sessions
    // from the address, and nothing more, once the silent ones are gone.
    drop(silent);
    let deadline = Instant::now() + WAIT;
    let _a = loop {
        if let Ok(a) = Client::try_connect(addr, "/ws", &[]).await {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "the address's places never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _b = Client::try_connect(addr, "/ws", &[]).await.unwrap();
    let third = Client::try_connect(addr, "/ws", &[]).await.err().unwrap();
    assert_eq!(third.status, 429);
    assert_eq!(third.error(), "too many connections from your address");
    drop((_a, _b));
    gw.stop().await;
}

// ---------------------------------------------------------------- 8. routing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_are_404_and_head_is_served_where_get_is() {
    let gw = Gateway::start(test_config(None)).await;
    let addr = gw.addr;
    let not_found = r#"{"error":"not found"}"#;
    for (method, path) in [
        ("GET", "/nope"),
        ("POST", "/nope"),
        ("HEAD", "/nope"),
        ("DELETE", "/"),
        ("GET", "/healthz/extra"),
        ("GET", "/ws/x"),
    ] {
        let (status, body) = http(addr, method, path, None).await;
        let expect = if method == "HEAD" { "" } else { not_found };
        assert_eq!((status, body.as_str()), (404, expect), "{method} {path}");
    }
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (status, body) = http(addr, "HEAD", path, None).await;
        assert_eq!((status, body.as_str()), (200, ""), "HEAD {path}");
        let (status, body) = http(addr, "GET", path, None).await;
        assert_eq!(status, 200, "GET {path}");
        assert!(!body.is_empty());
    }
    // A known path with another method: 405 naming what it serves.
    for (method, path, allow) in [
        ("POST", "/healthz", "GET, HEAD"),
        ("PUT", "/metrics", "GET, HEAD"),
        ("GET", "/publish", "POST"),
        ("HEAD", "/publish", "POST"),
        ("POST", "/ws", "GET"),
    ] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let (status, head, body) = read_response_to(&mut s, method).await;
        assert_eq!(status, 405, "{method} {path}: {head}");
        assert_eq!(header_value(&head, "allow").as_deref(), Some(allow));
        if method != "HEAD" {
            assert_eq!(
                serde_json::from_str::<Value>(&body).unwrap(),
                json!({"error": format!("method not allowed: use {allow}")})
            );
        }
    }
    gw.stop().await;
}

// ---------------------------------------------------------------- 8. publish errors

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_errors_name_the_field_the_position_and_the_batch_index() {
    let gw = Gateway::start(test_config(None)).await;
    let mut all = gw.client().await;
    all.psubscribe("*").await;
    let shapes = r#"expected {"channel": string, "payload": any JSON} (or "payload_text": string instead of "payload"; optional "idempotency_key": string), or {"messages": [such objects, ...]}"#;
    for (body, error) in [
        (
            r#"{"channel":"a","payload":1,"extra":true}"#.to_owned(),
            "invalid body: unknown field `extra`, expected one of `channel`, `payload`, `payload_text`, `idempotency_key`, `messages` at line 1 column 34".to_owned(),
        ),
        (
            "not json".to_owned(),
            "invalid body: expected ident at line 1 column 2".to_owned(),
        ),
        (
            "{\n  \"channel\": \"a\",\n  \"payload\": [1,,2]\n}".to_owned(),
            "invalid body: expected value at line 3 column 17".to_owned(),
        ),
        (
            r#"{"channel":"a","payload":1"#.to_owned(),
            "invalid body: EOF while parsing an object at line 1 column 26".to_owned(),
        ),
        (
            r#"{"messages":[{"channel":"a","payload":1},{"channel":"b"}]}"#.to_owned(),
            format!(r#"messages[1]: missing field "payload": {shapes}"#),
        ),
        (
            "{\"messages\": [\n  {\"channel\": \"a\", \"payload\": 1},\n  {\"channel\": \"b\", \"payload\": 2, \"id\": 7}\n]}"
                .to_owned(),
            "messages[1]: unknown field `id`, expected one of `channel`, `payload`, `payload_text`, `idempotency_key` at line 3 column 37"
                .to_owned(),
        ),
        (
            r#"{"messages":[{"channel":"a","payload":1},{"channel":"","payload":2}]}"#.to_owned(),
            "messages[1]: channel must be 1 to 256 bytes".to_owned(),
        ),
        (
            r#"{"messages":[{"channel":"a","payload":1},5]}"#.to_owned(),
            "messages[1]: invalid type: integer `5`, expected struct PublishOne at line 1 column 42".to_owned(),
        ),
        (
            r#"{"channel":"a"}"#.to_owned(),
            format!(r#"missing field "payload": {shapes}"#),
        ),
        (
            r#"{"payload":1}"#.to_owned(),
            format!(r#"missing field "channel": {shapes}"#),
        ),
        (
            r#"{"messages":[]}"#.to_owned(),
            r#""messages" must hold at least one message"#.to_owned(),
        ),
        (
            r#"{"channel":"a","payload":1,"messages":[{"channel":"a","payload":1}]}"#.to_owned(),
            format!(r#""messages" cannot be combined with other fields: {shapes}"#),
        ),
        ("{}".to_owned(), format!(r#"missing field "channel": {shapes}"#)),
        (
            r#"{"channel":"","payload":1}"#.to_owned(),
            "channel must be 1 to 256 bytes".to_owned(),
        ),
    ] {
        let (status, text) = http(gw.addr, "POST", "/publish", Some(&body)).await;
        assert_eq!(status, 400, "{body}: {text}");
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap(),
            json!({ "error": error }),
            "{body}"
        );
    }
    // None of them published anything, not even a valid head of a batch.
    let r = gw.publish(json!({"channel":"marker","payload":0})).await;
    assert_eq!(r, (200, json!({"receivers":1})));
    assert_eq!(all.recv().await["channel"], "marker");
    drop(all);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_body_has_its_own_limit() {
    let gw = Gateway::start(Config {
        max_message_bytes: nz(1024),
        max_publish_bytes: nz(8192),
        ..test_config(None)
    })
    .await;
    let mut c = gw.client().await;
    c.subscribe("big").await;
    // A body over the frame limit but within the publish limit is published.
    let payload = "p".repeat(4000);
    let r = gw
        .publish(json!({"channel":"big","payload":payload.clone()}))
        .await;
    assert_eq!(r, (200, json!({"receivers":1})));
    assert_eq!(c.recv().await["payload"], json!(payload));
    // Over the publish limit: 413 naming it.
    let r = gw
        .publish(json!({"channel":"big","payload":"p".repeat(9000)}))
        .await;
    assert_eq!(r, (413, json!({"error":"body larger than 8192 bytes"})));
    // Client frames still obey WSGATE_MAX_MESSAGE_BYTES: 1009.
    c.ws.send(Message::Text("x".repeat(1025).into()))
        .await
        .unwrap();
    let frame = c.expect_close().await.expect("a close frame");
    assert_eq!(u16::from(frame.code), 1009);
    gw.stop().await;
}

// ---------------------------------------------------------------- 8. strict handshake

/// An upgrade request with exactly these header lines; (status, head, body).
async fn handshake(addr: SocketAddr, lines: &[&str]) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = "GET /ws HTTP/1.1\r\n".to_owned();
    for l in lines {
        req.push_str(l);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    read_response(&mut s).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handshake_is_checked_strictly() {
    let gw = Gateway::start(test_config(None)).await;
    let addr = gw.addr;
    let host = format!("Host: {addr}");
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==";
    let base = [
        "Connection: Upgrade",
        "Upgrade: websocket",
        "Sec-WebSocket-Version: 13",
    ];
    let bad_key = "invalid Sec-WebSocket-Key: expected one, the base64 of 16 random bytes";
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![key], "missing Host header"),
        (vec![&host, "Sec-WebSocket-Key: short"], bad_key),
        // Base64 of 15 bytes, and of 17.
        (
            vec![&host, "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAA"],
            bad_key,
        ),
        (
            vec![&host, "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAAA="],
            bad_key,
        ),
        (
            vec![&host, "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA"],
            bad_key,
        ),
        (
            vec![&host, key, "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA=="],
            bad_key,
        ),
        (vec![&host], "missing Sec-WebSocket-Key"),
    ];
    for (extra, error) in cases {
        let mut lines: Vec<&str> = base.to_vec();
        lines.extend(extra.iter().copied());
        let (status, head, body) = handshake(addr, &lines).await;
        assert_eq!(status, 400, "{lines:?}: {head}");
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap(),
            json!({ "error": error }),
            "{lines:?}"
        );
    }
    // Version other than 13: 400 telling which version we speak.
    let (status, head, body) = handshake(
        addr,
        &[
            &host,
            key,
            "Connection: Upgrade",
            "Upgrade: websocket",
            "Sec-WebSocket-Version: 8",
        ],
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        header_value(&head, "sec-websocket-version").as_deref(),
        Some("13")
    );
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"error": "unsupported WebSocket version: expected 13"})
    );
    // The well-formed handshake: 101 with the RFC 6455 sample accept value.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\n{host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\n{key}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert_eq!(
        header_value(&head, "sec-websocket-accept").as_deref(),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    drop(s);
    // Real clients are unaffected.
    let mut c = gw.client().await;
    assert_eq!(
        c.request(json!({"action":"ping"})).await["action"],
        json!("pong")
    );
    drop(c);
    gw.stop().await;
}
