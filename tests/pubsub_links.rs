//! K pub/sub connections per node (`WSGATE_REDIS_PUBSUB_CONNECTIONS`):
//! patterns spread over them by a hash of their name, each connection
//! refcounted, probed and resynced on its own.
//!
//! * Killing one of the K connections (`CLIENT KILL ID`) interrupts only the
//!   topics it held: their subscribers are told `interrupted` and then
//!   `resumed`, everyone else hears nothing and keeps receiving, and
//!   `/readyz` stays 200 throughout.
//! * A pattern-heavy resync: 20k distinct patterns over 8 connections,
//!   Redis killed and restarted for real; every subscription is confirmed,
//!   every client is told `interrupted` then `resumed`, and Redis ends
//!   holding exactly the registry's patterns.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{http, metric_value, test_config, wait_until, Client, Gateway, Redis, WAIT};
use serde_json::json;
use wsgate::broker::redis::{link_for, link_name};
use wsgate::broker::Topic;
use wsgate::Config;

/// A config with `links` pub/sub connections and room for many patterns.
fn config(redis: &Redis, links: usize, node: &str) -> Config {
    let mut c = test_config(Some(redis.url()));
    c.redis_pubsub_connections = NonZeroUsize::new(links);
    c.node_id = node.to_owned();
    c.max_subscriptions = NonZeroUsize::new(1000).unwrap();
    c.max_patterns_per_connection = NonZeroUsize::new(1000).unwrap();
    c.max_patterns = NonZeroUsize::new(100_000).unwrap();
    c.max_redis_patterns = NonZeroUsize::new(100_000).unwrap();
    c.subscribe_rate = NonZeroUsize::new(1_000_000).unwrap();
    c.subscribe_timeout = Duration::from_secs(60);
    c
}

/// The first pattern `prefix.<i>.*` that lands on `link` of `links`.
fn pattern_on(prefix: &str, link: usize, links: usize) -> String {
    (0..)
        .map(|i| format!("{prefix}.{i}.*"))
        .find(|p| link_for(&Topic::Pattern(Bytes::from(p.clone())), links) == link)
        .unwrap()
}

async fn readyz(gw: &Gateway) -> u16 {
    http(gw.addr, "GET", "/readyz", None).await.0
}

async fn metric(gw: &Gateway, series: &str) -> f64 {
    metric_value(gw.addr, series).await.unwrap_or(-1.0)
}

