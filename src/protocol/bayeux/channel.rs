//! Bayeux channel names, and how a Bayeux subscription maps onto Redis.
//!
//! The grammar is the Bayeux 1.0 spec's (the same as Faye's `Grammar`):
//!
//! ```text
//! channel_name  = "/" segment *( "/" segment )
//! pattern       = *( "/" segment ) "/" ( "*" | "**" )
//! segment       = 1*( ALPHA | DIGIT | "-" | "_" | "!" | "~" | "(" | ")" | "$" | "@" )
//! ```
//!
//! A wildcard may only be the last segment: `/foo/*` is every channel with
//! exactly one more segment, `/foo/**` every channel with one or more.
//!
//! A Bayeux channel *is* the Redis channel of the same name, so an exact
//! subscription is a plain Redis `SUBSCRIBE` of its name. A wildcard has no
//! exact Redis equivalent (a Redis `*` also crosses `/`), so it subscribes the
//! Redis glob that covers it — `/foo/*` as `/foo/*` and `/foo/**` as
//! `/foo/?*` (distinct globs, so that the two stay distinct topics in the
//! hub) — and [`delivers`] drops what the glob lets through but the Bayeux
//! wildcard does not mean. That check looks only at the topic and the
//! channel, never at a member, so it runs once per message per render key
//! and the rendered bytes are shared by every Bayeux member of the topic.
//!
//! Three first segments are special. `/meta/**` carries the protocol itself
//! and is never delivered; `/service/**` is request/response and never
//! broadcast; `/wsgate/**` is this gateway's own (`/wsgate/gap`, the gap
//! notice channel). None of them is ever delivered from Redis.

use std::borrow::Cow;

use bytes::Bytes;

use crate::broker::Topic;

use super::reply::Error;

/// The channel of gap notices: when delivery to a Bayeux client is
/// interrupted and when it resumes (see `docs/dialects/bayeux.md`). A client
/// may subscribe to it; the subscription is answered by the gateway itself
/// and costs Redis nothing.
pub const GAP_CHANNEL: &str = "/wsgate/gap";

/// Where a Bayeux client reads a presence channel's members
/// (`docs/dialects/bayeux.md`, Presence): a publish of
/// `{"channel":"/chat/room"}` here is answered on this channel, to this
/// client alone. Deeper than any `/service/<name>`, so no service can take
/// the name. A client may subscribe to it (answered by the gateway, costs
/// Redis nothing), which is what Faye needs to hand the answer to a
/// callback.
pub const PRESENCE_SERVICE: &str = "/service/wsgate/presence";

/// The five meta channels of Bayeux 1.0, the protocol's own requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Meta {
    /// `/meta/handshake`: negotiate, get a clientId.
    Handshake,
    /// `/meta/connect`: the long poll (held), or the keepalive over WebSocket.
    Connect,
    /// `/meta/subscribe`.
    Subscribe,
    /// `/meta/unsubscribe`.
    Unsubscribe,
    /// `/meta/disconnect`: end the session.
    Disconnect,
}

impl Meta {
    /// The meta channel named exactly `channel`, if it is one of the five.
    /// Case matters: Bayeux channel names are case-sensitive.
    pub fn parse(channel: &str) -> Option<Meta> {
        Some(match channel {
            "/meta/handshake" => Meta::Handshake,
            "/meta/connect" => Meta::Connect,
            "/meta/subscribe" => Meta::Subscribe,
            "/meta/unsubscribe" => Meta::Unsubscribe,
            "/meta/disconnect" => Meta::Disconnect,
            _ => return None,
        })
    }

    /// The channel name, which every reply to this meta message carries.
    pub fn channel(self) -> &'static str {
        match self {
            Meta::Handshake => "/meta/handshake",
            Meta::Connect => "/meta/connect",
            Meta::Subscribe => "/meta/subscribe",
            Meta::Unsubscribe => "/meta/unsubscribe",
            Meta::Disconnect => "/meta/disconnect",
        }
    }
}

