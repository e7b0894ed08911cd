//! Client-side sharding over independent Redis servers
//! (`WSGATE_REDIS_SHARDS`, docs/redis.md, "Client-side sharding"), against three real
//! redis-servers:
//!
//! * 1,000 channels spread by the jump hash: the spread is near even, and
//!   each server's `PUBSUB CHANNELS` holds exactly its share.
//! * `POST /publish` goes to the owning server (a raw subscriber there sees
//!   it, the others' see nothing) and reaches the clients; `GET /shard`
//!   names the owner; a pattern is held on every server and gets what is
//!   published on any of them.
//! * `kill -9` of one server: only its channels (and the patterns) get
//!   `interrupted`, the others keep flowing, `/readyz` stays 200, the
//!   per-link gauges show the outage; after a restart, `resumed` and
//!   deliveries again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::num::NonZeroUsize;
use std::time::Duration;

use common::{
    http, metric_value, subscribe_all, test_config, wait_until, Gateway, RawSub, Redis, WAIT,
};
use serde_json::{json, Value};
use wsgate::broker::redis::shards::shard_for;
use wsgate::Config;

const SHARDS: usize = 3;

async fn servers() -> Vec<Redis> {
    let mut out = Vec::new();
    for _ in 0..SHARDS {
        out.push(Redis::start().await);
    }
    out
}

/// A gateway config over `redis` as shards, with room for many channels.
fn config(redis: &[Redis], node: &str) -> Config {
    let urls: Vec<String> = redis.iter().map(Redis::url).collect();
    let mut c = test_config(urls.first().cloned());
    c.redis_shards = urls;
    c.node_id = node.to_owned();
    c.max_subscriptions = NonZeroUsize::new(2000).unwrap();
    c.subscribe_rate = NonZeroUsize::new(1_000_000).unwrap();
    c
}

/// The first channel `<prefix><i>` owned by `shard`.
fn channel_on(prefix: &str, shard: usize) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|c| shard_for(c.as_bytes(), SHARDS) == shard)
        .unwrap()
}

async fn readyz(gw: &Gateway) -> u16 {
    http(gw.addr, "GET", "/readyz", None).await.0
}

