//! Presence in Bayeux (`docs/dialects/bayeux.md`, Presence;
//! `docs/presence.md`): `ext.wsgate.join_leave` on `/meta/subscribe`
//! delivers a presence channel's join and leave events on the channel,
//! marked `ext.wsgate.presence`; a publish to `/service/wsgate/presence`
//! reads the members, under the subscribe ACL.
//!
//! Raw Bayeux over WebSocket against two gateways on one real
//! `redis-server` (and one on the embedded broker), every frame compared
//! byte for byte; and the real npm `faye` client. "Exactly once" is checked
//! on signals: after an event, a marker message published on the channel
//! must be the very next frame (no duplicate before it). Every wait is
//! bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::node::Script;
use common::{test_config, Client, Gateway, Redis};
use serde_json::{json, Value};
use wsgate::presence::Rules;
use wsgate::Config;

const SECRET: &str = "wsgate-bayeux-presence-secret-0123456789";
const KEY: &str = "bayeux-presence-publish-key";

fn config(redis: Option<&Redis>, node: &str) -> Config {
    let mut cfg = Config {
        presence: Rules::parse("/chat/*").unwrap(),
        presence_lease: Duration::from_millis(1000),
        node_id: node.to_owned(),
        // A socket that goes away unasked ends its session after this.
        bayeux_session_timeout: Duration::from_millis(500),
        ..test_config(redis.map(Redis::url))
    };
    cfg.api_key = Config::from_vars([("WSGATE_API_KEY".to_owned(), KEY.to_owned())])
        .unwrap()
        .api_key;
    cfg
}

