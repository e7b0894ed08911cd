//! The native protocol v1 end to end, against both brokers.
//!
//! Every test body is written once as `async fn name(b: Backend)` and run
//! twice by `both_backends!`: under `memory::name` (embedded broker, messages
//! published with HTTP `POST /publish`) and `redis::name` (a private
//! redis-server, messages published with a plain Redis `PUBLISH`, as
//! redis-cli would). [`Env::publish`] puts the same bytes on the channel on
//! both paths, so the expected frames are the same.
//!
//! "Not delivered" is always proven with a marker: publish the unwanted
//! message, then a wanted one, and assert the next frame is the wanted one.
//! No test sleeps to synchronise; every wait is bounded.

// The bodies are plain async fns run by `#[tokio::test]` wrappers, so
// clippy's allow-expect-in-tests does not see them as tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use wsgate::Config;

// ---------------------------------------------------------------- harness

/// Which broker a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// The embedded broker; publishes go through HTTP `POST /publish`.
    Memory,
    /// A private redis-server; publishes are Redis `PUBLISH` commands.
    Redis,
}

/// A running gateway (and, for Redis, the redis-server it uses).
struct Env {
    gw: Gateway,
    /// Kept alive for the test's duration; dropped after the gateway stops.
    redis: Option<Redis>,
}

impl Backend {
    async fn start(self) -> Env {
        self.start_with(|c| c).await
    }

    /// Starts with `test_config` adjusted by `tweak` (struct update syntax).
    async fn start_with(self, tweak: impl FnOnce(Config) -> Config) -> Env {
        match self {
            Backend::Memory => Env {
                gw: Gateway::start(tweak(test_config(None))).await,
                redis: None,
            },
            Backend::Redis => {
                let redis = Redis::start().await;
                let gw = Gateway::start(tweak(test_config(Some(redis.url())))).await;
                Env {
                    gw,
                    redis: Some(redis),
                }
            }
        }
    }
}

impl Env {
    async fn client(&self) -> Client {
        self.gw.client().await
    }

    /// Puts exactly the bytes of `payload` on `channel`; returns the receiver
    /// count. Redis: `PUBLISH channel payload`. Memory: `POST /publish`, with
    /// the payload as a JSON value (see [`http_payload`]).
    async fn publish(&self, channel: &str, payload: &str) -> u64 {
        let counts = self
            .publish_many(&[(channel.to_owned(), payload.to_owned())])
            .await;
        counts[0]
    }

