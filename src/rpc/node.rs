//! The router's own place in the hub: one member holding this node's
//! channel, the channel of orders to every node and the six event channels,
//! exactly as a client's subscriptions are held (resubscribed after a Redis
//! reconnect, told of gaps). A gap may have lost replies, so it fails the
//! calls waiting on other nodes (`broker unavailable`); the resync reads the
//! directory again. A second task renews this node's leases.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use tracing::{debug, warn, Instrument};

use super::directory::Instance;
use super::process::ToProcess;
use super::wire::{node_channel, Wire, NODES_CHANNEL};
use super::{lock, CallError, Event, Rpc};
use crate::broker::{BrokerMessage, Topic};
use crate::hub::{Joined, Member, Sub};
use crate::outbox::{Item, Outbox};
use crate::protocol::{Frame, Notice, NoticeKind, Render};

/// Pause before holding a topic again after the broker refused it.
const RETRY: Duration = Duration::from_millis(200);

/// Tags each message with where it came from, once per message: the
/// router's member is the only one with this render key.
struct NodeRender {
    own: Bytes,
}

/// The first byte of a frame for the router: which channel it came on.
const FROM_NODE: u8 = 0;
const FROM_NODES: u8 = 1;
const FROM_EVENT: u8 = 2;

impl Render for NodeRender {
    fn key(&self) -> &'static str {
        "rpc"
    }

    fn delivery(&self, message: &BrokerMessage) -> Option<Frame> {
        let tag = if message.channel == self.own {
            FROM_NODE
        } else if &message.channel[..] == NODES_CHANNEL.as_bytes() {
            FROM_NODES
        } else {
            FROM_EVENT + Event::from_channel(&message.channel)? as u8
        };
        let mut frame = BytesMut::with_capacity(1 + message.payload.len());
        frame.put_u8(tag);
        frame.extend_from_slice(&message.payload);
        Some(Frame::Binary(frame.freeze()))
    }

    fn notice(&self, _notice: &Notice<'_>) -> Option<Frame> {
        None
    }
}

/// Starts the member's task and the renewal task.
pub(super) fn start(rpc: Rpc) {
    let span = tracing::info_span!("rpc", node = %rpc.shared().node_id);
    tokio::spawn(serve(rpc.clone()).instrument(span.clone()));
    tokio::spawn(renew(rpc).instrument(span));
}

/// The topics the router holds.
fn topics(rpc: &Rpc) -> Vec<Topic> {
    let mut topics = vec![
        Topic::Channel(node_channel(&rpc.shared().node_id)),
        Topic::Channel(Bytes::from_static(NODES_CHANNEL.as_bytes())),
    ];
    topics.extend(
        Event::ALL
            .iter()
            .map(|e| Topic::Channel(Bytes::from_static(e.channel().as_bytes()))),
    );
    topics
}

async fn serve(rpc: Rpc) {
    let mut closing = rpc.shared().closing.subscribe();
    let hub = rpc.shared().hub.clone();
    let render = Arc::new(NodeRender {
        own: node_channel(&rpc.shared().node_id),
    });
    // The member's items are served inside the dispatcher, as they come:
    // a call or a reply costs no hand-off to this task.
    let inline = rpc.clone();
    let outbox = Outbox::inline(Box::new(move |item| served(&inline, item)));
    let member = hub.join_node(Arc::new(outbox), render);
    let holding =
        futures_util::future::join_all(topics(&rpc).into_iter().map(|t| hold(&rpc, &member, t)));
    let held = tokio::select! {
        held = holding => held,
        _ = closing.wait_for(|c| *c) => Vec::new(),
    };
    let _ = closing.wait_for(|c| *c).await;
    for (topic, sub) in &held {
        sub.stop();
        hub.unsubscribe(member.id, topic, Some(sub));
    }
    hub.leave_node(member.id);
    member.outbox.close();
}