/// Which part of the channel space a name belongs to, by its first segment;
/// it decides what a client may do there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// `/meta` and below: the protocol's own; never subscribed, published or
    /// delivered.
    Meta,
    /// `/service` and below: request/response with the server, never
    /// broadcast.
    Service,
    /// `/wsgate` and below: reserved for the gateway (`/wsgate/gap`).
    Gateway,
    /// Everything else: broadcast channels, one-to-one with Redis channels.
    /// The root wildcards `/*` and `/**` are here too.
    Broadcast,
}

/// The wildcard ending a channel pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wildcard {
    /// `*`: exactly one more segment.
    One,
    /// `**`: one or more segments.
    Many,
}

/// A name that is neither a channel name nor a channel pattern by the
/// grammar above (answered `405:<name>:Invalid channel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid channel name")]
pub struct InvalidChannel;

/// Is `segment` one channel segment: one or more letters, digits or
/// `-_!~()$@`?
pub fn is_segment(segment: &[u8]) -> bool {
    !segment.is_empty() && segment.iter().all(|&b| is_segment_byte(b))
}

fn is_segment_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'!' | b'~' | b'(' | b')' | b'$' | b'@')
}

/// Is `name` a channel name (no wildcard)?
pub fn is_name(name: &[u8]) -> bool {
    match name.strip_prefix(b"/") {
        Some(rest) => rest.split(|&b| b == b'/').all(is_segment),
        None => false,
    }
}

/// Checks `name` against the grammar: `Ok(None)` for a channel name,
/// `Ok(Some(_))` for a pattern, with its wildcard.
pub fn parse(name: &str) -> Result<Option<Wildcard>, InvalidChannel> {
    let bytes = name.as_bytes();
    let (prefix, wildcard) = if let Some(p) = bytes.strip_suffix(b"/**") {
        (p, Some(Wildcard::Many))
    } else if let Some(p) = bytes.strip_suffix(b"/*") {
        (p, Some(Wildcard::One))
    } else {
        (bytes, None)
    };
    // A pattern's prefix may be empty (`/*`, `/**`); a name may not.
    let valid = if wildcard.is_some() && prefix.is_empty() {
        true
    } else {
        is_name(prefix)
    };
    if valid {
        Ok(wildcard)
    } else {
        Err(InvalidChannel)
    }
}

/// The class of a (valid) channel name or pattern, by its first segment.
/// The root wildcards `/*` and `/**` are [`Class::Broadcast`].
pub fn class(name: &str) -> Class {
    let first = name
        .strip_prefix('/')
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("");
    match first {
        "meta" => Class::Meta,
        "service" => Class::Service,
        "wsgate" => Class::Gateway,
        _ => Class::Broadcast,
    }
}

/// The service a `/service/<name>` channel names: exactly one segment
/// after `/service/`, no wildcard. Deeper and wildcard service channels
/// name none (they stay `404 No such service`).
pub fn service_name(name: &str) -> Option<&str> {
    let service = name.strip_prefix("/service/")?;
    is_segment(service.as_bytes()).then_some(service)
}

/// The services' event channels (`/wsgate/services/online`, ...,
/// `docs/services.md`): the one part of `/wsgate/**` a client may subscribe
/// to, by name or by a wildcard under it, and the only one delivered from
/// Redis, to those subscriptions alone.
pub const SERVICE_EVENTS: &str = "/wsgate/services/";

/// Whether `name` is under [`SERVICE_EVENTS`].
fn service_event(name: &[u8]) -> bool {
    name.len() > SERVICE_EVENTS.len() && name.starts_with(SERVICE_EVENTS.as_bytes())
}

