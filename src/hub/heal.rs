//! Gap healing: after a broker outage (or messages the node dropped), the
//! node fills the gap of each history channel it holds before telling its
//! subscribers `resumed` (`docs/history.md`, "Gap healing").
//!
//! Pure data owned by the dispatcher task (the one consumer of broker
//! events), so it needs no lock and orders itself with deliveries:
//!
//! 1. Every delivery with a position records it: per topic, per channel,
//!    the last `(offset, epoch)` delivered ([`Healer::record`]).
//! 2. When a link goes down (or messages are dropped), each of its topics
//!    with a recorded position is *planned* ([`Healer::plan`]): the members
//!    active then are kept (they are the ones told `interrupted`), and from
//!    now on live messages of those topics and channels are *held*.
//! 3. Once nothing the channel's topics are on is down any more, one
//!    `FCALL wsgate_read ... after <offset>` per channel is made.
//! 4. Its answer is [`Healer::release`]d: the missed messages go to the kept
//!    members, then the held ones not among them, then, once every channel
//!    of a topic is released, its `resumed` with `recovered`. Live messages
//!    at or below what was healed (they can still arrive late) are skipped
//!    until one above arrives.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;

use super::registry::{Members, MAX_HELD_BYTES};
use crate::broker::{BrokerError, BrokerMessage, Topic};
use crate::history::{self, Position, Query, Read};

/// Most `(topic, channel)` positions the node remembers. A channel
/// subscription has one; a pattern one per history channel seen through
/// it. At the bound, positions of topics nobody holds any more are dropped;
/// if that frees nothing, a channel newly seen through a pattern is not
/// remembered (its gap is then `recovered:false`).
pub(super) const MAX_POSITIONS: usize = 65_536;

/// Inserts refused at [`MAX_POSITIONS`] before the next prune is tried, so a
/// full map is not scanned per message.
const PRUNE_EVERY: usize = 4096;

/// Per topic, per channel, the last position delivered.
pub(super) type Positions = HashMap<Topic, HashMap<Bytes, Position>>;

/// A live message held while its channel heals, with its dispatch numbers.
pub(super) struct HeldMessage {
    pub msg: BrokerMessage,
    pub seq: u64,
    pub publish: u64,
}

/// One topic that lost messages of a channel.
struct PlanTopic {
    topic: Topic,
    /// Its members when the gap began: whom the healed messages are for.
    members: Members,
    /// The last position it delivered.
    since: Position,
    /// The link it is on, while that link is down (`None`: it waits for
    /// nothing, e.g. a gap from dropped messages).
    link: Option<usize>,
}

/// One channel being healed.
struct Healing {
    topics: Vec<PlanTopic>,
    held: Vec<HeldMessage>,
    bytes: usize,
    /// More than [`MAX_HELD_BYTES`] were held: they are dropped and the
    /// channel is `recovered:false`.
    overflowed: bool,
    /// Bumped by each gap that touches it: the answer of an older read is stale.
    generation: u64,
    reading: bool,
}

/// A channel's read to make: the channel, from where, and its generation.
pub(super) type ToRead = (Bytes, Query, u64);

/// What a release leaves the dispatcher to deliver and tell, in this order.
#[derive(Default)]
pub(super) struct Released {
    /// The missed messages, each with the members it is for.
    pub healed: Vec<(BrokerMessage, Members)>,
    /// The live messages held meanwhile, not among the healed ones.
    pub held: Vec<HeldMessage>,
    /// Topics whose every channel is released: their `resumed`, with
    /// whether everything was recovered.
    pub resumed: Vec<(Topic, Members, bool)>,
}

/// See the module docs.
#[derive(Default)]
pub(super) struct Healer {
    delivered: Positions,
    positions: usize,
    refused: usize,
    healing: HashMap<Bytes, Healing>,
    /// Per planned topic: its channels not yet released, and whether all
    /// released so far were recovered.
    pending: HashMap<Topic, (usize, bool, Members)>,
    /// Links down (or resyncing) whose channels wait.
    down: HashSet<usize>,
    /// After a release: deliveries at or below are duplicates.
    floors: HashMap<(Topic, Bytes), Position>,
    held_bytes: usize,
    generation: u64,
}

