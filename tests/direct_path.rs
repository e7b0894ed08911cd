//! The direct write path (issue 13) gives a client the same bytes in the
//! same order as the queued path: deliveries, a gap's notices and a reply,
//! while the client's socket is full mid-burst (partial writes). Each
//! scenario runs with `WSGATE_DIRECT_WRITES` on and off and the two
//! transcripts are compared byte for byte.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Client, Gateway, Redis, WAIT};
use serde_json::{json, Value};

/// Bytes of each delivery: 1,000 of them (8 MB) are more than loopback's
/// socket buffers hold, so the gateway's writes turn partial mid-burst.
const PAYLOAD: usize = 8 * 1024;
const BURST: usize = 1000;
const AFTER: usize = 50;

fn payload(i: usize) -> String {
    format!("{i:06}{}", "x".repeat(PAYLOAD - 6))
}

fn delivery(i: usize) -> String {
    json!({"action":"message","channel":"d.slow","payload":payload(i)}).to_string()
}

/// Publishes `range` to the slow client's channel, then a marker the fast
/// client waits for: one dispatcher handles both in order, so once the
/// marker arrives every message before it is in the slow client's queue or
/// socket.
async fn burst(redis: &Redis, fast: &mut Client, range: std::ops::Range<usize>, mark: usize) {
    for i in range {
        // A JSON string, so the payload is delivered as the string.
        let body = Value::String(payload(i)).to_string();
        assert_eq!(redis.publish("d.slow", body.as_bytes()).await, 1);
    }
    assert_eq!(redis.publish("d.bar", mark.to_string().as_bytes()).await, 1);
    loop {
        let v = fast.recv().await;
        if v["action"] == "message" {
            assert_eq!(v["payload"], json!(mark), "{v}");
            return;
        }
    }
}

/// Everything the slow client received, as text, until its `pong`'s
/// successor run of `AFTER` deliveries is complete.
async fn transcript(direct: bool) -> Vec<String> {
    let mut redis = Redis::start().await;
    let mut config = common::test_config(Some(redis.url()));
    config.direct_writes = direct;
    // Room for the whole burst: this test is about order, not the limit
    // (tests/protocol.rs checks the slow-consumer close at it).
    config.client_queue_bytes = std::num::NonZeroUsize::new(64 << 20).expect("nonzero");
    let gw = Gateway::start(config).await;
    let mut slow = gw.client().await;
    slow.subscribe("d.slow").await;
    let mut fast = gw.client().await;
    fast.subscribe("d.bar").await;

    // The slow client reads nothing while the burst arrives.
    burst(&redis, &mut fast, 0..BURST, 1).await;

    // An outage with a backlog: the notices queue behind the deliveries.
    redis.kill();
    fast.expect_interrupted(&[], &["d.bar"]).await;
    redis.restart().await;
    fast.expect_resumed(&[], &["d.bar"]).await;

    // A reply behind all of it, then more deliveries behind the reply.
    slow.send_json(json!({"action":"ping"})).await;
    burst(&redis, &mut fast, BURST..BURST + AFTER, 2).await;

    let total = BURST + 2 + 1 + AFTER;
    let mut got = Vec::with_capacity(total);
    while got.len() < total {
        got.push(slow.recv_text().await);
    }
    slow.expect_silence(Duration::from_millis(200)).await;
    gw.stop().await;
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_and_queued_paths_write_the_same_transcript() {
    let direct = tokio::time::timeout(WAIT * 6, transcript(true))
        .await
        .expect("direct run timed out");
    let mut want: Vec<String> = (0..BURST).map(delivery).collect();
    for (action, reason) in [
        ("interrupted", Some(common::REASON_LOST)),
        ("resumed", None),
    ] {
        want.push(common::notice(action, reason, &[], &["d.slow"]).to_string());
    }
    want.push(json!({"action":"pong"}).to_string());
    want.extend((BURST..BURST + AFTER).map(delivery));
    assert_eq!(direct.len(), want.len());
    for (i, (got, want)) in direct.iter().zip(&want).enumerate() {
        let got: Value = serde_json::from_str(got).expect("JSON");
        let want: Value = serde_json::from_str(want).expect("JSON");
        assert_eq!(
            common::sorted_topics(got),
            want,
            "frame {i} of the direct path"
        );
    }

    let queued = tokio::time::timeout(WAIT * 6, transcript(false))
        .await
        .expect("queued run timed out");
    assert_eq!(queued.len(), direct.len());
    for (i, (d, q)) in direct.iter().zip(&queued).enumerate() {
        assert_eq!(d, q, "frame {i}: direct and queued paths differ");
    }
}
