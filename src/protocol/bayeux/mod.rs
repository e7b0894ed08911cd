//! Bayeux 1.0, the protocol of CometD, Faye and nodefony's realtime bundle:
//! the pure, synchronous pieces of it, which the session and the transports
//! (WebSocket, long-polling, JSONP) put together.
//!
//! - [`message`]: a POST body, a `message=` form or a WebSocket text frame
//!   into a list of Bayeux messages, within size, depth and count limits,
//!   with a typed error for each message that is wrong (the others still go
//!   through, as one bad message must not cost a client its batch).
//! - [`channel`]: channel-name validation by the spec's segment grammar, the
//!   classification meta / service / gateway / broadcast, and the mapping of
//!   a subscription to the Redis topic that covers it, with the cheap filter
//!   ([`channel::delivers`]) that narrows a covering Redis glob back to what
//!   the Bayeux wildcard means (`/foo/*` never delivers `/foo/a/b`).
//! - [`reply`]: every reply and delivery a Bayeux client reads, byte for
//!   byte, and the `code:args:message` errors.
//! - [`client_id`]: unguessable client ids.
//!
//! The wire behaviour (endpoints, mapping, errors, limits, what is not
//! supported) is described in `docs/dialects/bayeux.md`. Nothing here holds
//! state, touches the network, or knows about the hub: a Bayeux connection's
//! state lives in its session, which calls these functions.

pub mod channel;
pub mod client_id;
pub mod conversation;
pub mod message;
pub mod reply;
pub mod resume;