impl Healer {
    /// Whether some channel is being healed (a cheap check per message).
    pub(super) fn is_idle(&self) -> bool {
        self.healing.is_empty() && self.floors.is_empty()
    }

    /// Whether `topic` has a position to heal from.
    pub(super) fn knows(&self, topic: &Topic) -> bool {
        self.delivered.get(topic).is_some_and(|m| !m.is_empty())
    }

    /// Remembers `msg`'s position as the last its topic delivered on its
    /// channel. At [`MAX_POSITIONS`], `prune` drops the topics nobody
    /// holds any more.
    pub(super) fn record(&mut self, msg: &BrokerMessage, prune: impl FnOnce(&mut Positions)) {
        let Some(position) = &msg.position else {
            return;
        };
        if let Some(seen) = self.delivered.get_mut(&msg.topic) {
            if let Some(at) = seen.get_mut(&msg.channel) {
                at.clone_from(position);
                return;
            }
        }
        if self.positions >= MAX_POSITIONS {
            if self.refused % PRUNE_EVERY != 0 {
                self.refused += 1;
                return;
            }
            prune(&mut self.delivered);
            self.positions = self.delivered.values().map(HashMap::len).sum();
            if self.positions >= MAX_POSITIONS {
                self.refused += 1;
                return;
            }
            self.refused = 0;
        }
        self.delivered
            .entry(msg.topic.clone())
            .or_default()
            .insert(msg.channel.clone(), position.clone());
        self.positions += 1;
    }

    /// A gap began for `groups` (topics with their members now), on `link`
    /// (`None`: not an outage). Returns the topics planned: those with a
    /// position, whose `resumed` the hub sends after healing.
    pub(super) fn plan(&mut self, groups: &[(Topic, Members)], link: Option<usize>) -> Vec<Topic> {
        if let Some(link) = link {
            self.down.insert(link);
        }
        let mut planned = Vec::new();
        for (topic, members) in groups {
            let Some(seen) = self.delivered.get(topic) else {
                continue;
            };
            if members.is_empty() || seen.is_empty() {
                continue;
            }
            for (channel, since) in seen {
                self.generation += 1;
                let healing = self
                    .healing
                    .entry(channel.clone())
                    .or_insert_with(|| Healing {
                        topics: Vec::new(),
                        held: Vec::new(),
                        bytes: 0,
                        overflowed: false,
                        generation: 0,
                        reading: false,
                    });
                healing.generation = self.generation;
                healing.reading = false;
                match healing.topics.iter_mut().find(|t| t.topic == *topic) {
                    Some(t) => t.link = link.or(t.link),
                    None => {
                        healing.topics.push(PlanTopic {
                            topic: topic.clone(),
                            members: members.clone(),
                            since: since.clone(),
                            link,
                        });
                        let p = self
                            .pending
                            .entry(topic.clone())
                            .or_insert_with(|| (0, true, members.clone()));
                        p.0 += 1;
                    }
                }
                self.floors.remove(&(topic.clone(), channel.clone()));
            }
            planned.push(topic.clone());
        }
        planned
    }

    /// `link` is caught up again: its channels may be read.
    pub(super) fn resynced(&mut self, link: usize) {
        self.down.remove(&link);
        for healing in self.healing.values_mut() {
            for t in &mut healing.topics {
                if t.link == Some(link) {
                    t.link = None;
                }
            }
        }
    }

    /// The reads to start now: channels not read yet whose topics wait for
    /// no link. Each reads from the oldest position among its topics.
    pub(super) fn reads_due(&mut self) -> Vec<ToRead> {
        let mut out = Vec::new();
        for (channel, healing) in &mut self.healing {
            if healing.reading
                || healing
                    .topics
                    .iter()
                    .any(|t| t.link.is_some_and(|l| self.down.contains(&l)))
            {
                continue;
            }
            let Some(oldest) = healing
                .topics
                .iter()
                .map(|t| &t.since)
                .min_by_key(|p| p.offset)
            else {
                continue;
            };
            healing.reading = true;
            let query = Query::After {
                offset: oldest.offset,
                epoch: oldest.epoch.clone(),
                limit: history::RECOVERY_LIMIT,
            };
            out.push((channel.clone(), query, healing.generation));
        }
        out
    }

