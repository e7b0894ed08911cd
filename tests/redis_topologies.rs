//! Redis beyond one plain server (docs/redis.md): Sentinel failover, TLS
//! (`rediss://`) and ACL users, against real servers on free loopback ports.
//!
//! Sentinel: one master, one replica, three sentinels (`down-after-
//! milliseconds` 1000); 100 clients subscribed through the gateway, which
//! publishes through the sentinel-resolved master while `SENTINEL FAILOVER`
//! runs, then while the new master is `kill -9`ed. Each time every client
//! gets `interrupted` then `resumed`, deliveries continue from the new
//! master, `/readyz` went 503 and back, and the new master holds exactly the
//! registry's channels. TLS: a test CA made with `openssl`, `redis-server
//! --port 0 --tls-port`, client certificates required, an ACL user; a wrong
//! CA keeps the node unready with an error naming `WSGATE_REDIS_CA_FILE`,
//! and a missing one stops the start. Sentinel over TLS with passwords on
//! the sentinel and the master, and client-side shards over TLS with an ACL
//! user on each server.
//!
//! Nothing sleeps to synchronise: waits are on frames, `/readyz` (the
//! sampling [`ReadyWatch`]), `SENTINEL` and `PUBSUB` answers, each bounded.
//! Measured failover times are printed (`--nocapture`).

#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pki::Pki;
use common::*;
use serde_json::json;

/// Clients subscribed through the gateway during the failovers.
const CLIENTS: usize = 100;
/// Exact channels besides `news`: client `i` also holds `c<i % SIDE>`.
const SIDE: usize = 10;
/// Bound on one failover, from the fault to every client resumed.
const FAILOVER_BOUND: Duration = Duration::from_secs(30);

/// What one client saw across one fault.
struct Seen {
    interrupted: Instant,
    resumed: Instant,
    delivered: Instant,
}

/// Reads `client`'s frames until `interrupted` (naming both its channels),
/// `resumed` (the same), and a delivery of `news` after that.
async fn across_fault(mut client: Client, side: String) -> (Client, Seen) {
    let deadline = Instant::now() + FAILOVER_BOUND;
    let mut interrupted = None;
    let mut resumed = None;
    loop {
        assert!(
            Instant::now() < deadline,
            "client {side}: no recovery within {FAILOVER_BOUND:?}"
        );
        let v = client.recv().await;
        let now = Instant::now();
        match v["action"].as_str() {
            Some("message") => {
                if let (Some(i), Some(r)) = (interrupted, resumed) {
                    return (
                        client,
                        Seen {
                            interrupted: i,
                            resumed: r,
                            delivered: now,
                        },
                    );
                }
            }
            Some("interrupted") if interrupted.is_none() => {
                assert_eq!(
                    sorted_topics(v),
                    notice("interrupted", Some(REASON_LOST), &[], &["news", &side])
                );
                interrupted = Some(now);
            }
            Some("resumed") if interrupted.is_some() && resumed.is_none() => {
                assert_eq!(
                    sorted_topics(v),
                    notice("resumed", None, &[], &["news", &side])
                );
                resumed = Some(now);
            }
            _ => panic!("client {side}: unexpected frame {v}"),
        }
    }
}

/// Publishes 1, 2, 3... to `news` through the gateway every 10 ms until
/// stopped; failures (the outage) are counted, not fatal.
fn publisher(
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let body = json!({"channel": "news", "payload": n}).to_string();
            if http(addr, "POST", "/publish", Some(&body)).await.0 != 200 {
                failed.fetch_add(1, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        n
    })
}

