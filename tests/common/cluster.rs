//! A real Redis Cluster for the tests: `masters` masters with one replica
//! each, started as `redis-server --cluster-enabled yes` on free loopback
//! ports whose bus port (+10000) is free too, joined with `redis-cli
//! --cluster create`, and stopped (every process killed, files removed) on
//! drop. `cluster-node-timeout` is 1000 ms, so a killed master's replica is
//! promoted within a few seconds.

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, try_cmd_at, wait_until};

/// How long the cluster may take to form or to fail over.
pub const CLUSTER_WAIT: Duration = Duration::from_secs(30);

/// One node of [`RedisCluster`].
pub struct Node {
    /// The plain port (the helper's own admin commands, default user).
    pub port: u16,
    /// With [`RedisCluster::start_tls`]: the node's TLS port too.
    pub tls_port: Option<u16>,
    child: Option<Child>,
}

/// See the module docs.
pub struct RedisCluster {
    pub nodes: Vec<Node>,
    dir: PathBuf,
}

/// A port whose port + 10000 (the cluster bus) is free as well.
fn cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port > 55_000 {
            continue;
        }
        if StdListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

impl RedisCluster {
    /// Starts `masters` masters and as many replicas, and waits until every
    /// node says `cluster_state:ok`.
    pub async fn start(masters: usize) -> RedisCluster {
        RedisCluster::start_with(masters, None).await
    }

    /// As [`RedisCluster::start`], each node also on a TLS port signed by
    /// `pki` (`server.crt`, client certificates required) with
    /// `--tls-cluster yes --tls-replication yes`: the bus and the replicas
    /// speak TLS. The plain port stays for the helper's own commands; a
    /// client connected over TLS reads the TLS ports in `CLUSTER SLOTS`.
    pub async fn start_tls(masters: usize, pki: &super::pki::Pki) -> RedisCluster {
        RedisCluster::start_with(masters, Some(pki)).await
    }

