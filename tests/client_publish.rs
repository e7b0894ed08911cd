//! Client publishing over the native protocol, end to end against a real
//! redis-server: `{"action":"publish",...}` reaches Redis and native
//! subscribers byte for byte (the payload rule of `POST /publish`), only where
//! `WSGATE_CLIENT_PUBLISH` and, with tokens, the `publish` claim allow it,
//! and malformed publishes get an error while the connection stays open.
//!
//! "Not published" is proven with a marker published straight to Redis
//! afterwards: the next message a plain Redis subscriber sees must be the
//! marker. Every wait is bounded; nothing sleeps to synchronise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::num::NonZeroUsize;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use wsgate::auth::JwtKey;
use wsgate::Config;

const SECRET: &str = "wsgate-test-secret-0123456789abcdef";

fn config(redis_url: Option<String>, client_publish: &[&str]) -> Config {
    Config {
        client_publish: client_publish.iter().map(|s| (*s).to_owned()).collect(),
        ..test_config(redis_url)
    }
}

/// What the tests of one publisher on `chat.a` start with: a Redis, a
/// gateway on it that lets clients publish on any channel (`tweak` adjusts
/// its config further), a plain Redis subscriber of `chat.a`, and a native
/// client.
async fn on_chat_a(tweak: impl FnOnce(&mut Config)) -> (Redis, Gateway, RawSub, Client) {
    let redis = Redis::start().await;
    let mut config = config(Some(redis.url()), &["*"]);
    tweak(&mut config);
    let gw = Gateway::start(config).await;
    let raw = RawSub::subscribe(&redis, "chat.a").await;
    let c = gw.client().await;
    (redis, gw, raw, c)
}

/// A publish frame with a raw payload text (so its exact bytes are sent).
fn publish_frame(channel: &str, payload: &str, id: &str) -> String {
    format!(
        r#"{{"action":"publish","channel":{},"payload":{payload},"id":"{id}"}}"#,
        json!(channel)
    )
}

fn published(channel: &str, id: &str) -> Value {
    json!({"action":"publish","channel":channel,"id":id,"status":true})
}

fn refused(channel: &str, id: &str, error: &str) -> Value {
    json!({"action":"publish","channel":channel,"id":id,"status":false,"error":error})
}

/// Sends one publish and returns the reply to it.
async fn publish(c: &mut Client, channel: &str, payload: &str, id: &str) -> Value {
    c.send_text(&publish_frame(channel, payload, id)).await;
    c.recv().await
}

/// Nothing reached `raw` since the last message read: the next one is a
/// marker published now, straight to Redis.
async fn nothing_published(redis: &Redis, raw: &mut RawSub, channel: &str) {
    let marker = format!("marker-{}", free_port());
    assert!(redis.publish(channel, marker.as_bytes()).await >= 1);
    assert_eq!(
        raw.next_text().await,
        marker,
        "something else was published first"
    );
}

/// Publishes `payload` on `channel` from `c`: the publish is acknowledged
/// and `raw` (subscribed to `channel` straight on Redis) gets exactly that
/// text next.
async fn publishes(c: &mut Client, raw: &mut RawSub, channel: &str, payload: &str, id: &str) {
    assert_eq!(
        publish(c, channel, payload, id).await,
        published(channel, id)
    );
    assert_eq!(
        raw.next_text().await,
        payload,
        "Redis carried the JSON text"
    );
}

/// `c` may not publish on `channel`: its publish is refused `not allowed`
/// and nothing reached `raw` (subscribed to `channel` straight on Redis).
async fn not_allowed(c: &mut Client, redis: &Redis, raw: &mut RawSub, channel: &str) {
    assert_eq!(
        publish(c, channel, "1", "p").await,
        refused(channel, "p", "not allowed")
    );
    nothing_published(redis, raw, channel).await;
}

fn refused_series(reason: &str) -> String {
    format!("wsgate_refused_total{{reason=\"{reason}\"}}")
}