    /// Takes `msg` if its channel is healing for its topic (held) or it is
    /// at or below what a release delivered (dropped); gives it back
    /// otherwise, to deliver.
    pub(super) fn take(
        &mut self,
        msg: BrokerMessage,
        seq: u64,
        publish: u64,
    ) -> Option<BrokerMessage> {
        if let Some(healing) = self.healing.get_mut(&msg.channel) {
            if healing.topics.iter().any(|t| t.topic == msg.topic) {
                if healing.overflowed {
                    return None;
                }
                let bytes = msg.payload.len() + msg.channel.len();
                if self.held_bytes + bytes > MAX_HELD_BYTES {
                    healing.overflowed = true;
                    self.held_bytes -= healing.bytes;
                    healing.bytes = 0;
                    healing.held = Vec::new();
                    return None;
                }
                self.held_bytes += bytes;
                healing.bytes += bytes;
                healing.held.push(HeldMessage { msg, seq, publish });
                return None;
            }
        }
        if self.floors.is_empty() {
            return Some(msg);
        }
        let Some(position) = &msg.position else {
            return Some(msg);
        };
        let key = (msg.topic.clone(), msg.channel.clone());
        match self.floors.get(&key) {
            Some(floor) if floor.epoch == position.epoch && position.offset <= floor.offset => None,
            Some(_) => {
                // Past the overlap: nothing older can follow.
                self.floors.remove(&key);
                Some(msg)
            }
            None => Some(msg),
        }
    }

    /// A read for `channel` made at `generation` ended. `None` when it is
    /// stale (another gap began since; a newer read follows).
    pub(super) fn release(
        &mut self,
        channel: &Bytes,
        generation: u64,
        read: Result<Read, BrokerError>,
    ) -> Option<Released> {
        if self.healing.get(channel)?.generation != generation {
            return None;
        }
        let healing = self.healing.remove(channel)?;
        self.held_bytes -= healing.bytes;
        let mut out = Released::default();
        let read = read.ok();
        for t in healing.topics {
            let recovered = !healing.overflowed
                && read
                    .as_ref()
                    .is_some_and(|r| complete_after(&t.since, r, history::RECOVERY_LIMIT));
            if let Some(read) = &read {
                if recovered {
                    for entry in read.entries.iter().filter(|e| e.offset > t.since.offset) {
                        let msg = BrokerMessage {
                            topic: t.topic.clone(),
                            channel: channel.clone(),
                            payload: entry.payload.clone(),
                            position: Some(Position {
                                offset: entry.offset,
                                epoch: read.epoch.clone(),
                            }),
                        };
                        out.healed.push((msg, t.members.clone()));
                    }
                    self.floors.insert(
                        (t.topic.clone(), channel.clone()),
                        Position {
                            offset: read.top,
                            epoch: read.epoch.clone(),
                        },
                    );
                }
                // From here on, the topic is where the history is.
                if let Some(at) = self
                    .delivered
                    .get_mut(&t.topic)
                    .and_then(|m| m.get_mut(channel))
                {
                    *at = Position {
                        offset: read.top,
                        epoch: read.epoch.clone(),
                    };
                }
            }
            if let Some(p) = self.pending.get_mut(&t.topic) {
                p.0 -= 1;
                p.1 &= recovered;
                if p.0 == 0 {
                    if let Some((_, ok, members)) = self.pending.remove(&t.topic) {
                        out.resumed.push((t.topic.clone(), members, ok));
                    }
                }
            }
        }
        let floors = &self.floors;
        out.held = healing
            .held
            .into_iter()
            .filter(|h| {
                let Some(p) = &h.msg.position else {
                    return true;
                };
                !floors
                    .get(&(h.msg.topic.clone(), channel.clone()))
                    .is_some_and(|f| f.epoch == p.epoch && p.offset <= f.offset)
            })
            .collect();
        Some(out)
    }
}

