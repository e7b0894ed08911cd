//! `POST /publish` end to end: the payload rule, what a failed publish
//! reports, idempotency keys, one round trip per batch, and the publish
//! connection's name, against a real redis-server (and the embedded broker
//! where it applies).
//!
//! Faults between the gateway and Redis come from [`Proxy`], a TCP proxy in
//! this process that forwards to the real Redis and, on the connection that
//! first sends a given command, drops the connection after Redis answered
//! (so Redis surely ran the command) or holds Redis's replies back. A raw
//! Redis subscriber (redis-rs, straight to Redis) shows what Redis actually
//! published, byte for byte. "Not published again" is proven with a marker
//! published straight to Redis afterwards: the next message must be the
//! marker.

// Helpers and the proxy are plain fns, so clippy's allow-expect-in-tests
// does not see them as tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use wsgate::Config;

// ---------------------------------------------------------------- helpers

/// POST /publish with a raw body: (status, parsed reply).
async fn post(addr: SocketAddr, body: &str) -> (u16, Value) {
    let (status, text) = http(addr, "POST", "/publish", Some(body)).await;
    let reply = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{body}: reply {text}"));
    (status, reply)
}

fn config(redis_url: Option<String>, tweak: impl FnOnce(&mut Config)) -> Config {
    let mut c = test_config(redis_url);
    tweak(&mut c);
    c
}

// ---------------------------------------------------------------- proxy

/// The RESP bulk strings that start the commands faults are keyed on.
const PUBLISH: &[u8] = b"$7\r\nPUBLISH\r\n";
const EVALSHA: &[u8] = b"$7\r\nEVALSHA\r\n";

/// What the proxy does to the first connection whose client sends `marker`.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Forwards that command (and everything else the client sends), then
    /// forwards `replies` of Redis's reply lines and closes both sides: Redis
    /// ran the commands, the client never hears of the rest.
    Cut {
        marker: &'static [u8],
        replies: usize,
    },
    /// Holds Redis's replies from then on until the client has sent `count`
    /// markers (reported `true`) or `bound` passed (reported `false`).
    Hold {
        marker: &'static [u8],
        count: usize,
        bound: Duration,
    },
}

impl Fault {
    fn marker(&self) -> &'static [u8] {
        match self {
            Fault::Cut { marker, .. } | Fault::Hold { marker, .. } => marker,
        }
    }
}

#[derive(Default)]
struct Control {
    /// The next fault, taken by the connection it hits.
    fault: Mutex<Option<Fault>>,
    /// How the last `Hold` ended.
    held_until_count: Mutex<Option<bool>>,
    /// Connections accepted so far.
    accepted: Mutex<usize>,
}

/// A TCP proxy to the real Redis on a free loopback port.
struct Proxy {
    addr: SocketAddr,
    control: Arc<Control>,
    task: JoinHandle<()>,
}

