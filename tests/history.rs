//! History and recovery (`WSGATE_HISTORY`, `docs/history.md`), end to end
//! against a real redis-server and against the embedded broker: deliveries
//! of history channels carry `offset` and `epoch`; a client that comes back
//! with `since` gets exactly what it missed, in order, then the live
//! messages, with no duplicate and no gap even while publishes race the
//! recovery read; a stale epoch is `recovered:false`; `FCALL wsgate_publish`
//! from any Redis client is a wsgate publish; a plain `PUBLISH` is delivered
//! without offset; `GET /history` pages; the subscribe ACL guards both.
//!
//! Every frame is compared byte for byte; every wait is bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{json, Value};
use wsgate::auth::JwtKey;
use wsgate::history::Rules;
use wsgate::Config;

const SECRET: &str = "wsgate-history-test-secret-0123456789";
const KEY: &str = "history-test-publish-key";

fn config(redis: Option<&Redis>) -> Config {
    Config {
        history: Rules::parse("news.*:100:300s,race.*:5000:300s").unwrap(),
        ..test_config(redis.map(Redis::url))
    }
}

/// The exact delivery frame of payload `{"n":n}` at `offset` of `epoch`.
fn delivery(channel: &str, n: u64, offset: u64, epoch: &str) -> String {
    format!(
        r#"{{"action":"message","channel":"{channel}","payload":{{"n":{n}}},"offset":{offset},"epoch":"{epoch}"}}"#
    )
}

/// Publishes `{"n":from}`..`{"n":to}` through `POST /publish` in one batch.
async fn publish_range(gw: &Gateway, channel: &str, from: u64, to: u64) {
    let messages: Vec<Value> = (from..=to)
        .map(|n| json!({"channel":channel,"payload":{"n":n}}))
        .collect();
    let (status, body) = gw.publish(json!({ "messages": messages })).await;
    assert_eq!(status, 200, "{body}");
}

/// Subscribes `channel` and returns the epoch of the first delivery, which
/// the caller triggers with `{"n":0}` (offset 1 of a new history).
async fn first_epoch(gw: &Gateway, c: &mut Client, channel: &str) -> String {
    c.subscribe(channel).await;
    publish_range(gw, channel, 0, 0).await;
    let text = c.recv_text().await;
    let v: Value = serde_json::from_str(&text).unwrap();
    let epoch = v["epoch"].as_str().expect("an epoch").to_owned();
    assert!(
        !epoch.is_empty() && epoch.bytes().all(|b| b.is_ascii_alphanumeric()),
        "{epoch}"
    );
    assert_eq!(text, delivery(channel, 0, 1, &epoch));
    epoch
}

async fn subscribe_since(c: &mut Client, channel: &str, offset: u64, epoch: &str) -> String {
    c.send_json(
        json!({"action":"subscribe","channel":channel,"since":{"offset":offset,"epoch":epoch}}),
    )
    .await;
    c.recv_text().await
}

