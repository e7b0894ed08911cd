//! One RoadRunner connection: its joins and leaves in flight.
//!
//! A join of N topics is N [`Request::Subscribe`]s, tagged `j<join>.<i>`.
//! When the last of them is answered, the join is answered: `#join` with
//! the refused topics (if any), then `@join` with the others, which stay
//! joined. So `@join` means "confirmed by the broker", which RoadRunner
//! (answering before it subscribes) never promised. A leave is N
//! [`Request::Unsubscribe`]s answered by one `@leave`, after them, so that
//! nothing of those topics follows it.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use super::command::{self, Command};
use super::reply;
use super::RoadRunnerRender;
use crate::broker::Topic;
use crate::protocol::{
    Ack, AckKind, Answer, Conversation, Frame, Inbound, Refusal, Render, Request, Step,
};

/// A join or a leave waiting for the answers of its topics.
struct Batch {
    /// Numbers the batch among this connection's.
    serial: u64,
    /// The topics, as the client listed them.
    topics: Vec<String>,
    /// Which of them were refused (joins only).
    refused: Vec<bool>,
    /// Answers still to come.
    left: usize,
}

/// One RoadRunner connection; see the module docs.
#[derive(Default)]
pub struct RoadRunnerConversation {
    serial: u64,
    joins: Vec<Batch>,
    leaves: Vec<Batch>,
}

impl RoadRunnerConversation {
    /// A fresh connection.
    pub fn new() -> RoadRunnerConversation {
        RoadRunnerConversation::default()
    }

    fn start(&mut self, kind: AckKind, topics: Vec<String>, steps: &mut Vec<Step>) {
        self.serial += 1;
        let serial = self.serial;
        let prefix = match kind {
            AckKind::Subscribe => 'j',
            AckKind::Unsubscribe => 'l',
        };
        for (i, topic) in topics.iter().enumerate() {
            let topic = Topic::Channel(Bytes::copy_from_slice(topic.as_bytes()));
            let id = Some(format!("{prefix}{serial}.{i}"));
            steps.push(Step::Request(match kind {
                AckKind::Subscribe => Request::Subscribe {
                    topic,
                    id,
                    ext: None,
                    since: None,
                    join_leave: false,
                },
                AckKind::Unsubscribe => Request::Unsubscribe { topic, id },
            }));
        }
        let batch = Batch {
            serial,
            refused: vec![false; topics.len()],
            left: topics.len(),
            topics,
        };
        match kind {
            AckKind::Subscribe => self.joins.push(batch),
            AckKind::Unsubscribe => self.leaves.push(batch),
        }
    }

    /// Counts the answer to request `id` of its batch; renders the batch's
    /// answer when it was the last.
    fn answered(&mut self, kind: AckKind, id: &str, refused: bool, out: &mut Vec<Frame>) {
        let Some((serial, index)) = parse_id(kind, id) else {
            return;
        };
        let batches = match kind {
            AckKind::Subscribe => &mut self.joins,
            AckKind::Unsubscribe => &mut self.leaves,
        };
        let Some(at) = batches.iter().position(|b| b.serial == serial) else {
            return;
        };
        let batch = &mut batches[at];
        if let Some(r) = batch.refused.get_mut(index) {
            *r |= refused;
        }
        batch.left = batch.left.saturating_sub(1);
        if batch.left > 0 {
            return;
        }
        let batch = batches.remove(at);
        match kind {
            AckKind::Subscribe => {
                let pick = |refused: bool| {
                    batch
                        .topics
                        .iter()
                        .zip(&batch.refused)
                        .filter(move |(_, r)| **r == refused)
                        .map(|(t, _)| t.as_str())
                };
                if batch.refused.iter().any(|r| *r) {
                    out.push(Frame::text(reply::list(reply::REFUSED, Some(pick(true)))));
                }
                out.push(Frame::text(reply::list(reply::JOINED, Some(pick(false)))));
            }
            AckKind::Unsubscribe => {
                let topics = batch.topics.iter().map(String::as_str);
                out.push(Frame::text(reply::list(reply::LEFT, Some(topics))));
            }
        }
    }
}

/// `j3.0` -> (3, 0) for a join's request (`l` for a leave's).
fn parse_id(kind: AckKind, id: &str) -> Option<(u64, usize)> {
    let prefix = match kind {
        AckKind::Subscribe => 'j',
        AckKind::Unsubscribe => 'l',
    };
    let (serial, index) = id.strip_prefix(prefix)?.split_once('.')?;
    Some((serial.parse().ok()?, index.parse().ok()?))
}

/// Whether a join counts `refusal` as refused: holding the topic already
/// is being joined (RoadRunner's joins are idempotent).
fn refuses(refusal: Option<&Refusal>) -> bool {
    !matches!(refusal, None | Some(Refusal::AlreadySubscribed))
}

