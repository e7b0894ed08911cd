//! Bayeux `/service/<name>`: nodefony's TCP backends (`WSGATE_TCP_SERVICES`)
//! and JSON-RPC 2.0 calls to registered services, end to end.
//!
//! A nodefony-style backend is started by each test (a tokio `TcpListener`
//! on 127.0.0.1:0 that writes `READY`, then answers each line with a
//! JSON-RPC random-number line as nodefony's demo does), and reached
//! through real gateways on a real `redis-server`: by raw Bayeux over a
//! WebSocket and over long-polling (every byte compared), and by the real
//! npm `faye` client over both transports (and `cometd` over
//! long-polling). The backend reports what it sees (connections, lines,
//! ends), so the tests synchronise on its signals, never on sleeps.
//!
//! The expected bytes come from `docs/dialects/bayeux.md`, written out here
//! by hand.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

use common::node::Script;
use common::{test_config, wait_until, Client, Gateway, Redis, WAIT};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use wsgate::Config;

// ------------------------------------------------------------ the backend

/// The numbers nodefony's demo shows its random service answering, in turn.
const RANDOM: [u32; 6] = [68, 86, 26, 28, 53, 31];

/// The `k`-th line (from 0) a backend connection answers with.
fn random_line(k: usize) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","result":{},"error":null,"id":null}}"#,
        RANDOM[k % RANDOM.len()]
    )
}

/// What a backend saw, per connection (numbered from 0 in accept order).
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Accepted(usize),
    Line(usize, String),
    Eof(usize),
}

/// A nodefony-style TCP service: `READY`, then one random line per line
/// read. `BIG` is answered with a line of `big` bytes; `QUIT` makes it
/// close that connection. [`Backend::die`] closes every connection.
struct Backend {
    addr: SocketAddr,
    seen: mpsc::Receiver<Seen>,
    die: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Backend {
    async fn start(big: usize) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, seen) = mpsc::channel(256);
        let (die, dead) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut n = 0;
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (tx, dead) = (tx.clone(), dead.clone());
                tokio::spawn(serve(stream, n, big, tx, dead));
                n += 1;
            }
        });
        Backend {
            addr,
            seen,
            die,
            task,
        }
    }

    /// The next thing the backend saw, within `WAIT`.
    async fn next(&mut self) -> Seen {
        tokio::time::timeout(WAIT, self.seen.recv())
            .await
            .expect("the backend saw nothing in time")
            .expect("backend gone")
    }

    async fn expect(&mut self, want: Seen) {
        assert_eq!(self.next().await, want);
    }

    /// Nothing more seen for `d` (the gateway opened no other connection).
    async fn expect_nothing(&mut self, d: Duration) {
        if let Ok(got) = tokio::time::timeout(d, self.seen.recv()).await {
            panic!("the backend saw {got:?}");
        }
    }

    /// Every open connection is closed by the backend (a clean end: FIN).
    fn die(&self) {
        let _ = self.die.send(true);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.die();
        self.task.abort();
    }
}

async fn serve(
    stream: TcpStream,
    n: usize,
    big: usize,
    seen: mpsc::Sender<Seen>,
    mut dead: watch::Receiver<bool>,
) {
    let _ = seen.send(Seen::Accepted(n)).await;
    let (read, mut write) = stream.into_split();
    if write.write_all(b"READY\n").await.is_err() {
        return;
    }
    let mut lines = BufReader::new(read).lines();
    let mut k = 0;
    loop {
        tokio::select! {
            _ = async { drop(dead.wait_for(|d| *d).await) } => break,
            line = lines.next_line() => match line {
                Ok(Some(line)) => {
                    let quit = line == "QUIT";
                    let answer = if line == "BIG" { "x".repeat(big) } else { random_line(k) };
                    let _ = seen.send(Seen::Line(n, line)).await;
                    if quit {
                        break;
                    }
                    k += 1;
                    if write.write_all(format!("{answer}\n").as_bytes()).await.is_err() {
                        break;
                    }
                }
                Ok(None) | Err(_) => {
                    let _ = seen.send(Seen::Eof(n)).await;
                    return;
                }
            },
        }
    }
    let _ = write.shutdown().await;
}

/// A port nothing listens on.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

// ------------------------------------------------------------ configuration

/// Gateways on `redis` with these TCP backends, every call allowed.
fn config(redis: &Redis, backends: &[(&str, SocketAddr)]) -> Config {
    let mut config = test_config(Some(redis.url()));
    config.tcp_services = backends
        .iter()
        .map(|(name, addr)| ((*name).to_owned(), addr.to_string()))
        .collect();
    config.call_allow = vec!["*".into()];
    config
}

// ------------------------------------------------------------ expected bytes

const CONNECTION_TYPES: &str =
    r#"["websocket","long-polling","cross-origin-long-polling","callback-polling"]"#;
const ADVICE: &str = r#"{"reconnect":"retry","interval":0,"timeout":30000}"#;

fn batch(messages: &[String]) -> String {
    format!("[{}]", messages.join(","))
}

fn handshake_reply(id: &str, cid: &str) -> String {
    format!(
        r#"{{"channel":"/meta/handshake","id":"{id}","successful":true,"version":"1.0","supportedConnectionTypes":{CONNECTION_TYPES},"clientId":"{cid}","advice":{ADVICE}}}"#
    )
}

