//! The hub: one node's registry of subscriptions, and the fan-out.
//!
//! Sessions add and remove themselves per topic; the hub refcounts by keeping
//! the members of each topic, and a single *reconciler* task brings the broker
//! in line with it (first member: subscribe; last one gone: unsubscribe) in
//! batches of up to [`MAX_BATCH`] topics. A *dispatcher* task consumes the
//! broker's events in order: each message is rendered once per dialect and the
//! same frame is pushed into every member's outbox, never waiting on any of
//! them. The hub never knows which dialect a member speaks; it only holds the
//! [`crate::protocol::Dialect`] trait object to render with.

pub mod registry;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, info, warn, Instrument};

use crate::broker::{Broker, BrokerEvent, BrokerMessage, CoveredMessage, Topic, MAX_BATCH};
use crate::metrics::Metrics;
use crate::pattern_cost::Refusal;
use crate::protocol::{Frame, Notice, NoticeKind};
use crate::session::outbox::Pushed;
pub use registry::{Confirmation, LinkState, Member, Removed};
use registry::{Notices, Registry};

/// Pause after a failed broker apply before trying again, so that a broker
/// that refuses at once (disconnected) does not spin the reconciler; the
/// retry is normally triggered sooner by the broker's `Up` event anyway.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Most broker events the dispatcher takes per wake-up: amortises the channel
/// and lock costs over a burst while keeping each step short.
const DISPATCH_BATCH: usize = 256;

/// Cheap, clonable handle to the node's hub.
#[derive(Clone)]
pub struct Hub {
    shared: Arc<Shared>,
}

struct Shared {
    /// Registry behind a plain mutex: every critical section is a map update
    /// or a snapshot clone, never an await (clippy's `await_holding_lock` is
    /// denied crate-wide).
    registry: Mutex<Registry>,
    broker: Arc<dyn Broker>,
    /// Wakes the reconciler when a topic became dirty.
    dirty: Notify,
    /// Flips to `true` once, when the hub closes; both tasks watch it.
    closing: watch::Sender<bool>,
    next_member: AtomicU64,
    metrics: Metrics,
}

impl Hub {
    /// Starts the hub's reconciler and dispatcher over `broker`, whose events
    /// arrive on `events`. Both tasks end on [`Hub::close`].
    pub fn start(
        broker: Arc<dyn Broker>,
        events: mpsc::Receiver<BrokerEvent>,
        metrics: Metrics,
    ) -> Hub {
        let shared = Arc::new(Shared {
            registry: Mutex::new(Registry::default()),
            broker,
            dirty: Notify::new(),
            closing: watch::Sender::new(false),
            next_member: AtomicU64::new(1),
            metrics,
        });
        tokio::spawn(reconcile(shared.clone()).instrument(tracing::info_span!("reconciler")));
        tokio::spawn(
            dispatch(shared.clone(), events).instrument(tracing::info_span!("dispatcher")),
        );
        Hub { shared }
    }

    /// A fresh member id for a new session.
    pub fn next_member_id(&self) -> u64 {
        self.shared.next_member.fetch_add(1, Ordering::Relaxed)
    }

    /// Adds `member` to `topic`. `ack` is the success reply, queued by the hub
    /// at the moment the member becomes active so that it precedes every
    /// delivery. `None`: active already; otherwise wait on the confirmation.
    /// Refused (nothing changes) for a pattern new to a node that holds
    /// `WSGATE_MAX_PATTERNS` patterns already.
    pub fn subscribe(
        &self,
        member: &Arc<Member>,
        topic: Topic,
        ack: Frame,
    ) -> Result<Option<Confirmation>, Refusal> {
        let kind = topic.kind();
        let pending = {
            let mut registry = self.shared.lock();
            let pending = registry.subscribe(member.clone(), topic, ack)?;
            self.shared.update_gauges(&registry);
            pending
        };
        self.shared
            .metrics
            .local_subscriptions
            .with_label_values(&[kind])
            .inc();
        if pending.is_some() {
            self.shared.dirty.notify_one();
        }
        Ok(pending)
    }

    /// Caps the distinct patterns this node holds (`WSGATE_MAX_PATTERNS`);
    /// set once at start-up, before any session.
    pub fn set_max_patterns(&self, max: usize) {
        self.shared.lock().set_max_patterns(max);
    }

