//! Every dialect on one hub and one broker, across two nodes: a native, a
//! Bayeux, a realizehit, a RoadRunner, a SocketStream and an SSE client,
//! spread over two gateways on one real `redis-server`, on channels each of
//! them can name. Messages are published with `PUBLISH` straight to Redis and
//! through every publish path a dialect has (`POST /publish`, a native and a
//! Bayeux client publish, realizehit's and RoadRunner's HTTP publishers);
//! each client must get each message exactly once, in its own shape, byte
//! for byte, and Redis must hold each channel once per node.
//!
//! "Exactly once" is checked without sleeping: after the messages under
//! test, one more is published, and each client's next delivery must be
//! that one (a duplicate would come before it, a loss would show as the
//! wrong message).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;

use common::sse::{subscribed, SseStream};
use common::{http_with, test_config, Client, Gateway, Redis};
use serde_json::{json, Value};
use wsgate::Config;

/// A channel every dialect but realizehit can name (Bayeux's start with `/`).
const SLASHED: &str = "/mix/news";
/// A channel every dialect but Bayeux can name (realizehit's `k:v|k:v`).
const FILTERED: &str = "room:lobby|topic:chat";
/// The publish API key of both nodes.
const KEY: &str = "mix-of-dialects-publish-key";

fn config(redis: &Redis) -> Config {
    let mut c = test_config(Some(redis.url()));
    c.client_publish = vec!["/mix/*".into(), "room:*".into()];
    c.api_key = Config::from_vars([("WSGATE_API_KEY".to_owned(), KEY.to_owned())])
        .expect("config")
        .api_key;
    c
}

// ------------------------------------------------------------ the clients

/// One subscriber, whatever its dialect: subscribed on creation, then read
/// for deliveries only (replies and keepalives skipped).
enum Sub {
    Native(Client),
    Bayeux(Client, String),
    Realizehit(Client),
    RoadRunner(Client),
    SocketStream(Client),
    Sse(SseStream),
}