    async fn start_with(masters: usize, pki: Option<&super::pki::Pki>) -> RedisCluster {
        let dir = std::env::temp_dir().join(format!(
            "wsgate-test-cluster-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut cluster = RedisCluster {
            nodes: Vec::new(),
            dir,
        };
        let mut ports: Vec<u16> = Vec::new();
        while ports.len() < masters * 2 {
            let port = cluster_port();
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        for &port in &ports {
            let mut cmd = Command::new("redis-server");
            let mut tls_port = None;
            if let Some(pki) = pki {
                let tls = loop {
                    let p = free_port();
                    if !ports.contains(&p) && !ports.contains(&p.wrapping_sub(10_000)) {
                        break p;
                    }
                };
                tls_port = Some(tls);
                cmd.args(["--tls-port", &tls.to_string()])
                    .args(["--tls-cluster", "yes", "--tls-replication", "yes"])
                    .args(["--tls-cert-file", &pki.path("server.crt")])
                    .args(["--tls-key-file", &pki.path("server.key")])
                    .args(["--tls-ca-cert-file", &pki.path("ca.crt")])
                    .args(["--tls-auth-clients", "yes"]);
            }
            let child = cmd
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .arg("--cluster-config-file")
                .arg(cluster.dir.join(format!("nodes-{port}.conf")))
                .args(["--cluster-node-timeout", "1000"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&cluster.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be on PATH (see README)");
            cluster.nodes.push(Node {
                port,
                tls_port,
                child: Some(child),
            });
        }
        for &port in &ports {
            let url = format!("redis://127.0.0.1:{port}");
            wait_until("cluster node PING", Duration::from_secs(10), || {
                let url = url.clone();
                async move { try_cmd_at(&url, &["PING"]).await.is_some() }
            })
            .await;
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli must be on PATH");
        assert!(status.success(), "redis-cli --cluster create failed");
        cluster.wait_ok().await;
        cluster.wait_replicas().await;
        cluster
    }

    /// Waits until every master has a replica in `CLUSTER SLOTS` whose
    /// replication link is up (`cluster_state:ok` comes before the replicas
    /// are attached, and a master without one cannot fail over).
    pub async fn wait_replicas(&self) {
        let deadline = Instant::now() + CLUSTER_WAIT;
        loop {
            assert!(Instant::now() < deadline, "replicas did not attach");
            let slots = self.slots().await;
            let mut ready = !slots.is_empty();
            for (_, _, _, replicas) in &slots {
                let mut synced = false;
                for r in replicas {
                    if let Some(redis::Value::BulkString(b)) =
                        self.cmd(*r, &["INFO", "replication"]).await
                    {
                        synced |= String::from_utf8_lossy(&b).contains("master_link_status:up");
                    }
                }
                ready &= synced;
            }
            if ready {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every live node says `cluster_state:ok` and the masters
    /// cover every slot.
    pub async fn wait_ok(&self) {
        let started = Instant::now();
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let url = format!("redis://127.0.0.1:{}", node.port);
            wait_until("cluster_state:ok", CLUSTER_WAIT, || {
                let url = url.clone();
                async move {
                    match try_cmd_at(&url, &["CLUSTER", "INFO"]).await {
                        Some(redis::Value::BulkString(b)) => {
                            String::from_utf8_lossy(&b).contains("cluster_state:ok")
                        }
                        Some(redis::Value::VerbatimString { text, .. }) => {
                            text.contains("cluster_state:ok")
                        }
                        _ => false,
                    }
                }
            })
            .await;
        }
        let _ = started;
    }

    /// `redis://127.0.0.1:<port>,...` of every node (the seeds).
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis://{}", nodes.join(","))
    }

    /// `rediss://127.0.0.1:<tls port>,...` of every node, with `userinfo`
    /// (`user:password@`); [`RedisCluster::start_tls`] only.
    pub fn tls_url(&self, userinfo: &str) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.tls_port.expect("a TLS cluster")))
            .collect();
        format!("rediss://{userinfo}{}", nodes.join(","))
    }

    /// The TLS port of the node whose plain port is `port`.
    pub fn tls_port_of(&self, port: u16) -> u16 {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .and_then(|n| n.tls_port)
            .expect("a node of a TLS cluster")
    }

    /// One command at `port`.
    pub async fn cmd(&self, port: u16, args: &[&str]) -> Option<redis::Value> {
        try_cmd_at(&format!("redis://127.0.0.1:{port}"), args).await
    }

    /// `CLUSTER SLOTS` from a live node: `(start, end, master port, replica
    /// ports)` per range.
    pub async fn slots(&self) -> Vec<(u16, u16, u16, Vec<u16>)> {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            if let Some(redis::Value::Array(ranges)) =
                self.cmd(node.port, &["CLUSTER", "SLOTS"]).await
            {
                let int = |v: &redis::Value| match v {
                    redis::Value::Int(n) => *n as u16,
                    _ => panic!("CLUSTER SLOTS: {v:?}"),
                };
                let port = |v: &redis::Value| match v {
                    redis::Value::Array(n) => int(&n[1]),
                    _ => panic!("CLUSTER SLOTS: {v:?}"),
                };
                return ranges
                    .iter()
                    .map(|r| match r {
                        redis::Value::Array(items) => (
                            int(&items[0]),
                            int(&items[1]),
                            port(&items[2]),
                            items[3..].iter().map(port).collect(),
                        ),
                        other => panic!("CLUSTER SLOTS: {other:?}"),
                    })
                    .collect();
            }
        }
        panic!("no cluster node answers CLUSTER SLOTS");
    }

    /// The port of the master owning `slot`.
    pub async fn owner(&self, slot: u16) -> u16 {
        self.slots()
            .await
            .into_iter()
            .find(|(s, e, _, _)| (*s..=*e).contains(&slot))
            .map(|(_, _, m, _)| m)
            .expect("slot covered")
    }

    /// The masters' ports, in slot order.
    pub async fn masters(&self) -> Vec<u16> {
        let mut out = Vec::new();
        for (_, _, m, _) in self.slots().await {
            if !out.contains(&m) {
                out.push(m);
            }
        }
        out
    }

    /// `CLUSTER MYID` of the node at `port`.
    pub async fn id(&self, port: u16) -> String {
        match self.cmd(port, &["CLUSTER", "MYID"]).await {
            Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
            other => panic!("CLUSTER MYID: {other:?}"),
        }
    }

    /// `PUBSUB SHARDCHANNELS` at `port`, sorted.
    pub async fn shard_channels(&self, port: u16) -> Vec<String> {
        let mut out: Vec<String> = match self.cmd(port, &["PUBSUB", "SHARDCHANNELS"]).await {
            Some(redis::Value::Array(v)) => v
                .into_iter()
                .filter_map(|c| match c {
                    redis::Value::BulkString(b) => Some(String::from_utf8_lossy(&b).into_owned()),
                    _ => None,
                })
                .collect(),
            other => panic!("PUBSUB SHARDCHANNELS: {other:?}"),
        };
        out.sort();
        out
    }

    /// `SPUBLISH` on the owner of `channel`'s slot; the receiver count.
    pub async fn spublish(&self, slot: u16, channel: &str, payload: &str) -> i64 {
        let owner = self.owner(slot).await;
        match self.cmd(owner, &["SPUBLISH", channel, payload]).await {
            Some(redis::Value::Int(n)) => n,
            other => panic!("SPUBLISH: {other:?}"),
        }
    }

    /// Moves `slot` (which must hold no keys) to the master at `to`:
    /// `IMPORTING` on the target, `MIGRATING` on the source, then `NODE` on
    /// every master.
    pub async fn migrate_slot(&self, slot: u16, to: u16) {
        let from = self.owner(slot).await;
        let (from_id, to_id) = (self.id(from).await, self.id(to).await);
        let s = slot.to_string();
        self.cmd(to, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id])
            .await
            .expect("IMPORTING");
        self.cmd(from, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id])
            .await
            .expect("MIGRATING");
        // No keys to MIGRATE: the tests' channels are not keys.
        for m in self.masters().await {
            self.cmd(m, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id])
                .await
                .expect("SETSLOT NODE");
        }
    }

    /// SIGKILL of the node at `port`.
    pub fn kill(&mut self, port: u16) {
        if let Some(node) = self.nodes.iter_mut().find(|n| n.port == port) {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
