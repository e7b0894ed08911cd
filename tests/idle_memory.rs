//! Idle memory per subscribed socket, measured on the real binary.
//!
//! Ignored by default (it is a measurement, run in release mode):
//! `cargo test --release --test idle_memory -- --ignored --nocapture`
//! It asserts a generous ceiling so a regression (e.g. a 128 KiB read buffer
//! creeping back) fails; the exact figure goes in docs/benchmarks.md.
//! With `WSGATE_COMPRESSION=on` in the environment the gateway runs with it
//! and every client offers permessage-deflate (its replies are short, so
//! they come uncompressed): idle compressed sockets hold no deflate state.
#![allow(clippy::expect_used)]
mod common;
use common::*;

const SOCKETS: usize = 1000;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run with --release --ignored"]
async fn idle_rss_per_subscribed_socket() {
    let mut extra: Vec<(&str, String)> = std::env::var("WSGATE_WS_READ_BUFFER_BYTES")
        .map(|v| vec![("WSGATE_WS_READ_BUFFER_BYTES", v)])
        .unwrap_or_default();
    let compressed = std::env::var("WSGATE_COMPRESSION").is_ok_and(|v| v == "on");
    if compressed {
        extra.push(("WSGATE_COMPRESSION", "on".into()));
    }
    let offer: &[(&str, &str)] = if compressed {
        &[("sec-websocket-extensions", "permessage-deflate")]
    } else {
        &[]
    };
    let gw = GatewayProcess::spawn(&extra).await;
    // Warm up: one full connect/subscribe/disconnect so lazily built state exists.
    {
        let mut c = gw.client().await;
        c.subscribe("warmup").await;
    }
    let before = rss_kib(gw.pid());
    let mut clients = Vec::with_capacity(SOCKETS);
    for i in 0..SOCKETS {
        let mut c = Client::try_connect(gw.addr, "/ws", offer)
            .await
            .expect("upgrade");
        c.subscribe(&format!("idle.{i}")).await;
        clients.push(c);
    }
    // Let the allocator settle: RSS is read after every reply has arrived.
    let after = rss_kib(gw.pid());
    let per_socket = (after.saturating_sub(before)) as f64 * 1024.0 / SOCKETS as f64;
    println!("idle (compression {compressed}): rss before {before} KiB, after {after} KiB with {SOCKETS} subscribed sockets: {per_socket:.0} bytes per socket");
    assert!(
        per_socket < 16.0 * 1024.0,
        "{per_socket} bytes per idle socket"
    );
    drop(clients);
}
