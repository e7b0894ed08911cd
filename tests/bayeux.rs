//! Bayeux end to end: the real npm clients (faye 1.4.3, cometd 9 with
//! cometd-nodejs-client, see `tests/js/`) and raw HTTP and WebSocket clients
//! against gateways on a real `redis-server` (or the embedded broker), over
//! every transport, on one node and on two.
//!
//! Every wait is bounded; synchronisation is on signals (a reply, an event
//! line of a client script, `PUBSUB NUMSUB`/`NUMPAT`, a metric), never on a
//! sleep. What the gateway writes is compared byte for byte wherever a raw
//! client reads it; what faye and CometD hand their extensions is compared
//! as JSON (they parse it first).
//!
//! The expected bytes come from `docs/dialects/bayeux.md` and
//! `src/protocol/bayeux/reply.rs`, written out here by hand (not produced by
//! the code under test).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::node::Script;
use common::{metric_value, test_config, wait_until, Client, Gateway, Redis, WAIT};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use wsgate::Config;

// ------------------------------------------------------------ client publish

/// The client-publish steps of the interop and cluster tests run.
const CLIENT_PUBLISH: bool = true;

/// Lets clients publish to `/foo/*` and `/chat/*`.
fn allow_client_publish(config: &mut Config) {
    config.client_publish = vec!["/foo/*".into(), "/chat/*".into()];
}

// ------------------------------------------------------------ expected bytes

const CONNECTION_TYPES: &str =
    r#"["websocket","long-polling","cross-origin-long-polling","callback-polling"]"#;

fn handshake_reply(id: &str, cid: &str, timeout_ms: u64) -> String {
    format!(
        r#"{{"channel":"/meta/handshake","id":"{id}","successful":true,"version":"1.0","supportedConnectionTypes":{CONNECTION_TYPES},"clientId":"{cid}","advice":{{"reconnect":"retry","interval":0,"timeout":{timeout_ms}}}}}"#
    )
}

/// The first connect's reply (with the advice).
fn first_connect_reply(id: &str, cid: &str, timeout_ms: u64) -> String {
    format!(
        r#"{{"channel":"/meta/connect","id":"{id}","successful":true,"clientId":"{cid}","advice":{{"reconnect":"retry","interval":0,"timeout":{timeout_ms}}}}}"#
    )
}

