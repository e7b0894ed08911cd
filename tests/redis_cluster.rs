//! Redis Cluster (`WSGATE_REDIS_CLUSTER`, docs/redis.md, "Redis Cluster"),
//! against a real cluster of three masters with a replica each
//! ([`common::cluster::RedisCluster`], `cluster-node-timeout` 1000 ms):
//!
//! * classic mode: a pattern and a channel subscription through the
//!   gateway; `PUBLISH` on any node reaches the clients; `POST /publish`
//!   too; `kill -9` of the node holding the pub/sub connection: it moves to
//!   another node, with `interrupted` and `resumed`.
//! * sharded mode: 1,000 channels spread over the shards; each master's
//!   `PUBSUB SHARDCHANNELS` is exactly the set of channels whose slots it
//!   owns; `SPUBLISH` on the owner reaches the clients; a pattern subscribe
//!   is refused with `patterns unavailable in sharded mode`; with
//!   `WSGATE_REDIS_CLUSTER_PATTERNS=on` it is accepted and a gateway
//!   publish reaches both kinds.
//! * a slot migration while publishing: the channels of that slot get
//!   `interrupted` then `resumed` and deliver again from the new owner;
//!   the other channels get no notice.
//! * `kill -9` of a shard master, its replica promoted: its channels get
//!   `interrupted` then `resumed` and deliver again (the time from the kill
//!   to the first delivery is printed); the others keep flowing, and
//!   `/readyz` stays 200.
//! * TLS and an ACL user (issue 15): nodes with a TLS port too and
//!   `tls-cluster yes`, client certificates, `rediss://app:..@` seeds on
//!   the TLS ports; both modes deliver, and every gateway connection is
//!   `user=app` on a TLS port.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use common::cluster::{RedisCluster, CLUSTER_WAIT};
use common::pki::Pki;
use common::{http, subscribe_all, test_config, Client, Gateway, REASON_LOST, WAIT};
use serde_json::{json, Value};
use wsgate::broker::redis::cluster::PATTERNS_UNAVAILABLE;
use wsgate::broker::redis::slot::slot_of;
use wsgate::broker::redis::Security;
use wsgate::Config;

/// A gateway config over `cluster`, with room for many channels and ~1 s
/// failure detection.
fn config(cluster: &RedisCluster, node: &str, sharded: bool, patterns: bool) -> Config {
    let mut c = test_config(None);
    c.redis_cluster = Some(cluster.url());
    c.redis_cluster_sharded = sharded;
    c.redis_cluster_patterns = patterns;
    c.node_id = node.to_owned();
    c.max_subscriptions = NonZeroUsize::new(2000).unwrap();
    c.subscribe_rate = NonZeroUsize::new(1_000_000).unwrap();
    c.redis_probe_interval = Duration::from_millis(200);
    c.redis_probe_timeout = Duration::from_millis(1000);
    c.redis_backoff_max = Duration::from_millis(200);
    c
}

/// Reads frames until `action` notices (one per slot) have named exactly
/// `want`; every other frame read meanwhile is returned (messages of
/// channels that keep flowing). A notice naming another channel fails.
async fn notices_naming(c: &mut Client, action: &str, want: &BTreeSet<String>) -> Vec<Value> {
    let mut named = BTreeSet::new();
    let mut others = Vec::new();
    while named != *want {
        let v = c.recv().await;
        if v["action"] != action {
            others.push(v);
            continue;
        }
        if action == "interrupted" {
            assert_eq!(v["reason"], REASON_LOST, "{v}");
        }
        for ch in v["channels"].as_array().expect("channels") {
            let ch = ch.as_str().unwrap().to_owned();
            assert!(
                want.contains(&ch),
                "{action} names {ch}, not concerned: {v}"
            );
            named.insert(ch);
        }
    }
    others
}

