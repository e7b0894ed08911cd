//! The gateway against a real `redis-server`: payload rendering of real
//! `PUBLISH`es, refcounting of the single pub/sub connection, two nodes on one
//! Redis, a deterministic subscribe/unsubscribe/disconnect storm, losing
//! Redis (kill, restart on the same port) while clients stay connected, and
//! subscribe timeouts against a paused Redis. Fault injection with traffic
//! (freezes, connection kills, long outages, resync at scale, drain) lives in
//! `tests/faults.rs`.
//!
//! Every test starts its own Redis and gateway(s) on free ports. Nothing
//! sleeps to synchronise: tests wait on replies, on `/readyz`, on `PUBSUB`
//! answers or on metrics, always with a bound.

// Helpers outside `#[test]` fns panic on purpose too (a failed helper is a
// failed test); clippy's allow-expect-in-tests only covers test fns.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use wsgate::Config;

// ---------------------------------------------------------------- helpers

/// Unsubscribes from an exact channel and asserts the exact success reply.
async fn unsubscribe_channel(c: &mut Client, channel: &str) {
    let reply = c
        .request(json!({"action":"unsubscribe","channel":channel}))
        .await;
    assert_eq!(
        reply,
        json!({"action":"unsubscribe","channel":channel,"status":true})
    );
}

/// One gauge or counter value from `/metrics`, e.g.
/// `metric(addr, "wsgate_broker_subscriptions{kind=\"pattern\"}")`; 0 when absent.
async fn metric(addr: SocketAddr, series: &str) -> i64 {
    let (status, text) = http(addr, "GET", "/metrics", None).await;
    assert_eq!(status, 200, "/metrics");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map(|v| v.trim().parse::<f64>().expect("metric value") as i64)
        .unwrap_or(0)
}

/// The `PUBSUB CHANNELS` answer as a sorted set.
async fn channel_set(redis: &Redis) -> BTreeSet<String> {
    redis.channels().await.into_iter().collect()
}

/// A reconciler barrier: a fresh client subscribes to `channel` (a topic
/// nobody else uses) and gets `status:true`. The hub's reconciler applies dirty
/// topics in FIFO order, one batch at a time, and the reply is sent only once
/// Redis confirmed it, so every change queued before it has been applied.
/// The client is returned (and must be kept) so the barrier stays counted.
async fn barrier(addr: SocketAddr, channel: &str) -> Client {
    let mut c = Client::connect(addr, "/ws").await;
    c.subscribe(channel).await;
    c
}

/// Closes the clients (dropping the socket ends a session at once), then
/// stops the gateway. A live client that is not being read would hold the
/// shutdown for `shutdown_timeout`, waiting for its close handshake.
async fn stop(gw: Gateway, clients: impl IntoIterator<Item = Client>) {
    drop(clients.into_iter().collect::<Vec<_>>());
    gw.stop().await;
}

/// How many times Redis executed `command` (lower case), from INFO commandstats.
async fn command_calls(redis: &Redis, command: &str) -> i64 {
    let text = match redis.cmd(&["INFO", "commandstats"]).await {
        redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
        redis::Value::VerbatimString { text, .. } => text,
        other => panic!("INFO reply {other:?}"),
    };
    let prefix = format!("cmdstat_{command}:calls=");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().expect("calls"))
}

/// One PING on a fresh connection, allowed up to 3 s; true if answered PONG.
async fn ping(redis: &Redis) -> bool {
    let attempt = async {
        let client = redis::Client::open(redis.url()).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .ok()
    };
    tokio::time::timeout(Duration::from_secs(3), attempt)
        .await
        .ok()
        .flatten()
        .as_deref()
        == Some("PONG")
}

async fn http_status(addr: SocketAddr, path: &str) -> u16 {
    http(addr, "GET", path, None).await.0
}

/// xorshift64: a tiny deterministic PRNG so the storm replays identically.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        // Never zero (xorshift's fixed point); mix the seed a little.
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

// ---------------------------------------------------------------- 1. payloads