/// Holds `topic` for `member` until it is active.
async fn hold(rpc: &Rpc, member: &Arc<Member>, topic: Topic) -> (Topic, Arc<Sub>) {
    let hub = &rpc.shared().hub;
    loop {
        let mut joined = match hub.subscribe(member, topic.clone()) {
            Ok(j) => j,
            Err(r) => {
                warn!(reason = %r.message, "router topic refused");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        loop {
            match joined {
                Joined::Active(sub) => {
                    sub.start();
                    return (topic, sub);
                }
                Joined::Pending(mut confirmation) => {
                    let _ = confirmation.wait_for(Option::is_some).await;
                    match hub.activate(member, &topic) {
                        Some(j) => joined = j,
                        None => break,
                    }
                }
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// One item for the router, on the dispatcher's thread.
fn served(rpc: &Rpc, item: Item) {
    match item {
        Item::Frame(Frame::Binary(frame)) => received(rpc, &frame),
        Item::Frame(_) | Item::Raw(_) => {}
        Item::Mark(NoticeKind::Interrupted) => {
            // Replies may be lost while the link is down.
            rpc.shared()
                .calls
                .fail_remote(&rpc.shared().node_id, &CallError::Unavailable);
        }
        Item::Mark(NoticeKind::Resumed) => {
            let rpc = rpc.clone();
            tokio::spawn(async move { rpc.refresh(None).await });
        }
    }
}

/// The sender of a broadcast, to skip it.
#[derive(Deserialize)]
struct From {
    instance: Option<String>,
}

/// One message for the router.
fn received(rpc: &Rpc, frame: &[u8]) {
    let Some((&tag, payload)) = frame.split_first() else {
        return;
    };
    match tag {
        FROM_NODE | FROM_NODES => match Wire::decode(payload) {
            Some(call @ Wire::Call { .. }) => rpc.incoming(call),
            Some(Wire::Reply {
                seq,
                payload,
                error,
            }) => {
                let outcome = match (payload, error) {
                    (_, Some(e)) => Err(e.into_error()),
                    (Some(p), None) => Ok(Bytes::from(p.get().to_owned())),
                    (None, None) => Ok(Bytes::from_static(b"null")),
                };
                rpc.reply(super::process::Origin::Local(seq), outcome);
            }
            Some(Wire::Order { from, seq, command }) => rpc.order(from, seq, command),
            Some(Wire::Count { seq, n }) => rpc.count(seq, n),
            None => debug!("unreadable node message dropped"),
        },
        _ => {
            let Some(&event) = Event::ALL.get(usize::from(tag - FROM_EVENT)) else {
                return;
            };
            event_received(rpc, event, payload);
        }
    }
}

/// An event: the view follows the lifecycle ones; processes that asked get
/// it (every other process gets a broadcast).
fn event_received(rpc: &Rpc, event: Event, payload: &[u8]) {
    let shared = rpc.shared();
    match event {
        Event::Connect | Event::Online => {
            if let Ok(i) = serde_json::from_slice::<Instance>(payload) {
                lock(&shared.view).add(Arc::new(i));
            }
        }
        Event::Disconnect | Event::Offline => {
            if let Ok(i) = serde_json::from_slice::<Instance>(payload) {
                lock(&shared.view).remove(&i.service, &i.instance);
                shared
                    .calls
                    .fail_instance(&i.instance, &CallError::ServiceGone);
            }
        }
        Event::Broadcast | Event::Unhandled => {}
    }
    let Some(rest) = std::str::from_utf8(payload)
        .ok()
        .and_then(|t| t.strip_prefix('{'))
    else {
        return;
    };
    let (text, sender) = match event {
        Event::Broadcast => (
            format!("{{\"type\":\"broadcast\",{rest}"),
            serde_json::from_slice::<From>(payload)
                .ok()
                .and_then(|f| f.instance),
        ),
        _ => (
            format!("{{\"type\":\"event\",\"event\":\"{}\",{rest}", event.name()),
            None,
        ),
    };
    let processes: Vec<_> = lock(&shared.processes).values().cloned().collect();
    for p in processes {
        let to = match event {
            Event::Broadcast => p
                .instance()
                .is_some_and(|i| Some(&i.instance) != sender.as_ref()),
            _ => p.wants(event),
        };
        if to && p.tx.try_send(ToProcess::Text(text.clone())).is_err() {
            debug!(process = p.id, "event dropped for a process that lags");
        }
    }
}

/// Renews this node's leases every third of a lease, registers again what
/// the directory lost, and reads the whole directory into the view.
async fn renew(rpc: Rpc) {
    let shared = rpc.shared();
    let mut closing = shared.closing.subscribe();
    let period = (shared.lease / 3).max(Duration::from_millis(50));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = closing.wait_for(|c| *c) => return,
            _ = tick.tick() => {}
        }
        let mine: Vec<Arc<Instance>> = lock(&shared.instances)
            .values()
            .filter_map(|p| p.instance())
            .collect();
        match shared.directory.renew(&mine).await {
            Ok(lost) => {
                for i in lost.into_iter().filter_map(|k| mine.get(k)) {
                    warn!(instance = %i.instance, "instance lost its lease: registering it again");
                    if let Err(e) = shared.directory.register(i).await {
                        warn!(cause = %e, "instance not registered again");
                    }
                }
            }
            Err(e) => debug!(cause = %e, "leases not renewed"),
        }
        rpc.refresh(None).await;
        // This node's own instances stay in its view whatever the read said.
        let mut view = lock(&shared.view);
        for i in &mine {
            view.add(i.clone());
        }
    }
}
