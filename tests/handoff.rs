//! The Bayeux handoff store against a real `redis-server` (tests/common,
//! never port 6379): two nodes (two `Handoff` instances) race for one fresh
//! session and exactly one gets it; records expire with their TTL; a take
//! after a take finds nothing; the URL forms the broker accepts (user,
//! password, database); Redis killed, then restarted, and frozen: calls
//! answer `Unavailable` within the timeout, then work again; `close` ends
//! the connection.
//!
//! Nothing sleeps to synchronise: tests wait on `CLIENT LIST`, `PTTL` and
//! `EXISTS` answers, always with a bound.

#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::*;
use wsgate::auth::Identity;
use wsgate::handoff::{Handoff, HandoffError, HandoffOptions, Record};

/// The call timeout of these tests: short, so the outage tests are quick.
const TIMEOUT: Duration = Duration::from_millis(500);
/// What a call may take beyond its timeout (scheduling on a busy machine).
const SLACK: Duration = Duration::from_millis(400);

fn options(node: &str) -> HandoffOptions {
    HandoffOptions {
        timeout: TIMEOUT,
        backoff_max: Duration::from_millis(200),
        ..HandoffOptions::new(node)
    }
}

fn node(url: &str, name: &str) -> Handoff {
    Handoff::redis(url, options(name)).expect("valid url")
}

/// The `name=` of every client connected to `redis`.
async fn client_names(redis: &Redis) -> Vec<String> {
    let list = match redis.cmd(&["CLIENT", "LIST"]).await {
        redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
        redis::Value::VerbatimString { text, .. } => text,
        other => panic!("CLIENT LIST reply {other:?}"),
    };
    list.lines()
        .filter_map(|l| l.split(' ').find_map(|kv| kv.strip_prefix("name=")))
        .map(str::to_owned)
        .collect()
}

/// Waits until a connection named `name` is (or, `false`, is no longer)
/// connected.
async fn wait_connection(redis: &Redis, name: &str, present: bool) {
    wait_until(&format!("{name} connected: {present}"), WAIT, || async {
        client_names(redis).await.iter().any(|n| n == name) == present
    })
    .await;
}

/// Waits until `h` answers a call (after an outage), bounded.
async fn wait_working(h: &Handoff) {
    wait_until("handoff store working", WAIT, || async {
        h.take("probe").await.is_ok()
    })
    .await;
}