/// Real `PUBLISH`es (as redis-cli sends them) render as documented: JSON
/// embedded as JSON, other UTF-8 as a JSON string, anything else as base64.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_payloads_are_rendered_exactly() {
    let redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let mut c = gw.client().await;
    c.psubscribe("pay.*").await;
    c.subscribe("exact.bin").await;

    let cases: Vec<(&str, Vec<u8>, Value)> = vec![
        // A JSON object is embedded as-is.
        (
            "pay.obj",
            br#"{"a":1,"b":[true,null],"s":"x","n":{"k":-2.5}}"#.to_vec(),
            json!({"action":"message","pattern":"pay.*","channel":"pay.obj","payload":{"a":1,"b":[true,null],"s":"x","n":{"k":-2.5}}}),
        ),
        // JSON scalars are JSON too.
        (
            "pay.num",
            b"42".to_vec(),
            json!({"action":"message","pattern":"pay.*","channel":"pay.num","payload":42}),
        ),
        (
            "pay.quoted",
            br#""already a JSON string""#.to_vec(),
            json!({"action":"message","pattern":"pay.*","channel":"pay.quoted","payload":"already a JSON string"}),
        ),
        // Plain text becomes a JSON string, escaped.
        (
            "pay.text",
            b"hello world".to_vec(),
            json!({"action":"message","pattern":"pay.*","channel":"pay.text","payload":"hello world"}),
        ),
        (
            "pay.escapes",
            b"say \"hi\"\n\tbye \\".to_vec(),
            json!({"action":"message","pattern":"pay.*","channel":"pay.escapes","payload":"say \"hi\"\n\tbye \\"}),
        ),
        // Truncated JSON is not JSON: a string.
        (
            "pay.broken",
            br#"{"broken":"#.to_vec(),
            json!({"action":"message","pattern":"pay.*","channel":"pay.broken","payload":"{\"broken\":"}),
        ),
        // Multi-byte UTF-8 stays text.
        (
            "pay.utf8",
            "héllo ✓ 日本".as_bytes().to_vec(),
            json!({"action":"message","pattern":"pay.*","channel":"pay.utf8","payload":"héllo ✓ 日本"}),
        ),
        (
            "pay.empty",
            Vec::new(),
            json!({"action":"message","pattern":"pay.*","channel":"pay.empty","payload":""}),
        ),
        // Not UTF-8: base64. ff 00 fe = 111111|110000|000011|111110 = "/wD+".
        (
            "pay.bin",
            b"\xff\x00\xfe".to_vec(),
            json!({"action":"message","pattern":"pay.*","channel":"pay.bin","payload":"/wD+","encoding":"base64"}),
        ),
        // Padding: ff 00 = 111111|110000|0000(00) = "/wA=".
        (
            "pay.bin2",
            b"\xff\x00".to_vec(),
            json!({"action":"message","pattern":"pay.*","channel":"pay.bin2","payload":"/wA=","encoding":"base64"}),
        ),
        // A channel subscription: no "pattern" key at all.
        (
            "exact.bin",
            b"\x80".to_vec(),
            json!({"action":"message","channel":"exact.bin","payload":"gA==","encoding":"base64"}),
        ),
    ];
    for (channel, payload, expected) in &cases {
        assert_eq!(
            redis.publish(channel, payload).await,
            1,
            "PUBLISH {channel}"
        );
        let got = c.recv().await;
        // Field by field first (clearer failures), then the exact object (no extra keys).
        let (got_obj, want_obj) = (
            got.as_object().expect("object"),
            expected.as_object().expect("object"),
        );
        for (k, v) in want_obj {
            assert_eq!(got_obj.get(k), Some(v), "{channel}: field {k:?} in {got}");
        }
        assert_eq!(
            got_obj.keys().collect::<BTreeSet<_>>(),
            want_obj.keys().collect::<BTreeSet<_>>(),
            "{channel}"
        );
        assert_eq!(&got, expected, "{channel}");
    }

    // JSON is embedded byte for byte: key order and spacing kept, as the raw
    // text frame shows.
    assert_eq!(redis.publish("pay.raw", br#"{"z":1, "a":[2]}"#).await, 1);
    match c.next_message().await {
        Some(tokio_tungstenite::tungstenite::Message::Text(t)) => assert_eq!(
            t.as_str(),
            r#"{"action":"message","pattern":"pay.*","channel":"pay.raw","payload":{"z":1, "a":[2]}}"#
        ),
        other => panic!("expected a text frame, got {other:?}"),
    }

    // A large non-UTF-8 payload spans many socket reads on the pub/sub
    // connection (and on the WebSocket): it must arrive whole.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8 | 0x80).collect();
    assert_eq!(redis.publish("pay.big", &big).await, 1);
    let got = c.recv().await;
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&big);
    assert_eq!(got["encoding"], json!("base64"));
    assert_eq!(got["channel"], json!("pay.big"));
    assert_eq!(got["payload"].as_str().map(str::len), Some(b64.len()));
    assert!(got["payload"] == json!(b64), "large base64 payload differs");

    // Both a pattern and a channel subscription match: two deliveries, one per
    // subscription, exactly as Redis sends message + pmessage.
    c.psubscribe("exact.*").await;
    assert_eq!(redis.publish("exact.bin", b"\"two\"").await, 2);
    let got: BTreeSet<String> = [c.recv().await, c.recv().await]
        .iter()
        .map(Value::to_string)
        .collect();
    let want: BTreeSet<String> = [
        json!({"action":"message","channel":"exact.bin","payload":"two"}),
        json!({"action":"message","pattern":"exact.*","channel":"exact.bin","payload":"two"}),
    ]
    .iter()
    .map(Value::to_string)
    .collect();
    assert_eq!(got, want);
    stop(gw, [c]).await;
}

// ---------------------------------------------------------------- 2. refcount

