//! Gap healing (issue 14, `docs/history.md`, "Gap healing"), against a real
//! redis-server killed with `kill -9` and restarted for real: 100 clients on
//! history channels while a publisher keeps publishing through
//! `FCALL wsgate_publish` and `POST /publish`, retrying while Redis is down.
//!
//! With the append-only file on (`appendfsync always`), every client ends
//! with every acknowledged message of its channel, in order, exactly once,
//! and its `resumed` says `recovered:true`. Without persistence the history
//! is reset (new epoch): `recovered:false`, and nothing is delivered twice.
//!
//! Every wait is on a signal (a publish's reply, `/readyz`, `NUMSUB`, a
//! frame), each bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::sync::{watch, Mutex};
use wsgate::history::Rules;

const CHANNELS: usize = 4;
const CLIENTS: usize = 100;
/// Publishes in all, round robin over the channels.
const TOTAL: usize = 240;
/// Acknowledged publishes before Redis is killed.
const KILL_AT: usize = 60;
/// How long one publish is retried while Redis is away.
const RETRY_FOR: Duration = Duration::from_secs(15);

fn channel(i: usize) -> String {
    format!("heal.{}", i % CHANNELS)
}

/// What the publisher reports: acknowledged `(channel, payload)` in order,
/// and how many attempts failed (Redis away).
#[derive(Default, Clone)]
struct Progress {
    acked: Vec<(String, String)>,
    failures: usize,
}

