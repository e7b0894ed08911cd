//! Services across nodes (issue 12): registration, calls from one node to an
//! instance on another, load sharing, the lifecycle events, failures
//! (instance gone, node killed, no reply), refusals; on real Redis, and on
//! the embedded broker.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use wsgate::Config;

const KEY: &str = "service-key-0123456789";

fn config(redis: Option<&Redis>, node: &str) -> Config {
    Config {
        node_id: node.to_owned(),
        service_key: Some(secret(KEY)),
        call_allow: vec!["*".into()],
        service_lease: Duration::from_millis(1000),
        ..test_config(redis.map(Redis::url))
    }
}

fn secret(key: &str) -> wsgate::config::Secret {
    // The config's own parser builds secrets: go through it.
    Config::from_vars([("WSGATE_SERVICE_KEY".to_owned(), key.to_owned())])
        .expect("config")
        .service_key
        .expect("key")
}

/// The next frame within `d`; `None` when the connection ended or nothing
/// came.
async fn next_within(client: &mut Client, d: Duration) -> Option<Message> {
    use futures_util::StreamExt;
    match tokio::time::timeout(d, client.ws.next()).await {
        Ok(Some(Ok(m))) => Some(m),
        _ => None,
    }
}

/// A service (or consumer) process on `/services`.
struct Process {
    client: Client,
}

impl Process {
    async fn connect(addr: SocketAddr) -> Process {
        let auth = format!("Bearer {KEY}");
        let client = Client::try_connect(addr, "/services", &[("Authorization", &auth)])
            .await
            .expect("services upgrade");
        Process { client }
    }

    /// Registers and returns the `registered` reply's instance id, after
    /// checking the reply byte for byte.
    async fn register(&mut self, name: &str, methods: &[&str], node: &str) -> String {
        self.client
            .send_json(json!({"type":"register","name":name,"version":"1.2.0","methods":methods}))
            .await;
        let text = self.client.recv_text().await;
        let v: Value = serde_json::from_str(&text).expect("json");
        let instance = v["instance"].as_str().expect("instance").to_owned();
        assert!(instance.starts_with(&format!("{node}.")), "{instance}");
        assert_eq!(
            text,
            format!(
                r#"{{"type":"registered","name":"{name}","version":"1.2.0","instance":"{instance}","node":"{node}"}}"#
            )
        );
        instance
    }

    /// Answers the next call with its own payload wrapped, returning the call.
    async fn answer_one(&mut self, tag: &str) -> Value {
        let call = self.client.recv().await;
        assert_eq!(call["type"], "message", "{call}");
        let reply =
            json!({"type":"reply","id":call["id"],"payload":{"echo":call["payload"],"by":tag}});
        self.client.send_json(reply).await;
        call
    }
}

/// A native call from `client`; returns the raw answer.
async fn call(client: &mut Client, service: &str, method: &str, params: Value, id: &str) -> String {
    client
        .send_json(
            json!({"action":"call","service":service,"method":method,"params":params,"id":id}),
        )
        .await;
    client.recv_text().await
}