    /// Removes `member_id` from `topic`.
    pub fn unsubscribe(&self, member_id: u64, topic: &Topic) -> Removed {
        let removed = {
            let mut registry = self.shared.lock();
            let removed = registry.unsubscribe(member_id, topic);
            self.shared.update_gauges(&registry);
            removed
        };
        if removed != Removed::NotFound {
            self.left(topic);
        }
        removed
    }

    /// Withdraws a subscribe that is still waiting for the broker (its wait
    /// timed out); `false` if it became active meanwhile and must be kept.
    pub fn cancel_pending(&self, member_id: u64, topic: &Topic) -> bool {
        let cancelled = {
            let mut registry = self.shared.lock();
            let cancelled = registry.cancel_pending(member_id, topic);
            self.shared.update_gauges(&registry);
            cancelled
        };
        if cancelled {
            self.left(topic);
        }
        cancelled
    }

    /// A member left `topic`: count it, and let the reconciler look.
    fn left(&self, topic: &Topic) {
        self.shared
            .metrics
            .local_subscriptions
            .with_label_values(&[topic.kind()])
            .dec();
        self.shared.dirty.notify_one();
    }

    /// Publishes through the broker; returns the receiver count it reports.
    pub async fn publish(
        &self,
        channel: bytes::Bytes,
        payload: bytes::Bytes,
    ) -> Result<u64, crate::broker::BrokerError> {
        self.shared.broker.publish(channel, payload).await
    }

    /// Broker connected and every wanted topic confirmed since: `/readyz`.
    pub fn is_ready(&self) -> bool {
        self.shared.lock().is_ready()
    }

