//! Where service instances are: registered by the node that holds their
//! connection, listed by every node.
//!
//! Two implementations, chosen like the broker is: [`redis`] (sorted sets
//! scored by lease expiry, changed only by Lua scripts, so that each
//! `online` / `offline` transition is published exactly once cluster-wide
//! even when two nodes register or lose instances at the same moment) and
//! [`memory`] (the embedded broker's single node). Both publish the
//! lifecycle events ([`super::Event`]) themselves, on the broker, so every
//! node and every subscribed client sees the same sequence.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::hub::Hub;

pub mod memory;
pub mod redis;

/// One instance of a service, as the directory stores it and as the
/// lifecycle events carry it (`{"service","version","instance","node",
/// "methods"}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// The service's name.
    pub service: String,
    /// The version the instance registered with.
    pub version: String,
    /// The instance's id, unique cluster-wide (`<node>.<boot>.<n>`).
    pub instance: String,
    /// The node holding the instance's connection.
    pub node: String,
    /// The methods it serves.
    pub methods: Vec<String>,
}

impl Instance {
    /// The event payload: this, as JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Why the directory did not answer: Redis is unreachable or refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("service directory unavailable: {0}")]
pub struct DirectoryError(pub String);

/// The node's directory; see the module docs.
#[derive(Clone)]
pub enum Directory {
    /// Shared through Redis.
    Redis(redis::RedisDirectory),
    /// This node alone.
    Memory(memory::MemoryDirectory),
}

impl Directory {
    /// The in-memory directory, publishing its events through `hub`.
    pub fn memory(hub: Hub) -> Directory {
        Directory::Memory(memory::MemoryDirectory::new(hub))
    }

    /// Adds `instance` (first of its service: `online` too); `connect` is
    /// published.
    pub async fn register(&self, instance: &Instance) -> Result<(), DirectoryError> {
        match self {
            Directory::Redis(d) => d.register(instance).await,
            Directory::Memory(d) => d.register(instance).await,
        }
    }

    /// Removes `instance` (last of its service: `offline` too);
    /// `disconnect` is published.
    pub async fn deregister(&self, instance: &Instance) -> Result<(), DirectoryError> {
        match self {
            Directory::Redis(d) => d.deregister(instance).await,
            Directory::Memory(d) => d.deregister(instance).await,
        }
    }

    /// Renews the leases of this node's `instances` in one round trip and
    /// reaps every expired instance of the cluster; returns the instances
    /// of `instances` the directory no longer had (reaped while this node
    /// could not renew them), for the caller to register again.
    pub async fn renew(&self, instances: &[Arc<Instance>]) -> Result<Vec<usize>, DirectoryError> {
        match self {
            Directory::Redis(d) => d.renew(instances).await,
            Directory::Memory(_) => Ok(Vec::new()),
        }
    }

    /// Every live instance (of `service` alone, when given).
    pub async fn list(&self, service: Option<&str>) -> Result<Vec<Instance>, DirectoryError> {
        match self {
            Directory::Redis(d) => d.list(service).await,
            Directory::Memory(d) => Ok(d.list(service)),
        }
    }

    /// Closes the Redis connection, if any.
    pub fn close(&self) {
        if let Directory::Redis(d) = self {
            d.close();
        }
    }
}
