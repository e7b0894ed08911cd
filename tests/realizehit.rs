//! realizehit over Engine.IO 3 end to end: the real `engine.io-client`
//! 1.8.6 with `realizehit-pattern-to-id` and `realizehit-publisher` (see
//! `tests/js/realizehit_client.js`) over polling with the WebSocket
//! upgrade, polling only and WebSocket only, and raw HTTP and WebSocket
//! clients for the bytes, against gateways on a real `redis-server`.
//!
//! Every wait is bounded; synchronisation is on signals (a reply, an event
//! line of the client script, `PUBSUB NUMSUB`), never on a sleep. The
//! expected bytes come from `docs/dialects/realizehit.md`, written out here
//! by hand.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::node::Script;
use common::{test_config, Gateway, Redis, WAIT};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use wsgate::Config;

const SIMPSONS: &str = "channel:cnn|tvshow:simpsons";

fn script(gw: &Gateway, redis: &Redis, extra: &[&str]) -> Script {
    let url = format!("http://{}", gw.addr);
    let redis_url = redis.url();
    let mut args = vec!["--url", &url, "--path", "/ws", "--redis", &redis_url];
    args.extend_from_slice(extra);
    Script::spawn("realizehit_client.js", &args)
}

/// Sends a request and waits for the message that answers it (by id),
/// returning its exact text.
async fn act(s: &mut Script, req: Value) -> String {
    let id = req["id"].clone();
    let mut cmd = req;
    cmd["cmd"] = json!("act");
    s.send(cmd).await;
    let reply = s
        .expect_where(&format!("the reply to {id}"), |e| {
            e["event"] == "reply" && e["message"]["id"] == id
        })
        .await;
    reply_text(s, &reply)
}

/// The raw text of the message a reply event came from.
fn reply_text(s: &Script, reply: &Value) -> String {
    s.history()
        .iter()
        .rev()
        .find(|e| {
            e["event"] == "message"
                && serde_json::from_str::<Value>(e["data"].as_str().unwrap_or(""))
                    .is_ok_and(|m| m == reply["message"])
        })
        .and_then(|e| e["data"].as_str().map(str::to_owned))
        .expect("the message of a reply")
}