/// Channels under `/meta/`, `/service/` or `/wsgate/` are never delivered
/// from Redis, whatever subscription covers them (the services' events
/// excepted, see [`delivers`]).
fn reserved(channel: &[u8]) -> bool {
    [&b"/meta"[..], b"/service", b"/wsgate"]
        .iter()
        .any(|first| {
            channel
                .strip_prefix(*first)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(b"/"))
        })
}

/// Why a subscribe (or unsubscribe) to a name is refused before any ACL is
/// asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// Not a channel name or pattern: `405:<name>:Invalid channel`.
    #[error("invalid channel")]
    Invalid,
    /// `/meta/**`, or `/wsgate/**` other than [`GAP_CHANNEL`]:
    /// `403:<name>:Forbidden`.
    #[error("forbidden channel")]
    Forbidden,
    /// `/service/**` other than `/service/<name>` (a wildcard, or deeper):
    /// `404:<name>:No such service`. `/service/<name>` itself is a line to a
    /// service, asked of the session ([`service_name`]).
    #[error("no such service")]
    NoSuchService,
}

impl SubscribeError {
    /// The Bayeux error for this refusal of `name` (the subscription as the
    /// client wrote it).
    pub fn error<'a>(&self, name: &'a str) -> Error<'a> {
        match self {
            SubscribeError::Invalid => Error::InvalidChannel(name),
            SubscribeError::Forbidden => Error::Forbidden(name),
            SubscribeError::NoSuchService => Error::NoSuchService(name),
        }
    }
}

/// A subscription a Bayeux client may hold, and what it costs Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The Redis topic, `None` for [`GAP_CHANNEL`] and [`PRESENCE_SERVICE`]
    /// (answered locally).
    topic: Option<Topic>,
    wildcard: Option<Wildcard>,
}

impl Subscription {
    /// Validates a `subscription` field value and maps it to its Redis topic.
    pub fn parse(name: &str) -> Result<Subscription, SubscribeError> {
        let wildcard = parse(name).map_err(|_| SubscribeError::Invalid)?;
        match class(name) {
            Class::Meta => return Err(SubscribeError::Forbidden),
            Class::Service if name == PRESENCE_SERVICE => {
                return Ok(Subscription {
                    topic: None,
                    wildcard: None,
                })
            }
            Class::Service => return Err(SubscribeError::NoSuchService),
            Class::Gateway if name == GAP_CHANNEL => {
                return Ok(Subscription {
                    topic: None,
                    wildcard: None,
                })
            }
            Class::Gateway if service_event(name.as_bytes()) => {}
            Class::Gateway => return Err(SubscribeError::Forbidden),
            Class::Broadcast => {}
        }
        let topic = match wildcard {
            None => Topic::Channel(Bytes::copy_from_slice(name.as_bytes())),
            Some(Wildcard::One) => Topic::Pattern(Bytes::copy_from_slice(name.as_bytes())),
            Some(Wildcard::Many) => {
                // `/foo/**` -> `/foo/?*`: at least one byte after the slash.
                let prefix = &name[..name.len() - 2];
                let mut glob = Vec::with_capacity(name.len() + 1);
                glob.extend_from_slice(prefix.as_bytes());
                glob.extend_from_slice(b"?*");
                Topic::Pattern(Bytes::from(glob))
            }
        };
        Ok(Subscription {
            topic: Some(topic),
            wildcard,
        })
    }

    /// The Redis topic to subscribe through the hub; `None` for the gap
    /// channel and the presence service, which the conversation answers
    /// itself.
    pub fn topic(&self) -> Option<&Topic> {
        self.topic.as_ref()
    }

    /// The wildcard, for a pattern subscription.
    pub fn wildcard(&self) -> Option<Wildcard> {
        self.wildcard
    }
}