fn token(sub: &str, acl: &[&str]) -> String {
    let claims = json!({
        "sub": sub,
        "exp": jsonwebtoken::get_current_timestamp() + 3600,
        "subscribe": acl,
        "info": {"name": sub},
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// A raw Bayeux client over WebSocket: handshake (with `ext.token` when
/// given) and first connect.
async fn bayeux(gw: &Gateway, token: Option<&str>) -> (Client, String) {
    let mut c = Client::connect(gw.addr, "/bayeux").await;
    let ext = token
        .map(|t| format!(r#","ext":{{"token":"{t}"}}"#))
        .unwrap_or_default();
    c.send_text(&format!(
        r#"[{{"channel":"/meta/handshake","version":"1.0","supportedConnectionTypes":["websocket"],"id":"1"{ext}}}]"#
    ))
    .await;
    let v: Value = serde_json::from_str(&c.recv_text().await).unwrap();
    assert_eq!(v[0]["successful"], true, "{v}");
    let cid = v[0]["clientId"].as_str().unwrap().to_owned();
    c.send_text(&format!(
        r#"[{{"channel":"/meta/connect","clientId":"{cid}","connectionType":"websocket","id":"2"}}]"#
    ))
    .await;
    let v: Value = serde_json::from_str(&c.recv_text().await).unwrap();
    assert_eq!(v[0]["successful"], true, "{v}");
    (c, cid)
}

/// Sends a `/meta/subscribe` of `sub` with `ext` and returns the reply frame.
async fn subscribe(c: &mut Client, cid: &str, id: &str, sub: &str, ext: &str) -> String {
    c.send_text(&format!(
        r#"[{{"channel":"/meta/subscribe","clientId":"{cid}","subscription":"{sub}","id":"{id}","ext":{ext}}}]"#
    ))
    .await;
    c.recv_text().await
}

fn subscribed(id: &str, cid: &str, sub: &str) -> String {
    format!(
        r#"[{{"channel":"/meta/subscribe","id":"{id}","successful":true,"clientId":"{cid}","subscription":"{sub}"}}]"#
    )
}

fn refused(id: &str, cid: &str, sub: &str, error: &str) -> String {
    format!(
        r#"[{{"channel":"/meta/subscribe","id":"{id}","successful":false,"clientId":"{cid}","subscription":"{sub}","error":"{error}"}}]"#
    )
}

const JOIN_LEAVE: &str = r#"{"wsgate":{"join_leave":true}}"#;

fn member(client: &str, user: Option<&str>) -> String {
    match user {
        Some(u) => format!(r#"{{"client":"{client}","user":"{u}","info":{{"name":"{u}"}}}}"#),
        None => format!(r#"{{"client":"{client}","user":null,"info":null}}"#),
    }
}

/// The frame of a join or leave event of `channel` for `member`.
fn event(action: &str, channel: &str, member: &str) -> String {
    format!(
        r#"[{{"channel":"{channel}","data":{{"action":"{action}","channel":"{channel}","member":{member}}},"ext":{{"wsgate":{{"presence":"{action}"}}}}}}]"#
    )
}

/// Reads the next frame: a join/leave event of `channel`; returns the
/// member's client id after checking the frame byte for byte (`user`: the
/// member's token subject, if any) and that it names `node`.
async fn expect_event(
    c: &mut Client,
    action: &str,
    channel: &str,
    node: &str,
    user: Option<&str>,
) -> String {
    let frame = c.recv_text().await;
    let v: Value = serde_json::from_str(&frame).unwrap();
    let client = v[0]["data"]["member"]["client"]
        .as_str()
        .unwrap_or_else(|| panic!("not an event: {frame}"))
        .to_owned();
    assert!(client.starts_with(&format!("{node}:")), "{frame}");
    assert_eq!(frame, event(action, channel, &member(&client, user)));
    client
}

/// A publish to `/service/wsgate/presence`.
fn presence_msg(cid: &str, id: &str, data: &str) -> String {
    format!(
        r#"[{{"channel":"/service/wsgate/presence","clientId":"{cid}","id":"{id}","data":{data}}}]"#
    )
}

fn presence_answer(id: &str, channel: &str, members: &[String]) -> String {
    format!(
        r#"[{{"channel":"/service/wsgate/presence","id":"{id}","successful":true,"data":{{"channel":"{channel}","clients":{},"users":0,"members":[{}]}}}}]"#,
        members.len(),
        members.join(",")
    )
}

/// Publishes a marker on `channel` (through `gw`'s `/publish`) and checks
/// it is the next frame `c` reads: nothing (no duplicate event) came before.
async fn marker(gw: &Gateway, c: &mut Client, channel: &str, n: u32) {
    let (status, body) = http_publish(gw, channel, &format!(r#"{{"marker":{n}}}"#)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        c.recv_text().await,
        format!(r#"[{{"channel":"{channel}","data":{{"marker":{n}}}}}]"#),
        "the marker {n} comes next"
    );
}

async fn http_publish(gw: &Gateway, channel: &str, payload: &str) -> (u16, String) {
    let body = json!({"channel": channel, "payload_text": payload}).to_string();
    common::http_with(
        gw.addr,
        "POST",
        "/publish",
        &[("authorization", &format!("Bearer {KEY}"))],
        Some(&body),
    )
    .await
}

/// An observer on `a` asks for events; a member on `b` joins without
/// asking; another on `b` goes away without a disconnect. The observer
/// sees its own join, each other join once, each leave once (on
/// `/meta/disconnect` at once, on a vanished socket after the session
/// timeout); members read through `/service/wsgate/presence` on either
/// node; the member that did not ask gets no event.
async fn join_leave_and_members(a: &Gateway, na: &str, b: &Gateway, nb: &str) {
    let room = "/chat/room";
    let (mut obs, ocid) = bayeux(a, None).await;
    assert_eq!(
        subscribe(&mut obs, &ocid, "3", room, JOIN_LEAVE).await,
        subscribed("3", &ocid, room)
    );
    let me = expect_event(&mut obs, "join", room, na, None).await;

    let (mut quiet, qcid) = bayeux(b, None).await;
    assert_eq!(
        subscribe(&mut quiet, &qcid, "3", room, "{}").await,
        subscribed("3", &qcid, room)
    );
    let him = expect_event(&mut obs, "join", room, nb, None).await;
    marker(a, &mut obs, room, 1).await;
    // The member that did not ask: the marker is its first frame.
    assert_eq!(
        quiet.recv_text().await,
        format!(r#"[{{"channel":"{room}","data":{{"marker":1}}}}]"#)
    );

    // Members, sorted by client id, from either node.
    let mut both = [member(&me, None), member(&him, None)];
    both.sort();
    obs.send_text(&presence_msg(
        &ocid,
        "4",
        &format!(r#"{{"channel":"{room}"}}"#),
    ))
    .await;
    assert_eq!(obs.recv_text().await, presence_answer("4", room, &both));
    quiet
        .send_text(&presence_msg(
            &qcid,
            "4",
            &format!(r#"{{"channel":"{room}"}}"#),
        ))
        .await;
    assert_eq!(quiet.recv_text().await, presence_answer("4", room, &both));
    // Counts only.
    obs.send_text(&presence_msg(
        &ocid,
        "5",
        &format!(r#"{{"channel":"{room}","stats":true}}"#),
    ))
    .await;
    assert_eq!(
        obs.recv_text().await,
        format!(
            r#"[{{"channel":"/service/wsgate/presence","id":"5","successful":true,"data":{{"channel":"{room}","clients":2,"users":0}}}}]"#
        )
    );

    // `/meta/disconnect`: one leave, at once.
    quiet
        .send_text(&format!(
            r#"[{{"channel":"/meta/disconnect","clientId":"{qcid}","id":"9"}}]"#
        ))
        .await;
    let left = expect_event(&mut obs, "leave", room, nb, None).await;
    assert_eq!(left, him);
    marker(a, &mut obs, room, 2).await;

    // A socket that vanishes: its session ends after the session timeout,
    // with one leave.
    let (mut gone, gcid) = bayeux(b, None).await;
    assert_eq!(
        subscribe(&mut gone, &gcid, "3", room, "{}").await,
        subscribed("3", &gcid, room)
    );
    let ghost = expect_event(&mut obs, "join", room, nb, None).await;
    drop(gone);
    assert_eq!(expect_event(&mut obs, "leave", room, nb, None).await, ghost);
    marker(a, &mut obs, room, 3).await;
    obs.send_text(&presence_msg(
        &ocid,
        "6",
        &format!(r#"{{"channel":"{room}"}}"#),
    ))
    .await;
    assert_eq!(
        obs.recv_text().await,
        presence_answer("6", room, &[member(&me, None)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_leave_once_and_members_across_two_nodes_on_redis() {
    let redis = Redis::start().await;
    let a = Gateway::start(config(Some(&redis), "bx-a")).await;
    let b = Gateway::start(config(Some(&redis), "bx-b")).await;
    join_leave_and_members(&a, "bx-a", &b, "bx-b").await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_leave_once_and_members_on_the_embedded_broker() {
    let gw = Gateway::start(config(None, "bx-m")).await;
    join_leave_and_members(&gw, "bx-m", &gw, "bx-m").await;
    gw.stop().await;
}

/// What is refused, and how: `join_leave` on a channel without presence,
/// on a wildcard, not a boolean; a presence read that is malformed, of a
/// wildcard or of a channel without presence, or outside the token's
/// subscribe ACL; the service channel itself may be subscribed. The
/// members carry the token's `sub` and `info`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_the_subscribe_acl() {
    let redis = Redis::start().await;
    let mut cfg = config(Some(&redis), "bx-r");
    cfg.jwt_key = Some(wsgate::auth::JwtKey::secret(SECRET).unwrap());
    let gw = Gateway::start(cfg).await;
    let t = token("alice", &["/chat/a", "/news"]);
    let (mut c, cid) = bayeux(&gw, Some(&t)).await;

    assert_eq!(
        subscribe(&mut c, &cid, "3", "/news", JOIN_LEAVE).await,
        refused("3", &cid, "/news", "403:/news:channel has no presence")
    );
    assert_eq!(
        subscribe(&mut c, &cid, "4", "/chat/*", JOIN_LEAVE).await,
        refused(
            "4",
            &cid,
            "/chat/*",
            "400:join_leave is for channels:Bad request"
        )
    );
    assert_eq!(
        subscribe(
            &mut c,
            &cid,
            "5",
            "/chat/a",
            r#"{"wsgate":{"join_leave":1}}"#
        )
        .await,
        refused(
            "5",
            &cid,
            "/chat/a",
            "400:bad ext.wsgate.join_leave:Bad request"
        )
    );
    assert_eq!(
        subscribe(&mut c, &cid, "6", "/service/wsgate/presence", "{}").await,
        subscribed("6", &cid, "/service/wsgate/presence")
    );
    assert_eq!(
        subscribe(&mut c, &cid, "7", "/chat/a", JOIN_LEAVE).await,
        subscribed("7", &cid, "/chat/a")
    );
    let me = expect_event(&mut c, "join", "/chat/a", "bx-r", Some("alice")).await;

    let failure = |id: &str, error: &str| {
        format!(
            r#"[{{"channel":"/service/wsgate/presence","id":"{id}","successful":false,"error":"{error}"}}]"#
        )
    };
    for (id, data, error) in [
        ("10", r#""x""#, "400:bad presence request:Bad request"),
        (
            "11",
            r#"{"room":"/chat/a"}"#,
            "400:bad presence request:Bad request",
        ),
        (
            "12",
            r#"{"channel":"/chat/*"}"#,
            "400:presence is for broadcast channels:Bad request",
        ),
        (
            "13",
            r#"{"channel":"/meta/connect"}"#,
            "400:presence is for broadcast channels:Bad request",
        ),
        (
            "14",
            r#"{"channel":"/news"}"#,
            "403:/news:channel has no presence",
        ),
        ("15", r#"{"channel":"/chat/b"}"#, "403:/chat/b:Forbidden"),
    ] {
        c.send_text(&presence_msg(&cid, id, data)).await;
        assert_eq!(c.recv_text().await, failure(id, error), "{data}");
    }
    c.send_text(&presence_msg(&cid, "16", r#"{"channel":"/chat/a"}"#))
        .await;
    assert_eq!(
        c.recv_text().await,
        format!(
            r#"[{{"channel":"/service/wsgate/presence","id":"16","successful":true,"data":{{"channel":"/chat/a","clients":1,"users":1,"members":[{}]}}}}]"#,
            member(&me, Some("alice"))
        )
    );
    gw.stop().await;
}

/// The first event of `faye` (already read, or to come) that `pred` takes.
async fn seen_or_next(faye: &mut Script, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    if let Some(e) = faye.history().iter().find(|e| pred(e)) {
        return e.clone();
    }
    faye.expect_where(what, pred).await
}

/// The npm faye client: an extension puts `ext.wsgate.join_leave` on its
/// subscribes; its subscriber sees a raw member's join and leave (with
/// `ext.wsgate.presence`); it reads the members by publishing to
/// `/service/wsgate/presence`, whose answer reaches its subscriber of that
/// channel.
async fn faye_presence(transport: &str) {
    let redis = Redis::start().await;
    let gw = Gateway::start(config(Some(&redis), "bx-f")).await;
    let room = "/chat/faye";
    let url = format!("http://{}/bayeux", gw.addr);
    let mut faye = Script::spawn(
        "faye_client.js",
        &[
            "--url",
            &url,
            "--transport",
            transport,
            "--max-ms",
            "40000",
            "--subscribe",
            room,
            "--subscribe",
            "/service/wsgate/presence",
            "--join-leave",
        ],
    );
    faye.expect("ready").await;
    let own = seen_or_next(&mut faye, "its own join", |e| {
        e["event"] == "message" && e["channel"] == room
    })
    .await;
    assert_eq!(own["data"]["action"], "join", "{own}");
    let own_client = own["data"]["member"]["client"].as_str().unwrap().to_owned();

    let (mut raw, rcid) = bayeux(&gw, None).await;
    assert_eq!(
        subscribe(&mut raw, &rcid, "3", room, "{}").await,
        subscribed("3", &rcid, room)
    );
    let join = seen_or_next(&mut faye, "the raw member's join", |e| {
        e["event"] == "delivery"
            && e["channel"] == room
            && e["data"]["member"]["client"] != own_client.as_str()
    })
    .await;
    assert_eq!(
        join["message"]["ext"],
        json!({"wsgate":{"presence":"join"}})
    );
    assert_eq!(join["data"]["action"], "join");
    let raw_client = join["data"]["member"]["client"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(raw_client, own_client);

    faye.send(json!({"cmd":"publish","channel":"/service/wsgate/presence","data":{"channel":room},"ref":"p1"}))
        .await;
    let answer = seen_or_next(&mut faye, "the members", |e| {
        e["event"] == "message" && e["channel"] == "/service/wsgate/presence"
    })
    .await;
    let mut clients: Vec<String> = answer["data"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["client"].as_str().unwrap().to_owned())
        .collect();
    clients.sort();
    let mut want = vec![own_client, raw_client.clone()];
    want.sort();
    assert_eq!(clients, want, "{answer}");
    assert_eq!(answer["data"]["clients"], 2);
    let published = seen_or_next(&mut faye, "the publish's result", |e| {
        e["event"] == "published"
    })
    .await;
    assert_eq!(published["ok"], true, "{published}");

    raw.send_text(&format!(
        r#"[{{"channel":"/meta/disconnect","clientId":"{rcid}","id":"9"}}]"#
    ))
    .await;
    let leave = faye
        .expect_where("the raw member's leave", |e| {
            e["event"] == "delivery" && e["channel"] == room && e["data"]["action"] == "leave"
        })
        .await;
    assert_eq!(
        leave["message"]["ext"],
        json!({"wsgate":{"presence":"leave"}})
    );
    assert_eq!(leave["data"]["member"]["client"], raw_client.as_str());
    // Exactly once: the marker is the next delivery on the room.
    let (status, body) = http_publish(&gw, room, r#"{"marker":1}"#).await;
    assert_eq!(status, 200, "{body}");
    faye.expect_where("the marker", |e| {
        e["event"] == "delivery" && e["channel"] == room && e["data"]["marker"] == 1
    })
    .await;
    let on_room: Vec<&Value> = faye
        .history()
        .iter()
        .filter(|e| e["event"] == "delivery" && e["channel"] == room)
        .collect();
    assert_eq!(
        on_room.len(),
        4,
        "own join, join, leave, marker: {on_room:?}"
    );
    faye.close_stdin();
    let (status, _) = faye.finish(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
    drop(raw);
    gw.stop().await;
}

#[tokio::test]
async fn faye_websocket_sees_join_leave_and_reads_members() {
    faye_presence("websocket").await;
}

#[tokio::test]
async fn faye_long_polling_sees_join_leave_and_reads_members() {
    faye_presence("long-polling").await;
}
