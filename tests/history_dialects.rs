//! History in the dialects other than the native protocol
//! (`docs/dialects/bayeux.md` and `docs/dialects/sse.md`, History): Bayeux
//! deliveries of history channels carry `ext.wsgate.{offset,epoch}` and a
//! `/meta/subscribe` with `ext.wsgate.since` resumes (raw WebSocket byte for
//! byte, and the real npm `faye` client); SSE deliveries carry
//! `id: <epoch>:<offset>:<channel>` and a stream opened with `Last-Event-ID`
//! resumes (raw byte for byte, and npm `eventsource` reconnecting by itself
//! to a restarted node). Real redis-server and the embedded broker; every
//! wait is bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::node::Script;
use common::sse::SseStream;
use common::*;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use wsgate::history::Rules;
use wsgate::Config;

const RULES: &str = "/news/*:100:300s,news.*:100:300s";

fn config(redis: Option<&Redis>) -> Config {
    Config {
        history: Rules::parse(RULES).unwrap(),
        ..test_config(redis.map(Redis::url))
    }
}

/// Publishes `{"n":from}`..`{"n":to}` through `POST /publish` in one batch.
async fn publish_range(gw: &Gateway, channel: &str, from: u64, to: u64) {
    let messages: Vec<Value> = (from..=to)
        .map(|n| json!({"channel":channel,"payload":{"n":n}}))
        .collect();
    let (status, body) = gw.publish(json!({ "messages": messages })).await;
    assert_eq!(status, 200, "{body}");
}

/// The channel's epoch, from `GET /history` (which creates the history).
async fn epoch_of(addr: std::net::SocketAddr, channel: &str) -> String {
    let path = format!("/history?channel={}", channel.replace('/', "%2F"));
    let (status, body) = http(addr, "GET", &path, None).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["epoch"].as_str().unwrap().to_owned()
}

// ------------------------------------------------------------ Bayeux

fn bayeux_delivery(channel: &str, n: u64, offset: u64, epoch: &str) -> String {
    format!(
        r#"{{"channel":"{channel}","data":{{"n":{n}}},"ext":{{"wsgate":{{"offset":{offset},"epoch":"{epoch}"}}}}}}"#
    )
}

