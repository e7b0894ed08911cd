//! permessage-deflate (RFC 7692, `WSGATE_COMPRESSION`) end to end, on a real
//! `redis-server`, with the direct write path on and off:
//!
//! - npm `ws` (a real client that offers the extension and compresses all it
//!   sends) subscribes and publishes with compressed messages and receives
//!   deliveries of a 2.5 KiB JSON payload byte for byte;
//! - a raw-socket client here checks the wire: the 101's extension answer,
//!   RSV1 on large deliveries (inflated here), none on short ones, and none
//!   at all for a client that did not offer it;
//! - a compression bomb is closed with 1009 while other clients go on.
//!
//! Waits are on signals (replies, `PUBSUB NUMSUB`), each bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;

use common::node::Script;
use common::{test_config, Client, Gateway, Redis, WAIT};
use flate2::{Decompress, FlushDecompress};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wsgate::Config;

/// What we answer to every acceptable offer.
const AGREED: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

fn config(redis: &Redis, direct: bool, compression: bool) -> Config {
    Config {
        direct_writes: direct,
        compression,
        client_publish: vec!["*".into()],
        ..test_config(Some(redis.url()))
    }
}

/// A JSON payload of about 2.5 KiB, as publishers send them.
fn payload() -> String {
    let items: Vec<String> = (0..40)
        .map(|i| {
            format!(
                r#"{{"id":{i},"name":"item number {i}","price":{}.5,"tags":["a","b"]}}"#,
                i * 3
            )
        })
        .collect();
    format!(r#"{{"kind":"prices","items":[{}]}}"#, items.join(","))
}

fn delivery(channel: &str, payload: &str) -> String {
    format!(r#"{{"action":"message","channel":"{channel}","payload":{payload}}}"#)
}

/// A WebSocket client on a bare socket, to see the frames' bits.
struct Raw {
    tcp: TcpStream,
    /// The 101's `Sec-WebSocket-Extensions`, if any.
    extensions: Option<String>,
}

impl Raw {
    async fn connect(addr: SocketAddr, offer: Option<&str>) -> Raw {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let ext = offer
            .map(|o| format!("Sec-WebSocket-Extensions: {o}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n"
        );
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            tokio::time::timeout(WAIT, tcp.read_exact(&mut b))
                .await
                .expect("101 in time")
                .unwrap();
            head.push(b[0]);
        }
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let extensions = head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-extensions")
                .then(|| value.trim().to_owned())
        });
        Raw { tcp, extensions }
    }

    /// Sends one masked frame.
    async fn send(&mut self, first: u8, payload: &[u8]) {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut v = vec![first];
        match payload.len() {
            n if n < 126 => v.push(0x80 | n as u8),
            n if n < 65536 => {
                v.push(0x80 | 126);
                v.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                v.push(0x80 | 127);
                v.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        v.extend_from_slice(&mask);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.tcp.write_all(&v).await.unwrap();
    }

    async fn send_text(&mut self, text: &str) {
        self.send(0x81, text.as_bytes()).await;
    }

    /// The next frame that is not a ping: its first byte and payload.
    async fn frame(&mut self) -> (u8, Vec<u8>) {
        loop {
            let mut h = [0u8; 2];
            tokio::time::timeout(WAIT, self.tcp.read_exact(&mut h))
                .await
                .expect("a frame in time")
                .unwrap();
            assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
            let len = match h[1] & 0x7f {
                126 => {
                    let mut b = [0u8; 2];
                    self.tcp.read_exact(&mut b).await.unwrap();
                    u16::from_be_bytes(b) as usize
                }
                127 => {
                    let mut b = [0u8; 8];
                    self.tcp.read_exact(&mut b).await.unwrap();
                    u64::from_be_bytes(b) as usize
                }
                n => n as usize,
            };
            let mut payload = vec![0u8; len];
            tokio::time::timeout(WAIT, self.tcp.read_exact(&mut payload))
                .await
                .expect("payload in time")
                .unwrap();
            if h[0] != 0x89 {
                return (h[0], payload);
            }
        }
    }

    /// The next text message: whether it had RSV1, and its text (inflated).
    async fn text(&mut self) -> (bool, String) {
        let (first, payload) = self.frame().await;
        assert_eq!(first & 0xbf, 0x81, "a whole text frame: {first:#x}");
        let rsv1 = first & 0x40 != 0;
        let bytes = if rsv1 { inflate(&payload) } else { payload };
        (rsv1, String::from_utf8(bytes).unwrap())
    }
}

/// Raw DEFLATE with the tail put back (RFC 7692 section 7.2.2).
fn inflate(data: &[u8]) -> Vec<u8> {
    let mut z = Decompress::new(false);
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(1 << 20);
    z.decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .unwrap();
    assert_eq!(z.total_in() as usize, input.len());
    out
}

/// Raw DEFLATE of `data`, tail removed, as a client sends it.
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut z = flate2::Compress::new(flate2::Compression::best(), false);
    let mut out = Vec::with_capacity(data.len() + 1024);
    z.compress_vec(data, &mut out, flate2::FlushCompress::Sync)
        .unwrap();
    assert_eq!(z.total_in() as usize, data.len());
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

async fn ws_client_round_trip(direct: bool) {
    let redis = Redis::start().await;
    let gw = Gateway::start(config(&redis, direct, true)).await;
    let url = format!("ws://{}/ws", gw.addr);
    let mut s = Script::spawn("deflate_ws.js", &["--url", &url]);
    let open = s.expect("open").await;
    assert_eq!(open["extensions"], AGREED);
    // ws compresses everything it sends (threshold 0): this subscribe too.
    s.send(json!({"cmd":"send","text":r#"{"action":"subscribe","channel":"prices"}"#}))
        .await;
    let reply = s.expect("message").await;
    assert_eq!(
        reply["text"],
        r#"{"action":"subscribe","channel":"prices","status":true}"#
    );
    // A plain client beside it, on the same channel.
    let mut plain = gw.client().await;
    plain.subscribe("prices").await;
    let p = payload();
    assert!(p.len() >= 2048, "{}", p.len());
    for i in 0..3 {
        let text = p.replace("prices", &format!("prices{i}"));
        redis.publish("prices", text.as_bytes()).await;
        let got = s.expect("message").await;
        assert_eq!(got["text"], delivery("prices", &text), "delivery {i}");
        assert_eq!(plain.recv_text().await, delivery("prices", &text));
    }
    // A compressed publish of a large payload reaches both.
    let frame = format!(r#"{{"action":"publish","channel":"prices","payload":{p},"id":"p1"}}"#);
    s.send(json!({"cmd":"send","text":frame})).await;
    let mut texts = vec![
        s.expect("message").await["text"]
            .as_str()
            .unwrap()
            .to_owned(),
        s.expect("message").await["text"]
            .as_str()
            .unwrap()
            .to_owned(),
    ];
    texts.sort();
    let mut want = vec![
        delivery("prices", &p),
        r#"{"action":"publish","channel":"prices","id":"p1","status":true}"#.to_owned(),
    ];
    want.sort();
    assert_eq!(texts, want);
    assert_eq!(plain.recv_text().await, delivery("prices", &p));
    s.send(json!({"cmd":"close"})).await;
    assert_eq!(s.expect("close").await["code"], 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_with_deflate_subscribes_publishes_and_receives_byte_for_byte_direct() {
    ws_client_round_trip(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_with_deflate_subscribes_publishes_and_receives_byte_for_byte_queued() {
    ws_client_round_trip(false).await;
}

async fn wire(direct: bool) {
    let redis = Redis::start().await;
    let gw = Gateway::start(config(&redis, direct, true)).await;
    let mut deflating =
        Raw::connect(gw.addr, Some("permessage-deflate; client_max_window_bits")).await;
    assert_eq!(deflating.extensions.as_deref(), Some(AGREED));
    let mut plain = Raw::connect(gw.addr, None).await;
    assert_eq!(plain.extensions, None);
    // An offer we cannot accept, then one we can: the second is answered.
    let mut second = Raw::connect(
        gw.addr,
        Some("permessage-deflate; foo, permessage-deflate; server_max_window_bits=12"),
    )
    .await;
    assert_eq!(
        second.extensions.as_deref(),
        Some(format!("{AGREED}; server_max_window_bits=12").as_str())
    );
    let subscribe = r#"{"action":"subscribe","channel":"w"}"#;
    let subscribed = r#"{"action":"subscribe","channel":"w","status":true}"#;
    for c in [&mut deflating, &mut plain, &mut second] {
        c.send_text(subscribe).await;
        assert_eq!(
            c.text().await,
            (false, subscribed.to_owned()),
            "replies are not compressed"
        );
    }
    let p = payload();
    redis.publish("w", p.as_bytes()).await;
    let want = delivery("w", &p);
    assert_eq!(deflating.text().await, (true, want.clone()));
    assert_eq!(
        second.text().await,
        (true, want.clone()),
        "2.5 KiB fits a 4 KiB window"
    );
    assert_eq!(plain.text().await, (false, want.clone()));
    // Short deliveries go uncompressed; longer than the agreed window, too.
    redis.publish("w", b"\"short\"").await;
    for c in [&mut deflating, &mut plain, &mut second] {
        assert_eq!(c.text().await, (false, delivery("w", "\"short\"")));
    }
    let long = format!("[{}]", [p.as_str(); 3].join(","));
    redis.publish("w", long.as_bytes()).await;
    assert_eq!(deflating.text().await, (true, delivery("w", &long)));
    assert_eq!(
        second.text().await,
        (false, delivery("w", &long)),
        "past 4 KiB"
    );
    assert_eq!(plain.text().await, (false, delivery("w", &long)));
    // A client's compressed message, fragmented, with a ping in between.
    let ping = deflate(br#"{"action":"ping","id":"z"}"#);
    let (a, b) = ping.split_at(ping.len() / 2);
    deflating.send(0x41, a).await;
    deflating.send(0x89, b"hey").await;
    deflating.send(0x80, b).await;
    let (first, pong) = deflating.frame().await;
    assert_eq!((first, pong.as_slice()), (0x8a, b"hey".as_slice()));
    let (_, answer) = deflating.text().await;
    assert!(answer.contains(r#""id":"z""#), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsv1_only_for_sockets_that_agreed_and_only_on_large_messages_direct() {
    wire(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsv1_only_for_sockets_that_agreed_and_only_on_large_messages_queued() {
    wire(false).await;
}

async fn bomb(direct: bool) {
    let redis = Redis::start().await;
    let gw = Gateway::start(config(&redis, direct, true)).await;
    let mut other = gw.client().await;
    other.subscribe("b").await;
    let mut attacker = Raw::connect(gw.addr, Some("permessage-deflate")).await;
    assert_eq!(attacker.extensions.as_deref(), Some(AGREED));
    // 16 MiB of spaces in a JSON string: some 16 KiB compressed (under the
    // 64 KiB limit), 256 times the limit once inflated.
    let mut text = b"\"".to_vec();
    text.resize(16 << 20, b' ');
    text.push(b'"');
    let compressed = deflate(&text);
    assert!(compressed.len() < 32 * 1024, "{}", compressed.len());
    attacker.send(0xc1, &compressed).await;
    let (first, close) = attacker.frame().await;
    assert_eq!(first, 0x88, "a close frame");
    assert_eq!(u16::from_be_bytes([close[0], close[1]]), 1009);
    redis.publish("b", b"1").await;
    assert_eq!(other.recv_text().await, delivery("b", "1"));
    let mut fresh = Client::connect(gw.addr, "/ws").await;
    fresh.subscribe("c").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compression_bomb_is_closed_with_1009_direct() {
    bomb(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compression_bomb_is_closed_with_1009_queued() {
    bomb(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_compression_off_offers_are_ignored() {
    let redis = Redis::start().await;
    let gw = Gateway::start(config(&redis, true, false)).await;
    let mut c = Raw::connect(gw.addr, Some("permessage-deflate")).await;
    assert_eq!(c.extensions, None);
    c.send_text(r#"{"action":"subscribe","channel":"o"}"#).await;
    c.text().await;
    let p = payload();
    redis.publish("o", p.as_bytes()).await;
    assert_eq!(c.text().await, (false, delivery("o", &p)));
    // ws without an agreement sends plainly, and is answered plainly.
    let url = format!("ws://{}/ws", gw.addr);
    let mut s = Script::spawn("deflate_ws.js", &["--url", &url]);
    assert_eq!(
        s.expect("open").await["extensions"],
        serde_json::Value::Null
    );
    s.send(json!({"cmd":"send","text":r#"{"action":"subscribe","channel":"o"}"#}))
        .await;
    assert_eq!(
        s.expect("message").await["text"],
        r#"{"action":"subscribe","channel":"o","status":true}"#
    );
}