impl Sub {
    fn name(&self) -> &'static str {
        match self {
            Sub::Native(_) => "native",
            Sub::Bayeux(..) => "bayeux",
            Sub::Realizehit(_) => "realizehit",
            Sub::RoadRunner(_) => "roadrunner",
            Sub::SocketStream(_) => "socketstream",
            Sub::Sse(_) => "sse",
        }
    }

    async fn native(addr: SocketAddr, channel: &str) -> Sub {
        let mut c = Client::connect(addr, "/ws").await;
        c.subscribe(channel).await;
        Sub::Native(c)
    }

    async fn bayeux(addr: SocketAddr, channel: &str) -> Sub {
        let mut c = Client::connect(addr, "/bayeux").await;
        c.send_text(
            r#"[{"channel":"/meta/handshake","version":"1.0","supportedConnectionTypes":["websocket"],"id":"1"}]"#,
        )
        .await;
        let reply: Value = serde_json::from_str(&c.recv_text().await).unwrap();
        let cid = reply[0]["clientId"].as_str().unwrap().to_owned();
        c.send_text(&format!(
            r#"[{{"channel":"/meta/connect","clientId":"{cid}","connectionType":"websocket","id":"2"}}]"#
        ))
        .await;
        let reply: Value = serde_json::from_str(&c.recv_text().await).unwrap();
        assert_eq!(reply[0]["successful"], true, "{reply}");
        c.send_text(&format!(
            r#"[{{"channel":"/meta/subscribe","clientId":"{cid}","subscription":"{channel}","id":"3"}}]"#
        ))
        .await;
        assert_eq!(
            c.recv_text().await,
            format!(
                r#"[{{"channel":"/meta/subscribe","id":"3","successful":true,"clientId":"{cid}","subscription":"{channel}"}}]"#
            )
        );
        Sub::Bayeux(c, cid)
    }

    async fn roadrunner(addr: SocketAddr, channel: &str) -> Sub {
        let mut c = Client::connect(addr, "/roadrunner").await;
        c.send_text(&json!({"command":"join","topics":[channel]}).to_string())
            .await;
        assert_eq!(
            c.recv_text().await,
            format!(r#"{{"topic":"@join","payload":[{}]}}"#, json!(channel))
        );
        Sub::RoadRunner(c)
    }

    async fn socketstream(addr: SocketAddr, channel: &str) -> Sub {
        let mut c = Client::connect(addr, "/socketstream").await;
        c.send_text(r#"0|1|{"c":"connect","v":"0.0.1","sessionId":false}"#)
            .await;
        assert!(c
            .recv_text()
            .await
            .starts_with(r#"0|1|{"version":"0.0.1","sessionId":""#));
        let call = json!({"m":"wsgate.subscribe","p":[channel]});
        c.send_text(&format!("1|1|{call}")).await;
        let reply = c.recv_text().await;
        assert!(reply.starts_with(r#"1|1|{"p":"#), "{reply}");
        Sub::SocketStream(c)
    }

    async fn realizehit(addr: SocketAddr, channel: &str) -> Sub {
        let mut c = Client::connect(addr, "/ws/?EIO=3&transport=websocket").await;
        let open = c.recv_text().await;
        assert!(open.starts_with(r#"0{"sid":""#), "{open}");
        let mut pat = serde_json::Map::new();
        for pair in channel.split('|') {
            let (k, v) = pair.split_once(':').unwrap();
            pat.insert(k.to_owned(), json!(v));
        }
        let req = json!({"id":"s1","act":"sub","pat":pat});
        c.send_text(&format!("4{req}")).await;
        assert_eq!(c.recv_text().await, r#"4{"id":"s1"}"#);
        Sub::Realizehit(c)
    }

    async fn sse(addr: SocketAddr, channel: &str) -> Sub {
        let path = format!("/sse?channel={}", urlencode(channel));
        let mut s = SseStream::open(addr, &path, &[]).await;
        assert_eq!(s.status, 200, "{}", s.head);
        let retry = s.next_event().await.unwrap();
        assert!(retry.starts_with("retry: "), "{retry}");
        assert_eq!(
            s.next_non_heartbeat().await.unwrap(),
            subscribed("channel", channel)
        );
        Sub::Sse(s)
    }

    /// The next delivery, as the client received it.
    async fn next(&mut self) -> String {
        match self {
            Sub::Native(c) | Sub::RoadRunner(c) | Sub::SocketStream(c) => c.recv_text().await,
            Sub::Bayeux(c, _) => loop {
                // Its own publish's acknowledgement is not a delivery.
                let t = c.recv_text().await;
                if !t.contains(r#""successful":"#) {
                    break t;
                }
            },
            Sub::Realizehit(c) => loop {
                let t = c.recv_text().await;
                if t != "3" {
                    break t;
                }
            },
            Sub::Sse(s) => s.next_non_heartbeat().await.expect("the stream ended"),
        }
    }

    /// What this client must receive for `payload` (JSON text) on `channel`.
    fn expected(&self, channel: &str, payload: &str) -> String {
        match self {
            Sub::Native(_) => {
                format!(
                    r#"{{"action":"message","channel":{},"payload":{payload}}}"#,
                    json!(channel)
                )
            }
            Sub::Bayeux(..) => format!(r#"[{{"channel":{},"data":{payload}}}]"#, json!(channel)),
            Sub::Realizehit(_) => format!("4{}?{payload}", md5_id(channel)),
            Sub::RoadRunner(_) => {
                // As Go's encoding/json writes a string: `<>&` escaped.
                let go = json!(payload)
                    .to_string()
                    .replace('<', r"\u003c")
                    .replace('>', r"\u003e")
                    .replace('&', r"\u0026");
                format!(r#"{{"topic":{},"payload":{go}}}"#, json!(channel))
            }
            Sub::SocketStream(_) => format!(r#"2|{{"e":{},"p":[{payload}]}}"#, json!(channel)),
            Sub::Sse(_) => format!(
                "data: {{\"action\":\"message\",\"channel\":{},\"payload\":{payload}}}\n\n",
                json!(channel)
            ),
        }
    }
}

/// realizehit's subscription id: the first 8 hex digits of md5(channel),
/// for the channels of this test (values from `realizehit-pattern-to-id`).
fn md5_id(channel: &str) -> &'static str {
    match channel {
        FILTERED => FILTERED_ID,
        other => panic!("no realizehit id for {other}"),
    }
}

/// md5("room:lobby|topic:chat")[0..8], computed with `md5sum`.
const FILTERED_ID: &str = "64113c75";

// ------------------------------------------------------------ publishers

async fn post(addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
    let auth = format!("Bearer {KEY}");
    http_with(addr, "POST", path, &[("Authorization", &auth)], Some(body)).await
}

/// One way of publishing, and where.
enum Via<'a> {
    Redis,
    HttpPublish(SocketAddr),
    NativeClient(&'a mut Client),
    BayeuxClient(usize),
    RoadRunnerHttp(SocketAddr),
    RealizehitHttp(SocketAddr),
}

async fn publish(via: Via<'_>, subs: &mut [Sub], redis: &Redis, channel: &str, payload: &str) {
    match via {
        Via::Redis => {
            assert_eq!(redis.publish(channel, payload.as_bytes()).await, 2);
        }
        Via::HttpPublish(addr) => {
            let body = format!(r#"{{"channel":{},"payload":{payload}}}"#, json!(channel));
            let (status, text) = post(addr, "/publish", &body).await;
            assert_eq!(status, 200, "{text}");
        }
        Via::NativeClient(c) => {
            let req = format!(
                r#"{{"action":"publish","channel":{},"payload":{payload},"id":"p"}}"#,
                json!(channel)
            );
            c.send_text(&req).await;
            assert_eq!(
                c.recv().await,
                json!({"action":"publish","channel":channel,"id":"p","status":true})
            );
        }
        Via::BayeuxClient(i) => {
            let Sub::Bayeux(c, cid) = &mut subs[i] else {
                panic!("not a Bayeux client")
            };
            let m = format!(
                r#"[{{"channel":{},"clientId":"{cid}","data":{payload},"id":"9"}}]"#,
                json!(channel)
            );
            c.send_text(&m).await;
        }
        Via::RoadRunnerHttp(addr) => {
            let body = json!({"messages":[{"topics":[channel],"payload_text":payload}]});
            let (status, text) = post(addr, "/roadrunner/publish", &body.to_string()).await;
            assert_eq!((status, text.as_str()), (200, r#"{"ok":true}"#));
        }
        Via::RealizehitHttp(addr) => {
            let mut pattern = serde_json::Map::new();
            for pair in channel.split('|') {
                let (k, v) = pair.split_once(':').unwrap();
                pattern.insert(k.to_owned(), json!(v));
            }
            let body = format!(
                r#"{{"pattern":{},"payload":{payload}}}"#,
                Value::Object(pattern)
            );
            let (status, text) = post(addr, "/realizehit/publish", &body).await;
            assert_eq!(
                (status, text.as_str()),
                (200, "Your payload has been queued for delivery")
            );
        }
    }
}

/// Percent-encodes a query value.
fn urlencode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every client of `subs` receives `payload` on `channel`, once, as the next
/// delivery, in its own shape.
async fn all_receive(subs: &mut [Sub], channel: &str, payload: &str) {
    for s in subs.iter_mut() {
        let want = s.expected(channel, payload);
        assert_eq!(s.next().await, want, "{} on {channel}", s.name());
    }
}

/// Publishes one message by each way in `vias` (then one more straight to
/// Redis) on `channel`, and checks that every client of `subs` received each
/// once, as its next delivery, in its own shape.
async fn each_publish_reaches_each_once(
    redis: &Redis,
    subs: &mut [Sub],
    channel: &str,
    vias: Vec<Via<'_>>,
    n: &mut u32,
) {
    redis.wait_numsub(channel, 2).await;
    let mut next = || {
        *n += 1;
        format!(r#"{{"n":{n},"text":"ünï <&>"}}"#)
    };
    for via in vias {
        let payload = next();
        publish(via, subs, redis, channel, &payload).await;
        all_receive(subs, channel, &payload).await;
    }
    // Nothing twice: the next delivery of each is the next message.
    let last = next();
    publish(Via::Redis, subs, redis, channel, &last).await;
    all_receive(subs, channel, &last).await;
    // One Redis subscription per node, whatever the dialects behind it.
    assert_eq!(redis.numsub(channel).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dialect_on_two_nodes_gets_every_publish_once_in_its_own_shape() {
    let redis = Redis::start().await;
    let a = Gateway::start(config(&redis)).await;
    let b = Gateway::start(config(&redis)).await;
    let mut native_pub = Client::connect(b.addr, "/ws").await;
    let mut n = 0;

    // A Bayeux channel: native and Bayeux on node A; RoadRunner,
    // SocketStream and SSE on node B.
    let mut slashed = vec![
        Sub::native(a.addr, SLASHED).await,
        Sub::bayeux(a.addr, SLASHED).await,
        Sub::roadrunner(b.addr, SLASHED).await,
        Sub::socketstream(b.addr, SLASHED).await,
        Sub::sse(b.addr, SLASHED).await,
    ];
    let vias = vec![
        Via::Redis,
        Via::HttpPublish(a.addr),
        Via::NativeClient(&mut native_pub),
        Via::BayeuxClient(1),
        Via::RoadRunnerHttp(b.addr),
    ];
    each_publish_reaches_each_once(&redis, &mut slashed, SLASHED, vias, &mut n).await;

    // A realizehit channel: native and realizehit on node A; RoadRunner,
    // SocketStream and SSE on node B.
    let mut filtered = vec![
        Sub::native(a.addr, FILTERED).await,
        Sub::realizehit(a.addr, FILTERED).await,
        Sub::roadrunner(b.addr, FILTERED).await,
        Sub::socketstream(b.addr, FILTERED).await,
        Sub::sse(b.addr, FILTERED).await,
    ];
    let vias = vec![
        Via::Redis,
        Via::HttpPublish(b.addr),
        Via::NativeClient(&mut native_pub),
        Via::RealizehitHttp(a.addr),
        Via::RoadRunnerHttp(a.addr),
    ];
    each_publish_reaches_each_once(&redis, &mut filtered, FILTERED, vias, &mut n).await;

    // Clients leave first: a stopping gateway waits (boundedly) for the
    // close handshakes of clients still connected.
    drop((slashed, filtered, native_pub));
    a.stop().await;
    b.stop().await;
}