/// Two local subscribers of one pattern share one `PSUBSCRIBE` on the node's
/// single pub/sub connection; it is dropped only when the last one leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pattern_refcount_one_psubscribe_per_node() {
    let redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    a.psubscribe("news.*").await;
    b.psubscribe("news.*").await;
    // Replies come after Redis confirmed: no wait needed.
    assert_eq!(redis.numpat().await, 1);
    assert_eq!(
        redis.pubsub_clients().await,
        vec![(0, 1)],
        "one pub/sub connection, psub=1"
    );
    assert_eq!(
        redis.publish("news.sport", b"1").await,
        1,
        "one Redis subscription for both clients"
    );
    assert_eq!(
        a.recv().await,
        json!({"action":"message","pattern":"news.*","channel":"news.sport","payload":1})
    );
    assert_eq!(
        b.recv().await,
        json!({"action":"message","pattern":"news.*","channel":"news.sport","payload":1})
    );

    a.punsubscribe("news.*").await;
    // Anything the unsubscribe could have queued has been applied once a later
    // subscribe is confirmed.
    let bar = barrier(gw.addr, "barrier").await;
    assert_eq!(redis.numpat().await, 1, "b still holds news.*");
    assert_eq!(
        redis.pubsub_clients().await,
        vec![(1, 1)],
        "still one connection (plus the barrier channel)"
    );
    assert_eq!(redis.publish("news.world", b"2").await, 1);
    assert_eq!(
        b.recv().await,
        json!({"action":"message","pattern":"news.*","channel":"news.world","payload":2})
    );
    // a gets nothing: its next frame is the pong.
    assert_eq!(
        a.request(json!({"action":"ping"})).await,
        json!({"action":"pong"})
    );

    // The last subscriber disconnects without unsubscribing.
    drop(b);
    wait_until("NUMPAT 0 after the last subscriber left", WAIT, || async {
        redis.numpat().await == 0
    })
    .await;
    assert_eq!(redis.pubsub_clients().await, vec![(1, 0)]);
    assert_eq!(redis.publish("news.sport", b"3").await, 0);
    assert_eq!(
        metric(gw.addr, "wsgate_local_subscriptions{kind=\"pattern\"}").await,
        0
    );
    stop(gw, [a, bar]).await;
}

/// The same for an exact channel: `SUBSCRIBE` once, `PUBSUB NUMSUB` 1,
/// `PUBSUB CHANNELS` lists it, gone when the last subscriber disconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_refcount_one_subscribe_per_node() {
    let redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    a.subscribe("room.42").await;
    b.subscribe("room.42").await;
    assert_eq!(redis.numsub("room.42").await, 1);
    assert_eq!(
        channel_set(&redis).await,
        BTreeSet::from(["room.42".to_owned()])
    );
    assert_eq!(redis.pubsub_clients().await, vec![(1, 0)]);
    assert_eq!(redis.numpat().await, 0);
    assert_eq!(redis.publish("room.42", b"hi").await, 1);
    assert_eq!(
        a.recv().await,
        json!({"action":"message","channel":"room.42","payload":"hi"})
    );
    assert_eq!(
        b.recv().await,
        json!({"action":"message","channel":"room.42","payload":"hi"})
    );

    unsubscribe_channel(&mut a, "room.42").await;
    let mut bar = Client::connect(gw.addr, "/ws").await;
    bar.psubscribe("barrier.*").await;
    assert_eq!(redis.numsub("room.42").await, 1, "b still holds room.42");
    assert_eq!(
        channel_set(&redis).await,
        BTreeSet::from(["room.42".to_owned()])
    );
    assert_eq!(redis.pubsub_clients().await, vec![(1, 1)]);
    assert_eq!(redis.publish("room.42", b"again").await, 1);
    assert_eq!(
        b.recv().await,
        json!({"action":"message","channel":"room.42","payload":"again"})
    );
    assert_eq!(
        a.request(json!({"action":"ping"})).await,
        json!({"action":"pong"})
    );

    drop(b);
    wait_until("NUMSUB room.42 = 0", WAIT, || async {
        redis.numsub("room.42").await == 0
    })
    .await;
    assert_eq!(channel_set(&redis).await, BTreeSet::new());
    assert_eq!(redis.pubsub_clients().await, vec![(0, 1)]);
    assert_eq!(redis.publish("room.42", b"gone").await, 0);
    stop(gw, [a, bar]).await;
}

/// `wsgate_broker_subscriptions` ("distinct channels/patterns the broker holds
/// for this node") must follow unsubscribes, not only subscribes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_subscriptions_gauge_follows_unsubscribe() {
    let redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let pattern_gauge = "wsgate_broker_subscriptions{kind=\"pattern\"}";
    let channel_gauge = "wsgate_broker_subscriptions{kind=\"channel\"}";
    let mut c = gw.client().await;
    c.psubscribe("g.*").await;
    c.subscribe("g").await;
    // The gauges are stored just after the acks are queued (same lock, but
    // the reconciler's thread can be descheduled in between), so a client can
    // see its ack a few ms before the gauge moves: wait, bounded.
    let gauges = || async {
        (
            metric(gw.addr, pattern_gauge).await,
            // Without the services router's own channels.
            metric(gw.addr, channel_gauge).await - ROUTER_CHANNELS,
        )
    };
    wait_until("gauges (1, 1)", WAIT, || async { gauges().await == (1, 1) }).await;

    c.punsubscribe("g.*").await;
    unsubscribe_channel(&mut c, "g").await;
    wait_until("Redis dropped both", WAIT, || async {
        redis.numpat().await == 0 && redis.channels().await.is_empty()
    })
    .await;
    // The reconciler has completed both unsubscribes once a later subscribe
    // is confirmed.
    let bar = barrier(gw.addr, "gauge.barrier").await;
    assert_eq!(
        redis.pubsub_clients().await,
        vec![(1, 0)],
        "Redis holds only the barrier"
    );
    // Gauge after unsubscribing g.* and g: Redis holds 0 patterns and 1 channel.
    wait_until("gauges (0, 1)", WAIT, || async { gauges().await == (0, 1) }).await;
    assert_eq!(gauges().await, (0, 1), "and it stays there");
    stop(gw, [c, bar]).await;
}