/// Whether `read` (made from a position at or before `since`) holds every
/// message after `since` up to its top, in the same epoch, within `limit`.
fn complete_after(since: &Position, read: &Read, limit: usize) -> bool {
    if read.epoch != since.epoch || since.offset > read.top {
        return false;
    }
    let missed = read.top - since.offset;
    if missed > limit as u64 {
        return false;
    }
    let mut want = since.offset + 1;
    for e in read.entries.iter().filter(|e| e.offset > since.offset) {
        if e.offset != want {
            return false;
        }
        want += 1;
    }
    want == read.top + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Entry;
    use std::sync::Arc;

    fn at(offset: u64) -> Position {
        Position {
            offset,
            epoch: Bytes::from_static(b"e"),
        }
    }

    /// One subscriber: a topic nobody holds is not healed.
    fn members() -> Members {
        let member = Arc::new(crate::hub::Member {
            id: 1,
            outbox: Arc::new(crate::outbox::Outbox::new(1 << 20)),
            render: Arc::new(crate::protocol::native::Native),
        });
        Arc::new(vec![crate::hub::Sub::new(member, Arc::default())])
    }

    fn msg(topic: &Topic, offset: u64) -> BrokerMessage {
        BrokerMessage {
            topic: topic.clone(),
            channel: Bytes::from_static(b"c"),
            payload: Bytes::from(offset.to_string()),
            position: Some(at(offset)),
        }
    }

    /// Held live messages overlapping the read are delivered once, after
    /// the healed ones; a late live duplicate is dropped.
    #[test]
    fn heals_in_order_without_duplicates() {
        let t = Topic::Channel(Bytes::from_static(b"c"));
        let c = Bytes::from_static(b"c");
        let mut h = Healer::default();
        h.record(&msg(&t, 3), |_| {});
        assert_eq!(h.plan(&[(t.clone(), members())], Some(0)), vec![t.clone()]);
        assert!(h.reads_due().is_empty(), "waits for the link");
        assert!(h.take(msg(&t, 6), 1, 1).is_none());
        assert!(h.take(msg(&t, 7), 2, 2).is_none());
        h.resynced(0);
        let reads = h.reads_due();
        assert_eq!(reads.len(), 1);
        let (_, query, generation) = reads.into_iter().next().unwrap();
        assert_eq!(
            query,
            Query::After {
                offset: 3,
                epoch: Bytes::from_static(b"e"),
                limit: history::RECOVERY_LIMIT
            }
        );
        let read = Read {
            epoch: Bytes::from_static(b"e"),
            top: 6,
            entries: (4..=6)
                .map(|offset| Entry {
                    offset,
                    payload: Bytes::new(),
                })
                .collect(),
        };
        let out = h.release(&c, generation, Ok(read)).unwrap();
        let healed: Vec<u64> = out
            .healed
            .iter()
            .filter_map(|(m, _)| m.position.as_ref().map(|p| p.offset))
            .collect();
        assert_eq!(healed, [4, 5, 6]);
        let held: Vec<u64> = out
            .held
            .iter()
            .filter_map(|m| m.msg.position.as_ref().map(|p| p.offset))
            .collect();
        assert_eq!(held, [7]);
        assert_eq!(out.resumed.len(), 1);
        assert!(out.resumed[0].2);
        assert!(h.take(msg(&t, 6), 3, 3).is_none(), "late duplicate");
        assert!(h.take(msg(&t, 8), 4, 4).is_some());
        assert!(h.is_idle());
    }

    /// Another epoch: nothing healed, every held message delivered.
    #[test]
    fn a_new_epoch_is_not_recovered() {
        let t = Topic::Channel(Bytes::from_static(b"c"));
        let mut h = Healer::default();
        h.record(&msg(&t, 3), |_| {});
        h.plan(&[(t.clone(), members())], None);
        let mut other = msg(&t, 1);
        other.position = Some(Position {
            offset: 1,
            epoch: Bytes::from_static(b"f"),
        });
        assert!(h.take(other, 1, 1).is_none());
        let (_, _, generation) = h.reads_due().into_iter().next().unwrap();
        let read = Read {
            epoch: Bytes::from_static(b"f"),
            top: 1,
            entries: Vec::new(),
        };
        let out = h
            .release(&Bytes::from_static(b"c"), generation, Ok(read))
            .unwrap();
        assert!(out.healed.is_empty());
        assert_eq!(out.held.len(), 1);
        assert!(!out.resumed[0].2);
    }
}