impl Conversation for RoadRunnerConversation {
    fn name(&self) -> &'static str {
        "roadrunner"
    }

    fn render(&self) -> Arc<dyn Render> {
        static RENDER: OnceLock<Arc<dyn Render>> = OnceLock::new();
        RENDER.get_or_init(|| Arc::new(RoadRunnerRender)).clone()
    }

    fn decode(&mut self, inbound: Inbound<'_>, steps: &mut Vec<Step>) {
        let bytes = match inbound {
            Inbound::Text(text) => text.as_bytes(),
            Inbound::Binary(bytes) => bytes,
        };
        match command::decode(bytes) {
            Err(rejection) => steps.push(Step::Malformed(Frame::text(reply::error(&rejection.0)))),
            Ok(Command::Headers) => {}
            Ok(Command::Join(Some(topics))) if !topics.is_empty() => {
                self.start(AckKind::Subscribe, topics, steps)
            }
            Ok(Command::Leave(Some(topics))) if !topics.is_empty() => {
                self.start(AckKind::Unsubscribe, topics, steps)
            }
            // Nothing to ask: answered at once, `null` or `[]` as given.
            Ok(Command::Join(topics)) => steps.push(Step::Reply(Frame::text(reply::list(
                reply::JOINED,
                topics.as_ref().map(|t| t.iter().map(String::as_str)),
            )))),
            Ok(Command::Leave(topics)) => steps.push(Step::Reply(Frame::text(reply::list(
                reply::LEFT,
                topics.as_ref().map(|t| t.iter().map(String::as_str)),
            )))),
        }
    }

    fn answer(&mut self, answer: Answer<'_>, out: &mut Vec<Frame>) {
        if let Answer::Ack(Ack {
            kind,
            id: Some(id),
            error,
            ..
        }) = answer
        {
            self.answered(kind, id, refuses(error), out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(frames: &[Frame]) -> Vec<&str> {
        frames.iter().filter_map(Frame::as_text).collect()
    }

    fn requests(steps: &[Step]) -> Vec<(Topic, String)> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Request(Request::Subscribe { topic, id, .. })
                | Step::Request(Request::Unsubscribe { topic, id }) => {
                    Some((topic.clone(), id.clone().unwrap_or_default()))
                }
                _ => None,
            })
            .collect()
    }

    fn ack(
        conv: &mut RoadRunnerConversation,
        kind: AckKind,
        topic: &Topic,
        id: &str,
        error: Option<Refusal>,
    ) -> Vec<Frame> {
        let mut out = Vec::new();
        conv.answer(
            Answer::Ack(Ack {
                kind,
                topic,
                id: Some(id),
                error: error.as_ref(),
                recovered: None,
            }),
            &mut out,
        );
        out
    }

    #[test]
    fn a_join_is_answered_once_its_last_topic_is() {
        let mut conv = RoadRunnerConversation::new();
        let mut steps = Vec::new();
        conv.decode(
            Inbound::Text(r#"{"command":"join","topics":["a","b","c"]}"#),
            &mut steps,
        );
        let reqs = requests(&steps);
        assert_eq!(reqs.len(), 3);
        assert!(ack(
            &mut conv,
            AckKind::Subscribe,
            &reqs[1].0,
            &reqs[1].1,
            Some(Refusal::NotAllowed)
        )
        .is_empty());
        assert!(ack(
            &mut conv,
            AckKind::Subscribe,
            &reqs[2].0,
            &reqs[2].1,
            Some(Refusal::AlreadySubscribed)
        )
        .is_empty());
        let out = ack(&mut conv, AckKind::Subscribe, &reqs[0].0, &reqs[0].1, None);
        assert_eq!(
            texts(&out),
            [
                r##"{"topic":"#join","payload":["b"]}"##,
                r#"{"topic":"@join","payload":["a","c"]}"#
            ]
        );
    }

    #[test]
    fn a_leave_is_answered_after_its_unsubscribes() {
        let mut conv = RoadRunnerConversation::new();
        let mut steps = Vec::new();
        conv.decode(
            Inbound::Binary(br#"{"command":"leave","topics":["a","x"]}"#),
            &mut steps,
        );
        let reqs = requests(&steps);
        assert!(ack(
            &mut conv,
            AckKind::Unsubscribe,
            &reqs[0].0,
            &reqs[0].1,
            None
        )
        .is_empty());
        let out = ack(
            &mut conv,
            AckKind::Unsubscribe,
            &reqs[1].0,
            &reqs[1].1,
            Some(Refusal::NotSubscribed),
        );
        assert_eq!(texts(&out), [r#"{"topic":"@leave","payload":["a","x"]}"#]);
    }

    #[test]
    fn empty_and_missing_lists_are_answered_at_once() {
        for (input, want) in [
            (
                r#"{"command":"join"}"#,
                r#"{"topic":"@join","payload":null}"#,
            ),
            (
                r#"{"command":"join","topics":[]}"#,
                r#"{"topic":"@join","payload":[]}"#,
            ),
            (
                r#"{"command":"leave"}"#,
                r#"{"topic":"@leave","payload":null}"#,
            ),
        ] {
            let mut steps = Vec::new();
            RoadRunnerConversation::new().decode(Inbound::Text(input), &mut steps);
            match steps.as_slice() {
                [Step::Reply(f)] => assert_eq!(f.as_text(), Some(want)),
                other => panic!("{input}: {other:?}"),
            }
        }
        let mut steps = Vec::new();
        RoadRunnerConversation::new().decode(Inbound::Text(r#"{"command":"headers"}"#), &mut steps);
        assert!(steps.is_empty());
    }
}
