//! Shared test helpers: a real `redis-server` on a free loopback port, a
//! gateway (in-process or as the real binary), and a WebSocket client that
//! speaks the native protocol. Every helper is a guard that stops what it
//! started when dropped; every wait has a timeout.
#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wsgate::Config;

pub mod cluster;
pub mod node;
pub mod pki;
pub mod sse;

/// Default bound on any single wait in tests.
pub const WAIT: Duration = Duration::from_secs(10);

/// A port nobody listens on right now (the OS picked it).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Polls `check` every 20 ms until it returns true, or panics after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- redis

/// A private `redis-server` on a free loopback port, killed on drop.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    /// Arguments beyond the defaults (e.g. `--replicaof`), kept for restarts.
    extra: Vec<String>,
}

impl Redis {
    /// Starts redis-server and waits until it answers PING.
    pub async fn start() -> Redis {
        Redis::start_with(&[]).await
    }

    /// As [`Redis::start`], with the append-only file on and fsynced per
    /// write, so a restart (`kill` + `restart`) keeps every acknowledged write
    /// (the gap-healing fault test, tests/history_heal.rs).
    pub async fn start_aof() -> Redis {
        Redis::start_with(&["--appendonly", "yes", "--appendfsync", "always"]).await
    }

    /// Starts redis-server with `extra` arguments after the defaults (a
    /// replica: `--replicaof 127.0.0.1 <port>`), and waits for PING.
    pub async fn start_with(extra: &[&str]) -> Redis {
        let dir = std::env::temp_dir().join(format!(
            "wsgate-test-redis-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut redis = Redis {
            child: None,
            port: 0,
            dir,
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
        };
        for _ in 0..5 {
            redis.port = free_port();
            redis.spawn();
            if redis.wait_ready().await {
                return redis;
            }
            redis.kill();
        }
        panic!("redis-server did not start (is it installed? see README)");
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH (see README)");
        self.child = Some(child);
    }

    async fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(child) = &mut self.child {
                if let Ok(Some(_)) = child.try_wait() {
                    return false; // exited, e.g. port taken
                }
            }
            if self.try_cmd(&["PING"]).await.is_some() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port (after `kill`).
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn();
        assert!(
            self.wait_ready().await,
            "redis-server did not restart on port {}",
            self.port
        );
    }

    /// One command on a fresh connection; `None` if Redis is unreachable or
    /// answered an error.
    pub async fn try_cmd(&self, args: &[&str]) -> Option<redis::Value> {
        try_cmd_at(&self.url(), args).await
    }

    /// Runs one command on a fresh connection (as redis-cli would).
    pub async fn cmd(&self, args: &[&str]) -> redis::Value {
        self.try_cmd(args)
            .await
            .unwrap_or_else(|| panic!("redis command {args:?} failed"))
    }

    /// PUBLISH with arbitrary payload bytes; returns the receiver count.
    pub async fn publish(&self, channel: &str, payload: &[u8]) -> i64 {
        let client = redis::Client::open(self.url()).expect("client");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async(&mut conn)
            .await
            .expect("publish")
    }

    pub async fn int(&self, args: &[&str]) -> i64 {
        match self.cmd(args).await {
            redis::Value::Int(n) => n,
            other => panic!("{args:?}: expected an integer, got {other:?}"),
        }
    }

    /// `PUBSUB NUMPAT`: distinct patterns subscribed across all clients.
    pub async fn numpat(&self) -> i64 {
        self.int(&["PUBSUB", "NUMPAT"]).await
    }

    /// `PUBSUB NUMSUB channel`: subscribers of one exact channel.
    /// Waits (bounded by [`WAIT`]) until `PUBSUB NUMSUB channel` is `n`:
    /// the signal that a subscribe or an unsubscribe reached Redis.
    pub async fn wait_numsub(&self, channel: &str, n: i64) {
        wait_until(&format!("NUMSUB {channel} = {n}"), WAIT, || async move {
            self.numsub(channel).await == n
        })
        .await;
    }

