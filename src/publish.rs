//! Publishing from outside Redis: what `POST /publish` and a client's own
//! publish over its socket (in every dialect that has one) share, so that the
//! two can never disagree on what a publish means.
//!
//! - The payload rule ([`json_payload`]): a JSON-valued payload is published
//!   as its JSON text exactly as sent, a string with its quotes, so every
//!   subscriber gets back the value that was published
//!   (`docs/protocol.md`, "HTTP publish").
//! - Who may publish over a socket ([`client_may_publish`]):
//!   `WSGATE_CLIENT_PUBLISH` and, with JWT authentication on, the token's
//!   `publish` claim; both must allow the channel.
//! - The broker path of a client publish ([`client_publish`]): the hub's
//!   publish, which `POST /publish` takes too, bounded in time; the session
//!   answers it in the connection's dialect.
//!
//! What is checked before the broker (the name, the rate) belongs to the
//! session, which applies the same checks to a subscribe.

use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::acl::Acl;
use crate::auth::Identity;
use crate::broker::{Publication, PublishError};
use crate::hub::Hub;

/// The bytes Redis carries for a JSON `payload`: its JSON text exactly as
/// the client sent it (escapes, spacing and key order kept). A string is
/// published with its quotes (`"42"` stays the string `"42"`), so what a
/// subscriber reads back is the value that was published, never a
/// reinterpretation of it.
pub fn json_payload(value: &RawValue) -> Bytes {
    Bytes::copy_from_slice(value.get().as_bytes())
}

/// Deserialises a field that is present, whatever its value (for
/// `#[serde(default, deserialize_with = "present")]`): `payload: null` is a
/// payload like any other and `payload_text: null` a type error; only a
/// missing field is `None`, which serde's `Option` cannot tell apart on its
/// own.
pub(crate) fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// May this connection publish to `channel`? `server` is
/// `WSGATE_CLIENT_PUBLISH` (empty: nobody may). With authentication on
/// (`authenticated`), the token's `publish` claim must allow the channel
/// too, and a connection without an identity may not publish at all. Both
/// lists are matched as [`Acl::allows_publish`] says. This mirrors how a
/// subscribe needs both `WSGATE_ALLOW` and the token's `subscribe` claim,
/// except that here the server list defaults to nothing: publishing from
/// sockets is opted into, never inherited.
pub fn client_may_publish(
    server: &Acl,
    identity: Option<&Identity>,
    authenticated: bool,
    channel: &[u8],
) -> bool {
    let token = !authenticated || identity.is_some_and(|id| id.publish_acl.allows_publish(channel));
    server.allows_publish(channel) && token
}

/// Publishes a client's message through the hub, the path `POST /publish`
/// takes, and resolves once the broker answered, or after `timeout` (then
/// [`PublishError::TimedOut`]: possibly published, the message may already
/// have been written). Its arguments are owned, so the future is `'static`
/// and a session can hold it beside its other waits.
pub async fn client_publish(
    hub: Hub,
    publication: Publication,
    timeout: Duration,
) -> Result<(), PublishError> {
    match tokio::time::timeout(timeout, hub.publish(publication)).await {
        Ok(result) => result.map(drop),
        Err(_) => Err(PublishError::TimedOut),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn identity(publish: &[&str]) -> Identity {
        Identity {
            subject: "u".into(),
            claims: serde_json::Map::new(),
            acl: Acl::new(["*"]),
            publish_acl: Acl::new(publish),
            call_acl: Acl::nothing(),
            services_acl: Acl::nothing(),
            expires_at: SystemTime::now(),
        }
    }

    #[test]
    fn a_client_publish_needs_both_lists() {
        let server = Acl::new(["chat.*"]);
        // Authentication off: the server list alone.
        assert!(client_may_publish(&server, None, false, b"chat.a"));
        assert!(!client_may_publish(&server, None, false, b"news.a"));
        // Empty server list: nobody, whatever the token says.
        let none = Acl::nothing();
        assert!(!client_may_publish(&none, None, false, b"chat.a"));
        assert!(!client_may_publish(
            &none,
            Some(&identity(&["*"])),
            true,
            b"chat.a"
        ));
        // Authentication on: the token's claim as well.
        let wide = identity(&["*"]);
        let narrow = identity(&["chat.a"]);
        let absent = identity(&[]);
        assert!(client_may_publish(&server, Some(&wide), true, b"chat.b"));
        assert!(client_may_publish(&server, Some(&narrow), true, b"chat.a"));
        assert!(!client_may_publish(&server, Some(&narrow), true, b"chat.b"));
        assert!(!client_may_publish(&server, Some(&absent), true, b"chat.a"));
        assert!(!client_may_publish(&server, Some(&wide), true, b"news.a"));
        assert!(!client_may_publish(&server, None, true, b"chat.a"));
    }

    #[test]
    fn the_payload_is_its_json_text() {
        for text in [
            r#""42""#,
            "42",
            "null",
            r#"{"z":1, "a":[2]}"#,
            r#""\u0041""#,
        ] {
            let raw: Box<RawValue> = serde_json::from_str(text).unwrap();
            assert_eq!(json_payload(&raw), text.as_bytes());
        }
    }
}
