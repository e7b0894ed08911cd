//! Presence (`WSGATE_PRESENCE`, `docs/presence.md`), end to end against a
//! real redis-server (two nodes on one Redis, one of them a process that is
//! `kill -9`ed) and against the embedded broker: members with their `sub`
//! and `info` claim, `presence` and `presence_stats`, join and leave events
//! exactly once each to subscribers that asked, `GET /presence`, the
//! subscribe ACL, and a dead node's members gone within its lease.
//!
//! Frames are compared byte for byte; every wait is bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use wsgate::auth::JwtKey;
use wsgate::presence::Rules;
use wsgate::Config;

const SECRET: &str = "wsgate-presence-test-secret-0123456789";
const KEY: &str = "presence-test-publish-key";
const LEASE_MS: u64 = 1000;

fn config(redis: Option<&Redis>, node: &str) -> Config {
    let mut cfg = Config {
        presence: Rules::parse("chat.*").unwrap(),
        presence_lease: Duration::from_millis(LEASE_MS),
        node_id: node.to_owned(),
        ..test_config(redis.map(Redis::url))
    };
    cfg.jwt_key = Some(JwtKey::secret(SECRET).unwrap());
    cfg.api_key = Config::from_vars([("WSGATE_API_KEY".to_owned(), KEY.to_owned())])
        .unwrap()
        .api_key;
    cfg
}