fn identity() -> Identity {
    let claims =
        serde_json::json!({"sub": "alice", "exp": 4_000_000_000u64, "subscribe": ["/chat/*"]});
    Identity::from_claims(
        claims.as_object().cloned().unwrap(),
        SystemTime::UNIX_EPOCH + Duration::from_secs(4_000_000_000),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_of_two_nodes_adopts_a_fresh_session() {
    let redis = Redis::start().await;
    let (a, b) = (node(&redis.url(), "node-a"), node(&redis.url(), "node-b"));
    wait_connection(&redis, "wsgate:node-a:handoff", true).await;
    wait_connection(&redis, "wsgate:node-b:handoff", true).await;

    let record = Record::new(Some(&identity()), "node-a").encode();
    let ttl = Duration::from_secs(30);
    let (mut won_a, mut won_b) = (0, 0);
    for i in 0..100 {
        let id = format!("{i:032x}");
        a.offer(&id, record.clone(), ttl).await.unwrap();
        // Half the rounds race two adopters, half the issuing node's own
        // withdraw against an adopter: the same GETDEL decides both.
        let (ra, rb) = if i % 2 == 0 {
            tokio::join!(a.take(&id), b.take(&id))
        } else {
            let (wa, rb) = tokio::join!(a.withdraw(&id), b.take(&id));
            (wa.map(|w| w.then(|| record.clone())), rb)
        };
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        match (&ra, &rb) {
            (Some(r), None) => {
                assert_eq!(r, &record);
                won_a += 1;
            }
            (None, Some(r)) => {
                assert_eq!(r, &record);
                won_b += 1;
            }
            other => panic!("round {i}: not exactly one winner: {other:?}"),
        }
        // A take after a take, from either node, finds nothing.
        assert_eq!(a.take(&id).await, Ok(None));
        assert_eq!(b.take(&id).await, Ok(None));
        assert_eq!(a.withdraw(&id).await, Ok(false));
    }
    println!("100 races: node-a won {won_a}, node-b won {won_b}");

    // The adopter gets the identity the issuing node verified.
    let id = "0123456789abcdef0123456789abcdef";
    a.offer(id, record.clone(), ttl).await.unwrap();
    let taken = b.take(id).await.unwrap().expect("record");
    let adopted = Record::decode(&taken).unwrap();
    assert_eq!(adopted.issued_by, "node-a");
    let again = adopted.identity().unwrap().expect("an identity");
    assert_eq!(again.subject, "alice");
    assert_eq!(again.claims, identity().claims);
    assert_eq!(again.expires_at, identity().expires_at);

    // A clientId nobody issued.
    assert_eq!(b.take("ffffffffffffffffffffffffffffffff").await, Ok(None));
}

#[tokio::test]
async fn records_expire_and_cannot_be_offered_twice() {
    let redis = Redis::start().await;
    let a = node(&redis.url(), "ttl");
    wait_connection(&redis, "wsgate:ttl:handoff", true).await;
    let key = "wsgate:bayeux:handoff:c1";

    a.offer("c1", Bytes::from_static(b"r1"), Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(
        a.offer("c1", Bytes::from_static(b"r2"), Duration::from_secs(30))
            .await,
        Err(HandoffError::Exists)
    );
    let pttl = redis.int(&["PTTL", key]).await;
    assert!((1..=300).contains(&pttl), "PTTL {pttl}");
    assert_eq!(
        redis.cmd(&["GET", key]).await,
        redis::Value::BulkString(b"r1".to_vec())
    );
    wait_until("the record to expire", WAIT, || async {
        redis.int(&["EXISTS", key]).await == 0
    })
    .await;
    assert_eq!(a.take("c1").await, Ok(None));
    // Expired, the id may be offered again.
    a.offer("c1", Bytes::from_static(b"r3"), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(a.take("c1").await, Ok(Some(Bytes::from_static(b"r3"))));
    assert_eq!(redis.int(&["EXISTS", key]).await, 0);
}

#[tokio::test]
async fn the_broker_url_forms_user_password_and_database() {
    let redis = Redis::start().await;
    redis
        .cmd(&[
            "ACL",
            "SETUSER",
            "gw",
            "on",
            ">handoff-test-password",
            "~wsgate:*",
            "+@all",
        ])
        .await;
    let url = format!(
        "redis://gw:handoff-test-password@127.0.0.1:{}/3",
        redis.port
    );
    let a = node(&url, "authed");
    wait_connection(&redis, "wsgate:authed:handoff", true).await;
    a.offer("c1", Bytes::from_static(b"r"), Duration::from_secs(30))
        .await
        .unwrap();
    // In database 3, not 0.
    assert_eq!(redis.int(&["EXISTS", "wsgate:bayeux:handoff:c1"]).await, 0);
    let client = redis::Client::open(format!("redis://127.0.0.1:{}/3", redis.port)).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let exists: i64 = redis::cmd("EXISTS")
        .arg("wsgate:bayeux:handoff:c1")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 1);
    assert_eq!(a.take("c1").await, Ok(Some(Bytes::from_static(b"r"))));

    // A wrong password never connects: every call is Unavailable, in time.
    let wrong = node(
        &format!("redis://gw:wrong-password@127.0.0.1:{}/3", redis.port),
        "wrong",
    );
    let started = Instant::now();
    assert_eq!(wrong.take("c1").await, Err(HandoffError::Unavailable));
    assert!(started.elapsed() < TIMEOUT + SLACK);
}

#[tokio::test]
async fn redis_killed_is_unavailable_in_time_then_restarted_works_again() {
    let mut redis = Redis::start().await;
    let a = node(&redis.url(), "outage");
    wait_connection(&redis, "wsgate:outage:handoff", true).await;
    a.offer("before", Bytes::from_static(b"r"), Duration::from_secs(30))
        .await
        .unwrap();

    redis.kill();
    for round in 0..5 {
        let started = Instant::now();
        assert_eq!(
            a.take("before").await,
            Err(HandoffError::Unavailable),
            "round {round}"
        );
        assert_eq!(
            a.offer("x", Bytes::from_static(b"r"), Duration::from_secs(30))
                .await,
            Err(HandoffError::Unavailable)
        );
        let took = started.elapsed();
        assert!(took < 2 * TIMEOUT + SLACK, "round {round}: {took:?}");
    }

    redis.restart().await;
    wait_working(&a).await;
    wait_connection(&redis, "wsgate:outage:handoff", true).await;
    a.offer("after", Bytes::from_static(b"r2"), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(a.take("after").await, Ok(Some(Bytes::from_static(b"r2"))));
    // The restarted Redis kept nothing (no persistence in tests).
    assert_eq!(a.take("before").await, Ok(None));
}

#[tokio::test]
async fn a_frozen_redis_is_unavailable_within_the_timeout() {
    let redis = Redis::start().await;
    let a = node(&redis.url(), "frozen");
    wait_connection(&redis, "wsgate:frozen:handoff", true).await;
    let pid = redis.pid().expect("running");

    signal(pid, "STOP");
    let started = Instant::now();
    let outcome = a.take("c").await;
    let took = started.elapsed();
    signal(pid, "CONT");
    assert_eq!(outcome, Err(HandoffError::Unavailable));
    assert!(
        took >= TIMEOUT - Duration::from_millis(50) && took < TIMEOUT + SLACK,
        "{took:?}"
    );
    // The unanswered GETDEL made the task drop that connection; it
    // reconnects and serves again.
    wait_working(&a).await;
    a.offer("c", Bytes::from_static(b"r"), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(a.take("c").await, Ok(Some(Bytes::from_static(b"r"))));
}

#[tokio::test]
async fn close_ends_the_connection() {
    let redis = Redis::start().await;
    let a = node(&redis.url(), "closing");
    wait_connection(&redis, "wsgate:closing:handoff", true).await;
    let clone = a.clone();
    a.close();
    wait_connection(&redis, "wsgate:closing:handoff", false).await;
    assert_eq!(clone.take("c").await, Err(HandoffError::Unavailable));

    // Dropping every handle ends it too.
    let b = node(&redis.url(), "dropped");
    wait_connection(&redis, "wsgate:dropped:handoff", true).await;
    drop(b);
    wait_connection(&redis, "wsgate:dropped:handoff", false).await;
}

#[tokio::test]
async fn for_config_picks_like_the_broker() {
    let memory = Handoff::for_config(&test_config(None)).unwrap();
    assert_eq!(memory.name(), "memory");
    let redis = Redis::start().await;
    let mut config = test_config(Some(redis.url()));
    config.node_id = "cfg".to_owned();
    let h = Handoff::for_config(&config).unwrap();
    assert_eq!(h.name(), "redis");
    wait_connection(&redis, "wsgate:cfg:handoff", true).await;
    h.offer("c", Bytes::from_static(b"r"), Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(h.take("c").await, Ok(Some(Bytes::from_static(b"r"))));
    assert!(Handoff::for_config(&test_config(Some("nonsense://x".into()))).is_err());
}
