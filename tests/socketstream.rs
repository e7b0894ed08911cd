//! SocketStream 0.4 realtime services end to end: raw frames (tungstenite
//! here), and a Prism-style client in Node (`tests/js/socketstream_client.js`:
//! npm `ws` plus `realtime-service-client`, evaluating the handlers the
//! server hands out) against gateways on a real `redis-server`, beside
//! RoadRunner and native clients.
//!
//! Frames are compared byte for byte with `docs/dialects/socketstream.md`,
//! written out here by hand; waits are on signals, each bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::num::NonZeroUsize;
use std::time::Duration;

use common::node::Script;
use common::{http, metric_value, test_config, wait_until, Client, Gateway, Redis, WAIT};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use wsgate::Config;

const PATH: &str = "/socketstream";

async fn ss(gw: &Gateway) -> Client {
    Client::connect(gw.addr, PATH).await
}

/// Sends `frame` and checks the next frame is exactly `want`.
async fn exchange(c: &mut Client, frame: &str, want: &str) {
    c.send_text(frame).await;
    assert_eq!(c.recv_text().await, want, "answer to {frame}");
}

/// The sessionId of a `connect` answer with callback `cb`.
fn session_id(reply: &str, cb: u32) -> String {
    let prefix = format!(r#"{cb}|{{"version":"0.0.1","sessionId":""#);
    let prefix = format!("0|{prefix}");
    let id = reply
        .strip_prefix(&prefix)
        .and_then(|r| r.strip_suffix("\"}"))
        .unwrap_or_else(|| panic!("not a connect answer: {reply}"));
    assert_eq!(id.len(), 32, "{reply}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{reply}");
    id.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_discover_subscribe_and_deliver_byte_for_byte() {
    let redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let mut c = ss(&gw).await;
    c.send_text(r#"0|1|{"c":"connect","v":"0.0.1","sessionId":false}"#)
        .await;
    let first = session_id(&c.recv_text().await, 1);
    // A client's own id is not taken over; a second connect is the same session.
    c.send_text(r#"0|2|{"c":"connect","v":"0.0.1","sessionId":"chosen"}"#)
        .await;
    assert_eq!(session_id(&c.recv_text().await, 2), first);
    let mut d = ss(&gw).await;
    d.send_text(r#"0|1|{"c":"connect","v":"0.0.1","sessionId":false}"#)
        .await;
    assert_ne!(session_id(&d.recv_text().await, 1), first);

    c.send_text(r#"0|3|{"c":"discover","p":{}}"#).await;
    let reply = c.recv_text().await;
    let body = reply.strip_prefix("0|3|").expect("discover on callback 3");
    let list: Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        list.as_array()
            .map(|l| l.iter().map(|s| s["params"].clone()).collect::<Vec<_>>()),
        Some(vec![
            json!({"id":1,"name":"rpc","options":{},"use":{"json":true,"callbacks":true}}),
            json!({"id":2,"name":"pubsub","options":{},"use":{"json":true}}),
        ])
    );
    assert!(body.starts_with(r#"[{"params":{"id":1,"name":"rpc","options":{},"use":{"json":true,"callbacks":true}},"handler":"function (client) {"#));

    exchange(
        &mut c,
        r#"1|1|{"m":"wsgate.subscribe","p":["news.*"]}"#,
        r#"1|1|{"p":[true]}"#,
    )
    .await;
    exchange(
        &mut c,
        r#"1|2|{"m":"wsgate.subscribe","p":["news.a"]}"#,
        r#"1|2|{"p":[true]}"#,
    )
    .await;
    assert_eq!(redis.numsub("news.a").await, 1);
    // Both subscriptions match (Redis counts the node twice): the event fires once.
    assert_eq!(redis.publish("news.a", br#"{"x":[1,"|"]}"#).await, 2);
    assert_eq!(
        c.recv_text().await,
        r#"2|{"e":"news.a","p":[{"x":[1,"|"]}]}"#
    );
    redis.publish("news.b", b"plain <text>").await;
    assert_eq!(
        c.recv_text().await,
        r#"2|{"e":"news.b","p":["plain <text>"]}"#
    );
    redis.publish("news.b", b"\xffx").await;
    assert_eq!(
        c.recv_text().await,
        "2|{\"e\":\"news.b\",\"p\":[\"\u{fffd}x\"]}"
    );
    exchange(
        &mut c,
        r#"1|3|{"m":"wsgate.subscribe","p":["news.a"]}"#,
        r#"1|3|{"e":{"message":"already subscribed"}}"#,
    )
    .await;
    exchange(
        &mut c,
        r#"1|4|{"m":"wsgate.unsubscribe","p":["news.a"]}"#,
        r#"1|4|{"p":[true]}"#,
    )
    .await;
    redis.wait_numsub("news.a", 0).await;
    exchange(
        &mut c,
        r#"1|5|{"m":"wsgate.unsubscribe","p":["news.a"]}"#,
        r#"1|5|{"e":{"message":"not subscribed"}}"#,
    )
    .await;
    // Other methods are calls to services: this connection has no call right.
    exchange(
        &mut c,
        r#"1|6|{"m":"demo.square","p":[5]}"#,
        r#"1|6|{"e":{"message":"not allowed"}}"#,
    )
    .await;
    d.expect_silence(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_is_subscribed_on_connect_to_the_configured_channels() {
    let redis = Redis::start().await;
    let mut config = test_config(Some(redis.url()));
    config.socketstream_channels = vec!["alerts".into(), "feed.*".into(), "secret".into()];
    config.allow = Some(vec!["alerts".into(), "feed.*".into()]);
    let gw = Gateway::start(config).await;
    let mut c = ss(&gw).await;
    // Refused by the ACL: told on the system service; the others hold.
    assert_eq!(
        c.recv_text().await,
        r#"0||{"type":"error","message":"cannot subscribe to secret: not allowed"}"#
    );
    redis.wait_numsub("alerts", 1).await;
    wait_until("NUMPAT 1", WAIT, || async { redis.numpat().await == 1 }).await;
    redis.publish("alerts", b"fire").await;
    assert_eq!(c.recv_text().await, r#"2|{"e":"alerts","p":["fire"]}"#);
    redis.publish("feed.x", b"[1]").await;
    assert_eq!(c.recv_text().await, r#"2|{"e":"feed.x","p":[[1]]}"#);
    // A second connection shares the node's subscriptions.
    let mut d = ss(&gw).await;
    assert_eq!(
        d.recv_text().await,
        r#"0||{"type":"error","message":"cannot subscribe to secret: not allowed"}"#
    );
    exchange(
        &mut d,
        r#"1|1|{"m":"wsgate.subscribe","p":["alerts"]}"#,
        r#"1|1|{"e":{"message":"already subscribed"}}"#,
    )
    .await;
    assert_eq!(redis.numsub("alerts").await, 1);
    assert_eq!(redis.publish("alerts", b"2").await, 1);
    for s in [&mut c, &mut d] {
        assert_eq!(s.recv_text().await, r#"2|{"e":"alerts","p":[2]}"#);
    }
    drop(c);
    drop(d);
    redis.wait_numsub("alerts", 0).await;
}

/// Malformed frames: (what, frame, exact answer).
fn malformed() -> Vec<(&'static str, Message, &'static str)> {
    let text = |s: &'static str| Message::Text(s.into());
    vec![
        (
            "no separator",
            text("hello"),
            r#"0||{"type":"error","message":"malformed frame: expected <serviceId>|[<callbackId>|]<payload>"}"#,
        ),
        (
            "unknown service id",
            text("7|1|{}"),
            r#"0||{"type":"error","message":"unknown service id \"7\": expected 0 (system), 1 (rpc) or 2 (pubsub)"}"#,
        ),
        (
            "missing callback slot",
            text(r#"1|{"m":"wsgate.subscribe","p":["a"]}"#),
            r#"0||{"type":"error","message":"service 1 (rpc) needs a callback slot: 1|<callbackId>|<payload>"}"#,
        ),
        (
            "callback not a number",
            text(r#"0|abc|{"c":"connect"}"#),
            r#"0||{"type":"error","message":"invalid callback id \"abc\": expected a positive whole number"}"#,
        ),
        (
            "bad JSON for rpc",
            text("1|1|{nope"),
            r#"0||{"type":"error","message":"invalid JSON for service 1 (rpc): key must be a string at line 1 column 2"}"#,
        ),
        (
            "bad JSON for system",
            text("0|1|"),
            r#"0||{"type":"error","message":"invalid JSON for service 0 (_system): EOF while parsing a value at line 1 column 0"}"#,
        ),
        (
            "unknown system command",
            text(r#"0|1|{"c":"reboot"}"#),
            r#"0||{"type":"error","message":"unknown system command \"reboot\": expected connect or discover"}"#,
        ),
        (
            "system message without c",
            text(r#"0|1|{"v":"0.0.1"}"#),
            r#"0||{"type":"error","message":"a system message needs \"c\": connect or discover"}"#,
        ),
        (
            "a push to pubsub",
            text(r#"2|{"e":"x","p":[]}"#),
            r#"0||{"type":"error","message":"service 2 (pubsub) takes no messages from clients: subscribe with rpc wsgate.subscribe"}"#,
        ),
        (
            "binary, not UTF-8",
            Message::Binary(vec![0xff, b'|'].into()),
            r#"0||{"type":"error","message":"frames must be UTF-8 text"}"#,
        ),
        (
            "rpc without a method",
            text(r#"1|9|{"p":["a"]}"#),
            r#"1|9|{"e":{"message":"missing method name \"m\""}}"#,
        ),
        (
            "subscribe with two arguments",
            text(r#"1|10|{"m":"wsgate.subscribe","p":["a","b"]}"#),
            r#"1|10|{"e":{"message":"wsgate.subscribe takes one argument: a channel or a pattern"}}"#,
        ),
        (
            "system payload not an object",
            text(r#"0|3|["connect"]"#),
            r#"0||{"type":"error","message":"service 0 (_system) takes a JSON object"}"#,
        ),
        (
            "rpc payload not an object",
            text("1|11|[1]"),
            r#"0||{"type":"error","message":"service 1 (rpc) takes a JSON object"}"#,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_are_answered_and_nobody_is_harmed() {
    let redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let mut other = ss(&gw).await;
    exchange(
        &mut other,
        r#"1|1|{"m":"wsgate.subscribe","p":["chat"]}"#,
        r#"1|1|{"p":[true]}"#,
    )
    .await;
    let mut bad = ss(&gw).await;
    let cases = malformed();
    assert!(cases.len() >= 10);
    bad.expect_answers(cases).await;
    exchange(
        &mut bad,
        r#"1|12|{"m":"wsgate.subscribe","p":["chat"]}"#,
        r#"1|12|{"p":[true]}"#,
    )
    .await;
    redis.publish("chat", b"ok").await;
    for c in [&mut other, &mut bad] {
        assert_eq!(c.recv_text().await, r#"2|{"e":"chat","p":["ok"]}"#);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_are_pubsub_events_with_the_topics() {
    let mut redis = Redis::start().await;
    let mut config = test_config(Some(redis.url()));
    config.max_delivery_bytes = NonZeroUsize::new(64).unwrap();
    let gw = Gateway::start(config).await;
    let mut c = ss(&gw).await;
    exchange(
        &mut c,
        r#"1|1|{"m":"wsgate.subscribe","p":["big"]}"#,
        r#"1|1|{"p":[true]}"#,
    )
    .await;
    redis.publish("big", &[b'x'; 100]).await;
    assert_eq!(
        c.recv_text().await,
        r#"2|{"e":"wsgate:interrupted","p":[["big"],"message too large"]}"#
    );
    assert_eq!(
        c.recv_text().await,
        r#"2|{"e":"wsgate:resumed","p":[["big"]]}"#
    );
    redis.kill();
    assert_eq!(
        c.recv_text().await,
        r#"2|{"e":"wsgate:interrupted","p":[["big"],"broker connection lost"]}"#
    );
    redis.restart().await;
    assert_eq!(
        c.recv_text().await,
        r#"2|{"e":"wsgate:resumed","p":[["big"]]}"#
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prism_style_client_runs_the_handed_out_handlers_across_dialects() {
    let redis = Redis::start().await;
    let mut config = test_config(Some(redis.url()));
    config.client_publish = vec!["room".into()];
    let gw = Gateway::start(config).await;
    let url = format!("ws://{}{PATH}", gw.addr);
    let mut s = Script::spawn(
        "socketstream_client.js",
        &["--url", &url, "--subscribe", "room"],
    );
    let connected = s.expect("connected").await;
    assert_eq!(connected["version"], "0.0.1");
    assert_eq!(connected["sessionId"].as_str().map(str::len), Some(32));
    let discovered = s.expect("discovered").await;
    assert_eq!(discovered["services"][1]["name"], "pubsub");
    let subscribed = s.expect("subscribed").await;
    assert_eq!(subscribed["args"], json!([true]));
    s.expect("ready").await;
    // A native and a RoadRunner client on the same channel: one Redis subscription.
    let mut native = gw.client().await;
    native.subscribe("room").await;
    let mut road = Client::connect(gw.addr, "/roadrunner").await;
    road.send_text(r#"{"command":"join","topics":["room"]}"#)
        .await;
    assert_eq!(
        road.recv_text().await,
        r#"{"topic":"@join","payload":["room"]}"#
    );
    assert_eq!(redis.numsub("room").await, 1);

    // redis-cli PUBLISH reaches all three.
    redis.publish("room", br#"{"who":"redis"}"#).await;
    let got = s.expect("pubsub").await;
    assert_eq!(
        got,
        json!({"event":"pubsub","name":"room","args":[{"who":"redis"}]})
    );
    assert_eq!(
        road.recv_text().await,
        r#"{"topic":"room","payload":"{\"who\":\"redis\"}"}"#
    );
    native.recv_text().await;
    // RoadRunner's HTTP publish reaches the SocketStream client.
    let (status, _) = http(
        gw.addr,
        "POST",
        "/roadrunner/publish",
        Some(r#"{"messages":[{"topics":["room"],"payload_text":"from php"}]}"#),
    )
    .await;
    assert_eq!(status, 200);
    let got = s.expect("pubsub").await;
    assert_eq!(got["args"], json!(["from php"]));
    // A native client's publish too.
    native
        .send_text(r#"{"action":"publish","channel":"room","payload":[1,2]}"#)
        .await;
    let got = s.expect("pubsub").await;
    assert_eq!(got["args"], json!([[1, 2]]));
    // The handed-out rpc handler calls back with the responder's arguments.
    s.send(json!({"cmd":"rpc","method":"wsgate.unsubscribe","params":["room"],"ref":"u"}))
        .await;
    let unsub = s.expect("rpc").await;
    assert_eq!(unsub, json!({"event":"rpc","ref":"u","args":[true]}));
    assert_eq!(
        redis.numsub("room").await,
        1,
        "native and RoadRunner still hold it"
    );
    drop(native);
    drop(road);
    redis.wait_numsub("room", 0).await;
}

/// An rpc call to an application service (`<service>.<method>`, the method
/// may hold dots) is a call through the session: refused `not allowed`
/// without a call right (`WSGATE_CALL_ALLOW` here), handed to the router
/// with one (no instance registered: `no such service`), answered on its
/// callback in rpc's `{"e":..}` shape, by raw frames and by the handed-out
/// handler in Node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_to_a_service_is_a_call_with_the_call_rights() {
    let redis = Redis::start().await;
    let mut config = test_config(Some(redis.url()));
    config.call_allow = vec!["billing:*".into()];
    let gw = Gateway::start(config).await;
    let mut c = ss(&gw).await;
    for (frame, want) in [
        (
            r#"1|1|{"m":"billing.charge","p":[5]}"#,
            r#"1|1|{"e":{"message":"no such service"}}"#,
        ),
        (
            r#"1|2|{"m":"billing.charge.v2","p":[]}"#,
            r#"1|2|{"e":{"message":"no such service"}}"#,
        ),
        (
            r#"1|3|{"m":"payroll.run","p":[1]}"#,
            r#"1|3|{"e":{"message":"not allowed"}}"#,
        ),
        (
            r#"1||{"m":"payroll.run"}"#,
            r#"1||{"e":{"message":"not allowed"}}"#,
        ),
        (
            r#"1|4|{"m":"wsgate.publish","p":["x"]}"#,
            r#"1|4|{"e":{"message":"no such method"}}"#,
        ),
        (
            r#"1|5|{"m":"billing","p":[]}"#,
            r#"1|5|{"e":{"message":"method \"billing\" must be <service>.<method>"}}"#,
        ),
        (
            r#"1|6|{"m":"billing.charge","p":{"amount":5}}"#,
            r#"1|6|{"e":{"message":"billing.charge takes its arguments as an array \"p\""}}"#,
        ),
    ] {
        exchange(&mut c, frame, want).await;
    }
    assert_eq!(
        metric_value(
            gw.addr,
            r#"wsgate_refused_total{reason="call_not_allowed"}"#
        )
        .await,
        Some(2.0)
    );
    // The real client: an rpc error reaches no callback; the handler logs it.
    let url = format!("ws://{}{PATH}", gw.addr);
    let mut s = Script::spawn("socketstream_client.js", &["--url", &url]);
    s.expect("ready").await;
    s.send(json!({"cmd":"rpc","method":"billing.charge","params":[5],"ref":"b"}))
        .await;
    let logged = s.expect("console_error").await;
    assert_eq!(logged["message"], "rpc billing.charge: no such service");
    s.send(json!({"cmd":"rpc","method":"payroll.run","params":[],"ref":"p"}))
        .await;
    let logged = s.expect("console_error").await;
    assert_eq!(logged["message"], "rpc payroll.run: not allowed");
    let (status, _) = s.finish(WAIT).await;
    assert!(status.success());
    drop(c);
    gw.stop().await;
}

/// The service key of the rpc tests' service process.
const SERVICE_KEY: &str = "socketstream-test-service-key";

/// rpc through the registry, across nodes: a service process registered on
/// node A, the real Prism-style client on node B. The service receives the
/// arguments as the client sent them; its result reaches the handed-out
/// handler's callback as the responder's argument, its error reaches
/// `console.error`; a method with dots is the method after the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_reaches_a_registered_service_on_another_node() {
    let redis = Redis::start().await;
    let mut config = test_config(Some(redis.url()));
    config.call_allow = vec!["billing:*".into()];
    config.service_key =
        Config::from_vars([("WSGATE_SERVICE_KEY".to_owned(), SERVICE_KEY.to_owned())])
            .unwrap()
            .service_key;
    let mut ca = config.clone();
    ca.node_id = "ss-a".into();
    let mut cb = config;
    cb.node_id = "ss-b".into();
    let a = Gateway::start(ca).await;
    let b = Gateway::start(cb).await;
    let bearer = format!("Bearer {SERVICE_KEY}");
    let mut service = Client::try_connect(a.addr, "/services", &[("authorization", &bearer)])
        .await
        .unwrap_or_else(|r| panic!("service refused: {r:?}"));
    service
        .send_text(r#"{"type":"register","name":"billing","version":"1.0.0","methods":["charge","charge.v2"]}"#)
        .await;
    let registered: Value = serde_json::from_str(&service.recv_text().await).unwrap();
    assert_eq!(registered["type"], "registered", "{registered}");
    // Node B knows billing once a method it lacks is "no such method".
    let mut probe = ss(&b).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    for n in 1.. {
        probe
            .send_text(&format!(r#"1|{n}|{{"m":"billing.refund","p":[]}}"#))
            .await;
        let answer = probe.recv_text().await;
        if answer == format!(r#"1|{n}|{{"e":{{"message":"no such method"}}}}"#) {
            break;
        }
        assert_eq!(
            answer,
            format!(r#"1|{n}|{{"e":{{"message":"no such service"}}}}"#)
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "node B never saw billing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let url = format!("ws://{}{PATH}", b.addr);
    let mut s = Script::spawn("socketstream_client.js", &["--url", &url]);
    s.expect("ready").await;
    s.send(
        json!({"cmd":"rpc","method":"billing.charge","params":[5,"eur",{"card":"4242"}],"ref":"c"}),
    )
    .await;
    assert_eq!(
        service.recv_text().await,
        r#"{"type":"message","id":"1","destination":"billing:charge","payload":[5,"eur",{"card":"4242"}]}"#
    );
    service
        .send_text(r#"{"type":"reply","id":"1","payload":{"charged":5,"currency":"eur"}}"#)
        .await;
    let replied = s.expect("rpc").await;
    assert_eq!(
        replied,
        json!({"event":"rpc","ref":"c","args":[{"charged":5,"currency":"eur"}]})
    );
    // A method with a dot; the service's error.
    s.send(json!({"cmd":"rpc","method":"billing.charge.v2","params":[],"ref":"v2"}))
        .await;
    assert_eq!(
        service.recv_text().await,
        r#"{"type":"message","id":"2","destination":"billing:charge.v2","payload":[]}"#
    );
    service
        .send_text(r#"{"type":"reply","id":"2","error":{"code":402,"message":"card declined"}}"#)
        .await;
    let logged = s.expect("console_error").await;
    assert_eq!(logged["message"], "rpc billing.charge.v2: card declined");
    // By raw frames, the same byte for byte.
    probe
        .send_text(r#"1|90|{"m":"billing.charge","p":[1]}"#)
        .await;
    assert_eq!(
        service.recv_text().await,
        r#"{"type":"message","id":"3","destination":"billing:charge","payload":[1]}"#
    );
    service
        .send_text(r#"{"type":"reply","id":"3","payload":"ok"}"#)
        .await;
    assert_eq!(probe.recv_text().await, r#"1|90|{"p":["ok"]}"#);
    let (status, _) = s.finish(WAIT).await;
    assert!(status.success());
    drop((probe, service));
    a.stop().await;
    b.stop().await;
}