fn recovered(channel: &str, ok: bool) -> String {
    format!(r#"{{"action":"subscribe","channel":"{channel}","status":true,"recovered":{ok}}}"#)
}

/// A client misses 50 messages, comes back with `since` and gets exactly
/// those, in order, then a live one.
async fn missed_fifty_are_recovered(redis: Option<&Redis>) {
    let gw = Gateway::start(config(redis)).await;
    let mut a = gw.client().await;
    let epoch = first_epoch(&gw, &mut a, "news.sport").await;
    drop(a);
    publish_range(&gw, "news.sport", 1, 50).await;
    let mut b = gw.client().await;
    assert_eq!(
        subscribe_since(&mut b, "news.sport", 1, &epoch).await,
        recovered("news.sport", true)
    );
    for n in 1..=50 {
        assert_eq!(
            b.recv_text().await,
            delivery("news.sport", n, n + 1, &epoch)
        );
    }
    publish_range(&gw, "news.sport", 51, 51).await;
    assert_eq!(b.recv_text().await, delivery("news.sport", 51, 52, &epoch));
    // Up to date: nothing to recover, and nothing delivered twice.
    let mut c = gw.client().await;
    assert_eq!(
        subscribe_since(&mut c, "news.sport", 52, &epoch).await,
        recovered("news.sport", true)
    );
    publish_range(&gw, "news.sport", 52, 52).await;
    assert_eq!(c.recv_text().await, delivery("news.sport", 52, 53, &epoch));
    gw.stop().await;
}

#[tokio::test]
async fn redis_missed_fifty_are_recovered() {
    let redis = Redis::start().await;
    missed_fifty_are_recovered(Some(&redis)).await;
}

#[tokio::test]
async fn memory_missed_fifty_are_recovered() {
    missed_fifty_are_recovered(None).await;
}

/// Publishes race the recovery read: whatever arrives live while the read
/// is in flight is held and merged by offset, so the client sees 2..=N
/// exactly once each, in order.
async fn recovery_racing_publishes(redis: Option<&Redis>) {
    let gw = Gateway::start(config(redis)).await;
    let mut a = gw.client().await;
    let epoch = first_epoch(&gw, &mut a, "race.a").await;
    drop(a);
    publish_range(&gw, "race.a", 1, 100).await;
    const LAST: u64 = 1100;
    let addr = gw.addr;
    let publisher = tokio::spawn(async move {
        for from in (101..=LAST).step_by(10) {
            let messages: Vec<Value> = (from..from + 10)
                .map(|n| json!({"channel":"race.a","payload":{"n":n}}))
                .collect();
            let body = json!({ "messages": messages }).to_string();
            let (status, text) = http(addr, "POST", "/publish", Some(&body)).await;
            assert_eq!(status, 200, "{text}");
        }
    });
    let mut clients = Vec::new();
    for _ in 0..8 {
        let mut c = gw.client().await;
        c.send_json(
            json!({"action":"subscribe","channel":"race.a","since":{"offset":1,"epoch":epoch}}),
        )
        .await;
        clients.push(c);
    }
    for c in &mut clients {
        assert_eq!(c.recv_text().await, recovered("race.a", true));
        for n in 1..=LAST {
            assert_eq!(c.recv_text().await, delivery("race.a", n, n + 1, &epoch));
        }
    }
    publisher.await.unwrap();
    gw.stop().await;
}

#[tokio::test]
async fn redis_recovery_racing_publishes_has_no_gap_and_no_duplicate() {
    let redis = Redis::start().await;
    recovery_racing_publishes(Some(&redis)).await;
}

#[tokio::test]
async fn memory_recovery_racing_publishes_has_no_gap_and_no_duplicate() {
    recovery_racing_publishes(None).await;
}

/// A stale epoch, or an offset beyond what the history holds (it lost
/// writes), is `recovered:false`; the latter changes the epoch for everyone.
async fn stale_positions_are_not_recovered(redis: Option<&Redis>) {
    let gw = Gateway::start(config(redis)).await;
    let mut a = gw.client().await;
    let epoch = first_epoch(&gw, &mut a, "news.stale").await;
    let mut b = gw.client().await;
    assert_eq!(
        subscribe_since(&mut b, "news.stale", 0, "bogus1").await,
        recovered("news.stale", false)
    );
    publish_range(&gw, "news.stale", 1, 1).await;
    assert_eq!(a.recv_text().await, delivery("news.stale", 1, 2, &epoch));
    assert_eq!(b.recv_text().await, delivery("news.stale", 1, 2, &epoch));
    let mut c = gw.client().await;
    assert_eq!(
        subscribe_since(&mut c, "news.stale", 99, &epoch).await,
        recovered("news.stale", false)
    );
    publish_range(&gw, "news.stale", 2, 2).await;
    let text = c.recv_text().await;
    let v: Value = serde_json::from_str(&text).unwrap();
    let new_epoch = v["epoch"].as_str().unwrap().to_owned();
    assert_ne!(new_epoch, epoch, "the epoch changes when writes were lost");
    assert_eq!(text, delivery("news.stale", 2, 3, &new_epoch));
    // Channels without history: `since` is answered recovered:false.
    let mut d = gw.client().await;
    assert_eq!(
        subscribe_since(&mut d, "plain", 1, &epoch).await,
        recovered("plain", false)
    );
    gw.stop().await;
}

#[tokio::test]
async fn redis_stale_positions_are_not_recovered() {
    let redis = Redis::start().await;
    stale_positions_are_not_recovered(Some(&redis)).await;
}

#[tokio::test]
async fn memory_stale_positions_are_not_recovered() {
    stale_positions_are_not_recovered(None).await;
}

/// `FCALL wsgate_publish 1 <channel> <payload>` from a plain Redis client
/// does what `POST /publish` does; a plain `PUBLISH` is delivered without
/// offset; an envelope on a channel without history is not opened.
#[tokio::test]
async fn fcall_publishes_like_http_and_plain_publish_has_no_offset() {
    let redis = Redis::start().await;
    let gw = Gateway::start(config(Some(&redis))).await;
    let mut c = gw.client().await;
    let epoch = first_epoch(&gw, &mut c, "news.sport").await;
    let mut raw = RawSub::subscribe(&redis, "news.sport").await;
    let n = redis
        .int(&["FCALL", "wsgate_publish", "1", "news.sport", r#"{"x":1}"#])
        .await;
    assert_eq!(n, 2, "wsgate's node and the raw subscriber");
    assert_eq!(
        c.recv_text().await,
        format!(
            r#"{{"action":"message","channel":"news.sport","payload":{{"x":1}},"offset":2,"epoch":"{epoch}"}}"#
        )
    );
    assert_eq!(
        raw.next().await,
        [
            b"\xffwsgate-h1:2:".as_slice(),
            epoch.as_bytes(),
            b":{\"x\":1}"
        ]
        .concat()
    );
    // A channel no rule names: FCALL is a plain PUBLISH.
    assert_eq!(
        redis
            .int(&["FCALL", "wsgate_publish", "1", "plain", "p"])
            .await,
        0
    );
    redis.publish("news.sport", br#"{"y":2}"#).await;
    assert_eq!(
        c.recv_text().await,
        r#"{"action":"message","channel":"news.sport","payload":{"y":2}}"#
    );
    raw.next().await;
    // The history holds what went through the function, not the plain publish.
    let (status, body) = http(gw.addr, "GET", "/history?channel=news.sport", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        format!(
            r#"{{"channel":"news.sport","epoch":"{epoch}","top":2,"messages":[{{"offset":1,"payload":{{"n":0}}}},{{"offset":2,"payload":{{"x":1}}}}]}}"#
        )
    );
    // An envelope published to a channel without history reaches its
    // subscribers as the bytes it is.
    c.subscribe("plain").await;
    let forged = b"\xffwsgate-h1:7:e1:{}";
    redis.publish("plain", forged).await;
    let v = c.recv().await;
    assert_eq!(v["channel"], "plain");
    assert!(v.get("offset").is_none(), "{v}");
    gw.stop().await;
}

/// `GET /history` pages: the newest `limit`, the page after `since`, 409 on
/// a stale epoch, 404 for a channel without history, 400 on bad parameters.
async fn history_pages(redis: Option<&Redis>) {
    let gw = Gateway::start(config(redis)).await;
    let mut c = gw.client().await;
    let epoch = first_epoch(&gw, &mut c, "news.pages").await;
    publish_range(&gw, "news.pages", 1, 4).await;
    let page = |offsets: &[u64]| {
        let messages: Vec<String> = offsets
            .iter()
            .map(|o| format!(r#"{{"offset":{o},"payload":{{"n":{}}}}}"#, o - 1))
            .collect();
        format!(
            r#"{{"channel":"news.pages","epoch":"{epoch}","top":5,"messages":[{}]}}"#,
            messages.join(",")
        )
    };
    let get = |q: String| {
        let addr = gw.addr;
        async move { http(addr, "GET", &format!("/history?{q}"), None).await }
    };
    assert_eq!(
        get("channel=news.pages&limit=2".into()).await,
        (200, page(&[4, 5]))
    );
    assert_eq!(
        get("channel=news.pages".into()).await,
        (200, page(&[1, 2, 3, 4, 5]))
    );
    assert_eq!(
        get(format!("channel=news.pages&since=1&epoch={epoch}&limit=2")).await,
        (200, page(&[2, 3]))
    );
    assert_eq!(
        get(format!("channel=news.pages&since=3&epoch={epoch}")).await,
        (200, page(&[4, 5]))
    );
    assert_eq!(
        get(format!("channel=news.pages&since=5&epoch={epoch}")).await,
        (200, page(&[]))
    );
    assert_eq!(
        get("channel=news.pages&since=1&epoch=other".into()).await,
        (
            409,
            format!(r#"{{"error":"epoch changed","epoch":"{epoch}"}}"#)
        )
    );
    assert_eq!(
        get("channel=plain".into()).await,
        (
            404,
            r#"{"error":"this channel keeps no history"}"#.to_owned()
        )
    );
    assert_eq!(get("channel=news.pages&limit=0".into()).await.0, 400);
    assert_eq!(get("since=1&epoch=x".into()).await.0, 400);
    gw.stop().await;
}

#[tokio::test]
async fn redis_history_pages() {
    let redis = Redis::start().await;
    history_pages(Some(&redis)).await;
}

#[tokio::test]
async fn memory_history_pages() {
    history_pages(None).await;
}

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

/// The subscribe ACL guards `GET /history` and `since`: a token that may
/// not subscribe to the channel reads nothing either way; the API key
/// reads any history channel.
#[tokio::test]
async fn history_needs_subscribe_rights() {
    let redis = Redis::start().await;
    let mut cfg = config(Some(&redis));
    cfg.jwt_key = Some(JwtKey::secret(SECRET).unwrap());
    cfg.api_key = Config::from_vars([("WSGATE_API_KEY".to_owned(), KEY.to_owned())])
        .unwrap()
        .api_key;
    let gw = Gateway::start(cfg).await;
    let key = format!("Bearer {KEY}");
    let (status, body) = http_with(
        gw.addr,
        "POST",
        "/publish",
        &[("authorization", &key)],
        Some(r#"{"channel":"news.acl","payload":{"n":0}}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let get = |auth: String| {
        let addr = gw.addr;
        async move {
            let headers = [("authorization", auth.as_str())];
            http_with(addr, "GET", "/history?channel=news.acl", &headers, None).await
        }
    };
    let (status, body) = get(key.clone()).await;
    assert_eq!(status, 200, "{body}");
    let epoch = serde_json::from_str::<Value>(&body).unwrap()["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        get(format!("Bearer {}", token(&["chat.*"]))).await,
        (403, r#"{"error":"not allowed"}"#.to_owned())
    );
    assert_eq!(get(format!("Bearer {}", token(&["news.*"]))).await.0, 200);
    assert_eq!(get("Bearer wrong".to_owned()).await.0, 401);
    assert_eq!(
        http(gw.addr, "GET", "/history?channel=news.acl", None)
            .await
            .0,
        401
    );
    // The same token on a socket: `since` is refused like any subscribe.
    let bearer = format!("Bearer {}", token(&["chat.*"]));
    let mut c = Client::try_connect(gw.addr, "/ws", &[("authorization", &bearer)])
        .await
        .unwrap();
    assert_eq!(
        subscribe_since(&mut c, "news.acl", 0, &epoch).await,
        r#"{"action":"subscribe","channel":"news.acl","status":false,"error":"not allowed"}"#
    );
    c.expect_silence(std::time::Duration::from_millis(200))
        .await;
    gw.stop().await;
}

/// `since` must be well formed, and is for channels only (for now).
#[tokio::test]
async fn malformed_since_is_rejected() {
    let gw = Gateway::start(config(None)).await;
    let mut c = gw.client().await;
    for bad in [
        json!({"action":"subscribe","channel":"news.a","since":5}),
        json!({"action":"subscribe","channel":"news.a","since":{"offset":-1,"epoch":"e"}}),
        json!({"action":"subscribe","channel":"news.a","since":{"offset":1}}),
        json!({"action":"subscribe","pattern":"news.*","since":{"offset":1,"epoch":"e"}}),
    ] {
        let v = c.request(bad.clone()).await;
        assert_eq!(v["action"], "error", "{bad} -> {v}");
    }
    gw.stop().await;
}

/// A Redis restarted without persistence forgets the library and the
/// history: the publish connection loads the library again when it
/// reconnects, the next message starts a new epoch at offset 1, and a
/// client resuming from the old epoch is told `recovered:false`.
#[tokio::test]
async fn a_redis_restart_reloads_the_library_and_resets_the_epoch() {
    let mut redis = Redis::start().await;
    let gw = Gateway::start(config(Some(&redis))).await;
    let mut c = gw.client().await;
    let old = first_epoch(&gw, &mut c, "news.sport").await;
    redis.restart().await;
    c.expect_interrupted(&[], &["news.sport"]).await;
    // Healed (docs/history.md, "Gap healing"): the history did not survive
    // the restart, so its own `resumed` says it was not recovered.
    assert_eq!(
        c.recv_text().await,
        r#"{"action":"resumed","patterns":[],"channels":["news.sport"],"recovered":false}"#
    );
    let addr = gw.addr;
    let body = json!({"channel":"news.sport","payload":{"n":1}}).to_string();
    wait_until("a publish after the restart", WAIT, || {
        let body = body.clone();
        async move { http(addr, "POST", "/publish", Some(&body)).await.0 == 200 }
    })
    .await;
    let text = c.recv_text().await;
    let v: Value = serde_json::from_str(&text).unwrap();
    let new = v["epoch"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    assert_eq!(text, delivery("news.sport", 1, 1, &new));
    assert_eq!(
        redis
            .int(&["FCALL", "wsgate_publish", "1", "news.sport", r#"{"n":2}"#])
            .await,
        1
    );
    assert_eq!(c.recv_text().await, delivery("news.sport", 2, 2, &new));
    let mut d = gw.client().await;
    assert_eq!(
        subscribe_since(&mut d, "news.sport", 1, &old).await,
        recovered("news.sport", false)
    );
    gw.stop().await;
}

/// Two nodes on one Redis: a message published through one carries its
/// offset to the other's clients, and a client of the second recovers what
/// was published through the first.
#[tokio::test]
async fn offsets_cross_nodes() {
    let redis = Redis::start().await;
    let one = Gateway::start(config(Some(&redis))).await;
    let two = Gateway::start(config(Some(&redis))).await;
    let mut c = two.client().await;
    c.subscribe("news.sport").await;
    publish_range(&one, "news.sport", 0, 0).await;
    let text = c.recv_text().await;
    let v: Value = serde_json::from_str(&text).unwrap();
    let epoch = v["epoch"].as_str().unwrap().to_owned();
    assert_eq!(text, delivery("news.sport", 0, 1, &epoch));
    drop(c);
    publish_range(&one, "news.sport", 1, 10).await;
    let mut d = two.client().await;
    assert_eq!(
        subscribe_since(&mut d, "news.sport", 1, &epoch).await,
        recovered("news.sport", true)
    );
    for n in 1..=10 {
        assert_eq!(
            d.recv_text().await,
            delivery("news.sport", n, n + 1, &epoch)
        );
    }
    one.stop().await;
    two.stop().await;
}

/// The exact pattern delivery frame of payload `{"n":n}`.
fn pattern_delivery(pattern: &str, channel: &str, n: u64, offset: u64, epoch: &str) -> String {
    format!(
        r#"{{"action":"message","pattern":"{pattern}","channel":"{channel}","payload":{{"n":{n}}},"offset":{offset},"epoch":"{epoch}"}}"#
    )
}

/// A pattern subscribe's `since` maps channels to positions: each is
/// recovered (channel by channel, each in order), then live messages of
/// every channel the pattern matches follow.
async fn pattern_since_recovers_each_channel(redis: Option<&Redis>) {
    let gw = Gateway::start(config(redis)).await;
    let mut a = gw.client().await;
    let ea = first_epoch(&gw, &mut a, "news.a").await;
    let mut b = gw.client().await;
    let eb = first_epoch(&gw, &mut b, "news.b").await;
    drop((a, b));
    publish_range(&gw, "news.a", 1, 5).await;
    publish_range(&gw, "news.b", 1, 3).await;
    let mut c = gw.client().await;
    c.send_json(json!({"action":"subscribe","pattern":"news.*","since":{
        "news.a":{"offset":1,"epoch":ea},
        "news.b":{"offset":2,"epoch":eb},
    }}))
    .await;
    assert_eq!(
        c.recv_text().await,
        r#"{"action":"subscribe","pattern":"news.*","status":true,"recovered":true}"#
    );
    let mut got = Vec::new();
    for _ in 0..(5 + 2) {
        got.push(c.recv_text().await);
    }
    let mut want: Vec<String> = (1..=5)
        .map(|n| pattern_delivery("news.*", "news.a", n, n + 1, &ea))
        .collect();
    want.extend((2..=3).map(|n| pattern_delivery("news.*", "news.b", n, n + 1, &eb)));
    assert_eq!(got, want);
    publish_range(&gw, "news.b", 4, 4).await;
    assert_eq!(
        c.recv_text().await,
        pattern_delivery("news.*", "news.b", 4, 5, &eb)
    );
    // One channel of the map without history: recovered:false.
    let mut d = gw.client().await;
    d.send_json(json!({"action":"subscribe","pattern":"*","since":{
        "news.a":{"offset":6,"epoch":ea},
        "plain":{"offset":1,"epoch":"x"},
    }}))
    .await;
    assert_eq!(
        d.recv_text().await,
        r#"{"action":"subscribe","pattern":"*","status":true,"recovered":false}"#
    );
    // A channel the pattern does not match is refused.
    let v = d
        .request(json!({"action":"subscribe","pattern":"chat.*","since":{"news.a":{"offset":1,"epoch":ea}}}))
        .await;
    assert_eq!(v["action"], "error", "{v}");
    gw.stop().await;
}

#[tokio::test]
async fn redis_pattern_since_recovers_each_channel() {
    let redis = Redis::start().await;
    pattern_since_recovers_each_channel(Some(&redis)).await;
}

#[tokio::test]
async fn memory_pattern_since_recovers_each_channel() {
    pattern_since_recovers_each_channel(None).await;
}

/// An idempotent publish to a history channel is stored and published once.
async fn idempotent_history_publish(redis: Option<&Redis>) {
    let gw = Gateway::start(config(redis)).await;
    let mut c = gw.client().await;
    let epoch = first_epoch(&gw, &mut c, "news.once").await;
    let body = json!({"channel":"news.once","payload":{"n":1},"idempotency_key":"k1"});
    assert_eq!(
        gw.publish(body.clone()).await,
        (200, json!({"receivers":1}))
    );
    assert_eq!(gw.publish(body).await, (200, json!({"receivers":1})));
    assert_eq!(c.recv_text().await, delivery("news.once", 1, 2, &epoch));
    publish_range(&gw, "news.once", 2, 2).await;
    assert_eq!(c.recv_text().await, delivery("news.once", 2, 3, &epoch));
    gw.stop().await;
}

#[tokio::test]
async fn redis_idempotent_history_publish() {
    let redis = Redis::start().await;
    idempotent_history_publish(Some(&redis)).await;
}

#[tokio::test]
async fn memory_idempotent_history_publish() {
    idempotent_history_publish(None).await;
}

fn rate_config(redis: &Redis, rate: usize) -> Config {
    Config {
        history_read_rate: std::num::NonZeroUsize::new(rate).unwrap(),
        ..config(Some(redis))
    }
}

/// A connection's recoveries read at most `WSGATE_HISTORY_READ_RATE`
/// messages per second: within it, a recovery is complete; a client that
/// keeps asking for more than that gets `recovered:false` for what its
/// budget cannot cover, then `history read rate exceeded`, and nothing
/// delivered for either. Another connection has its own budget.
#[tokio::test]
async fn recoveries_are_bounded_by_the_read_rate() {
    let redis = Redis::start().await;
    let gw = Gateway::start(rate_config(&redis, 50)).await;
    let mut a = gw.client().await;
    let epoch = first_epoch(&gw, &mut a, "news.rate").await;
    drop(a);
    // Within the budget: 30 missed, 30 recovered.
    publish_range(&gw, "news.rate", 1, 30).await;
    let mut b = gw.client().await;
    assert_eq!(
        subscribe_since(&mut b, "news.rate", 1, &epoch).await,
        recovered("news.rate", true)
    );
    for n in 1..=30 {
        assert_eq!(b.recv_text().await, delivery("news.rate", n, n + 1, &epoch));
    }
    drop(b);
    // 200 behind: more than one budget. Each try reads what is left of it
    // (not enough: `recovered:false`, nothing delivered), until nothing is
    // left and the subscribe is refused. The budget refills 50/s, so a try
    // that comes within 20 ms of the one before finds less than a message.
    publish_range(&gw, "news.rate", 31, 230).await;
    let mut c = gw.client().await;
    let refused = r#"{"action":"subscribe","channel":"news.rate","status":false,"error":"history read rate exceeded"}"#;
    let mut answers = Vec::new();
    for _ in 0..20 {
        let answer = subscribe_since(&mut c, "news.rate", 1, &epoch).await;
        if answer == refused {
            answers.push(answer);
            break;
        }
        assert_eq!(answer, recovered("news.rate", false));
        answers.push(answer);
        let v = c
            .request(json!({"action":"unsubscribe","channel":"news.rate","id":"u"}))
            .await;
        assert_eq!(v["status"], true, "{v}");
    }
    assert_eq!(
        answers.last().map(String::as_str),
        Some(refused),
        "{answers:?}"
    );
    c.expect_silence(std::time::Duration::from_millis(100))
        .await;
    // A connection of its own is not bound by c's spending.
    let mut d = gw.client().await;
    assert_eq!(
        subscribe_since(&mut d, "news.rate", 201, &epoch).await,
        recovered("news.rate", true)
    );
    for n in 201..=230 {
        assert_eq!(d.recv_text().await, delivery("news.rate", n, n + 1, &epoch));
    }
    assert_eq!(
        metric_value(gw.addr, r#"wsgate_refused_total{reason="history_rate"}"#).await,
        Some(1.0)
    );
    gw.stop().await;
}

/// `GET /history` reads at most `WSGATE_HISTORY_READ_RATE` messages per
/// second per reader: a page larger than that is cut to it; a reader whose
/// budget is spent gets `429` with `Retry-After`, and reads again once that
/// has passed; other readers (another token `sub`, the API key) are not
/// affected; pages within the budget are served.
#[tokio::test]
async fn history_reads_are_bounded_per_reader() {
    let redis = Redis::start().await;
    let mut cfg = rate_config(&redis, 50);
    cfg.jwt_key = Some(JwtKey::secret(SECRET).unwrap());
    cfg.api_key = Config::from_vars([("WSGATE_API_KEY".to_owned(), KEY.to_owned())])
        .unwrap()
        .api_key;
    let gw = Gateway::start(cfg).await;
    let key = format!("Bearer {KEY}");
    let messages: Vec<Value> = (1..=100)
        .map(|n| json!({"channel":"news.page","payload":{"n":n}}))
        .collect();
    let body = json!({ "messages": messages }).to_string();
    let (status, text) = http_with(
        gw.addr,
        "POST",
        "/publish",
        &[("authorization", &key)],
        Some(&body),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let get = |auth: String, query: &'static str| {
        let addr = gw.addr;
        async move {
            let headers = [("authorization", auth.as_str())];
            http_head(addr, "GET", &format!("/history?{query}"), &headers, None).await
        }
    };
    let count = |body: &str| -> usize {
        let v: Value = serde_json::from_str(body).unwrap();
        v["messages"].as_array().unwrap().len()
    };
    let reader = format!("Bearer {}", token(&["news.*"]));
    // A page of 100 is cut to the bucket's 50, and spends it all.
    let (status, _, body) = get(reader.clone(), "channel=news.page&limit=100").await;
    assert_eq!((status, count(&body)), (200, 50), "{body}");
    let (status, head, body) = get(reader.clone(), "channel=news.page&limit=10").await;
    assert_eq!(
        (status, body.as_str()),
        (429, r#"{"error":"history read rate exceeded"}"#)
    );
    assert_eq!(
        header_of(&head, "retry-after").as_deref(),
        Some("1"),
        "{head}"
    );
    // Other readers have their own budgets: pages within them are served.
    let other = {
        let claims = json!({
            "sub": "other",
            "exp": jsonwebtoken::get_current_timestamp() + 3600,
            "subscribe": ["news.*"],
        });
        let t = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        format!("Bearer {t}")
    };
    for _ in 0..4 {
        let (status, _, body) = get(other.clone(), "channel=news.page&limit=10").await;
        assert_eq!((status, count(&body)), (200, 10), "{body}");
    }
    // A read spends only what it returned: these take the key's whole
    // budget each, return nothing, and give it all back.
    for _ in 0..5 {
        let (status, _, body) = get(key.clone(), "channel=news.page&since=95&epoch=x").await;
        assert_eq!(status, 409, "{body}");
    }
    let (status, _, body) = get(key.clone(), "channel=news.page&limit=50").await;
    assert_eq!((status, count(&body)), (200, 50), "{body}");
    // The ACL still comes first: a spent budget does not turn 403 into 429.
    let outsider = format!("Bearer {}", token(&["chat.*"]));
    assert_eq!(get(outsider, "channel=news.page").await.0, 403);
    // After Retry-After, the first reader reads again.
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    let (status, _, body) = get(reader, "channel=news.page&limit=10").await;
    assert_eq!((status, count(&body)), (200, 10), "{body}");
    assert!(
        metric_value(gw.addr, r#"wsgate_refused_total{reason="history_rate"}"#)
            .await
            .is_some_and(|n| n >= 1.0)
    );
    gw.stop().await;
}