    pub async fn numsub(&self, channel: &str) -> i64 {
        match self.cmd(&["PUBSUB", "NUMSUB", channel]).await {
            redis::Value::Array(v) => match v.get(1) {
                Some(redis::Value::Int(n)) => *n,
                other => panic!("NUMSUB reply {other:?}"),
            },
            other => panic!("NUMSUB reply {other:?}"),
        }
    }

    /// `PUBSUB CHANNELS`: every exact channel with at least one subscriber,
    /// except the services router's own ([`is_router_channel`]): what the
    /// gateways hold for their clients.
    pub async fn channels(&self) -> Vec<String> {
        match self.cmd(&["PUBSUB", "CHANNELS"]).await {
            redis::Value::Array(v) => v
                .into_iter()
                .map(|x| match x {
                    redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
                    other => panic!("{other:?}"),
                })
                .filter(|c| !is_router_channel(c))
                .collect(),
            other => panic!("CHANNELS reply {other:?}"),
        }
    }

    /// The `CLIENT LIST` reply as text, one line per connection.
    async fn client_list(&self) -> String {
        match self.cmd(&["CLIENT", "LIST"]).await {
            redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
            redis::Value::VerbatimString { text, .. } => text,
            other => panic!("CLIENT LIST reply {other:?}"),
        }
    }

    /// The `name=` of every named connection in `CLIENT LIST` (shared by
    /// tests/publish.rs, which checks the publish connection's name, and
    /// tests/handoff.rs, which waits for the handoff store's connection).
    pub async fn client_names(&self) -> Vec<String> {
        self.client_list()
            .await
            .lines()
            .filter_map(|l| l.split(' ').find_map(|kv| kv.strip_prefix("name=")))
            .map(str::to_owned)
            .collect()
    }

    /// Creates the Redis user `limited` (password `pw`), which may use only
    /// the channels matching `channels` (Redis channel ACL globs such as
    /// `ok.*`) and every key and command, and returns the URL a gateway
    /// connects to Redis with as that user. Shared by the tests of topics and
    /// publishes Redis itself refuses (tests/core.rs, tests/client_publish.rs).
    /// Redis checks PSUBSCRIBE against channel ACLs literally, so with `ok.*`
    /// even the pattern `ok.a*` is refused.
    pub async fn restricted_url(&self, channels: &[&str]) -> String {
        // A gateway's own channels (the services router's) are always
        // allowed, as docs/security.md tells operators to.
        let allowed: Vec<String> = channels
            .iter()
            .chain(&["wsgate:*", "/wsgate/services/*"])
            .map(|c| format!("&{c}"))
            .collect();
        let mut args = vec!["ACL", "SETUSER", "limited", "on", ">pw", "resetchannels"];
        args.extend(allowed.iter().map(String::as_str));
        args.extend(["~*", "+@all"]);
        self.cmd(&args).await;
        format!("redis://limited:pw@127.0.0.1:{}", self.port)
    }