/// A connect's reply: the first carries the advice; on nodefony's
/// endpoint, `data` is the service map.
fn connect_reply(id: &str, cid: &str, first: bool, data: Option<&str>) -> String {
    let advice = if first {
        format!(r#","advice":{ADVICE}"#)
    } else {
        String::new()
    };
    let data = data.map(|d| format!(r#","data":{d}"#)).unwrap_or_default();
    format!(
        r#"{{"channel":"/meta/connect","id":"{id}","successful":true,"clientId":"{cid}"{advice}{data}}}"#
    )
}

fn meta_reply(meta: &str, id: &str, cid: &str, sub: &str, error: Option<&str>) -> String {
    let (ok, error) = match error {
        None => ("true", String::new()),
        Some(e) => ("false", format!(r#","error":"{e}""#)),
    };
    format!(
        r#"{{"channel":"/meta/{meta}","id":"{id}","successful":{ok},"clientId":"{cid}","subscription":"{sub}"{error}}}"#
    )
}

fn subscribed(id: &str, cid: &str, sub: &str) -> String {
    meta_reply("subscribe", id, cid, sub, None)
}

fn unsubscribed(id: &str, cid: &str, sub: &str) -> String {
    meta_reply("unsubscribe", id, cid, sub, None)
}

fn publish_ack(channel: &str, id: &str, error: Option<&str>) -> String {
    match error {
        None => format!(r#"{{"channel":"{channel}","id":"{id}","successful":true}}"#),
        Some(e) => {
            format!(r#"{{"channel":"{channel}","id":"{id}","successful":false,"error":"{e}"}}"#)
        }
    }
}

/// A line (or any text) on a service channel: `data` a JSON string of it.
fn service_data(channel: &str, text: &str) -> String {
    format!(
        r#"{{"channel":"{channel}","data":{}}}"#,
        serde_json::to_string(text).unwrap()
    )
}

/// The frame of a line that ended without the client asking.
fn ended(channel: &str, cid: &str, reason: &str) -> String {
    let error = format!(r#"{{"error":{}}}"#, serde_json::to_string(reason).unwrap());
    batch(&[
        service_data(channel, &error),
        format!(
            r#"{{"channel":"/meta/unsubscribe","successful":true,"clientId":"{cid}","subscription":"{channel}"}}"#
        ),
    ])
}

/// The JSON-RPC request the tests publish to a random-number backend.
const RANDOM_CALL: &str = r#"{"jsonrpc":"2.0","method":"random","id":null}"#;

// ------------------------------------------------------------ raw clients

/// A raw Bayeux client over a WebSocket (the messages nodefony's own client
/// sends: single objects, `connectionType` `WEBSOCKET`).
struct Ws {
    c: Client,
    cid: String,
}

impl Ws {
    /// Handshakes and connects on `path`; `data` is what the first connect
    /// reply must carry.
    async fn open(addr: SocketAddr, path: &str, data: Option<&str>) -> Ws {
        let mut c = Client::connect(addr, path).await;
        c.send_text(
            r#"{"channel":"/meta/handshake","version":"1.0","supportedConnectionTypes":["websocket"],"id":"1"}"#,
        )
        .await;
        let reply = c.recv_text().await;
        let v: Value = serde_json::from_str(&reply).unwrap();
        let cid = v[0]["clientId"].as_str().expect("clientId").to_owned();
        assert_eq!(reply, batch(&[handshake_reply("1", &cid)]));
        c.send_text(&format!(
            r#"{{"channel":"/meta/connect","clientId":"{cid}","connectionType":"WEBSOCKET","id":"2"}}"#
        ))
        .await;
        assert_eq!(
            c.recv_text().await,
            batch(&[connect_reply("2", &cid, true, data)])
        );
        Ws { c, cid }
    }

    async fn send(&mut self, message: &str) {
        self.c.send_text(message).await;
    }

    async fn expect(&mut self, frame: &str) {
        assert_eq!(self.c.recv_text().await, frame);
    }

    async fn subscribe(&mut self, id: &str, sub: &str) {
        let cid = &self.cid;
        self.send(&format!(
            r#"{{"channel":"/meta/subscribe","clientId":"{cid}","subscription":"{sub}","id":"{id}"}}"#
        ))
        .await;
    }

    async fn unsubscribe(&mut self, id: &str, sub: &str) {
        let cid = &self.cid;
        self.send(&format!(
            r#"{{"channel":"/meta/unsubscribe","clientId":"{cid}","subscription":"{sub}","id":"{id}"}}"#
        ))
        .await;
    }

    /// Publishes `data` (JSON text) on `channel`.
    async fn publish(&mut self, id: &str, channel: &str, data: &str) {
        let cid = &self.cid;
        self.send(&format!(
            r#"{{"channel":"{channel}","clientId":"{cid}","id":"{id}","data":{data}}}"#
        ))
        .await;
    }

    /// Publishes `text` as a JSON string, as nodefony's client does.
    async fn publish_text(&mut self, id: &str, channel: &str, text: &str) {
        let data = serde_json::to_string(text).unwrap();
        self.publish(id, channel, &data).await;
    }
}

/// `POST path` with a JSON body; the response's status and body.
async fn post(addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
    let send = async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        String::from_utf8(raw).unwrap()
    };
    let text = tokio::time::timeout(Duration::from_secs(40), send)
        .await
        .unwrap_or_else(|_| panic!("POST {path}: no answer in time"));
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
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

/// A raw long-polling Bayeux client.
struct Lp {
    addr: SocketAddr,
    path: &'static str,
    cid: String,
}

impl Lp {
    async fn open(addr: SocketAddr, path: &'static str) -> Lp {
        let (status, body) = post(
            addr,
            path,
            r#"[{"channel":"/meta/handshake","version":"1.0","supportedConnectionTypes":["long-polling"],"id":"1"}]"#,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let cid = v[0]["clientId"].as_str().expect("clientId").to_owned();
        assert_eq!(body, batch(&[handshake_reply("1", &cid)]));
        let lp = Lp { addr, path, cid };
        let first = lp.connect("2").await;
        assert_eq!(first, batch(&[connect_reply("2", &lp.cid, true, None)]));
        lp
    }

    /// One POST of `messages` (a batch); its response body.
    async fn post(&self, messages: &[String]) -> String {
        let (status, body) = post(self.addr, self.path, &batch(messages)).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    async fn connect(&self, id: &str) -> String {
        let cid = &self.cid;
        self.post(&[format!(
            r#"{{"channel":"/meta/connect","clientId":"{cid}","connectionType":"long-polling","id":"{id}"}}"#
        )])
        .await
    }

    fn meta(&self, meta: &str, id: &str, sub: &str) -> String {
        let cid = &self.cid;
        format!(
            r#"{{"channel":"/meta/{meta}","clientId":"{cid}","subscription":"{sub}","id":"{id}"}}"#
        )
    }

    fn publish_text(&self, id: &str, channel: &str, text: &str) -> String {
        let cid = &self.cid;
        let data = serde_json::to_string(text).unwrap();
        format!(r#"{{"channel":"{channel}","clientId":"{cid}","id":"{id}","data":{data}}}"#)
    }
}

/// The `published` event of publish `reference`, seen already or to come
/// (a client may hand the answer to the subscriber before it settles the
/// publish's promise).
async fn published(client: &mut Script, reference: &str) -> Value {
    let is = |e: &Value| e["event"] == "published" && e["ref"] == reference;
    if let Some(e) = client.history().iter().find(|e| is(e)) {
        return e.clone();
    }
    client.expect_where("the publish's answer", is).await
}

/// A real client script on `url` over `transport`, subscribed to `subs`.
fn spawn_client(script: &str, url: &str, transport: &str, subs: &[&str]) -> Script {
    let mut args = vec!["--url", url, "--transport", transport, "--max-ms", "50000"];
    for s in subs {
        args.push("--subscribe");
        args.push(s);
    }
    Script::spawn(script, &args)
}

// ------------------------------------------------------------ TCP backends

/// nodefony's flow over a WebSocket on `/realtime`, byte for byte: the
/// connect reply lists the backend, subscribing opens a connection for this
/// client whose first line (`READY`) and answers come back as string `data`
/// on the channel, a publish is written as one line (a JSON string's
/// content), and unsubscribing closes the connection.
#[tokio::test]
async fn tcp_backend_over_a_websocket() {
    let redis = Redis::start().await;
    let mut backend = Backend::start(0).await;
    let gw = Gateway::start(config(&redis, &[("random", backend.addr)])).await;
    let mut ws = Ws::open(gw.addr, "/realtime", Some(r#"{"random":{"type":"tcp"}}"#)).await;
    let cid = ws.cid.clone();
    ws.subscribe("3", "/service/random").await;
    ws.expect(&batch(&[subscribed("3", &cid, "/service/random")]))
        .await;
    backend.expect(Seen::Accepted(0)).await;
    ws.expect(&batch(&[service_data("/service/random", "READY")]))
        .await;
    for (k, id) in ["4", "5", "6"].into_iter().enumerate() {
        ws.publish_text(id, "/service/random", RANDOM_CALL).await;
        ws.expect(&batch(&[publish_ack("/service/random", id, None)]))
            .await;
        backend.expect(Seen::Line(0, RANDOM_CALL.into())).await;
        ws.expect(&batch(&[service_data("/service/random", &random_line(k))]))
            .await;
    }
    // A `data` that is not a string goes as its JSON text.
    ws.publish("7", "/service/random", r#"{"n": [1, 2]}"#).await;
    ws.expect(&batch(&[publish_ack("/service/random", "7", None)]))
        .await;
    backend
        .expect(Seen::Line(0, r#"{"n": [1, 2]}"#.into()))
        .await;
    ws.expect(&batch(&[service_data("/service/random", &random_line(3))]))
        .await;
    // Subscribing again changes nothing (no second connection).
    ws.subscribe("8", "/service/random").await;
    ws.expect(&batch(&[subscribed("8", &cid, "/service/random")]))
        .await;
    ws.unsubscribe("9", "/service/random").await;
    ws.expect(&batch(&[unsubscribed("9", &cid, "/service/random")]))
        .await;
    backend.expect(Seen::Eof(0)).await;
    // Closed: a publish now is refused, and nothing reaches the backend.
    ws.publish_text("10", "/service/random", RANDOM_CALL).await;
    ws.expect(&batch(&[publish_ack(
        "/service/random",
        "10",
        Some("404:/service/random:not subscribed"),
    )]))
    .await;
    // Opened again: a new connection, READY again.
    ws.subscribe("11", "/service/random").await;
    ws.expect(&batch(&[subscribed("11", &cid, "/service/random")]))
        .await;
    backend.expect(Seen::Accepted(1)).await;
    ws.expect(&batch(&[service_data("/service/random", "READY")]))
        .await;
    // The session's end closes it too.
    ws.send(&format!(
        r#"{{"channel":"/meta/disconnect","clientId":"{cid}","id":"12"}}"#
    ))
    .await;
    ws.expect(&batch(&[format!(
        r#"{{"channel":"/meta/disconnect","id":"12","successful":true,"clientId":"{cid}"}}"#
    )]))
    .await;
    backend.expect(Seen::Eof(1)).await;
    drop(ws);
    backend.expect_nothing(Duration::from_millis(200)).await;
    gw.stop().await;
}

/// The same flow over long-polling on `/bayeux`: each publish is answered
/// in its own poll at once, the lines the backend writes go with the next
/// connect (which they release), like deliveries.
#[tokio::test]
async fn tcp_backend_over_long_polling() {
    let redis = Redis::start().await;
    let mut backend = Backend::start(0).await;
    let gw = Gateway::start(config(&redis, &[("random", backend.addr)])).await;
    let lp = Lp::open(gw.addr, "/bayeux").await;
    let cid = lp.cid.clone();
    let body = lp
        .post(&[lp.meta("subscribe", "3", "/service/random")])
        .await;
    assert_eq!(body, batch(&[subscribed("3", &cid, "/service/random")]));
    backend.expect(Seen::Accepted(0)).await;
    assert_eq!(
        lp.connect("4").await,
        batch(&[
            service_data("/service/random", "READY"),
            connect_reply("4", &cid, false, None)
        ])
    );
    for (k, (publish, connect)) in [("5", "6"), ("7", "8")].into_iter().enumerate() {
        let body = lp
            .post(&[lp.publish_text(publish, "/service/random", RANDOM_CALL)])
            .await;
        assert_eq!(
            body,
            batch(&[publish_ack("/service/random", publish, None)])
        );
        backend.expect(Seen::Line(0, RANDOM_CALL.into())).await;
        assert_eq!(
            lp.connect(connect).await,
            batch(&[
                service_data("/service/random", &random_line(k)),
                connect_reply(connect, &cid, false, None)
            ])
        );
    }
    let body = lp
        .post(&[lp.meta("unsubscribe", "9", "/service/random")])
        .await;
    assert_eq!(body, batch(&[unsubscribed("9", &cid, "/service/random")]));
    backend.expect(Seen::Eof(0)).await;
    gw.stop().await;
}

/// The real npm faye client, over a WebSocket and over long-polling, on
/// nodefony's endpoint and on `/bayeux`: it subscribes to `/service/random`,
/// gets `READY`, publishes JSON-RPC text and gets the backend's answers as
/// messages on the channel; cancelling the subscription closes the
/// backend connection.
#[tokio::test]
async fn faye_reaches_a_tcp_backend_over_both_transports() {
    let redis = Redis::start().await;
    let mut backend = Backend::start(0).await;
    let gw = Gateway::start(config(&redis, &[("random", backend.addr)])).await;
    let runs = [
        ("websocket", "/realtime"),
        ("long-polling", "/realtime"),
        ("websocket", "/bayeux"),
        ("long-polling", "/bayeux"),
    ];
    for (conn, (transport, path)) in runs.into_iter().enumerate() {
        let url = format!("http://{}{path}", gw.addr);
        let mut faye = spawn_client("faye_client.js", &url, transport, &["/service/random"]);
        backend.expect(Seen::Accepted(conn)).await;
        // faye hands READY to the subscriber as it reads it, which may be
        // before it settles the subscription's promise ("ready").
        let ready = faye.expect("message").await;
        assert_eq!(
            ready,
            json!({"event": "message", "subscription": "/service/random",
                   "channel": "/service/random", "data": "READY"}),
            "{transport} {path}"
        );
        for k in 0..2 {
            let reference = format!("p{k}");
            faye.send(json!({"cmd": "publish", "channel": "/service/random",
                              "data": RANDOM_CALL, "ref": reference}))
                .await;
            backend.expect(Seen::Line(conn, RANDOM_CALL.into())).await;
            let answer = faye.expect("message").await;
            assert_eq!(answer["data"], json!(random_line(k)), "{transport} {path}");
            assert_eq!(answer["channel"], "/service/random");
            let done = published(&mut faye, &reference).await;
            assert_eq!(
                done,
                json!({"event": "published", "ref": reference, "ok": true})
            );
        }
        assert!(
            faye.history().iter().any(|e| e["event"] == "subscribed"),
            "{transport} {path}: {:?}",
            faye.history()
        );
        faye.send(json!({"cmd": "unsubscribe", "channel": "/service/random"}))
            .await;
        let gone = faye.expect("unsubscribed").await;
        assert_eq!(gone["successful"], true, "{transport} {path}");
        backend.expect(Seen::Eof(conn)).await;
        let (status, _) = faye.finish(WAIT).await;
        assert!(status.success(), "{transport} {path}");
    }
    gw.stop().await;
}

/// cometd (its own long-polling) reaches the backend the same way.
#[tokio::test]
async fn cometd_reaches_a_tcp_backend_over_long_polling() {
    let redis = Redis::start().await;
    let mut backend = Backend::start(0).await;
    let gw = Gateway::start(config(&redis, &[("random", backend.addr)])).await;
    let url = format!("http://{}/bayeux", gw.addr);
    let mut cometd = spawn_client(
        "cometd_client.js",
        &url,
        "long-polling",
        &["/service/random"],
    );
    backend.expect(Seen::Accepted(0)).await;
    // READY may come (with the held connect) before the subscribe's own
    // response is read: cometd registered the listener first, and hands it
    // over all the same.
    let ready = cometd.expect("message").await;
    assert_eq!(ready["data"], "READY");
    cometd
        .send(json!({"cmd": "publish", "channel": "/service/random",
                      "data": RANDOM_CALL, "ref": "p"}))
        .await;
    backend.expect(Seen::Line(0, RANDOM_CALL.into())).await;
    let answer = cometd.expect("message").await;
    assert_eq!(answer["data"], json!(random_line(0)));
    let done = published(&mut cometd, "p").await;
    assert_eq!(done["ok"], true, "{done}");
    assert!(
        cometd.history().iter().any(|e| e["event"] == "subscribed"),
        "{:?}",
        cometd.history()
    );
    cometd
        .send(json!({"cmd": "unsubscribe", "channel": "/service/random"}))
        .await;
    cometd.expect("unsubscribed").await;
    backend.expect(Seen::Eof(0)).await;
    let (status, _) = cometd.finish(WAIT).await;
    assert!(status.success());
    gw.stop().await;
}

/// A backend that closes the connection: the client gets an error message
/// on the channel and an unsubscribe notice, and no longer holds the line
/// (a publish is refused; subscribing again opens a new connection). Over
/// long-polling the notice releases the held connect. faye sees both.
#[tokio::test]
async fn a_backend_that_dies_ends_the_line_cleanly() {
    let redis = Redis::start().await;
    let mut backend = Backend::start(0).await;
    let gw = Gateway::start(config(&redis, &[("random", backend.addr)])).await;
    // Raw WebSocket: the backend closes this connection (QUIT).
    let mut ws = Ws::open(gw.addr, "/bayeux", None).await;
    let cid = ws.cid.clone();
    ws.subscribe("3", "/service/random").await;
    ws.expect(&batch(&[subscribed("3", &cid, "/service/random")]))
        .await;
    backend.expect(Seen::Accepted(0)).await;
    ws.expect(&batch(&[service_data("/service/random", "READY")]))
        .await;
    ws.publish_text("4", "/service/random", "QUIT").await;
    ws.expect(&batch(&[publish_ack("/service/random", "4", None)]))
        .await;
    backend.expect(Seen::Line(0, "QUIT".into())).await;
    ws.expect(&ended(
        "/service/random",
        &cid,
        "service closed the connection",
    ))
    .await;
    ws.publish_text("5", "/service/random", RANDOM_CALL).await;
    ws.expect(&batch(&[publish_ack(
        "/service/random",
        "5",
        Some("404:/service/random:not subscribed"),
    )]))
    .await;
    ws.subscribe("6", "/service/random").await;
    ws.expect(&batch(&[subscribed("6", &cid, "/service/random")]))
        .await;
    backend.expect(Seen::Accepted(1)).await;
    ws.expect(&batch(&[service_data("/service/random", "READY")]))
        .await;

    // Raw long-polling: the whole backend dies while a connect is held.
    let lp = Lp::open(gw.addr, "/bayeux").await;
    let lp_cid = lp.cid.clone();
    let body = lp
        .post(&[lp.meta("subscribe", "3", "/service/random")])
        .await;
    assert_eq!(body, batch(&[subscribed("3", &lp_cid, "/service/random")]));
    backend.expect(Seen::Accepted(2)).await;
    assert_eq!(
        lp.connect("4").await,
        batch(&[
            service_data("/service/random", "READY"),
            connect_reply("4", &lp_cid, false, None)
        ])
    );
    let held = tokio::spawn({
        let (addr, cid) = (gw.addr, lp_cid.clone());
        async move {
            let lp = Lp {
                addr,
                path: "/bayeux",
                cid,
            };
            lp.connect("5").await
        }
    });
    backend.die();
    let mut want = ended("/service/random", &lp_cid, "service closed the connection");
    want.pop(); // the connect reply follows in the same batch
    assert_eq!(
        held.await.unwrap(),
        format!("{want},{}]", connect_reply("5", &lp_cid, false, None))
    );
    // The WebSocket client's connection died with the backend as well.
    ws.expect(&ended(
        "/service/random",
        &cid,
        "service closed the connection",
    ))
    .await;
    drop(ws);
    gw.stop().await;
}

/// faye over a WebSocket hands the end to the channel's subscribers and
/// sees the unsubscribe notice.
#[tokio::test]
async fn faye_sees_a_backend_die() {
    let redis = Redis::start().await;
    let mut backend = Backend::start(0).await;
    let gw = Gateway::start(config(&redis, &[("random", backend.addr)])).await;
    let url = format!("http://{}/realtime", gw.addr);
    let mut faye = spawn_client("faye_client.js", &url, "websocket", &["/service/random"]);
    backend.expect(Seen::Accepted(0)).await;
    assert_eq!(faye.expect("message").await["data"], "READY");
    backend.die();
    let end = faye.expect("message").await;
    assert_eq!(
        end["data"],
        json!(r#"{"error":"service closed the connection"}"#)
    );
    let notice = faye.expect("unsubscribed").await;
    assert_eq!(
        notice,
        json!({"event": "unsubscribed", "subscription": "/service/random", "successful": true})
    );
    let (status, _) = faye.finish(WAIT).await;
    assert!(status.success());
    gw.stop().await;
}

/// `WSGATE_TCP_SERVICES_PER_CLIENT` and `WSGATE_TCP_SERVICES_PER_NODE`
/// refuse beyond; a place is free again once the line ended.
#[tokio::test]
async fn connection_caps_refuse_beyond() {
    let redis = Redis::start().await;
    let mut random = Backend::start(0).await;
    let mut dmsg = Backend::start(0).await;
    let mut cfg = config(&redis, &[("random", random.addr), ("dmsg", dmsg.addr)]);
    cfg.tcp_services_per_client = NonZeroUsize::new(1).unwrap();
    cfg.tcp_services_per_node = NonZeroUsize::new(2).unwrap();
    let gw = Gateway::start(cfg).await;
    let data = r#"{"random":{"type":"tcp"},"dmsg":{"type":"tcp"}}"#;
    let mut a = Ws::open(gw.addr, "/realtime", Some(data)).await;
    let a_cid = a.cid.clone();
    a.subscribe("3", "/service/random").await;
    a.expect(&batch(&[subscribed("3", &a_cid, "/service/random")]))
        .await;
    random.expect(Seen::Accepted(0)).await;
    a.expect(&batch(&[service_data("/service/random", "READY")]))
        .await;
    a.subscribe("4", "/service/dmsg").await;
    a.expect(&batch(&[meta_reply(
        "subscribe",
        "4",
        &a_cid,
        "/service/dmsg",
        Some("403:/service/dmsg:service connection limit reached (1)"),
    )]))
    .await;
    dmsg.expect_nothing(Duration::from_millis(200)).await;
    let mut b = Ws::open(gw.addr, "/realtime", Some(data)).await;
    let b_cid = b.cid.clone();
    b.subscribe("3", "/service/dmsg").await;
    b.expect(&batch(&[subscribed("3", &b_cid, "/service/dmsg")]))
        .await;
    dmsg.expect(Seen::Accepted(0)).await;
    b.expect(&batch(&[service_data("/service/dmsg", "READY")]))
        .await;
    // The node's two places are taken.
    let mut c = Ws::open(gw.addr, "/realtime", Some(data)).await;
    let c_cid = c.cid.clone();
    c.subscribe("3", "/service/random").await;
    c.expect(&batch(&[meta_reply(
        "subscribe",
        "3",
        &c_cid,
        "/service/random",
        Some("503:/service/random:too many service connections on this node"),
    )]))
    .await;
    random.expect_nothing(Duration::from_millis(200)).await;
    // One ends: its place is free once the backend saw the end.
    a.unsubscribe("5", "/service/random").await;
    a.expect(&batch(&[unsubscribed("5", &a_cid, "/service/random")]))
        .await;
    random.expect(Seen::Eof(0)).await;
    c.subscribe("4", "/service/random").await;
    c.expect(&batch(&[subscribed("4", &c_cid, "/service/random")]))
        .await;
    random.expect(Seen::Accepted(1)).await;
    let refused = gw.metrics().await;
    assert!(
        refused.contains(r#"wsgate_refused_total{reason="tcp_service_limit"} 2"#),
        "{refused}"
    );
    drop((a, b, c));
    gw.stop().await;
}

/// Lines are bounded (`WSGATE_TCP_SERVICE_LINE_BYTES`, 64 here) both ways:
/// a line of exactly the bound passes, a longer one from the backend ends
/// the line with an error, a longer publish is refused `413`, and so is
/// one holding a line break.
#[tokio::test]
async fn lines_are_bounded() {
    let redis = Redis::start().await;
    let mut backend = Backend::start(65).await;
    let mut cfg = config(&redis, &[("random", backend.addr)]);
    cfg.tcp_service_line_bytes = NonZeroUsize::new(64).unwrap();
    let gw = Gateway::start(cfg).await;
    let mut ws = Ws::open(gw.addr, "/bayeux", None).await;
    let cid = ws.cid.clone();
    ws.subscribe("3", "/service/random").await;
    ws.expect(&batch(&[subscribed("3", &cid, "/service/random")]))
        .await;
    backend.expect(Seen::Accepted(0)).await;
    ws.expect(&batch(&[service_data("/service/random", "READY")]))
        .await;
    let longest = "y".repeat(64);
    ws.publish_text("4", "/service/random", &longest).await;
    ws.expect(&batch(&[publish_ack("/service/random", "4", None)]))
        .await;
    backend.expect(Seen::Line(0, longest.clone())).await;
    ws.expect(&batch(&[service_data("/service/random", &random_line(0))]))
        .await;
    ws.publish_text("5", "/service/random", &format!("{longest}y"))
        .await;
    ws.expect(&batch(&[publish_ack(
        "/service/random",
        "5",
        Some("413:/service/random:payload too large"),
    )]))
    .await;
    ws.publish_text("6", "/service/random", "two\nlines").await;
    ws.expect(&batch(&[publish_ack(
        "/service/random",
        "6",
        Some("403:/service/random:a line cannot hold a line break"),
    )]))
    .await;
    ws.publish_text("7", "/service/random", "BIG").await;
    ws.expect(&batch(&[publish_ack("/service/random", "7", None)]))
        .await;
    backend.expect(Seen::Line(0, "BIG".into())).await;
    ws.expect(&ended(
        "/service/random",
        &cid,
        "line too long (max 64 bytes)",
    ))
    .await;
    backend.expect(Seen::Eof(0)).await;
    drop(ws);
    gw.stop().await;
}

/// Refusals: `/service/**` needs call rights (never publish rights), an
/// unknown service and a deeper or wildcard service channel are `404`, a
/// backend that cannot be reached is `503`.
#[tokio::test]
async fn refusals() {
    let redis = Redis::start().await;
    let mut backend = Backend::start(0).await;
    let down = closed_port().await;
    // Publishing is allowed everywhere, calling nowhere.
    let mut cfg = config(&redis, &[("random", backend.addr), ("down", down)]);
    cfg.call_allow = vec!["other:*".into(), "random:only".into()];
    cfg.client_publish = vec!["*".into()];
    let gw = Gateway::start(cfg).await;
    let mut ws = Ws::open(gw.addr, "/bayeux", None).await;
    let cid = ws.cid.clone();
    ws.subscribe("3", "/service/random").await;
    ws.expect(&batch(&[meta_reply(
        "subscribe",
        "3",
        &cid,
        "/service/random",
        Some("403:/service/random:Forbidden"),
    )]))
    .await;
    ws.publish_text("4", "/service/random", RANDOM_CALL).await;
    ws.expect(&batch(&[publish_ack(
        "/service/random",
        "4",
        Some("403:/service/random:Forbidden"),
    )]))
    .await;
    backend.expect_nothing(Duration::from_millis(200)).await;
    for (id, name) in [
        ("5", "/service/nope"),
        ("6", "/service/a/b"),
        ("7", "/service/*"),
    ] {
        ws.subscribe(id, name).await;
        ws.expect(&batch(&[meta_reply(
            "subscribe",
            id,
            &cid,
            name,
            Some(&format!("404:{name}:No such service")),
        )]))
        .await;
    }
    for (id, name) in [("8", "/service/nope"), ("9", "/service/a/b")] {
        ws.publish_text(id, name, RANDOM_CALL).await;
        ws.expect(&batch(&[publish_ack(
            name,
            id,
            Some(&format!("404:{name}:No such service")),
        )]))
        .await;
    }
    let refused = gw.metrics().await;
    assert!(
        refused.contains(r#"wsgate_refused_total{reason="call_not_allowed"} 2"#),
        "{refused}"
    );
    drop(ws);
    gw.stop().await;

    // With the right, a backend nobody listens on is refused at once.
    let gw = Gateway::start(config(&redis, &[("down", down)])).await;
    let mut ws = Ws::open(gw.addr, "/bayeux", None).await;
    let cid = ws.cid.clone();
    ws.subscribe("3", "/service/down").await;
    ws.expect(&batch(&[meta_reply(
        "subscribe",
        "3",
        &cid,
        "/service/down",
        Some("503:/service/down:service unavailable (Connection refused (os error 111))"),
    )]))
    .await;
    drop(ws);
    gw.stop().await;
}

/// A backend that accepts but never reads: the writes queue up to their
/// bound, then publishes are refused `429`; the client and the gateway are
/// unaffected, and unsubscribing still closes the connection.
#[tokio::test]
async fn a_backend_that_does_not_read_is_bounded() {
    let redis = Redis::start().await;
    // A small receive buffer, so that the kernel holds little of what is
    // written before the gateway's own bound is reached.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let gw = Gateway::start(config(&redis, &[("stuck", addr)])).await;
    let mut ws = Ws::open(gw.addr, "/bayeux", None).await;
    let cid = ws.cid.clone();
    ws.subscribe("3", "/service/stuck").await;
    ws.expect(&batch(&[subscribed("3", &cid, "/service/stuck")]))
        .await;
    let (mut stuck, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .unwrap()
        .unwrap();
    // Fill the kernel buffers and the write queue with large lines.
    let line = "z".repeat(60_000);
    let mut refused = None;
    for n in 0..1000 {
        let id = format!("p{n}");
        ws.publish_text(&id, "/service/stuck", &line).await;
        let answer = ws.c.recv_text().await;
        if answer != batch(&[publish_ack("/service/stuck", &id, None)]) {
            refused = Some((id, answer));
            break;
        }
    }
    let (id, answer) = refused.expect("publishes were never refused");
    assert_eq!(
        answer,
        batch(&[publish_ack(
            "/service/stuck",
            &id,
            Some("429:/service/stuck:rate limited"),
        )])
    );
    ws.unsubscribe("u", "/service/stuck").await;
    ws.expect(&batch(&[unsubscribed("u", &cid, "/service/stuck")]))
        .await;
    // The connection is closed: reading what was written ends.
    let mut sink = Vec::new();
    let read = tokio::time::timeout(WAIT, stuck.read_to_end(&mut sink)).await;
    assert!(read.is_ok(), "the connection was not closed");
    drop(ws);
    gw.stop().await;
}

// ------------------------------------------------------------ registered services

/// Waits until the gateway's directory knows `service` (nodefony's connect
/// reply lists it).
async fn wait_registered(addr: SocketAddr, service: &str) {
    wait_until(&format!("{service} registered"), WAIT, || async move {
        let mut ws = Client::connect(addr, "/realtime").await;
        ws.send_text(
            r#"{"channel":"/meta/handshake","version":"1.0","supportedConnectionTypes":["websocket"],"id":"1"}"#,
        )
        .await;
        let reply: Value = serde_json::from_str(&ws.recv_text().await).unwrap();
        let cid = reply[0]["clientId"].as_str().unwrap().to_owned();
        ws.send_text(&format!(
            r#"{{"channel":"/meta/connect","clientId":"{cid}","connectionType":"websocket","id":"2"}}"#
        ))
        .await;
        let connect: Value = serde_json::from_str(&ws.recv_text().await).unwrap();
        connect[0]["data"][service]["type"] == "service"
    })
    .await;
}

/// A service process: a WebSocket client of `/services` that registers
/// `billing` with `charge` (docs/services.md).
async fn billing(addr: SocketAddr, key: &str) -> Client {
    let auth = format!("Bearer {key}");
    let mut service = Client::try_connect(addr, "/services", &[("Authorization", auth.as_str())])
        .await
        .expect("the service's upgrade");
    service
        .send_text(r#"{"type":"register","name":"billing","version":"1.2.0","methods":["charge"]}"#)
        .await;
    let registered = service.recv().await;
    assert_eq!(registered["type"], "registered", "{registered}");
    service
}

/// The next call the service receives: (its id, its payload).
async fn next_call(service: &mut Client) -> (String, Value) {
    let call = service.recv().await;
    assert_eq!(call["type"], "message", "{call}");
    assert_eq!(call["destination"], "billing:charge", "{call}");
    (
        call["id"].as_str().unwrap().to_owned(),
        call["payload"].clone(),
    )
}

/// `WSGATE_SERVICE_KEY` of the tests (at least 16 bytes).
const SERVICE_KEY: &str = "the-services-test-key";

fn services_config(redis: &Redis) -> Config {
    let mut cfg = config(redis, &[]);
    cfg.service_key =
        Config::from_vars([("WSGATE_SERVICE_KEY".to_owned(), SERVICE_KEY.to_owned())])
            .unwrap()
            .service_key;
    cfg
}

/// JSON-RPC 2.0 to a registered service over raw long-polling: the
/// publish's poll is answered at once (the call is not its request), and
/// the response, byte for byte, goes with the next connect; errors come
/// back as JSON-RPC errors.
#[tokio::test]
async fn json_rpc_to_a_registered_service_over_long_polling() {
    let redis = Redis::start().await;
    let gw = Gateway::start(services_config(&redis)).await;
    let mut service = billing(gw.addr, SERVICE_KEY).await;
    wait_registered(gw.addr, "billing").await;
    let lp = Lp::open(gw.addr, "/bayeux").await;
    let cid = lp.cid.clone();
    let body = lp
        .post(&[lp.meta("subscribe", "3", "/service/billing")])
        .await;
    assert_eq!(body, batch(&[subscribed("3", &cid, "/service/billing")]));
    let call = r#"{"jsonrpc":"2.0","method":"charge","params":{"cents":250},"id":7}"#;
    // Answered at once, while the service still holds the call.
    let body = lp
        .post(&[lp.publish_text("4", "/service/billing", call)])
        .await;
    assert_eq!(body, batch(&[publish_ack("/service/billing", "4", None)]));
    let (id, payload) = next_call(&mut service).await;
    assert_eq!(payload, json!({"cents": 250}));
    service
        .send_json(json!({"type": "reply", "id": id, "payload": {"ok": true}}))
        .await;
    let response = r#"{"jsonrpc":"2.0","result":{"ok":true},"error":null,"id":7}"#;
    assert_eq!(
        lp.connect("5").await,
        batch(&[
            format!(
                r#"{{"channel":"/service/billing","id":"4","successful":true,"data":{}}}"#,
                serde_json::to_string(response).unwrap()
            ),
            connect_reply("5", &cid, false, None)
        ])
    );
    // A method it did not register, and invalid JSON-RPC: acknowledged,
    // then answered with a JSON-RPC error.
    let body = lp
        .post(&[
            lp.publish_text(
                "6",
                "/service/billing",
                r#"{"jsonrpc":"2.0","method":"refund","id":"r"}"#,
            ),
            lp.publish_text("7", "/service/billing", "READY"),
        ])
        .await;
    assert_eq!(
        body,
        batch(&[
            publish_ack("/service/billing", "6", None),
            publish_ack("/service/billing", "7", None),
            format!(
                r#"{{"channel":"/service/billing","id":"7","successful":true,"data":{}}}"#,
                serde_json::to_string(
                    r#"{"jsonrpc":"2.0","result":null,"error":{"code":-32700,"message":"parse error"},"id":null}"#
                )
                .unwrap()
            ),
        ])
    );
    let refund = r#"{"jsonrpc":"2.0","result":null,"error":{"code":-32601,"message":"no such method"},"id":"r"}"#;
    assert_eq!(
        lp.connect("8").await,
        batch(&[
            format!(
                r#"{{"channel":"/service/billing","id":"6","successful":true,"data":{}}}"#,
                serde_json::to_string(refund).unwrap()
            ),
            connect_reply("8", &cid, false, None)
        ])
    );
    drop(service);
    gw.stop().await;
}

/// The real faye client (both transports) calls a registered service with
/// JSON-RPC text on `/service/billing`, and cometd's `remoteCall` reads the
/// same response.
#[tokio::test]
async fn faye_and_cometd_call_a_registered_service() {
    let redis = Redis::start().await;
    let gw = Gateway::start(services_config(&redis)).await;
    let mut service = billing(gw.addr, SERVICE_KEY).await;
    wait_registered(gw.addr, "billing").await;
    let call = r#"{"jsonrpc":"2.0","method":"charge","params":[1,2],"id":7}"#;
    let response = r#"{"jsonrpc":"2.0","result":3,"error":null,"id":7}"#;
    for transport in ["websocket", "long-polling"] {
        let url = format!("http://{}/realtime", gw.addr);
        let mut faye = spawn_client("faye_client.js", &url, transport, &["/service/billing"]);
        faye.expect("ready").await;
        faye.send(json!({"cmd": "publish", "channel": "/service/billing",
                          "data": call, "ref": "c"}))
            .await;
        let (id, payload) = next_call(&mut service).await;
        assert_eq!(payload, json!([1, 2]));
        service
            .send_json(json!({"type": "reply", "id": id, "payload": 3}))
            .await;
        let answer = faye.expect("message").await;
        assert_eq!(answer["data"], json!(response), "{transport}");
        assert_eq!(published(&mut faye, "c").await["ok"], true);
        let (status, _) = faye.finish(WAIT).await;
        assert!(status.success());
    }
    let url = format!("http://{}/bayeux", gw.addr);
    let mut cometd = spawn_client("cometd_client.js", &url, "websocket", &["/foo/bar"]);
    cometd.expect("ready").await;
    cometd
        .send(json!({"cmd": "call", "target": "billing", "data": call, "ref": "r"}))
        .await;
    let (id, _) = next_call(&mut service).await;
    service
        .send_json(json!({"type": "reply", "id": id, "payload": 3}))
        .await;
    let called = cometd.expect("called").await;
    assert_eq!(
        called,
        json!({"event": "called", "ref": "r", "successful": true, "data": response})
    );
    let (status, _) = cometd.finish(WAIT).await;
    assert!(status.success());
    drop(service);
    gw.stop().await;
}

/// Without the call right on `billing:refund` the publish is refused;
/// with the right on `billing:charge`, a service that never answers gets
/// the JSON-RPC timeout error.
#[tokio::test]
async fn registered_service_refusals() {
    let redis = Redis::start().await;
    let mut cfg = services_config(&redis);
    cfg.call_allow = vec!["billing:charge".into()];
    cfg.call_timeout = Duration::from_millis(300);
    let gw = Gateway::start(cfg).await;
    let mut service = billing(gw.addr, SERVICE_KEY).await;
    wait_registered(gw.addr, "billing").await;
    let mut ws = Ws::open(gw.addr, "/bayeux", None).await;
    ws.publish_text(
        "4",
        "/service/billing",
        r#"{"jsonrpc":"2.0","method":"refund","id":1}"#,
    )
    .await;
    ws.expect(&batch(&[publish_ack(
        "/service/billing",
        "4",
        Some("403:/service/billing:Forbidden"),
    )]))
    .await;
    ws.publish_text(
        "5",
        "/service/billing",
        r#"{"jsonrpc":"2.0","method":"charge","id":2}"#,
    )
    .await;
    ws.expect(&batch(&[publish_ack("/service/billing", "5", None)]))
        .await;
    // The service gets the call and never answers.
    next_call(&mut service).await;
    let timeout =
        r#"{"jsonrpc":"2.0","result":null,"error":{"code":408,"message":"timeout"},"id":2}"#;
    ws.expect(&batch(&[format!(
        r#"{{"channel":"/service/billing","id":"5","successful":true,"data":{}}}"#,
        serde_json::to_string(timeout).unwrap()
    )]))
    .await;
    drop((ws, service));
    gw.stop().await;
}