/// Publishes `TOTAL` messages, even ones through `FCALL`, odd ones through
/// `POST /publish`; a failed attempt is retried with a new payload (it may
/// or may not have been applied: only acknowledged ones must arrive).
async fn publisher(gw: Arc<Gateway>, redis: Arc<Mutex<Redis>>, tx: watch::Sender<Progress>) {
    for i in 0..TOTAL {
        let c = channel(i);
        let deadline = Instant::now() + RETRY_FOR;
        for attempt in 0.. {
            // Keys in serde_json's order, so that a delivery's payload
            // re-serialised compares equal.
            let payload = format!(r#"{{"a":{attempt},"i":{i}}}"#);
            let ok = if i % 2 == 0 {
                let port = redis.lock().await.port;
                fcall(port, &c, &payload).await
            } else {
                let body = json!({"channel": c, "payload": serde_json::from_str::<Value>(&payload).unwrap()});
                gw.publish(body).await.0 == 200
            };
            if ok {
                tx.send_modify(|p| p.acked.push((c.clone(), payload)));
                break;
            }
            tx.send_modify(|p| p.failures += 1);
            assert!(
                Instant::now() < deadline,
                "publish {i} failed for {RETRY_FOR:?}"
            );
            // A retry pause while Redis is away, not a synchronisation.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `FCALL wsgate_publish 1 <channel> <payload>` on a fresh connection, as a
/// backend would; `true` when Redis answered with a receiver count.
async fn fcall(port: u16, channel: &str, payload: &str) -> bool {
    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else {
        return false;
    };
    let Ok(Ok(mut conn)) = tokio::time::timeout(
        Duration::from_secs(1),
        client.get_multiplexed_async_connection(),
    )
    .await
    else {
        return false;
    };
    let cmd = redis::cmd("FCALL")
        .arg("wsgate_publish")
        .arg(1)
        .arg(channel)
        .arg(payload)
        .to_owned();
    matches!(
        tokio::time::timeout(Duration::from_secs(2), cmd.query_async::<i64>(&mut conn)).await,
        Ok(Ok(_))
    )
}

/// What one client received on its channel.
struct Seen {
    /// `(offset, epoch, payload)` of each delivery, in order.
    deliveries: Vec<(u64, String, String)>,
    /// Every notice frame, as sent.
    notices: Vec<String>,
}

/// Reads `c`'s frames until it has `last` (the last acknowledged payload
/// of its channel) and a `resumed`.
async fn collect(mut c: Client, last: String) -> Seen {
    let mut seen = Seen {
        deliveries: Vec::new(),
        notices: Vec::new(),
    };
    let mut have_last = false;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(have_last && seen.notices.iter().any(|n| n.contains("\"resumed\""))) {
        let Ok(text) = tokio::time::timeout_at(deadline.into(), c.recv_text()).await else {
            // Reported by the caller's assertions, with what came.
            break;
        };
        let v: Value = serde_json::from_str(&text).unwrap();
        if v["action"] == "message" {
            let payload = v["payload"].to_string();
            have_last |= payload == last;
            seen.deliveries.push((
                v["offset"].as_u64().expect("an offset"),
                v["epoch"].as_str().expect("an epoch").to_owned(),
                payload,
            ));
        } else {
            seen.notices.push(text);
        }
    }
    seen
}

/// Starts Redis (`aof` or not) and a gateway, subscribes 100 clients over
/// 4 history channels, delivers one message to each channel (the node's
/// position to heal from), then kills and restarts Redis mid-publishing.
/// Returns what every client saw and what was acknowledged.
async fn outage(aof: bool) -> (Vec<(String, Seen)>, Progress) {
    let started = Instant::now();
    let redis = if aof {
        Redis::start_aof().await
    } else {
        Redis::start().await
    };
    let config = wsgate::Config {
        history: Rules::parse("heal.*:5000:300s").unwrap(),
        ..test_config(Some(redis.url()))
    };
    let gw = Arc::new(Gateway::start(config).await);
    let mut clients = Vec::new();
    for k in 0..CLIENTS {
        let mut c = gw.client().await;
        c.subscribe(&channel(k)).await;
        clients.push((channel(k), c));
    }
    for i in 0..CHANNELS {
        redis.wait_numsub(&channel(i), 1).await;
        let (status, body) = gw
            .publish(json!({"channel": channel(i), "payload": {"first": i}}))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    for (c, client) in &mut clients {
        let v = client.recv().await;
        assert_eq!(v["action"], "message", "{v}");
        assert_eq!(v["channel"].as_str(), Some(c.as_str()), "{v}");
        assert_eq!(v["offset"], 1, "{v}");
    }
    let redis = Arc::new(Mutex::new(redis));
    let (tx, mut rx) = watch::channel(Progress::default());
    let publishing = tokio::spawn(publisher(gw.clone(), redis.clone(), tx));
    tokio::time::timeout(WAIT, rx.wait_for(|p| p.acked.len() >= KILL_AT))
        .await
        .expect("publisher too slow")
        .expect("publisher gone");
    redis.lock().await.kill();
    tokio::time::timeout(WAIT, rx.wait_for(|p| p.failures > 0))
        .await
        .expect("no publish failed while Redis was down")
        .expect("publisher gone");
    redis.lock().await.restart().await;
    gw.wait_ready().await;
    tokio::time::timeout(Duration::from_secs(20), publishing)
        .await
        .expect("publisher did not finish")
        .expect("publisher panicked");
    let progress = rx.borrow().clone();
    let mut seen = Vec::new();
    let collecting = clients.into_iter().map(|(c, client)| {
        let last = progress
            .acked
            .iter()
            .rev()
            .find(|(ch, _)| *ch == c)
            .map(|(_, p)| p.clone())
            .expect("something acknowledged on every channel");
        async move { (c, collect(client, last).await) }
    });
    for (c, s) in futures_util::future::join_all(collecting).await {
        seen.push((c, s));
    }
    eprintln!(
        "aof={aof}: {} acknowledged, {} failed attempts, {:?} in all",
        progress.acked.len(),
        progress.failures,
        started.elapsed()
    );
    (seen, progress)
}

fn interrupted(c: &str) -> String {
    format!(
        r#"{{"action":"interrupted","reason":"broker connection lost","patterns":[],"channels":["{c}"]}}"#
    )
}

fn resumed(c: &str, recovered: bool) -> String {
    format!(r#"{{"action":"resumed","patterns":[],"channels":["{c}"],"recovered":{recovered}}}"#)
}

/// With the append-only file, the node heals every channel: every
/// acknowledged message arrives, in order, exactly once, with dense
/// offsets of one epoch, and the notices say `recovered:true`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_kill_9_with_aof_heals_every_channel() {
    let (seen, progress) = outage(true).await;
    for (c, s) in &seen {
        assert_eq!(s.notices, [interrupted(c), resumed(c, true)], "{c}");
        let epoch = &s.deliveries[0].1;
        let offsets: Vec<u64> = s.deliveries.iter().map(|d| d.0).collect();
        let dense: Vec<u64> = (2..2 + offsets.len() as u64).collect();
        assert_eq!(offsets, dense, "{c}: offsets not dense, once each");
        assert!(
            s.deliveries.iter().all(|d| d.1 == *epoch),
            "{c}: epoch changed"
        );
        let got: Vec<&String> = s.deliveries.iter().map(|d| &d.2).collect();
        let acked: Vec<&String> = progress
            .acked
            .iter()
            .filter(|(ch, _)| ch == c)
            .map(|(_, p)| p)
            .collect();
        // Every acknowledged one, in order; an unacknowledged attempt may
        // have been applied too (its reply was lost with Redis), never twice.
        let mut at = got.iter();
        for want in &acked {
            assert!(at.any(|g| g == want), "{c}: {want} missing or out of order");
        }
        let distinct: HashSet<&&String> = got.iter().collect();
        assert_eq!(distinct.len(), got.len(), "{c}: a payload twice");
    }
}

/// Without persistence the history is gone after the restart: the notices
/// say `recovered:false`, and no message is delivered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_kill_9_without_persistence_is_not_recovered() {
    let (seen, _) = outage(false).await;
    for (c, s) in &seen {
        assert_eq!(s.notices, [interrupted(c), resumed(c, false)], "{c}");
        let got: HashSet<&String> = s.deliveries.iter().map(|d| &d.2).collect();
        assert_eq!(got.len(), s.deliveries.len(), "{c}: a payload twice");
        let epochs: Vec<&String> = s.deliveries.iter().map(|d| &d.1).collect();
        assert!(
            epochs.first() != epochs.last(),
            "{c}: the epoch did not change"
        );
        for pair in s.deliveries.windows(2) {
            if pair[0].1 == pair[1].1 {
                assert!(pair[0].0 < pair[1].0, "{c}: offsets went back {pair:?}");
            }
        }
    }
}