// ---------------------------------------------------------------- 3. two nodes

/// Two gateway processes on one Redis: each node holds its own `PSUBSCRIBE`,
/// one `PUBLISH` reaches both; one node leaving does not affect the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_redis() {
    let redis = Redis::start().await;
    let env = [("WSGATE_REDIS_URL", redis.url())];
    let n1 = GatewayProcess::spawn(&env).await;
    let n2 = GatewayProcess::spawn(&env).await;
    let mut c1 = n1.client().await;
    let mut c2 = n2.client().await;
    c1.psubscribe("news.*").await;
    c2.psubscribe("news.*").await;
    assert_eq!(redis.numpat().await, 1, "NUMPAT counts distinct patterns");
    assert_eq!(
        redis.pubsub_clients().await,
        vec![(0, 1), (0, 1)],
        "one pub/sub connection per node"
    );
    assert_eq!(
        redis.publish("news.sport", br#"{"n":1}"#).await,
        2,
        "one receiver per node"
    );
    let want =
        json!({"action":"message","pattern":"news.*","channel":"news.sport","payload":{"n":1}});
    assert_eq!(c1.recv().await, want);
    assert_eq!(c2.recv().await, want);

    // Publishing over HTTP on node 1 reaches node 2's client too.
    let (status, body) = http(
        n1.addr,
        "POST",
        "/publish",
        Some(r#"{"channel":"news.http","payload":"x"}"#),
    )
    .await;
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body).ok()),
        (200, Some(json!({"receivers":2})))
    );
    assert_eq!(c1.recv().await["channel"], json!("news.http"));
    assert_eq!(c2.recv().await["channel"], json!("news.http"));

    c1.punsubscribe("news.*").await;
    wait_until("node 1's PUNSUBSCRIBE", WAIT, || async {
        redis.pubsub_clients().await == vec![(0, 1)]
    })
    .await;
    assert_eq!(redis.numpat().await, 1, "node 2 still holds news.*");
    assert_eq!(redis.publish("news.world", b"2").await, 1);
    assert_eq!(
        c2.recv().await,
        json!({"action":"message","pattern":"news.*","channel":"news.world","payload":2})
    );
    assert_eq!(
        c1.request(json!({"action":"ping"})).await,
        json!({"action":"pong"}),
        "node 1's client got nothing"
    );

    drop(c2);
    wait_until("NUMPAT 0", WAIT, || async { redis.numpat().await == 0 }).await;
    assert_eq!(redis.pubsub_clients().await, vec![]);
}

// ---------------------------------------------------------------- 4. storm

/// One storm topic: how to subscribe to it, and a channel only it matches.
#[derive(Clone)]
struct StormTopic {
    /// `"pattern"` or `"channel"`: the request field.
    kind: &'static str,
    name: String,
    /// A channel this topic matches and no other storm topic does.
    probe: String,
}

impl StormTopic {
    fn request(&self, action: &str) -> Value {
        let mut v = json!({"action": action});
        v[self.kind] = json!(self.name);
        v
    }

    fn reply(&self, action: &str, error: Option<&str>) -> Value {
        let mut v = self.request(action);
        v["status"] = json!(error.is_none());
        if let Some(e) = error {
            v["error"] = json!(e);
        }
        v
    }

    /// The delivery a subscriber gets for a publish of `payload` to `probe`.
    fn delivery(&self, payload: usize) -> Value {
        match self.kind {
            "pattern" => {
                json!({"action":"message","pattern":self.name,"channel":self.probe,"payload":payload})
            }
            _ => json!({"action":"message","channel":self.probe,"payload":payload}),
        }
    }
}

/// `storm.p{i}.*` (probed by `storm.p{i}.x`: `storm.p1.*` does not match
/// `storm.p10.x`), then exact channels `storm.c{i}`, which no pattern matches.
fn storm_topics(patterns: usize, channels: usize) -> Vec<StormTopic> {
    let p = (0..patterns).map(|i| StormTopic {
        kind: "pattern",
        name: format!("storm.p{i}.*"),
        probe: format!("storm.p{i}.x"),
    });
    let c = (0..channels).map(|i| StormTopic {
        kind: "channel",
        name: format!("storm.c{i}"),
        probe: format!("storm.c{i}"),
    });
    p.chain(c).collect()
}