/// The next frame is this message through `pattern`.
async fn expect_message(c: &mut Client, pattern: &str, channel: &str, payload: i64) {
    assert_eq!(
        c.recv().await,
        json!({"action":"message","pattern":pattern,"channel":channel,"payload":payload})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_the_connections_interrupts_only_its_topics() {
    const K: usize = 4;
    let redis = Redis::start().await;
    let gw = Gateway::start(config(&redis, K, "links1")).await;
    let (pa, pb, pc) = (
        pattern_on("victim", 1, K),
        pattern_on("other", 2, K),
        pattern_on("third", 3, K),
    );
    let mut a = gw.client().await;
    a.psubscribe(&pa).await;
    let mut b = gw.client().await;
    b.psubscribe(&pb).await;
    let mut c = gw.client().await;
    c.psubscribe(&pc).await;
    c.subscribe("plain").await;
    assert_eq!(redis.numpat().await, 3);
    // Four connections, summed per node: one channel, three patterns.
    assert_eq!(redis.pubsub_clients().await, vec![(1, 3)]);
    assert_eq!(metric(&gw, "wsgate_broker_links_up").await, K as f64);

    let id = redis
        .client_id(&link_name("links1", 1))
        .await
        .expect("link 1 in CLIENT LIST");
    assert_eq!(
        redis.int(&["CLIENT", "KILL", "ID", &id.to_string()]).await,
        1
    );
    // Only A's topic was on it.
    a.expect_interrupted(&[&pa], &[]).await;
    assert_eq!(
        readyz(&gw).await,
        200,
        "a partial outage keeps the node ready"
    );
    a.expect_resumed(&[&pa], &[]).await;
    wait_until("link 1 back", WAIT, || async {
        metric(&gw, "wsgate_broker_links_up").await == K as f64
    })
    .await;
    assert_eq!(readyz(&gw).await, 200);
    assert_eq!(metric(&gw, "wsgate_broker_reconnects_total").await, 1.0);
    assert_eq!(
        metric(&gw, "wsgate_gap_notices_total").await,
        2.0,
        "A's interrupted and resumed, nobody else's"
    );
    // Everyone receives, and B and C heard nothing before it.
    let ch = |p: &str| p.trim_end_matches('*').to_owned() + "x";
    for (client, pattern, n) in [(&mut a, &pa, 1), (&mut b, &pb, 2), (&mut c, &pc, 3)] {
        assert_eq!(
            redis.publish(&ch(pattern), n.to_string().as_bytes()).await,
            1
        );
        expect_message(client, pattern, &ch(pattern), n).await;
    }
    assert_eq!(redis.publish("plain", b"4").await, 1);
    assert_eq!(
        c.recv().await,
        json!({"action":"message","channel":"plain","payload":4})
    );
    // Redis holds exactly what the registry does again.
    assert_eq!(redis.numpat().await, 3);
    assert_eq!(redis.pubsub_clients().await, vec![(1, 3)]);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_patterns_resync_over_eight_connections_after_a_restart() {
    const K: usize = 8;
    const CLIENTS: usize = 80;
    const PER: usize = 250;
    const TOTAL: usize = CLIENTS * PER;
    let mut redis = Redis::start().await;
    let gw = Gateway::start(config(&redis, K, "links2")).await;
    let pattern = |c: usize, i: usize| format!("heavy.{c}.{i}.*");
    let mut clients = Vec::new();
    let started = Instant::now();
    for c in 0..CLIENTS {
        let mut client = gw.client().await;
        for i in 0..PER {
            client
                .send_json(json!({"action":"subscribe","pattern":pattern(c, i)}))
                .await;
        }
        clients.push(client);
    }
    // Confirmed in any order (the connections answer independently).
    for (c, client) in clients.iter_mut().enumerate() {
        let mut acked = std::collections::BTreeSet::new();
        for _ in 0..PER {
            let reply = client.recv().await;
            assert_eq!(reply["status"], json!(true), "none refused: {reply}");
            acked.insert(reply["pattern"].as_str().expect("pattern").to_owned());
        }
        let want: std::collections::BTreeSet<String> = (0..PER).map(|i| pattern(c, i)).collect();
        assert_eq!(acked, want);
    }
    eprintln!("{TOTAL} patterns subscribed in {:?}", started.elapsed());
    assert_eq!(redis.numpat().await, TOTAL as i64);
    // Spread: every connection holds some, none most.
    let per_link: Vec<usize> = (0..K)
        .map(|l| {
            (0..CLIENTS)
                .flat_map(|c| (0..PER).map(move |i| (c, i)))
                .filter(|&(c, i)| link_for(&Topic::Pattern(Bytes::from(pattern(c, i))), K) == l)
                .count()
        })
        .collect();
    assert!(
        per_link
            .iter()
            .all(|&n| n > TOTAL / K / 2 && n < TOTAL / K * 2),
        "{per_link:?}"
    );

    redis.kill();
    for client in clients.iter_mut() {
        assert_eq!(client.recv().await["action"], "interrupted");
    }
    let t = Instant::now();
    redis.restart().await;
    for client in clients.iter_mut() {
        // One notice per connection its patterns were on: after the
        // interrupted ones (any order), only resumed ones, until all of its
        // patterns are named.
        let mut resumed = 0;
        while resumed < PER {
            let v = client.recv().await;
            match v["action"].as_str() {
                Some("interrupted") => {}
                Some("resumed") => resumed += v["patterns"].as_array().map_or(0, Vec::len),
                other => panic!("unexpected {other:?}: {v}"),
            }
        }
        assert_eq!(resumed, PER);
    }
    eprintln!(
        "{TOTAL} patterns resynced {:?} after Redis was back",
        t.elapsed()
    );
    wait_until("/readyz 200 after the restart", WAIT, || async {
        readyz(&gw).await == 200
    })
    .await;
    // Redis holds exactly the registry's patterns, and they deliver.
    assert_eq!(redis.numpat().await, TOTAL as i64);
    assert_eq!(
        metric(&gw, "wsgate_broker_subscriptions{kind=\"pattern\"}").await,
        TOTAL as f64
    );
    assert_eq!(redis.pubsub_clients().await, vec![(0, TOTAL as i64)]);
    for (c, client) in clients.iter_mut().enumerate().step_by(7) {
        let p = pattern(c, PER - 1);
        let ch = p.trim_end_matches('*').to_owned() + "z";
        assert_eq!(redis.publish(&ch, b"9").await, 1);
        expect_message(client, &p, &ch, 9).await;
    }
    gw.stop().await;
}