async fn metric(gw: &Gateway, series: &str) -> f64 {
    metric_value(gw.addr, series).await.unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_live_on_the_server_their_name_hashes_to() {
    let redis = servers().await;
    let gw = Gateway::start(config(&redis, "shards1")).await;

    // The spread of 1,000 names: within 15% of even (333 each).
    let channels: Vec<String> = (0..1000).map(|i| format!("room.{i}")).collect();
    let mut share: Vec<BTreeSet<String>> = vec![BTreeSet::new(); SHARDS];
    for ch in &channels {
        share[shard_for(ch.as_bytes(), SHARDS)].insert(ch.clone());
    }
    let even = channels.len() / SHARDS;
    for (i, s) in share.iter().enumerate() {
        assert!(
            s.len().abs_diff(even) * 100 <= even * 15,
            "shard {i} owns {} of {}",
            s.len(),
            channels.len()
        );
    }

    let mut c = gw.client().await;
    subscribe_all(&mut c, &channels).await;
    for (i, r) in redis.iter().enumerate() {
        let held: BTreeSet<String> = r.channels().await.into_iter().collect();
        assert_eq!(held, share[i], "PUBSUB CHANNELS of shard {i}");
    }

    // GET /shard names the owner, without credentials.
    for ch in ["room.1", "room.2", "room.3", "room.4"] {
        let i = shard_for(ch.as_bytes(), SHARDS);
        let (status, body) = http(gw.addr, "GET", &format!("/shard?channel={ch}"), None).await;
        assert_eq!(status, 200);
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap(),
            json!({"channel": ch, "shard": i, "url": redis[i].url()})
        );
    }
    let (status, _) = http(gw.addr, "GET", "/shard", None).await;
    assert_eq!(status, 400);

    // /publish goes to the owner only: a raw subscriber there gets it, the
    // other servers have nobody (their PUBLISH would reach no one).
    for shard in 0..SHARDS {
        let ch = channel_on("room.", shard);
        let mut raws = Vec::new();
        for r in &redis {
            raws.push(RawSub::subscribe(r, &ch).await);
        }
        let payload = format!("to-{shard}");
        let (status, body) = gw
            .publish(json!({"channel": ch, "payload_text": payload}))
            .await;
        // The gateway's own subscription and the raw one on the owner.
        assert_eq!((status, body), (200, json!({"receivers": 2})));
        raws[shard].expect(&[payload.as_bytes()]).await;
        assert_eq!(
            c.recv().await,
            json!({"action":"message","channel":ch,"payload":payload})
        );
        drop(raws);
    }

    // A pattern is held on every server and gets what any of them publishes.
    let mut p = gw.client().await;
    p.psubscribe("room.*").await;
    for r in &redis {
        assert_eq!(r.numpat().await, 1);
    }
    for (i, r) in redis.iter().enumerate() {
        let ch = format!("room.x{i}");
        assert_eq!(r.publish(&ch, format!("{i}").as_bytes()).await, 1);
        assert_eq!(
            p.recv().await,
            json!({"action":"message","pattern":"room.*","channel":ch,"payload":i})
        );
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_down_interrupts_only_its_channels() {
    let mut redis = servers().await;
    let gw = Gateway::start(config(&redis, "shards2")).await;
    let chans: Vec<String> = (0..SHARDS).map(|s| channel_on("live.", s)).collect();
    let mut c = gw.client().await;
    subscribe_all(&mut c, &chans).await;
    let mut p = gw.client().await;
    p.psubscribe("live.*").await;
    for (i, r) in redis.iter().enumerate() {
        assert_eq!(r.numpat().await, 1, "shard {i}");
        assert_eq!(
            metric(&gw, &format!("wsgate_broker_up{{link=\"s{i}.0\"}}")).await,
            1.0
        );
    }

    redis[1].kill();
    c.expect_interrupted(&[], &[chans[1].as_str()]).await;
    p.expect_interrupted(&["live.*"], &[]).await;
    assert_eq!(
        readyz(&gw).await,
        200,
        "a partial outage keeps the node ready"
    );
    assert_eq!(metric(&gw, "wsgate_broker_up{link=\"s1.0\"}").await, 0.0);
    assert_eq!(metric(&gw, "wsgate_broker_up{link=\"s0.0\"}").await, 1.0);
    assert_eq!(metric(&gw, "wsgate_broker_up{link=\"s2.0\"}").await, 1.0);

    // The other servers' channels keep flowing, in order.
    for n in 0..20 {
        for s in [0, 2] {
            let (status, _) = gw.publish(json!({"channel": chans[s], "payload": n})).await;
            assert_eq!(status, 200);
            assert_eq!(
                c.recv().await,
                json!({"action":"message","channel":chans[s],"payload":n})
            );
        }
    }
    let (status, _) = gw.publish(json!({"channel": chans[1], "payload": 0})).await;
    assert_eq!(status, 503, "the owner is down: not published");
    assert_eq!(readyz(&gw).await, 200);

    redis[1].restart().await;
    c.expect_resumed(&[], &[chans[1].as_str()]).await;
    p.expect_resumed(&["live.*"], &[]).await;
    // Every server holds the pattern again (the others' copies were reset
    // and resubscribed), and the restarted one holds its channel.
    for (i, r) in redis.iter().enumerate() {
        assert_eq!(r.numpat().await, 1, "shard {i}");
    }
    redis[1].wait_numsub(&chans[1], 1).await;
    let (status, _) = gw
        .publish(json!({"channel": chans[1], "payload": "back"}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        c.recv().await,
        json!({"action":"message","channel":chans[1],"payload":"back"})
    );
    assert_eq!(
        p.recv().await,
        json!({"action":"message","pattern":"live.*","channel":chans[1],"payload":"back"})
    );
    wait_until("s1.0 up", WAIT, || async {
        metric(&gw, "wsgate_broker_up{link=\"s1.0\"}").await == 1.0
    })
    .await;
    c.expect_silence(Duration::from_millis(200)).await;
    gw.stop().await;
}
