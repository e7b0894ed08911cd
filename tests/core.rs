//! Core correctness under refusal and load (issue 16) and the WebSocket close
//! handshake and oversize deliveries (issue 10, points 3 and 5): each test
//! reproduces a defect of the earlier code against a real redis-server and
//! the real gateway, and failed there.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

fn nz(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN)
}

/// Point 1: one topic refused by Redis used to take delivery down for the
/// whole node (connection reset, reconnect loop, `/readyz` 503, A told
/// `interrupted`, B refused only after the subscribe timeout). Now B is
/// refused at once with the reason, and A never notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_refused_by_redis_affects_only_its_subscribers() {
    let redis = Redis::start().await;
    // The gateway's Redis user may use channels `ok.*` only.
    let url = redis.restricted_url(&["ok.*"]).await;
    let mut config = test_config(Some(url));
    config.subscribe_timeout = Duration::from_secs(8);
    let gw = Gateway::start(config).await;
    let mut a = gw.client().await;
    a.subscribe("ok.a").await;
    let mut b = gw.client().await;

    let asked = Instant::now();
    let reply = b
        .request(json!({"action":"subscribe","channel":"secret","id":"s"}))
        .await;
    assert_eq!(
        reply,
        json!({"action":"subscribe","channel":"secret","id":"s","status":false,"error":"not permitted by Redis"})
    );
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "refused only after {:?}",
        asked.elapsed()
    );
    let reply = b
        .request(json!({"action":"subscribe","pattern":"ok.a*","id":"p"}))
        .await;
    assert_eq!(reply["error"], "not permitted by Redis", "{reply}");

    // Several at once from one client, some refused: exactly those are.
    for (i, ch) in ["ok.b", "secret2", "ok.c", "secret3"].iter().enumerate() {
        b.send_json(json!({"action":"subscribe","channel":ch,"id":i.to_string()}))
            .await;
    }
    let mut replies: Vec<Value> = Vec::new();
    for _ in 0..4 {
        replies.push(b.recv().await);
    }
    replies.sort_by_key(|v| v["id"].as_str().unwrap_or("").to_owned());
    let statuses: Vec<(String, bool)> = replies
        .iter()
        .map(|r| {
            (
                r["channel"].as_str().unwrap_or("").to_owned(),
                r["status"] == true,
            )
        })
        .collect();
    assert_eq!(
        statuses,
        [
            ("ok.b".to_owned(), true),
            ("secret2".to_owned(), false),
            ("ok.c".to_owned(), true),
            ("secret3".to_owned(), false)
        ]
    );

    // A's delivery was never interrupted, and carries on.
    for i in 0..20 {
        assert_eq!(redis.publish("ok.a", format!("{i}").as_bytes()).await, 1);
        assert_eq!(
            a.recv().await,
            json!({"action":"message","channel":"ok.a","payload":i})
        );
    }
    assert_eq!(redis.publish("ok.b", b"1").await, 1);
    assert_eq!(
        b.recv().await,
        json!({"action":"message","channel":"ok.b","payload":1})
    );
    assert_eq!(http(gw.addr, "GET", "/readyz", None).await.0, 200);
    assert_eq!(
        metric_value(gw.addr, "wsgate_broker_reconnects_total").await,
        Some(0.0)
    );
    assert_eq!(
        metric_value(gw.addr, "wsgate_broker_refusals_total").await,
        Some(4.0)
    );
    assert_eq!(
        metric_value(gw.addr, "wsgate_refused_total{reason=\"broker_refused\"}").await,
        Some(4.0)
    );
    assert_eq!(
        metric_value(gw.addr, "wsgate_gap_notices_total").await,
        Some(0.0)
    );
    let local = |kind: &str| format!("wsgate_local_subscriptions{{kind=\"{kind}\"}}");
    // Three of the clients, and the services router's own.
    assert_eq!(
        metric_value(gw.addr, &local("channel")).await,
        Some(3.0 + ROUTER_CHANNELS as f64)
    );
    assert_eq!(metric_value(gw.addr, &local("pattern")).await, Some(0.0));
    assert_eq!(
        metric_value(gw.addr, "wsgate_subscribes_held").await,
        Some(0.0)
    );
    // Redis holds exactly the permitted ones, on the one pub/sub connection.
    assert_eq!(redis.pubsub_clients().await, vec![(3, 0)]);
    gw.stop().await;
}

