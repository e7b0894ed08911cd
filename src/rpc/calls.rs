//! The calls a node's callers are waiting for: bounded, each removed when it
//! ends (answered, timed out, or its future dropped with its session).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::oneshot;

use super::CallError;

/// Most calls one node may have waiting; one more is refused `Busy`.
pub const MAX_PENDING: usize = 65_536;

/// What a call waits for.
pub type Answer = Result<Bytes, CallError>;

struct Waiting {
    done: oneshot::Sender<Answer>,
    /// The instance that has it (to fail it when that instance goes).
    instance: Arc<str>,
    /// Its node (to fail it when that node's replies may be lost).
    node: Arc<str>,
}

/// See the module docs.
#[derive(Default)]
pub struct Calls {
    waiting: Mutex<HashMap<u64, Waiting>>,
}

impl Calls {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Waiting>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts waiting for call `seq` on `instance` of `node`.
    pub fn insert(
        &self,
        seq: u64,
        instance: Arc<str>,
        node: Arc<str>,
    ) -> Result<oneshot::Receiver<Answer>, CallError> {
        let (done, answer) = oneshot::channel();
        let mut waiting = self.lock();
        if waiting.len() >= MAX_PENDING {
            return Err(CallError::Busy);
        }
        waiting.insert(
            seq,
            Waiting {
                done,
                instance,
                node,
            },
        );
        Ok(answer)
    }

    /// Ends call `seq` with `answer`; `false` when nobody waits for it any
    /// more (a late reply).
    pub fn complete(&self, seq: u64, answer: Answer) -> bool {
        let waiting = self.lock().remove(&seq);
        match waiting {
            Some(w) => w.done.send(answer).is_ok(),
            None => false,
        }
    }

    /// Stops waiting for call `seq` (it ended on the caller's side).
    pub fn remove(&self, seq: u64) {
        self.lock().remove(&seq);
    }

    /// Ends every call waiting on `instance` with `error`.
    pub fn fail_instance(&self, instance: &str, error: &CallError) {
        self.fail(|w| &*w.instance == instance, error);
    }

    /// Ends every call waiting on an instance of another node with `error`
    /// (their replies may have been lost with the pub/sub link).
    pub fn fail_remote(&self, this_node: &str, error: &CallError) {
        self.fail(|w| &*w.node != this_node, error);
    }

    fn fail(&self, which: impl Fn(&Waiting) -> bool, error: &CallError) {
        let failed: Vec<Waiting> = {
            let mut waiting = self.lock();
            let seqs: Vec<u64> = waiting
                .iter()
                .filter(|(_, w)| which(w))
                .map(|(s, _)| *s)
                .collect();
            seqs.iter().filter_map(|s| waiting.remove(s)).collect()
        };
        for w in failed {
            let _ = w.done.send(Err(error.clone()));
        }
    }

    /// Calls waiting now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_reach_their_calls_and_failures_pick_by_instance_or_node() {
        let calls = Calls::default();
        let mut a = calls.insert(1, "i1".into(), "n1".into()).unwrap();
        let mut b = calls.insert(2, "i2".into(), "n2".into()).unwrap();
        let mut c = calls.insert(3, "i3".into(), "n1".into()).unwrap();
        assert!(calls.complete(1, Ok(Bytes::from_static(b"1"))));
        assert_eq!(a.try_recv().unwrap(), Ok(Bytes::from_static(b"1")));
        assert!(!calls.complete(1, Ok(Bytes::new())), "a late reply");
        calls.fail_instance("i2", &CallError::ServiceGone);
        assert_eq!(b.try_recv().unwrap(), Err(CallError::ServiceGone));
        calls.fail_remote("n1", &CallError::Unavailable);
        assert!(c.try_recv().is_err(), "a local call is not failed");
        calls.remove(3);
        assert!(calls.is_empty());
    }
}
