//! RoadRunner websockets v2 (roadrunner-server/websockets 2.16), on
//! `WSGATE_ROADRUNNER_PATH`: JSON commands `join`, `leave` and `headers`,
//! answers `@join` / `#join` / `@leave`, deliveries `{"topic":..,
//! "payload":"<the bytes as a string>"}` escaped as Go escapes them.
//!
//! - [`command`]: a client frame into a command, or the reason it is not one;
//! - [`conversation`]: a connection's joins and leaves, as session requests;
//! - [`reply`] and [`json`]: every frame a client reads, byte for byte;
//! - [`publish`]: RoadRunner's broadcast RPC (`Publish`, `PublishAsync`) in
//!   its JSON form, for `POST WSGATE_ROADRUNNER_PUBLISH_PATH`.
//!
//! RoadRunner topics are exact channel names (plain `SUBSCRIBE`, never a
//! glob). The wire, the errors and what differs from RoadRunner are in
//! `docs/dialects/roadrunner.md`.

use crate::broker::BrokerMessage;
use crate::protocol::{Frame, Notice, Render};

pub mod command;
pub mod conversation;
pub mod json;
pub mod publish;
pub mod reply;

pub use conversation::RoadRunnerConversation;

/// RoadRunner deliveries and gap notices, rendered once per message for
/// every RoadRunner member.
#[derive(Debug, Default, Clone, Copy)]
pub struct RoadRunnerRender;

impl Render for RoadRunnerRender {
    fn key(&self) -> &'static str {
        "roadrunner"
    }

    fn delivery(&self, message: &BrokerMessage) -> Option<Frame> {
        Some(Frame::text(reply::delivery(message)))
    }

    fn notice(&self, notice: &Notice<'_>) -> Option<Frame> {
        Some(Frame::text(reply::notice(notice)))
    }
}
