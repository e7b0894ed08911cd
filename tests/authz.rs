//! The subscribe authorisation callback against a real (tiny) HTTP server.
//!
//! The test's server is a hand-written HTTP/1.1 responder on 127.0.0.1:0. It
//! records every request body and answers by the requested name: `ok…` 200,
//! `deny…` 403 with a JSON reason, `text…` 403 with a text reason, `empty…`
//! 403 with no body, `error…` 500, `slow…` never. Cache behaviour is proven
//! by counting the requests the server received.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use wsgate::auth::JwtKey;
use wsgate::Config;

const SECRET: &str = "wsgate-test-secret-0123456789abcdef";

/// The callback service: records requests, answers by name.
struct AuthServer {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Value>>>,
    task: JoinHandle<()>,
}

impl AuthServer {
    async fn start() -> AuthServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        let task = tokio::spawn(async move {
            // Connection tasks live in the set, so aborting the server ends
            // them too (including the ones that never answer).
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                connections.spawn(serve(stream, log.clone()));
            }
        });
        AuthServer {
            addr,
            requests,
            task,
        }
    }

    fn url(&self) -> hyper::Uri {
        format!("http://{}/authorise", self.addr).parse().unwrap()
    }

    fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    fn last(&self) -> Value {
        self.requests.lock().unwrap().last().cloned().unwrap()
    }
}

impl Drop for AuthServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request (headers, then `Content-Length` bytes), records the
/// body, answers, closes.
async fn serve(stream: tokio::net::TcpStream, log: Arc<Mutex<Vec<Value>>>) {
    let mut reader = BufReader::new(stream);
    let mut length = 0usize;
    let mut first = String::new();
    if reader.read_line(&mut first).await.unwrap_or(0) == 0 {
        return;
    }
    assert!(first.starts_with("POST /authorise HTTP/1.1"), "{first}");
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').unwrap();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.trim().parse().unwrap();
        }
        if name.eq_ignore_ascii_case("content-type") {
            assert_eq!(value.trim(), "application/json");
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).await.unwrap();
    let body: Value = serde_json::from_slice(&body).expect("callback body is JSON");
    log.lock().unwrap().push(body.clone());
    let name = body["pattern"]
        .as_str()
        .or(body["channel"].as_str())
        .unwrap()
        .trim_start_matches('/') // Bayeux channels: `/ok/x` is `ok…`
        .to_owned();
    let (status, content_type, reply) = if name.starts_with("ok") {
        ("200 OK", "application/json", "{}".to_owned())
    } else if name.starts_with("deny") {
        (
            "403 Forbidden",
            "application/json",
            json!({"reason": format!("no access to {name}")}).to_string(),
        )
    } else if name.starts_with("text") {
        ("403 Forbidden", "text/plain", "plain words\n".to_owned())
    } else if name.starts_with("empty") {
        ("403 Forbidden", "text/plain", String::new())
    } else if name.starts_with("error") {
        ("500 Internal Server Error", "text/plain", "boom".to_owned())
    } else {
        // `slow…`: never answer; the gateway must give up by itself.
        std::future::pending::<()>().await;
        unreachable!()
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
        reply.len()
    );
    let mut stream = reader.into_inner();
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