/// Which of `nodes` the sentinels call master now (all three agreeing).
async fn master_of<'a>(sentinels: &[Sentinel], nodes: &'a [Redis]) -> &'a Redis {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut ports = BTreeSet::new();
        for s in sentinels {
            ports.insert(s.master_port().await);
        }
        if let (1, Some(Some(port))) = (ports.len(), ports.first()) {
            if let Some(r) = nodes.iter().find(|r| r.port == *port) {
                return r;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the sentinels do not agree: {ports:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The node's exact channels on `redis` are exactly `news` and `c0..c9`.
async fn holds_the_registry(redis: &Redis) -> bool {
    let want: BTreeSet<String> = std::iter::once("news".to_owned())
        .chain((0..SIDE).map(|i| format!("c{i}")))
        .collect();
    // The sentinels' own `__sentinel__:hello` is theirs, not the node's.
    let held: BTreeSet<String> = redis
        .channels()
        .await
        .into_iter()
        .filter(|c| !c.starts_with("__sentinel__:"))
        .collect();
    held == want
}

/// One fault: starts every client's reader, runs `fault`, and checks and
/// measures the recovery. Returns the clients for the next round.
async fn survive(
    label: &str,
    gw: &Gateway,
    watch: &ReadyWatch,
    clients: Vec<Client>,
    fault: impl std::future::Future<Output = ()>,
) -> Vec<Client> {
    let readers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| tokio::spawn(across_fault(c, format!("c{}", i % SIDE))))
        .collect();
    let t0 = Instant::now();
    fault.await;
    let unready = watch.wait_for(503, t0, FAILOVER_BOUND).await;
    let ready = watch.wait_for(200, unready, FAILOVER_BOUND).await;
    let mut clients = Vec::with_capacity(CLIENTS);
    let (mut last_resumed, mut first_delivery, mut last_delivery) = (t0, None::<Instant>, t0);
    let mut first_interrupted = None::<Instant>;
    for r in readers {
        let (c, seen) = r.await.expect("reader");
        first_interrupted =
            Some(first_interrupted.map_or(seen.interrupted, |f| f.min(seen.interrupted)));
        last_resumed = last_resumed.max(seen.resumed);
        first_delivery = Some(first_delivery.map_or(seen.delivered, |f| f.min(seen.delivered)));
        last_delivery = last_delivery.max(seen.delivered);
        clients.push(c);
    }
    let ms = |at: Instant| at.saturating_duration_since(t0).as_millis();
    println!(
        "{label}: /readyz 503 at +{}ms, 200 at +{}ms; first `interrupted` +{}ms; every client \
         `resumed` by +{}ms; first delivery from the new master +{}ms, at every client by +{}ms \
         (transitions {:?})",
        ms(unready),
        ms(ready),
        first_interrupted.map_or(0, ms),
        ms(last_resumed),
        first_delivery.map_or(0, ms),
        ms(last_delivery),
        watch.describe(t0),
    );
    let _ = gw;
    clients
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sentinel_failover_and_master_kill_resubscribe_everything() {
    let mut nodes = vec![Redis::start().await];
    let master_port = nodes[0].port.to_string();
    nodes.push(Redis::start_with(&["--replicaof", "127.0.0.1", &master_port]).await);
    wait_until("the replica in sync", WAIT, || async {
        match nodes[1].cmd(&["INFO", "replication"]).await {
            redis::Value::BulkString(b) => {
                String::from_utf8_lossy(&b).contains("master_link_status:up")
            }
            redis::Value::VerbatimString { text, .. } => text.contains("master_link_status:up"),
            _ => false,
        }
    })
    .await;
    let mut sentinels = Vec::new();
    for _ in 0..3 {
        sentinels.push(Sentinel::start(nodes[0].port).await);
    }
    wait_until(
        "every sentinel knows the replica and the others",
        Duration::from_secs(20),
        || async {
            for s in &sentinels {
                if s.known().await != (1, 2) {
                    return false;
                }
            }
            true
        },
    )
    .await;

    let hosts: Vec<String> = sentinels
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.port))
        .collect();
    let mut config = test_config(Some(format!(
        "redis+sentinel://{}/mymaster",
        hosts.join(",")
    )));
    config.redis_probe_interval = Duration::from_millis(200);
    config.redis_probe_timeout = Duration::from_millis(1000);
    config.redis_backoff_max = Duration::from_millis(200);
    let gw = Gateway::start(config).await;
    let mut clients = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        let mut c = gw.client().await;
        c.subscribe("news").await;
        c.subscribe(&format!("c{}", i % SIDE)).await;
        clients.push(c);
    }
    let first = master_of(&sentinels, &nodes).await;
    assert_eq!(first.port, nodes[0].port);
    wait_until("the master holds the registry", WAIT, || {
        holds_the_registry(first)
    })
    .await;

    let watch = ReadyWatch::start(gw.addr);
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let publishing = publisher(gw.addr, stop.clone(), failed.clone());

    // 1. A planned failover.
    let clients = survive("SENTINEL FAILOVER", &gw, &watch, clients, async {
        let ok = sentinels[0]
            .cmd(&["SENTINEL", "FAILOVER", "mymaster"])
            .await;
        assert_eq!(ok, Some(redis::Value::Okay));
    })
    .await;
    let second = master_of(&sentinels, &nodes).await;
    assert_eq!(second.port, nodes[1].port, "the replica was promoted");
    wait_until("the new master holds exactly the registry", WAIT, || {
        holds_the_registry(second)
    })
    .await;
    assert_eq!(
        second.numsub("news").await,
        1,
        "one node connection holds news"
    );

    // 2. The new master dies (kill -9): the sentinels promote the old one.
    let killed = nodes
        .iter()
        .position(|r| r.port == second.port)
        .expect("index");
    let pid = nodes[killed].pid().expect("running");
    let clients = survive("kill -9 of the new master", &gw, &watch, clients, async {
        signal(pid, "KILL");
    })
    .await;
    nodes[killed].kill();
    let third = master_of(&sentinels, &nodes).await;
    assert_eq!(
        third.port,
        nodes[1 - killed].port,
        "the old master is master again"
    );
    wait_until("the third master holds exactly the registry", WAIT, || {
        holds_the_registry(third)
    })
    .await;
    assert_eq!(third.numsub("news").await, 1);

    stop.store(true, Ordering::Relaxed);
    let published = publishing.await.expect("publisher");
    println!(
        "published {published} through the gateway, {} refused during the outages",
        failed.load(Ordering::Relaxed)
    );
    drop(clients);
    gw.stop().await;
}