/// A client socket that accepts at most a few KiB before the server's writes
/// block: it connects with a small receive buffer and then does not read.
async fn stuck_client(addr: std::net::SocketAddr) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let stream = socket.connect(addr).await.expect("connect");
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream)
        .await
        .expect("handshake");
    ws
}

async fn recv_json(ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>) -> Value {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str(&t).expect("json"),
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Point 2: while a socket write was blocked, the session enforced nothing
/// (the write loop watched only overflow and stopping). Now a stuck client's
/// frames are still read (its unsubscribe takes effect) and keepalive closes
/// it on time, while a reading client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_write_keeps_the_session_live() {
    let mut config = test_config(None);
    config.ping_interval = Duration::from_millis(200);
    config.pong_timeout = Duration::from_millis(3000);
    config.client_queue_bytes = nz(64 << 20);
    config.max_delivery_bytes = nz(1 << 20);
    config.max_message_bytes = nz(1 << 20);
    let gw = Gateway::start(config).await;
    let mut stuck = stuck_client(gw.addr).await;
    stuck
        .send(Message::Text(
            r#"{"action":"subscribe","channel":"big"}"#.into(),
        ))
        .await
        .expect("send");
    assert_eq!(recv_json(&mut stuck).await["status"], true);
    let mut control = gw.client().await;
    control.subscribe("small").await;
    // The control client reads all the time (so it answers pings).
    let (seen, mut control_rx) = tokio::sync::mpsc::channel(16);
    let reader = tokio::spawn(async move {
        while let Some(Ok(m)) = control.ws.next().await {
            if let Message::Text(t) = m {
                if seen.send(t.to_string()).await.is_err() {
                    break;
                }
            }
        }
    });

    // Fill every buffer between the gateway and the stuck client.
    let big = "x".repeat(60_000);
    let series = "wsgate_local_subscriptions{kind=\"channel\"}";
    for _ in 0..200 {
        let (status, _) = gw.publish(json!({"channel":"big","payload":big})).await;
        assert_eq!(status, 200);
    }
    // The write is now blocked; the reader must still be live.
    stuck
        .send(Message::Text(
            r#"{"action":"unsubscribe","channel":"big"}"#.into(),
        ))
        .await
        .expect("send");
    let since = Instant::now();
    wait_until(
        "the stuck client's unsubscribe to be read",
        Duration::from_secs(2),
        || async {
            // The control client's channel, and the services router's.
            metric_value(gw.addr, series).await == Some(1.0 + ROUTER_CHANNELS as f64)
        },
    )
    .await;
    println!("unsubscribe read after {:?}", since.elapsed());
    assert_eq!(metric_value(gw.addr, "wsgate_connections").await, Some(2.0));
    // Keepalive: the stuck client answers no ping, so it is closed within
    // about the pong timeout, while the control client (which reads) stays.
    wait_until(
        "the stuck client to be closed",
        Duration::from_secs(5),
        || async { metric_value(gw.addr, "wsgate_connections").await == Some(1.0) },
    )
    .await;
    println!("stuck client closed after {:?}", since.elapsed());
    let (status, _) = gw.publish(json!({"channel":"small","payload":1})).await;
    assert_eq!(status, 200);
    let got = tokio::time::timeout(WAIT, control_rx.recv())
        .await
        .expect("in time");
    assert_eq!(
        got.as_deref(),
        Some(r#"{"action":"message","channel":"small","payload":1}"#)
    );
    assert_eq!(metric_value(gw.addr, "wsgate_connections").await, Some(1.0));
    reader.abort();
    drop(stuck);
    gw.stop().await;
}

/// Point 3: a message could arrive after the unsubscribe reply (the
/// dispatcher pushed from a snapshot taken before the leave). Now, after the
/// reply, no delivery of that topic reaches the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_delivery_after_the_unsubscribe_reply() {
    let redis = Redis::start().await;
    let mut config = test_config(Some(redis.url()));
    config.subscribe_rate = nz(1_000_000);
    let gw = Gateway::start(config).await;
    // Many other members make each fan-out long.
    let mut others = Vec::new();
    for _ in 0..600 {
        let mut c = gw.client().await;
        c.send_json(json!({"action":"subscribe","channel":"hot"}))
            .await;
        others.push(c);
    }
    for c in others.iter_mut() {
        assert_eq!(c.recv().await["status"], true);
    }
    // Drain the others so none of them is closed as slow.
    let stop = Arc::new(AtomicBool::new(false));
    let mut drains = Vec::new();
    for mut c in others {
        let stop = stop.clone();
        drains.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if tokio::time::timeout(Duration::from_millis(200), c.ws.next())
                    .await
                    .is_ok_and(|m| m.is_none())
                {
                    break;
                }
            }
        }));
    }
    let publisher = {
        let stop = stop.clone();
        let url = redis.url();
        tokio::spawn(async move {
            let client = redis::Client::open(url).expect("client");
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .expect("conn");
            let started = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
                let _: i64 = redis::cmd("PUBLISH")
                    .arg("hot")
                    .arg(n)
                    .query_async(&mut conn)
                    .await
                    .expect("publish");
                n += 1;
            }
            n
        })
    };
    let mut me = gw.client().await;
    me.subscribe("hot").await;
    let mut late = 0;
    let started = Instant::now();
    let mut cycles = 0;
    while cycles < 300 && started.elapsed() < Duration::from_secs(20) {
        me.send_json(json!({"action":"unsubscribe","channel":"hot"}))
            .await;
        loop {
            let v = me.recv().await;
            if v["action"] == "unsubscribe" {
                assert_eq!(v["status"], true);
                break;
            }
        }
        me.send_json(json!({"action":"subscribe","channel":"hot"}))
            .await;
        loop {
            let v = me.recv().await;
            if v["action"] == "subscribe" {
                assert_eq!(v["status"], true);
                break;
            }
            late += 1;
        }
        cycles += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let published = publisher.await.expect("publisher");
    for d in drains {
        let _ = d.await;
    }
    println!("{cycles} cycles, {published} messages published");
    assert!(cycles >= 100, "only {cycles} cycles ran");
    assert_eq!(
        late, 0,
        "deliveries between an unsubscribe reply and the next subscribe reply"
    );
    gw.stop().await;
}