const STORM_CLIENTS: usize = 50;
const STORM_OPS: usize = 30;
/// Topics one client draws from: windows overlap, so every topic is shared by
/// `STORM_CLIENTS * STORM_WINDOW / topics` clients (10 for 20 topics), which
/// makes first-subscribe / last-unsubscribe races between clients common.
const STORM_WINDOW: usize = 4;

/// One storm client: `STORM_OPS` random steps, each reply awaited and checked
/// exactly. Returns the still-open connection and the topics it holds.
async fn storm_client(
    addr: SocketAddr,
    topics: Vec<StormTopic>,
    index: usize,
    seed: u64,
) -> (Client, BTreeSet<usize>) {
    let mut rng = XorShift::new(seed);
    let window: Vec<usize> = (0..STORM_WINDOW)
        .map(|j| (index * STORM_WINDOW + j) % topics.len())
        .collect();
    let mut c = Client::connect(addr, "/ws").await;
    let mut held: BTreeSet<usize> = BTreeSet::new();
    for _ in 0..STORM_OPS {
        let roll = rng.below(20);
        let any = window[rng.below(window.len())];
        match roll {
            // 30%: subscribe (the refusal when already held)
            0..=5 => {
                let topic = &topics[any];
                let reply = c.request(topic.request("subscribe")).await;
                if held.insert(any) {
                    assert_eq!(reply, topic.reply("subscribe", None), "client {index}");
                } else {
                    assert_eq!(
                        reply,
                        topic.reply("subscribe", Some("already subscribed")),
                        "client {index}"
                    );
                }
            }
            // 55%: unsubscribe, mostly something held (the refusal otherwise)
            6..=16 => {
                let pick_held = !held.is_empty() && rng.below(4) != 0;
                let t = if pick_held {
                    *held.iter().nth(rng.below(held.len())).unwrap_or(&any)
                } else {
                    any
                };
                let topic = &topics[t];
                let reply = c.request(topic.request("unsubscribe")).await;
                if held.remove(&t) {
                    assert_eq!(reply, topic.reply("unsubscribe", None), "client {index}");
                } else {
                    assert_eq!(
                        reply,
                        topic.reply("unsubscribe", Some("not subscribed")),
                        "client {index}"
                    );
                }
            }
            // 15%: disconnect abruptly (no close handshake) and reconnect
            _ => {
                drop(c);
                held.clear();
                c = Client::connect(addr, "/ws").await;
            }
        }
    }
    (c, held)
}