fn token(sub: &str, acl: &[&str]) -> String {
    let claims = json!({
        "sub": sub,
        "exp": jsonwebtoken::get_current_timestamp() + 3600,
        "subscribe": acl,
        "role": "reader",
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// A gateway with JWT auth and the callback, memory broker.
async fn gateway(server: &AuthServer, ttl: Duration) -> Gateway {
    Gateway::start(Config {
        jwt_key: Some(JwtKey::secret(SECRET).unwrap()),
        auth_url: Some(server.url()),
        auth_timeout: Duration::from_millis(500),
        auth_cache_ttl: ttl,
        ..test_config(None)
    })
    .await
}

async fn connect(gw: &Gateway, token: &str) -> Client {
    let bearer = format!("Bearer {token}");
    Client::try_connect(gw.addr, "/ws", &[("authorization", &bearer)])
        .await
        .unwrap()
}

fn metric(text: &str, reason: &str) -> f64 {
    let series = format!("wsgate_refused_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

async fn subscribe(client: &mut Client, kind: &str, name: &str) -> Value {
    client
        .request(json!({"action":"subscribe", kind: name}))
        .await
}

async fn unsubscribe(client: &mut Client, kind: &str, name: &str) {
    let reply = client
        .request(json!({"action":"unsubscribe", kind: name}))
        .await;
    assert_eq!(reply["status"], json!(true), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callback_decides_and_sees_every_field() {
    let server = AuthServer::start().await;
    let gw = gateway(&server, Duration::from_secs(60)).await;
    let mut client = connect(&gw, &token("u1", &["*"])).await;

    client.psubscribe("ok.*").await;
    let body = server.last();
    assert_eq!(body["subject"], "u1");
    assert_eq!(body["claims"]["role"], "reader");
    assert_eq!(body["claims"]["sub"], "u1");
    assert_eq!(body["claims"]["subscribe"], json!(["*"]));
    assert_eq!(body["pattern"], "ok.*");
    assert!(body.get("channel").is_none());
    assert_eq!(body["remote_addr"], "127.0.0.1");

    for (name, error) in [
        ("deny.x", "no access to deny.x"),
        ("text.x", "plain words"),
        ("empty.x", "not allowed"),
        ("error.x", "authorisation unavailable"),
        ("slow.x", "authorisation unavailable"),
    ] {
        let reply = subscribe(&mut client, "channel", name).await;
        assert_eq!(
            reply,
            json!({"action":"subscribe","channel":name,"status":false,"error":error})
        );
        assert_eq!(server.last()["channel"], name);
    }
    // The allowed subscription is real.
    gw.publish(json!({"channel":"ok.1","payload":1})).await;
    assert_eq!(
        client.recv().await,
        json!({"action":"message","pattern":"ok.*","channel":"ok.1","payload":1})
    );
    let metrics = gw.metrics().await;
    assert_eq!(metric(&metrics, "authz_denied"), 3.0);
    assert_eq!(metric(&metrics, "authz_unavailable"), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_refusals_never_reach_the_callback() {
    let server = AuthServer::start().await;
    let gw = gateway(&server, Duration::from_secs(60)).await;
    let mut client = connect(&gw, &token("u1", &["ok.*"])).await;
    for (kind, name) in [("pattern", "*"), ("pattern", "ok*"), ("channel", "deny.x")] {
        let reply = subscribe(&mut client, kind, name).await;
        assert_eq!(reply["error"], "not allowed");
    }
    assert_eq!(server.count(), 0);
    client.subscribe("ok.a").await;
    assert_eq!(server.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_are_cached_per_subject_and_topic() {
    let server = AuthServer::start().await;
    let gw = gateway(&server, Duration::from_secs(60)).await;
    let mut a = connect(&gw, &token("u1", &["*"])).await;
    a.subscribe("ok.a").await;
    assert_eq!(server.count(), 1);
    unsubscribe(&mut a, "channel", "ok.a").await;
    a.subscribe("ok.a").await;
    assert_eq!(server.count(), 1, "allow not cached");
    for _ in 0..2 {
        let reply = subscribe(&mut a, "channel", "deny.a").await;
        assert_eq!(reply["error"], "no access to deny.a");
    }
    assert_eq!(server.count(), 2, "deny not cached");
    // Same subject on another connection: cached.
    let mut b = connect(&gw, &token("u1", &["*"])).await;
    b.subscribe("ok.a").await;
    assert_eq!(server.count(), 2);
    // Another subject, or the pattern of the same name: asked.
    let mut c = connect(&gw, &token("u2", &["*"])).await;
    c.subscribe("ok.a").await;
    assert_eq!(server.count(), 3);
    c.psubscribe("ok.a").await;
    assert_eq!(server.count(), 4);
    // Failures are not cached: a second try asks again.
    for expected in [5, 6] {
        let reply = subscribe(&mut c, "channel", "error.a").await;
        assert_eq!(reply["error"], "authorisation unavailable");
        assert_eq!(server.count(), expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_decisions_expire_after_the_ttl() {
    let server = AuthServer::start().await;
    let gw = gateway(&server, Duration::from_millis(300)).await;
    let mut client = connect(&gw, &token("u1", &["*"])).await;
    client.subscribe("ok.a").await;
    assert_eq!(server.count(), 1);
    // Resubscribe until the server is asked again: within the TTL the cache
    // answers; after it, the callback does.
    let start = std::time::Instant::now();
    loop {
        unsubscribe(&mut client, "channel", "ok.a").await;
        client.subscribe("ok.a").await;
        if server.count() == 2 {
            break;
        }
        assert!(start.elapsed() < WAIT, "the cache never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(start.elapsed() >= Duration::from_millis(250));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_ttl_asks_every_time() {
    let server = AuthServer::start().await;
    let gw = gateway(&server, Duration::ZERO).await;
    let mut client = connect(&gw, &token("u1", &["*"])).await;
    for n in 1..=3 {
        client.subscribe("ok.a").await;
        unsubscribe(&mut client, "channel", "ok.a").await;
        assert_eq!(server.count(), n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_callback_does_not_block_the_connection() {
    let server = AuthServer::start().await;
    let gw = Gateway::start(Config {
        jwt_key: Some(JwtKey::secret(SECRET).unwrap()),
        auth_url: Some(server.url()),
        auth_timeout: Duration::from_secs(30),
        ..test_config(None)
    })
    .await;
    let mut client = connect(&gw, &token("u1", &["*"])).await;
    client
        .send_json(json!({"action":"subscribe","channel":"slow.x","id":"s1"}))
        .await;
    // Answered while the callback is still out.
    let pong = client.request(json!({"action":"ping","id":"p"})).await;
    assert_eq!(pong, json!({"action":"pong","id":"p"}));
    client.subscribe("ok.b").await;
    // A second subscribe of the same name while the first is undecided.
    let again = subscribe(&mut client, "channel", "slow.x").await;
    assert_eq!(again["error"], "already subscribed");
    // Withdrawn before the decision: the subscribe is answered first.
    client
        .send_json(json!({"action":"unsubscribe","channel":"slow.x","id":"u1"}))
        .await;
    assert_eq!(
        client.recv().await,
        json!({"action":"subscribe","channel":"slow.x","id":"s1","status":false,"error":"cancelled by unsubscribe"})
    );
    assert_eq!(
        client.recv().await,
        json!({"action":"unsubscribe","channel":"slow.x","id":"u1","status":true})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_clients_are_asked_by_address() {
    let server = AuthServer::start().await;
    let gw = Gateway::start(Config {
        auth_url: Some(server.url()),
        auth_timeout: Duration::from_millis(500),
        trusted_proxies: vec![wsgate::forwarded::Network::parse("127.0.0.1").unwrap()],
        ..test_config(None)
    })
    .await;
    let addr = gw.addr;
    let from = |xff: &'static str| async move {
        Client::try_connect(addr, "/ws", &[("x-forwarded-for", xff)]).await
    };
    let mut one = from("198.51.100.7").await.unwrap();
    one.subscribe("ok.a").await;
    assert_eq!(
        server.last(),
        json!({"subject":null,"claims":null,"channel":"ok.a","remote_addr":"198.51.100.7"})
    );
    let mut same = from("198.51.100.7").await.unwrap();
    same.subscribe("ok.a").await;
    assert_eq!(server.count(), 1);
    let mut other = from("198.51.100.8").await.unwrap();
    other.subscribe("ok.a").await;
    assert_eq!(server.count(), 2);
    let reply = subscribe(&mut other, "channel", "deny.z").await;
    assert_eq!(reply["error"], "no access to deny.z");
}

/// A Bayeux subscribe goes to the callback with its `ext` (where Faye
/// applications put per-subscription tokens), and the callback's refusal
/// comes back as a Bayeux error with its reason.
#[tokio::test]
async fn a_bayeux_subscribe_takes_its_ext_to_the_callback() {
    let server = AuthServer::start().await;
    let gw = Gateway::start(Config {
        auth_url: Some(server.url()),
        auth_timeout: Duration::from_millis(500),
        ..test_config(None)
    })
    .await;
    let (_, body) = http(
        gw.addr,
        "POST",
        "/bayeux",
        Some(r#"[{"channel":"/meta/handshake","version":"1.0","supportedConnectionTypes":["long-polling"],"id":"1"}]"#),
    )
    .await;
    let reply: Value = serde_json::from_str(&body).unwrap();
    let cid = reply[0]["clientId"].as_str().unwrap().to_owned();
    let subscribe = |id: &str, sub: &str| {
        format!(
            r#"[{{"channel":"/meta/subscribe","clientId":"{cid}","subscription":"{sub}","id":"{id}","ext":{{"grant":"g-{id}"}}}}]"#
        )
    };
    let (status, body) = http(gw.addr, "POST", "/bayeux", Some(&subscribe("2", "/ok/x"))).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        format!(
            r#"[{{"channel":"/meta/subscribe","id":"2","successful":true,"clientId":"{cid}","subscription":"/ok/x"}}]"#
        )
    );
    let asked = server.last();
    assert_eq!(asked["channel"], "/ok/x", "{asked}");
    assert_eq!(asked["ext"], json!({"grant": "g-2"}), "{asked}");
    let (_, body) = http(gw.addr, "POST", "/bayeux", Some(&subscribe("3", "/deny/y"))).await;
    assert_eq!(
        body,
        format!(
            r#"[{{"channel":"/meta/subscribe","id":"3","successful":false,"clientId":"{cid}","subscription":"/deny/y","error":"403:/deny/y:no access to deny/y"}}]"#
        )
    );
    assert_eq!(server.last()["ext"], json!({"grant": "g-3"}));
    gw.stop().await;
}
