//! The cluster behind a load balancer, on this machine: one `redis-server`,
//! three `wsgate` processes on loopback ports, HAProxy in front of them with
//! `deploy/haproxy.cfg` (the file docker-compose.yml mounts), and 200
//! [`wsgate::client`] clients connecting through HAProxy, each subscribed to
//! one pattern.
//!
//! It checks, in order: every node gets clients; one `PUBLISH` reaches all 200
//! (and Redis counts one subscription per node); `kill -9` of a node moves its
//! clients through HAProxy to the others, which resubscribe and receive the
//! next publish; a rolling restart (SIGTERM, wait for the exit, start again on
//! the same port, wait for `/readyz` and for HAProxy to see it up) ends with
//! all 200 subscribed and receiving. A steady publisher (10 messages a second)
//! runs through the kill and the rolling restart; every message some client
//! never got is counted, and each one must fall inside that client's reconnect
//! gap (Redis pub/sub is at-most-once), never on a live connection.
//!
//! Ignored by default because it needs `haproxy` on PATH;
//! `deploy/cluster-test.sh` installs it and runs
//! `cargo test --test cluster -- --ignored --nocapture`, which prints the
//! observations (clients per node, reconnect time after the kill, losses).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, http, signal, wait_until, GatewayProcess, Redis};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use wsgate::client::{self, ClientConfig, Event, Subscription};

const CLIENTS: usize = 200;
const NODES: usize = 3;
const PATTERN: &str = "cluster.*";
const CHECK_CHANNEL: &str = "cluster.check";
const STEADY_CHANNEL: &str = "cluster.steady";
const STEADY_EVERY: Duration = Duration::from_millis(100);
/// Short drain so the rolling restart takes seconds, not minutes.
const DRAIN_WINDOW_MS: u64 = 2000;
const SHUTDOWN_TIMEOUT_MS: u64 = 2000;
/// Bound on each wait for the cluster to settle.
const SETTLE: Duration = Duration::from_secs(30);
/// Bound on the whole test.
const WHOLE_TEST: Duration = Duration::from_secs(240);

// ---------------------------------------------------------------- nodes

/// One gateway process on a fixed loopback port, so it can come back there.
struct Node {
    name: &'static str,
    addr: SocketAddr,
    process: Option<GatewayProcess>,
}

impl Node {
    async fn start(&mut self, redis_url: &str) {
        let env = [
            ("WSGATE_REDIS_URL", redis_url.to_owned()),
            ("WSGATE_DRAIN_WINDOW_MS", DRAIN_WINDOW_MS.to_string()),
            (
                "WSGATE_SHUTDOWN_TIMEOUT_MS",
                SHUTDOWN_TIMEOUT_MS.to_string(),
            ),
        ];
        self.process = Some(GatewayProcess::spawn_at(self.addr, &env).await);
    }

    /// SIGKILL: no drain, no close frames; the kernel resets its sockets.
    fn kill9(&mut self) {
        if let Some(mut p) = self.process.take() {
            signal(p.pid(), "KILL");
            let _ = p.child.wait();
        }
    }

    /// SIGTERM, and the exit status once the drain is over.
    async fn terminate(&mut self) -> std::process::ExitStatus {
        let mut p = self.process.take().expect("node is running");
        p.terminate().await
    }

    async fn connections(&self) -> Option<i64> {
        metric(self.addr, "wsgate_connections").await
    }
}

/// A metric without labels from a node's `/metrics`; `None` if it is down.
async fn metric(addr: SocketAddr, name: &str) -> Option<i64> {
    let (status, body) = http(addr, "GET", "/metrics", None).await;
    if status != 200 {
        return None;
    }
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as i64)
}

/// Waits (bounded by `SETTLE`) until the nodes' connection counts add up to
/// every client.
async fn wait_all_connected(nodes: &[Node], what: &str) {
    wait_until(what, SETTLE, || async move {
        clients_per_node(nodes).await.iter().flatten().sum::<i64>() == CLIENTS as i64
    })
    .await;
}

async fn clients_per_node(nodes: &[Node]) -> Vec<Option<i64>> {
    let mut out = Vec::new();
    for n in nodes {
        out.push(if n.process.is_some() {
            n.connections().await
        } else {
            None
        });
    }
    out
}

