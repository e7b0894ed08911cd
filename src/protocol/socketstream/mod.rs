//! SocketStream 0.4 realtime services (Prism's wire), on
//! `WSGATE_SOCKETSTREAM_PATH`: raw WebSocket frames
//! `<serviceId>|[<callbackId>|]<payload>`, services in a fixed order:
//! 0 system, 1 rpc, 2 pubsub.
//!
//! - [`frame`]: the frame codec (split on the first separators only);
//! - [`conversation`]: one connection's services as session requests;
//! - [`reply`]: every frame a client reads, and the client handlers that
//!   `discover` hands out.
//!
//! A message on channel C arrives as `2|{"e":"C","p":[<payload>]}`, once per
//! publish whatever the number of the connection's subscriptions it
//! matches (a SocketStream event fires once). The wire, the errors and what
//! differs from Prism are in `docs/dialects/socketstream.md`.

use crate::broker::BrokerMessage;
use crate::protocol::{Frame, Notice, Render};

pub mod conversation;
pub mod frame;
pub mod reply;

pub use conversation::{Endpoint, SocketStreamConversation};

/// SocketStream deliveries and gap notices, rendered once per message for
/// every SocketStream member.
#[derive(Debug, Default, Clone, Copy)]
pub struct SocketStreamRender;

impl Render for SocketStreamRender {
    fn key(&self) -> &'static str {
        "socketstream"
    }

    fn delivery(&self, message: &BrokerMessage) -> Option<Frame> {
        Some(Frame::text(reply::delivery(message)))
    }

    fn notice(&self, notice: &Notice<'_>) -> Option<Frame> {
        Some(Frame::text(reply::notice(notice)))
    }

    fn once_per_publish(&self) -> bool {
        true
    }
}