/// The next frame that is a message on `channel` (notices and other
/// channels' messages before it are skipped and returned).
async fn next_on(c: &mut Client, channel: &str) -> (Value, Vec<Value>) {
    let mut skipped = Vec::new();
    loop {
        let v = c.recv().await;
        if v["action"] == "message" && v["channel"] == channel {
            return (v, skipped);
        }
        skipped.push(v);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_mode_delivers_publish_from_any_node() {
    let cluster = RedisCluster::start(3).await;
    let gw = Gateway::start(config(&cluster, "cl-classic", false, false)).await;
    let mut c = gw.client().await;
    c.subscribe("news").await;
    let mut p = gw.client().await;
    p.psubscribe("news.*").await;

    // PUBLISH on every node, masters and replicas: classic pub/sub is
    // broadcast cluster-wide.
    for (i, node) in cluster.nodes.iter().enumerate() {
        let payload = format!("{i}");
        cluster
            .cmd(node.port, &["PUBLISH", "news", &payload])
            .await
            .expect("PUBLISH");
        assert_eq!(
            c.recv().await,
            json!({"action":"message","channel":"news","payload":i})
        );
        cluster
            .cmd(node.port, &["PUBLISH", "news.sport", &payload])
            .await
            .expect("PUBLISH");
        assert_eq!(
            p.recv().await,
            json!({"action":"message","pattern":"news.*","channel":"news.sport","payload":i})
        );
    }

    // The gateway's own publishes, plain and idempotent (the key lives in
    // the channel's slot, on its owner). In a cluster `PUBLISH` counts the
    // receivers on the node that ran it only: 0 or 1 here.
    let (status, body) = gw.publish(json!({"channel":"news","payload":"gw"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        c.recv().await,
        json!({"action":"message","channel":"news","payload":"gw"})
    );
    let mut counts = Vec::new();
    for _ in 0..2 {
        let (status, body) = gw
            .publish(json!({"channel":"news.x","payload":1,"idempotency_key":"k1"}))
            .await;
        assert_eq!(status, 200, "{body}");
        counts.push(body["receivers"].clone());
    }
    assert_eq!(counts[0], counts[1], "the repeat returns the first count");
    assert_eq!(
        p.recv().await,
        json!({"action":"message","pattern":"news.*","channel":"news.x","payload":1})
    );
    p.expect_silence(Duration::from_millis(200)).await;

    // GET /shard names the slot and its owner.
    let slot = slot_of(b"news");
    let owner = cluster.owner(slot).await;
    let (status, body) = http(gw.addr, "GET", "/shard?channel=news", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"channel":"news","shard":slot,"url":format!("redis://127.0.0.1:{owner}")})
    );

    // The node holding the pub/sub connection dies: it moves to another
    // node, with interrupted and resumed, and delivers again.
    let mut cluster = cluster;
    let mut holder = None;
    for node in &cluster.nodes {
        if let Some(redis::Value::BulkString(list)) =
            cluster.cmd(node.port, &["CLIENT", "LIST"]).await
        {
            if String::from_utf8_lossy(&list).contains("name=wsgate:cl-classic:pubsub ") {
                holder = Some(node.port);
            }
        }
    }
    let holder = holder.expect("a node holds the pub/sub connection");
    let killed = Instant::now();
    cluster.kill(holder);
    c.expect_interrupted(&[], &["news"]).await;
    p.expect_interrupted(&["news.*"], &[]).await;
    c.expect_resumed(&[], &["news"]).await;
    p.expect_resumed(&["news.*"], &[]).await;
    println!(
        "classic mode: kill -9 of the pub/sub connection's node to resumed: {} ms",
        killed.elapsed().as_millis()
    );
    let live = cluster
        .nodes
        .iter()
        .find(|n| n.port != holder)
        .unwrap()
        .port;
    cluster
        .cmd(live, &["PUBLISH", "news", "\"again\""])
        .await
        .expect("PUBLISH");
    assert_eq!(
        c.recv().await,
        json!({"action":"message","channel":"news","payload":"again"})
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_mode_holds_each_channel_on_its_slot_owner() {
    let cluster = RedisCluster::start(3).await;
    let gw = Gateway::start(config(&cluster, "cl-sharded", true, false)).await;

    // Slot numbers agree with Redis's CLUSTER KEYSLOT.
    for name in ["foo", "news", "{user1}.inbox", "room.7"] {
        let redis_slot = match cluster
            .cmd(cluster.nodes[0].port, &["CLUSTER", "KEYSLOT", name])
            .await
        {
            Some(redis::Value::Int(n)) => n as u16,
            other => panic!("{other:?}"),
        };
        assert_eq!(slot_of(name.as_bytes()), redis_slot, "{name}");
    }

    let channels: Vec<String> = (0..1000).map(|i| format!("room.{i}")).collect();
    let mut c = gw.client().await;
    subscribe_all(&mut c, &channels).await;

    // Each master holds exactly the channels of its slots.
    let ranges = cluster.slots().await;
    let mut expected: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for ch in &channels {
        let s = slot_of(ch.as_bytes());
        let (_, _, m, _) = ranges
            .iter()
            .find(|(a, b, _, _)| (*a..=*b).contains(&s))
            .unwrap();
        expected.entry(*m).or_default().push(ch.clone());
    }
    assert_eq!(
        expected.len(),
        3,
        "1,000 channels spread over the 3 masters"
    );
    for (m, mut want) in expected.clone() {
        want.sort();
        assert!(want.len() > 250, "{m} holds {}", want.len());
        let held: Vec<String> = cluster
            .shard_channels(m)
            .await
            .into_iter()
            .filter(|c| !common::is_router_channel(c))
            .collect();
        assert_eq!(held, want, "master {m}");
        let gauge = format!("wsgate_broker_up{{link=\"shard:127.0.0.1:{m}\"}}");
        assert_eq!(
            common::metric_value(gw.addr, &gauge).await,
            Some(1.0),
            "{gauge}"
        );
    }

    // SPUBLISH on the owner reaches the client, for a sample of channels.
    for ch in channels.iter().step_by(97) {
        let s = slot_of(ch.as_bytes());
        assert_eq!(cluster.spublish(s, ch, "\"s\"").await, 1, "{ch}");
        assert_eq!(
            c.recv().await,
            json!({"action":"message","channel":ch,"payload":"s"})
        );
    }
    // And the gateway's own publish goes out as SPUBLISH.
    let (status, body) = gw.publish(json!({"channel":"room.5","payload":5})).await;
    assert_eq!((status, body), (200, json!({"receivers": 1})));
    assert_eq!(
        c.recv().await,
        json!({"action":"message","channel":"room.5","payload":5})
    );

    // Patterns are refused, with the reason.
    let reply = c
        .request(json!({"action":"subscribe","pattern":"room.*"}))
        .await;
    assert_eq!(reply["status"], json!(false), "{reply}");
    assert!(reply.to_string().contains(PATTERNS_UNAVAILABLE), "{reply}");
    gw.stop().await;

    // With WSGATE_REDIS_CLUSTER_PATTERNS=on, patterns work, and a gateway
    // publish reaches both kinds (SPUBLISH and PUBLISH).
    let gw = Gateway::start(config(&cluster, "cl-patterns", true, true)).await;
    let mut c = gw.client().await;
    c.subscribe("room.1").await;
    let mut p = gw.client().await;
    p.psubscribe("room.*").await;
    let (status, body) = gw
        .publish(json!({"channel":"room.1","payload":"both"}))
        .await;
    // SPUBLISH's receiver (1) plus PUBLISH's on the owner (0 or 1: in a
    // cluster it counts that node's subscribers only).
    assert_eq!(status, 200, "{body}");
    let both = body["receivers"].as_u64().unwrap();
    assert!((1..=2).contains(&both), "{body}");
    assert_eq!(
        c.recv().await,
        json!({"action":"message","channel":"room.1","payload":"both"})
    );
    assert_eq!(
        p.recv().await,
        json!({"action":"message","pattern":"room.*","channel":"room.1","payload":"both"})
    );
    // Idempotent too: once.
    for _ in 0..2 {
        let (status, body) = gw
            .publish(json!({"channel":"room.1","payload":"once","idempotency_key":"k"}))
            .await;
        assert_eq!((status, body["receivers"].as_u64()), (200, Some(both)));
    }
    assert_eq!(
        c.recv().await,
        json!({"action":"message","channel":"room.1","payload":"once"})
    );
    assert_eq!(
        p.recv().await,
        json!({"action":"message","pattern":"room.*","channel":"room.1","payload":"once"})
    );
    c.expect_silence(Duration::from_millis(200)).await;
    p.expect_silence(Duration::from_millis(100)).await;
    gw.stop().await;
}

/// `n` channels of `slot`: `<prefix>{<tag of slot>}.<i>`.
fn channels_in(slot: u16, prefix: &str, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}{{{}}}.{i}", tag_of(slot)))
        .take(n)
        .collect()
}

/// A hashtag of `slot` (the smallest decimal number hashing to it).
fn tag_of(slot: u16) -> String {
    (0u32..)
        .map(|n| n.to_string())
        .find(|t| slot_of(t.as_bytes()) == slot)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_migration_moves_only_that_slots_channels() {
    let cluster = RedisCluster::start(3).await;
    let gw = Gateway::start(config(&cluster, "cl-migrate", true, false)).await;
    let moved_slot = 100;
    let from = cluster.owner(moved_slot).await;
    let to = *cluster
        .masters()
        .await
        .iter()
        .find(|m| **m != from)
        .unwrap();
    // Channels in the slot that moves, and channels on the same master in
    // another slot, and on another master.
    let moving = channels_in(moved_slot, "mv", 3);
    let staying_same = channels_in(moved_slot + 1, "st", 2);
    // A slot of the last master (redis-cli gives it 10923..16383).
    let other_slot = 12001;
    assert_ne!(cluster.owner(other_slot).await, from);
    let staying_other = channels_in(other_slot, "ot", 2);
    let all: Vec<String> = moving
        .iter()
        .chain(&staying_same)
        .chain(&staying_other)
        .cloned()
        .collect();
    let mut c = gw.client().await;
    subscribe_all(&mut c, &all).await;
    assert_eq!(cluster.owner(moved_slot + 1).await, from);

    cluster.migrate_slot(moved_slot, to).await;
    let want: BTreeSet<String> = moving.iter().cloned().collect();
    let others = notices_naming(&mut c, "interrupted", &want).await;
    assert!(others.is_empty(), "{others:?}");
    // While the moved slot resyncs, the other channels keep flowing.
    for ch in staying_same.iter().chain(&staying_other) {
        let (status, _) = gw.publish(json!({"channel": ch, "payload": "still"})).await;
        assert_eq!(status, 200, "{ch}");
    }
    let mut seen = Vec::new();
    let skipped = notices_naming(&mut c, "resumed", &want).await;
    seen.extend(skipped);
    for v in &seen {
        // A subscribe that reaches a master before it knows the slot is
        // its own is redirected: the slot goes down again (a second
        // `interrupted` for the same channels) until the map settles.
        let repeated = v["action"] == "interrupted"
            && v["channels"]
                .as_array()
                .is_some_and(|chs| chs.iter().all(|c| want.contains(c.as_str().unwrap_or(""))));
        assert!(
            v["action"] == "message" || repeated,
            "only moved channels get notices: {v}"
        );
    }
    // The moved channels deliver again, from their new owner.
    let deadline = Instant::now() + CLUSTER_WAIT;
    loop {
        assert!(Instant::now() < deadline, "SHARDCHANNELS of the new owner");
        let held = cluster.shard_channels(to).await;
        if moving.iter().all(|m| held.contains(m)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for ch in &moving {
        assert_eq!(cluster.spublish(moved_slot, ch, "\"moved\"").await, 1);
        let (v, skipped) = next_on(&mut c, ch).await;
        assert_eq!(
            v,
            json!({"action":"message","channel":ch,"payload":"moved"})
        );
        for s in skipped {
            assert_eq!(s["action"], "message", "{s}");
        }
    }
    // Gateway publishes follow the move (SPUBLISH to the new owner).
    let (status, body) = gw
        .publish(json!({"channel": moving[0], "payload": "gw"}))
        .await;
    assert_eq!((status, body), (200, json!({"receivers": 1})));
    let (v, _) = next_on(&mut c, &moving[0]).await;
    assert_eq!(v["payload"], "gw");
    c.expect_silence(Duration::from_millis(300)).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_failover_interrupts_and_resumes_its_channels() {
    if std::env::var("CLUSTER_TRACE").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("wsgate=debug")
            .try_init();
    }
    let mut cluster = RedisCluster::start(3).await;
    let gw = Gateway::start(config(&cluster, "cl-failover", true, false)).await;
    let masters = cluster.masters().await;
    let victim = masters[0];
    let ranges = cluster.slots().await;
    let owner_of = |s: u16| {
        ranges
            .iter()
            .find(|(a, b, _, _)| (*a..=*b).contains(&s))
            .map(|(_, _, m, _)| *m)
            .unwrap()
    };
    let channels: Vec<String> = (0..60).map(|i| format!("fo.{i}")).collect();
    let (dead, alive): (Vec<String>, Vec<String>) = channels
        .iter()
        .cloned()
        .partition(|c| owner_of(slot_of(c.as_bytes())) == victim);
    assert!(!dead.is_empty() && !alive.is_empty());
    let mut c = gw.client().await;
    subscribe_all(&mut c, &channels).await;

    let killed = Instant::now();
    cluster.kill(victim);
    let want: BTreeSet<String> = dead.iter().cloned().collect();
    let others = notices_naming(&mut c, "interrupted", &want).await;
    assert!(others.is_empty(), "{others:?}");
    assert_eq!(
        http(gw.addr, "GET", "/readyz", None).await.0,
        200,
        "one master down keeps the node ready"
    );
    // The other masters' channels keep flowing meanwhile.
    let (status, _) = gw
        .publish(json!({"channel": alive[0], "payload": "alive"}))
        .await;
    assert_eq!(status, 200);

    // Publish to a dead master's channel until it is delivered again.
    let probe = dead[0].clone();
    let mut resumed = BTreeSet::new();
    let mut alive_seen = false;
    let mut first_delivery = None;
    let deadline = Instant::now() + CLUSTER_WAIT;
    let mut n = 0;
    while first_delivery.is_none() || resumed != want || !alive_seen {
        assert!(Instant::now() < deadline, "no delivery after the failover");
        if first_delivery.is_none() {
            n += 1;
            let _ = gw.publish(json!({"channel": probe, "payload": n})).await;
        }
        let frame = tokio::time::timeout(Duration::from_millis(100), c.recv()).await;
        let Ok(v) = frame else { continue };
        match v["action"].as_str() {
            Some("resumed") => {
                for ch in v["channels"].as_array().unwrap() {
                    let ch = ch.as_str().unwrap().to_owned();
                    assert!(want.contains(&ch), "resumed names {ch}: {v}");
                    resumed.insert(ch);
                }
            }
            Some("message") if v["channel"] == probe.as_str() => {
                first_delivery.get_or_insert_with(|| killed.elapsed());
            }
            Some("message") if v["channel"] == alive[0].as_str() => {
                assert_eq!(v["payload"], "alive");
                alive_seen = true;
            }
            Some("message") => {}
            other => panic!("unexpected {other:?}: {v}"),
        }
    }
    assert!(alive_seen, "the other masters' channels kept flowing");
    let took = first_delivery.unwrap();
    println!(
        "cluster failover: kill -9 of a master to the first delivery through the gateway: {} ms",
        took.as_millis()
    );
    cluster.wait_ok().await;
    // Every dead master's channel delivers again, from the promoted replica.
    for ch in &dead {
        let (status, body) = gw.publish(json!({"channel": ch, "payload": "back"})).await;
        assert_eq!((status, body), (200, json!({"receivers": 1})), "{ch}");
        // (Probes published during the failover may still come first.)
        loop {
            let (v, _) = next_on(&mut c, ch).await;
            if v["payload"] == "back" {
                break;
            }
            assert!(v["payload"].is_number() && *ch == probe, "{v}");
        }
    }
    assert!(took < WAIT * 2, "failover took {took:?}");
    gw.stop().await;
}

/// `CLIENT LIST` of the node at `port` as text.
async fn client_list(cluster: &RedisCluster, port: u16) -> String {
    match cluster.cmd(port, &["CLIENT", "LIST"]).await {
        Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
        Some(redis::Value::VerbatimString { text, .. }) => text,
        other => panic!("CLIENT LIST: {other:?}"),
    }
}

/// Issue 15: a cluster over TLS (`rediss://` seeds, client certificates,
/// `--tls-cluster yes`) with an ACL user, in sharded mode. The seeds name
/// the TLS ports only, so the masters learned from `CLUSTER SLOTS` must be
/// reached over TLS with the seeds' user: one channel per master is
/// subscribed, `SPUBLISH` on its owner and `POST /publish` reach the
/// client, and every gateway connection on every node is `user=app` on
/// that node's TLS port (`laddr`). A classic-mode gateway on the same seeds
/// gets a node's `PUBLISH` through a pattern.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_cluster_with_acl_user() {
    let t0 = Instant::now();
    let pki = Pki::make();
    let t_pki = t0.elapsed();
    let cluster = RedisCluster::start_tls(3, &pki).await;
    let t_cluster = t0.elapsed();
    // ACLs are per node: the user is created on every one (default stays
    // open on the plain ports for the helper's own commands).
    for node in &cluster.nodes {
        let acl = [
            "ACL", "SETUSER", "app", "on", ">app-pw", "~*", "&*", "+@all",
        ];
        assert_eq!(cluster.cmd(node.port, &acl).await, Some(redis::Value::Okay));
    }
    let mut config = config(&cluster, "cl-tls", true, false);
    config.redis_cluster = Some(cluster.tls_url("app:app-pw@"));
    config.redis_security = Security {
        sentinel_password: None,
        ca_file: Some(pki.path("ca.crt").into()),
        cert_file: Some(pki.path("client.crt").into()),
        key_file: Some(pki.path("client.key").into()),
    };

    // One channel owned by each master.
    let slots = cluster.slots().await;
    let owner_of = |slot: u16| {
        slots
            .iter()
            .find(|(s, e, _, _)| (*s..=*e).contains(&slot))
            .map(|(_, _, m, _)| *m)
            .unwrap()
    };
    let masters = cluster.masters().await;
    assert_eq!(masters.len(), 3);
    let channels: Vec<String> = masters
        .iter()
        .map(|&m| {
            (0..)
                .map(|i| format!("tls.{i}"))
                .find(|c| owner_of(slot_of(c.as_bytes())) == m)
                .unwrap()
        })
        .collect();

    let mut classic = config.clone();
    classic.node_id = "cl-tls-classic".to_owned();
    classic.redis_cluster_sharded = false;
    let gw = Gateway::start(config).await;
    let mut c = gw.client().await;
    subscribe_all(&mut c, &channels).await;
    for (ch, &m) in channels.iter().zip(&masters) {
        let held = cluster.shard_channels(m).await;
        assert!(held.contains(ch), "master {m} holds {ch}: {held:?}");
        assert_eq!(
            cluster.spublish(slot_of(ch.as_bytes()), ch, "\"s\"").await,
            1,
            "{ch}"
        );
        assert_eq!(
            c.recv().await,
            json!({"action":"message","channel":ch,"payload":"s"})
        );
        let (status, body) = gw.publish(json!({"channel": ch, "payload": "gw"})).await;
        assert_eq!((status, body), (200, json!({"receivers": 1})));
        assert_eq!(
            c.recv().await,
            json!({"action":"message","channel":ch,"payload":"gw"})
        );
    }

    // Classic mode too: a PUBLISH on a node reaches a pattern subscriber.
    let gw_classic = Gateway::start(classic).await;
    let mut p = gw_classic.client().await;
    p.psubscribe("tls.*").await;
    match cluster
        .cmd(masters[0], &["PUBLISH", "tls.classic", "\"c\""])
        .await
    {
        Some(redis::Value::Int(_)) => {}
        other => panic!("PUBLISH: {other:?}"),
    }
    assert_eq!(
        p.recv().await,
        json!({"action":"message","pattern":"tls.*","channel":"tls.classic","payload":"c"})
    );

    // Every gateway connection, on every node, is the ACL user's, over TLS.
    for node in &cluster.nodes {
        let list = client_list(&cluster, node.port).await;
        let ours: Vec<&str> = list
            .lines()
            .filter(|l| l.contains(" name=wsgate:"))
            .collect();
        if masters.contains(&node.port) {
            assert!(!ours.is_empty(), "master {}: {list}", node.port);
        }
        let laddr = format!(" laddr=127.0.0.1:{} ", cluster.tls_port_of(node.port));
        for line in &ours {
            assert!(line.contains(" user=app "), "{line}");
            assert!(line.contains(&laddr), "over TLS: {line}");
        }
    }
    // Clients gone first: a live one that reads nothing holds a stop for the
    // WebSocket close grace.
    drop((c, p));
    gw_classic.stop().await;
    gw.stop().await;
    println!(
        "pki {t_pki:?}, cluster formed {t_cluster:?}, total {:?}",
        t0.elapsed()
    );
}