    /// Stops both tasks; the broker is dropped with the last handle.
    pub fn close(&self) {
        self.shared.closing.send_replace(true);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        // Registry methods leave it consistent between statements that can
        // panic only on allocation failure; reuse it rather than cascade.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Mirrors the registry's counts and link state into gauges (a few
    /// atomic stores; called after every registry change).
    fn update_gauges(&self, registry: &Registry) {
        let held = registry.held();
        let m = &self.metrics.broker_subscriptions;
        m.with_label_values(&["channel"]).set(held.channels as i64);
        m.with_label_values(&["pattern"]).set(held.patterns as i64);
        self.metrics.subscribes_held.set(registry.waiting() as i64);
        let link = registry.link();
        for state in LinkState::ALL {
            self.metrics
                .broker_state
                .with_label_values(&[state.as_str()])
                .set(i64::from(state == link));
        }
    }

    /// Sends one gap notice per member (rendered per member: rare, not hot).
    fn notify(&self, notices: Notices, kind: NoticeKind, reason: Option<&str>) {
        for (member, topics) in notices {
            let frame = member.dialect.notice(&Notice {
                kind,
                topics: &topics,
                reason,
            });
            self.metrics.gap_notices.inc();
            if member.outbox.push(frame) == Pushed::Overflowed {
                self.metrics.slow_consumer_closes.inc();
            }
        }
    }

    /// Applies one broker state event to the registry and tells whom it concerns.
    fn link_event(&self, event: BrokerEvent) {
        let mut registry = self.lock();
        let before = registry.link();
        let mut interrupted = Vec::new();
        match event {
            BrokerEvent::Up { generation } => {
                registry.broker_up(generation);
                if generation > 1 {
                    self.metrics.broker_reconnects.inc();
                }
            }
            BrokerEvent::Down => interrupted = registry.broker_down(),
            BrokerEvent::Reconnecting => registry.broker_reconnecting(),
            BrokerEvent::Message(_) | BrokerEvent::Covered(_) | BrokerEvent::Gap(_) => {}
        }
        self.update_gauges(&registry);
        let after = registry.link();
        drop(registry);
        if before != after {
            match after {
                LinkState::Down => warn!(from = before.as_str(), "broker link down"),
                _ => info!(
                    from = before.as_str(),
                    to = after.as_str(),
                    "broker link state"
                ),
            }
        }
        self.notify(
            interrupted,
            NoticeKind::Interrupted,
            Some("broker connection lost"),
        );
        self.dirty.notify_one();
    }

    /// Messages for `topics` were dropped: tell their subscribers both that
    /// delivery was interrupted and that it has resumed (it has: the drop was
    /// noticed because a later message got through).
    fn gap(&self, topics: Option<Vec<Topic>>) {
        let notices = self.lock().members_of(topics.as_deref());
        let reason = Some("messages dropped: node overloaded");
        self.notify(notices.clone(), NoticeKind::Interrupted, reason);
        self.notify(notices, NoticeKind::Resumed, None);
    }

    /// Fans one message out: rendered once per dialect, cloned into each outbox.
    fn deliver(&self, msg: &BrokerMessage) {
        let Some(members) = self.lock().receivers(&msg.topic) else {
            return;
        };
        // Snapshot is sorted by dialect: render once per run of one dialect.
        let mut rendered: Option<(&'static str, Frame)> = None;
        for member in members.iter() {
            let name = member.dialect.name();
            let frame = match &rendered {
                Some((n, f)) if *n == name => f.clone(),
                _ => {
                    let f = member.dialect.delivery(msg);
                    rendered = Some((name, f.clone()));
                    f
                }
            };
            if member.outbox.push(frame) == Pushed::Overflowed {
                self.metrics.slow_consumer_closes.inc();
            }
        }
    }
}

impl Shared {
    /// A message that came through a Redis pattern standing for several
    /// client patterns: delivered to each that matches, as Redis itself
    /// would have decided (`crate::pattern` is its matcher byte for byte).
    /// Each matching pattern is one subscription, rendered once per dialect,
    /// exactly as if Redis had sent one `pmessage` per pattern.
    fn deliver_covered(&self, msg: &CoveredMessage) {
        for pattern in msg.patterns.iter() {
            if *pattern == msg.via || crate::pattern::matches(pattern, &msg.channel) {
                self.deliver(&BrokerMessage {
                    topic: Topic::Pattern(pattern.clone()),
                    channel: msg.channel.clone(),
                    payload: msg.payload.clone(),
                });
            }
        }
    }
}

/// Brings the broker in line with the registry, one batch at a time. Being a
/// single task is what keeps the broker's commands in the order decided.
async fn reconcile(shared: Arc<Shared>) {
    let mut closing = shared.closing.subscribe();
    loop {
        let step = {
            let mut registry = shared.lock();
            let step = registry.take_changes(MAX_BATCH);
            shared.update_gauges(&registry);
            step
        };
        let (generation, changes) = (step.generation, step.changes);
        if let Some((took, resumed)) = step.resynced {
            shared
                .metrics
                .broker_resync_seconds
                .observe(took.as_secs_f64());
            info!(took_ms = took.as_millis() as u64, "broker link resynced");
            shared.notify(resumed, NoticeKind::Resumed, None);
        }
        if changes.subscribe.is_empty() && changes.unsubscribe.is_empty() {
            tokio::select! {
                _ = shared.dirty.notified() => continue,
                _ = closing.wait_for(|c| *c) => return,
            }
        }
        debug!(
            subscribe = changes.subscribe.len(),
            unsubscribe = changes.unsubscribe.len(),
            "applying"
        );
        let result = tokio::select! {
            r = shared.broker.apply(generation, changes.clone()) => r,
            _ = closing.wait_for(|c| *c) => return,
        };
        let failed = result.is_err();
        if let Err(e) = &result {
            debug!(cause = %e, "apply failed; will retry after reconnect");
        }
        {
            let mut registry = shared.lock();
            registry.complete(generation, &changes, result);
            shared.update_gauges(&registry);
        }
        if failed {
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
}

/// Consumes broker events in order: messages fan out, `Up`/`Down` update the
/// registry. Per-channel order holds because there is one consumer.
async fn dispatch(shared: Arc<Shared>, mut events: mpsc::Receiver<BrokerEvent>) {
    let mut closing = shared.closing.subscribe();
    let mut batch = Vec::with_capacity(DISPATCH_BATCH);
    loop {
        let n = tokio::select! {
            n = events.recv_many(&mut batch, DISPATCH_BATCH) => n,
            _ = closing.wait_for(|c| *c) => return,
        };
        if n == 0 {
            return; // the broker is gone
        }
        for event in batch.drain(..) {
            match event {
                BrokerEvent::Message(msg) => shared.deliver(&msg),
                BrokerEvent::Covered(msg) => shared.deliver_covered(&msg),
                BrokerEvent::Gap(topics) => shared.gap(topics),
                state => shared.link_event(state),
            }
        }
    }
}
