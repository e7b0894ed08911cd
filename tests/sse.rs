//! Server-sent events (`GET /sse`): byte for byte over a raw socket and
//! `curl -N`, and through the real npm `eventsource` client
//! (`tests/js/sse_client.js`): deliveries, gap notices across a Redis
//! restart, heartbeats, tokens in the header and the query, ACL refusals,
//! bad queries, the slow-consumer end and the drain end (with `retry:`, and
//! EventSource coming back on the restarted node).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::node::Script;
use common::sse::{refused, subscribed, SseStream};
use common::*;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use wsgate::auth::JwtKey;
use wsgate::Config;

const SECRET: &str = "wsgate-test-secret-0123456789abcdef";

fn token(acl: &[&str]) -> String {
    let claims = json!({
        "sub": "reader",
        "exp": jsonwebtoken::get_current_timestamp() + 3600,
        "subscribe": acl,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// The `retry:` field every stream opens with: 1000 to 2999 ms.
fn assert_retry(event: &str) {
    let ms: u64 = event
        .strip_prefix("retry: ")
        .and_then(|r| r.strip_suffix("\n\n"))
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("not a retry field: {event:?}"));
    assert!((1000..3000).contains(&ms), "retry {ms}");
}

#[tokio::test]
async fn raw_stream_is_exact_headers_deliveries_and_heartbeat() {
    let redis = Redis::start().await;
    let gw = Gateway::start(Config {
        ping_interval: Duration::from_millis(300),
        ..test_config(Some(redis.url()))
    })
    .await;
    let mut s = SseStream::open(gw.addr, "/sse?channel=news&pattern=a.*", &[]).await;
    assert_eq!(s.status, 200, "{}", s.head);
    assert_eq!(
        s.header("content-type").as_deref(),
        Some("text/event-stream")
    );
    assert_eq!(s.header("cache-control").as_deref(), Some("no-cache"));
    assert_eq!(s.header("x-accel-buffering").as_deref(), Some("no"));
    assert_retry(&s.next_event().await.unwrap());
    assert_eq!(
        s.next_non_heartbeat().await.unwrap(),
        subscribed("channel", "news")
    );
    assert_eq!(
        s.next_non_heartbeat().await.unwrap(),
        subscribed("pattern", "a.*")
    );
    redis.publish("news", br#"{"n":1}"#).await;
    redis.publish("a.b", b"plain text").await;
    redis.publish("news", b"\xff\x00").await;
    // Raw JSON with line breaks: each break becomes a data line.
    redis.publish("news", b"{\"a\":\r\n1}").await;
    for want in [
        "data: {\"action\":\"message\",\"channel\":\"news\",\"payload\":{\"n\":1}}\n\n",
        "data: {\"action\":\"message\",\"pattern\":\"a.*\",\"channel\":\"a.b\",\"payload\":\"plain text\"}\n\n",
        "data: {\"action\":\"message\",\"channel\":\"news\",\"payload\":\"/wA=\",\"encoding\":\"base64\"}\n\n",
        "data: {\"action\":\"message\",\"channel\":\"news\",\"payload\":{\"a\":\ndata: 1}}\n\n",
    ] {
        assert_eq!(s.next_non_heartbeat().await.unwrap(), want);
    }
    // The heartbeat: a comment every WSGATE_PING_INTERVAL_MS.
    let started = std::time::Instant::now();
    assert_eq!(s.next_event().await.unwrap(), ": ping\n\n");
    assert!(started.elapsed() < Duration::from_secs(2));
    // Leaving frees the subscription.
    drop(s);
    wait_until("NUMSUB news 0", WAIT, || async {
        redis.numsub("news").await == 0
    })
    .await;
}

#[tokio::test]
async fn curl_n_streams_events() {
    let redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let mut curl = tokio::process::Command::new("curl")
        .args(["-sN", "--max-time", "20"])
        .arg(format!("http://{}/sse?channel=news", gw.addr))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("curl on PATH");
    let mut out = curl.stdout.take().unwrap();
    let mut seen = Vec::new();
    let want_subscribed = subscribed("channel", "news");
    read_until(&mut out, &mut seen, &want_subscribed).await;
    redis.publish("news", b"[1,2]").await;
    let delivery = "data: {\"action\":\"message\",\"channel\":\"news\",\"payload\":[1,2]}\n\n";
    read_until(&mut out, &mut seen, delivery).await;
    let text = String::from_utf8(seen.clone()).unwrap();
    let (retry, rest) = text.split_once("\n\n").unwrap();
    assert_retry(&format!("{retry}\n\n"));
    assert_eq!(rest, format!("{want_subscribed}{delivery}"));
}

/// Reads curl's output into `seen` until it holds `needle`.
async fn read_until(out: &mut tokio::process::ChildStdout, seen: &mut Vec<u8>, needle: &str) {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(WAIT, async {
        while !String::from_utf8_lossy(seen).contains(needle) {
            let n = out.read(&mut buf).await.unwrap();
            assert!(n > 0, "curl ended: {}", String::from_utf8_lossy(seen));
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("curl never printed {needle:?}"));
}

#[tokio::test]
async fn eventsource_gets_deliveries_and_gap_notices_across_a_redis_restart() {
    let mut redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let url = format!("http://{}/sse?channel=news&pattern=a.*", gw.addr);
    let mut es = Script::spawn("sse_client.js", &["--url", &url]);
    es.expect("open").await;
    for _ in 0..2 {
        let e = es.expect("named").await;
        assert_eq!(e["type"], "subscribe");
        assert_eq!(
            serde_json::from_str::<Value>(e["data"].as_str().unwrap()).unwrap()["status"],
            true
        );
    }
    redis.publish("a.x", br#"{"k":"v"}"#).await;
    let m = es.expect("message").await;
    assert_eq!(
        m["data"],
        r#"{"action":"message","pattern":"a.*","channel":"a.x","payload":{"k":"v"}}"#
    );
    redis.kill();
    let e = es
        .expect_where("interrupted", |e| e["type"] == "interrupted")
        .await;
    assert_eq!(
        sorted_topics(serde_json::from_str(e["data"].as_str().unwrap()).unwrap()),
        notice("interrupted", Some(REASON_LOST), &["a.*"], &["news"])
    );
    redis.restart().await;
    let e = es.expect_where("resumed", |e| e["type"] == "resumed").await;
    assert_eq!(
        sorted_topics(serde_json::from_str(e["data"].as_str().unwrap()).unwrap()),
        notice("resumed", None, &["a.*"], &["news"])
    );
    redis.publish("news", b"1").await;
    let m = es.expect("message").await;
    assert_eq!(
        m["data"],
        r#"{"action":"message","channel":"news","payload":1}"#
    );
}

#[tokio::test]
async fn tokens_in_query_and_header_and_the_acl() {
    let gw = Gateway::start(Config {
        jwt_key: Some(JwtKey::secret(SECRET).unwrap()),
        ..test_config(None)
    })
    .await;
    let t = token(&["news.*"]);
    // In the query; a subscription outside the ACL is refused in the stream.
    let mut s = SseStream::open(
        gw.addr,
        &format!("/sse?channel=news.a&channel=secret&token={t}"),
        &[],
    )
    .await;
    assert_eq!(s.status, 200);
    assert_retry(&s.next_event().await.unwrap());
    assert_eq!(
        s.next_event().await.unwrap(),
        refused("channel", "secret", "not allowed")
    );
    assert_eq!(
        s.next_event().await.unwrap(),
        subscribed("channel", "news.a")
    );
    // In the header, through EventSource's fetch.
    let url = format!("http://{}/sse?pattern=news.*", gw.addr);
    let mut es = Script::spawn("sse_client.js", &["--url", &url, "--bearer", &t]);
    es.expect("open").await;
    es.expect("named").await;
    gw.publish(json!({"channel": "news.a", "payload": {"x": true}}))
        .await;
    let m = es.expect("message").await;
    assert_eq!(
        m["data"],
        r#"{"action":"message","pattern":"news.*","channel":"news.a","payload":{"x":true}}"#
    );
    assert_eq!(
        s.next_event().await.unwrap(),
        "data: {\"action\":\"message\",\"channel\":\"news.a\",\"payload\":{\"x\":true}}\n\n"
    );
    // No token: 401, and EventSource gives up (readyState 2 = CLOSED).
    let url = format!("http://{}/sse?channel=news.a", gw.addr);
    let mut es = Script::spawn("sse_client.js", &["--url", &url]);
    let e = es.expect("es_error").await;
    assert_eq!(
        (e["readyState"].as_u64(), e["status"].as_u64()),
        (Some(2), Some(401))
    );
    // Both places: ambiguous, 401.
    let mut s = SseStream::open(
        gw.addr,
        &format!("/sse?channel=news.a&token={t}"),
        &[("Authorization", &format!("Bearer {t}"))],
    )
    .await;
    assert_eq!(s.status, 401);
    assert_eq!(
        s.body_text().await,
        r#"{"error":"token given more than once"}"#
    );
}

#[tokio::test]
async fn bad_requests_are_refused_and_harm_nobody() {
    let gw = Gateway::start(Config {
        max_subscriptions: std::num::NonZeroUsize::new(3).unwrap(),
        max_pattern_bytes: std::num::NonZeroUsize::new(16).unwrap(),
        allowed_origins: Some(vec!["https://app.example".into()]),
        ..test_config(None)
    })
    .await;
    // A healthy stream beside them.
    let mut ok = SseStream::open(gw.addr, "/sse?channel=ok", &[]).await;
    assert_retry(&ok.next_event().await.unwrap());
    assert_eq!(ok.next_event().await.unwrap(), subscribed("channel", "ok"));
    let nothing =
        r#"{"error":"nothing to stream: give at least one channel=<name> or pattern=<glob>"}"#;
    for (method, path, headers, status, body) in [
        ("GET", "/sse", vec![], 400, nothing.to_owned()),
        ("GET", "/sse?token=abc&x=1", vec![], 400, nothing.to_owned()),
        (
            "GET",
            "/sse?channel=",
            vec![],
            400,
            r#"{"error":"empty channel: give a name, channel=<name>"}"#.to_owned(),
        ),
        (
            "GET",
            "/sse?pattern",
            vec![],
            400,
            r#"{"error":"empty pattern: give a name, pattern=<name>"}"#.to_owned(),
        ),
        (
            "GET",
            "/sse?channel=%zz",
            vec![],
            400,
            r#"{"error":"invalid channel: not percent-encoded UTF-8 (\"%zz\")"}"#.to_owned(),
        ),
        (
            "GET",
            "/sse?channel=%C3%28",
            vec![],
            400,
            r#"{"error":"invalid channel: not percent-encoded UTF-8 (\"%C3%28\")"}"#.to_owned(),
        ),
        (
            "GET",
            "/sse?channel=a&channel=b&pattern=c*&channel=d",
            vec![],
            400,
            r#"{"error":"too many subscriptions: at most 3 channel= and pattern= parameters"}"#
                .to_owned(),
        ),
        (
            "POST",
            "/sse?channel=a",
            vec![("Content-Length", "0")],
            405,
            r#"{"error":"method not allowed: use GET, OPTIONS"}"#.to_owned(),
        ),
        (
            "GET",
            "/sse?channel=a",
            vec![("Origin", "https://evil.example")],
            403,
            r#"{"error":"origin not allowed"}"#.to_owned(),
        ),
        (
            "GET",
            "/sse?channel=a",
            vec![
                ("Origin", "https://app.example"),
                ("Origin", "https://app.example"),
            ],
            403,
            r#"{"error":"origin not allowed"}"#.to_owned(),
        ),
    ] {
        let mut s = SseStream::open_with(gw.addr, method, path, &headers, None).await;
        assert_eq!(s.status, status, "{method} {path}: {}", s.head);
        assert_eq!(s.body_text().await, body, "{method} {path}");
    }
    // Refused in the stream, by the session's own checks.
    let mut s = SseStream::open(
        gw.addr,
        "/sse?channel=this-name-is-far-too-long&channel=x&channel=x",
        &[("Origin", "https://app.example")],
    )
    .await;
    assert_eq!(s.status, 200);
    assert_eq!(
        s.header("access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    assert_retry(&s.next_event().await.unwrap());
    let mut events = Vec::new();
    for _ in 0..3 {
        events.push(s.next_event().await.unwrap());
    }
    events.sort();
    let mut want = vec![
        refused(
            "channel",
            "this-name-is-far-too-long",
            "channel too long (25 bytes, max 16)",
        ),
        subscribed("channel", "x"),
        refused("channel", "x", "already subscribed"),
    ];
    want.sort();
    assert_eq!(events, want);
    // The healthy stream still works.
    gw.publish(json!({"channel": "ok", "payload": 1})).await;
    assert_eq!(
        ok.next_event().await.unwrap(),
        "data: {\"action\":\"message\",\"channel\":\"ok\",\"payload\":1}\n\n"
    );
}

#[tokio::test]
async fn a_slow_consumer_stream_ends_with_a_close_event() {
    let redis = Redis::start().await;
    let gw = Gateway::start(Config {
        client_queue_bytes: std::num::NonZeroUsize::new(256 * 1024).unwrap(),
        ..test_config(Some(redis.url()))
    })
    .await;
    let mut s = SseStream::open_with(gw.addr, "GET", "/sse?channel=flood", &[], Some(4096)).await;
    assert_retry(&s.next_event().await.unwrap());
    assert_eq!(
        s.next_event().await.unwrap(),
        subscribed("channel", "flood")
    );
    // Stop reading; publish until the gateway gives up on this client.
    let payload = vec![b'x'; 64 * 1024];
    let mut closed = false;
    for _ in 0..40 {
        for _ in 0..10 {
            redis.publish("flood", &payload).await;
        }
        if metric_value(gw.addr, "wsgate_slow_consumer_closes_total").await == Some(1.0) {
            closed = true;
            break;
        }
    }
    assert!(closed, "never counted as a slow consumer");
    let rest = s.rest(Duration::from_secs(10)).await;
    assert_eq!(
        rest.last().map(String::as_str),
        Some("event: close\ndata: {\"action\":\"close\",\"code\":4008,\"reason\":\"slow consumer\"}\n\n"),
        "{} events",
        rest.len()
    );
    wait_until("NUMSUB flood 0", WAIT, || async {
        redis.numsub("flood").await == 0
    })
    .await;
}

#[tokio::test]
async fn the_drain_ends_the_stream_and_eventsource_comes_back() {
    let env = [
        ("WSGATE_DRAIN_WINDOW_MS", "200".to_owned()),
        ("WSGATE_SHUTDOWN_TIMEOUT_MS", "2000".to_owned()),
    ];
    let mut node = GatewayProcess::spawn(&env).await;
    let addr = node.addr;
    let mut raw = SseStream::open(addr, "/sse?channel=news", &[]).await;
    assert_retry(&raw.next_event().await.unwrap());
    assert_eq!(
        raw.next_event().await.unwrap(),
        subscribed("channel", "news")
    );
    let url = format!("http://{addr}/sse?channel=news");
    let mut es = Script::spawn("sse_client.js", &["--url", &url]);
    assert_eq!(es.expect("open").await["opens"], 1);
    es.expect("named").await;
    let status = node.terminate().await;
    assert!(status.success(), "{status:?}");
    // The stream's last event says why, then it ends.
    assert_eq!(
        raw.rest(WAIT).await,
        vec!["event: close\ndata: {\"action\":\"close\",\"code\":1012,\"reason\":\"service restart\"}\n\n"]
    );
    let e = es.expect_where("close", |e| e["type"] == "close").await;
    assert_eq!(
        e["data"],
        r#"{"action":"close","code":1012,"reason":"service restart"}"#
    );
    // EventSource retries (readyState 0: CONNECTING) after `retry` ms,
    // and finds the node started again on the same address.
    let e = es.expect("es_error").await;
    assert_eq!(e["readyState"], 0);
    let _again = GatewayProcess::spawn_at(addr, &env).await;
    assert_eq!(es.expect("open").await["opens"], 2);
    let e = es.expect("named").await;
    assert_eq!(e["type"], "subscribe");
}
