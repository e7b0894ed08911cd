//! RoadRunner's broadcast RPC (`broadcast.Publish`, `broadcast.PublishAsync`)
//! in its JSON form, as `POST WSGATE_ROADRUNNER_PUBLISH_PATH`:
//! `{"messages":[{"command"?, "topics":[..], "payload":"<base64>"}]}`.
//!
//! `payload` is bytes, written as protobuf's JSON writes bytes (base64), and
//! is published as those bytes, unchanged; `payload_text` carries plain
//! text instead, published as is. Each topic of each message is one publish
//! (`command` is ignored, as RoadRunner ignores it); a message with no
//! payload publishes empty bytes, as a protobuf message without the field
//! would.

use bytes::Bytes;
use serde::Deserialize;

use super::command::base64_decode;
use crate::broker::Publication;

/// One message of the request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Message {
    #[serde(default)]
    #[allow(dead_code)]
    command: Option<String>,
    #[serde(default)]
    topics: Option<Vec<String>>,
    #[serde(default)]
    payload: Option<String>,
    #[serde(default)]
    payload_text: Option<String>,
}

/// The request body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    messages: Vec<Message>,
}

/// The publications a body asks for, in order, or why it cannot be served
/// (nothing is published then). `max_topic` is `WSGATE_MAX_PATTERN_BYTES`.
pub fn parse(body: &[u8], max_topic: usize) -> Result<Vec<Publication>, String> {
    let body: Body = serde_json::from_slice(body).map_err(|e| {
        format!(r#"invalid body: {e}: expected {{"messages":[{{"topics":[..],"payload":"<base64>"}}]}} (or "payload_text" instead of "payload")"#)
    })?;
    if body.messages.is_empty() {
        return Err(r#""messages" must hold at least one message"#.to_owned());
    }
    let mut all = Vec::new();
    for (i, m) in body.messages.into_iter().enumerate() {
        let payload = match (m.payload, m.payload_text) {
            (Some(b64), None) => Bytes::from(
                base64_decode(&b64)
                    .ok_or_else(|| format!("messages[{i}]: \"payload\" must be base64"))?,
            ),
            (None, Some(text)) => Bytes::from(text),
            (None, None) => Bytes::new(),
            (Some(_), Some(_)) => {
                return Err(format!(
                    r#"messages[{i}]: give either "payload" or "payload_text", not both"#
                ))
            }
        };
        for topic in m.topics.unwrap_or_default() {
            if topic.is_empty() || topic.len() > max_topic {
                return Err(format!(
                    "messages[{i}]: a topic must be 1 to {max_topic} bytes"
                ));
            }
            all.push(Publication {
                channel: Bytes::from(topic),
                payload: payload.clone(),
                idempotency_key: None,
            });
        }
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(body: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
        parse(body.as_bytes(), 16).map(|all| {
            all.into_iter()
                .map(|p| {
                    (
                        String::from_utf8_lossy(&p.channel).into_owned(),
                        p.payload.to_vec(),
                    )
                })
                .collect()
        })
    }

    #[test]
    fn each_topic_of_each_message_is_one_publish() {
        assert_eq!(
            parsed(
                r#"{"messages":[{"command":"x","topics":["a","b"],"payload":"/wA="},{"topics":["c"],"payload_text":"hi"}]}"#
            ),
            Ok(vec![
                ("a".into(), vec![0xff, 0]),
                ("b".into(), vec![0xff, 0]),
                ("c".into(), b"hi".to_vec())
            ])
        );
        assert_eq!(
            parsed(r#"{"messages":[{"topics":["a"]}]}"#),
            Ok(vec![("a".into(), vec![])])
        );
        assert_eq!(parsed(r#"{"messages":[{"payload":"aGk="}]}"#), Ok(vec![]));
    }

    #[test]
    fn refuses_what_it_cannot_publish() {
        for (body, want) in [
            (
                r#"{"messages":[]}"#,
                "\"messages\" must hold at least one message",
            ),
            (
                r#"{"messages":[{"topics":["a"],"payload":"*"}]}"#,
                "messages[0]: \"payload\" must be base64",
            ),
            (
                r#"{"messages":[{"topics":["a"],"payload":"","payload_text":""}]}"#,
                "not both",
            ),
            (
                r#"{"messages":[{"topics":[""]}]}"#,
                "messages[0]: a topic must be 1 to 16 bytes",
            ),
            (
                r#"{"messages":[{"topics":["aaaaaaaaaaaaaaaaa"]}]}"#,
                "1 to 16 bytes",
            ),
            (r#"{"messages":[{"topic":"a"}]}"#, "unknown field `topic`"),
            (r#"{}"#, "missing field `messages`"),
            ("nope", "invalid body"),
        ] {
            let e = parsed(body).unwrap_err();
            assert!(e.contains(want), "{body}: {e}");
        }
    }
}
