//! The in-memory directory of a node with the embedded broker: no leases
//! (an instance lives exactly as long as its connection on this node), the
//! same events, published through the hub.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::{DirectoryError, Instance};
use crate::broker::Publication;
use crate::hub::Hub;
use crate::rpc::Event;

/// See the module docs.
#[derive(Clone)]
pub struct MemoryDirectory {
    hub: Hub,
    /// Service -> instance id -> instance. A plain mutex, never held across
    /// an await.
    services: Arc<Mutex<BTreeMap<String, BTreeMap<String, Instance>>>>,
}

impl MemoryDirectory {
    /// An empty directory publishing through `hub`.
    pub fn new(hub: Hub) -> MemoryDirectory {
        MemoryDirectory {
            hub,
            services: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, BTreeMap<String, Instance>>> {
        self.services.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) async fn register(&self, instance: &Instance) -> Result<(), DirectoryError> {
        let first = {
            let mut services = self.lock();
            let of = services.entry(instance.service.clone()).or_default();
            let first = of.is_empty();
            of.insert(instance.instance.clone(), instance.clone());
            first
        };
        let mut events = vec![Event::Connect];
        if first {
            events.push(Event::Online);
        }
        self.publish(&events, instance).await
    }

    pub(super) async fn deregister(&self, instance: &Instance) -> Result<(), DirectoryError> {
        let (removed, last) = {
            let mut services = self.lock();
            let Some(of) = services.get_mut(&instance.service) else {
                return Ok(());
            };
            let removed = of.remove(&instance.instance).is_some();
            let last = of.is_empty();
            if last {
                services.remove(&instance.service);
            }
            (removed, last)
        };
        if !removed {
            return Ok(());
        }
        let mut events = vec![Event::Disconnect];
        if last {
            events.push(Event::Offline);
        }
        self.publish(&events, instance).await
    }

    pub(super) fn list(&self, service: Option<&str>) -> Vec<Instance> {
        let services = self.lock();
        services
            .iter()
            .filter(|(name, _)| service.is_none_or(|s| s == name.as_str()))
            .flat_map(|(_, of)| of.values().cloned())
            .collect()
    }

    async fn publish(&self, events: &[Event], instance: &Instance) -> Result<(), DirectoryError> {
        let payload = Bytes::from(instance.to_json());
        let batch = events
            .iter()
            .map(|e| Publication {
                channel: Bytes::from_static(e.channel().as_bytes()),
                payload: payload.clone(),
                idempotency_key: None,
            })
            .collect();
        for result in self.hub.publish_batch(batch).await {
            result.map_err(|e| DirectoryError(e.to_string()))?;
        }
        Ok(())
    }
}
