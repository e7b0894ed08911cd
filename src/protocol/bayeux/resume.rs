//! `ext.wsgate.since` of a `/meta/subscribe`: where a Bayeux client resumes
//! a history channel (`docs/dialects/bayeux.md`, History); and
//! `ext.wsgate.join_leave`, a presence channel's events ([`join_leave`]).
//! Bayeux has no
//! field of its own for it, and `ext` is where Faye and CometD extensions
//! put what the protocol does not define.
//!
//! Two shapes, both with the native protocol's positions
//! ([`crate::protocol::since`]):
//!
//! - `{"offset":41,"epoch":"e1"}`, for a message that subscribes to one
//!   channel (what a Faye extension writes for `client.subscribe(ch)`);
//! - `{"/chat/a":{"offset":41,"epoch":"e1"},..}`, channels to positions,
//!   for a wildcard or a message naming several subscriptions: each takes
//!   the entries it delivers.

use serde_json::{Map, Value};

use super::channel;
use crate::broker::Topic;
use crate::history::{Position, Since};
use crate::protocol::since;

/// The reason of the `400` for a `since` that cannot be read.
pub const BAD: &str = "bad ext.wsgate.since";

/// The reason of the `400` for an `ext.wsgate.join_leave` that is not a
/// boolean.
pub const BAD_JOIN_LEAVE: &str = "bad ext.wsgate.join_leave";

/// The reason of the `400` for `join_leave` on a wildcard: events are a
/// channel's, as in the native protocol.
pub const JOIN_LEAVE_CHANNELS: &str = "join_leave is for channels";

/// An `ext.wsgate.join_leave` that is not a boolean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadJoinLeave;

/// `ext.wsgate.join_leave` of a `/meta/subscribe` (`docs/presence.md`):
/// whether the message's channel subscriptions also receive the channels'
/// join and leave events. Absent or `null` (or a `wsgate` member that is
/// no object, which [`Resume::read`] refuses): no; `Err` for anything but a
/// boolean (each subscription of the message is then refused
/// [`BAD_JOIN_LEAVE`]).
pub fn join_leave(ext: Option<&str>) -> Result<bool, BadJoinLeave> {
    let Some(ext) = ext else {
        return Ok(false);
    };
    let Ok(Value::Object(mut ext)) = serde_json::from_str::<Value>(ext) else {
        return Ok(false);
    };
    match ext.remove("wsgate") {
        None => Ok(false),
        Some(Value::Object(mut ours)) => match ours.remove("join_leave") {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(b),
            Some(_) => Err(BadJoinLeave),
        },
        // Not an object: [`Resume::read`] refuses it as a bad `since`.
        Some(_) => Ok(false),
    }
}

/// A `since` that cannot serve a subscription: it is refused with [`BAD`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadSince;

/// What a subscribe's `ext` asks to resume.
#[derive(Debug, Clone, Default)]
pub enum Resume {
    /// Nothing: a plain subscribe.
    #[default]
    None,
    /// One position, for a message that names one channel.
    One(Position),
    /// Channels to positions.
    Map(Map<String, Value>),
    /// A `since` (or a `wsgate` member) of another shape: each subscription
    /// of the message is refused `400:bad ext.wsgate.since:Bad request`.
    Bad,
}

impl Resume {
    /// Reads `ext` (the JSON text of an object, as the message carried it).
    pub fn read(ext: Option<&str>) -> Resume {
        let Some(ext) = ext else {
            return Resume::None;
        };
        let Ok(Value::Object(mut ext)) = serde_json::from_str::<Value>(ext) else {
            return Resume::None;
        };
        let since = match ext.remove("wsgate") {
            None => return Resume::None,
            Some(Value::Object(mut ours)) => ours.remove("since"),
            Some(_) => return Resume::Bad,
        };
        match since {
            None | Some(Value::Null) => Resume::None,
            Some(Value::Object(s)) if since::is_position(&s) => match since::position(&s) {
                Some(p) => Resume::One(p),
                None => Resume::Bad,
            },
            Some(Value::Object(s)) if s.len() <= crate::history::MAX_SINCE_CHANNELS => {
                match since::map(&s, |_| true) {
                    Some(_) => Resume::Map(s),
                    None => Resume::Bad,
                }
            }
            Some(_) => Resume::Bad,
        }
    }