/// Runs the storm on a fresh Redis + gateway and checks that what Redis holds
/// is exactly what the model says at least one live client holds.
/// `links`: the gateway's `WSGATE_REDIS_PUBSUB_CONNECTIONS` (`None`: auto).
async fn storm(patterns: usize, channels: usize, seed: u64, links: Option<usize>) {
    let redis = Redis::start().await;
    let mut config = test_config(Some(redis.url()));
    config.redis_pubsub_connections = links.and_then(std::num::NonZeroUsize::new);
    let gw = Gateway::start(config).await;
    let topics = storm_topics(patterns, channels);
    let started = Instant::now();
    let tasks: Vec<_> = (0..STORM_CLIENTS)
        .map(|i| {
            tokio::spawn(storm_client(
                gw.addr,
                topics.clone(),
                i,
                seed ^ ((i as u64 + 1) << 20),
            ))
        })
        .collect();
    let mut clients = Vec::new();
    for task in tasks {
        clients.push(
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("storm client hung")
                .expect("storm client"),
        );
    }
    eprintln!(
        "storm ({patterns} patterns, {channels} channels): {:?}",
        started.elapsed()
    );

    // The model: topics with at least one live subscriber.
    let mut holders: BTreeMap<usize, usize> = BTreeMap::new();
    for (_, held) in &clients {
        for &t in held {
            *holders.entry(t).or_default() += 1;
        }
    }
    let held_patterns = holders
        .keys()
        .filter(|&&t| topics[t].kind == "pattern")
        .count() as i64;
    let held_channels = holders
        .keys()
        .filter(|&&t| topics[t].kind == "channel")
        .count() as i64;
    let local = |kind: &str| {
        clients
            .iter()
            .flat_map(|(_, h)| h.iter())
            .filter(|&&t| topics[t].kind == kind)
            .count() as i64
    };
    let (local_patterns, local_channels) = (local("pattern"), local("channel"));
    // Deterministic, but make sure the seed produced an interesting end state.
    eprintln!("model: {held_patterns} patterns, {held_channels} channels held; {local_patterns}+{local_channels} local");
    assert!(
        held_patterns > 0 && held_patterns < patterns as i64,
        "degenerate storm: {held_patterns} patterns held"
    );
    assert!(
        channels == 0 || (held_channels > 0 && held_channels < channels as i64),
        "degenerate storm: {held_channels} channels held"
    );

    // Quiet: the hub has processed every disconnect (local counts match)...
    wait_until(
        "hub's local subscriptions match the model",
        WAIT,
        || async {
            metric(gw.addr, "wsgate_local_subscriptions{kind=\"pattern\"}").await == local_patterns
                && metric(gw.addr, "wsgate_local_subscriptions{kind=\"channel\"}").await
                    == local_channels + ROUTER_CHANNELS
                && metric(gw.addr, "wsgate_connections").await == STORM_CLIENTS as i64
        },
    )
    .await;
    // ...and the reconciler has applied every resulting change.
    let bar = barrier(gw.addr, "storm.barrier").await;

    // Counts: Redis, CLIENT LIST and the gateway's own view all equal the model.
    assert_eq!(redis.numpat().await, held_patterns, "PUBSUB NUMPAT");
    assert_eq!(
        redis.pubsub_clients().await,
        vec![(held_channels + 1, held_patterns)],
        "CLIENT LIST sub/psub"
    );
    let mut want_channels: BTreeSet<String> = holders
        .keys()
        .filter(|&&t| topics[t].kind == "channel")
        .map(|&t| topics[t].name.clone())
        .collect();
    want_channels.insert("storm.barrier".to_owned());
    assert_eq!(channel_set(&redis).await, want_channels, "PUBSUB CHANNELS");

    // Identity: each probe channel reaches exactly its own topic, once if held.
    for (t, topic) in topics.iter().enumerate() {
        let want = i64::from(holders.contains_key(&t));
        assert_eq!(
            redis.publish(&topic.probe, t.to_string().as_bytes()).await,
            want,
            "PUBLISH {} ({})",
            topic.probe,
            topic.name
        );
    }
    // And every live client receives exactly its topics' probes: in order
    // over one link; over several, in any order across topics (each link is
    // its own Redis connection, so only per-topic order is promised).
    let ordered = links.is_none_or(|k| k == 1);
    for (i, (c, held)) in clients.iter_mut().enumerate() {
        let want: Vec<Value> = held.iter().map(|&t| topics[t].delivery(t)).collect();
        let mut got = Vec::with_capacity(want.len());
        for _ in 0..want.len() {
            got.push(c.recv().await);
        }
        if ordered {
            assert_eq!(got, want, "client {i}");
        } else {
            let key = |v: &Value| v.to_string();
            let (mut got, mut want) = (got, want);
            got.sort_by_key(key);
            want.sort_by_key(key);
            assert_eq!(got, want, "client {i}");
        }
        assert_eq!(
            c.request(json!({"action":"ping"})).await,
            json!({"action":"pong"}),
            "client {i}: extra delivery"
        );
    }

    // Everyone leaves: Redis ends empty.
    drop(clients);
    drop(bar);
    wait_until("Redis empty after the storm", WAIT, || async {
        redis.numpat().await == 0 && redis.channels().await.is_empty()
    })
    .await;
    assert_eq!(redis.pubsub_clients().await, vec![]);
    gw.stop().await;
}

/// 50 clients, 20 patterns, 30 random steps each, concurrently.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storm_patterns_redis_matches_registry() {
    storm(20, 0, 0x5EED_0001, None).await;
}

/// The same with 10 exact channels mixed in.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storm_patterns_and_channels_redis_matches_registry() {
    storm(20, 10, 0x5EED_0002, None).await;
}

/// The same over four pub/sub connections: every pattern on the link its
/// hash names, each link refcounted on its own, and Redis still holds
/// exactly the model (CLIENT LIST summed over the node's connections).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storm_over_four_links_redis_matches_registry() {
    storm(20, 10, 0x5EED_0003, Some(4)).await;
}

// ---------------------------------------------------------------- 5. losing Redis