/// A Bayeux client over a raw WebSocket: handshake and first connect.
async fn bayeux_client(gw: &Gateway) -> (Client, String) {
    let mut c = Client::connect(gw.addr, "/bayeux").await;
    c.send_text(r#"[{"channel":"/meta/handshake","version":"1.0","supportedConnectionTypes":["websocket"],"id":"1"}]"#).await;
    let v: Value = serde_json::from_str(&c.recv_text().await).unwrap();
    let cid = v[0]["clientId"].as_str().unwrap().to_owned();
    c.send_text(&format!(
        r#"[{{"channel":"/meta/connect","clientId":"{cid}","connectionType":"websocket","id":"2"}}]"#
    ))
    .await;
    let v: Value = serde_json::from_str(&c.recv_text().await).unwrap();
    assert_eq!(v[0]["successful"], true, "{v}");
    (c, cid)
}

/// The next `n` Bayeux messages, each as the exact JSON text it had on the
/// wire, whatever frames they were batched in.
async fn bayeux_messages(c: &mut Client, n: usize, into: &mut Vec<String>) {
    while into.len() < n {
        let frame = c.recv_text().await;
        let batch: Vec<Box<RawValue>> = serde_json::from_str(&frame).unwrap();
        into.extend(batch.into_iter().map(|m| m.get().to_owned()));
    }
}

async fn subscribe_with_ext(c: &mut Client, cid: &str, id: &str, sub: &str, ext: &str) -> String {
    c.send_text(&format!(
        r#"[{{"channel":"/meta/subscribe","clientId":"{cid}","subscription":"{sub}","id":"{id}","ext":{ext}}}]"#
    ))
    .await;
    let mut got = Vec::new();
    bayeux_messages(c, 1, &mut got).await;
    got.remove(0)
}

async fn bayeux_raw(redis: Option<&Redis>) {
    let gw = Gateway::start(config(redis)).await;
    let (mut a, cid) = bayeux_client(&gw).await;
    let reply = subscribe_with_ext(&mut a, &cid, "3", "/news/a", "{}").await;
    assert_eq!(
        reply,
        format!(
            r#"{{"channel":"/meta/subscribe","id":"3","successful":true,"clientId":"{cid}","subscription":"/news/a"}}"#
        )
    );
    publish_range(&gw, "/news/a", 1, 4).await;
    let mut got = Vec::new();
    bayeux_messages(&mut a, 4, &mut got).await;
    let v: Value = serde_json::from_str(&got[0]).unwrap();
    let epoch = v["ext"]["wsgate"]["epoch"].as_str().unwrap().to_owned();
    let want: Vec<String> = (1..=4)
        .map(|n| bayeux_delivery("/news/a", n, n, &epoch))
        .collect();
    assert_eq!(got, want);

    // A second client resumes after offset 2: the reply says recovered,
    // then 3 and 4, then live 5, each once.
    let (mut b, bid) = bayeux_client(&gw).await;
    let ext = format!(r#"{{"wsgate":{{"since":{{"offset":2,"epoch":"{epoch}"}}}}}}"#);
    let mut got = vec![subscribe_with_ext(&mut b, &bid, "3", "/news/a", &ext).await];
    bayeux_messages(&mut b, 3, &mut got).await;
    publish_range(&gw, "/news/a", 5, 5).await;
    bayeux_messages(&mut b, 4, &mut got).await;
    assert_eq!(
        got,
        vec![
            format!(
                r#"{{"channel":"/meta/subscribe","id":"3","successful":true,"clientId":"{bid}","subscription":"/news/a","ext":{{"wsgate":{{"recovered":true}}}}}}"#
            ),
            bayeux_delivery("/news/a", 3, 3, &epoch),
            bayeux_delivery("/news/a", 4, 4, &epoch),
            bayeux_delivery("/news/a", 5, 5, &epoch),
        ]
    );

    // A wildcard resumes with the map form.
    let (mut w, wid) = bayeux_client(&gw).await;
    let ext = format!(r#"{{"wsgate":{{"since":{{"/news/a":{{"offset":4,"epoch":"{epoch}"}}}}}}}}"#);
    let mut got = vec![subscribe_with_ext(&mut w, &wid, "3", "/news/*", &ext).await];
    bayeux_messages(&mut w, 2, &mut got).await;
    assert_eq!(
        got,
        vec![
            format!(
                r#"{{"channel":"/meta/subscribe","id":"3","successful":true,"clientId":"{wid}","subscription":"/news/*","ext":{{"wsgate":{{"recovered":true}}}}}}"#
            ),
            bayeux_delivery("/news/a", 5, 5, &epoch),
        ]
    );

    // A stale epoch: recovered false, nothing replayed, live follows.
    let (mut s, sid) = bayeux_client(&gw).await;
    let ext = r#"{"wsgate":{"since":{"offset":2,"epoch":"stale1"}}}"#;
    let reply = subscribe_with_ext(&mut s, &sid, "3", "/news/a", ext).await;
    assert_eq!(
        reply,
        format!(
            r#"{{"channel":"/meta/subscribe","id":"3","successful":true,"clientId":"{sid}","subscription":"/news/a","ext":{{"wsgate":{{"recovered":false}}}}}}"#
        )
    );
    publish_range(&gw, "/news/a", 6, 6).await;
    let mut got = Vec::new();
    bayeux_messages(&mut s, 1, &mut got).await;
    assert_eq!(got, vec![bayeux_delivery("/news/a", 6, 6, &epoch)]);

    // A channel without history: recovered false; a bad since: 400.
    let reply = subscribe_with_ext(&mut s, &sid, "4", "/plain/x", ext).await;
    assert!(
        reply.ends_with(r#""ext":{"wsgate":{"recovered":false}}}"#),
        "{reply}"
    );
    for bad in [
        r#"{"wsgate":{"since":{"offset":-1,"epoch":"e"}}}"#,
        r#"{"wsgate":7}"#,
    ] {
        let reply = subscribe_with_ext(&mut s, &sid, "5", "/news/b", bad).await;
        assert_eq!(
            reply,
            format!(
                r#"{{"channel":"/meta/subscribe","id":"5","successful":false,"clientId":"{sid}","subscription":"/news/b","error":"400:bad ext.wsgate.since:Bad request"}}"#
            )
        );
    }
    // One position cannot serve a wildcard.
    let reply = subscribe_with_ext(&mut s, &sid, "6", "/news/*", ext).await;
    assert!(reply.contains("400:bad ext.wsgate.since"), "{reply}");
    gw.stop().await;
}

#[tokio::test]
async fn bayeux_raw_offsets_and_resume_on_redis() {
    let redis = Redis::start().await;
    bayeux_raw(Some(&redis)).await;
}

#[tokio::test]
async fn bayeux_raw_offsets_and_resume_embedded() {
    bayeux_raw(None).await;
}

/// The npm faye client: an extension puts `ext.wsgate.since` on its
/// subscribe; the reply's ext says recovered; the missed messages reach the
/// subscriber in order, each with its offset in `ext`, then live ones.
async fn faye_resumes(transport: &str) {
    let redis = Redis::start().await;
    let gw = Gateway::start(config(Some(&redis))).await;
    let channel = "/news/faye";
    let epoch = epoch_of(gw.addr, channel).await;
    publish_range(&gw, channel, 1, 30).await;
    let url = format!("http://{}/bayeux", gw.addr);
    let since = format!(r#"{{"offset":10,"epoch":"{epoch}"}}"#);
    let mut faye = Script::spawn(
        "faye_client.js",
        &[
            "--url",
            &url,
            "--transport",
            transport,
            "--max-ms",
            "40000",
            "--subscribe",
            channel,
            "--since",
            &since,
        ],
    );
    let reply = faye
        .expect_where("subscribe reply", |e| {
            e["event"] == "meta" && e["message"]["channel"] == "/meta/subscribe"
        })
        .await;
    assert_eq!(reply["message"]["successful"], true, "{reply}");
    assert_eq!(
        reply["message"]["ext"],
        json!({"wsgate":{"recovered":true}})
    );
    let mut seen = Vec::new();
    while seen.len() < 21 {
        if seen.len() == 20 {
            publish_range(&gw, channel, 31, 31).await;
        }
        let e = faye.expect("delivery").await;
        assert_eq!(e["channel"], channel);
        let n = e["data"]["n"].as_u64().unwrap();
        assert_eq!(
            e["message"]["ext"],
            json!({"wsgate":{"offset":n,"epoch":epoch}}),
            "{e}"
        );
        seen.push(n);
    }
    assert_eq!(seen, (11..=31).collect::<Vec<_>>());
    faye.expect_where("31 handed to the subscriber", |e| {
        e["event"] == "message" && e["data"]["n"] == 31
    })
    .await;
    let handed: Vec<u64> = faye
        .history()
        .iter()
        .filter(|e| e["event"] == "message")
        .map(|e| e["data"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(
        handed,
        (11..=31).collect::<Vec<_>>(),
        "the subscriber's callback"
    );
    faye.close_stdin();
    let (status, _) = faye.finish(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
    gw.stop().await;
}

#[tokio::test]
async fn faye_websocket_resumes_with_ext_since() {
    faye_resumes("websocket").await;
}

#[tokio::test]
async fn faye_long_polling_resumes_with_ext_since() {
    faye_resumes("long-polling").await;
}

// ------------------------------------------------------------ SSE

fn sse_delivery(channel: &str, n: u64, offset: u64, epoch: &str) -> String {
    format!(
        "id: {epoch}:{offset}:{channel}\ndata: {{\"action\":\"message\",\"channel\":\"{channel}\",\"payload\":{{\"n\":{n}}},\"offset\":{offset},\"epoch\":\"{epoch}\"}}\n\n"
    )
}

fn sse_subscribed(channel: &str, recovered: Option<bool>) -> String {
    let r = recovered.map_or(String::new(), |r| format!(",\"recovered\":{r}"));
    format!(
        "event: subscribe\ndata: {{\"action\":\"subscribe\",\"channel\":\"{channel}\",\"status\":true{r}}}\n\n"
    )
}

async fn sse_raw(redis: Option<&Redis>) {
    let gw = Gateway::start(config(redis)).await;
    let epoch = epoch_of(gw.addr, "news.s").await;
    let mut live = SseStream::open(gw.addr, "/sse?channel=news.s", &[]).await;
    live.next_event().await.unwrap(); // retry:
    assert_eq!(
        live.next_event().await.unwrap(),
        sse_subscribed("news.s", None)
    );
    publish_range(&gw, "news.s", 1, 3).await;
    for n in 1..=3 {
        assert_eq!(
            live.next_event().await.unwrap(),
            sse_delivery("news.s", n, n, &epoch)
        );
    }
    // Reconnect after offset 1: recovered, 2 and 3, then live 4.
    let id = format!("{epoch}:1:news.s");
    let mut back = SseStream::open(
        gw.addr,
        "/sse?channel=news.s&pattern=other.*",
        &[("Last-Event-ID", &id)],
    )
    .await;
    assert_eq!(back.status, 200);
    back.next_event().await.unwrap();
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(back.next_event().await.unwrap());
    }
    got.sort_by_key(|e| {
        !e.starts_with("event: subscribe\ndata: {\"action\":\"subscribe\",\"pattern\"")
    });
    assert_eq!(
        got,
        vec![
            "event: subscribe\ndata: {\"action\":\"subscribe\",\"pattern\":\"other.*\",\"status\":true}\n\n".to_owned(),
            sse_subscribed("news.s", Some(true)),
            sse_delivery("news.s", 2, 2, &epoch),
            sse_delivery("news.s", 3, 3, &epoch),
        ]
    );
    publish_range(&gw, "news.s", 4, 4).await;
    assert_eq!(
        back.next_event().await.unwrap(),
        sse_delivery("news.s", 4, 4, &epoch)
    );
    // Through a pattern.
    let id = format!("{epoch}:3:news.s");
    let mut pat = SseStream::open(gw.addr, "/sse?pattern=news.*", &[("Last-Event-ID", &id)]).await;
    pat.next_event().await.unwrap();
    assert_eq!(
        pat.next_event().await.unwrap(),
        "event: subscribe\ndata: {\"action\":\"subscribe\",\"pattern\":\"news.*\",\"status\":true,\"recovered\":true}\n\n"
    );
    let e = pat.next_event().await.unwrap();
    assert_eq!(e, format!("id: {epoch}:4:news.s\ndata: {{\"action\":\"message\",\"pattern\":\"news.*\",\"channel\":\"news.s\",\"payload\":{{\"n\":4}},\"offset\":4,\"epoch\":\"{epoch}\"}}\n\n"));
    // A stale epoch says not recovered; an id that is not ours, or names
    // another channel, resumes nothing.
    for (id, recovered) in [
        ("stale9:1:news.s", Some(false)),
        ("garbage", None),
        (&format!("{epoch}:1:news.zz")[..], None),
    ] {
        let mut s = SseStream::open(gw.addr, "/sse?channel=news.s", &[("Last-Event-ID", id)]).await;
        s.next_event().await.unwrap();
        assert_eq!(
            s.next_event().await.unwrap(),
            sse_subscribed("news.s", recovered),
            "{id}"
        );
    }
    gw.stop().await;
}

#[tokio::test]
async fn sse_raw_ids_and_last_event_id_on_redis() {
    let redis = Redis::start().await;
    sse_raw(Some(&redis)).await;
}

#[tokio::test]
async fn sse_raw_ids_and_last_event_id_embedded() {
    sse_raw(None).await;
}

/// npm `eventsource`: the node restarts, 20 messages are published through
/// `FCALL wsgate_publish` meanwhile, EventSource reconnects by itself with
/// `Last-Event-ID` and gets exactly those, then live ones.
#[tokio::test]
async fn eventsource_reconnects_with_last_event_id_across_a_node_restart() {
    let redis = Redis::start().await;
    let env = [
        ("WSGATE_REDIS_URL", redis.url()),
        ("WSGATE_HISTORY", RULES.to_owned()),
        ("WSGATE_DRAIN_WINDOW_MS", "100".to_owned()),
        ("WSGATE_SHUTDOWN_TIMEOUT_MS", "2000".to_owned()),
    ];
    let mut node = GatewayProcess::spawn(&env).await;
    let addr = node.addr;
    let url = format!("http://{addr}/sse?channel=news.es");
    let mut es = Script::spawn("sse_client.js", &["--url", &url]);
    assert_eq!(es.expect("open").await["opens"], 1);
    es.expect("named").await;
    let fcall = |n: u64| {
        let redis = &redis;
        async move {
            redis
                .cmd(&[
                    "FCALL",
                    "wsgate_publish",
                    "1",
                    "news.es",
                    &format!("{{\"n\":{n}}}"),
                ])
                .await
        }
    };
    for n in 1..=3 {
        fcall(n).await;
    }
    let mut ids = Vec::new();
    for n in 1..=3u64 {
        let e = es.expect("message").await;
        let d: Value = serde_json::from_str(e["data"].as_str().unwrap()).unwrap();
        assert_eq!(d["payload"]["n"], n);
        ids.push(e["id"].as_str().unwrap().to_owned());
    }
    let epoch = ids[0].split(':').next().unwrap().to_owned();
    assert_eq!(
        ids,
        (1..=3)
            .map(|n| format!("{epoch}:{n}:news.es"))
            .collect::<Vec<_>>()
    );
    let status = node.terminate().await;
    assert!(status.success(), "{status:?}");
    for n in 4..=23 {
        fcall(n).await;
    }
    let _again = GatewayProcess::spawn_at(addr, &env).await;
    let opened = es
        .expect_where("second open", |e| e["event"] == "open")
        .await;
    assert_eq!(opened["opens"], 2);
    let sub = es
        .expect_where("subscribe", |e| {
            e["event"] == "named" && e["type"] == "subscribe"
        })
        .await;
    assert_eq!(
        sub["data"],
        r#"{"action":"subscribe","channel":"news.es","status":true,"recovered":true}"#
    );
    let mut got = Vec::new();
    while got.len() < 20 {
        let e = es.expect("message").await;
        let d: Value = serde_json::from_str(e["data"].as_str().unwrap()).unwrap();
        let n = d["payload"]["n"].as_u64().unwrap();
        assert_eq!(e["id"], format!("{epoch}:{n}:news.es"));
        got.push(n);
    }
    assert_eq!(got, (4..=23).collect::<Vec<_>>());
    fcall(24).await;
    let e = es.expect("message").await;
    assert_eq!(e["id"], format!("{epoch}:24:news.es"));
}