    /// The `CLIENT LIST` lines of pub/sub connections, with their `sub=`/`psub=`
    /// counts; a gateway's pub/sub connections (`wsgate:<node>:pubsub`, and
    /// `wsgate:<node>:pubsub-<i>` when it has several) summed into one entry
    /// per node, without the services router's [`ROUTER_CHANNELS`], so the
    /// counts are its clients' share.
    pub async fn pubsub_clients(&self) -> Vec<(i64, i64)> {
        let list = self.client_list().await;
        // (node name or None for any other client, sub, psub), in list order.
        let mut rows: Vec<(Option<String>, i64, i64)> = Vec::new();
        for line in list.lines() {
            let field = |k: &str| {
                line.split(' ')
                    .find_map(|kv| kv.strip_prefix(k))
                    .and_then(|v| v.parse::<i64>().ok())
                    .unwrap_or(0)
            };
            let node = line.split(' ').find_map(|kv| {
                let n = kv.strip_prefix("name=wsgate:")?;
                let (node, role) = n.rsplit_once(':')?;
                (role == "pubsub"
                    || role
                        .strip_prefix("pubsub-")
                        .is_some_and(|i| i.parse::<usize>().is_ok()))
                .then(|| node.to_owned())
            });
            let (sub, psub) = (field("sub="), field("psub="));
            match rows.iter_mut().find(|r| node.is_some() && r.0 == node) {
                Some(row) => {
                    row.1 += sub;
                    row.2 += psub;
                }
                None => rows.push((node, sub, psub)),
            }
        }
        rows.into_iter()
            .filter_map(|(node, sub, psub)| {
                let router = if node.is_some() { ROUTER_CHANNELS } else { 0 };
                let sub = (sub - router).max(0);
                (sub > 0 || psub > 0).then_some((sub, psub))
            })
            .collect()
    }

    /// The `id=` of the pub/sub connection named `name` (`CLIENT LIST`).
    pub async fn client_id(&self, name: &str) -> Option<i64> {
        let list = self.client_list().await;
        let wanted = format!("name={name}");
        list.lines()
            .find(|l| l.split(' ').any(|kv| kv == wanted))
            .and_then(|l| l.split(' ').find_map(|kv| kv.strip_prefix("id=")))
            .and_then(|v| v.parse().ok())
    }
}