    /// The `since` of one subscription of a message that names `count`:
    /// [`BadSince`] when it cannot be given one (an unreadable `since`, or
    /// a single position for a wildcard or for several subscriptions).
    pub fn since_for(&self, topic: &Topic, count: usize) -> Result<Option<Since>, BadSince> {
        match self {
            Resume::None => Ok(None),
            Resume::Bad => Err(BadSince),
            Resume::One(p) => match topic {
                Topic::Channel(c) if count == 1 => Ok(Some(vec![(c.clone(), p.clone())])),
                _ => Err(BadSince),
            },
            Resume::Map(m) => {
                let covered = Map::from_iter(
                    m.iter()
                        .filter(|(c, _)| channel::delivers(topic, c.as_bytes()))
                        .map(|(c, v)| (c.clone(), v.clone())),
                );
                if covered.is_empty() {
                    return Ok(None);
                }
                since::map(&covered, |_| true).map(Some).ok_or(BadSince)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn ch(c: &'static str) -> Topic {
        Topic::Channel(Bytes::from_static(c.as_bytes()))
    }

    #[test]
    fn join_leave_is_a_boolean() {
        assert_eq!(join_leave(None), Ok(false));
        assert_eq!(join_leave(Some(r#"{"token":"x"}"#)), Ok(false));
        assert_eq!(join_leave(Some(r#"{"wsgate":{"since":null}}"#)), Ok(false));
        assert_eq!(
            join_leave(Some(r#"{"wsgate":{"join_leave":true}}"#)),
            Ok(true)
        );
        assert_eq!(
            join_leave(Some(r#"{"wsgate":{"join_leave":false}}"#)),
            Ok(false)
        );
        assert_eq!(
            join_leave(Some(r#"{"wsgate":{"join_leave":1}}"#)),
            Err(BadJoinLeave)
        );
        assert_eq!(join_leave(Some(r#"{"wsgate":5}"#)), Ok(false));
    }

    #[test]
    fn shapes() {
        assert!(matches!(Resume::read(None), Resume::None));
        assert!(matches!(
            Resume::read(Some(r#"{"token":"x"}"#)),
            Resume::None
        ));
        assert!(matches!(
            Resume::read(Some(r#"{"wsgate":{"since":null}}"#)),
            Resume::None
        ));
        for bad in [
            r#"{"wsgate":1}"#,
            r#"{"wsgate":{"since":5}}"#,
            r#"{"wsgate":{"since":{"offset":-1,"epoch":"e"}}}"#,
            r#"{"wsgate":{"since":{"/a":5}}}"#,
        ] {
            assert!(matches!(Resume::read(Some(bad)), Resume::Bad), "{bad}");
        }
        let one = Resume::read(Some(r#"{"wsgate":{"since":{"offset":41,"epoch":"e1"}}}"#));
        let s = one.since_for(&ch("/a"), 1).unwrap().unwrap();
        assert_eq!((&s[0].0[..], s[0].1.offset), (&b"/a"[..], 41));
        assert!(one.since_for(&ch("/a"), 2).is_err(), "ambiguous");
        let glob = Topic::Pattern(Bytes::from_static(b"/a/*"));
        assert!(one.since_for(&glob, 1).is_err());
        let map = Resume::read(Some(
            r#"{"wsgate":{"since":{"/a/x":{"offset":1,"epoch":"e"},"/b":{"offset":2,"epoch":"f"},"/a/x/y":{"offset":3,"epoch":"g"}}}}"#,
        ));
        let s = map.since_for(&glob, 2).unwrap().unwrap();
        assert_eq!(s.len(), 1, "only what /a/* delivers");
        assert_eq!(&s[0].0[..], b"/a/x");
        let s = map.since_for(&ch("/b"), 2).unwrap().unwrap();
        assert_eq!(s[0].1.offset, 2);
        assert!(map.since_for(&ch("/c"), 2).unwrap().is_none());
    }
}