fn token(claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn connect_with(gw: &Gateway, token: &str) -> Client {
    let bearer = format!("Bearer {token}");
    Client::try_connect(gw.addr, "/ws", &[("authorization", &bearer)])
        .await
        .unwrap_or_else(|r| panic!("upgrade refused: {r:?}"))
}

/// The payloads tried: each is published as exactly this text and embedded
/// in a native delivery as is (all are JSON).
const PAYLOADS: &[&str] = &[
    r#""42""#,
    "42",
    "null",
    r#"{"z":1, "a":[2]}"#,
    r#""\u0041 \"q\"""#,
    "[ true ,false]",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_publish_reaches_redis_and_native_subscribers_byte_for_byte() {
    let redis = Redis::start().await;
    let gw = Gateway::start(config(Some(redis.url()), &["chat.*"])).await;
    let mut raw = RawSub::subscribe(&redis, "chat.a").await;
    let mut sub = gw.client().await;
    sub.subscribe("chat.a").await;
    let mut publisher = gw.client().await;
    for (i, payload) in PAYLOADS.iter().enumerate() {
        let id = format!("p{i}");
        publishes(&mut publisher, &mut raw, "chat.a", payload, &id).await;
        assert_eq!(
            sub.recv_text().await,
            format!(r#"{{"action":"message","channel":"chat.a","payload":{payload}}}"#)
        );
    }
    // A channel that looks like a pattern is a name like any other: `chat.*`
    // matches it as an entry, and it reaches the channel's subscribers only.
    let mut literal = RawSub::subscribe(&redis, "chat.*").await;
    publishes(&mut publisher, &mut literal, "chat.*", "1", "lit").await;
    nothing_published(&redis, &mut raw, "chat.a").await;
    drop((sub, publisher));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_publish_works_with_the_embedded_broker() {
    let gw = Gateway::start(config(None, &["chat.*"])).await;
    let mut sub = gw.client().await;
    sub.subscribe("chat.a").await;
    let mut publisher = gw.client().await;
    assert_eq!(
        publish(&mut publisher, "chat.a", r#""42""#, "p").await,
        published("chat.a", "p")
    );
    assert_eq!(
        sub.recv_text().await,
        r#"{"action":"message","channel":"chat.a","payload":"42"}"#
    );
    drop((sub, publisher));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_client_publish_nothing_may_be_published() {
    let redis = Redis::start().await;
    // Default: WSGATE_CLIENT_PUBLISH unset.
    let gw = Gateway::start(config(Some(redis.url()), &[])).await;
    let mut raw = RawSub::subscribe(&redis, "chat.a").await;
    let mut c = gw.client().await;
    not_allowed(&mut c, &redis, &mut raw, "chat.a").await;
    assert_eq!(
        metric_value(gw.addr, &refused_series("publish_not_allowed")).await,
        Some(1.0)
    );
    drop(c);
    gw.stop().await;

    // Set: only the listed channels.
    let gw = Gateway::start(config(Some(redis.url()), &["chat.*"])).await;
    let mut raw_news = RawSub::subscribe(&redis, "news.a").await;
    let mut c = gw.client().await;
    for channel in ["news.a", "chat", "*"] {
        assert_eq!(
            publish(&mut c, channel, "1", "p").await,
            refused(channel, "p", "not allowed")
        );
    }
    nothing_published(&redis, &mut raw_news, "news.a").await;
    publishes(&mut c, &mut raw, "chat.a", "2", "ok").await;
    drop(c);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tokens_the_publish_claim_must_allow_the_channel_too() {
    let redis = Redis::start().await;
    let gw = Gateway::start(Config {
        jwt_key: Some(JwtKey::secret(SECRET).unwrap()),
        ..config(Some(redis.url()), &["chat.*"])
    })
    .await;
    let exp = jsonwebtoken::get_current_timestamp() + 3600;
    let mut raw = RawSub::subscribe(&redis, "chat.a").await;
    let mut raw_b = RawSub::subscribe(&redis, "chat.b").await;
    let mut raw_news = RawSub::subscribe(&redis, "news.a").await;

    // No `publish` claim (a token that may subscribe everywhere): nothing,
    // although the server list allows the channel.
    let subscriber_only = token(json!({"sub":"u1","exp":exp,"subscribe":["*"]}));
    let mut c1 = connect_with(&gw, &subscriber_only).await;
    not_allowed(&mut c1, &redis, &mut raw, "chat.a").await;
    // A refresh brings the new token's claim, for publishes sent after it.
    let refreshed = token(json!({"sub":"u1","exp":exp,"publish":["chat.a"]}));
    assert_eq!(
        c1.request(json!({"action":"refresh","token":refreshed,"id":"r"}))
            .await,
        json!({"action":"refresh","id":"r","status":true})
    );
    publishes(&mut c1, &mut raw, "chat.a", "0", "after").await;

    // A narrow claim: its channel only.
    let narrow = token(json!({"sub":"u2","exp":exp,"publish":["chat.a"]}));
    let mut c2 = connect_with(&gw, &narrow).await;
    not_allowed(&mut c2, &redis, &mut raw_b, "chat.b").await;
    publishes(&mut c2, &mut raw, "chat.a", "2", "ok").await;

    // A wide claim does not widen the server list.
    let wide = token(json!({"sub":"u3","exp":exp,"publish":["*"]}));
    let mut c3 = connect_with(&gw, &wide).await;
    not_allowed(&mut c3, &redis, &mut raw_news, "news.a").await;
    assert_eq!(
        metric_value(gw.addr, &refused_series("publish_not_allowed")).await,
        Some(3.0)
    );

    // A token whose claim is not a list of strings is refused at the upgrade.
    let bad = token(json!({"sub":"u4","exp":exp,"publish":"chat.*"}));
    let bearer = format!("Bearer {bad}");
    let r = Client::try_connect(gw.addr, "/ws", &[("authorization", &bearer)])
        .await
        .err()
        .expect("a bad publish claim is refused");
    assert_eq!(
        (r.status, r.error()),
        (
            401,
            "invalid token: missing or invalid claim publish".into()
        )
    );
    drop((c1, c2, c3));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_publishes_get_an_error_and_the_connection_stays_open() {
    let (redis, gw, mut raw, mut c) = on_chat_a(|config| {
        config.max_pattern_bytes = NonZeroUsize::new(16).unwrap();
    })
    .await;
    for (frame, error) in [
        (
            r#"{"action":"publish","payload":1,"id":"m1"}"#,
            r#"missing field "channel""#,
        ),
        (
            r#"{"action":"publish","channel":"chat.a","id":"m2"}"#,
            r#"missing field "payload""#,
        ),
        (
            r#"{"action":"publish","channel":5,"payload":1,"id":"m3"}"#,
            r#""channel" must be a string"#,
        ),
    ] {
        c.send_text(frame).await;
        assert_eq!(
            c.recv().await,
            json!({"action":"error","id":frame_id(frame),"error":error}),
            "{frame}"
        );
    }
    // Names are checked as a subscribe's are.
    let long = "c".repeat(17);
    for (channel, error) in [
        ("", "invalid channel: empty".to_owned()),
        (
            "chat.\u{1}",
            "invalid channel: control characters are not allowed".to_owned(),
        ),
        (
            long.as_str(),
            "channel too long (17 bytes, max 16)".to_owned(),
        ),
    ] {
        assert_eq!(
            publish(&mut c, channel, "1", "n").await,
            refused(channel, "n", &error)
        );
    }
    nothing_published(&redis, &mut raw, "chat.a").await;
    // Still open and serving.
    assert_eq!(
        c.request(json!({"action":"ping","id":"alive"})).await,
        json!({"action":"pong","id":"alive"})
    );
    publishes(&mut c, &mut raw, "chat.a", "3", "ok").await;
    drop(c);
    gw.stop().await;
}

fn frame_id(frame: &str) -> Value {
    serde_json::from_str::<Value>(frame).unwrap()["id"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_share_the_subscribe_rate() {
    let (redis, gw, mut raw, mut c) = on_chat_a(|config| {
        config.subscribe_rate = NonZeroUsize::new(1).unwrap();
    })
    .await;
    // Both frames at once: the bucket holds one token.
    c.send_text(&publish_frame("chat.a", "1", "r1")).await;
    c.send_text(&publish_frame("chat.a", "2", "r2")).await;
    let mut replies = vec![c.recv().await, c.recv().await];
    replies.sort_by_key(|r| r["id"].to_string());
    assert_eq!(
        replies,
        [
            published("chat.a", "r1"),
            refused("chat.a", "r2", "rate limited")
        ]
    );
    assert_eq!(raw.next_text().await, "1");
    nothing_published(&redis, &mut raw, "chat.a").await;
    drop(c);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_redis_cannot_take_is_answered_broker_unavailable() {
    let mut redis = Redis::start().await;
    let gw = Gateway::start(config(Some(redis.url()), &["*"])).await;
    let mut c = gw.client().await;
    redis.kill();
    let mut reply = publish(&mut c, "chat.a", "1", "p").await;
    assert_eq!(reply["maybe_published"], json!(false), "{reply}");
    reply.as_object_mut().map(|o| o.remove("maybe_published"));
    assert_eq!(reply, refused("chat.a", "p", "broker unavailable"));
    drop(c);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_a_redis_acl_refuses_is_answered_as_a_subscribe_would_be() {
    let redis = Redis::start().await;
    // The gateway's Redis user may use channels `ok.*` only.
    let url = redis.restricted_url(&["ok.*"]).await;
    let gw = Gateway::start(config(Some(url), &["*"])).await;
    let mut raw = RawSub::subscribe(&redis, "secret").await;
    let mut c = gw.client().await;
    let mut reply = publish(&mut c, "secret", "1", "p").await;
    assert_eq!(reply["maybe_published"], json!(false), "{reply}");
    reply.as_object_mut().map(|o| o.remove("maybe_published"));
    assert_eq!(reply, refused("secret", "p", "not permitted by Redis"));
    nothing_published(&redis, &mut raw, "secret").await;
    assert_eq!(
        publish(&mut c, "ok.a", "1", "ok").await,
        published("ok.a", "ok")
    );
    drop(c);
    gw.stop().await;
}