/// The Bayeux name of a topic made by [`Subscription::parse`]: the inverse
/// of the mapping (`/foo/?*` -> `/foo/**`), for gap notices, which name the
/// client's subscriptions as it wrote them. Other topics come back as their
/// text (invalid UTF-8 replaced).
pub fn subscription_name(topic: &Topic) -> Cow<'_, str> {
    let name = String::from_utf8_lossy(topic.name());
    match (topic, name) {
        (Topic::Pattern(_), Cow::Borrowed(n)) if n.ends_with("/?*") => {
            Cow::Owned(format!("{}**", &n[..n.len() - 2]))
        }
        (_, name) => name,
    }
}

/// Does a message published on `channel`, which Redis delivered for `topic`,
/// reach a Bayeux subscriber of that topic?
///
/// - never for a channel under `/meta/`, `/service/` or `/wsgate/`, except
///   a services event (`/wsgate/services/<event>`) for a subscription under
///   `/wsgate/services/`;
/// - for an exact channel, when it is that channel;
/// - for `/p/*` (Redis `/p/*`), when the channel is `/p/` plus exactly one
///   valid segment; for `/p/**` (Redis `/p/?*`), one or more valid segments;
/// - never for a topic that [`Subscription::parse`] cannot have made.
///
/// Depends only on its arguments (one pass over the channel's bytes, no
/// allocation), so it runs once per message per render key.
pub fn delivers(topic: &Topic, channel: &[u8]) -> bool {
    if reserved(channel) {
        // An event reaches only subscriptions under the events' own prefix
        // (never a root `/**`), then by the wildcard rules below.
        if !(service_event(channel) && service_event(topic.name())) {
            return false;
        }
    }
    match topic {
        Topic::Channel(name) => name.as_ref() == channel,
        Topic::Pattern(glob) => {
            let (prefix, wildcard) = if let Some(p) = glob.strip_suffix(b"/?*") {
                (p, Wildcard::Many)
            } else if let Some(p) = glob.strip_suffix(b"/*") {
                (p, Wildcard::One)
            } else {
                return false;
            };
            let Some(rest) = channel
                .strip_prefix(prefix)
                .and_then(|r| r.strip_prefix(b"/"))
            else {
                return false;
            };
            match wildcard {
                Wildcard::One => is_segment(rest),
                Wildcard::Many => rest.split(|&b| b == b'/').all(is_segment),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pattern::matches;

    #[test]
    fn service_names() {
        assert_eq!(service_name("/service/random"), Some("random"));
        assert_eq!(service_name("/service/a-b_c!"), Some("a-b_c!"));
        for name in [
            "/service",
            "/service/",
            "/service/*",
            "/service/**",
            "/service/a/b",
            "/service/a.b",
            "/services/a",
            "/foo/service/a",
        ] {
            assert_eq!(service_name(name), None, "{name}");
        }
    }

    fn chan(s: &str) -> Topic {
        Topic::Channel(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn pat(s: &str) -> Topic {
        Topic::Pattern(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn names_follow_the_segment_grammar() {
        for ok in [
            "/a",
            "/foo/bar",
            "/chat/room1",
            "/a-b_c!d~e(f)g$h@i",
            "/UPPER/lower/0123",
            "/meta/handshake",
        ] {
            assert!(is_name(ok.as_bytes()), "{ok}");
            assert_eq!(parse(ok), Ok(None), "{ok}");
        }
        for bad in [
            "", "/", "a", "a/b", "//", "/a/", "/a//b", "/a b", "/a.b", "/a:b", "/a,b", "/a?",
            "/a#", "/a%20", "/é", "/a/b/", "/*/a", "/a/*/b", "/a/**/b", "/a*", "/a/b*", "/a/***",
            "/a/*b", "/a/\u{0}", "/a\\b", "/[a]",
        ] {
            assert_eq!(parse(bad), Err(InvalidChannel), "{bad:?}");
        }
    }

    #[test]
    fn patterns_end_in_one_wildcard() {
        assert_eq!(parse("/foo/*"), Ok(Some(Wildcard::One)));
        assert_eq!(parse("/foo/**"), Ok(Some(Wildcard::Many)));
        assert_eq!(parse("/a/b/c/*"), Ok(Some(Wildcard::One)));
        assert_eq!(parse("/*"), Ok(Some(Wildcard::One)));
        assert_eq!(parse("/**"), Ok(Some(Wildcard::Many)));
    }

    #[test]
    fn classes_go_by_the_first_segment() {
        assert_eq!(class("/meta/connect"), Class::Meta);
        assert_eq!(class("/meta"), Class::Meta);
        assert_eq!(class("/meta/*"), Class::Meta);
        assert_eq!(class("/service/random"), Class::Service);
        assert_eq!(class("/wsgate/gap"), Class::Gateway);
        assert_eq!(class("/metadata/x"), Class::Broadcast);
        assert_eq!(class("/foo/meta"), Class::Broadcast);
        assert_eq!(class("/**"), Class::Broadcast);
        assert_eq!(class("/*"), Class::Broadcast);
    }

    #[test]
    fn meta_channels_round_trip() {
        for m in [
            Meta::Handshake,
            Meta::Connect,
            Meta::Subscribe,
            Meta::Unsubscribe,
            Meta::Disconnect,
        ] {
            assert_eq!(Meta::parse(m.channel()), Some(m));
        }
        assert_eq!(Meta::parse("/meta/Connect"), None);
        assert_eq!(Meta::parse("/meta/publish"), None);
        assert_eq!(Meta::parse("/meta/connect/"), None);
    }

    #[test]
    fn subscriptions_map_to_covering_redis_topics() {
        let topic = |s: &str| Subscription::parse(s).map(|s| s.topic().cloned());
        assert_eq!(topic("/foo/bar"), Ok(Some(chan("/foo/bar"))));
        assert_eq!(topic("/foo/*"), Ok(Some(pat("/foo/*"))));
        assert_eq!(topic("/foo/**"), Ok(Some(pat("/foo/?*"))));
        assert_eq!(topic("/*"), Ok(Some(pat("/*"))));
        assert_eq!(topic("/**"), Ok(Some(pat("/?*"))));
        assert_eq!(topic(GAP_CHANNEL), Ok(None));
        assert_eq!(topic("/meta/connect"), Err(SubscribeError::Forbidden));
        assert_eq!(topic("/meta/*"), Err(SubscribeError::Forbidden));
        assert_eq!(topic("/meta/**"), Err(SubscribeError::Forbidden));
        assert_eq!(topic("/wsgate/other"), Err(SubscribeError::Forbidden));
        assert_eq!(topic("/wsgate/*"), Err(SubscribeError::Forbidden));
        assert_eq!(topic("/service/random"), Err(SubscribeError::NoSuchService));
        assert_eq!(topic("/foo/a b"), Err(SubscribeError::Invalid));
        assert_eq!(topic("/foo/*/bar"), Err(SubscribeError::Invalid));
        assert_eq!(topic("foo"), Err(SubscribeError::Invalid));
        assert_eq!(
            Subscription::parse("/foo/**").map(|s| s.wildcard()),
            Ok(Some(Wildcard::Many))
        );
        assert_eq!(
            SubscribeError::Invalid.error("/a b").to_string(),
            "405:/a b:Invalid channel"
        );
        assert_eq!(
            SubscribeError::Forbidden.error("/meta/*").to_string(),
            "403:/meta/*:Forbidden"
        );
        assert_eq!(
            SubscribeError::NoSuchService
                .error("/service/x")
                .to_string(),
            "404:/service/x:No such service"
        );
    }

    #[test]
    fn subscription_names_invert_the_mapping() {
        for name in ["/foo/bar", "/foo/*", "/foo/**", "/*", "/**"] {
            let sub = Subscription::parse(name).unwrap();
            assert_eq!(subscription_name(sub.topic().unwrap()), name);
        }
        assert_eq!(subscription_name(&pat("news.*")), "news.*");
        assert_eq!(
            subscription_name(&Topic::Channel(Bytes::from_static(b"a\xff"))),
            "a\u{fffd}"
        );
    }

    /// The delivery filter on top of the Redis glob gives exactly the Bayeux
    /// meaning, for every pairing below.
    #[test]
    fn delivers_exactly_what_the_bayeux_wildcard_means() {
        // (subscription, channel, delivered)
        let cases: &[(&str, &str, bool)] = &[
            ("/foo/*", "/foo/bar", true),
            ("/foo/*", "/foo/a/b", false),
            ("/foo/*", "/foo", false),
            ("/foo/*", "/foo/", false),
            ("/foo/*", "/foobar", false),
            ("/foo/*", "/foo/a b", false),
            ("/foo/*", "/foo/a.b", false),
            ("/foo/*", "/fo/x", false),
            ("/foo/**", "/foo/bar", true),
            ("/foo/**", "/foo/a/b", true),
            ("/foo/**", "/foo/a/b/c/d", true),
            ("/foo/**", "/foo", false),
            ("/foo/**", "/foo/", false),
            ("/foo/**", "/foo/a/", false),
            ("/foo/**", "/foo//a", false),
            ("/foo/**", "/foobar/x", false),
            ("/foo/bar", "/foo/bar", true),
            ("/foo/bar", "/foo/baz", false),
            ("/*", "/a", true),
            ("/*", "/a/b", false),
            ("/**", "/a/b/c", true),
            ("/**", "/meta/connect", false),
            ("/**", "/meta", false),
            ("/**", "/service/x", false),
            ("/**", "/wsgate/gap", false),
            ("/**", "/metadata/x", true),
            ("/*", "/service", false),
            ("/a/b/*", "/a/b/c", true),
            ("/a/b/*", "/a/b/c/d", false),
            ("/a/b/**", "/a/b/c/d", true),
            ("/a/b/**", "/a/bc/d", false),
        ];
        for &(sub, channel, want) in cases {
            let s = Subscription::parse(sub).unwrap();
            let topic = s.topic().unwrap();
            let got = delivers(topic, channel.as_bytes());
            assert_eq!(got, want, "{sub} on {channel}");
            // Whatever the Bayeux wildcard means, the Redis glob covers.
            if want {
                if let Topic::Pattern(glob) = topic {
                    assert!(
                        matches(glob, channel.as_bytes()),
                        "{sub}: glob misses {channel}"
                    );
                }
            }
        }
        // Topics no Bayeux subscription makes deliver nothing.
        assert!(!delivers(&pat("news.*"), b"news.sport"));
        assert!(!delivers(&pat("/foo/?"), b"/foo/a"));
        // Non-UTF-8 bytes are not segment bytes.
        assert!(!delivers(&pat("/foo/*"), b"/foo/\xff"));
    }

    #[test]
    fn the_services_events_are_the_one_part_of_wsgate_a_client_may_subscribe_to() {
        let online = Subscription::parse("/wsgate/services/online").unwrap();
        assert_eq!(
            online.topic,
            Some(Topic::Channel(Bytes::from_static(
                b"/wsgate/services/online"
            )))
        );
        let any = Subscription::parse("/wsgate/services/*").unwrap();
        let any = any.topic.unwrap();
        assert!(delivers(&any, b"/wsgate/services/offline"));
        assert!(delivers(
            &Topic::Channel(Bytes::from_static(b"/wsgate/services/online")),
            b"/wsgate/services/online"
        ));
        // A root wildcard never receives them; the rest of /wsgate stays closed.
        assert!(!delivers(
            &Topic::Pattern(Bytes::from_static(b"/?*")),
            b"/wsgate/services/online"
        ));
        assert_eq!(
            Subscription::parse("/wsgate/other"),
            Err(SubscribeError::Forbidden)
        );
        assert_eq!(
            Subscription::parse("/wsgate/services"),
            Err(SubscribeError::Forbidden)
        );
    }
}