fn token(sub: &str, info: Option<Value>, acl: &[&str]) -> String {
    let mut claims = json!({
        "sub": sub,
        "exp": jsonwebtoken::get_current_timestamp() + 3600,
        "subscribe": acl,
    });
    if let Some(info) = info {
        claims["info"] = info;
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn client(addr: std::net::SocketAddr, token: &str) -> Client {
    let bearer = format!("Bearer {token}");
    Client::try_connect(addr, "/ws", &[("authorization", &bearer)])
        .await
        .unwrap()
}

/// Subscribes `channel` with join/leave events and asserts the reply.
async fn subscribe_events(c: &mut Client, channel: &str) {
    c.send_json(json!({"action":"subscribe","channel":channel,"join_leave":true}))
        .await;
    assert_eq!(
        c.recv_text().await,
        format!(r#"{{"action":"subscribe","channel":"{channel}","status":true}}"#)
    );
}

/// The next frame is a `join`/`leave` of `channel` for a member of `user`
/// with `info`; returns its client id (which names the node).
async fn expect_event(
    c: &mut Client,
    action: &str,
    channel: &str,
    user: &str,
    info: &str,
    node: &str,
) -> String {
    let text = c.recv_text().await;
    let v: Value = serde_json::from_str(&text).unwrap();
    let client = v["member"]["client"].as_str().expect(&text).to_owned();
    assert!(client.starts_with(&format!("{node}:")), "{text}");
    assert_eq!(
        text,
        format!(
            r#"{{"action":"{action}","channel":"{channel}","member":{{"client":"{client}","user":"{user}","info":{info}}}}}"#
        )
    );
    client
}

fn member(client: &str, user: &str, info: &str) -> String {
    format!(r#"{{"client":"{client}","user":"{user}","info":{info}}}"#)
}

/// Two clients (on node `a` and node `b`, which may be the same gateway):
/// the observer sees its own join, then the other's, exactly once each;
/// `presence` and `presence_stats` on either node agree; `GET /presence`
/// too; the other's unsubscribe is one leave.
async fn two_members(a: &Gateway, na: &str, b: &Gateway, nb: &str) {
    let chat = ["chat.*"];
    let mut obs = client(a.addr, &token("alice", None, &chat)).await;
    subscribe_events(&mut obs, "chat.room").await;
    let me = expect_event(&mut obs, "join", "chat.room", "alice", "null", na).await;
    let info = r#"{"avatar":"b.png"}"#;
    let mut bob = client(
        b.addr,
        &token("bob", Some(serde_json::from_str(info).unwrap()), &chat),
    )
    .await;
    bob.subscribe("chat.room").await;
    let him = expect_event(&mut obs, "join", "chat.room", "bob", info, nb).await;
    let mut sorted = [member(&me, "alice", "null"), member(&him, "bob", info)];
    sorted.sort();
    let members = format!("[{}]", sorted.join(","));
    for c in [&mut obs, &mut bob] {
        c.send_json(json!({"action":"presence","channel":"chat.room","id":"p1"}))
            .await;
        assert_eq!(
            c.recv_text().await,
            format!(
                r#"{{"action":"presence","channel":"chat.room","id":"p1","status":true,"members":{members}}}"#
            )
        );
        c.send_json(json!({"action":"presence_stats","channel":"chat.room","id":"p2"}))
            .await;
        assert_eq!(
            c.recv_text().await,
            r#"{"action":"presence_stats","channel":"chat.room","id":"p2","status":true,"clients":2,"users":2}"#
        );
    }
    let key = format!("Bearer {KEY}");
    let (status, body) = http_with(
        b.addr,
        "GET",
        "/presence?channel=chat.room",
        &[("authorization", &key)],
        None,
    )
    .await;
    assert_eq!(
        (status, body),
        (
            200,
            format!(r#"{{"channel":"chat.room","clients":2,"users":2,"members":{members}}}"#)
        )
    );
    bob.send_json(json!({"action":"unsubscribe","channel":"chat.room"}))
        .await;
    assert_eq!(
        bob.recv_text().await,
        r#"{"action":"unsubscribe","channel":"chat.room","status":true}"#
    );
    assert_eq!(
        expect_event(&mut obs, "leave", "chat.room", "bob", info, nb).await,
        him
    );
    // A disconnect is a leave too: a second client of bob joins and goes.
    let mut again = client(b.addr, &token("bob", None, &chat)).await;
    again.subscribe("chat.room").await;
    let second = expect_event(&mut obs, "join", "chat.room", "bob", "null", nb).await;
    drop(again);
    assert_eq!(
        expect_event(&mut obs, "leave", "chat.room", "bob", "null", nb).await,
        second
    );
    obs.send_json(json!({"action":"presence","channel":"chat.room"}))
        .await;
    assert_eq!(
        obs.recv_text().await,
        format!(
            r#"{{"action":"presence","channel":"chat.room","status":true,"members":[{}]}}"#,
            member(&me, "alice", "null")
        )
    );
    // Once each: nothing more, though leases were renewed meanwhile.
    obs.expect_silence(Duration::from_millis(LEASE_MS / 2))
        .await;
}

#[tokio::test]
async fn redis_presence_across_two_nodes() {
    let redis = Redis::start().await;
    let a = Gateway::start(config(Some(&redis), "node-a")).await;
    let b = Gateway::start(config(Some(&redis), "node-b")).await;
    two_members(&a, "node-a", &b, "node-b").await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn memory_presence_on_one_node() {
    let gw = Gateway::start(config(None, "solo")).await;
    two_members(&gw, "solo", &gw, "solo").await;
    gw.stop().await;
}

/// The same ACL as subscribe: a token that may not subscribe to the
/// channel gets nothing; a channel without presence is refused for
/// `presence` and for `join_leave`; `GET /presence` likewise.
async fn presence_refusals(redis: Option<&Redis>) {
    let gw = Gateway::start(config(redis, "acl")).await;
    let mut c = client(gw.addr, &token("eve", None, &["news.*"])).await;
    c.send_json(json!({"action":"presence","channel":"chat.room","id":"p1"}))
        .await;
    assert_eq!(
        c.recv_text().await,
        r#"{"action":"presence","channel":"chat.room","id":"p1","status":false,"error":"not allowed"}"#
    );
    c.send_json(json!({"action":"presence_stats","channel":"news.x"}))
        .await;
    assert_eq!(
        c.recv_text().await,
        r#"{"action":"presence_stats","channel":"news.x","status":false,"error":"channel has no presence"}"#
    );
    c.send_json(json!({"action":"subscribe","channel":"news.x","join_leave":true}))
        .await;
    assert_eq!(
        c.recv_text().await,
        r#"{"action":"subscribe","channel":"news.x","status":false,"error":"channel has no presence"}"#
    );
    c.send_json(json!({"action":"subscribe","pattern":"chat.*","join_leave":true}))
        .await;
    assert_eq!(
        c.recv_text().await,
        r#"{"action":"error","error":"\"join_leave\" is for channels, not patterns"}"#
    );
    let get = |auth: String, path: &'static str| {
        let addr = gw.addr;
        async move { http_with(addr, "GET", path, &[("authorization", auth.as_str())], None).await }
    };
    assert_eq!(
        get(
            format!("Bearer {}", token("eve", None, &["news.*"])),
            "/presence?channel=chat.room"
        )
        .await,
        (403, r#"{"error":"not allowed"}"#.to_owned())
    );
    assert_eq!(
        get(format!("Bearer {KEY}"), "/presence?channel=news.x").await,
        (
            404,
            r#"{"error":"this channel keeps no presence"}"#.to_owned()
        )
    );
    assert_eq!(
        get(format!("Bearer {KEY}"), "/presence?channel=chat.empty").await,
        (
            200,
            r#"{"channel":"chat.empty","clients":0,"users":0,"members":[]}"#.to_owned()
        )
    );
    c.expect_silence(Duration::from_millis(200)).await;
    gw.stop().await;
}

#[tokio::test]
async fn redis_presence_refusals() {
    let redis = Redis::start().await;
    presence_refusals(Some(&redis)).await;
}

#[tokio::test]
async fn memory_presence_refusals() {
    presence_refusals(None).await;
}

/// `presence_stats` of chat.room: its client count. Events that arrive
/// before the answer (the reaper's leaves may overtake it) go to `events`.
async fn stats(obs: &mut Client, events: &mut Vec<Value>) -> u64 {
    obs.send_json(json!({"action":"presence_stats","channel":"chat.room"}))
        .await;
    loop {
        let v = obs.recv().await;
        if v["action"] == "presence_stats" {
            return v["clients"].as_u64().unwrap_or_else(|| panic!("{v}"));
        }
        events.push(v);
    }
}

/// A node `kill -9`ed takes its members with it within one lease: the
/// other node's answers drop them when the lease ends, and its observer
/// gets one leave per member soon after (the next renewal reaps).
#[tokio::test]
async fn killed_node_is_reaped_within_the_lease() {
    let redis = Redis::start().await;
    let a = Gateway::start(config(Some(&redis), "node-a")).await;
    let mut b = GatewayProcess::spawn(&[
        ("WSGATE_REDIS_URL", redis.url()),
        ("WSGATE_PRESENCE", "chat.*".to_owned()),
        ("WSGATE_PRESENCE_LEASE_MS", LEASE_MS.to_string()),
        ("WSGATE_NODE_ID", "node-k".to_owned()),
    ])
    .await;
    let mut obs = client(a.addr, &token("alice", None, &["chat.*"])).await;
    subscribe_events(&mut obs, "chat.room").await;
    expect_event(&mut obs, "join", "chat.room", "alice", "null", "node-a").await;
    let mut doomed = Vec::new();
    for _ in 0..3 {
        let mut c = b.client().await;
        c.subscribe("chat.room").await;
        let text = obs.recv_text().await;
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["action"], "join", "{text}");
        assert!(v["member"]["client"]
            .as_str()
            .unwrap()
            .starts_with("node-k:"));
        assert_eq!(v["member"]["user"], Value::Null);
        doomed.push((c, v["member"].clone()));
    }
    let mut early = Vec::new();
    assert_eq!(stats(&mut obs, &mut early).await, 4);
    let killed = Instant::now();
    signal(b.pid(), "KILL");
    let _ = b.wait_exit(Duration::from_secs(5)).await;
    // Answers: the members go when the lease ends (polled: no event says so).
    loop {
        if stats(&mut obs, &mut early).await == 1 {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_millis(LEASE_MS + 300),
            "members still listed {:?} after the kill",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gone = killed.elapsed();
    // Events: one leave per member, reaped by node-a's next renewal.
    let mut left = Vec::new();
    early.reverse();
    for _ in 0..3 {
        let v = match early.pop() {
            Some(v) => v,
            None => obs.recv().await,
        };
        assert_eq!(v["action"], "leave", "{v}");
        left.push(v["member"].clone());
    }
    let reaped = killed.elapsed();
    assert!(
        reaped < Duration::from_millis(LEASE_MS + LEASE_MS / 3 + 500),
        "reaped after {reaped:?}"
    );
    let mut want: Vec<Value> = doomed.iter().map(|(_, m)| m.clone()).collect();
    want.sort_by_key(|m| m.to_string());
    left.sort_by_key(|m| m.to_string());
    assert_eq!(left, want);
    obs.expect_silence(Duration::from_millis(LEASE_MS / 2))
        .await;
    eprintln!("kill -9: members gone from answers after {gone:?}, leaves after {reaped:?}");
    a.stop().await;
}