/// The whole conversation of one real client: sub, ping, deliveries (one
/// non-ASCII) from `realizehit-publisher` and from a plain `PUBLISH`, the
/// error replies, unsub.
async fn conversation(s: &mut Script, redis: &Redis) {
    let pat = json!({"tvshow": "simpsons", "channel": "cnn"});
    s.send(json!({"cmd": "id", "pat": pat})).await;
    let id = s.expect("id").await;
    assert_eq!(id["id"], "54797868");
    assert_eq!(
        act(s, json!({"id": "s1", "act": "sub", "pat": pat})).await,
        r#"{"id":"s1"}"#
    );
    redis.wait_numsub(SIMPSONS, 1).await;
    assert_eq!(
        act(s, json!({"id": "p1", "act": "ping"})).await,
        r#"{"id":"p1","ret":"pong"}"#
    );
    // realizehit-publisher: PUBLISH <channel> JSON.stringify(payload).
    s.send(json!({"cmd": "publish", "pat": pat, "payload": "Hello world", "ref": "a"}))
        .await;
    let d = s.expect("delivery").await;
    assert_eq!(
        d,
        json!({"event":"delivery","id":"54797868","payload":"Hello world","known":true})
    );
    assert_eq!(
        s.history().iter().rev().nth(1).unwrap()["data"],
        r#"54797868?"Hello world""#
    );
    let text = "héllo wörld ✓ 😀 日本";
    s.send(json!({"cmd": "publish", "pat": pat, "payload": {"t": text}, "ref": "b"}))
        .await;
    let d = s.expect("delivery").await;
    assert_eq!(d["payload"]["t"], text, "{d}");
    assert_eq!(redis.publish(SIMPSONS, "[1,\"ü\"]".as_bytes()).await, 1);
    let d = s.expect("delivery").await;
    assert_eq!(d["payload"], json!([1, "ü"]));
    // Non-ASCII from the client: the id comes back as sent.
    assert_eq!(
        act(s, json!({"id": "é✓", "act": "ping"})).await,
        r#"{"id":"é✓","ret":"pong"}"#
    );
    // A duplicate sub is refused (the native protocol's rule), one Redis sub.
    assert_eq!(
        act(s, json!({"id": "s2", "act": "sub", "pat": pat})).await,
        r#"{"id":"s2","err":"already subscribed"}"#
    );
    assert_eq!(
        act(s, json!({"id": "e1", "act": "sub", "pat": "x"})).await,
        r#"{"id":"e1","err":"invalid filters provided"}"#
    );
    assert_eq!(
        act(s, json!({"id": "e2", "act": "sub", "pat": {"a": "x y"}})).await,
        r#"{"id":"e2","err":"invalid chunk provided"}"#
    );
    assert_eq!(
        act(s, json!({"id": "e3", "act": "jump"})).await,
        r#"{"id":"e3","err":"Unable to attend request"}"#
    );
    assert_eq!(
        act(s, json!({"id": "u1", "act": "unsub", "pat": pat})).await,
        r#"{"id":"u1"}"#
    );
    redis.wait_numsub(SIMPSONS, 0).await;
    assert_eq!(
        act(s, json!({"id": "u2", "act": "unsub", "pat": pat})).await,
        r#"{"id":"u2","err":"We did not found a subscription on this client"}"#
    );
    s.send(json!({"cmd": "send", "text": "{nope"})).await;
    let r = s
        .expect_where("the JSON error", |e| {
            e["event"] == "reply" && e["message"]["id"].is_null()
        })
        .await;
    assert_eq!(
        reply_text(s, &r),
        r#"{"err":"Unexpected token n in JSON at position 1"}"#
    );
}

/// engine.io-client 1.8.6 as realizehit's client uses it: polling, then
/// the upgrade to a WebSocket (probe), then the whole conversation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_client_polls_then_upgrades_and_converses() {
    let redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let mut s = script(&gw, &redis, &[]);
    let open = s.expect("open").await;
    assert_eq!(open["transport"], "polling");
    assert_eq!(s.expect("upgrade").await["transport"], "websocket");
    conversation(&mut s, &redis).await;
    let (status, _) = s.finish(WAIT).await;
    assert!(status.success());
    gw.stop().await;
}

/// Polling only (no upgrade): every message goes through the v3 payload
/// framing, non-ASCII both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_client_converses_over_polling_only() {
    let redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let mut s = script(&gw, &redis, &["--no-upgrade"]);
    assert_eq!(s.expect("open").await["transport"], "polling");
    conversation(&mut s, &redis).await;
    assert!(!s.history().iter().any(|e| e["event"] == "upgrade"));
    s.finish(WAIT).await;
    gw.stop().await;
}

/// `transports: ['websocket']`: no polling at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_client_converses_over_websocket_only() {
    let redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let mut s = script(&gw, &redis, &["--transport", "websocket"]);
    assert_eq!(s.expect("open").await["transport"], "websocket");
    conversation(&mut s, &redis).await;
    s.finish(WAIT).await;
    gw.stop().await;
}

// ------------------------------------------------------------ raw HTTP

/// One raw request: (status, head, body bytes).
async fn raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.ok()?;
        stream.write_all(body).await.ok()?;
        let mut all = Vec::new();
        stream.read_to_end(&mut all).await.ok()?;
        let split = all.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&all[..split]).into_owned();
        let status = head.split(' ').nth(1)?.parse().ok()?;
        Some((status, head, all[split + 4..].to_vec()))
    };
    tokio::time::timeout(WAIT, attempt)
        .await
        .ok()
        .flatten()
        .expect("an HTTP answer")
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String, Vec<u8>) {
    raw(addr, "GET", path, "text/plain", b"").await
}

