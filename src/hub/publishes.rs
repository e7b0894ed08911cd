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
//! does the same. So a message continues the current publish when it is a
//! `pmessage` of the same channel and payload through a pattern not seen yet
//! in it; anything else starts the next. Two identical publishes in a row are
//! still told apart (the second repeats a pattern, or starts with a
//! `message`); the one case left ambiguous, a pattern subscribed between two
//! identical publishes and iterated first, at worst merges a duplicate into
//! the publish before it: never a loss of a distinct message.

use bytes::Bytes;

/// The current publish; see the module docs.
#[derive(Default)]
pub struct Publishes {
    number: u64,
    channel: Bytes,
    payload: Bytes,
    /// The Redis patterns the current publish came through.
    via: Vec<Bytes>,
}

impl Publishes {
    /// The number of the publish a message belongs to. `pattern` is the
    /// Redis pattern it came through (`None`: a `message`, for a channel).
    pub fn number(&mut self, pattern: Option<&Bytes>, channel: &Bytes, payload: &Bytes) -> u64 {
        let continues = match pattern {
            None => false,
            Some(p) => {
                self.number != 0
                    && self.channel == *channel
                    && same(&self.payload, payload)
                    && !self.via.contains(p)
            }
        };
        if continues {
            self.via.extend(pattern.cloned());
            return self.number;
        }
        self.number += 1;
        self.channel = channel.clone();
        self.payload = payload.clone();
        self.via.clear();
        self.via.extend(pattern.cloned());
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
