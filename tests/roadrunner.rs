//! RoadRunner websockets v2 end to end: raw WebSocket clients (tungstenite
//! here, npm `ws` through `tests/js/raw_ws.js`: RoadRunner's own JS client
//! on npm speaks RoadRunner 1.x) against gateways on a real `redis-server`,
//! beside native clients, and RoadRunner's broadcast RPC over HTTP.
//!
//! Every frame is compared byte for byte with the shapes of
//! `docs/dialects/roadrunner.md`, written out here by hand. Waits are on
//! signals (a reply, `PUBSUB NUMSUB`, a Redis subscriber), each bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::num::NonZeroUsize;
use std::time::Duration;

use base64::Engine as _;
use common::node::Script;
use common::{http_with, test_config, Client, Gateway, RawSub, Redis, WAIT};
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use wsgate::Config;

const PATH: &str = "/roadrunner";

async fn rr(gw: &Gateway) -> Client {
    Client::connect(gw.addr, PATH).await
}

/// Sends a join and checks the replies, in order.
async fn join(c: &mut Client, topics: &[&str], replies: &[&str]) {
    c.send_text(&json!({"command":"join","topics":topics}).to_string())
        .await;
    for want in replies {
        assert_eq!(c.recv_text().await, *want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_deliver_leave_byte_for_byte() {
    let redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let mut c = rr(&gw).await;
    c.send_text(r#"{"command":"join","topics":["chat","news"]}"#)
        .await;
    assert_eq!(
        c.recv_text().await,
        r#"{"topic":"@join","payload":["chat","news"]}"#
    );
    // @join comes once the broker confirmed: Redis holds both already.
    assert_eq!(redis.numsub("chat").await, 1);
    assert_eq!(redis.numsub("news").await, 1);

    // The raw bytes as a JSON string, escaped as Go escapes them.
    assert_eq!(redis.publish("chat", b"{\"html\":\"<b>&\"}\n\xff").await, 1);
    assert_eq!(
        c.recv_text().await,
        r#"{"topic":"chat","payload":"{\"html\":\"\u003cb\u003e\u0026\"}\n\ufffd"}"#
    );
    redis.publish("news", b"42").await;
    assert_eq!(c.recv_text().await, r#"{"topic":"news","payload":"42"}"#);

    // A binary frame is a command too; `headers` is answered by nothing.
    c.ws.send(Message::Binary(
        br#"{"command":"headers","topics":[]}"#.to_vec().into(),
    ))
    .await
    .unwrap();
    c.ws.send(Message::Binary(
        br#"{"command":"leave","topics":["news"]}"#.to_vec().into(),
    ))
    .await
    .unwrap();
    assert_eq!(
        c.recv_text().await,
        r#"{"topic":"@leave","payload":["news"]}"#
    );
    redis.wait_numsub("news", 0).await;
    assert_eq!(redis.publish("news", b"gone").await, 0);
    // Leave of a topic not joined, and null lists: answered as RoadRunner does.
    c.send_text(r#"{"command":"leave","topics":["never"]}"#)
        .await;
    assert_eq!(
        c.recv_text().await,
        r#"{"topic":"@leave","payload":["never"]}"#
    );
    c.send_text(r#"{"command":"join"}"#).await;
    assert_eq!(c.recv_text().await, r#"{"topic":"@join","payload":null}"#);
    // A second join of a held topic is a join (idempotent, as in RoadRunner).
    join(
        &mut c,
        &["chat"],
        &[r#"{"topic":"@join","payload":["chat"]}"#],
    )
    .await;
    redis.publish("chat", b"once").await;
    assert_eq!(c.recv_text().await, r#"{"topic":"chat","payload":"once"}"#);
    c.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_topics_get_hash_join_and_the_others_stay_joined() {
    let redis = Redis::start().await;
    let mut config = test_config(Some(redis.url()));
    config.allow = Some(vec!["chat.*".into()]);
    config.max_pattern_bytes = NonZeroUsize::new(16).unwrap();
    let gw = Gateway::start(config).await;
    let mut c = rr(&gw).await;
    join(
        &mut c,
        &["chat.a", "secret", "chat.b", "chat.aaaaaaaaaaaaaaaaaaa", ""],
        &[
            r##"{"topic":"#join","payload":["secret","chat.aaaaaaaaaaaaaaaaaaa",""]}"##,
            r#"{"topic":"@join","payload":["chat.a","chat.b"]}"#,
        ],
    )
    .await;
    assert_eq!(redis.numsub("chat.a").await, 1);
    assert_eq!(redis.numsub("secret").await, 0);
    // All refused: `#join` with all, then an empty `@join`.
    join(
        &mut c,
        &["secret"],
        &[
            r##"{"topic":"#join","payload":["secret"]}"##,
            r#"{"topic":"@join","payload":[]}"#,
        ],
    )
    .await;
    redis.publish("chat.b", b"hi").await;
    assert_eq!(c.recv_text().await, r#"{"topic":"chat.b","payload":"hi"}"#);
}

/// Malformed frames: (what, frame, the exact `#error` reply).
fn malformed() -> Vec<(&'static str, Message, &'static str)> {
    let text = |s: &'static str| Message::Text(s.into());
    vec![
        (
            "not JSON",
            text("join chat"),
            r##"{"topic":"#error","payload":["invalid JSON: expected value at line 1 column 1"]}"##,
        ),
        (
            "truncated",
            text(r#"{"command":"join","topics":["a""#),
            r##"{"topic":"#error","payload":["invalid JSON: EOF while parsing a list at line 1 column 31"]}"##,
        ),
        (
            "an array",
            text(r#"[{"command":"join"}]"#),
            r##"{"topic":"#error","payload":["a command must be a JSON object"]}"##,
        ),
        (
            "no command",
            text(r#"{"topics":["a"]}"#),
            r##"{"topic":"#error","payload":["missing field \"command\""]}"##,
        ),
        (
            "command not a string",
            text(r#"{"command":["join"]}"#),
            r##"{"topic":"#error","payload":["\"command\" must be a string"]}"##,
        ),
        (
            "unknown command",
            text(r#"{"command":"publish","topics":["a"]}"#),
            r##"{"topic":"#error","payload":["unknown command \"publish\": expected join, leave or headers"]}"##,
        ),
        (
            "topics a string",
            text(r#"{"command":"join","topics":"chat"}"#),
            r##"{"topic":"#error","payload":["\"topics\" must be an array of strings"]}"##,
        ),
        (
            "a topic not a string",
            text(r#"{"command":"leave","topics":["a",7]}"#),
            r##"{"topic":"#error","payload":["\"topics\" must be an array of strings"]}"##,
        ),
        (
            "payload not base64",
            text(r#"{"command":"join","topics":[],"payload":"<>"}"#),
            r##"{"topic":"#error","payload":["\"payload\" must be base64 text"]}"##,
        ),
        (
            "binary, not UTF-8",
            Message::Binary(vec![0xff, 0xfe].into()),
            r##"{"topic":"#error","payload":["invalid JSON: expected value at line 1 column 1"]}"##,
        ),
        (
            "empty",
            text(""),
            r##"{"topic":"#error","payload":["invalid JSON: EOF while parsing a value at line 1 column 0"]}"##,
        ),
        (
            "escaped reason",
            text(r#"{"command":"<script>"}"#),
            r##"{"topic":"#error","payload":["unknown command \"\u003cscript\u003e\": expected join, leave or headers"]}"##,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_hash_error_and_nobody_is_harmed() {
    let redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let mut other = rr(&gw).await;
    join(
        &mut other,
        &["chat"],
        &[r#"{"topic":"@join","payload":["chat"]}"#],
    )
    .await;
    let mut bad = rr(&gw).await;
    let cases = malformed();
    assert!(cases.len() >= 10);
    bad.expect_answers(cases).await;
    // Still open and serving, and the other client never noticed.
    join(
        &mut bad,
        &["chat"],
        &[r#"{"topic":"@join","payload":["chat"]}"#],
    )
    .await;
    redis.publish("chat", b"still here").await;
    for c in [&mut other, &mut bad] {
        assert_eq!(
            c.recv_text().await,
            r#"{"topic":"chat","payload":"still here"}"#
        );
    }
    let m = common::metric_value(gw.addr, "wsgate_malformed_frames_total").await;
    assert_eq!(m, Some(12.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_too_large_is_told_as_interrupted_and_resumed() {
    let redis = Redis::start().await;
    let mut config = test_config(Some(redis.url()));
    config.max_delivery_bytes = NonZeroUsize::new(100).unwrap();
    let gw = Gateway::start(config).await;
    let mut c = rr(&gw).await;
    join(
        &mut c,
        &["big"],
        &[r#"{"topic":"@join","payload":["big"]}"#],
    )
    .await;
    redis.publish("big", &[b'x'; 200]).await;
    assert_eq!(
        c.recv_text().await,
        r##"{"topic":"#interrupted","payload":["big"],"reason":"message too large"}"##
    );
    assert_eq!(
        c.recv_text().await,
        r##"{"topic":"#resumed","payload":["big"]}"##
    );
    redis.publish("big", b"small").await;
    assert_eq!(c.recv_text().await, r#"{"topic":"big","payload":"small"}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_is_told_with_the_topics() {
    let mut redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let mut c = rr(&gw).await;
    join(&mut c, &["a"], &[r#"{"topic":"@join","payload":["a"]}"#]).await;
    redis.kill();
    assert_eq!(
        c.recv_text().await,
        r##"{"topic":"#interrupted","payload":["a"],"reason":"broker connection lost"}"##
    );
    redis.restart().await;
    assert_eq!(
        c.recv_text().await,
        r##"{"topic":"#resumed","payload":["a"]}"##
    );
    redis.wait_numsub("a", 1).await;
    redis.publish("a", b"back").await;
    assert_eq!(c.recv_text().await, r#"{"topic":"a","payload":"back"}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roadrunner_and_native_share_one_redis_subscription_and_each_others_publishes() {
    let redis = Redis::start().await;
    let mut config = test_config(Some(redis.url()));
    config.client_publish = vec!["chat".into()];
    let gw = Gateway::start(config).await;
    let mut native = gw.client().await;
    native.subscribe("chat").await;
    let mut road = rr(&gw).await;
    join(
        &mut road,
        &["chat"],
        &[r#"{"topic":"@join","payload":["chat"]}"#],
    )
    .await;
    assert_eq!(
        redis.numsub("chat").await,
        1,
        "one Redis subscription per node"
    );

    // redis-cli PUBLISH reaches both, each in its own shape.
    assert_eq!(redis.publish("chat", br#"{"n":1}"#).await, 1);
    assert_eq!(
        native.recv_text().await,
        r#"{"action":"message","channel":"chat","payload":{"n":1}}"#
    );
    assert_eq!(
        road.recv_text().await,
        r#"{"topic":"chat","payload":"{\"n\":1}"}"#
    );
    // A native client's publish reaches the RoadRunner client.
    native
        .send_text(r#"{"action":"publish","channel":"chat","payload":"hi","id":"p"}"#)
        .await;
    // The ack and the echo race (two Redis connections): either order.
    let mut got = [native.recv_text().await, native.recv_text().await];
    got.sort();
    assert_eq!(
        got,
        [
            r#"{"action":"message","channel":"chat","payload":"hi"}"#,
            r#"{"action":"publish","channel":"chat","id":"p","status":true}"#,
        ]
    );
    assert_eq!(
        road.recv_text().await,
        r#"{"topic":"chat","payload":"\"hi\""}"#
    );
    // Leaving on one side keeps the subscription for the other.
    road.send_text(r#"{"command":"leave","topics":["chat"]}"#)
        .await;
    assert_eq!(
        road.recv_text().await,
        r#"{"topic":"@leave","payload":["chat"]}"#
    );
    assert_eq!(redis.numsub("chat").await, 1);
    drop(native);
    redis.wait_numsub("chat", 0).await;
}

/// `POST` with an API key header (or none).
async fn post(gw: &Gateway, path: &str, key: Option<&str>, body: &str) -> (u16, String) {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    http_with(gw.addr, "POST", path, &headers, Some(body)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broadcast_rpc_over_http_publishes_the_bytes_unchanged() {
    let redis = Redis::start().await;
    let key = "0123456789abcdef-rr-key";
    let mut config = test_config(Some(redis.url()));
    config.api_key = Config::from_vars([("WSGATE_API_KEY".to_owned(), key.to_owned())])
        .unwrap()
        .api_key;
    let gw = Gateway::start(config).await;
    let mut raw_a = RawSub::subscribe(&redis, "a").await;
    let mut raw_b = RawSub::subscribe(&redis, "b").await;
    let mut road = rr(&gw).await;
    join(&mut road, &["b"], &[r#"{"topic":"@join","payload":["b"]}"#]).await;

    let bytes: &[u8] = b"\x00\xff<bin>";
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    let body = format!(
        r#"{{"messages":[{{"command":"","topics":["a","b"],"payload":"{b64}"}},{{"topics":["a"],"payload_text":"plain"}}]}}"#
    );
    assert_eq!(
        post(&gw, "/roadrunner/publish", None, &body).await.0,
        401,
        "under the publish API key"
    );
    assert_eq!(
        post(&gw, "/roadrunner/publish", Some(key), &body).await,
        (200, r#"{"ok":true}"#.to_owned())
    );
    raw_a.expect(&[bytes, b"plain"]).await;
    raw_b.expect(&[bytes]).await;
    assert_eq!(
        road.recv_text().await,
        r#"{"topic":"b","payload":"\u0000\ufffd\u003cbin\u003e"}"#
    );
    // The async one answers at once, and the message follows.
    let body = r#"{"messages":[{"topics":["b"],"payload":"aGk="}]}"#;
    assert_eq!(
        post(&gw, "/roadrunner/publish-async", Some(key), body).await,
        (200, r#"{"ok":true}"#.to_owned())
    );
    raw_b.expect(&[b"hi"]).await;
    assert_eq!(road.recv_text().await, r#"{"topic":"b","payload":"hi"}"#);
    // Bad bodies: 400, nothing published.
    for (body, want) in [
        (
            r#"{"messages":[]}"#,
            r#"{"error":"\"messages\" must hold at least one message"}"#,
        ),
        (
            r#"{"messages":[{"topics":["a"],"payload":"%%"}]}"#,
            r#"{"error":"messages[0]: \"payload\" must be base64"}"#,
        ),
    ] {
        assert_eq!(
            post(&gw, "/roadrunner/publish", Some(key), body).await,
            (400, want.to_owned()),
            "{body}"
        );
    }
    let (status, _) = post(&gw, "/roadrunner/publish", Some(key), "nope").await;
    assert_eq!(status, 400);
    // Another method on the path: 405.
    let (status, _) = http_with(gw.addr, "GET", "/roadrunner/publish", &[], None).await;
    assert_eq!(status, 405);
    assert_eq!(redis.publish("a", b"sentinel").await, 1);
    raw_a.expect(&[b"sentinel"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_ws_client_joins_receives_and_is_told_its_errors() {
    let redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let url = format!("ws://{}{PATH}", gw.addr);
    let mut s = Script::spawn("raw_ws.js", &["--url", &url]);
    s.expect("open").await;
    s.send(json!({"cmd":"send","text":r#"{"command":"join","topics":["room"]}"#}))
        .await;
    let joined = s.expect("message").await;
    assert_eq!(joined["text"], r#"{"topic":"@join","payload":["room"]}"#);
    redis.publish("room", "é <ok>".as_bytes()).await;
    let got = s.expect("message").await;
    assert_eq!(
        got["text"],
        r#"{"topic":"room","payload":"é \u003cok\u003e"}"#
    );
    let binary = base64::engine::general_purpose::STANDARD.encode(b"{\"command\":1}");
    s.send(json!({"cmd":"send","binary":binary})).await;
    let err = s.expect("message").await;
    assert_eq!(
        err["text"],
        r##"{"topic":"#error","payload":["\"command\" must be a string"]}"##
    );
    s.send(json!({"cmd":"close"})).await;
    let closed = s.expect("close").await;
    assert_eq!(closed["code"], 1000);
    redis.wait_numsub("room", 0).await;
}

#[test]
fn the_binary_refuses_two_endpoints_on_one_path() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .env("WSGATE_ROADRUNNER_PATH", "/ws")
        .env("WSGATE_LISTEN", "127.0.0.1:0")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run wsgate");
    let deadline = std::time::Instant::now() + WAIT;
    while child.try_wait().expect("try_wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("wsgate started with two endpoints on /ws");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().expect("output");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "WSGATE_WS_PATH and WSGATE_ROADRUNNER_PATH both mount /ws: give each endpoint its own path"
        ),
        "{stderr}"
    );
}