// ---------------------------------------------------------------- TLS

/// `redis-server --port 0 --tls-port <free>`, client certificates required.
struct TlsRedis {
    child: Child,
    port: u16,
    ca: String,
    cert: String,
    key: String,
    /// The server's `--requirepass`, if any.
    password: Option<String>,
}

/// A sentinel started by [`TlsRedis::sentinel`], killed on drop.
struct TlsSentinel {
    child: Child,
    port: u16,
}

impl Drop for TlsSentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TlsRedis {
    async fn start(pki: &Pki) -> TlsRedis {
        TlsRedis::start_with(pki, &[]).await
    }

    /// As [`TlsRedis::start`], with more `redis-server` arguments (e.g.
    /// `--requirepass`); PING is then sent with `AUTH` when one is given.
    async fn start_with(pki: &Pki, extra: &[&str]) -> TlsRedis {
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args([
                "--tls-cert-file",
                &pki.path("server.crt"),
                "--tls-key-file",
                &pki.path("server.key"),
            ])
            .args([
                "--tls-ca-cert-file",
                &pki.path("ca.crt"),
                "--tls-auth-clients",
                "yes",
            ])
            .args(["--save", "", "--appendonly", "no"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        let password = extra
            .iter()
            .position(|a| *a == "--requirepass")
            .and_then(|i| extra.get(i + 1))
            .map(|p| p.to_string());
        let redis = TlsRedis {
            child,
            port,
            ca: pki.path("ca.crt"),
            cert: pki.path("client.crt"),
            key: pki.path("client.key"),
            password,
        };
        wait_until("TLS redis answers PING", WAIT, || async {
            redis.cli(&["PING"]).trim() == "PONG"
        })
        .await;
        redis
    }

    /// A sentinel over TLS only (`port 0`, `tls-port`), with its own
    /// `requirepass`, watching this server as `mymaster` over TLS with the
    /// server's password (`sentinel auth-pass`).
    fn sentinel(&self, pki: &Pki, own_password: &str) -> TlsSentinel {
        let port = free_port();
        let dir = pki.dir.join(format!("sentinel-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut conf = format!(
            "port 0\ntls-port {port}\nbind 127.0.0.1\ndir {}\n\
             tls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
             tls-auth-clients yes\ntls-replication yes\nrequirepass {own_password}\n\
             sentinel monitor mymaster 127.0.0.1 {} 1\n\
             sentinel down-after-milliseconds mymaster 1000\n",
            dir.display(),
            pki.path("server.crt"),
            pki.path("server.key"),
            pki.path("ca.crt"),
            self.port,
        );
        if let Some(pw) = &self.password {
            conf.push_str(&format!("sentinel auth-pass mymaster {pw}\n"));
        }
        let file = dir.join("sentinel.conf");
        std::fs::write(&file, conf).unwrap();
        let child = Command::new("redis-server")
            .arg(&file)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server --sentinel");
        TlsSentinel { child, port }
    }

    /// `redis-cli --tls` as the default user, output as text.
    fn cli(&self, args: &[&str]) -> String {
        self.cli_at(self.port, self.password.as_deref(), args)
    }

    /// `redis-cli --tls` against `port` (this server or its sentinel).
    fn cli_at(&self, port: u16, password: Option<&str>, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        cmd.args([
            "--tls", "--cacert", &self.ca, "--cert", &self.cert, "--key", &self.key,
        ])
        .args(["-h", "127.0.0.1", "-p", &port.to_string()]);
        if let Some(pw) = password {
            cmd.args(["--no-auth-warning", "-a", pw]);
        }
        let out = cmd.args(args).output().expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tls_config(url: String, pki: &Pki, ca: &str) -> wsgate::Config {
    let mut config = test_config(Some(url));
    config.redis_security = wsgate::broker::redis::Security {
        sentinel_password: None,
        ca_file: Some(Path::new(&pki.path(ca)).to_owned()),
        cert_file: Some(pki.path("client.crt").into()),
        key_file: Some(pki.path("client.key").into()),
    };
    config
}

/// `rediss://` with a client certificate and an ACL user: subscribe,
/// publish through the gateway, every connection of the node logged in as
/// that user over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificate_and_acl_user() {
    let pki = Pki::make();
    let redis = TlsRedis::start(&pki).await;
    assert_eq!(
        redis
            .cli(&["ACL", "SETUSER", "app", "on", ">s3cret", "~*", "&*", "+@all"])
            .trim(),
        "OK"
    );
    let url = format!("rediss://app:s3cret@127.0.0.1:{}", redis.port);
    let gw = Gateway::start(tls_config(url, &pki, "ca.crt")).await;
    let mut c = gw.client().await;
    c.subscribe("secure").await;
    let (status, body) = gw
        .publish(json!({"channel": "secure", "payload": "over tls"}))
        .await;
    assert_eq!((status, body), (200, json!({"receivers": 1})));
    assert_eq!(
        c.recv().await,
        json!({"action":"message","channel":"secure","payload":"over tls"})
    );
    // Every wsgate connection is the ACL user's.
    let list = redis.cli(&["CLIENT", "LIST"]);
    let ours: Vec<&str> = list
        .lines()
        .filter(|l| l.contains(" name=wsgate:"))
        .collect();
    assert!(ours.len() >= 3, "pub/sub, publish, numpat at least: {list}");
    for line in &ours {
        assert!(line.contains(" user=app "), "{line}");
    }
    gw.stop().await;
}

/// Starts the real binary on `url` with `env`, checks that it answers
/// `/readyz` but never with 200 for 2 s (it retries every 50 ms..1 s
/// meanwhile), kills it and returns its log (stdout).
async fn never_ready_log(url: &str, env: &[(&str, String)]) -> String {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
    cmd.env("WSGATE_LISTEN", &listen)
        .env("WSGATE_LOG", "warn")
        .env("WSGATE_REDIS_URL", url);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let node = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("wsgate");
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    wait_until("the node answers /readyz", WAIT, || async {
        http(addr, "GET", "/readyz", None).await.0 != 0
    })
    .await;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert_eq!(http(addr, "GET", "/readyz", None).await.0, 503);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal(node.id(), "KILL");
    let out = node.wait_with_output().expect("output");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A CA that did not sign Redis's certificate: the node stays unready and
/// says why; no CA file at all: the node refuses to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_ca_is_a_clear_start_up_error() {
    let pki = Pki::make();
    let redis = TlsRedis::start(&pki).await;
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let log = never_ready_log(
        &url,
        &[
            ("WSGATE_REDIS_CA_FILE", pki.path("wrong-ca.crt")),
            ("WSGATE_REDIS_CERT_FILE", pki.path("client.crt")),
            ("WSGATE_REDIS_KEY_FILE", pki.path("client.key")),
        ],
    )
    .await;
    assert!(
        log.contains("TLS handshake with 127.0.0.1")
            && log.contains("wrong-ca.crt")
            && log.contains("UnknownIssuer"),
        "{log}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .env("WSGATE_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("WSGATE_REDIS_URL", &url)
        .output()
        .expect("wsgate");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("WSGATE_REDIS_CA_FILE"), "{stderr}");
}

/// `rediss+sentinel://` with passwords on both sides: the sentinel speaks
/// TLS only and has its own `requirepass` (`WSGATE_REDIS_SENTINEL_PASSWORD`),
/// the master speaks TLS only and has another (the URL's). With both right
/// the node resolves the master through the sentinel and delivers; with the
/// sentinel's password wrong it stays unready and says the sentinel refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_over_tls_with_sentinel_and_master_passwords() {
    let pki = Pki::make();
    let master = TlsRedis::start_with(&pki, &["--requirepass", "master-pw"]).await;
    let sentinel = master.sentinel(&pki, "sentinel-pw");
    wait_until("the TLS sentinel names the master", WAIT, || async {
        let out = master.cli_at(
            sentinel.port,
            Some("sentinel-pw"),
            &["SENTINEL", "get-master-addr-by-name", "mymaster"],
        );
        out.lines().nth(1).map(str::trim) == Some(master.port.to_string().as_str())
    })
    .await;
    let url = format!(
        "rediss+sentinel://:master-pw@127.0.0.1:{}/mymaster",
        sentinel.port
    );

    let mut config = tls_config(url.clone(), &pki, "ca.crt");
    config.redis_security.sentinel_password = Some("sentinel-pw".into());
    let gw = Gateway::start(config).await;
    let mut c = gw.client().await;
    c.subscribe("guarded").await;
    let (status, body) = gw
        .publish(json!({"channel": "guarded", "payload": "via sentinel"}))
        .await;
    assert_eq!((status, body), (200, json!({"receivers": 1})));
    assert_eq!(
        c.recv().await,
        json!({"action":"message","channel":"guarded","payload":"via sentinel"})
    );
    gw.stop().await;

    // The sentinel's password wrong: never ready, and the log says why.
    let log = never_ready_log(
        &url,
        &[
            ("WSGATE_REDIS_SENTINEL_PASSWORD", "not-it".into()),
            ("WSGATE_REDIS_CA_FILE", pki.path("ca.crt")),
            ("WSGATE_REDIS_CERT_FILE", pki.path("client.crt")),
            ("WSGATE_REDIS_KEY_FILE", pki.path("client.key")),
        ],
    )
    .await;
    assert!(log.contains("AUTH refused"), "{log}");
}

/// Client-side sharding over two TLS servers with an ACL user on each:
/// `rediss://` URLs in `WSGATE_REDIS_SHARDS`; a channel owned by each
/// server is subscribed and published through the gateway, and each server
/// sees only the ACL user's connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_shards_with_acl_users() {
    let pki = Pki::make();
    let servers = [TlsRedis::start(&pki).await, TlsRedis::start(&pki).await];
    for s in &servers {
        assert_eq!(
            s.cli(&["ACL", "SETUSER", "app", "on", ">s3cret", "~*", "&*", "+@all"])
                .trim(),
            "OK"
        );
    }
    let urls: Vec<String> = servers
        .iter()
        .map(|s| format!("rediss://app:s3cret@127.0.0.1:{}", s.port))
        .collect();
    // As the config's parser does: the URL is the first shard (node-wide records).
    let mut config = tls_config(urls[0].clone(), &pki, "ca.crt");
    config.redis_shards = urls;
    // One channel owned by each server.
    let owned_by = |shard: usize| {
        (0..)
            .map(|i| format!("tls.{i}"))
            .find(|c| wsgate::broker::redis::shards::shard_for(c.as_bytes(), 2) == shard)
            .unwrap()
    };
    let channels = [owned_by(0), owned_by(1)];
    let gw = Gateway::start(config).await;
    let mut c = gw.client().await;
    for ch in &channels {
        c.subscribe(ch).await;
    }
    for (i, ch) in channels.iter().enumerate() {
        let numsub = |s: &TlsRedis| s.cli(&["PUBSUB", "NUMSUB", ch]);
        assert_eq!(
            numsub(&servers[i]),
            format!("{ch}\n1\n"),
            "the owner holds {ch}"
        );
        assert_eq!(
            numsub(&servers[1 - i]),
            format!("{ch}\n0\n"),
            "the other does not"
        );
        let (status, body) = gw.publish(json!({"channel": ch, "payload": i})).await;
        assert_eq!((status, body), (200, json!({"receivers": 1})));
        assert_eq!(
            c.recv().await,
            json!({"action":"message","channel":ch,"payload":i})
        );
    }
    for s in &servers {
        let list = s.cli(&["CLIENT", "LIST"]);
        let ours: Vec<&str> = list
            .lines()
            .filter(|l| l.contains(" name=wsgate:"))
            .collect();
        assert!(!ours.is_empty(), "{list}");
        for line in &ours {
            assert!(line.contains(" user=app "), "{line}");
        }
    }
    gw.stop().await;
}