    /// Publishes several messages in order. Memory: one batch request.
    async fn publish_many(&self, messages: &[(String, String)]) -> Vec<u64> {
        match &self.redis {
            Some(redis) => {
                let mut counts = Vec::with_capacity(messages.len());
                for (channel, payload) in messages {
                    let n = redis.publish(channel, payload.as_bytes()).await;
                    counts.push(u64::try_from(n).expect("non-negative count"));
                }
                counts
            }
            None => {
                let items: Vec<String> = messages
                    .iter()
                    .map(|(c, p)| format!(r#"{{"channel":{},{}}}"#, json!(c), http_payload(p)))
                    .collect();
                let (body, single) = if items.len() == 1 {
                    (items[0].clone(), true)
                } else {
                    (format!(r#"{{"messages":[{}]}}"#, items.join(",")), false)
                };
                let (status, text) = self.post_publish(&body).await;
                assert_eq!(status, 200, "POST /publish {body}: {text}");
                let reply: Value = serde_json::from_str(&text).expect("publish reply is JSON");
                let as_count =
                    |v: &Value| v.as_u64().unwrap_or_else(|| panic!("bad count in {reply}"));
                if single {
                    vec![as_count(&reply["receivers"])]
                } else {
                    let list = reply["receivers"].as_array().expect("receivers list");
                    assert_eq!(list.len(), messages.len(), "{reply}");
                    list.iter().map(as_count).collect()
                }
            }
        }
    }

    /// `POST /publish` with a raw body: (status, body text).
    async fn post_publish(&self, body: &str) -> (u16, String) {
        http(self.gw.addr, "POST", "/publish", Some(body)).await
    }

    /// The value of an unlabelled metric from `/metrics`.
    async fn metric(&self, name: &str) -> f64 {
        let text = self.gw.metrics().await;
        text.lines()
            .find_map(|line| {
                line.strip_prefix(name)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("metric {name} not found in:\n{text}"))
    }

    /// Stops the gateway, then redis-server. Drop or drain clients first.
    async fn stop(self) {
        self.gw.stop().await;
        drop(self.redis);
    }
}

/// The field of an HTTP publish that makes the gateway publish exactly
/// `text`: JSON text (a string literal included) goes in `payload` as is (the
/// gateway publishes a payload's JSON text byte for byte), anything else
/// (plain text, the empty string) in `payload_text` as a JSON string (the
/// gateway publishes its raw contents).
fn http_payload(text: &str) -> String {
    let raw_json = text.trim() == text && serde_json::from_str::<Value>(text).is_ok();
    if raw_json {
        format!(r#""payload":{text}"#)
    } else {
        format!(r#""payload_text":{}"#, Value::String(text.to_owned()))
    }
}

fn nz(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).expect("non-zero")
}

/// The delivery frame the native protocol sends.
fn delivery(pattern: Option<&str>, channel: &str, payload: Value) -> Value {
    match pattern {
        Some(p) => json!({"action":"message","pattern":p,"channel":channel,"payload":payload}),
        None => json!({"action":"message","channel":channel,"payload":payload}),
    }
}

/// Runs each listed test body against both brokers. Attributes before a
/// name (e.g. `#[ignore = ".."]`) are copied onto both wrappers.
macro_rules! both_backends {
    ($($(#[$attr:meta])* $name:ident),* $(,)?) => {
        mod memory {
            $(
                $(#[$attr])*
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Backend::Memory).await
                }
            )*
        }
        mod redis {
            $(
                $(#[$attr])*
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Backend::Redis).await
                }
            )*
        }
    };
}

both_backends!(
    pattern_delivery_of_every_payload_kind,
    exact_channel_delivery,
    channel_and_pattern_each_deliver,
    duplicate_subscribe_and_unsubscribe,
    ping_pong,
    malformed_frames_get_errors_and_the_connection_survives,
    limits,
    slow_consumer_is_closed_and_others_get_everything,
    http_publish,
    http_publish_null_payload,
);

// ---------------------------------------------------------------- 1. patterns

async fn pattern_delivery_of_every_payload_kind(b: Backend) {
    let env = b.start().await;
    let mut c = env.client().await;
    let reply = c
        .request(json!({"action":"subscribe","pattern":"news.*","id":"c1"}))
        .await;
    assert_eq!(
        reply,
        json!({"action":"subscribe","pattern":"news.*","id":"c1","status":true})
    );

    let cases: [(&str, Value); 12] = [
        (
            r#"{"score":3,"tags":["a","b"]}"#,
            json!({"score":3,"tags":["a","b"]}),
        ),
        ("42", json!(42)),
        ("-2.5", json!(-2.5)),
        (
            r#"[1,"two",null,{"x":false}]"#,
            json!([1, "two", null, {"x": false}]),
        ),
        ("true", json!(true)),
        ("[]", json!([])),
        // a JSON string literal is JSON: embedded as that string
        (r#""quoted""#, json!("quoted")),
        ("hello world", json!("hello world")),
        (
            "h\u{e9}llo \"w\u{f6}rld\"\n\ttab \\ \u{1F600}",
            json!("h\u{e9}llo \"w\u{f6}rld\"\n\ttab \\ \u{1F600}"),
        ),
        // looks like JSON but is not: a string
        (r#"{"unterminated":"#, json!(r#"{"unterminated":"#)),
        ("1 2", json!("1 2")),
        ("", json!("")),
    ];
    for (channel, (payload, expected)) in
        ["news.sport", "news.weather.eu"].iter().cycle().zip(cases)
    {
        assert_eq!(env.publish(channel, payload).await, 1, "{payload:?}");
        assert_eq!(
            c.recv().await,
            delivery(Some("news.*"), channel, expected),
            "payload {payload:?}"
        );
    }

    // The exact frame text: field order as documented, JSON payload embedded
    // byte for byte (spaces and key order kept), text payload escaped.
    let raw = r#"{"b":1, "a":[1, 2]}"#;
    assert_eq!(env.publish("news.raw", raw).await, 1);
    assert_eq!(
        c.recv_text().await,
        format!(
            r#"{{"action":"message","pattern":"news.*","channel":"news.raw","payload":{raw}}}"#
        )
    );
    assert_eq!(env.publish("news.raw", "say \"hi\"").await, 1);
    assert_eq!(
        c.recv_text().await,
        r#"{"action":"message","pattern":"news.*","channel":"news.raw","payload":"say \"hi\""}"#
    );
    assert_eq!(env.publish("news.raw", "").await, 1);
    assert_eq!(
        c.recv_text().await,
        r#"{"action":"message","pattern":"news.*","channel":"news.raw","payload":""}"#
    );

    // Glob semantics: `?` is one byte, `[..]` a class; non-matching channels
    // are not delivered (marker technique).
    let reply = c
        .request(json!({"action":"subscribe","pattern":"log.[ab]?"}))
        .await;
    assert_eq!(
        reply,
        json!({"action":"subscribe","pattern":"log.[ab]?","status":true})
    );
    // Redis holds `log.[ab]?` as the cover `log.*` (docs/security.md,
    // pattern cost), so its receiver count includes the cover; the node
    // matches the exact pattern and delivers none of these.
    let covered = match b {
        Backend::Memory => 0,
        Backend::Redis => 1,
    };
    assert_eq!(env.publish("log.cx", "\"no: class\"").await, covered);
    assert_eq!(
        env.publish("log.a", "\"no: ? needs one byte\"").await,
        covered
    );
    assert_eq!(env.publish("log.axy", "\"no: too long\"").await, covered);
    assert_eq!(env.publish("news", "\"no: news.* needs the dot\"").await, 0);
    assert_eq!(env.publish("log.bz", "{\"marker\":1}").await, 1);
    assert_eq!(
        c.recv().await,
        delivery(Some("log.[ab]?"), "log.bz", json!({"marker":1}))
    );

    drop(c);
    env.stop().await;
}

// ---------------------------------------------------------------- 2. channels

async fn exact_channel_delivery(b: Backend) {
    let env = b.start().await;
    let mut c = env.client().await;
    let reply = c
        .request(json!({"action":"subscribe","channel":"news.sport","id":"e1"}))
        .await;
    assert_eq!(
        reply,
        json!({"action":"subscribe","channel":"news.sport","id":"e1","status":true})
    );

    assert_eq!(env.publish("news.sport", r#"{"score":1}"#).await, 1);
    let frame = c.recv().await;
    assert_eq!(frame, delivery(None, "news.sport", json!({"score":1})));
    assert!(frame.get("pattern").is_none(), "{frame}");
    assert_eq!(
        recv_text_after(&env, &mut c, "news.sport", "plain").await,
        r#"{"action":"message","channel":"news.sport","payload":"plain"}"#
    );

    // Other channels, close as they may be, are not delivered.
    for other in ["news.sports", "news.spor", "NEWS.SPORT", "news.sport ", "x"] {
        assert_eq!(env.publish(other, "\"unwanted\"").await, 0, "{other:?}");
    }
    assert_eq!(env.publish("news.sport", "\"marker\"").await, 1);
    assert_eq!(
        c.recv().await,
        delivery(None, "news.sport", json!("marker"))
    );

    // A channel name with glob characters is a literal name, not a pattern.
    c.subscribe("alerts.*").await;
    assert_eq!(env.publish("alerts.disk", "\"unwanted\"").await, 0);
    assert_eq!(env.publish("alerts.*", "\"literal\"").await, 1);
    assert_eq!(c.recv().await, delivery(None, "alerts.*", json!("literal")));

    drop(c);
    env.stop().await;
}

/// Publishes `payload` to `channel` and returns the next frame's raw text.
async fn recv_text_after(env: &Env, c: &mut Client, channel: &str, payload: &str) -> String {
    assert_eq!(env.publish(channel, payload).await, 1);
    c.recv_text().await
}

// ---------------------------------------------------------------- 3. channel + pattern

async fn channel_and_pattern_each_deliver(b: Backend) {
    let env = b.start().await;
    let mut c = env.client().await;
    c.subscribe("news.sport").await;
    c.psubscribe("news.*").await;

    // One publish, two subscriptions on this node: two receivers, two frames.
    assert_eq!(env.publish("news.sport", r#"{"n":1}"#).await, 2);
    let mut got = vec![c.recv().await, c.recv().await];
    let mut want = vec![
        delivery(None, "news.sport", json!({"n":1})),
        delivery(Some("news.*"), "news.sport", json!({"n":1})),
    ];
    let key = |v: &Value| v.to_string();
    got.sort_by_key(key);
    want.sort_by_key(key);
    assert_eq!(got, want);
    // ...and no third one: the next frame is the marker (pattern only).
    assert_eq!(env.publish("news.other", "\"marker\"").await, 1);
    assert_eq!(
        c.recv().await,
        delivery(Some("news.*"), "news.other", json!("marker"))
    );

    // A pattern and a channel with the same text are two subscriptions.
    let mut d = env.client().await;
    d.subscribe("x").await;
    d.psubscribe("x").await;
    assert_eq!(env.publish("x", "7").await, 2);
    let mut got = vec![d.recv().await, d.recv().await];
    let mut want = vec![
        delivery(None, "x", json!(7)),
        delivery(Some("x"), "x", json!(7)),
    ];
    got.sort_by_key(key);
    want.sort_by_key(key);
    assert_eq!(got, want);
    d.punsubscribe("x").await;
    assert_eq!(env.publish("x", "8").await, 1);
    assert_eq!(d.recv().await, delivery(None, "x", json!(8)));

    drop((c, d));
    env.stop().await;
}

// ---------------------------------------------------------------- 4. duplicates

async fn duplicate_subscribe_and_unsubscribe(b: Backend) {
    let env = b.start().await;
    let mut c = env.client().await;
    c.subscribe("marker").await;
    let ok = c
        .request(json!({"action":"subscribe","pattern":"news.*","id":"d1"}))
        .await;
    assert_eq!(
        ok,
        json!({"action":"subscribe","pattern":"news.*","id":"d1","status":true})
    );
    let dup = c
        .request(json!({"action":"subscribe","pattern":"news.*","id":"d2"}))
        .await;
    assert_eq!(
        dup,
        json!({"action":"subscribe","pattern":"news.*","id":"d2","status":false,"error":"already subscribed"})
    );
    let dup = c
        .request(json!({"action":"subscribe","channel":"marker"}))
        .await;
    assert_eq!(
        dup,
        json!({"action":"subscribe","channel":"marker","status":false,"error":"already subscribed"})
    );

    // Still subscribed, exactly once: one frame per publish, in order.
    assert_eq!(env.publish("news.a", "\"one\"").await, 1);
    assert_eq!(env.publish("news.b", "\"two\"").await, 1);
    assert_eq!(
        c.recv().await,
        delivery(Some("news.*"), "news.a", json!("one"))
    );
    assert_eq!(
        c.recv().await,
        delivery(Some("news.*"), "news.b", json!("two"))
    );
    assert_eq!(env.publish("marker", "\"m1\"").await, 1);
    assert_eq!(c.recv().await, delivery(None, "marker", json!("m1")));

    // Unsubscribing what is not held is refused, whatever the near miss.
    for (request, reply) in [
        (
            json!({"action":"unsubscribe","pattern":"other.*","id":"u1"}),
            json!({"action":"unsubscribe","pattern":"other.*","id":"u1","status":false,"error":"not subscribed"}),
        ),
        (
            // held as a pattern, not as a channel
            json!({"action":"unsubscribe","channel":"news.*"}),
            json!({"action":"unsubscribe","channel":"news.*","status":false,"error":"not subscribed"}),
        ),
        (
            // matched by a held pattern, but not itself held
            json!({"action":"unsubscribe","channel":"news.a"}),
            json!({"action":"unsubscribe","channel":"news.a","status":false,"error":"not subscribed"}),
        ),
    ] {
        assert_eq!(c.request(request).await, reply);
    }

    let bye = c
        .request(json!({"action":"unsubscribe","pattern":"news.*","id":"u2"}))
        .await;
    assert_eq!(
        bye,
        json!({"action":"unsubscribe","pattern":"news.*","id":"u2","status":true})
    );
    let again = c
        .request(json!({"action":"unsubscribe","pattern":"news.*","id":"u3"}))
        .await;
    assert_eq!(
        again,
        json!({"action":"unsubscribe","pattern":"news.*","id":"u3","status":false,"error":"not subscribed"})
    );
    // Redis may still hold the pattern for a moment (the count may be 0 or
    // 1), but the client must not get the message.
    env.publish("news.a", "\"gone\"").await;
    assert_eq!(env.publish("marker", "\"m2\"").await, 1);
    assert_eq!(c.recv().await, delivery(None, "marker", json!("m2")));

    // Subscribing again right away works.
    c.psubscribe("news.*").await;
    assert_eq!(env.publish("news.c", "\"back\"").await, 1);
    assert_eq!(
        c.recv().await,
        delivery(Some("news.*"), "news.c", json!("back"))
    );

    drop(c);
    env.stop().await;
}

// ---------------------------------------------------------------- 5. ping

async fn ping_pong(b: Backend) {
    let env = b.start().await;
    let mut c = env.client().await;
    assert_eq!(
        recv_after_send(&mut c, r#"{"action":"ping","id":"c3"}"#).await,
        r#"{"action":"pong","id":"c3"}"#
    );
    assert_eq!(
        recv_after_send(&mut c, r#"{"action":"ping"}"#).await,
        r#"{"action":"pong"}"#
    );
    // A null id is no id; unknown extra fields are ignored.
    assert_eq!(
        recv_after_send(&mut c, r#"{"action":"ping","id":null}"#).await,
        r#"{"action":"pong"}"#
    );
    assert_eq!(
        recv_after_send(&mut c, r#"{"id":"x","future":[1],"action":"ping"}"#).await,
        r#"{"action":"pong","id":"x"}"#
    );
    // WebSocket-level ping: a pong frame with the same payload.
    c.ws.send(Message::Ping(b"hb".to_vec().into()))
        .await
        .expect("send ping");
    match c.next_message().await {
        Some(Message::Pong(p)) => assert_eq!(&p[..], b"hb"),
        other => panic!("expected a pong frame, got {other:?}"),
    }
    drop(c);
    env.stop().await;
}

async fn recv_after_send(c: &mut Client, text: &str) -> String {
    c.send_text(text).await;
    c.recv_text().await
}

// ---------------------------------------------------------------- 6. malformed

async fn malformed_frames_get_errors_and_the_connection_survives(b: Backend) {
    let env = b.start().await;
    let mut bystander = env.client().await;
    bystander.psubscribe("m.*").await;
    let mut c = env.client().await;

    enum Frame {
        Text(&'static str),
        Binary(&'static [u8]),
    }
    use Frame::{Binary, Text};
    // (frame, a substring of the reason, the id echoed)
    let cases: Vec<(Frame, &str, Option<&str>)> = vec![
        (Text("not json"), "invalid JSON", None),
        (Text(""), "invalid JSON", None),
        (
            Text(r#"{"action":"subscribe","pattern":"a""#),
            "invalid JSON",
            None,
        ),
        (Text(r#"{"action":"ping"} trailing"#), "invalid JSON", None),
        (Text("[1,2]"), "must be a JSON object", None),
        (Text(r#""subscribe""#), "must be a JSON object", None),
        (Text("null"), "must be a JSON object", None),
        (
            Text(r#"{"pattern":"a","id":"m1"}"#),
            "missing field \"action\"",
            Some("m1"),
        ),
        (
            Text(r#"{"action":"jump","id":"m2"}"#),
            "unknown action \"jump\"",
            Some("m2"),
        ),
        (
            Text(r#"{"action":"Subscribe","pattern":"a"}"#),
            "unknown action",
            None,
        ),
        (
            Text(r#"{"action":7,"id":"m3"}"#),
            "\"action\" must be a string",
            Some("m3"),
        ),
        (
            Text(r#"{"action":null}"#),
            "\"action\" must be a string",
            None,
        ),
        (
            Text(r#"{"action":"subscribe","id":"m4"}"#),
            "missing field \"pattern\" or \"channel\"",
            Some("m4"),
        ),
        (
            Text(r#"{"action":"unsubscribe"}"#),
            "missing field \"pattern\" or \"channel\"",
            None,
        ),
        (
            Text(r#"{"action":"subscribe","pattern":"a","channel":"b","id":"m5"}"#),
            "not both",
            Some("m5"),
        ),
        (
            Text(r#"{"action":"subscribe","pattern":5,"id":"m6"}"#),
            "\"pattern\" must be a string",
            Some("m6"),
        ),
        (
            Text(r#"{"action":"unsubscribe","channel":["x"],"id":"m7"}"#),
            "\"channel\" must be a string",
            Some("m7"),
        ),
        (
            Text(r#"{"action":"ping","id":5}"#),
            "\"id\" must be a string",
            None,
        ),
        (
            Text(r#"{"action":"subscribe","pattern":"a","id":{"k":1}}"#),
            "\"id\" must be a string",
            None,
        ),
        (
            Binary(br#"{"action":"ping","id":"b1"}"#),
            "binary frames are not supported",
            None,
        ),
    ];
    let mut published = Vec::new();
    for (i, (frame, reason, id)) in cases.iter().enumerate() {
        let shown = match frame {
            Text(t) => {
                c.send_text(t).await;
                format!("text {t:?}")
            }
            Binary(bytes) => {
                c.ws.send(Message::Binary(bytes.to_vec().into()))
                    .await
                    .expect("send binary");
                format!("binary {bytes:?}")
            }
        };
        let reply = c.recv().await;
        let obj = reply
            .as_object()
            .unwrap_or_else(|| panic!("{shown}: {reply}"));
        assert_eq!(reply["action"], "error", "{shown}: {reply}");
        let error = reply["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{shown}: {reply}"));
        assert!(
            error.contains(reason),
            "{shown}: {error:?} lacks {reason:?}"
        );
        assert_eq!(
            reply.get("id").and_then(Value::as_str),
            *id,
            "{shown}: {reply}"
        );
        assert_eq!(
            obj.len(),
            2 + usize::from(id.is_some()),
            "{shown}: extra fields in {reply}"
        );
        // Meanwhile the other client keeps receiving.
        let payload = format!(r#"{{"i":{i}}}"#);
        assert_eq!(env.publish(&format!("m.{i}"), &payload).await, 1);
        published.push((format!("m.{i}"), json!({ "i": i })));
    }
    assert_eq!(
        env.metric("wsgate_malformed_frames_total").await,
        cases.len() as f64
    );

    // The same connection still works.
    c.psubscribe("m.*").await;
    let reply = c.request(json!({"action":"ping","id":"after"})).await;
    assert_eq!(reply, json!({"action":"pong","id":"after"}));
    assert_eq!(env.publish("m.last", "\"last\"").await, 1);
    assert_eq!(
        c.recv().await,
        delivery(Some("m.*"), "m.last", json!("last"))
    );
    published.push(("m.last".to_owned(), json!("last")));

    // The bystander got every message, in order, and nothing else.
    for (channel, payload) in published {
        assert_eq!(
            bystander.recv().await,
            delivery(Some("m.*"), &channel, payload)
        );
    }
    let reply = bystander.request(json!({"action":"ping","id":"end"})).await;
    assert_eq!(reply, json!({"action":"pong","id":"end"}));

    drop((c, bystander));
    env.stop().await;
}

// ---------------------------------------------------------------- 7. limits

async fn limits(b: Backend) {
    const MAX_MESSAGE: usize = 1024;
    let env = b
        .start_with(|c| Config {
            max_subscriptions: nz(2),
            max_pattern_bytes: nz(8),
            max_message_bytes: nz(MAX_MESSAGE),
            ..c
        })
        .await;
    let mut other = env.client().await;
    other.subscribe("lim.b").await;
    let mut c = env.client().await;

    let refusals = [
        (
            json!({"action":"subscribe","pattern":"abcdefgh*","id":"p9"}),
            json!({"action":"subscribe","pattern":"abcdefgh*","id":"p9","status":false,"error":"pattern too long (9 bytes, max 8)"}),
        ),
        (
            json!({"action":"subscribe","channel":"abcdefghi"}),
            json!({"action":"subscribe","channel":"abcdefghi","status":false,"error":"channel too long (9 bytes, max 8)"}),
        ),
        (
            json!({"action":"subscribe","pattern":"","id":"e"}),
            json!({"action":"subscribe","pattern":"","id":"e","status":false,"error":"invalid pattern: empty"}),
        ),
        (
            json!({"action":"subscribe","channel":""}),
            json!({"action":"subscribe","channel":"","status":false,"error":"invalid channel: empty"}),
        ),
        (
            json!({"action":"subscribe","pattern":"a\u{1}b"}),
            json!({"action":"subscribe","pattern":"a\u{1}b","status":false,"error":"invalid pattern: control characters are not allowed"}),
        ),
    ];
    for (request, reply) in refusals {
        assert_eq!(c.request(request).await, reply);
    }

    // None of the refusals took a slot: two subscriptions fit, 8 bytes is fine.
    c.psubscribe("abcdefg*").await;
    c.subscribe("lim.x").await;
    let third = c
        .request(json!({"action":"subscribe","pattern":"lim.?","id":"s3"}))
        .await;
    assert_eq!(
        third,
        json!({"action":"subscribe","pattern":"lim.?","id":"s3","status":false,"error":"subscription limit reached (2)"})
    );
    // The refused subscription delivers nothing.
    assert_eq!(env.publish("lim.q", "\"refused\"").await, 0);
    assert_eq!(env.publish("abcdefgX", "\"marker\"").await, 1);
    assert_eq!(
        c.recv().await,
        delivery(Some("abcdefg*"), "abcdefgX", json!("marker"))
    );
    // Freeing a slot makes room again.
    let bye = c
        .request(json!({"action":"unsubscribe","channel":"lim.x"}))
        .await;
    assert_eq!(
        bye,
        json!({"action":"unsubscribe","channel":"lim.x","status":true})
    );
    c.psubscribe("lim.?").await;
    assert_eq!(env.publish("lim.q", "\"now\"").await, 1);
    assert_eq!(
        c.recv().await,
        delivery(Some("lim.?"), "lim.q", json!("now"))
    );

    // A frame of exactly max_message_bytes is served...
    let prefix = r#"{"action":"ping","id":""#;
    let id = "i".repeat(MAX_MESSAGE - prefix.len() - 2);
    let exact = format!(r#"{prefix}{id}"}}"#);
    assert_eq!(exact.len(), MAX_MESSAGE);
    c.send_text(&exact).await;
    assert_eq!(c.recv().await, json!({"action":"pong","id":id}));
    // ...one byte more closes the connection with 1009.
    let over = format!(r#"{prefix}{id}i"}}"#);
    assert_eq!(over.len(), MAX_MESSAGE + 1);
    c.send_text(&over).await;
    let close = c.expect_close().await.expect("a close frame with a code");
    assert_eq!(u16::from(close.code), 1009, "{close:?}");
    assert!(c.next_message().await.is_none(), "the connection ends");

    // The other client is unaffected.
    assert_eq!(env.publish("lim.b", r#"{"still":true}"#).await, 1);
    assert_eq!(
        other.recv().await,
        delivery(None, "lim.b", json!({"still":true}))
    );
    let pong = other.request(json!({"action":"ping","id":"ok"})).await;
    assert_eq!(pong, json!({"action":"pong","id":"ok"}));

    drop((c, other));
    env.stop().await;
}

// ---------------------------------------------------------------- 8. slow consumer

async fn slow_consumer_is_closed_and_others_get_everything(b: Backend) {
    const QUEUE: usize = 64 * 1024;
    // Messages per round. The reader drains its queue between rounds, so it
    // never holds more than WINDOW frames (~34 KiB) and is never slow itself.
    const WINDOW: usize = 32;
    const MAX_MESSAGES: usize = 40_000;
    let env = b
        .start_with(|c| Config {
            client_queue_bytes: nz(QUEUE),
            ..c
        })
        .await;
    let mut slow = env.client().await;
    slow.psubscribe("flood.*").await;
    let mut reader = env.client().await;
    reader.psubscribe("flood.*").await;
    // From here on, `slow` is not read until the gateway reports it closed.

    let pad = "x".repeat(1000);
    let payload = |seq: usize| format!(r#"{{"seq":{seq},"pad":"{pad}"}}"#);
    let expected = |seq: usize| delivery(Some("flood.*"), "flood.a", json!({"seq":seq,"pad":pad}));
    let deadline = Instant::now() + Duration::from_secs(30);
    let started = Instant::now();
    let mut sent = 0;
    loop {
        let round: Vec<(String, String)> = (sent..sent + WINDOW)
            .map(|seq| ("flood.a".to_owned(), payload(seq)))
            .collect();
        // One subscription on the node (the pattern), whoever is slow.
        assert_eq!(env.publish_many(&round).await, vec![1; WINDOW]);
        for seq in sent..sent + WINDOW {
            assert_eq!(reader.recv().await, expected(seq), "reader, message {seq}");
        }
        sent += WINDOW;
        if env.metric("wsgate_slow_consumer_closes_total").await >= 1.0 {
            break;
        }
        assert!(
            sent < MAX_MESSAGES && Instant::now() < deadline,
            "no slow-consumer close after {sent} messages in {:?}",
            started.elapsed()
        );
    }
    eprintln!(
        "slow consumer closed after {sent} messages in {:?}",
        started.elapsed()
    );

    // The slow client now reads: an in-order prefix of the messages (what the
    // kernel and tungstenite had buffered), then close 4008.
    let mut next = 0;
    let close = loop {
        match slow.next_message().await {
            Some(Message::Text(t)) => {
                let v: Value = serde_json::from_str(&t).expect("JSON");
                assert_eq!(v, expected(next), "slow client, message {next}");
                next += 1;
            }
            Some(Message::Ping(_) | Message::Pong(_)) => {}
            Some(Message::Close(frame)) => break frame.expect("a close code"),
            other => panic!("slow client: unexpected {other:?}"),
        }
    };
    assert_eq!(u16::from(close.code), 4008, "{close:?}");
    assert_eq!(close.reason.as_str(), "slow consumer");
    assert!(next < sent, "the slow client cannot have got everything");
    assert!(slow.next_message().await.is_none(), "the connection ends");
    eprintln!("the slow client got {next} of {sent} before 4008");

    // The reader got everything exactly once: the next frame is the last one.
    assert_eq!(env.publish("flood.a", &payload(sent)).await, 1);
    assert_eq!(reader.recv().await, expected(sent));
    let pong = reader.request(json!({"action":"ping","id":"alive"})).await;
    assert_eq!(pong, json!({"action":"pong","id":"alive"}));
    assert_eq!(env.metric("wsgate_slow_consumer_closes_total").await, 1.0);
    assert_eq!(
        env.metric("wsgate_broker_messages_dropped_total").await,
        0.0
    );

    drop((slow, reader));
    env.stop().await;
}

// ---------------------------------------------------------------- 9. HTTP publish

async fn http_publish(b: Backend) {
    const LIMIT: usize = 4096;
    let env = b
        .start_with(|c| Config {
            max_publish_bytes: nz(LIMIT),
            ..c
        })
        .await;
    let mut one = env.client().await;
    one.subscribe("h.one").await;
    let mut all = env.client().await;
    all.psubscribe("h.*").await;
    let mut twin = env.client().await;
    twin.subscribe("h.one").await;

    // `receivers` counts subscriptions per node, not sockets (docs/design.md):
    // `one` and `twin` share the node's h.one subscription, `all` adds h.*.
    let r = env
        .gw
        .publish(json!({"channel":"h.one","payload":"disk full"}))
        .await;
    assert_eq!(r, (200, json!({"receivers":2})));
    assert_eq!(
        one.recv().await,
        delivery(None, "h.one", json!("disk full"))
    );
    assert_eq!(
        twin.recv().await,
        delivery(None, "h.one", json!("disk full"))
    );
    assert_eq!(
        all.recv().await,
        delivery(Some("h.*"), "h.one", json!("disk full"))
    );

    let object = json!({"k":[1,2],"s":"x","n":null,"deep":{"t":true}});
    let r = env
        .gw
        .publish(json!({"channel":"h.one","payload":object}))
        .await;
    assert_eq!(r, (200, json!({"receivers":2})));
    assert_eq!(one.recv().await, delivery(None, "h.one", object.clone()));
    assert_eq!(twin.recv().await, delivery(None, "h.one", object.clone()));
    assert_eq!(
        all.recv().await,
        delivery(Some("h.*"), "h.one", object.clone())
    );

    // A string payload is published as its JSON text, quotes included: a
    // string holding JSON text arrives as that string (docs/protocol.md);
    // `payload_text` publishes raw text, which is JSON here.
    let r = env
        .gw
        .publish(json!({"channel":"h.two","payload":"{\"a\":1}"}))
        .await;
    assert_eq!(r, (200, json!({"receivers":1})));
    assert_eq!(
        all.recv().await,
        delivery(Some("h.*"), "h.two", json!("{\"a\":1}"))
    );
    let r = env
        .gw
        .publish(json!({"channel":"h.two","payload_text":"{\"a\":1}"}))
        .await;
    assert_eq!(r, (200, json!({"receivers":1})));
    assert_eq!(
        all.recv().await,
        delivery(Some("h.*"), "h.two", json!({"a":1}))
    );
    // The JSON text of a value is published byte for byte.
    let (status, text) = env
        .post_publish(r#"{"channel":"h.two","payload":{"z":1,  "a":[ 2 ]}}"#)
        .await;
    assert_eq!((status, text.as_str()), (200, r#"{"receivers":1}"#));
    assert_eq!(
        all.recv_text().await,
        r#"{"action":"message","pattern":"h.*","channel":"h.two","payload":{"z":1,  "a":[ 2 ]}}"#
    );

    // Nobody holds it.
    let r = env
        .gw
        .publish(json!({"channel":"nobody","payload":1}))
        .await;
    assert_eq!(r, (200, json!({"receivers":0})));

    // Batch: one count per message, in order; deliveries in order.
    let r = env
        .gw
        .publish(json!({"messages":[
            {"channel":"h.one","payload":{"n":1}},
            {"channel":"nobody","payload":2},
            {"channel":"h.two","payload":"s"},
            {"channel":"h.one","payload":[true]},
        ]}))
        .await;
    assert_eq!(r, (200, json!({"receivers":[2,0,1,2]})));
    for c in [&mut one, &mut twin] {
        assert_eq!(c.recv().await, delivery(None, "h.one", json!({"n":1})));
        assert_eq!(c.recv().await, delivery(None, "h.one", json!([true])));
    }
    assert_eq!(
        all.recv().await,
        delivery(Some("h.*"), "h.one", json!({"n":1}))
    );
    assert_eq!(all.recv().await, delivery(Some("h.*"), "h.two", json!("s")));
    assert_eq!(
        all.recv().await,
        delivery(Some("h.*"), "h.one", json!([true]))
    );

    // Bad bodies: 400 with an error, and nothing published (not even the
    // valid head of a batch).
    for body in [
        "not json",
        "",
        "[]",
        "42",
        r#"{"channel":"h.one"}"#,
        r#"{"payload":1}"#,
        r#"{"messages":[]}"#,
        r#"{"messages":{}}"#,
        r#"{"channel":"h.one","payload":1,"extra":true}"#,
        r#"{"messages":[{"channel":"h.one","payload":1,"x":1}]}"#,
        r#"{"messages":[{"channel":"h.one"}]}"#,
        r#"{"channel":5,"payload":1}"#,
        r#"{"channel":"","payload":1}"#,
        r#"{"channel":"h.one","payload":1,"messages":[{"channel":"h.one","payload":1}]}"#,
        r#"{"messages":[{"channel":"h.one","payload":"partial"},{"channel":"","payload":2}]}"#,
        r#"{"channel":"h.one","payload":1} trailing"#,
        r#"{"channel":"h.one","payload":1,"payload_text":"1"}"#,
        r#"{"channel":"h.one","payload_text":1}"#,
        r#"{"channel":"h.one","payload_text":null}"#,
        r#"{"channel":"h.one","payload":1,"idempotency_key":""}"#,
        r#"{"channel":"h.one","payload":1,"idempotency_key":7}"#,
        r#"{"idempotency_key":"k","messages":[{"channel":"h.one","payload":1}]}"#,
        r#"{"messages":[{"channel":"h.one","payload":1},{"channel":"h.one","payload":2,"payload_text":"2"}]}"#,
    ] {
        let (status, text) = env.post_publish(body).await;
        assert_eq!(status, 400, "{body:?}: {text}");
        let reply: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{body:?}: {text}"));
        assert!(reply["error"].is_string(), "{body:?}: {reply}");
    }

    // Size: exactly the limit is accepted, one byte more is 413.
    let head = r#"{"channel":"h.one","payload":""#;
    let fill = "f".repeat(LIMIT - head.len() - 2);
    let exact = format!(r#"{head}{fill}"}}"#);
    assert_eq!(exact.len(), LIMIT);
    let (status, text) = env.post_publish(&exact).await;
    assert_eq!((status, text.as_str()), (200, r#"{"receivers":2}"#));
    let over = format!(r#"{head}{fill}f"}}"#);
    let (status, text) = env.post_publish(&over).await;
    assert_eq!(status, 413, "{text}");
    let reply: Value = serde_json::from_str(&text).expect("JSON error body");
    assert_eq!(
        reply,
        json!({"error": format!("body larger than {LIMIT} bytes")})
    );

    // Only the exact-size message got through; then the marker.
    let r = env
        .gw
        .publish(json!({"channel":"h.one","payload":"marker"}))
        .await;
    assert_eq!(r, (200, json!({"receivers":2})));
    for (c, pattern) in [(&mut one, None), (&mut twin, None), (&mut all, Some("h.*"))] {
        assert_eq!(
            c.recv().await,
            delivery(pattern, "h.one", json!(fill.clone()))
        );
        assert_eq!(c.recv().await, delivery(pattern, "h.one", json!("marker")));
    }

    drop((one, all, twin));
    env.stop().await;
}

/// A publish whose payload is JSON `null` publishes `null`, single or in a
/// batch (regression: serde once read `null` as a missing field).
async fn http_publish_null_payload(b: Backend) {
    let env = b.start().await;
    let mut c = env.client().await;
    c.subscribe("n").await;
    // Batch: accepted and delivered.
    let r = env
        .gw
        .publish(json!({"messages":[{"channel":"n","payload":null}]}))
        .await;
    assert_eq!(r, (200, json!({"receivers":[1]})));
    assert_eq!(c.recv().await, delivery(None, "n", Value::Null));
    // Single: should be the same.
    let r = env.gw.publish(json!({"channel":"n","payload":null})).await;
    assert_eq!(r, (200, json!({"receivers":1})));
    assert_eq!(c.recv().await, delivery(None, "n", Value::Null));
    drop(c);
    env.stop().await;
}
