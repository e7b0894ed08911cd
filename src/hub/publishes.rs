//! Which broker messages are one publish.
//!
//! A client subscribed to `/foo/bar` and to `/foo/*` gets two Redis messages
//! for one `PUBLISH /foo/bar`: a `message` and a `pmessage`. The native
//! protocol delivers both (each names its subscription); Bayeux delivers a
//! publish once per client. So the dispatcher numbers publishes, and a member
//! whose render asks for it ([`crate::protocol::Render::once_per_publish`])
//! takes one message per number (the outbox checks it under its lock, next
//! to the subscription's start mark: a cheap compare, no per-member work).
//!
//! Redis writes the messages of one `PUBLISH` to a subscriber back to back:
//! the `message` first (if the connection holds the channel), then one
//! `pmessage` per matching pattern, each pattern once; the embedded broker
//! does the same. With several broker links (`WSGATE_REDIS_PUBSUB_CONNECTIONS`)
//! the messages of one publish come over several connections, so they may
//! arrive in any order and interleaved with other publishes. So a message
//! joins the most recent of the last [`WINDOW`] publishes of the same channel
//! and payload that has not come through its subscription yet (its pattern,
//! or the channel itself: `None`); otherwise it starts the next publish. Each
//! publish reaches the node at most once per subscription, so no two
//! messages of one publish are ever numbered apart, except when they are
//! more than [`WINDOW`] publishes apart, and two identical publishes are
//! still told apart (the second repeats a subscription). Misnumbering
//! between identical publishes is harmless: a member takes one message per
//! number change, never fewer than there were publishes, so at worst a
//! duplicate of identical bytes, never a loss.

use std::collections::VecDeque;

use bytes::Bytes;

/// Recent publishes a message may join.
const WINDOW: usize = 16;

/// One recent publish.
struct Recent {
    number: u64,
    channel: Bytes,
    payload: Bytes,
    /// The subscriptions it came through (`None`: the channel).
    via: Vec<Option<Bytes>>,
}

/// The recent publishes; see the module docs.
#[derive(Default)]
pub struct Publishes {
    number: u64,
    /// Newest last.
    recent: VecDeque<Recent>,
}

impl Publishes {
    /// The number of the publish a message belongs to. `pattern` is the
    /// Redis pattern it came through (`None`: a `message`, for a channel).
    pub fn number(&mut self, pattern: Option<&Bytes>, channel: &Bytes, payload: &Bytes) -> u64 {
        let via = pattern.cloned();
        let joined =
            self.recent.iter_mut().rev().find(|r| {
                r.channel == *channel && same(&r.payload, payload) && !r.via.contains(&via)
            });
        if let Some(r) = joined {
            r.via.push(via);
            return r.number;
        }
        self.number += 1;
        if self.recent.len() == WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(Recent {
            number: self.number,
            channel: channel.clone(),
            payload: payload.clone(),
            via: vec![via],
        });
        self.number
    }
}

/// Equal bytes; the same buffer (the embedded broker shares it) at once.
fn same(a: &Bytes, b: &Bytes) -> bool {
    (a.as_ptr() == b.as_ptr() && a.len() == b.len()) || a == b
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHANNEL: Option<&Bytes> = None;

    fn pat(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    #[test]
    fn a_message_and_its_pmessages_are_one_publish() {
        let mut p = Publishes::default();
        let one = p.number(CHANNEL, &b("/a/b"), &b("x"));
        assert_eq!(p.number(Some(&pat("/a/*")), &b("/a/b"), &b("x")), one);
        assert_eq!(p.number(Some(&pat("/a/?*")), &b("/a/b"), &b("x")), one);
        // The same publish again: a new number, each time.
        let two = p.number(CHANNEL, &b("/a/b"), &b("x"));
        assert_ne!(two, one);
        assert_eq!(p.number(Some(&pat("/a/*")), &b("/a/b"), &b("x")), two);
        // Patterns only: a repeated pattern starts the next publish.
        let three = p.number(Some(&pat("/a/*")), &b("/a/b"), &b("x"));
        assert_ne!(three, two);
        assert_eq!(p.number(Some(&pat("/a/?*")), &b("/a/b"), &b("x")), three);
        let four = p.number(Some(&pat("/a/?*")), &b("/a/b"), &b("x"));
        assert_ne!(four, three);
    }

    /// Over several links: the pmessage before the message, and another
    /// publish in between, still one publish.
    #[test]
    fn messages_of_one_publish_over_several_links_are_one_publish() {
        let mut p = Publishes::default();
        let one = p.number(Some(&pat("/a/*")), &b("/a/b"), &b("x"));
        let other = p.number(CHANNEL, &b("/c"), &b("y"));
        assert_ne!(one, other);
        assert_eq!(p.number(CHANNEL, &b("/a/b"), &b("x")), one);
        assert_eq!(p.number(Some(&pat("/a/?*")), &b("/a/b"), &b("x")), one);
    }

    #[test]
    fn another_channel_or_payload_is_another_publish() {
        let mut p = Publishes::default();
        let one = p.number(Some(&pat("/a/*")), &b("/a/b"), &b("x"));
        let two = p.number(Some(&pat("/a/?*")), &b("/a/b"), &b("y"));
        assert_ne!(one, two);
        let three = p.number(Some(&pat("/a/+")), &b("/a/c"), &b("y"));
        assert_ne!(two, three);
    }
}
