//! A dialect carried over Engine.IO: every frame it writes becomes a
//! message packet (`4` and the text). The render is wrapped too, so the
//! hub still renders each broker message once per render key, `4`
//! included, and every subscriber's queue gets the same bytes.

use std::sync::Arc;

use crate::broker::BrokerMessage;
use crate::protocol::{Answer, Conversation, Frame, Inbound, Notice, Render, Step};

/// A frame as an Engine.IO message packet.
pub fn message(frame: Frame) -> Frame {
    match frame {
        Frame::Text(t) => {
            let mut s = String::with_capacity(t.len() + 1);
            s.push('4');
            s.push_str(t.as_str());
            Frame::text(s)
        }
        other => other,
    }
}

/// A dialect's render, each frame a message packet.
pub struct PacketRender {
    inner: Arc<dyn Render>,
    key: &'static str,
}

impl PacketRender {
    /// Wraps `inner` under its own render `key` (members of the bare and
    /// the wrapped render must not share renderings).
    pub fn new(inner: Arc<dyn Render>, key: &'static str) -> PacketRender {
        PacketRender { inner, key }
    }
}

impl Render for PacketRender {
    fn key(&self) -> &'static str {
        self.key
    }

    fn delivery(&self, message: &BrokerMessage) -> Option<Frame> {
        self.inner.delivery(message).map(self::message)
    }

    fn notice(&self, notice: &Notice<'_>) -> Option<Frame> {
        self.inner.notice(notice).map(message)
    }

    fn once_per_publish(&self) -> bool {
        self.inner.once_per_publish()
    }
}

/// A dialect's conversation, each frame a message packet; the session sees
/// the message texts (the Engine.IO socket unwraps inbound packets).
pub struct PacketConversation {
    inner: Box<dyn Conversation>,
}

impl PacketConversation {
    /// Wraps `inner`, whose render should be a [`PacketRender`].
    pub fn new(inner: Box<dyn Conversation>) -> PacketConversation {
        PacketConversation { inner }
    }
}

impl Conversation for PacketConversation {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn render(&self) -> Arc<dyn Render> {
        self.inner.render()
    }

    fn decode(&mut self, inbound: Inbound<'_>, steps: &mut Vec<Step>) {
        let start = steps.len();
        self.inner.decode(inbound, steps);
        for step in steps.iter_mut().skip(start) {
            match step {
                Step::Reply(f) | Step::Malformed(f) => {
                    *f = message(std::mem::replace(f, Frame::Ping));
                }
                _ => {}
            }
        }
    }

    fn answer(&mut self, answer: Answer<'_>, out: &mut Vec<Frame>) {
        let start = out.len();
        self.inner.answer(answer, out);
        for f in out.iter_mut().skip(start) {
            *f = message(std::mem::replace(f, Frame::Ping));
        }
    }

    fn release(&mut self) -> Option<Frame> {
        self.inner.release().map(message)
    }
}