/// A polling session by hand (`b64=1`): its sid, after checking the open
/// packet byte for byte.
async fn handshake(addr: SocketAddr) -> String {
    let (status, head, body) = get(addr, "/ws/?EIO=3&transport=polling&b64=1").await;
    assert_eq!(status, 200, "{head}");
    assert!(
        head.contains("content-type: text/plain; charset=UTF-8"),
        "{head}"
    );
    let body = String::from_utf8(body).unwrap();
    let (len, packet) = body.split_once(':').unwrap();
    let sid = packet
        .strip_prefix("0{\"sid\":\"")
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_owned();
    let open = format!(
        r#"0{{"sid":"{sid}","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":60000}}"#
    );
    assert_eq!(packet, open);
    assert_eq!(len.parse::<usize>().unwrap(), open.len());
    assert!(
        head.contains(&format!("set-cookie: io={sid}; Path=/; HttpOnly")),
        "{head}"
    );
    sid
}

/// POSTs a payload; returns (status, body).
async fn post(addr: SocketAddr, sid: &str, body: &[u8], content_type: &str) -> (u16, String) {
    let path = format!("/ws/?EIO=3&transport=polling&sid={sid}");
    let (status, _, body) = raw(addr, "POST", &path, content_type, body).await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The next poll's body.
async fn poll(addr: SocketAddr, sid: &str) -> Vec<u8> {
    let (status, head, body) = get(addr, &format!("/ws/?EIO=3&transport=polling&sid={sid}")).await;
    assert_eq!(status, 200, "{head}");
    body
}

/// A string payload of the given packets, framed as engine.io 1.8 frames
/// it (written out by hand: length in UTF-8 bytes, each byte a char).
fn payload(packets: &[&str]) -> Vec<u8> {
    let mut out = String::new();
    for p in packets {
        out.push_str(&p.len().to_string());
        out.push(':');
        out.extend(p.bytes().map(char::from));
    }
    out.into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_io_errors_are_engine_io_1_8s() {
    let redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let a = gw.addr;
    let err = |code: u8, message: &str| format!(r#"{{"code":{code},"message":"{message}"}}"#);
    let cases = [
        (
            "GET",
            "/ws/?EIO=3&transport=polling&sid=nope",
            400,
            err(1, "Session ID unknown"),
        ),
        (
            "POST",
            "/ws/?EIO=3&transport=polling&sid=nope",
            400,
            err(1, "Session ID unknown"),
        ),
        (
            "GET",
            "/ws/?EIO=3&transport=carrier-pigeon",
            400,
            err(0, "Transport unknown"),
        ),
        ("GET", "/ws/?EIO=3", 400, err(0, "Transport unknown")),
        (
            "POST",
            "/ws/?EIO=3&transport=polling",
            400,
            err(2, "Bad handshake method"),
        ),
        (
            "GET",
            "/ws/?EIO=4&transport=polling",
            400,
            err(5, "Unsupported protocol version"),
        ),
    ];
    for (method, path, status, body) in cases {
        let (got, head, got_body) = raw(a, method, path, "text/plain", b"").await;
        assert_eq!(
            (got, String::from_utf8_lossy(&got_body).into_owned()),
            (status, body.clone()),
            "{method} {path}\n{head}"
        );
    }
    // The native path is untouched by the Engine.IO mount.
    let mut native = gw.client().await;
    native.subscribe("x").await;
    // Two polls at once: one is a bad request, the other still served.
    let sid = handshake(a).await;
    let polls: Vec<_> = (0..2)
        .map(|_| {
            let path = format!("/ws/?EIO=3&transport=polling&sid={sid}");
            tokio::spawn(async move { get(a, &path).await })
        })
        .collect();
    let mut answers = Vec::new();
    let mut polls = polls.into_iter();
    // The refused one answers at once; then the held one gets the pong.
    let (mut first, mut second) = (polls.next().unwrap(), polls.next().unwrap());
    let (refused, held) = tokio::select! {
        r = &mut first => (r, second),
        r = &mut second => (r, first),
    };
    let refused = refused.unwrap();
    answers.push((refused.0, refused.2));
    assert_eq!(
        post(a, &sid, &payload(&["2"]), "text/plain;charset=UTF-8").await,
        (200, "ok".into())
    );
    let held = tokio::time::timeout(WAIT, held).await.unwrap().unwrap();
    answers.push((held.0, held.2));
    assert_eq!(
        answers,
        [
            (400, err(3, "Bad request").into_bytes()),
            (200, payload(&["3"]))
        ]
    );
    gw.stop().await;
}

/// Ten and more malformed inputs over polling, each answered (the POST
/// with engine.io's `Bad request`, and the session with a `{"err":..}`
/// message or realizehit's own error reply), while another realizehit
/// client and a native client on the same channel carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_is_answered_and_harms_nobody() {
    let redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let a = gw.addr;
    let mut other = script(&gw, &redis, &["--no-upgrade"]);
    other.expect("open").await;
    assert_eq!(
        act(
            &mut other,
            json!({"id": 1, "act": "sub", "pat": {"foo": "bar"}})
        )
        .await,
        r#"{"id":1}"#
    );
    let mut native = gw.client().await;
    native.subscribe("foo:bar").await;
    redis.wait_numsub("foo:bar", 1).await;
    let sid = handshake(a).await;
    let bad_request = r#"{"code":3,"message":"Bad request"}"#;
    let frame_error = |why: &str| format!(r#"4{{"err":"{why}"}}"#);
    // Transport level: the POST is refused, the session told why.
    let transport_cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (
            b"garbage".to_vec(),
            "text/plain",
            "malformed payload framing",
        ),
        (b"5:4ab".to_vec(), "text/plain", "malformed payload framing"),
        (b"2:9x".to_vec(), "text/plain", "unknown packet type"),
        (b"1:".to_vec(), "text/plain", "malformed payload framing"),
        (
            b"6:b4AAAA".to_vec(),
            "text/plain",
            "binary packets are not supported: send text",
        ),
        (vec![0xff, 0xfe], "text/plain", "packet is not valid UTF-8"),
        // A lone continuation byte as a char: not UTF-8 once unframed.
        (
            "2:4\u{80}".as_bytes().to_vec(),
            "text/plain",
            "packet is not valid UTF-8",
        ),
        (
            vec![1, 3, 255, 4, 1, 2],
            "application/octet-stream",
            "binary packets are not supported: send text",
        ),
        (
            vec![0, 9, 9, 255, b'4'],
            "application/octet-stream",
            "malformed payload framing",
        ),
    ];
    for (body, ct, why) in &transport_cases {
        let (status, text) = post(a, &sid, body, ct).await;
        assert_eq!((status, text.as_str()), (400, bad_request), "{body:?}");
        let want = payload(&[&frame_error(why)]);
        assert_eq!(
            String::from_utf8_lossy(&poll(a, &sid).await),
            String::from_utf8_lossy(&want),
            "{body:?}"
        );
    }
    // Too large: 413, and said so.
    let big = payload(&[&format!("4{}", "x".repeat(70_000))]);
    let (status, text) = post(a, &sid, &big, "text/plain").await;
    assert_eq!((status, text.as_str()), (413, bad_request));
    let got = String::from_utf8(poll(a, &sid).await).unwrap();
    assert!(
        got.contains(r#"4{"err":"message too large: 70007 bytes, at most 65536"}"#),
        "{got}"
    );
    // Dialect level: realizehit's own replies, byte for byte.
    let dialect_cases = [
        ("4{", r#"{"err":"Unexpected end of JSON input"}"#),
        ("4null", r#"{"err":"Cannot read property 'id' of null"}"#),
        (
            r#"4{"id":"a","act":"sub"}"#,
            r#"{"id":"a","err":"Cannot stringify without having filters"}"#,
        ),
        (
            r#"4{"id":"b","act":"sub","pat":{}}"#,
            r#"{"id":"b","err":"Cannot stringify without having filters"}"#,
        ),
        (
            r#"4{"id":"c","act":"sub","pat":{"a-b":"x"}}"#,
            r#"{"id":"c","err":"invalid filter provided"}"#,
        ),
        (
            r#"4{"id":"d","act":"sub","pat":{"a":""}}"#,
            r#"{"id":"d","err":"chunk not defined"}"#,
        ),
        (
            r#"4{"id":"e","act":"sub","pat":{"a":1.5}}"#,
            r#"{"id":"e","err":"invalid chunk provided"}"#,
        ),
        (
            r#"4{"id":"f","act":"sub","pat":{"a":[]}}"#,
            r#"{"id":"f","err":"invalid filter.prop chunk provided"}"#,
        ),
        (
            r#"4{"id":"g","act":5}"#,
            r#"{"id":"g","err":"Unable to attend request"}"#,
        ),
        (
            r#"4{"id":"h","act":"unsub","pat":7}"#,
            r#"{"id":"h","err":"We did not found a subscription on this client"}"#,
        ),
        (
            r#"4{"id":{"x":[1]},"act":"ping"}"#,
            r#"{"id":{"x":[1]},"ret":"pong"}"#,
        ),
    ];
    for (packet, want) in dialect_cases {
        assert_eq!(
            post(a, &sid, &payload(&[packet]), "text/plain").await,
            (200, "ok".into())
        );
        let got = poll(a, &sid).await;
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&payload(&[&format!("4{want}")])),
            "{packet}"
        );
    }
    // Everyone else carries on: one Redis subscription, both delivered.
    assert_eq!(redis.numsub("foo:bar").await, 1);
    assert_eq!(redis.publish("foo:bar", b"42").await, 1);
    let d = other.expect("delivery").await;
    assert_eq!(d["id"], "4e99e8c1");
    assert_eq!(d["payload"], 42);
    assert_eq!(
        native.recv().await,
        json!({"action":"message","channel":"foo:bar","payload":42})
    );
    other.finish(WAIT).await;
    gw.stop().await;
}

/// A native client and a realizehit client on one channel share one Redis
/// subscription, exactly refcounted; a plain `PUBLISH` reaches both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refcounts_are_exact_across_dialects() {
    let redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let mut rh = script(&gw, &redis, &["--transport", "websocket"]);
    rh.expect("open").await;
    let mut native = gw.client().await;
    native.subscribe("foo:bar").await;
    assert_eq!(
        act(
            &mut rh,
            json!({"id": "s", "act": "sub", "pat": {"foo": "bar"}})
        )
        .await,
        r#"{"id":"s"}"#
    );
    assert_eq!(redis.numsub("foo:bar").await, 1);
    assert_eq!(redis.publish("foo:bar", br#"{"n":1}"#).await, 1);
    assert_eq!(rh.expect("delivery").await["payload"], json!({"n": 1}));
    assert_eq!(native.recv().await["payload"], json!({"n": 1}));
    assert_eq!(
        act(
            &mut rh,
            json!({"id": "u", "act": "unsub", "pat": "foo:bar"})
        )
        .await,
        r#"{"id":"u"}"#
    );
    assert_eq!(redis.numsub("foo:bar").await, 1);
    native
        .request(json!({"action":"unsubscribe","channel":"foo:bar"}))
        .await;
    redis.wait_numsub("foo:bar", 0).await;
    // A session that ends leaves what it held.
    assert_eq!(
        act(
            &mut rh,
            json!({"id": "s2", "act": "sub", "pat": {"foo": "bar"}})
        )
        .await,
        r#"{"id":"s2"}"#
    );
    redis.wait_numsub("foo:bar", 1).await;
    rh.finish(WAIT).await;
    redis.wait_numsub("foo:bar", 0).await;
    gw.stop().await;
}

// ------------------------------------------------------------ gaps

/// Redis goes away and comes back: the realizehit client gets the gap
/// notices (`$gap`, interrupted then resumed, naming its subscription by
/// id and channel) and receives again; a message too large for its queue
/// is a gap too, not a silent drop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_are_told_in_realizehit_shape() {
    let mut redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let mut s = script(&gw, &redis, &[]);
    s.expect("upgrade").await;
    assert_eq!(
        act(
            &mut s,
            json!({"id": "s", "act": "sub", "pat": {"foo": "bar"}})
        )
        .await,
        r#"{"id":"s"}"#
    );
    let notice = |e: &Value, gap: &str| {
        e["event"] == "reply" && e["message"]["id"] == "$gap" && e["message"]["ret"]["gap"] == gap
    };
    redis.kill();
    let r = s
        .expect_where("interrupted", |e| notice(e, "interrupted"))
        .await;
    assert_eq!(
        reply_text(&s, &r),
        r#"{"id":"$gap","ret":{"gap":"interrupted","reason":"broker connection lost","subs":{"4e99e8c1":"foo:bar"}}}"#
    );
    redis.restart().await;
    let r = s.expect_where("resumed", |e| notice(e, "resumed")).await;
    assert_eq!(
        reply_text(&s, &r),
        r#"{"id":"$gap","ret":{"gap":"resumed","subs":{"4e99e8c1":"foo:bar"}}}"#
    );
    redis.wait_numsub("foo:bar", 1).await;
    let huge = vec![b'x'; 2_000_000];
    assert_eq!(redis.publish("foo:bar", &huge).await, 1);
    let r = s
        .expect_where("too large", |e| notice(e, "interrupted"))
        .await;
    assert_eq!(r["message"]["ret"]["reason"], "message too large");
    s.expect_where("resumed", |e| notice(e, "resumed")).await;
    assert_eq!(redis.publish("foo:bar", b"1").await, 1);
    assert_eq!(s.expect("delivery").await["payload"], 1);
    s.finish(WAIT).await;
    gw.stop().await;
}

// ------------------------------------------------------------ liveness

/// pingInterval/pingTimeout come from the config; a polling session whose
/// client stops sending ends after their sum and leaves what it held; its
/// sid is then unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_times_out() {
    let redis = Redis::start().await;
    let mut config: Config = test_config(Some(redis.url()));
    config.ping_interval = Duration::from_millis(300);
    config.pong_timeout = Duration::from_millis(400);
    let gw = Gateway::start(config).await;
    let a = gw.addr;
    let (_, _, body) = get(a, "/ws/?EIO=3&transport=polling&b64=1").await;
    let body = String::from_utf8(body).unwrap();
    assert!(
        body.ends_with(r#""upgrades":["websocket"],"pingInterval":300,"pingTimeout":400}"#),
        "{body}"
    );
    let sid = body.split('"').nth(3).unwrap().to_owned();
    assert_eq!(
        post(
            a,
            &sid,
            &payload(&[r#"4{"id":1,"act":"sub","pat":{"q":"1"}}"#]),
            "text/plain"
        )
        .await
        .0,
        200
    );
    redis.wait_numsub("q:1", 1).await;
    redis.wait_numsub("q:1", 0).await;
    let (status, _, body) = get(a, &format!("/ws/?EIO=3&transport=polling&sid={sid}")).await;
    assert_eq!(
        (status, body),
        (
            400,
            br#"{"code":1,"message":"Session ID unknown"}"#.to_vec()
        )
    );
    gw.stop().await;
}

/// A raw WebSocket-only client: the open packet first (no upgrades), `2`
/// answered `3`, a binary frame and an oversized one answered with errors,
/// and the session still serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_websocket_client_sees_exact_packets() {
    let redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let url = format!("ws://{}/ws/?EIO=3&transport=websocket", gw.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let open = next_text(&mut ws).await;
    assert!(
        open.starts_with("0{\"sid\":\"")
            && open.ends_with(r#"","upgrades":[],"pingInterval":25000,"pingTimeout":60000}"#),
        "{open}"
    );
    ws.send(Message::Text("2".into())).await.unwrap();
    ws.send(Message::Binary(vec![4, 1].into())).await.unwrap();
    ws.send(Message::Text(format!("4{}", "y".repeat(70_000)).into()))
        .await
        .unwrap();
    ws.send(Message::Text("8".into())).await.unwrap();
    ws.send(Message::Text(r#"4{"id":"p","act":"ping"}"#.into()))
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 5 {
        got.push(next_text(&mut ws).await);
    }
    assert_eq!(
        got,
        [
            "3",
            r#"4{"err":"binary packets are not supported: send text"}"#,
            r#"4{"err":"message too large: 70001 bytes, at most 65536"}"#,
            r#"4{"err":"unknown packet type"}"#,
            r#"4{"id":"p","ret":"pong"}"#,
        ]
    );
    // An upgrade of a sid that is not polling is refused the engine.io way.
    let bad = format!("ws://{}/ws/?EIO=3&transport=websocket&sid=nope", gw.addr);
    assert!(tokio_tungstenite::connect_async(&bad).await.is_err());
    // Closing: the client's `1` ends the session.
    ws.send(Message::Text("1".into())).await.unwrap();
    let end = tokio::time::timeout(WAIT, async {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Text(t) = m {
                if t.as_str() == "1" {
                    return true;
                }
            }
        }
        false
    })
    .await
    .unwrap();
    assert!(end, "the close packet");
    gw.stop().await;
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn next_text(ws: &mut Ws) -> String {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Text(t) => return t.to_string(),
            _ => continue,
        }
    }
}

// ------------------------------------------------------------ HTTP publisher

const KEY: &str = "0123456789abcdef-key";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_publisher_answers_in_plain_text() {
    let redis = Redis::start().await;
    let keyed = Config::from_vars([("WSGATE_API_KEY".to_owned(), KEY.to_owned())]).unwrap();
    let config = Config {
        api_key: keyed.api_key,
        ..test_config(Some(redis.url()))
    };
    let gw = Gateway::start(config).await;
    let mut native = gw.client().await;
    native.subscribe("a:1|b:x").await;
    let send = |body: &'static str, key: Option<&'static str>| {
        let addr = gw.addr;
        async move {
            let auth = key.map(|k| format!("Bearer {k}"));
            let headers: Vec<(&str, &str)> =
                auth.iter().map(|a| ("Authorization", a.as_str())).collect();
            common::http_with(addr, "POST", "/realizehit/publish", &headers, Some(body)).await
        }
    };
    assert_eq!(
        send(
            r#"{"pattern":{"b":"x","a":1},"payload":{"hi":"ü"}}"#,
            Some(KEY)
        )
        .await,
        (200, "Your payload has been queued for delivery".to_owned())
    );
    assert_eq!(
        native.recv().await,
        json!({"action":"message","channel":"a:1|b:x","payload":{"hi":"ü"}})
    );
    for (body, want) in [
        ("[]", "Please include your arguments on body"),
        (
            r#"{"payload":1}"#,
            "Please include .pattern in your request body",
        ),
        (
            r#"{"pattern":{},"payload":1}"#,
            "Please include .pattern in your request body",
        ),
        (
            r#"{"pattern":{"a":"b"}}"#,
            "Please include .payload in your request body",
        ),
        (
            r#"{"pattern":{"a":"b c"},"payload":1}"#,
            "invalid chunk provided",
        ),
    ] {
        assert_eq!(
            send(body, Some(KEY)).await,
            (400, want.to_owned()),
            "{body}"
        );
    }
    assert_eq!(
        send(r#"{"pattern":{"a":"b"},"payload":1}"#, None).await.0,
        401
    );
    assert_eq!(
        send(r#"{"pattern":{"a":"b"},"payload":1}"#, Some("wrong"))
            .await
            .0,
        401
    );
    gw.stop().await;
}