/// Issue 10 point 3: a client's clean close used to end as 1006 (the session
/// never answered it). Now the close is echoed with the client's code, and
/// the connection then ends cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_close_is_answered_with_its_code() {
    let gw = Gateway::start(test_config(None)).await;
    let mut c = gw.client().await;
    c.subscribe("x").await;
    c.ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .expect("close");
    let got = tokio::time::timeout(WAIT, async {
        loop {
            match c.ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                other => panic!("no close reply: {other:?}"),
            }
        }
    })
    .await
    .expect("close reply in time");
    assert_eq!(got.map(|f| u16::from(f.code)), Some(1000));
    // Then the stream ends without an error: a clean close.
    let end = tokio::time::timeout(WAIT, c.ws.next())
        .await
        .expect("end in time");
    assert!(end.is_none(), "{end:?}");
    wait_until("the session to end", WAIT, || async {
        metric_value(gw.addr, "wsgate_connections").await == Some(0.0)
    })
    .await;
    gw.stop().await;
}

/// The same with a real client, node's `ws` (issue 10 names it): before,
/// it reported `1006 wasClean false` after `ws.close(1000, 'bye')`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ws_sees_a_clean_close() {
    let gw = Gateway::start(test_config(None)).await;
    let url = format!("ws://{}/ws", gw.addr);
    let (status, events) = common::node::run("ws_close.js", &[&url], &[], WAIT).await;
    assert!(status.success(), "{status}: {events:?}");
    let close = events
        .iter()
        .find(|e| e["event"] == "close")
        .unwrap_or_else(|| panic!("no close event: {events:?}"));
    assert_eq!(
        close,
        &json!({"event":"close","code":1000,"reason":"bye","wasClean":true})
    );
    gw.stop().await;
}