/// A later connect's reply (no advice).
fn connect_reply(id: &str, cid: &str) -> String {
    format!(r#"{{"channel":"/meta/connect","id":"{id}","successful":true,"clientId":"{cid}"}}"#)
}

fn subscribe_reply(id: &str, cid: &str, sub: &str) -> String {
    format!(
        r#"{{"channel":"/meta/subscribe","id":"{id}","successful":true,"clientId":"{cid}","subscription":"{sub}"}}"#
    )
}

fn subscribe_refused(id: &str, cid: &str, sub: &str, error: &str) -> String {
    format!(
        r#"{{"channel":"/meta/subscribe","id":"{id}","successful":false,"clientId":"{cid}","subscription":"{sub}","error":"{error}"}}"#
    )
}

fn unknown_client(channel: &str, id: &str, cid: &str) -> String {
    format!(
        r#"{{"channel":"{channel}","id":"{id}","successful":false,"error":"402:{cid}:Unknown client","advice":{{"reconnect":"handshake","interval":0}}}}"#
    )
}

/// A whole-body refusal.
fn bad_body(reason: &str) -> String {
    format!(r#"[{{"successful":false,"error":"400:{reason}:Bad request"}}]"#)
}

fn batch(messages: &[String]) -> String {
    format!("[{}]", messages.join(","))
}

fn delivery(channel: &str, data: &str) -> String {
    format!(r#"{{"channel":"{channel}","data":{data}}}"#)
}

const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 30_000;

// ------------------------------------------------------------ raw HTTP

/// A response as read off the wire.
#[derive(Debug)]
struct Resp {
    status: u16,
    head: String,
    body: String,
}

impl Resp {
    /// The first header named `name` (any case).
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// One HTTP/1.1 request on a fresh connection, headers as given (nothing
/// added but `Host`, `Connection: close` and `Content-Length`), within
/// `timeout` (then a panic).
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Resp {
    let what = format!("{method} {path}");
    let stream = tokio::time::timeout(timeout, send_request(addr, method, path, headers, body))
        .await
        .unwrap_or_else(|_| panic!("{what}: not sent within {timeout:?}"));
    read_response(stream, &what, timeout).await
}

/// Connects and writes a request (see [`request`]); the response is left to
/// [`read_response`].
async fn send_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.expect("write head");
    // A server may answer (413) without reading an oversize body.
    let _ = stream.write_all(body).await;
    stream
}

/// Reads the response to the request sent on `stream`, within `timeout`.
async fn read_response(mut stream: TcpStream, what: &str, timeout: Duration) -> Resp {
    let mut raw = Vec::new();
    // A server may close without reading an oversize body: what was read is the answer.
    let read = tokio::time::timeout(timeout, stream.read_to_end(&mut raw)).await;
    assert!(read.is_ok(), "{what}: no answer within {timeout:?}");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{what}: not an HTTP response: {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no status in {head:?}"));
    let mut resp = Resp {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    };
    if resp
        .header("transfer-encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        resp.body = dechunk(&resp.body);
    }
    resp
}

/// `POST path` with a JSON body sent chunked (no `Content-Length`), in
/// chunks of at most 16 KiB, as CometD's Node client sends its bodies.
async fn post_chunked(addr: SocketAddr, path: &str, body: &str) -> Resp {
    let send = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.expect("write head");
        for chunk in body.as_bytes().chunks(16 * 1024) {
            let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
            framed.extend_from_slice(chunk);
            framed.extend_from_slice(b"\r\n");
            // The server may answer (413) before the whole body is in.
            if stream.write_all(&framed).await.is_err() {
                return stream;
            }
        }
        let _ = stream.write_all(b"0\r\n\r\n").await;
        stream
    };
    let stream = tokio::time::timeout(WAIT, send)
        .await
        .unwrap_or_else(|_| panic!("POST {path} (chunked): not sent within {WAIT:?}"));
    read_response(stream, &format!("POST {path} (chunked)"), POLL_TIMEOUT).await
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Long enough for a held connect (tests that hold one shorten the hold).
const POLL_TIMEOUT: Duration = Duration::from_secs(40);

/// `POST path` with a JSON body.
async fn post(addr: SocketAddr, path: &str, body: &str) -> Resp {
    post_with(addr, path, &[("Content-Type", "application/json")], body).await
}

async fn post_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    request(addr, "POST", path, headers, body.as_bytes(), POLL_TIMEOUT).await
}

/// `POST /bayeux` with a JSON body, sent from `origin` (CORS).
async fn post_from(addr: SocketAddr, origin: &str, body: &str) -> Resp {
    post_with(
        addr,
        "/bayeux",
        &[("Content-Type", "application/json"), ("Origin", origin)],
        body,
    )
    .await
}

/// Percent-encodes everything but the unreserved characters.
fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// The `clientId` of the first message of a reply batch.
fn client_id_of(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let cid = v[0]["clientId"]
        .as_str()
        .unwrap_or_else(|| panic!("no clientId in {body}"))
        .to_owned();
    assert!(
        cid.len() == 32
            && cid
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "clientId {cid:?} is not 32 lowercase hex digits"
    );
    cid
}

fn handshake_msg(id: &str, types: &str) -> String {
    format!(
        r#"{{"channel":"/meta/handshake","version":"1.0","supportedConnectionTypes":{types},"id":"{id}"}}"#
    )
}

/// The clientId of `reply`, which must be exactly the handshake reply to
/// message `id` (with `timeout_ms` in its advice), byte for byte.
fn handshake_cid(reply: &str, id: &str, timeout_ms: u64) -> String {
    let cid = client_id_of(reply);
    assert_eq!(reply, batch(&[handshake_reply(id, &cid, timeout_ms)]));
    cid
}

/// The clientId of a handshake answered over HTTP: `res` is a 200 whose body
/// is exactly the handshake reply (see [`handshake_cid`]).
fn handshook(res: &Resp, id: &str, timeout_ms: u64) -> String {
    assert_eq!(res.status, 200, "handshake: {res:?}");
    handshake_cid(&res.body, id, timeout_ms)
}

/// A long-polling client: handshake and first connect over `POST path`,
/// each reply checked byte for byte; returns the clientId.
async fn lp_handshake(addr: SocketAddr, path: &str, timeout_ms: u64) -> String {
    let res = post(
        addr,
        path,
        &format!("[{}]", handshake_msg("1", r#"["long-polling"]"#)),
    )
    .await;
    let cid = handshook(&res, "1", timeout_ms);
    let res = post(addr, path, &lp_connect("2", &cid)).await;
    assert_eq!(res.status, 200, "first connect: {res:?}");
    assert_eq!(
        res.body,
        batch(&[first_connect_reply("2", &cid, timeout_ms)])
    );
    cid
}

fn lp_connect(id: &str, cid: &str) -> String {
    format!(
        r#"[{{"channel":"/meta/connect","clientId":"{cid}","connectionType":"long-polling","id":"{id}"}}]"#
    )
}

fn subscribe_msg(id: &str, cid: &str, sub: &str) -> String {
    format!(
        r#"[{{"channel":"/meta/subscribe","clientId":"{cid}","subscription":"{sub}","id":"{id}"}}]"#
    )
}

async fn lp_subscribe(addr: SocketAddr, path: &str, id: &str, cid: &str, sub: &str) {
    let res = post(addr, path, &subscribe_msg(id, cid, sub)).await;
    assert_eq!(res.status, 200, "subscribe {sub}: {res:?}");
    assert_eq!(res.body, batch(&[subscribe_reply(id, cid, sub)]));
}

// ------------------------------------------------------------ raw WebSocket

/// Handshakes (message `id`) over the WebSocket `c`; checks the reply byte
/// for byte and returns its clientId.
async fn ws_handshake_on(c: &mut Client, id: &str) -> String {
    c.send_text(&format!("[{}]", handshake_msg(id, r#"["websocket"]"#)))
        .await;
    handshake_cid(&c.recv_text().await, id, DEFAULT_CONNECT_TIMEOUT_MS)
}

/// A Bayeux client over a raw WebSocket on `path`: handshake and first
/// connect, each reply checked byte for byte. Returns it and its clientId.
async fn ws_handshake(addr: SocketAddr, path: &str) -> (Client, String) {
    let mut c = Client::connect(addr, path).await;
    let cid = ws_handshake_on(&mut c, "1").await;
    c.send_text(&format!(
        r#"[{{"channel":"/meta/connect","clientId":"{cid}","connectionType":"websocket","id":"2"}}]"#
    ))
    .await;
    assert_eq!(
        c.recv_text().await,
        batch(&[first_connect_reply("2", &cid, DEFAULT_CONNECT_TIMEOUT_MS)])
    );
    (c, cid)
}

async fn ws_subscribe(c: &mut Client, id: &str, cid: &str, sub: &str) {
    c.send_text(&subscribe_msg(id, cid, sub)).await;
    assert_eq!(
        c.recv_text().await,
        batch(&[subscribe_reply(id, cid, sub)]),
        "subscribe {sub}"
    );
}

// ------------------------------------------------------------ the brokers

/// Where messages come from in a test: a Redis, or the embedded broker
/// (published through `POST /publish`).
#[derive(Clone, Copy)]
enum Bus<'a> {
    Redis(&'a Redis),
    Embedded,
}

impl Bus<'_> {
    /// Publishes `payload` (JSON text) on `channel`.
    async fn publish(&self, gw: &Gateway, channel: &str, payload: &str) {
        match self {
            Bus::Redis(redis) => {
                redis.publish(channel, payload.as_bytes()).await;
            }
            Bus::Embedded => {
                let payload: Value = serde_json::from_str(payload).expect("payload is JSON");
                let (status, body) = gw
                    .publish(json!({"channel": channel, "payload": payload}))
                    .await;
                assert_eq!(status, 200, "POST /publish {channel}: {body}");
            }
        }
    }

    /// Waits until the broker holds nothing for the gateway's clients:
    /// `NUMSUB channel` and `NUMPAT` 0 on Redis; the broker gauges 0 on the
    /// embedded broker.
    async fn wait_clean(&self, gw: &Gateway, channel: &str) {
        match self {
            Bus::Redis(redis) => {
                wait_until(&format!("NUMSUB {channel} = 0"), WAIT, || async {
                    redis.numsub(channel).await == 0
                })
                .await;
                wait_until("NUMPAT = 0", WAIT, || async { redis.numpat().await == 0 }).await;
            }
            Bus::Embedded => {
                let addr = gw.addr;
                for kind in ["pattern", "channel"] {
                    let series = format!("wsgate_broker_subscriptions{{kind=\"{kind}\"}}");
                    // Nothing but the services router's channels.
                    let own = if kind == "channel" {
                        common::ROUTER_CHANNELS as f64
                    } else {
                        0.0
                    };
                    wait_until(&format!("{series} = {own}"), WAIT, || {
                        let series = series.clone();
                        async move { metric_value(addr, &series).await.unwrap_or(0.0) == own }
                    })
                    .await;
                }
            }
        }
    }
}

async fn wait_metric(addr: SocketAddr, series: &str, value: f64) {
    wait_until(&format!("{series} = {value}"), WAIT, || async move {
        metric_value(addr, series).await.unwrap_or(0.0) == value
    })
    .await;
}

// ------------------------------------------------------------ the scripts

fn spawn_client(script: &str, url: &str, transport: &str, subscribe: &[&str]) -> Script {
    let mut args = vec!["--url", url, "--transport", transport, "--max-ms", "40000"];
    for s in subscribe {
        args.push("--subscribe");
        args.push(s);
    }
    Script::spawn(script, &args)
}

fn events<'a>(s: &'a Script, from: usize, pred: impl Fn(&Value) -> bool + 'a) -> Vec<&'a Value> {
    s.history()[from..].iter().filter(|e| pred(e)).collect()
}

/// Publishes `channel` (on the bus) and waits until `s` has handed the
/// client's subscribers its `message`: everything published before it on
/// the same connection has been seen by then.
async fn sentinel(s: &mut Script, bus: Bus<'_>, gw: &Gateway, channel: &str) {
    bus.publish(gw, channel, r#""sentinel""#).await;
    let want = channel.to_owned();
    s.expect_where(&format!("the sentinel on {channel}"), move |e| {
        e["event"] == "message" && e["channel"] == want.as_str()
    })
    .await;
}

/// Has the client script unsubscribe from `sub`, and checks the exact event
/// it reports.
async fn unsubscribe(s: &mut Script, sub: &str) {
    s.send(json!({"cmd": "unsubscribe", "channel": sub})).await;
    let un = s.expect("unsubscribed").await;
    assert_eq!(
        un,
        json!({"event": "unsubscribed", "subscription": sub, "successful": true})
    );
}

/// Test 1 and 2: one real client against one gateway, on `bus`. Checks
/// that do not stop the flow are collected and reported together at the
/// end, so that one wrong delivery does not hide what follows.
async fn interop(script: &str, transport: &str, bus: Bus<'_>, gw: &Gateway) {
    let who = format!("{script} {transport}");
    let mut failures: Vec<String> = Vec::new();
    let url = format!("http://{}/bayeux", gw.addr);
    let mut s = spawn_client(script, &url, transport, &[]);
    let hs = s.expect("handshake").await;
    assert_eq!(
        hs["successful"],
        true,
        "{who}: handshake failed: {hs}\n--- events: {:?}\n--- stderr:\n{}",
        s.history(),
        s.stderr()
    );
    let cid = hs["clientId"].as_str().expect("clientId").to_owned();
    assert_eq!(cid.len(), 32, "{cid}");
    s.expect("ready").await;
    let failed = events(&s, 0, |e| e["event"] == "subscribe_failed");
    assert!(failed.is_empty(), "{who}: {failed:?}");
    for sub in ["/foo/*", "/foo/bar"] {
        let ok = events(&s, 0, |e| {
            e["event"] == "subscribed" && e["subscription"] == sub
        });
        assert_eq!(ok.len(), 1, "{who}: subscribed {sub}");
    }
    if let Bus::Redis(redis) = bus {
        assert_eq!(redis.numsub("/foo/bar").await, 1, "{who}");
        assert_eq!(redis.numpat().await, 1, "{who}");
    }

    // A publish matching both subscriptions: one message on the wire, which
    // the client library hands to both subscriptions.
    let from = s.history().len();
    bus.publish(gw, "/foo/bar", r#"{"text":"hi"}"#).await;
    sentinel(&mut s, bus, gw, "/foo/end1").await;
    let wire = events(&s, from, |e| {
        e["event"] == "delivery" && e["channel"] == "/foo/bar"
    });
    if wire.len() != 1 {
        failures.push(format!(
            "{who}: PUBLISH /foo/bar (matching /foo/* and /foo/bar) came {} times on the wire, want once: {:?}",
            wire.len(),
            wire.iter().map(|e| e["message"].to_string()).collect::<Vec<_>>()
        ));
    }
    for w in &wire {
        assert_eq!(
            w["message"],
            json!({"channel": "/foo/bar", "data": {"text": "hi"}}),
            "{who}"
        );
    }
    let mut handed: Vec<&str> = events(&s, from, |e| {
        e["event"] == "message" && e["channel"] == "/foo/bar"
    })
    .iter()
    .map(|e| e["subscription"].as_str().unwrap_or(""))
    .collect();
    handed.sort_unstable();
    if handed != ["/foo/*", "/foo/bar"] {
        failures.push(format!(
            "{who}: the library handed /foo/bar to {handed:?}, want once to each of [\"/foo/*\", \"/foo/bar\"]"
        ));
    }
    for e in events(&s, from, |e| e["event"] == "message") {
        if e["channel"] == "/foo/bar" {
            assert_eq!(e["data"], json!({"text": "hi"}));
        }
    }

    // `/foo/*` is one segment: `/foo/a/b` is covered by the Redis glob but
    // must not be delivered.
    let from = s.history().len();
    bus.publish(gw, "/foo/a/b", r#"{"text":"deep"}"#).await;
    sentinel(&mut s, bus, gw, "/foo/end2").await;
    let deep = events(&s, from, |e| e["channel"] == "/foo/a/b");
    if !deep.is_empty() {
        failures.push(format!("{who}: /foo/a/b delivered on /foo/*: {deep:?}"));
    }

    if CLIENT_PUBLISH {
        let from = s.history().len();
        s.send(
            json!({"cmd": "publish", "channel": "/foo/bar", "data": {"text": "mine"}, "ref": "p1"}),
        )
        .await;
        let published = s.expect("published").await;
        assert_eq!(published["ok"], true, "{who}: {published}");
        sentinel(&mut s, bus, gw, "/foo/end3").await;
        let acks = events(&s, from, |e| e["event"] == "ack");
        assert_eq!(acks.len(), 1, "{who}: acks {acks:?}");
        assert_eq!(acks[0]["message"]["channel"], "/foo/bar");
        assert_eq!(acks[0]["message"]["successful"], true);
        assert!(
            acks[0]["message"].get("data").is_none(),
            "{who}: an ack carries no data: {}",
            acks[0]
        );
        let mine = events(&s, from, |e| {
            e["event"] == "delivery" && e["channel"] == "/foo/bar"
        });
        if mine.len() != 1 {
            failures.push(format!(
                "{who}: own publish came {} times: {mine:?}",
                mine.len()
            ));
        }
        for m in mine {
            assert_eq!(m["data"], json!({"text": "mine"}));
        }
    }

    // Unsubscribe both, then disconnect.
    unsubscribe(&mut s, "/foo/*").await;
    if let Bus::Redis(redis) = bus {
        wait_until("NUMPAT = 0", WAIT, || async { redis.numpat().await == 0 }).await;
        assert_eq!(redis.numsub("/foo/bar").await, 1);
    }
    unsubscribe(&mut s, "/foo/bar").await;
    bus.wait_clean(gw, "/foo/bar").await;
    s.send(json!({"cmd": "disconnect"})).await;
    let bye = s.expect("disconnected").await;
    assert_eq!(bye["ok"], true, "{who}: {bye}");

    // The connect types it used.
    let types: Vec<&str> = events(&s, 0, |e| e["event"] == "connect")
        .iter()
        .map(|e| e["connectionType"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        types.last(),
        Some(&transport),
        "{script}: connects {types:?}"
    );
    let stray = events(&s, 0, |e| e["event"] == "error");
    assert!(stray.is_empty(), "{who}: {stray:?}");
    let (status, _) = s.finish(WAIT).await;
    assert!(status.success(), "{who}: exit {status}");
    bus.wait_clean(gw, "/foo/bar").await;
    wait_metric(gw.addr, "wsgate_connections", 0.0).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The broker a test of [`interop`] runs on.
#[derive(Clone, Copy)]
enum Broker {
    /// A fresh `redis-server`.
    Redis,
    /// The embedded broker.
    Embedded,
}

/// [`interop`] for `script` over `transport`, on a fresh gateway that lets
/// clients publish, on `broker`.
async fn interop_on(script: &str, transport: &str, broker: Broker) {
    let redis = match broker {
        Broker::Redis => Some(Redis::start().await),
        Broker::Embedded => None,
    };
    let mut config = test_config(redis.as_ref().map(Redis::url));
    allow_client_publish(&mut config);
    let gw = Gateway::start(config).await;
    let bus = redis.as_ref().map_or(Bus::Embedded, Bus::Redis);
    interop(script, transport, bus, &gw).await;
    gw.stop().await;
}

/// One test per line: its name, then the script, transport and broker it
/// runs [`interop_on`] with. A test each, so that each combination passes or
/// fails (and can be run) on its own.
macro_rules! interop_tests {
    ($($name:ident: $script:literal, $transport:literal, $broker:ident;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            interop_on($script, $transport, Broker::$broker).await;
        }
    )*};
}

interop_tests! {
    interop_faye_websocket_on_redis: "faye_client.js", "websocket", Redis;
    interop_faye_long_polling_on_redis: "faye_client.js", "long-polling", Redis;
    interop_cometd_websocket_on_redis: "cometd_client.js", "websocket", Redis;
    interop_cometd_long_polling_on_redis: "cometd_client.js", "long-polling", Redis;
    interop_faye_websocket_embedded: "faye_client.js", "websocket", Embedded;
    interop_faye_long_polling_embedded: "faye_client.js", "long-polling", Embedded;
    interop_cometd_websocket_embedded: "cometd_client.js", "websocket", Embedded;
    interop_cometd_long_polling_embedded: "cometd_client.js", "long-polling", Embedded;
}

// ------------------------------------------------------------ two nodes

/// A native client.
async fn native_subscribed(addr: SocketAddr, channel: &str) -> Client {
    let mut c = Client::connect(addr, "/ws").await;
    c.subscribe(channel).await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_faye_cometd_and_native_on_one_channel() {
    let redis = Redis::start().await;
    let mut config = test_config(Some(redis.url()));
    allow_client_publish(&mut config);
    let a = Gateway::start(config.clone()).await;
    let b = Gateway::start(config).await;
    let room = "/chat/room";

    let mut faye = spawn_client(
        "faye_client.js",
        &format!("http://{}/bayeux", a.addr),
        "websocket",
        &[room],
    );
    let mut cometd = spawn_client(
        "cometd_client.js",
        &format!("http://{}/bayeux", b.addr),
        "websocket",
        &[room],
    );
    let mut native = native_subscribed(a.addr, room).await;
    faye.expect("ready").await;
    cometd.expect("ready").await;
    // One Redis subscription per node.
    redis.wait_numsub(room, 2).await;

    // The native client publishes from its own socket (node A).
    native
        .send_json(json!({"action": "publish", "channel": room, "payload": {"from": "native"}, "id": "n1"}))
        .await;
    for s in [&mut faye, &mut cometd] {
        let got = s
            .expect_where("the native publish", |e| {
                e["event"] == "delivery" && e["channel"] == room
            })
            .await;
        assert_eq!(
            got["message"],
            json!({"channel": room, "data": {"from": "native"}})
        );
    }
    // Its reply and its own copy, in either order.
    let mut frames = vec![native.recv().await, native.recv().await];
    frames.sort_by_key(|f| f["action"].as_str().map(str::to_owned));
    assert_eq!(
        frames,
        [
            json!({"action": "message", "channel": room, "payload": {"from": "native"}}),
            json!({"action": "publish", "channel": room, "id": "n1", "status": true}),
        ]
    );

    if CLIENT_PUBLISH {
        for (i, from) in ["faye", "cometd"].into_iter().enumerate() {
            let data = json!({"from": from});
            let s = if i == 0 { &mut faye } else { &mut cometd };
            s.send(json!({"cmd": "publish", "channel": room, "data": data, "ref": from}))
                .await;
            let published = s.expect("published").await;
            assert_eq!(published["ok"], true, "{from}: {published}");
            let other = if i == 0 { &mut cometd } else { &mut faye };
            let got = other
                .expect_where(&format!("{from}'s publish"), |e| {
                    e["event"] == "delivery" && e["data"] == data
                })
                .await;
            assert_eq!(got["message"], json!({"channel": room, "data": data}));
            assert_eq!(
                native.recv().await,
                json!({"action": "message", "channel": room, "payload": data})
            );
        }
    }

    // A clientId no node holds: the same 402 from each, byte for byte.
    let made_up = "0badc0de0badc0de0badc0de0badc0de";
    for node in [&a, &b] {
        for path in ["/bayeux", "/bayeux/connect"] {
            let res = post(node.addr, path, &lp_connect("7", made_up)).await;
            assert_eq!(res.status, 200, "{path}: {res:?}");
            assert_eq!(
                res.body,
                batch(&[unknown_client("/meta/connect", "7", made_up)]),
                "{path}"
            );
            let v: Value = serde_json::from_str(&res.body).expect("JSON");
            assert_eq!(v[0]["advice"]["reconnect"], "handshake");
        }
    }

    for s in [faye, cometd] {
        let (status, events) = s.finish(WAIT).await;
        assert!(status.success(), "exit {status}: {events:?}");
    }
    drop(native);
    redis.wait_numsub(room, 0).await;
    a.stop().await;
    b.stop().await;
}

/// A WebSocket whose first message names a clientId this node does not
/// hold (the client handshook elsewhere, or its session expired) is
/// answered `402` with `advice.reconnect: handshake`, so that the client
/// re-handshakes, and the socket stays open for that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_naming_an_unknown_client_id_gets_402_and_stays_open() {
    let redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let made_up = "0badc0de0badc0de0badc0de0badc0de";
    let mut ws = Client::connect(gw.addr, "/bayeux").await;
    ws.send_text(&format!(
        r#"[{{"channel":"/meta/connect","clientId":"{made_up}","connectionType":"websocket","id":"2"}}]"#
    ))
    .await;
    let got = match ws.next_message().await {
        Some(Message::Text(t)) => t.as_str().to_owned(),
        other => panic!("no 402 over the WebSocket, got {other:?}"),
    };
    assert_eq!(got, batch(&[unknown_client("/meta/connect", "2", made_up)]));
    // The client handshakes again on the same socket.
    ws_handshake_on(&mut ws, "3").await;
    gw.stop().await;
}

// ------------------------------------------------------------ handoff

/// A TCP proxy that sends each connection to `ws_to` if its first request
/// is a WebSocket upgrade, else to `http_to`; counts both. Stopped on drop.
struct SplitProxy {
    addr: SocketAddr,
    http: Arc<AtomicUsize>,
    ws: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SplitProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SplitProxy {
    async fn start(http_to: SocketAddr, ws_to: SocketAddr) -> SplitProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let (http, ws) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let counts = (http.clone(), ws.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counts = counts.clone();
                tokio::spawn(async move {
                    let _ = Self::relay(client, http_to, ws_to, counts).await;
                });
            }
        });
        SplitProxy {
            addr,
            http,
            ws,
            task,
        }
    }

    async fn relay(
        mut client: TcpStream,
        http_to: SocketAddr,
        ws_to: SocketAddr,
        (http, ws): (Arc<AtomicUsize>, Arc<AtomicUsize>),
    ) -> std::io::Result<()> {
        let mut head = Vec::new();
        let mut chunk = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::time::timeout(WAIT, client.read(&mut chunk))
                .await
                .map_err(|_| std::io::ErrorKind::TimedOut)??;
            if n == 0 || head.len() > 64 * 1024 {
                return Ok(());
            }
            head.extend_from_slice(&chunk[..n]);
        }
        let upgrade = String::from_utf8_lossy(&head)
            .to_ascii_lowercase()
            .contains("upgrade: websocket");
        let to = if upgrade {
            ws.fetch_add(1, Ordering::SeqCst);
            ws_to
        } else {
            http.fetch_add(1, Ordering::SeqCst);
            http_to
        };
        let mut server = TcpStream::connect(to).await?;
        server.write_all(&head).await?;
        tokio::io::copy_bidirectional(&mut client, &mut server).await?;
        Ok(())
    }
}

/// Faye handshakes over HTTP and then opens a WebSocket; behind a load
/// balancer the two can reach different nodes. The node the WebSocket
/// reaches must take the fresh session over (docs/dialects/bayeux.md,
/// "Sessions and several nodes"): no 402, no second handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faye_handshake_on_one_node_websocket_on_another() {
    let redis = Redis::start().await;
    let config = test_config(Some(redis.url()));
    let a = Gateway::start(config.clone()).await;
    let b = Gateway::start(config).await;
    let proxy = SplitProxy::start(a.addr, b.addr).await;
    let mut faye = spawn_client(
        "faye_client.js",
        &format!("http://{}/bayeux", proxy.addr),
        "websocket",
        &["/handoff"],
    );
    faye.expect("ready").await;
    redis.publish("/handoff", br#"{"n":1}"#).await;
    let got = faye
        .expect_where("the delivery", |e| {
            e["event"] == "delivery" && e["channel"] == "/handoff"
        })
        .await;
    assert_eq!(
        got["message"],
        json!({"channel": "/handoff", "data": {"n": 1}})
    );
    assert!(
        proxy.http.load(Ordering::SeqCst) >= 1,
        "no HTTP went to node A"
    );
    assert!(
        proxy.ws.load(Ordering::SeqCst) >= 1,
        "no WebSocket went to node B"
    );
    let history = faye.history().to_vec();
    let types: Vec<&str> = history
        .iter()
        .filter(|e| e["event"] == "connect")
        .map(|e| e["connectionType"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(types.last(), Some(&"websocket"), "connects {types:?}");
    let refused: Vec<&Value> = history
        .iter()
        .filter(|e| {
            e["event"] == "meta"
                && e["message"]["error"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("402:"))
        })
        .collect();
    let handshakes = history.iter().filter(|e| e["event"] == "handshake").count();
    assert!(
        refused.is_empty() && handshakes == 1,
        "the WebSocket on node B did not take over the session of node A: \
         {handshakes} handshake(s), 402s: {refused:?}"
    );
    // The session lives on node B now, and so does its Redis subscription.
    assert_eq!(redis.numsub("/handoff").await, 1);
    let (status, _) = faye.finish(WAIT).await;
    assert!(status.success(), "exit {status}");
    redis.wait_numsub("/handoff", 0).await;
}

// ------------------------------------------------------------ sessions

/// A long-polling client that stops polling is dropped after
/// `bayeux_session_timeout`, and leaves Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_polling_client_that_stops_polling_is_dropped() {
    let redis = Redis::start().await;
    let mut config = test_config(Some(redis.url()));
    config.bayeux_session_timeout = Duration::from_millis(1500);
    let gw = Gateway::start(config).await;
    let cid = lp_handshake(gw.addr, "/bayeux", DEFAULT_CONNECT_TIMEOUT_MS).await;
    lp_subscribe(gw.addr, "/bayeux", "3", &cid, "/x").await;
    let idle_from = Instant::now();
    assert_eq!(redis.numsub("/x").await, 1);
    wait_until("NUMSUB /x = 0", Duration::from_secs(6), || async {
        redis.numsub("/x").await == 0
    })
    .await;
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(1200),
        "dropped after {idle:?}, before the session timeout of 1.5 s"
    );
    wait_metric(gw.addr, "wsgate_connections", 0.0).await;
    let res = post(gw.addr, "/bayeux", &lp_connect("4", &cid)).await;
    assert_eq!(res.status, 200);
    assert_eq!(
        res.body,
        batch(&[unknown_client("/meta/connect", "4", &cid)])
    );
    assert_eq!(redis.numpat().await, 0);
    gw.stop().await;
}

/// A WebSocket client that goes away while its connect is held, without
/// `/meta/disconnect`, is dropped after the session timeout (not after the
/// hold, 30 s, and then the timeout) and Redis holds nothing for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_client_that_goes_away_mid_connect_is_dropped() {
    let redis = Redis::start().await;
    let mut config = test_config(Some(redis.url()));
    config.bayeux_session_timeout = Duration::from_millis(1500);
    let gw = Gateway::start(config).await;
    let (mut c, cid) = ws_handshake(gw.addr, "/bayeux").await;
    ws_subscribe(&mut c, "3", &cid, "/x").await;
    c.send_text(&format!(
        r#"[{{"channel":"/meta/connect","clientId":"{cid}","connectionType":"websocket","id":"4"}}]"#
    ))
    .await;
    redis.wait_numsub("/x", 1).await;
    drop(c);
    let gone_at = Instant::now();
    wait_until("NUMSUB /x = 0", Duration::from_secs(6), || async {
        redis.numsub("/x").await == 0
    })
    .await;
    let after = gone_at.elapsed();
    assert!(
        after >= Duration::from_millis(1200),
        "dropped after {after:?}, before the session timeout of 1.5 s"
    );
    wait_metric(gw.addr, "wsgate_connections", 0.0).await;
    let res = post(gw.addr, "/bayeux", &lp_connect("5", &cid)).await;
    assert_eq!(
        res.body,
        batch(&[unknown_client("/meta/connect", "5", &cid)])
    );
    gw.stop().await;
}

/// A long-polling client that never polls is cut off as a slow consumer
/// once its queue outgrows `client_queue_bytes`; a polling client on the
/// same channel gets every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_polling_slow_consumer_is_cut_off_and_a_polling_one_gets_everything() {
    const N: usize = 40;
    let redis = Redis::start().await;
    let mut config = test_config(Some(redis.url()));
    config.client_queue_bytes = NonZeroUsize::new(4096).expect("non-zero");
    config.bayeux_connect_timeout = Duration::from_secs(5);
    let hold_ms = 5000;
    let gw = Gateway::start(config).await;
    let addr = gw.addr;
    let slow = lp_handshake(addr, "/bayeux", hold_ms).await;
    lp_subscribe(addr, "/bayeux", "3", &slow, "/x").await;
    let fast = lp_handshake(addr, "/bayeux", hold_ms).await;
    lp_subscribe(addr, "/bayeux", "3", &fast, "/x").await;
    assert_eq!(redis.numsub("/x").await, 1);

    // The polling client: connect after connect, each answer checked byte
    // for byte and its deliveries handed over.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let poller = {
        let fast = fast.clone();
        tokio::spawn(async move {
            for n in 10.. {
                let id = n.to_string();
                let res = post(addr, "/bayeux", &lp_connect(&id, &fast)).await;
                assert_eq!(res.status, 200, "{res:?}");
                let reply = connect_reply(&id, &fast);
                if res.body == batch(std::slice::from_ref(&reply)) {
                    continue; // the hold ran out
                }
                let v: Value = serde_json::from_str(&res.body).expect("JSON");
                let items = v.as_array().expect("array");
                assert!(items.len() >= 2, "{}", res.body);
                let expected: Vec<String> = items[..items.len() - 1]
                    .iter()
                    .map(|m| delivery("/x", &serde_json::to_string(&m["data"]).expect("data")))
                    .chain([reply])
                    .collect();
                assert_eq!(res.body, batch(&expected));
                for m in &items[..items.len() - 1] {
                    if tx
                        .send(m["data"].as_str().unwrap_or("").to_owned())
                        .is_err()
                    {
                        return;
                    }
                }
            }
        })
    };
    let pad = "p".repeat(200);
    for i in 0..N {
        let text = format!("m{i}-{pad}");
        redis
            .publish("/x", serde_json::to_string(&text).expect("json").as_bytes())
            .await;
        let got = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("the polling client did not get message {i}"))
            .expect("poller ended");
        assert_eq!(got, text, "message {i}");
    }
    poller.abort();
    wait_metric(addr, "wsgate_slow_consumer_closes_total", 1.0).await;
    let res = post(addr, "/bayeux", &lp_connect("5", &slow)).await;
    assert_eq!(
        res.body,
        batch(&[unknown_client("/meta/connect", "5", &slow)])
    );
    // The polling client is still there, and still served.
    assert_eq!(redis.numsub("/x").await, 1);
    assert_eq!(
        metric_value(addr, "wsgate_slow_consumer_closes_total").await,
        Some(1.0)
    );
    gw.stop().await;
    redis.wait_numsub("/x", 0).await;
}

/// Long-polling CometD sends `/meta/disconnect` while its connect is held:
/// the held connect is answered (its reply), and so is the disconnect, in
/// its own response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_while_a_connect_is_held_is_answered_in_its_own_response() {
    let redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let addr = gw.addr;
    let disconnect =
        |cid: &str| format!(r#"[{{"channel":"/meta/disconnect","clientId":"{cid}","id":"5"}}]"#);
    for attempt in 1..=3 {
        let cid = lp_handshake(addr, "/bayeux", DEFAULT_CONNECT_TIMEOUT_MS).await;
        lp_subscribe(addr, "/bayeux", "3", &cid, "/held").await;
        // The connect's connection is open (and its request written) before
        // the scrapes below; its poll is with the session once that
        // connection stops counting as pending (the scrape is the one left).
        let stream = send_request(
            addr,
            "POST",
            "/bayeux",
            &[("Content-Type", "application/json")],
            lp_connect("4", &cid).as_bytes(),
        )
        .await;
        let held = tokio::spawn(async move { read_response(stream, "held connect", WAIT).await });
        wait_metric(addr, "wsgate_pending_connections", 1.0).await;
        let res = post(addr, "/bayeux", &disconnect(&cid)).await;
        let held = tokio::time::timeout(WAIT, held)
            .await
            .expect("the held connect was not answered")
            .expect("poll task");
        if held.body == batch(&[unknown_client("/meta/connect", "4", &cid)]) {
            // The disconnect overtook the connect after all: try again.
            assert!(
                attempt < 3,
                "the connect was never held before the disconnect"
            );
            continue;
        }
        assert_eq!(
            (held.body.as_str(), res.body.as_str()),
            (
                batch(&[connect_reply("4", &cid)]).as_str(),
                batch(&[format!(
                    r#"{{"channel":"/meta/disconnect","id":"5","successful":true,"clientId":"{cid}"}}"#
                )])
                .as_str()
            ),
            "(the held connect's response, the disconnect's response)"
        );
        break;
    }
    redis.wait_numsub("/held", 0).await;
    gw.stop().await;
}

// ------------------------------------------------------------ bad input

/// A raw WebSocket Bayeux client subscribed to `/watch` on `gw`, and a
/// check that it still receives.
struct Watcher {
    c: Client,
    n: u32,
}

impl Watcher {
    async fn start(addr: SocketAddr) -> Watcher {
        let (mut c, cid) = ws_handshake(addr, "/bayeux").await;
        ws_subscribe(&mut c, "3", &cid, "/watch").await;
        Watcher { c, n: 0 }
    }

    async fn still_receives(&mut self, redis: &Redis, after: &str) {
        self.n += 1;
        redis.publish("/watch", self.n.to_string().as_bytes()).await;
        assert_eq!(
            self.c.recv_text().await,
            batch(&[delivery("/watch", &self.n.to_string())]),
            "the watcher after {after}"
        );
    }
}

/// The bad messages of a batch that names a live clientId, and the exact
/// reply to each (200: the batch was read).
fn bad_messages(cid: &str) -> Vec<(&'static str, String, String)> {
    vec![
        (
            "a message missing channel",
            format!(r#"[{{"clientId":"{cid}","id":"m1"}}]"#),
            r#"[{"id":"m1","successful":false,"error":"400:missing channel:Bad request"}]"#
                .to_owned(),
        ),
        (
            "an unknown meta channel",
            format!(r#"[{{"channel":"/meta/foo","clientId":"{cid}","id":"m2"}}]"#),
            r#"[{"channel":"/meta/foo","id":"m2","successful":false,"error":"404:/meta/foo:Unknown channel"}]"#
                .to_owned(),
        ),
        (
            "a publish to a bad channel name",
            format!(r#"[{{"channel":"/foo bar","clientId":"{cid}","data":1,"id":"m3"}}]"#),
            r#"[{"channel":"/foo bar","id":"m3","successful":false,"error":"405:/foo bar:Invalid channel"}]"#
                .to_owned(),
        ),
        (
            "a subscribe to a wildcard in the middle",
            subscribe_msg("m4", cid, "/foo/**/x"),
            batch(&[subscribe_refused(
                "m4",
                cid,
                "/foo/**/x",
                "405:/foo/**/x:Invalid channel",
            )]),
        ),
        (
            "a subscribe to /meta/*",
            subscribe_msg("m5", cid, "/meta/*"),
            batch(&[subscribe_refused("m5", cid, "/meta/*", "403:/meta/*:Forbidden")]),
        ),
        (
            "a publish to /service/x",
            format!(r#"[{{"channel":"/service/x","clientId":"{cid}","data":{{}},"id":"m6"}}]"#),
            r#"[{"channel":"/service/x","id":"m6","successful":false,"error":"404:/service/x:No such service"}]"#
                .to_owned(),
        ),
        (
            "a connect for an unknown clientId",
            lp_connect("m7", "0badc0de0badc0de0badc0de0badc0de"),
            batch(&[unknown_client(
                "/meta/connect",
                "m7",
                "0badc0de0badc0de0badc0de0badc0de",
            )]),
        ),
    ]
}

/// Bodies that cannot be read at all, and the exact reply.
fn bad_bodies(cid: &str) -> Vec<(&'static str, String, String)> {
    let deep = format!(
        r#"[{{"channel":"/foo/bar","clientId":"{cid}","data":{}{}}}]"#,
        "[".repeat(63),
        "]".repeat(63)
    );
    vec![
        ("not JSON", "nope".to_owned(), bad_body("not JSON")),
        (
            "JSON but not a message",
            "42".to_owned(),
            bad_body("not a message"),
        ),
        ("nesting over 64 levels", deep, bad_body("nested too deep")),
    ]
}

/// Records in `failures` (reported together at the end) that `res`, the
/// answer to `what`, is not exactly `status` with the body `want`.
fn check(failures: &mut Vec<String>, what: &str, res: &Resp, status: u16, want: &str) {
    if (res.status, res.body.as_str()) != (status, want) {
        failures.push(format!(
            "{what}: got {} {}, want {status} {want}",
            res.status, res.body
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_over_post_is_answered_exactly_and_harms_nobody() {
    let redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let mut watcher = Watcher::start(gw.addr).await;
    let cid = lp_handshake(gw.addr, "/bayeux", DEFAULT_CONNECT_TIMEOUT_MS).await;
    let mut failures = Vec::new();

    for (what, body, want) in bad_bodies(&cid) {
        let res = post(gw.addr, "/bayeux", &body).await;
        check(&mut failures, what, &res, 400, &want);
        watcher.still_receives(&redis, what).await;
    }
    for (what, body, want) in bad_messages(&cid) {
        let res = post(gw.addr, "/bayeux", &body).await;
        check(&mut failures, what, &res, 200, &want);
        watcher.still_receives(&redis, what).await;
    }
    // Over WSGATE_MAX_MESSAGE_BYTES (64 KiB).
    let big = format!(
        r#"[{{"channel":"/foo/bar","clientId":"{cid}","data":"{}"}}]"#,
        "x".repeat(70_000)
    );
    let res = post(gw.addr, "/bayeux", &big).await;
    let want = bad_body("body too large");
    check(&mut failures, "oversize body", &res, 413, &want);
    watcher.still_receives(&redis, "an oversize body").await;
    // The same, chunked (no Content-Length to refuse it by).
    let res = post_chunked(gw.addr, "/bayeux", &big).await;
    check(&mut failures, "oversize chunked body", &res, 413, &want);
    watcher
        .still_receives(&redis, "an oversize chunked body")
        .await;
    // A chunked body within the limit is read (CometD's Node client).
    let res = post_chunked(
        gw.addr,
        "/bayeux/connect",
        &format!(
            r#"[{{"channel":"/meta/connect","clientId":"{cid}","connectionType":"long-polling","id":"c1","advice":{{"timeout":0}}}}]"#
        ),
    )
    .await;
    let want = batch(&[connect_reply("c1", &cid)]);
    check(&mut failures, "chunked connect", &res, 200, &want);
    // A content type Bayeux does not read.
    let res = post_with(
        gw.addr,
        "/bayeux",
        &[("Content-Type", "image/png")],
        &lp_connect("m8", &cid),
    )
    .await;
    let want = bad_body("unsupported content type");
    check(&mut failures, "image/png", &res, 400, &want);
    watcher.still_receives(&redis, "a wrong content type").await;

    // The same messages without a session: still answered each on its own.
    let res = post(gw.addr, "/bayeux", r#"[{"id":"m9"}]"#).await;
    let want = r#"[{"id":"m9","successful":false,"error":"400:missing channel:Bad request"}]"#;
    check(
        &mut failures,
        "missing channel, no clientId",
        &res,
        200,
        want,
    );

    // The long-polling session survived all of it.
    let res = post(
        gw.addr,
        "/bayeux",
        &format!(r#"[{{"channel":"/meta/disconnect","clientId":"{cid}","id":"z"}}]"#),
    )
    .await;
    assert_eq!(
        res.body,
        batch(&[format!(
            r#"{{"channel":"/meta/disconnect","id":"z","successful":true,"clientId":"{cid}"}}"#
        )])
    );
    watcher.still_receives(&redis, "everything").await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_over_a_websocket_is_answered_exactly_and_harms_nobody() {
    let redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let mut watcher = Watcher::start(gw.addr).await;
    let (mut bad, cid) = ws_handshake(gw.addr, "/bayeux").await;
    ws_subscribe(&mut bad, "3", &cid, "/mine").await;
    let mut failures = Vec::new();
    for (what, body, want) in bad_bodies(&cid).into_iter().chain(bad_messages(&cid)) {
        bad.send_text(&body).await;
        let got = bad.recv_text().await;
        if got != want {
            failures.push(format!("{what}: got {got}, want {want}"));
        }
        watcher.still_receives(&redis, what).await;
    }
    // The bad client's session survived: it still receives.
    redis.publish("/mine", b"7").await;
    assert_eq!(bad.recv_text().await, batch(&[delivery("/mine", "7")]));
    // A frame over WSGATE_MAX_MESSAGE_BYTES closes the socket with 1009.
    let big = format!(
        r#"[{{"channel":"/foo/bar","clientId":"{cid}","data":"{}"}}]"#,
        "x".repeat(70_000)
    );
    bad.send_text(&big).await;
    let close = loop {
        match bad.next_message().await {
            Some(Message::Close(frame)) => break frame.map(|f| u16::from(f.code)),
            Some(_) => continue,
            None => break None,
        }
    };
    if close != Some(1009) {
        failures.push(format!(
            "oversize frame: closed with {close:?}, want Some(1009)"
        ));
    }
    watcher.still_receives(&redis, "an oversize frame").await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    gw.stop().await;
}

// ------------------------------------------------------------ JSONP, CORS

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonp_handshake_and_bad_callback() {
    let gw = Gateway::start(test_config(None)).await;
    let message = format!("[{}]", handshake_msg("1", r#"["callback-polling"]"#));
    let path = format!("/bayeux?message={}&jsonp=cb", urlencode(&message));
    let res = request(gw.addr, "GET", &path, &[], b"", WAIT).await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(
        res.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert_eq!(res.header("x-content-type-options"), Some("nosniff"));
    let inner = res
        .body
        .strip_prefix("/**/cb(")
        .and_then(|b| b.strip_suffix(");"))
        .unwrap_or_else(|| panic!("not /**/cb(...); : {}", res.body));
    let cid = handshake_cid(inner, "1", DEFAULT_CONNECT_TIMEOUT_MS);
    // The session goes on over JSONP: its first connect.
    let connect = format!(
        r#"[{{"channel":"/meta/connect","clientId":"{cid}","connectionType":"callback-polling","id":"2"}}]"#
    );
    let path = format!("/bayeux?message={}&jsonp=app.cb_2", urlencode(&connect));
    let res = request(gw.addr, "GET", &path, &[], b"", WAIT).await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(
        res.body,
        format!(
            "/**/app.cb_2({});",
            batch(&[first_connect_reply("2", &cid, DEFAULT_CONNECT_TIMEOUT_MS)])
        )
    );
    for bad in ["alert(1)", "a-b", "1cb", &"c".repeat(65)] {
        let path = format!(
            "/bayeux?message={}&jsonp={}",
            urlencode(&message),
            urlencode(bad)
        );
        let res = request(gw.addr, "GET", &path, &[], b"", WAIT).await;
        assert_eq!(res.status, 400, "jsonp={bad}: {res:?}");
        assert_eq!(
            res.body, r#"{"error":"invalid jsonp callback name"}"#,
            "jsonp={bad}"
        );
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_and_origins() {
    let mut config = test_config(None);
    config.allowed_origins = Some(vec!["https://app.example".to_owned()]);
    let gw = Gateway::start(config).await;
    let res = request(
        gw.addr,
        "OPTIONS",
        "/bayeux",
        &[
            ("Origin", "https://app.example"),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "content-type"),
        ],
        b"",
        WAIT,
    )
    .await;
    assert_eq!(res.status, 204, "{res:?}");
    assert_eq!(
        res.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(res.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(
        res.header("access-control-allow-methods"),
        Some("POST, GET, OPTIONS")
    );
    assert_eq!(res.body, "");

    // A handshake from the allowed origin is served, with the CORS headers.
    let hs = format!(
        "[{}]",
        handshake_msg("1", r#"["cross-origin-long-polling"]"#)
    );
    let res = post_from(gw.addr, "https://app.example", &hs).await;
    handshook(&res, "1", DEFAULT_CONNECT_TIMEOUT_MS);
    assert_eq!(
        res.header("access-control-allow-origin"),
        Some("https://app.example")
    );

    // Another origin: 403, for the POST and for the preflight.
    let res = post_from(gw.addr, "https://evil.example", &hs).await;
    assert_eq!(res.status, 403, "{res:?}");
    assert_eq!(res.body, r#"{"error":"origin not allowed"}"#);
    // Checked last: a refused origin must not be granted CORS access.
    let echoed = res.header("access-control-allow-origin").map(str::to_owned);
    let res = request(
        gw.addr,
        "OPTIONS",
        "/bayeux",
        &[("Origin", "https://evil.example")],
        b"",
        WAIT,
    )
    .await;
    assert_eq!(res.status, 403, "{res:?}");
    assert_eq!(res.header("access-control-allow-origin"), None);
    assert_eq!(
        echoed, None,
        "a POST from a refused origin got Access-Control-Allow-Origin (with credentials)"
    );
    gw.stop().await;
}

// ------------------------------------------------------------ nodefony

/// nodefony's client: a handshake POSTed as one object (not an array), then
/// a connect with `connectionType: "WEBSOCKET"` over a WebSocket, whose
/// reply carries `data: {}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodefony_handshake_over_http_then_connect_over_websocket() {
    let redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let res = post(
        gw.addr,
        "/realtime",
        &handshake_msg("1", r#"["websocket"]"#),
    )
    .await;
    let cid = handshook(&res, "1", DEFAULT_CONNECT_TIMEOUT_MS);
    let mut ws = Client::connect(gw.addr, "/realtime").await;
    ws.send_text(&format!(
        r#"{{"channel":"/meta/connect","clientId":"{cid}","connectionType":"WEBSOCKET","id":"2"}}"#
    ))
    .await;
    assert_eq!(
        ws.recv_text().await,
        format!(
            r#"[{{"channel":"/meta/connect","id":"2","successful":true,"clientId":"{cid}","advice":{{"reconnect":"retry","interval":0,"timeout":{DEFAULT_CONNECT_TIMEOUT_MS}}},"data":{{}}}}]"#
        )
    );
    // And the session serves the WebSocket from then on.
    ws_subscribe(&mut ws, "3", &cid, "/nodefony").await;
    redis.publish("/nodefony", br#"{"k":"v"}"#).await;
    assert_eq!(
        ws.recv_text().await,
        batch(&[delivery("/nodefony", r#"{"k":"v"}"#)])
    );
    gw.stop().await;
}

// ------------------------------------------------------------ gap notices

/// Redis goes away and comes back: a faye client over a WebSocket and a
/// cometd client over long-polling each get `/wsgate/gap` `interrupted`,
/// then `resumed`, naming their subscriptions as they wrote them, and
/// receive again afterwards. Never silent, and no connect loop broken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_is_told_to_faye_and_cometd_on_wsgate_gap() {
    let mut redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let url = format!("http://{}/bayeux", gw.addr);
    let mut clients = [
        spawn_client("faye_client.js", &url, "websocket", &[]),
        spawn_client("cometd_client.js", &url, "long-polling", &[]),
    ];
    for c in clients.iter_mut() {
        c.expect("ready").await;
    }
    redis.kill();
    for state in ["interrupted", "resumed"] {
        if state == "resumed" {
            redis.restart().await;
        }
        for c in clients.iter_mut() {
            let gap = c
                .expect_where(&format!("/wsgate/gap {state}"), move |e| {
                    e["event"] == "delivery"
                        && e["channel"] == "/wsgate/gap"
                        && e["data"]["state"] == state
                })
                .await;
            let mut subs: Vec<&str> = gap["data"]["subscriptions"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            subs.sort_unstable();
            assert_eq!(subs, ["/foo/*", "/foo/bar"], "{gap}");
            if state == "interrupted" {
                assert_eq!(gap["data"]["reason"], "broker connection lost", "{gap}");
            }
        }
    }
    // Delivery flows again, once per client.
    redis.wait_numsub("/foo/bar", 1).await;
    assert_eq!(redis.publish("/foo/bar", br#"{"after":1}"#).await, 2);
    for c in clients.iter_mut() {
        c.expect_where("the message after the outage", |e| {
            e["event"] == "delivery" && e["data"]["after"] == 1
        })
        .await;
    }
    for c in clients {
        c.finish(WAIT).await;
    }
    gw.stop().await;
}

// ------------------------------------------------------------ tokens

const SECRET: &str = "wsgate-test-secret-0123456789abcdef";

/// An HS256 token for `sub`, valid for an hour, that may subscribe to
/// `acl`.
fn jwt(sub: &str, acl: &[&str]) -> String {
    let claims =
        json!({"sub": sub, "exp": jsonwebtoken::get_current_timestamp() + 3600, "subscribe": acl});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("an HS256 token")
}

/// The token comes in the handshake's `ext.token` and is checked there, with
/// the native protocol's verification and ACLs; a handshake without one is
/// refused with `advice {reconnect:"none"}`; the identity travels with a
/// clientId adopted by another node, so its ACL holds there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_in_the_handshake_ext_is_verified_and_travels_with_the_client_id() {
    let redis = Redis::start().await;
    let config = Config {
        jwt_key: Some(wsgate::auth::JwtKey::secret(SECRET).expect("a key")),
        ..test_config(Some(redis.url()))
    };
    let a = Gateway::start(config.clone()).await;
    let b = Gateway::start(config).await;

    // No token: refused, and told not to retry.
    let res = post(
        a.addr,
        "/bayeux",
        &format!("[{}]", handshake_msg("1", r#"["long-polling"]"#)),
    )
    .await;
    assert_eq!(
        res.body,
        r#"[{"channel":"/meta/handshake","id":"1","successful":false,"error":"401::missing token","advice":{"reconnect":"none","interval":0}}]"#,
        "{res:?}"
    );

    // The real faye client, token in ext: its ACL allows /foo/bar only.
    let url = format!("http://{}/bayeux", a.addr);
    let token = jwt("u1", &["/foo/bar"]);
    let mut faye = Script::spawn(
        "faye_client.js",
        &[
            "--url",
            &url,
            "--transport",
            "websocket",
            "--token",
            &token,
            "--max-ms",
            "30000",
        ],
    );
    let hs = faye.expect("handshake").await;
    assert_eq!(hs["successful"], true, "{hs}");
    // `ready` comes once both subscribes were answered, in either order.
    faye.expect("ready").await;
    let answered = |sub: &'static str| {
        faye.history()
            .iter()
            .find(|e| {
                e["event"] == "meta"
                    && e["message"]["channel"] == "/meta/subscribe"
                    && e["message"]["subscription"] == sub
            })
            .cloned()
            .unwrap_or_else(|| panic!("{sub} not answered: {:?}", faye.history()))
    };
    assert_eq!(answered("/foo/bar")["message"]["successful"], true);
    let refused = answered("/foo/*");
    assert_eq!(
        refused["message"]["error"], "403:/foo/*:Forbidden",
        "{refused}"
    );
    faye.finish(WAIT).await;

    // Handshake on A with the token, first message on B: B adopts the
    // clientId with the same identity, so the same ACL.
    let body = format!(
        r#"[{{"channel":"/meta/handshake","version":"1.0","supportedConnectionTypes":["long-polling"],"id":"1","ext":{{"token":"{token}"}}}}]"#
    );
    let res = post(a.addr, "/bayeux", &body).await;
    let cid = client_id_of(&res.body);
    let res = post(b.addr, "/bayeux", &subscribe_msg("2", &cid, "/foo/*")).await;
    assert_eq!(
        res.body,
        batch(&[subscribe_refused(
            "2",
            &cid,
            "/foo/*",
            "403:/foo/*:Forbidden"
        )]),
        "{res:?}"
    );
    lp_subscribe(b.addr, "/bayeux", "3", &cid, "/foo/bar").await;
    redis.wait_numsub("/foo/bar", 1).await;
    // A no longer answers for it: B serves the client.
    let res = post(a.addr, "/bayeux", &lp_connect("4", &cid)).await;
    assert_eq!(
        res.body,
        batch(&[unknown_client("/meta/connect", "4", &cid)]),
        "{res:?}"
    );
    a.stop().await;
    b.stop().await;
}