/// Killing Redis degrades the node (not ready, publish 503) without crashing
/// or hanging it; the client is told (`interrupted`). When Redis returns,
/// subscriptions are restored and the client is told (`resumed`) before any
/// later delivery. (More outage kinds, with traffic: tests/faults.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_loss_and_return() {
    let mut redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let mut c = gw.client().await;
    c.psubscribe("live.*").await;
    c.subscribe("live-channel").await;
    assert_eq!(redis.numpat().await, 1);
    assert_eq!(
        metric(gw.addr, "wsgate_broker_state{state=\"connected\"}").await,
        1
    );

    redis.kill();
    // The client's next frame is the gap notice naming both its subscriptions.
    c.expect_interrupted(&["live.*"], &["live-channel"]).await;
    wait_until("/readyz 503", WAIT, || async {
        http_status(gw.addr, "/readyz").await == 503
    })
    .await;
    assert_eq!(
        http(gw.addr, "GET", "/readyz", None).await.1,
        r#"{"ready":false}"#
    );
    assert_eq!(http_status(gw.addr, "/healthz").await, 200);
    let t = Instant::now();
    let (status, body) = gw.publish(json!({"channel":"live.a","payload":"x"})).await;
    let took = t.elapsed();
    assert_eq!(
        (status, body),
        (
            503,
            json!({"error":"broker unavailable","published":0,"maybe_published":false})
        )
    );
    assert!(
        took < Duration::from_secs(5),
        "publish without Redis took {took:?}"
    );
    assert_eq!(
        c.request(json!({"action":"ping","id":"p1"})).await,
        json!({"action":"pong","id":"p1"})
    );
    assert_eq!(metric(gw.addr, "wsgate_broker_up{link=\"0\"}").await, 0);
    assert_eq!(
        metric(gw.addr, "wsgate_broker_state{state=\"connected\"}").await,
        0
    );
    assert_eq!(
        metric(gw.addr, "wsgate_broker_state{state=\"down\"}").await
            + metric(gw.addr, "wsgate_broker_state{state=\"reconnecting\"}").await,
        1,
        "down or reconnecting while Redis is away"
    );
    assert_eq!(http_status(gw.addr, "/healthz").await, 200);

    redis.restart().await;
    // Nothing was published meanwhile: the next frame is `resumed`, sent once
    // every subscription is confirmed again.
    c.expect_resumed(&["live.*"], &["live-channel"]).await;
    wait_until("/readyz 200 after Redis returned", WAIT, || async {
        http_status(gw.addr, "/readyz").await == 200
    })
    .await;
    assert_eq!(
        metric(gw.addr, "wsgate_broker_state{state=\"connected\"}").await,
        1
    );
    assert_eq!(metric(gw.addr, "wsgate_broker_reconnects_total").await, 1);
    assert_eq!(metric(gw.addr, "wsgate_gap_notices_total").await, 2);
    // Ready means the reconciler caught up: the old subscriptions are back.
    assert_eq!(redis.numpat().await, 1);
    assert_eq!(redis.numsub("live-channel").await, 1);
    assert_eq!(redis.pubsub_clients().await, vec![(1, 1)]);
    assert_eq!(redis.publish("live.back", b"\"back\"").await, 1);
    assert_eq!(
        c.recv().await,
        json!({"action":"message","pattern":"live.*","channel":"live.back","payload":"back"})
    );
    assert_eq!(redis.publish("live-channel", b"7").await, 1);
    assert_eq!(
        c.recv().await,
        json!({"action":"message","channel":"live-channel","payload":7})
    );
    // HTTP publish works again too (the publisher connection recovers).
    // (Retried: the first publish after an outage may fail, see
    // `first_http_publish_after_redis_returns_succeeds`; a 503 published nothing.)
    let last = std::sync::Mutex::new((0, Value::Null));
    wait_until("HTTP publish after Redis returned", WAIT, || async {
        let r = gw.publish(json!({"channel":"live.http","payload":1})).await;
        let done = r.0 != 503;
        *last.lock().unwrap() = r;
        done
    })
    .await;
    let last = last.into_inner().unwrap();
    assert_eq!(last, (200, json!({"receivers":1})));
    assert_eq!(
        c.recv().await,
        json!({"action":"message","pattern":"live.*","channel":"live.http","payload":1})
    );
    stop(gw, [c]).await;
}

/// The first HTTP publish after Redis came back (and `/readyz` is 200)
/// succeeds: no caller sees a failure for an outage that is already over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_http_publish_after_redis_returns_succeeds() {
    let mut redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let mut c = gw.client().await;
    c.subscribe("p").await;
    // The publisher connection is established and used once.
    assert_eq!(
        gw.publish(json!({"channel":"p","payload":0})).await,
        (200, json!({"receivers":1}))
    );
    assert_eq!(c.recv().await["payload"], json!(0));
    redis.kill();
    c.expect_interrupted(&[], &["p"]).await;
    wait_until("/readyz 503", WAIT, || async {
        http_status(gw.addr, "/readyz").await == 503
    })
    .await;
    redis.restart().await;
    gw.wait_ready().await;
    c.expect_resumed(&[], &["p"]).await;
    let first = gw.publish(json!({"channel":"p","payload":1})).await;
    let second = gw.publish(json!({"channel":"p","payload":2})).await;
    assert_eq!(
        second,
        (200, json!({"receivers":1})),
        "second publish after Redis returned"
    );
    assert_eq!(
        first,
        (200, json!({"receivers":1})),
        "first publish after Redis returned (/readyz was 200)"
    );
    assert_eq!(c.recv().await["payload"], json!(1));
    assert_eq!(c.recv().await["payload"], json!(2));
    stop(gw, [c]).await;
}

// ---------------------------------------------------------------- 6. subscribe timeouts with Redis up

// (Subscribing while Redis is down, confirmed or refused: tests/faults.rs.)