async fn two_nodes(redis: &Redis) -> (Gateway, Gateway) {
    let a = Gateway::start(config(Some(redis), "node-a")).await;
    let b = Gateway::start(config(Some(redis), "node-b")).await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_on_one_node_reaches_an_instance_on_another() {
    let redis = Redis::start().await;
    let (a, b) = two_nodes(&redis).await;
    let mut service = Process::connect(a.addr).await;
    service
        .register("billing", &["charge", "refund"], "node-a")
        .await;
    let mut caller = b.client().await;
    let answering = tokio::spawn(async move {
        let call = service.answer_one("a").await;
        (service, call)
    });
    let got = call(&mut caller, "billing", "charge", json!({"amount":3}), "c9").await;
    assert_eq!(
        got,
        r#"{"action":"call","id":"c9","status":true,"result":{"by":"a","echo":{"amount":3}}}"#
    );
    let (service, seen) = answering.await.unwrap();
    assert_eq!(seen["destination"], "billing:charge");
    assert_eq!(seen["payload"], json!({"amount":3}));
    // Unknown method: refused at once, no instance bothered.
    let got = call(&mut caller, "billing", "void", json!(null), "c10").await;
    assert_eq!(
        got,
        r#"{"action":"call","id":"c10","status":false,"error":"no such method","code":404}"#
    );
    let got = call(&mut caller, "shipping", "send", json!(null), "c11").await;
    assert_eq!(
        got,
        r#"{"action":"call","id":"c11","status":false,"error":"no such service","code":404}"#
    );
    let metrics = b.metrics().await;
    assert!(
        metrics.contains("wsgate_calls_total{outcome=\"ok\"} 1"),
        "{metrics}"
    );
    drop((service, caller));
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_on_two_nodes_share_300_calls() {
    let redis = Redis::start().await;
    let (a, b) = two_nodes(&redis).await;
    let mut watcher = b.client().await;
    watcher.subscribe("/wsgate/services/connect").await;
    let mut instances = Vec::new();
    for (gw, node) in [(&a, "node-a"), (&a, "node-a"), (&b, "node-b")] {
        let mut p = Process::connect(gw.addr).await;
        let id = p.register("echo", &["echo"], node).await;
        instances.push((id, p));
    }
    // Every instance answers until told to stop; each counts what it took.
    let mut counters = Vec::new();
    for (id, mut p) in instances {
        counters.push(tokio::spawn(async move {
            let mut n = 0u32;
            loop {
                let call = p.client.recv().await;
                if call["payload"] == json!("stop") {
                    return (id, n, p);
                }
                n += 1;
                let reply = json!({"type":"reply","id":call["id"],"payload":call["payload"]});
                p.client.send_json(reply).await;
            }
        }));
    }
    let mut caller = b.client().await;
    // B's view learns A's instances from the connect events B receives.
    for _ in 0..3 {
        let _ = event(&mut watcher, "connect").await;
    }
    for i in 0..300 {
        let got = call(&mut caller, "echo", "echo", json!(i), &i.to_string()).await;
        assert_eq!(
            got,
            format!(r#"{{"action":"call","id":"{i}","status":true,"result":{i}}}"#)
        );
    }
    // Each instance gets one "stop": three rounds of the rotation.
    let stoppers: Vec<_> = (0..3)
        .map(|k| {
            json!({"action":"call","service":"echo","method":"echo","params":"stop","id":format!("s{k}"),"timeout_ms":200})
        })
        .collect();
    for s in stoppers {
        caller.send_json(s).await;
    }
    let mut counts = HashMap::new();
    for c in counters {
        let (id, n, p) = c.await.unwrap();
        counts.insert(id, n);
        drop(p);
    }
    assert_eq!(counts.values().sum::<u32>(), 300);
    assert!(
        counts.values().all(|n| *n > 0),
        "an instance got no call: {counts:?}"
    );
    drop(caller);
    a.stop().await;
    b.stop().await;
}

/// Reads events from a native client subscribed to `/wsgate/services/*`
/// until the sentinel arrives; returns them as (event, service).
async fn events_until_sentinel(client: &mut Client, redis: &Redis) -> Vec<(String, String)> {
    redis.publish("/wsgate/services/sentinel", b"{}").await;
    let mut events = Vec::new();
    loop {
        let v = client.recv().await;
        let channel = v["channel"].as_str().unwrap_or_default().to_owned();
        let event = channel.trim_start_matches("/wsgate/services/").to_owned();
        if event == "sentinel" {
            return events;
        }
        events.push((
            event,
            v["payload"]["service"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        ));
    }
}

/// Waits for the next event named `want`, returning the ones before it too.
async fn event(client: &mut Client, want: &str) -> Value {
    loop {
        let v = client.recv().await;
        if v["channel"] == format!("/wsgate/services/{want}") {
            return v;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_fires_once_per_transition() {
    let redis = Redis::start().await;
    let (a, b) = two_nodes(&redis).await;
    let mut watcher = a.client().await;
    watcher.psubscribe("/wsgate/services/*").await;
    // Two instances start at once on two nodes: one online, two connects.
    let (mut p1, mut p2) = tokio::join!(Process::connect(a.addr), Process::connect(b.addr));
    let (i1, i2) = tokio::join!(
        p1.register("billing", &["charge"], "node-a"),
        p2.register("billing", &["charge"], "node-b")
    );
    let mut seen = events_until_sentinel(&mut watcher, &redis).await;
    seen.sort();
    assert_eq!(
        seen,
        [
            ("connect".to_owned(), "billing".to_owned()),
            ("connect".to_owned(), "billing".to_owned()),
            ("online".to_owned(), "billing".to_owned()),
        ]
    );
    // The payload names the instance and its node.
    // A broadcast reaches the other process and the channel, once.
    p1.client
        .send_json(json!({"type":"broadcast","payload":{"hello":1}}))
        .await;
    let got = p2.client.recv_text().await;
    assert_eq!(
        got,
        format!(
            r#"{{"type":"broadcast","instance":"{i1}","node":"node-a","service":"billing","version":"1.2.0","payload":{{"hello":1}}}}"#
        )
    );
    let v = event(&mut watcher, "broadcast").await;
    assert_eq!(v["payload"]["payload"], json!({"hello":1}));
    // A call nobody can take: unhandled, once.
    let mut caller = b.client().await;
    let got = call(&mut caller, "ghost", "boo", json!(null), "g").await;
    assert!(got.contains("no such service"), "{got}");
    let v = event(&mut watcher, "unhandled").await;
    assert_eq!(
        v["payload"],
        json!({"service":"ghost","version":null,"instance":null,"node":"node-b","destination":"ghost:boo"})
    );
    // One instance leaves: a disconnect, no offline; the last: both.
    drop(p1);
    let v = event(&mut watcher, "disconnect").await;
    assert_eq!(v["payload"]["instance"], i1);
    drop(p2);
    let v = event(&mut watcher, "disconnect").await;
    assert_eq!(v["payload"]["instance"], i2);
    let v = event(&mut watcher, "offline").await;
    assert_eq!(v["payload"]["instance"], i2);
    assert_eq!(
        events_until_sentinel(&mut watcher, &redis).await,
        Vec::<(String, String)>::new(),
        "nothing fired twice"
    );
    drop((watcher, caller));
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_goes_away_fails_its_calls_at_once() {
    let redis = Redis::start().await;
    let (a, b) = two_nodes(&redis).await;
    let mut service = Process::connect(a.addr).await;
    service.register("slow", &["wait"], "node-a").await;
    let mut caller = b.client().await;
    caller
        .send_json(json!({"action":"call","service":"slow","method":"wait","params":1,"id":"w1"}))
        .await;
    // The service receives it, then disconnects without replying.
    let got = service.client.recv().await;
    assert_eq!(got["type"], "message");
    let started = std::time::Instant::now();
    drop(service);
    let got = caller.recv_text().await;
    assert_eq!(
        got,
        r#"{"action":"call","id":"w1","status":false,"error":"service gone","code":503}"#
    );
    assert!(started.elapsed() < Duration::from_secs(5), "not a timeout");
    drop(caller);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_no_right_too_large_flood_and_no_reply() {
    let redis = Redis::start().await;
    let strict = Config {
        call_allow: vec!["open:*".into()],
        max_call_bytes: std::num::NonZeroUsize::new(64).unwrap(),
        max_calls_in_flight: std::num::NonZeroUsize::new(2).unwrap(),
        ..config(Some(&redis), "node-a")
    };
    let a = Gateway::start(strict).await;
    let mut service = Process::connect(a.addr).await;
    service.register("open", &["mute"], "node-a").await;
    let mut caller = a.client().await;
    // No call right.
    let got = call(&mut caller, "billing", "charge", json!(null), "n").await;
    assert_eq!(
        got,
        r#"{"action":"call","id":"n","status":false,"error":"not allowed","code":403}"#
    );
    // Too large.
    let got = call(&mut caller, "open", "mute", json!("x".repeat(100)), "big").await;
    assert_eq!(
        got,
        r#"{"action":"call","id":"big","status":false,"error":"payload too large","code":413}"#
    );
    // A service that never replies: the deadline the caller asked for.
    caller
        .send_json(json!({"action":"call","service":"open","method":"mute","params":1,"id":"t1","timeout_ms":300}))
        .await;
    caller
        .send_json(json!({"action":"call","service":"open","method":"mute","params":2,"id":"t2","timeout_ms":300}))
        .await;
    // A flood: the third in flight is refused at once.
    let got = call(&mut caller, "open", "mute", json!(3), "t3").await;
    assert_eq!(
        got,
        r#"{"action":"call","id":"t3","status":false,"error":"too many calls in flight","code":429}"#
    );
    let mut ends = vec![caller.recv_text().await, caller.recv_text().await];
    ends.sort();
    assert_eq!(
        ends,
        [
            r#"{"action":"call","id":"t1","status":false,"error":"timeout","code":408}"#,
            r#"{"action":"call","id":"t2","status":false,"error":"timeout","code":408}"#,
        ]
    );
    // The service's late reply is dropped and counted.
    let call1 = service.client.recv().await;
    service
        .client
        .send_json(json!({"type":"reply","id":call1["id"],"payload":1}))
        .await;
    let addr = a.addr;
    wait_until("late reply counted", WAIT, || async move {
        http(addr, "GET", "/metrics", None)
            .await
            .1
            .contains("wsgate_call_late_replies_total 1")
    })
    .await;
    drop((service, caller));
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_services_endpoint_checks_its_credential_and_its_messages() {
    let redis = Redis::start().await;
    let a = Gateway::start(config(Some(&redis), "node-a")).await;
    for headers in [
        vec![],
        vec![("Authorization", "Bearer wrong-key-0123456789")],
    ] {
        let refused = Client::try_connect(a.addr, "/services", &headers)
            .await
            .err()
            .expect("refused");
        assert_eq!(refused.status, 401);
        assert_eq!(
            refused.error(),
            "a service key or a token with a services claim is required"
        );
    }
    // ?key= works as the header does.
    let mut p = Process {
        client: Client::try_connect(a.addr, &format!("/services?key={KEY}"), &[])
            .await
            .expect("key in the query"),
    };
    p.client
        .expect_answers(vec![
            (
                "not JSON",
                Message::text("nope"),
                r#"{"type":"error","message":"invalid message: expected ident at line 1 column 2"}"#,
            ),
            (
                "call before register",
                Message::text(r#"{"type":"message","id":"m","destination":"a:b"}"#),
                r#"{"type":"error","id":"m","message":"register first"}"#,
            ),
            (
                "reserved name",
                Message::text(r#"{"type":"register","name":"wsgate","methods":["x"]}"#),
                r#"{"type":"error","message":"the name wsgate is reserved"}"#,
            ),
            (
                "bad name",
                Message::text(r#"{"type":"register","name":"a b","methods":["x"]}"#),
                r#"{"type":"error","message":"invalid name: expected 1 to 64 of A-Z a-z 0-9 _ -"}"#,
            ),
            (
                "unknown type",
                Message::text(r#"{"type":"jump","id":"j"}"#),
                r#"{"type":"error","id":"j","message":"unknown type \"jump\": expected register, message, reply, broadcast or subscribe"}"#,
            ),
            (
                "binary",
                Message::binary(vec![1u8]),
                r#"{"type":"error","message":"binary frames are not supported: send JSON text"}"#,
            ),
        ])
        .await;
    // A consumer (no methods) registers, is not announced, and calls.
    p.register("web", &[], "node-a").await;
    let mut service = Process::connect(a.addr).await;
    service.register("billing", &["charge"], "node-a").await;
    p.client
        .send_json(json!({"type":"message","id":"u1","destination":"billing:charge","responder":"cb","payload":[1]}))
        .await;
    let seen = service.client.recv_text().await;
    let v: Value = serde_json::from_str(&seen).unwrap();
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(
        seen,
        format!(
            r#"{{"type":"message","id":"{id}","destination":"billing:charge","consumer":"web","responder":"cb","payload":[1]}}"#
        )
    );
    service
        .client
        .send_json(json!({"type":"reply","id":id,"error":{"code":17,"message":"card declined"}}))
        .await;
    assert_eq!(
        p.client.recv_text().await,
        r#"{"type":"reply","id":"u1","responder":"cb","error":{"code":17,"message":"card declined"}}"#
    );
    drop((p, service));
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_takes_its_instances_within_one_lease() {
    let redis = Redis::start().await;
    let env = [
        ("WSGATE_REDIS_URL", redis.url()),
        ("WSGATE_NODE_ID", "node-k".to_owned()),
        ("WSGATE_SERVICE_KEY", KEY.to_owned()),
        ("WSGATE_CALL_ALLOW", "*".to_owned()),
        ("WSGATE_SERVICE_LEASE_MS", "1000".to_owned()),
    ];
    let mut doomed = GatewayProcess::spawn(&env).await;
    let b = Gateway::start(config(Some(&redis), "node-b")).await;
    let mut watcher = b.client().await;
    watcher.psubscribe("/wsgate/services/*").await;
    let mut on_k = Process::connect(doomed.addr).await;
    on_k.register("echo", &["echo"], "node-k").await;
    let mut on_b = Process::connect(b.addr).await;
    on_b.register("echo", &["echo"], "node-b").await;
    // on_k never answers; on_b answers everything.
    let answering = tokio::spawn(async move {
        loop {
            let Some(Message::Text(t)) =
                next_within(&mut on_b.client, Duration::from_secs(30)).await
            else {
                return;
            };
            let call: Value = serde_json::from_str(t.as_str()).unwrap();
            let reply = json!({"type":"reply","id":call["id"],"payload":"b"});
            on_b.client.send_json(reply).await;
        }
    });
    let mut caller = b.client().await;
    // Calls in flight to node-k when it dies end within their deadline.
    for i in 0..4 {
        caller
            .send_json(json!({"action":"call","service":"echo","method":"echo","params":i,"id":format!("k{i}"),"timeout_ms":1500}))
            .await;
    }
    let _ = on_k.client.recv().await; // node-k got at least one
    signal(doomed.pid(), "KILL");
    let _ = doomed.child.wait();
    let started = std::time::Instant::now();
    let mut ends = Vec::new();
    for _ in 0..4 {
        let v = caller.recv().await;
        ends.push(v);
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "within the deadline"
    );
    for v in &ends {
        let ok = v["status"] == true && v["result"] == "b";
        let failed =
            v["status"] == false && (v["error"] == "timeout" || v["error"] == "service gone");
        assert!(ok || failed, "{v}");
    }
    assert!(
        ends.iter().any(|v| v["status"] == false),
        "node-k had some: {ends:?}"
    );
    // Within one lease the dead instance is reaped: a disconnect naming it.
    let v = event(&mut watcher, "disconnect").await;
    assert_eq!(v["payload"]["node"], "node-k");
    // Every next call goes to node-b's instance.
    for i in 0..10 {
        let got = call(&mut caller, "echo", "echo", json!(i), &format!("n{i}")).await;
        assert_eq!(
            got,
            format!(r#"{{"action":"call","id":"n{i}","status":true,"result":"b"}}"#)
        );
    }
    answering.abort();
    drop((caller, watcher, on_k));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_fires_once_when_a_killed_nodes_last_instance_expires() {
    let redis = Redis::start().await;
    let env = [
        ("WSGATE_REDIS_URL", redis.url()),
        ("WSGATE_NODE_ID", "node-k".to_owned()),
        ("WSGATE_SERVICE_KEY", KEY.to_owned()),
        ("WSGATE_SERVICE_LEASE_MS", "1000".to_owned()),
    ];
    let mut doomed = GatewayProcess::spawn(&env).await;
    let b = Gateway::start(config(Some(&redis), "node-b")).await;
    let mut watcher = b.client().await;
    watcher.psubscribe("/wsgate/services/*").await;
    let mut on_k = Process::connect(doomed.addr).await;
    let id = on_k.register("lonely", &["x"], "node-k").await;
    let _ = event(&mut watcher, "online").await;
    signal(doomed.pid(), "KILL");
    let _ = doomed.child.wait();
    let started = std::time::Instant::now();
    let v = event(&mut watcher, "offline").await;
    assert_eq!(v["payload"]["instance"], id.as_str());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "within about one lease"
    );
    assert_eq!(
        events_until_sentinel(&mut watcher, &redis).await,
        Vec::<(String, String)>::new(),
        "offline once"
    );
    drop((watcher, on_k));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_serves_services_in_memory() {
    let a = Gateway::start(config(None, "solo")).await;
    let mut watcher = a.client().await;
    watcher.psubscribe("/wsgate/services/*").await;
    let mut service = Process::connect(a.addr).await;
    let id = service.register("billing", &["charge"], "solo").await;
    let v = event(&mut watcher, "connect").await;
    assert_eq!(
        v["payload"],
        json!({"service":"billing","version":"1.2.0","instance":id,"node":"solo","methods":["charge"]})
    );
    let _ = event(&mut watcher, "online").await;
    let mut caller = a.client().await;
    let answering = tokio::spawn(async move {
        service.answer_one("mem").await;
        service
    });
    let got = call(&mut caller, "billing", "charge", json!(5), "m").await;
    assert_eq!(
        got,
        r#"{"action":"call","id":"m","status":true,"result":{"by":"mem","echo":5}}"#
    );
    drop(answering.await.unwrap());
    let _ = event(&mut watcher, "disconnect").await;
    let _ = event(&mut watcher, "offline").await;
    drop((watcher, caller));
    a.stop().await;
}
