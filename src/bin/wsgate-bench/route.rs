//! Where each published message goes: one Redis (`--redis`), the gateway's
//! client-side shards (`--shard`, the server its jump hash names), or a
//! Redis Cluster in sharded mode (`--cluster-seed`, `SPUBLISH` on the master
//! owning the channel's slot, as `CLUSTER SLOTS` maps them).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use wsgate::broker::redis::{shards::shard_for, slot};

use crate::cli::Opts;
use crate::rds;

/// See the module docs.
#[derive(Clone, Debug)]
pub(crate) struct Route {
    /// Every server published to; an owner is an index into it.
    pub(crate) servers: Vec<String>,
    /// `PUBLISH`, or `SPUBLISH` for a cluster in sharded mode.
    pub(crate) command: &'static str,
    owners: Owners,
}

#[derive(Clone, Debug)]
enum Owners {
    One,
    Shards,
    /// Slot -> server.
    Slots(Arc<Vec<u16>>),
}

impl Route {
    /// The route the options ask for; a cluster's slot map is read now.
    pub(crate) async fn from_opts(opts: &Opts) -> Result<Route, String> {
        if let Some(seed) = &opts.cluster_seed {
            return cluster(seed).await;
        }
        if opts.shards.is_empty() {
            return Ok(Route {
                servers: opts.redis.iter().cloned().collect(),
                command: "PUBLISH",
                owners: Owners::One,
            });
        }
        Ok(Route {
            servers: opts.shards.clone(),
            command: "PUBLISH",
            owners: Owners::Shards,
        })
    }

    /// The server (index into `servers`) that `channel` is published on.
    pub(crate) fn owner(&self, channel: &[u8]) -> usize {
        match &self.owners {
            Owners::One => 0,
            Owners::Shards => shard_for(channel, self.servers.len()),
            Owners::Slots(map) => map
                .get(usize::from(slot::slot_of(channel)))
                .map_or(0, |&s| usize::from(s)),
        }
    }

    /// More than one server: per-server results are reported.
    pub(crate) fn spread(&self) -> bool {
        !matches!(self.owners, Owners::One)
    }
}

/// Reads `CLUSTER SLOTS` from `seed`: each master becomes a server.
async fn cluster(seed: &str) -> Result<Route, String> {
    let mut conn = rds::connect(seed, Duration::from_secs(2)).await?;
    let reply: Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut conn)
        .await
        .map_err(|e| format!("CLUSTER SLOTS: {e}"))?;
    let Value::Array(ranges) = reply else {
        return Err("CLUSTER SLOTS: not an array".into());
    };
    let mut servers: Vec<String> = Vec::new();
    let mut index: HashMap<String, u16> = HashMap::new();
    let mut map = vec![u16::MAX; slot::SLOTS];
    for range in ranges {
        let Value::Array(fields) = range else {
            continue;
        };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
            (fields.first(), fields.get(1), fields.get(2))
        else {
            return Err("CLUSTER SLOTS: unexpected range".into());
        };
        let (Some(Value::BulkString(host)), Some(Value::Int(port))) =
            (master.first(), master.get(1))
        else {
            return Err("CLUSTER SLOTS: unexpected master".into());
        };
        let url = format!("redis://{}:{port}", String::from_utf8_lossy(host));
        let next = servers.len() as u16;
        let i = *index.entry(url.clone()).or_insert_with(|| {
            servers.push(url);
            next
        });
        for s in (*start).max(0)..=(*end).min(slot::SLOTS as i64 - 1) {
            map[s as usize] = i;
        }
    }
    if map.contains(&u16::MAX) {
        return Err("CLUSTER SLOTS: some slots have no master".into());
    }
    Ok(Route {
        servers,
        command: "SPUBLISH",
        owners: Owners::Slots(Arc::new(map)),
    })
}
