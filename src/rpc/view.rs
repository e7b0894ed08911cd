//! A node's cached view of the directory: which instances each service has,
//! and whose turn it is. Kept current by the directory's events and a full
//! refresh every renewal period; a call that finds its service missing asks
//! the directory itself before answering `no such service`.

use std::collections::HashMap;
use std::sync::Arc;

use super::directory::Instance;
use super::CallError;

/// See the module docs.
#[derive(Default)]
pub struct View {
    services: HashMap<String, Service>,
}

#[derive(Default)]
struct Service {
    instances: Vec<Arc<Instance>>,
    /// Round-robin position.
    next: usize,
}

impl View {
    /// The instance that takes the next call of `service:method`.
    pub fn pick(&mut self, service: &str, method: &str) -> Result<Arc<Instance>, CallError> {
        let Some(s) = self.services.get_mut(service) else {
            return Err(CallError::NoSuchService);
        };
        let n = s.instances.len();
        for k in 0..n {
            let i = (s.next + k) % n;
            if s.instances[i].methods.iter().any(|m| m == method) {
                s.next = i + 1;
                return Ok(s.instances[i].clone());
            }
        }
        if n == 0 {
            return Err(CallError::NoSuchService);
        }
        Err(CallError::NoSuchMethod)
    }

    /// Whether `service` has an instance.
    pub fn has(&self, service: &str) -> bool {
        self.services
            .get(service)
            .is_some_and(|s| !s.instances.is_empty())
    }

    /// The services with instances, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .services
            .iter()
            .filter(|(_, s)| !s.instances.is_empty())
            .map(|(n, _)| n.clone())
            .collect();
        names.sort();
        names
    }

    /// Adds (or replaces) an instance.
    pub fn add(&mut self, instance: Arc<Instance>) {
        let s = self.services.entry(instance.service.clone()).or_default();
        s.instances.retain(|i| i.instance != instance.instance);
        s.instances.push(instance);
    }

    /// Removes an instance.
    pub fn remove(&mut self, service: &str, instance: &str) {
        if let Some(s) = self.services.get_mut(service) {
            s.instances.retain(|i| i.instance != instance);
            if s.instances.is_empty() {
                self.services.remove(service);
            }
        }
    }

    /// Removes every instance of `node` (it no longer receives).
    pub fn drop_node(&mut self, node: &str) {
        for s in self.services.values_mut() {
            s.instances.retain(|i| i.node != node);
        }
        self.services.retain(|_, s| !s.instances.is_empty());
    }

    /// Replaces one service's instances (`instances` all of it) or, with no
    /// `service`, the whole view.
    pub fn replace(&mut self, service: Option<&str>, instances: Vec<Instance>) {
        match service {
            Some(name) => {
                self.services.remove(name);
            }
            None => self.services.clear(),
        }
        for i in instances {
            self.add(Arc::new(i));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str, node: &str, methods: &[&str]) -> Instance {
        Instance {
            service: "billing".into(),
            version: "1".into(),
            instance: id.into(),
            node: node.into(),
            methods: methods.iter().map(|m| (*m).to_owned()).collect(),
        }
    }

    #[test]
    fn instances_take_turns_and_unknown_methods_are_refused() {
        let mut view = View::default();
        assert_eq!(
            view.pick("billing", "charge"),
            Err(CallError::NoSuchService)
        );
        view.add(Arc::new(instance("a", "n1", &["charge"])));
        view.add(Arc::new(instance("b", "n2", &["charge", "refund"])));
        let picks: Vec<String> = (0..4)
            .map(|_| view.pick("billing", "charge").unwrap().instance.clone())
            .collect();
        assert_eq!(picks, ["a", "b", "a", "b"]);
        assert_eq!(view.pick("billing", "refund").unwrap().instance, "b");
        assert_eq!(view.pick("billing", "void"), Err(CallError::NoSuchMethod));
        view.drop_node("n2");
        assert_eq!(view.pick("billing", "refund"), Err(CallError::NoSuchMethod));
        view.remove("billing", "a");
        assert!(!view.has("billing"));
        assert_eq!(view.names(), Vec::<String>::new());
    }
}