fn show(nodes: &[Node], counts: &[Option<i64>]) -> String {
    nodes
        .iter()
        .zip(counts)
        .map(|(n, c)| match c {
            Some(c) => format!("{} {c}", n.name),
            None => format!("{} down", n.name),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------- haproxy

/// HAProxy with the shared `deploy/haproxy.cfg`, configured by environment.
struct HaProxy {
    child: Child,
    addr: SocketAddr,
    stats: SocketAddr,
    log: PathBuf,
}

impl HaProxy {
    async fn start(nodes: &[Node]) -> HaProxy {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let stats: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/haproxy.cfg");
        let log = std::env::temp_dir().join(format!("wsgate-cluster-haproxy-{}.log", addr.port()));
        let out = std::fs::File::create(&log).expect("haproxy log file");
        let err = out.try_clone().expect("haproxy log file");
        let mut cmd = Command::new("haproxy");
        cmd.args(["-W", "-db", "-f", config])
            .env("LB_BIND", addr.to_string())
            .env("LB_STATS_BIND", stats.to_string())
            .env_remove("LB_RESOLVE")
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        for (i, n) in nodes.iter().enumerate() {
            cmd.env(format!("LB_NODE{}", i + 1), n.addr.to_string());
        }
        let child = cmd
            .spawn()
            .expect("haproxy must be on PATH: run deploy/cluster-test.sh, which installs it");
        let lb = HaProxy {
            child,
            addr,
            stats,
            log,
        };
        for n in nodes {
            lb.wait_status(n.name, "UP").await;
        }
        lb
    }

    /// Each server's status (`UP`, `DOWN`, `UP 1/2`, ...) from the stats CSV.
    async fn statuses(&self) -> Vec<(String, String)> {
        let csv = http10_get(self.stats, "/stats;csv").await;
        let mut lines = csv.lines();
        let Some(header) = lines.find(|l| l.starts_with("# pxname,")) else {
            return Vec::new();
        };
        let columns: Vec<&str> = header.trim_start_matches("# ").split(',').collect();
        let col = |name: &str| columns.iter().position(|c| *c == name).unwrap();
        let (px, sv, st) = (col("pxname"), col("svname"), col("status"));
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f.len() > st && f[px] == "wsgate" && f[sv].starts_with("node"))
            .map(|f| (f[sv].to_owned(), f[st].to_owned()))
            .collect()
    }

    async fn wait_status(&self, server: &str, status: &str) {
        let what = format!("haproxy to see {server} {status}");
        wait_until(&what, SETTLE, || async {
            self.statuses()
                .await
                .iter()
                .any(|(s, st)| s == server && st == status)
        })
        .await;
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Kept when the test fails: it has every request and state change.
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// GET over HTTP/1.0: the body comes unchunked, delimited by the close.
async fn http10_get(addr: SocketAddr, path: &str) -> String {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.ok()?;
        Some(String::from_utf8_lossy(&raw).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
}

// ---------------------------------------------------------------- clients

/// What one client saw, in order.
#[derive(Debug, Clone, Copy)]
enum Seen {
    Up(Instant),
    Down(Instant),
    Steady(u64),
}

#[derive(Debug, Default, Clone)]
struct ClientView {
    subscribed: bool,
    log: Vec<Seen>,
    checks: HashSet<u64>,
}

impl ClientView {
    fn last_up(&self) -> Option<Instant> {
        self.log.iter().rev().find_map(|s| match s {
            Seen::Up(t) => Some(*t),
            _ => None,
        })
    }

    fn went_down_after(&self, t: Instant) -> bool {
        self.log
            .iter()
            .any(|s| matches!(s, Seen::Down(d) if *d >= t))
    }

    fn steady(&self) -> HashSet<u64> {
        self.log
            .iter()
            .filter_map(|s| match s {
                Seen::Steady(n) => Some(*n),
                _ => None,
            })
            .collect()
    }

    /// Whether missing steady message `seq` is explained by a reconnect: a
    /// `Down` between the steady messages received just before and just
    /// after it (or after the last one, if none came after).
    fn missed_in_gap(&self, seq: u64) -> bool {
        let before = self
            .log
            .iter()
            .rposition(|s| matches!(s, Seen::Steady(n) if *n < seq))
            .map_or(0, |i| i + 1);
        let after = self
            .log
            .iter()
            .position(|s| matches!(s, Seen::Steady(n) if *n > seq))
            .unwrap_or(self.log.len());
        before <= after
            && self.log[before..after]
                .iter()
                .any(|s| matches!(s, Seen::Down(_)))
    }
}

type Views = watch::Sender<Vec<ClientView>>;

/// `{"seq":N}` out of a delivery's raw text, with its channel.
fn parse_delivery(text: &str) -> Option<(String, u64)> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    if v["action"] != "message" {
        return None;
    }
    Some((
        v["channel"].as_str()?.to_owned(),
        v["payload"]["seq"].as_u64()?,
    ))
}

/// Applies one client's events to the shared views until its run ends.
async fn watch_client(i: usize, mut rx: mpsc::Receiver<Event>, views: Arc<Views>) {
    while let Some(event) = rx.recv().await {
        views.send_modify(|v| {
            let view = &mut v[i];
            match event {
                Event::Subscribed { .. } => {
                    view.subscribed = true;
                    view.log.push(Seen::Up(Instant::now()));
                }
                Event::Disconnected { .. } => {
                    view.subscribed = false;
                    view.log.push(Seen::Down(Instant::now()));
                }
                Event::Text(t) => match parse_delivery(&t) {
                    Some((ch, seq)) if ch == STEADY_CHANNEL => view.log.push(Seen::Steady(seq)),
                    Some((ch, seq)) if ch == CHECK_CHANNEL => {
                        view.checks.insert(seq);
                    }
                    _ => {}
                },
            }
        });
    }
}

async fn wait_views(views: &Views, what: &str, cond: impl Fn(&[ClientView]) -> bool) {
    let mut rx = views.subscribe();
    let ok = tokio::time::timeout(SETTLE, rx.wait_for(|v| cond(v))).await;
    if ok.is_err() {
        let v = views.borrow();
        let up = v.iter().filter(|c| c.subscribed).count();
        panic!("timed out after {SETTLE:?} waiting for {what} ({up}/{CLIENTS} subscribed)");
    }
}

fn all_subscribed(v: &[ClientView]) -> bool {
    v.iter().all(|c| c.subscribed)
}

// ---------------------------------------------------------------- publishing

/// Sequence numbers shared by check and steady messages, so each is unique.
static SEQ: AtomicU64 = AtomicU64::new(1);

async fn publish(redis: &Redis, channel: &str) -> (u64, i64) {
    let seq = SEQ.fetch_add(1, Ordering::SeqCst);
    let receivers = redis
        .publish(channel, format!("{{\"seq\":{seq}}}").as_bytes())
        .await;
    (seq, receivers)
}

/// Publishes one check message and waits until every client has it.
async fn check_all_receive(redis: &Redis, views: &Views, expect_receivers: i64, step: &str) {
    let (seq, receivers) = publish(redis, CHECK_CHANNEL).await;
    assert_eq!(
        receivers, expect_receivers,
        "{step}: PUBLISH should reach one subscription per node with clients"
    );
    wait_views(
        views,
        &format!("{step}: all {CLIENTS} receive check {seq}"),
        |v| v.iter().all(|c| c.checks.contains(&seq)),
    )
    .await;
    println!("  {step}: PUBLISH {CHECK_CHANNEL} (seq {seq}) -> receivers {receivers}, delivered to {CLIENTS}/{CLIENTS}");
}

/// Publishes to the steady channel every [`STEADY_EVERY`] until stopped;
/// returns the sequence numbers published, in order.
async fn steady_publisher(url: String, mut stop: watch::Receiver<bool>) -> Vec<u64> {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut published = Vec::new();
    let mut tick = tokio::time::interval(STEADY_EVERY);
    // Bounded: at most the whole test's length of ticks.
    for _ in 0..(WHOLE_TEST.as_millis() / STEADY_EVERY.as_millis()) {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tick.tick() => {}
        }
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        let _: i64 = redis::cmd("PUBLISH")
            .arg(STEADY_CHANNEL)
            .arg(format!("{{\"seq\":{seq}}}"))
            .query_async(&mut conn)
            .await
            .unwrap();
        published.push(seq);
    }
    published
}

/// Losses over `seqs`: (client, message) pairs never delivered, how many of
/// them fell outside the client's reconnect gaps, messages missed by at
/// least one client, clients that missed any.
fn losses(views: &[ClientView], seqs: &[u64]) -> (usize, usize, usize, usize) {
    let mut pairs = 0;
    let mut unexplained = 0;
    let mut messages = HashSet::new();
    let mut clients = 0;
    for view in views {
        let got = view.steady();
        let mut missed_any = false;
        for seq in seqs {
            if !got.contains(seq) {
                pairs += 1;
                missed_any = true;
                messages.insert(*seq);
                if !view.missed_in_gap(*seq) {
                    unexplained += 1;
                }
            }
        }
        clients += usize::from(missed_any);
    }
    (pairs, unexplained, messages.len(), clients)
}

// ---------------------------------------------------------------- the test

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs haproxy; run by .ci/run via deploy/cluster-test.sh"]
async fn cluster_behind_haproxy_survives_kill_and_rolling_restart() {
    tokio::time::timeout(WHOLE_TEST, scenario())
        .await
        .expect("the cluster test took too long");
}

async fn scenario() {
    let started = Instant::now();
    let redis = Redis::start().await;
    let mut nodes: Vec<Node> = ["node1", "node2", "node3"]
        .into_iter()
        .map(|name| Node {
            name,
            addr: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            process: None,
        })
        .collect();
    for n in &mut nodes {
        n.start(&redis.url()).await;
    }
    let lb = HaProxy::start(&nodes).await;
    println!(
        "cluster: redis :{}, nodes {}, haproxy {} (stats {}, log {})",
        redis.port,
        nodes
            .iter()
            .map(|n| format!("{} {}", n.name, n.addr))
            .collect::<Vec<_>>()
            .join(", "),
        lb.addr,
        lb.stats,
        lb.log.display()
    );

    // 200 clients through HAProxy, each subscribed to one pattern.
    let views = Arc::new(watch::Sender::new(vec![ClientView::default(); CLIENTS]));
    let (stop_clients, stop_rx) = watch::channel(false);
    let mut runs = Vec::new();
    let t_connect = Instant::now();
    for i in 0..CLIENTS {
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(watch_client(i, rx, views.clone()));
        let mut config = ClientConfig::new(
            format!("ws://{}/ws", lb.addr),
            vec![Subscription::Pattern(PATTERN.into())],
        );
        config.give_up_after = Some(50);
        let mut stop = stop_rx.clone();
        runs.push(tokio::spawn(client::run(config, tx, async move {
            let _ = stop.wait_for(|s| *s).await;
        })));
    }
    wait_views(&views, "all clients subscribed", all_subscribed).await;
    println!(
        "connect: {CLIENTS} clients subscribed through haproxy in {:?}",
        t_connect.elapsed()
    );
    wait_all_connected(&nodes, "per-node connections to add up to 200").await;
    let counts = clients_per_node(&nodes).await;
    println!("clients per node at start: {}", show(&nodes, &counts));
    for (n, c) in nodes.iter().zip(&counts) {
        assert!(c.unwrap_or(0) > 0, "{} got no clients: {counts:?}", n.name);
    }
    check_all_receive(&redis, &views, NODES as i64, "start").await;

    // Steady traffic from here to the end of the rolling restart.
    let (stop_steady, steady_rx) = watch::channel(false);
    let steady = tokio::spawn(steady_publisher(redis.url(), steady_rx));

    // kill -9 one node: its clients come back through HAProxy elsewhere.
    let victim = 1;
    let victims = counts[victim].unwrap_or(0) as usize;
    let first_steady_of_kill = SEQ.load(Ordering::SeqCst);
    let t_kill = Instant::now();
    nodes[victim].kill9();
    wait_views(
        &views,
        "the killed node's clients to reconnect and resubscribe",
        |v| v.iter().filter(|c| c.went_down_after(t_kill)).count() >= victims && all_subscribed(v),
    )
    .await;
    let (moved, reconnect) = {
        let v = views.borrow();
        let moved: Vec<&ClientView> = v.iter().filter(|c| c.went_down_after(t_kill)).collect();
        let reconnect = moved
            .iter()
            .filter_map(|c| c.last_up())
            .map(|t| t - t_kill)
            .max()
            .unwrap_or_default();
        (moved.len(), reconnect)
    };
    assert_eq!(
        moved, victims,
        "exactly the killed node's clients reconnect"
    );
    println!(
        "kill -9 {}: its {victims} clients reconnected through haproxy and resubscribed; \
         all {CLIENTS} subscribed {reconnect:?} after the kill",
        nodes[victim].name
    );
    wait_all_connected(&nodes, "survivors to hold all 200 clients").await;
    println!(
        "clients per node after the kill: {}",
        show(&nodes, &clients_per_node(&nodes).await)
    );
    check_all_receive(&redis, &views, (NODES - 1) as i64, "after kill -9").await;
    let last_steady_of_kill = SEQ.load(Ordering::SeqCst);

    // Bring the killed node back on its port.
    nodes[victim].start(&redis.url()).await;
    lb.wait_status(nodes[victim].name, "UP").await;
    println!(
        "{} restarted on {}, haproxy sees it UP",
        nodes[victim].name, nodes[victim].addr
    );

    // Rolling restart: SIGTERM, exit, restart, ready, UP; next node.
    let first_steady_of_rolling = SEQ.load(Ordering::SeqCst);
    let mut drains = Vec::new();
    for i in 0..NODES {
        let name = nodes[i].name;
        let had = nodes[i].connections().await.unwrap_or(0);
        let t_term = Instant::now();
        let status = nodes[i].terminate().await;
        let drained_in = t_term.elapsed();
        assert!(
            status.success(),
            "{name} exited with {status} after SIGTERM"
        );
        wait_views(
            &views,
            &format!("{name}'s clients to resubscribe elsewhere"),
            |v| {
                v.iter().filter(|c| c.went_down_after(t_term)).count() >= had as usize
                    && all_subscribed(v)
            },
        )
        .await;
        let moved_in = {
            let v = views.borrow();
            v.iter()
                .filter(|c| c.went_down_after(t_term))
                .filter_map(|c| c.last_up())
                .map(|t| t - t_term)
                .max()
                .unwrap_or_default()
        };
        nodes[i].start(&redis.url()).await;
        lb.wait_status(name, "UP").await;
        wait_all_connected(&nodes, "per-node connections to add up to 200").await;
        let counts = clients_per_node(&nodes).await;
        println!(
            "rolling: {name} SIGTERM -> exit 0 in {drained_in:?}, its {had} clients resubscribed \
             within {moved_in:?}; restarted, UP in haproxy; clients per node: {}",
            show(&nodes, &counts)
        );
        drains.push((name, had, drained_in, moved_in));
        let with_clients = counts.iter().filter(|c| c.unwrap_or(0) > 0).count() as i64;
        check_all_receive(
            &redis,
            &views,
            with_clients,
            &format!("after restarting {name}"),
        )
        .await;
    }
    let _ = stop_steady.send(true);
    let published = tokio::time::timeout(SETTLE, steady)
        .await
        .expect("steady publisher stops")
        .expect("steady publisher");
    // One last check so every steady message had time to arrive everywhere.
    let counts = clients_per_node(&nodes).await;
    let with_clients = counts.iter().filter(|c| c.unwrap_or(0) > 0).count() as i64;
    check_all_receive(&redis, &views, with_clients, "end").await;
    println!("clients per node at the end: {}", show(&nodes, &counts));

    // Stop the clients; collect their counters.
    let _ = stop_clients.send(true);
    let (mut reconnects, mut failed) = (0, 0);
    for run in runs {
        let stats = tokio::time::timeout(SETTLE, run)
            .await
            .expect("client stops")
            .expect("client task")
            .expect("client ran without a fatal error");
        reconnects += stats.reconnects;
        failed += stats.failed_attempts;
    }

    let views = views.borrow();
    let kill_seqs: Vec<u64> = published
        .iter()
        .copied()
        .filter(|s| (first_steady_of_kill..last_steady_of_kill).contains(s))
        .collect();
    let rolling_seqs: Vec<u64> = published
        .iter()
        .copied()
        .filter(|s| *s >= first_steady_of_rolling)
        .collect();
    let (kp, ku, km, kc) = losses(&views, &kill_seqs);
    let (rp, ru, rm, rc) = losses(&views, &rolling_seqs);
    println!(
        "losses, kill -9 phase: {} steady messages x {CLIENTS} clients, {kp} deliveries lost \
         ({km} messages missed by {kc} clients), {ku} outside a reconnect gap",
        kill_seqs.len()
    );
    println!(
        "losses, rolling restart: {} steady messages x {CLIENTS} clients, {rp} deliveries lost \
         ({rm} messages missed by {rc} clients), {ru} outside a reconnect gap",
        rolling_seqs.len()
    );
    println!(
        "clients: {reconnects} reconnects, {failed} failed attempts (refused or 503 during a \
         switch); whole scenario {:?}",
        started.elapsed()
    );
    for (name, had, drained, moved) in &drains {
        println!(
            "  drain {name}: {had} clients, exit after {drained:?}, all back within {moved:?}"
        );
    }
    assert_eq!(
        ku, 0,
        "a message was lost on a live connection (kill phase)"
    );
    assert_eq!(
        ru, 0,
        "a message was lost on a live connection (rolling restart)"
    );
    assert!(views.iter().all(|c| c.subscribed));
}