/// Runs one command on a fresh connection to `url` (as redis-cli would);
/// `None` when it failed or took over 2 s.
pub async fn try_cmd_at(url: &str, args: &[&str]) -> Option<redis::Value> {
    let client = redis::Client::open(url).ok()?;
    let mut conn = tokio::time::timeout(
        Duration::from_secs(1),
        client.get_multiplexed_async_connection(),
    )
    .await
    .ok()?
    .ok()?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    tokio::time::timeout(Duration::from_secs(2), cmd.query_async(&mut conn))
        .await
        .ok()?
        .ok()
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A plain Redis subscriber, straight to Redis (redis-rs, not the gateway):
/// what Redis actually published, byte for byte. Shared by the publish tests
/// over HTTP (tests/publish.rs) and over the native protocol
/// (tests/client_publish.rs), which both check what reached Redis.
/// A Redis Sentinel (`redis-server <conf> --sentinel`) on a free loopback
/// port, watching the master `mymaster` with ~1 s detection, killed on drop.
pub struct Sentinel {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
}

impl Sentinel {
    /// Starts a sentinel watching `127.0.0.1:<master_port>` as `mymaster`
    /// (quorum 2, `down-after-milliseconds` 1000, `failover-timeout`
    /// 3000), and waits until it answers PING.
    pub async fn start(master_port: u16) -> Sentinel {
        for _ in 0..5 {
            let port = free_port();
            let dir = std::env::temp_dir().join(format!(
                "wsgate-test-sentinel-{}-{port}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).expect("temp dir");
            let conf = dir.join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\n\
                     sentinel monitor mymaster 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds mymaster 1000\n\
                     sentinel failover-timeout mymaster 3000\n\
                     sentinel parallel-syncs mymaster 1\n",
                    dir.display()
                ),
            )
            .expect("sentinel.conf");
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server (with --sentinel) must be on PATH");
            let mut sentinel = Sentinel {
                child: Some(child),
                port,
                dir,
            };
            let deadline = Instant::now() + WAIT;
            while Instant::now() < deadline {
                if try_cmd_at(&sentinel.url(), &["PING"]).await.is_some() {
                    return sentinel;
                }
                if let Some(Ok(Some(_))) = sentinel.child.as_mut().map(Child::try_wait) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sentinel.kill();
        }
        panic!("redis-server --sentinel did not start");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn cmd(&self, args: &[&str]) -> Option<redis::Value> {
        try_cmd_at(&self.url(), args).await
    }

    /// The master's port as this sentinel reports it.
    pub async fn master_port(&self) -> Option<u16> {
        match self
            .cmd(&["SENTINEL", "get-master-addr-by-name", "mymaster"])
            .await?
        {
            redis::Value::Array(v) => match v.get(1) {
                Some(redis::Value::BulkString(p)) => std::str::from_utf8(p).ok()?.parse().ok(),
                _ => None,
            },
            _ => None,
        }
    }

    /// How many replicas and other sentinels this sentinel knows of.
    pub async fn known(&self) -> (usize, usize) {
        let count = |v: Option<redis::Value>| match v {
            Some(redis::Value::Array(v)) => v.len(),
            _ => 0,
        };
        (
            count(self.cmd(&["SENTINEL", "replicas", "mymaster"]).await),
            count(self.cmd(&["SENTINEL", "sentinels", "mymaster"]).await),
        )
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub struct RawSub {
    _sink: redis::aio::PubSubSink,
    stream: redis::aio::PubSubStream,
}

impl RawSub {
    /// Connects to `redis` and subscribes to `channel`; returns once Redis
    /// confirmed the subscription.
    pub async fn subscribe(redis: &Redis, channel: &str) -> RawSub {
        let client = redis::Client::open(redis.url()).expect("redis client");
        let (mut sink, stream) = tokio::time::timeout(WAIT, client.get_async_pubsub())
            .await
            .expect("pubsub connect in time")
            .expect("pubsub connect")
            .split();
        tokio::time::timeout(WAIT, sink.subscribe(channel))
            .await
            .expect("SUBSCRIBE in time")
            .expect("SUBSCRIBE");
        RawSub {
            _sink: sink,
            stream,
        }
    }

    /// The next payload Redis delivered, as bytes, within `WAIT`.
    pub async fn next(&mut self) -> Vec<u8> {
        let msg = tokio::time::timeout(WAIT, self.stream.next())
            .await
            .expect("a message from redis in time")
            .expect("pub/sub stream ended");
        msg.get_payload_bytes().to_vec()
    }

    /// The next payload Redis delivered, as text (lossy: for comparing with
    /// text and for display).
    pub async fn next_text(&mut self) -> String {
        String::from_utf8_lossy(&self.next().await).into_owned()
    }

    /// The next payloads are exactly `want`, in order.
    pub async fn expect(&mut self, want: &[&[u8]]) {
        for (i, w) in want.iter().enumerate() {
            let got = self.next().await;
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(w),
                "message {i} on redis"
            );
        }
    }
}

/// Channels every gateway node holds for its services router
/// (`docs/services.md`): its node channel, the orders channel and the six
/// event channels.
pub const ROUTER_CHANNELS: i64 = 8;

/// Whether `channel` is one of a node's router channels.
pub fn is_router_channel(channel: &str) -> bool {
    channel.starts_with("wsgate:node:")
        || channel == "wsgate:nodes"
        || channel.starts_with("/wsgate/services/")
}

// ---------------------------------------------------------------- /readyz watcher

/// Samples `/readyz` every 5 ms (shared by tests/faults.rs and
/// tests/redis_topologies.rs) in the background and records each change of
/// status with the time it was seen.
pub struct ReadyWatch {
    transitions: Arc<Mutex<Vec<(Instant, u16)>>>,
    task: JoinHandle<()>,
}

impl ReadyWatch {
    pub fn start(addr: SocketAddr) -> ReadyWatch {
        let transitions = Arc::new(Mutex::new(Vec::new()));
        let seen = transitions.clone();
        let task = tokio::spawn(async move {
            let mut last = None;
            loop {
                let status = http(addr, "GET", "/readyz", None).await.0;
                let at = Instant::now();
                if last != Some(status) {
                    seen.lock().unwrap().push((at, status));
                    last = Some(status);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        ReadyWatch { transitions, task }
    }

    /// When `/readyz` was first seen answering `status` at or after `after`.
    pub async fn wait_for(&self, status: u16, after: Instant, bound: Duration) -> Instant {
        let deadline = Instant::now() + bound;
        loop {
            let hit = self
                .transitions
                .lock()
                .unwrap()
                .iter()
                .find(|(at, s)| *at >= after && *s == status)
                .map(|(at, _)| *at);
            if let Some(at) = hit {
                return at;
            }
            assert!(
                Instant::now() < deadline,
                "/readyz never answered {status} within {bound:?}; transitions: {:?}",
                self.describe(after)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn describe(&self, since: Instant) -> Vec<(i128, u16)> {
        self.transitions
            .lock()
            .unwrap()
            .iter()
            .map(|(at, s)| (signed_ms(since, *at), *s))
            .collect()
    }
}

impl Drop for ReadyWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `to - from` in ms, negative when `to` is earlier.
pub fn signed_ms(from: Instant, to: Instant) -> i128 {
    if to >= from {
        (to - from).as_millis() as i128
    } else {
        -((from - to).as_millis() as i128)
    }
}

// ---------------------------------------------------------------- gateway

/// A gateway running in this test process on 127.0.0.1:<free>.
pub struct Gateway {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// A config for tests: loopback, the given broker, everything else default,
/// except that patterns need no literal prefix (`WSGATE_MIN_PATTERN_PREFIX_BYTES`
/// 0): most tests exercise Redis's glob semantics with patterns such as
/// `*x*`; `tests/patterns.rs` checks the default of 1 on its own.
pub fn test_config(redis_url: Option<String>) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        redis_url,
        min_pattern_prefix_bytes: 0,
        ..Config::default()
    }
}

impl Gateway {
    /// Starts a gateway with `config` and waits for `/readyz`.
    pub async fn start(config: Config) -> Gateway {
        let listener = wsgate::server::bind(config.listen).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            wsgate::server::run(listener, config, async {
                let _ = stopped.await;
                wsgate::shutdown::Stop::Immediate
            })
            .await
            .expect("server run");
        });
        let gw = Gateway {
            addr,
            stop: Some(stop),
            task: Some(task),
        };
        gw.wait_ready().await;
        gw
    }

    pub async fn wait_ready(&self) {
        let addr = self.addr;
        wait_until("/readyz 200", WAIT, || async move {
            http(addr, "GET", "/readyz", None).await.0 == 200
        })
        .await;
    }

    /// Triggers shutdown and waits for `run` to return.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("gateway did not stop in time")
                .expect("gateway task");
        }
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.addr, "/ws").await
    }

    pub async fn metrics(&self) -> String {
        http(self.addr, "GET", "/metrics", None).await.1
    }

    /// POST /publish with a JSON body; returns (status, parsed body).
    pub async fn publish(&self, body: Value) -> (u16, Value) {
        let (status, text) = http(self.addr, "POST", "/publish", Some(&body.to_string())).await;
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The real `wsgate` binary as a child process, killed on drop.
pub struct GatewayProcess {
    pub child: Child,
    pub addr: SocketAddr,
}

impl GatewayProcess {
    /// Spawns the binary with `WSGATE_LISTEN` on a free port plus `env`, and
    /// waits for `/readyz`.
    pub async fn spawn(env: &[(&str, String)]) -> GatewayProcess {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        GatewayProcess::spawn_at(addr, env).await
    }

    /// Spawns the binary listening on `addr` (e.g. to restart a node on the
    /// port it had) plus `env`, and waits for `/readyz`.
    pub async fn spawn_at(addr: SocketAddr, env: &[(&str, String)]) -> GatewayProcess {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
        cmd.env("WSGATE_LISTEN", addr.to_string())
            .env("WSGATE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn wsgate");
        let gw = GatewayProcess { child, addr };
        wait_until("gateway process /readyz", WAIT, || async move {
            http(addr, "GET", "/readyz", None).await.0 == 200
        })
        .await;
        gw
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.addr, "/ws").await
    }

    /// Sends SIGTERM (drain) and waits (bounded) for the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        self.stop_with("TERM").await
    }

    /// Sends signal `name` (`TERM`, `INT`) and waits (bounded) for the exit status.
    pub async fn stop_with(&mut self, name: &str) -> std::process::ExitStatus {
        signal(self.child.id(), name);
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not exit after SIG{name}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a signal by name with `kill(1)`.
pub fn signal(pid: u32, name: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .map(|s| s.success());
    assert!(matches!(ok, Ok(true)), "kill -{name} {pid} failed");
}

/// One HTTP/1.1 request over a fresh connection: (status, body). Status 0
/// means nothing answered.
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    http_with(addr, method, path, &[], body).await
}

/// [`http`] with extra request headers.
pub async fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, String) {
    let (status, _, body) = http_head(addr, method, path, headers, body).await;
    (status, body)
}

/// [`http_with`], also returning the response head (status line and
/// headers, one per line) to look headers up in with [`header_of`].
pub async fn http_head(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, String, String) {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let body = body.unwrap_or("");
        let extra: String = headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}\r\n"))
            .collect();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(req.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.ok()?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text.split(' ').nth(1)?.parse().ok()?;
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        Some((status, head.to_owned(), body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or((0, String::new(), String::new()))
}

/// The value of header `name` (any case) in a response head.
pub fn header_of(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

// ---------------------------------------------------------------- client

/// A WebSocket client of the native protocol.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// An upgrade the server refused: its status, headers and body.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub headers: tokio_tungstenite::tungstenite::http::HeaderMap,
    pub body: String,
}

impl Refused {
    /// The body's `error` field.
    pub fn error(&self) -> String {
        serde_json::from_str::<Value>(&self.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| panic!("refusal without a JSON error: {}", self.body))
    }
}

impl Client {
    /// Connects with extra request headers (`Authorization`, `Origin`,
    /// `X-Forwarded-For`...); a refused upgrade is returned, not a panic.
    pub async fn try_connect(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Client, Refused> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
        use tokio_tungstenite::tungstenite::Error;
        let mut request = format!("ws://{addr}{path}")
            .into_client_request()
            .expect("request");
        for (k, v) in headers {
            request.headers_mut().append(
                HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                HeaderValue::from_str(v).expect("header value"),
            );
        }
        match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
            .await
            .expect("connect timed out")
        {
            Ok((ws, _)) => Ok(Client { ws }),
            Err(Error::Http(response)) => Err(Refused {
                status: response.status().as_u16(),
                headers: response.headers().clone(),
                body: response
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default(),
            }),
            Err(e) => panic!("connect failed: {e}"),
        }
    }

    pub async fn connect(addr: SocketAddr, path: &str) -> Client {
        let url = format!("ws://{addr}{path}");
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect timed out")
            .expect("connect failed");
        Client { ws }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.into()))
            .await
            .expect("send");
    }

    pub async fn send_json(&mut self, v: Value) {
        self.send_text(&v.to_string()).await;
    }

    /// The next frame of any kind, within `WAIT`.
    pub async fn next_message(&mut self) -> Option<Message> {
        match tokio::time::timeout(WAIT, self.ws.next()).await {
            Ok(Some(Ok(m))) => Some(m),
            Ok(Some(Err(_))) | Ok(None) => None,
            Err(_) => panic!("no frame within {WAIT:?}"),
        }
    }

    /// The next text frame, unparsed (pings and pongs skipped), each frame
    /// within `WAIT`; any other frame, or the end, is a panic. For tests that
    /// compare what the gateway wrote byte for byte (tests/publish.rs,
    /// tests/client_publish.rs, tests/protocol.rs, and the Bayeux frames of
    /// tests/bayeux.rs), and for [`Client::recv`].
    pub async fn recv_text(&mut self) -> String {
        loop {
            match self.next_message().await {
                Some(Message::Text(t)) => return t.as_str().to_owned(),
                Some(Message::Ping(_) | Message::Pong(_)) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// The next text frame parsed as JSON, within `WAIT`.
    pub async fn recv(&mut self) -> Value {
        let text = self.recv_text().await;
        serde_json::from_str(&text).expect("server sent invalid JSON")
    }

    /// Sends `v` and returns the next frame.
    pub async fn request(&mut self, v: Value) -> Value {
        self.send_json(v).await;
        self.recv().await
    }

    /// Subscribes to a pattern and asserts the exact success reply.
    pub async fn psubscribe(&mut self, pattern: &str) {
        let reply = self
            .request(json!({"action":"subscribe","pattern":pattern}))
            .await;
        assert_eq!(
            reply,
            json!({"action":"subscribe","pattern":pattern,"status":true})
        );
    }

    /// Subscribes to an exact channel and asserts the exact success reply.
    pub async fn subscribe(&mut self, channel: &str) {
        let reply = self
            .request(json!({"action":"subscribe","channel":channel}))
            .await;
        assert_eq!(
            reply,
            json!({"action":"subscribe","channel":channel,"status":true})
        );
    }

    pub async fn punsubscribe(&mut self, pattern: &str) {
        let reply = self
            .request(json!({"action":"unsubscribe","pattern":pattern}))
            .await;
        assert_eq!(
            reply,
            json!({"action":"unsubscribe","pattern":pattern,"status":true})
        );
    }

    /// Waits for the server's close frame; returns it.
    /// Sends each case's frame and compares the next text frame with its
    /// expected answer, byte for byte; every mismatch is reported at once.
    pub async fn expect_answers(&mut self, cases: Vec<(&str, Message, &str)>) {
        let mut failures = Vec::new();
        for (what, frame, want) in cases {
            self.ws.send(frame).await.expect("send");
            let got = self.recv_text().await;
            if got != want {
                failures.push(format!("{what}:\n  got  {got}\n  want {want}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    pub async fn expect_close(&mut self) -> Option<CloseFrame> {
        loop {
            match self.next_message().await {
                Some(Message::Close(frame)) => return frame,
                Some(_) => continue,
                None => panic!("connection ended without a close frame"),
            }
        }
    }

    /// Asserts no text frame arrives within `d` (for "must not receive").
    pub async fn expect_silence(&mut self, d: Duration) {
        if let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout(d, self.ws.next()).await {
            panic!("expected nothing, got {t}");
        }
    }
}

// ---------------------------------------------------------------- gap notices, limits, exits
// (added for tests/faults.rs; shared with tests/redis.rs)

/// Reason of the `interrupted` notice sent when the Redis connection is lost.
pub const REASON_LOST: &str = "broker connection lost";
/// Reason of the `interrupted` notice sent when the node dropped messages.
pub const REASON_OVERLOADED: &str = "messages dropped: node overloaded";

/// A gap notice as the native protocol renders it, with sorted topic lists
/// (compare with [`sorted_topics`] of the received frame: the gateway lists a
/// client's topics in no particular order).
pub fn notice(action: &str, reason: Option<&str>, patterns: &[&str], channels: &[&str]) -> Value {
    let mut v = json!({"action": action});
    if let Some(r) = reason {
        v["reason"] = json!(r);
    }
    v["patterns"] = json!(patterns);
    v["channels"] = json!(channels);
    sorted_topics(v)
}

/// `v` with its `patterns` and `channels` arrays (if any) sorted.
pub fn sorted_topics(mut v: Value) -> Value {
    for key in ["patterns", "channels"] {
        if let Some(Value::Array(items)) = v.get_mut(key) {
            items.sort_by_key(Value::to_string);
        }
    }
    v
}

impl Client {
    /// Receives the next text frame and asserts it is exactly this gap notice
    /// (topic lists compared as sets).
    pub async fn expect_notice(
        &mut self,
        action: &str,
        reason: Option<&str>,
        patterns: &[&str],
        channels: &[&str],
    ) {
        let got = sorted_topics(self.recv().await);
        assert_eq!(got, notice(action, reason, patterns, channels));
    }

    /// `interrupted` for a lost broker connection, with these topics.
    pub async fn expect_interrupted(&mut self, patterns: &[&str], channels: &[&str]) {
        self.expect_notice("interrupted", Some(REASON_LOST), patterns, channels)
            .await;
    }

    /// Notices `action` (with `reason`) until together they name exactly
    /// `patterns`, each pattern once: a node with several pub/sub
    /// connections sends one notice per connection a client's topics were on.
    pub async fn expect_notices_naming(
        &mut self,
        action: &str,
        reason: Option<&str>,
        patterns: &[&str],
    ) {
        let want: std::collections::BTreeSet<String> =
            patterns.iter().map(|p| (*p).to_owned()).collect();
        let mut named = std::collections::BTreeSet::new();
        while named.len() < want.len() {
            let v = self.recv().await;
            assert_eq!(v["action"], action, "{v}");
            assert_eq!(v["reason"].as_str(), reason, "{v}");
            assert_eq!(v["channels"], serde_json::json!([]), "{v}");
            for p in v["patterns"].as_array().expect("patterns") {
                let p = p.as_str().expect("a pattern").to_owned();
                assert!(want.contains(&p), "{p} not the client's");
                assert!(named.insert(p), "named twice: {v}");
            }
        }
    }

    /// `resumed` with these topics.
    pub async fn expect_resumed(&mut self, patterns: &[&str], channels: &[&str]) {
        self.expect_notice("resumed", None, patterns, channels)
            .await;
    }
}

/// One sample of a metric series from `/metrics` (the exact series text before
/// the value, e.g. `wsgate_refused_total{reason="draining"}`); `None` when the
/// series is absent or nothing answered.
pub async fn metric_value(addr: SocketAddr, series: &str) -> Option<f64> {
    let (status, text) = http(addr, "GET", "/metrics", None).await;
    if status != 200 {
        return None;
    }
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse::<f64>().ok())
}

/// Sends a well-formed WebSocket upgrade request on a fresh connection and
/// returns the response status and body (status 0: no answer within 5 s). On
/// 101 the connection is dropped at once (the session then ends).
pub async fn upgrade_request(addr: SocketAddr, path: &str) -> (u16, String) {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&raw).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())
                            .flatten()
                    })
                    .unwrap_or(0);
                if status == 101 || body.len() >= length {
                    return Some((status, body.to_owned()));
                }
            }
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                let text = String::from_utf8_lossy(&raw).into_owned();
                let status = text.split(' ').nth(1)?.parse().ok()?;
                let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
                return Some((status, body.unwrap_or_default()));
            }
            raw.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or((0, String::new()))
}

impl GatewayProcess {
    /// Waits (bounded) for the process to exit; panics after `bound`.
    pub async fn wait_exit(&mut self, bound: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not exit within {bound:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends SIGINT (Ctrl-C) and waits (bounded by `WAIT`) for the exit status.
    pub async fn interrupt(&mut self) -> std::process::ExitStatus {
        signal(self.child.id(), "INT");
        self.wait_exit(WAIT).await
    }
}

/// Subscribes `c` to every one of `channels` in one burst; asserts each
/// success reply.
pub async fn subscribe_all(c: &mut Client, channels: &[String]) {
    for ch in channels {
        c.send_json(json!({"action":"subscribe","channel":ch}))
            .await;
    }
    let mut confirmed = std::collections::BTreeSet::new();
    for _ in channels {
        let reply = c.recv().await;
        assert_eq!(reply["status"], json!(true), "{reply}");
        confirmed.insert(reply["channel"].as_str().unwrap().to_owned());
    }
    assert_eq!(confirmed, channels.iter().cloned().collect());
}