impl Proxy {
    async fn start(redis: &Redis) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream: SocketAddr = format!("127.0.0.1:{}", redis.port).parse().unwrap();
        let control = Arc::new(Control::default());
        let ctl = control.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                *ctl.accepted.lock().unwrap() += 1;
                tokio::spawn(pipe(client, upstream, ctl.clone()));
            }
        });
        Proxy {
            addr,
            control,
            task,
        }
    }

    fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    fn arm(&self, fault: Fault) {
        *self.control.held_until_count.lock().unwrap() = None;
        *self.control.fault.lock().unwrap() = Some(fault);
    }

    /// The fault has hit a connection.
    fn fired(&self) -> bool {
        self.control.fault.lock().unwrap().is_none()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

/// Forwards one connection, applying the armed fault if this connection's
/// client sends its marker first.
async fn pipe(mut client: TcpStream, upstream: SocketAddr, control: Arc<Control>) {
    let Ok(mut redis) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut cbuf, mut rbuf) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    // Client bytes: a short tail until this connection takes the fault, then
    // everything since the marker.
    let mut sent: Vec<u8> = Vec::new();
    let mut mine: Option<Fault> = None;
    let mut forwarded_replies = 0;
    let mut held: Vec<u8> = Vec::new();
    let mut hold_until: Option<Instant> = None;
    loop {
        let holding = hold_until.is_some();
        tokio::select! {
            n = client.read(&mut cbuf) => {
                let n = match n { Ok(0) | Err(_) => return, Ok(n) => n };
                if redis.write_all(&cbuf[..n]).await.is_err() {
                    return;
                }
                sent.extend_from_slice(&cbuf[..n]);
                if mine.is_none() {
                    let mut armed = control.fault.lock().unwrap();
                    match *armed {
                        Some(f) if count(&sent, f.marker()) > 0 => {
                            mine = armed.take();
                            let at = sent.windows(f.marker().len()).position(|w| w == f.marker()).unwrap_or(0);
                            sent.drain(..at);
                            if let Fault::Hold { bound, .. } = f {
                                hold_until = Some(Instant::now() + bound);
                            }
                        }
                        _ => {
                            let keep = sent.len().saturating_sub(16);
                            sent.drain(..keep);
                        }
                    }
                }
                if let (Some(Fault::Hold { marker, count: want, .. }), true) = (mine, hold_until.is_some()) {
                    if count(&sent, marker) >= want {
                        *control.held_until_count.lock().unwrap() = Some(true);
                        hold_until = None;
                        if client.write_all(&held).await.is_err() {
                            return;
                        }
                        held.clear();
                    }
                }
            }
            n = redis.read(&mut rbuf) => {
                let n = match n { Ok(0) | Err(_) => return, Ok(n) => n };
                let chunk = &rbuf[..n];
                match mine {
                    Some(Fault::Cut { replies, .. }) => {
                        // Forward up to the `replies`-th line end, then close.
                        let mut end = 0;
                        while forwarded_replies < replies {
                            match chunk[end..].windows(2).position(|w| w == b"\r\n") {
                                Some(p) => {
                                    end += p + 2;
                                    forwarded_replies += 1;
                                }
                                None => {
                                    end = chunk.len();
                                    break;
                                }
                            }
                        }
                        let _ = client.write_all(&chunk[..end]).await;
                        if forwarded_replies >= replies {
                            return;
                        }
                    }
                    Some(Fault::Hold { .. }) if holding => held.extend_from_slice(chunk),
                    _ => {
                        if client.write_all(chunk).await.is_err() {
                            return;
                        }
                    }
                }
            }
            () = async {
                match hold_until {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            }, if holding => {
                *control.held_until_count.lock().unwrap() = Some(false);
                hold_until = None;
                if client.write_all(&held).await.is_err() {
                    return;
                }
                held.clear();
            }
        }
    }
}

// ---------------------------------------------------------------- a) payload rule

/// (body fields, bytes Redis carries, the native delivery's `payload`).
const PAYLOAD_CASES: &[(&str, &str, &str)] = &[
    // A JSON string is published as its JSON text: the type survives.
    (r#""payload":"42""#, r#""42""#, r#""42""#),
    (r#""payload":"true""#, r#""true""#, r#""true""#),
    (
        r#""payload":"{\"a\":1}""#,
        r#""{\"a\":1}""#,
        r#""{\"a\":1}""#,
    ),
    (r#""payload":"null""#, r#""null""#, r#""null""#),
    (
        r#""payload":"disk full""#,
        r#""disk full""#,
        r#""disk full""#,
    ),
    // Escapes as sent, byte for byte.
    (
        r#""payload":"caf\u00e9 \"q\"""#,
        r#""caf\u00e9 \"q\"""#,
        r#""caf\u00e9 \"q\"""#,
    ),
    // Other JSON values: their JSON text, byte for byte.
    (r#""payload":42"#, "42", "42"),
    (r#""payload":null"#, "null", "null"),
    (
        r#""payload":{"z":1, "a":[ 2 ]}"#,
        r#"{"z":1, "a":[ 2 ]}"#,
        r#"{"z":1, "a":[ 2 ]}"#,
    ),
    // payload_text: the raw text (JSON text then reads as JSON, as from redis-cli).
    (
        r#""payload_text":"disk full""#,
        "disk full",
        r#""disk full""#,
    ),
    (r#""payload_text":"42""#, "42", "42"),
    (r#""payload_text":"""#, "", r#""""#),
    (r#""payload_text":"caf\u00e9""#, "café", r#""café""#),
];

fn delivery_text(payload: &str) -> String {
    format!(r#"{{"action":"message","channel":"p","payload":{payload}}}"#)
}

/// Every case, single and then all in one batch: the exact bytes in Redis and
/// the exact frame a native subscriber gets. (Regression: a JSON string
/// payload was published unquoted, so `"42"` arrived as the number 42.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_is_published_as_its_json_text_and_payload_text_as_raw_text() {
    let redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let mut raw = RawSub::subscribe(&redis, "p").await;
    let mut ws = gw.client().await;
    ws.subscribe("p").await;
    for (fields, in_redis, payload) in PAYLOAD_CASES {
        let body = format!(r#"{{"channel":"p",{fields}}}"#);
        assert_eq!(
            post(gw.addr, &body).await,
            (200, json!({"receivers":2})),
            "{body}"
        );
        assert_eq!(raw.next_text().await, *in_redis, "{body}: bytes in redis");
        assert_eq!(ws.recv_text().await, delivery_text(payload), "{body}");
    }
    let items: Vec<String> = PAYLOAD_CASES
        .iter()
        .map(|(fields, _, _)| format!(r#"{{"channel":"p",{fields}}}"#))
        .collect();
    let body = format!(r#"{{"messages":[{}]}}"#, items.join(","));
    assert_eq!(
        post(gw.addr, &body).await,
        (200, json!({"receivers": vec![2; PAYLOAD_CASES.len()]}))
    );
    for (fields, in_redis, payload) in PAYLOAD_CASES {
        assert_eq!(raw.next_text().await, *in_redis, "batch {fields}");
        assert_eq!(
            ws.recv_text().await,
            delivery_text(payload),
            "batch {fields}"
        );
    }
    drop(ws);
    gw.stop().await;
}

/// The embedded broker publishes the same bytes: the same frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_rule_holds_with_the_embedded_broker() {
    let gw = Gateway::start(test_config(None)).await;
    let mut ws = gw.client().await;
    ws.subscribe("p").await;
    for (fields, _, payload) in PAYLOAD_CASES {
        let body = format!(r#"{{"channel":"p",{fields}}}"#);
        assert_eq!(
            post(gw.addr, &body).await,
            (200, json!({"receivers":1})),
            "{body}"
        );
        assert_eq!(ws.recv_text().await, delivery_text(payload), "{body}");
    }
    drop(ws);
    gw.stop().await;
}

// ---------------------------------------------------------------- b) no second publish

/// Redis ran the PUBLISH, then the connection broke before the reply: the
/// gateway must not publish again, and must say the message may have been
/// published. (Regression: it retried after any non-timeout error, so the
/// message went out twice and the caller was told 200.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_after_the_publish_was_sent_does_not_publish_twice() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(&redis).await;
    let gw = Gateway::start(test_config(Some(proxy.url()))).await;
    let mut raw = RawSub::subscribe(&redis, "r").await;
    let mut ws = gw.client().await;
    ws.subscribe("r").await;

    proxy.arm(Fault::Cut {
        marker: PUBLISH,
        replies: 0,
    });
    let (status, reply) = post(gw.addr, r#"{"channel":"r","payload":1}"#).await;
    assert!(proxy.fired(), "the fault hit the publish");
    assert_eq!(
        (status, reply),
        (
            503,
            json!({
                "error":"broker connection lost after the message was sent: it may have been published",
                "published":0,
                "maybe_published":true
            })
        )
    );
    assert_eq!(redis.publish("r", b"\"marker\"").await, 2);
    raw.expect(&[b"1", b"\"marker\""]).await;
    assert_eq!(
        ws.recv_text().await,
        r#"{"action":"message","channel":"r","payload":1}"#
    );
    assert_eq!(
        ws.recv_text().await,
        r#"{"action":"message","channel":"r","payload":"marker"}"#
    );

    // The next publish goes out on a fresh connection, once.
    assert_eq!(
        post(gw.addr, r#"{"channel":"r","payload":2}"#).await,
        (200, json!({"receivers":2}))
    );
    raw.expect(&[b"2"]).await;
    drop(ws);
    gw.stop().await;
}

/// A batch cut after Redis answered two of four: the reply says which were
/// published and that the others may have been; none is published twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_cut_mid_reply_reports_what_was_published_and_publishes_nothing_twice() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(&redis).await;
    let gw = Gateway::start(test_config(Some(proxy.url()))).await;
    let mut raw = RawSub::subscribe(&redis, "r").await;
    proxy.arm(Fault::Cut {
        marker: PUBLISH,
        replies: 2,
    });
    let batch = r#"{"messages":[
        {"channel":"r","payload":1},{"channel":"r","payload":2},
        {"channel":"r","payload":3},{"channel":"r","payload":4}]}"#;
    let (status, reply) = post(gw.addr, batch).await;
    assert!(proxy.fired());
    assert_eq!(
        (status, reply),
        (
            503,
            json!({
                "error":"messages[2]: broker connection lost after the message was sent: it may have been published",
                "receivers":[1,1,null,null],
                "published":2,
                "maybe_published":true
            })
        )
    );
    assert_eq!(redis.publish("r", b"\"marker\"").await, 1);
    raw.expect(&[b"1", b"2", b"3", b"4", b"\"marker\""]).await;
    gw.stop().await;
}

/// A connection Redis closed while idle is replaced before the next publish,
/// which therefore succeeds (and goes out once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_publish_after_an_idle_connection_was_killed_succeeds_once() {
    let redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let mut raw = RawSub::subscribe(&redis, "k").await;
    assert_eq!(
        post(gw.addr, r#"{"channel":"k","payload":1}"#).await,
        (200, json!({"receivers":1}))
    );
    // Normal clients: the publish connection (not the pub/sub ones).
    assert!(redis.int(&["CLIENT", "KILL", "TYPE", "normal"]).await >= 1);
    assert_eq!(
        post(gw.addr, r#"{"channel":"k","payload":2}"#).await,
        (200, json!({"receivers":1}))
    );
    assert_eq!(redis.publish("k", b"\"marker\"").await, 1);
    raw.expect(&[b"1", b"2", b"\"marker\""]).await;
    gw.stop().await;
}

/// Redis is gone: 503, surely not published, quickly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_a_publish_is_refused_as_not_published() {
    let mut redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    redis.kill();
    let t = Instant::now();
    let (status, reply) = post(
        gw.addr,
        r#"{"messages":[{"channel":"x","payload":1},{"channel":"x","payload":2}]}"#,
    )
    .await;
    assert_eq!(
        (status, reply),
        (
            503,
            json!({
                "error":"messages[0]: broker unavailable",
                "receivers":[null,null],
                "published":0,
                "maybe_published":false
            })
        )
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    gw.stop().await;
}

// ---------------------------------------------------------------- b) idempotency keys

/// A publish cut after Redis ran it, retried by the client with the same
/// idempotency key: the retry returns the first result and publishes
/// nothing. The key lives in Redis for the TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_the_same_idempotency_key_is_not_published_again() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(&redis).await;
    let gw = Gateway::start(config(Some(proxy.url()), |c| {
        c.idempotency_ttl = Duration::from_secs(60);
    }))
    .await;
    let mut raw = RawSub::subscribe(&redis, "r").await;
    let mut ws = gw.client().await;
    ws.subscribe("r").await;

    proxy.arm(Fault::Cut {
        marker: EVALSHA,
        replies: 0,
    });
    let body = r#"{"channel":"r","payload":{"order":7},"idempotency_key":"k1"}"#;
    let (status, reply) = post(gw.addr, body).await;
    assert!(proxy.fired());
    assert_eq!(
        (status, reply["maybe_published"].clone()),
        (503, json!(true))
    );
    // The client's retry: the first result (the raw subscriber and the node).
    assert_eq!(post(gw.addr, body).await, (200, json!({"receivers":2})));
    assert_eq!(post(gw.addr, body).await, (200, json!({"receivers":2})));
    // The same key on another channel is another message.
    assert_eq!(
        post(
            gw.addr,
            r#"{"channel":"other","payload":0,"idempotency_key":"k1"}"#
        )
        .await,
        (200, json!({"receivers":0}))
    );
    assert_eq!(redis.publish("r", b"\"marker\"").await, 2);
    raw.expect(&[br#"{"order":7}"#, b"\"marker\""]).await;
    assert_eq!(
        ws.recv_text().await,
        r#"{"action":"message","channel":"r","payload":{"order":7}}"#
    );
    assert_eq!(
        ws.recv_text().await,
        r#"{"action":"message","channel":"r","payload":"marker"}"#
    );
    let ttl = redis.int(&["PTTL", "wsgate:idempotency:1:r:k1"]).await;
    assert!(ttl > 0 && ttl <= 60_000, "PTTL {ttl}");
    assert_eq!(
        redis.cmd(&["GET", "wsgate:idempotency:1:r:k1"]).await,
        redis::Value::BulkString(b"2".to_vec())
    );
    drop(ws);
    gw.stop().await;
}

/// A batch with a key per message, cut after two replies, retried whole: the
/// retry publishes only what the first attempt did not, and every message
/// reaches Redis exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_retried_with_its_keys_publishes_each_message_once() {
    let redis = Redis::start().await;
    let proxy = Proxy::start(&redis).await;
    let gw = Gateway::start(test_config(Some(proxy.url()))).await;
    let mut raw = RawSub::subscribe(&redis, "r").await;
    proxy.arm(Fault::Cut {
        marker: EVALSHA,
        replies: 2,
    });
    let batch = r#"{"messages":[
        {"channel":"r","payload":1,"idempotency_key":"b1"},
        {"channel":"r","payload":2,"idempotency_key":"b2"},
        {"channel":"r","payload":3,"idempotency_key":"b3"},
        {"channel":"r","payload":4}]}"#;
    let (status, reply) = post(gw.addr, batch).await;
    assert!(proxy.fired());
    assert_eq!(status, 503, "{reply}");
    assert_eq!(reply["receivers"], json!([1, 1, null, null]));
    assert_eq!(reply["maybe_published"], json!(true));
    // Redis ran all four; the client retries the three with keys.
    raw.expect(&[b"1", b"2", b"3", b"4"]).await;
    let retry = r#"{"messages":[
        {"channel":"r","payload":1,"idempotency_key":"b1"},
        {"channel":"r","payload":2,"idempotency_key":"b2"},
        {"channel":"r","payload":3,"idempotency_key":"b3"},
        {"channel":"r","payload":5,"idempotency_key":"b5"}]}"#;
    assert_eq!(
        post(gw.addr, retry).await,
        (200, json!({"receivers":[1,1,1,1]}))
    );
    assert_eq!(redis.publish("r", b"\"marker\"").await, 1);
    raw.expect(&[b"5", b"\"marker\""]).await;
    gw.stop().await;
}

/// Keys expire after `WSGATE_IDEMPOTENCY_TTL_MS`: then the same key publishes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_expire_after_the_ttl() {
    let redis = Redis::start().await;
    let gw = Gateway::start(config(Some(redis.url()), |c| {
        c.idempotency_ttl = Duration::from_millis(300);
    }))
    .await;
    let mut raw = RawSub::subscribe(&redis, "t").await;
    let body = r#"{"channel":"t","payload_text":"once","idempotency_key":"e"}"#;
    assert_eq!(post(gw.addr, body).await, (200, json!({"receivers":1})));
    assert_eq!(post(gw.addr, body).await, (200, json!({"receivers":1})));
    wait_until("the key expired in redis", WAIT, || async {
        redis.int(&["PTTL", "wsgate:idempotency:1:t:e"]).await == -2
    })
    .await;
    assert_eq!(post(gw.addr, body).await, (200, json!({"receivers":1})));
    assert_eq!(redis.publish("t", b"marker").await, 1);
    raw.expect(&[b"once", b"once", b"marker"]).await;
    gw.stop().await;
}

/// The embedded broker keeps keys in memory, per channel, with the same rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_with_the_embedded_broker() {
    let gw = Gateway::start(test_config(None)).await;
    let mut ws = gw.client().await;
    ws.subscribe("m").await;
    let body = r#"{"channel":"m","payload":1,"idempotency_key":"x"}"#;
    assert_eq!(post(gw.addr, body).await, (200, json!({"receivers":1})));
    assert_eq!(post(gw.addr, body).await, (200, json!({"receivers":1})));
    let batch = r#"{"messages":[
        {"channel":"m","payload":2,"idempotency_key":"y"},
        {"channel":"m","payload":3,"idempotency_key":"y"},
        {"channel":"m","payload":4,"idempotency_key":"x"},
        {"channel":"n","payload":5,"idempotency_key":"x"},
        {"channel":"m","payload":6}]}"#;
    assert_eq!(
        post(gw.addr, batch).await,
        (200, json!({"receivers":[1,1,1,0,1]}))
    );
    for n in [1, 2, 6] {
        assert_eq!(
            ws.recv_text().await,
            format!(r#"{{"action":"message","channel":"m","payload":{n}}}"#)
        );
    }
    drop(ws);
    gw.stop().await;
}

// ---------------------------------------------------------------- c) one round trip per batch

/// A batch is one pipeline: the proxy holds Redis's replies until it has
/// seen every PUBLISH of the batch, which happens only if the gateway sent
/// them all without waiting for a reply. (Regression: one round trip per
/// message, so the proxy waited for the second PUBLISH in vain.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_published_in_one_round_trip_and_in_order() {
    const N: usize = 50;
    let redis = Redis::start().await;
    let proxy = Proxy::start(&redis).await;
    let gw = Gateway::start(test_config(Some(proxy.url()))).await;
    let mut raw = RawSub::subscribe(&redis, "o").await;
    proxy.arm(Fault::Hold {
        marker: PUBLISH,
        count: N,
        bound: Duration::from_secs(2),
    });
    let items: Vec<String> = (0..N)
        .map(|i| format!(r#"{{"channel":"o","payload":{i}}}"#))
        .collect();
    let body = format!(r#"{{"messages":[{}]}}"#, items.join(","));
    assert_eq!(
        post(gw.addr, &body).await,
        (200, json!({"receivers": vec![1; N]}))
    );
    assert_eq!(
        *proxy.control.held_until_count.lock().unwrap(),
        Some(true),
        "every PUBLISH of the batch reached Redis before its first reply was released"
    );
    for i in 0..N {
        assert_eq!(raw.next().await, i.to_string().into_bytes(), "message {i}");
    }
    gw.stop().await;
}

// ---------------------------------------------------------------- d) connection name

/// The publish connection is named `wsgate:<WSGATE_NODE_ID>:publish`, also
/// after it was replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_connection_is_named_after_the_node() {
    let redis = Redis::start().await;
    let gw = Gateway::start(config(Some(redis.url()), |c| {
        c.node_id = "node-a.test".to_owned();
    }))
    .await;
    let named = || async {
        redis
            .client_names()
            .await
            .iter()
            .filter(|n| *n == "wsgate:node-a.test:publish")
            .count()
            == 1
    };
    wait_until("CLIENT LIST names the publish connection", WAIT, named).await;
    assert!(redis.int(&["CLIENT", "KILL", "TYPE", "normal"]).await >= 1);
    assert_eq!(
        post(gw.addr, r#"{"channel":"c","payload":1}"#).await,
        (200, json!({"receivers":0}))
    );
    assert!(
        named().await,
        "named again: {:?}",
        redis.client_names().await
    );
    gw.stop().await;
}

/// `WSGATE_NODE_ID` reaches the binary; a bad value stops start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_id_from_the_environment() {
    let redis = Redis::start().await;
    let gw = GatewayProcess::spawn(&[
        ("WSGATE_REDIS_URL", redis.url()),
        ("WSGATE_NODE_ID", "env-node".to_owned()),
    ])
    .await;
    wait_until("CLIENT LIST names the node", WAIT, || async {
        redis
            .client_names()
            .await
            .contains(&"wsgate:env-node:publish".to_owned())
    })
    .await;
    drop(gw);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .env("WSGATE_NODE_ID", "bad id")
        .env("WSGATE_LISTEN", format!("127.0.0.1:{}", free_port()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("WSGATE_NODE_ID"), "{stderr}");
}