/// Redis is up but slow (CLIENT PAUSE): the subscribe is refused after
/// `subscribe_timeout`, and when Redis later confirms the PSUBSCRIBE anyway,
/// the node withdraws it, since nobody wants it any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_confirmation_after_a_timeout_is_withdrawn() {
    let redis = Redis::start().await;
    let timeout = Duration::from_millis(300);
    let pause = Duration::from_millis(1000);
    let config = Config {
        subscribe_timeout: timeout,
        ..test_config(Some(redis.url()))
    };
    let gw = Gateway::start(config).await;
    let mut c = gw.client().await;

    redis
        .cmd(&["CLIENT", "PAUSE", &pause.as_millis().to_string(), "ALL"])
        .await;
    let t = Instant::now();
    let reply = c
        .request(json!({"action":"subscribe","pattern":"slow.*","id":"s1"}))
        .await;
    let took = t.elapsed();
    assert_eq!(
        reply,
        json!({"action":"subscribe","pattern":"slow.*","id":"s1","status":false,"error":"broker unavailable"})
    );
    assert!(
        took >= timeout - Duration::from_millis(50) && took < pause,
        "refused after {took:?}"
    );
    // Wait out the pause: a PING is answered only once Redis resumes.
    wait_until("Redis resumes", WAIT, || async { ping(&redis).await }).await;
    // The late PSUBSCRIBE was confirmed, then withdrawn (both before the
    // barrier's confirmation, see `barrier`).
    let bar = barrier(gw.addr, "slow.barrier").await;
    assert_eq!(
        redis.numpat().await,
        0,
        "the refused pattern is not left in Redis"
    );
    assert_eq!(
        (
            command_calls(&redis, "psubscribe").await,
            command_calls(&redis, "punsubscribe").await
        ),
        (1, 1),
        "PSUBSCRIBE executed late, then PUNSUBSCRIBE"
    );
    assert_eq!(redis.pubsub_clients().await, vec![(1, 0)]);
    assert_eq!(redis.publish("slow.x", b"1").await, 0);

    // Subscribing again works normally.
    c.psubscribe("slow.*").await;
    assert_eq!(redis.publish("slow.x", b"2").await, 1);
    assert_eq!(
        c.recv().await,
        json!({"action":"message","pattern":"slow.*","channel":"slow.x","payload":2})
    );
    stop(gw, [c, bar]).await;
}

/// A subscribe whose broker confirmation lands at the very moment its
/// `subscribe_timeout` fires must end up either refused, or confirmed *and*
/// subscribed: never `status:true` while the hub no longer delivers to it.
///
/// Redis is paused (CLIENT PAUSE, with `hz 500` so it resumes within ~2 ms)
/// for about the subscribe timeout, while 600 clients subscribe to one
/// pattern: their timeouts straddle the moment the PSUBSCRIBE is confirmed.
/// Repeated for up to 5 rounds (a fresh pattern each); every round checks
/// that the hub holds exactly as many subscriptions as clients were told
/// `status:true`, which holds whatever the timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_confirmed_as_it_times_out_is_not_lost() {
    const CLIENTS: usize = 600;
    const ROUNDS: usize = 5;
    let redis = Redis::start().await;
    redis.cmd(&["CONFIG", "SET", "hz", "500"]).await;
    let timeout = Duration::from_millis(300);
    let config = Config {
        subscribe_timeout: timeout,
        ..test_config(Some(redis.url()))
    };
    let gw = Gateway::start(config).await;
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        clients.push(gw.client().await);
    }
    let gauge = "wsgate_local_subscriptions{kind=\"pattern\"}";
    let mut told_true = 0;
    for round in 0..ROUNDS {
        let pattern = format!("race{round}.*");
        let pause = (timeout + Duration::from_millis(2)).as_millis().to_string();
        redis.cmd(&["CLIENT", "PAUSE", &pause, "ALL"]).await;
        for c in clients.iter_mut() {
            c.send_json(json!({"action":"subscribe","pattern":pattern}))
                .await;
        }
        let mut confirmed = Vec::new();
        for (i, c) in clients.iter_mut().enumerate() {
            let reply = c.recv().await;
            if reply["status"] == json!(true) {
                confirmed.push(i);
            } else {
                assert_eq!(
                    reply,
                    json!({"action":"subscribe","pattern":pattern,"status":false,"error":"broker unavailable"})
                );
            }
        }
        told_true += confirmed.len() as i64;
        wait_until("Redis resumes", WAIT, || async { ping(&redis).await }).await;
        let held = metric(gw.addr, gauge).await;
        eprintln!(
            "round {round}: {} confirmed, {} refused; the hub holds {held} of {told_true}",
            confirmed.len(),
            CLIENTS - confirmed.len()
        );
        if held == told_true {
            continue;
        }
        // Evidence: publish once and count who of the confirmed receives it.
        let _bar = barrier(gw.addr, &format!("race{round}.barrier")).await;
        let receivers = redis.publish(&format!("race{round}.x"), b"1").await;
        let mut missing = Vec::new();
        for &i in &confirmed {
            match tokio::time::timeout(Duration::from_secs(2), clients[i].recv()).await {
                Ok(m) if m["channel"] == json!(format!("race{round}.x")) => {}
                _ => missing.push(i),
            }
        }
        panic!(
            "round {round}: {} clients got status:true for {pattern}, but the hub holds {} subscriptions \
             in all ({told_true} confirmed over all rounds); PUBLISH race{round}.x returned {receivers} and \
             clients {missing:?} (told status:true) received nothing within 2 s",
            confirmed.len(),
            held
        );
    }
    stop(gw, clients).await;
}