/// Opens a WebSocket by hand and returns the raw stream after the 101.
async fn raw_ws(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.expect("read");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// A client frame: FIN + `first` byte flags/opcode, masked unless told not to.
fn client_frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut f = vec![first];
    let mask = [1u8, 2, 3, 4];
    let m = if masked { 0x80 } else { 0 };
    if payload.len() < 126 {
        f.push(m | payload.len() as u8);
    } else {
        f.push(m | 126);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    if masked {
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

/// Reads server frames until a close frame; returns its code.
async fn read_close_code(s: &mut TcpStream) -> Option<u16> {
    let read = async {
        loop {
            let mut h = [0u8; 2];
            s.read_exact(&mut h).await.ok()?;
            let mut len = u64::from(h[1] & 0x7f);
            if len == 126 {
                let mut b = [0u8; 2];
                s.read_exact(&mut b).await.ok()?;
                len = u64::from(u16::from_be_bytes(b));
            } else if len == 127 {
                let mut b = [0u8; 8];
                s.read_exact(&mut b).await.ok()?;
                len = u64::from_be_bytes(b);
            }
            let mut body = vec![0u8; len as usize];
            s.read_exact(&mut body).await.ok()?;
            if h[0] & 0x0f == 0x8 {
                return body.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("close within WAIT")
}

/// Issue 10 point 3: protocol errors used to get a bare EOF. Now each gets a
/// close frame with the code RFC 6455 gives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_get_a_close_code() {
    let gw = Gateway::start(test_config(None)).await;
    let cases: [(&str, Vec<u8>, u16); 6] = [
        (
            "invalid UTF-8 text",
            client_frame(0x81, &[0xff, 0xfe], true),
            1007,
        ),
        (
            "unmasked client frame",
            client_frame(0x81, b"{}", false),
            1002,
        ),
        ("RSV bits", client_frame(0x81 | 0x40, b"{}", true), 1002),
        ("reserved opcode", client_frame(0x83, b"{}", true), 1002),
        ("oversize ping", client_frame(0x89, &[0u8; 200], true), 1002),
        ("stray continuation", client_frame(0x80, b"{}", true), 1002),
    ];
    for (what, frame, code) in cases {
        let mut s = raw_ws(gw.addr).await;
        s.write_all(&frame).await.expect("write");
        assert_eq!(read_close_code(&mut s).await, Some(code), "{what}");
    }
    gw.stop().await;
}

/// Issue 10 point 5: one large Redis message closed every matching subscriber
/// as a slow consumer. Now it is delivered to nobody, its subscribers are told
/// (`message too large`), and they stay connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_message_is_a_gap_not_a_slow_consumer() {
    let redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    let mut star = gw.client().await;
    star.psubscribe("*").await;
    let mut exact = gw.client().await;
    exact.subscribe("big").await;
    let huge = vec![b'x'; 2_000_000];
    assert_eq!(redis.publish("big", &huge).await, 2);
    star.expect_notice("interrupted", Some("message too large"), &["*"], &[])
        .await;
    star.expect_notice("resumed", None, &["*"], &[]).await;
    exact
        .expect_notice("interrupted", Some("message too large"), &[], &["big"])
        .await;
    exact.expect_notice("resumed", None, &[], &["big"]).await;
    assert_eq!(redis.publish("big", b"1").await, 2);
    assert_eq!(
        star.recv().await,
        json!({"action":"message","pattern":"*","channel":"big","payload":1})
    );
    assert_eq!(
        exact.recv().await,
        json!({"action":"message","channel":"big","payload":1})
    );
    assert_eq!(
        metric_value(gw.addr, "wsgate_slow_consumer_closes_total").await,
        Some(0.0)
    );
    // One PUBLISH, two Redis deliveries to this node (the channel and `*`).
    assert_eq!(
        metric_value(gw.addr, "wsgate_deliveries_too_large_total").await,
        Some(2.0)
    );
    gw.stop().await;
}

/// The pub/sub connection names itself, so an operator finds it in
/// `CLIENT LIST`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pubsub_connection_is_named() {
    let redis = Redis::start().await;
    let gw = Gateway::start(test_config(Some(redis.url()))).await;
    // Redis lists a connection as `pubsub` once it holds a subscription.
    let mut c = gw.client().await;
    c.subscribe("x").await;
    let list = match redis.cmd(&["CLIENT", "LIST", "TYPE", "pubsub"]).await {
        redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
        redis::Value::VerbatimString { text, .. } => text,
        other => format!("{other:?}"),
    };
    assert!(list.contains("name=wsgate:"), "{list}");
    assert!(list.contains(":pubsub "), "{list}");
    assert!(
        !list.contains("name=wsgate:pubsub"),
        "named after the node: {list}"
    );
    gw.stop().await;
}

/// Point 1, second half: the reconnect pause used to be reset after every
/// successful connect, so a connection that dies straight after connecting
/// was retried every 25-50 ms forever. Through a proxy that drops every
/// connection 150 ms after it opens, the gateway now backs off: over 4 s its
/// pub/sub connection connects about seven times (the backoff doubles
/// towards its 1 s cap), not twenty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_dies_at_once_does_not_reset_the_backoff() {
    use std::sync::atomic::AtomicUsize;
    let redis = Redis::start().await;
    let upstream: std::net::SocketAddr = format!("127.0.0.1:{}", redis.port).parse().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let first = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let (count, at) = (accepted.clone(), first.clone());
    let task = tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let (count, at) = (count.clone(), at.clone());
            tokio::spawn(async move {
                let Ok(mut server) = TcpStream::connect(upstream).await else {
                    return;
                };
                // Count the pub/sub connections only (it names itself first
                // thing; the publish and NUMPAT connections go through too).
                let mut head = vec![0u8; 4096];
                let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_secs(2), client.read(&mut head)).await
                else {
                    return;
                };
                if head[..n].windows(7).any(|w| w == b":pubsub") {
                    count.fetch_add(1, Ordering::SeqCst);
                    at.lock().unwrap().get_or_insert_with(Instant::now);
                }
                if server.write_all(&head[..n]).await.is_err() {
                    return;
                }
                let _ = tokio::time::timeout(
                    Duration::from_millis(150),
                    tokio::io::copy_bidirectional(&mut client, &mut server),
                )
                .await;
            });
        }
    });
    let mut config = test_config(Some(format!("redis://{proxy}")));
    config.redis_backoff_max = Duration::from_secs(1);
    let listener = wsgate::server::bind(config.listen).expect("bind");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let gw = tokio::spawn(async move {
        let _ = wsgate::server::run(listener, config, async {
            let _ = stopped.await;
            wsgate::shutdown::Stop::Immediate
        })
        .await;
    });
    wait_until("a first connection", WAIT, || async {
        accepted.load(Ordering::SeqCst) > 0
    })
    .await;
    let since = first.lock().unwrap().unwrap_or_else(Instant::now);
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(since.elapsed())).await;
    let n = accepted.load(Ordering::SeqCst);
    println!("{n} connections in 4 s");
    assert!(n >= 3, "it must keep trying: {n}");
    assert!(n <= 10, "{n} connections in 4 s: the backoff was reset");
    let _ = stop.send(());
    let _ = tokio::time::timeout(WAIT, gw).await;
    task.abort();
}
