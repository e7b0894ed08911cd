//! A RoadRunner client's frame: `{"command":"join"|"leave"|"headers",
//! "topics":[..], "payload"?: <base64>}`, in a text or a binary frame.
//!
//! RoadRunner reads it into its protobuf `Message` with Go's JSON rules:
//! other fields are ignored, and field names match without regard to ASCII
//! case (`"Command"` works). Whatever it cannot read, RoadRunner only logs;
//! here it is a [`Rejection`] the client is told about (`#error`).

use base64::Engine as _;
use serde_json::{Map, Value};

/// What a frame asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Subscribe to these topics (`None`: the frame had no list, answered
    /// `"payload":null` as RoadRunner does).
    Join(Option<Vec<String>>),
    /// Unsubscribe from these topics.
    Leave(Option<Vec<String>>),
    /// RoadRunner's `headers`: accepted, and nothing to do.
    Headers,
}

/// Why a frame is not a command, for the `#error` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection(pub String);

/// Reads one frame.
pub fn decode(bytes: &[u8]) -> Result<Command, Rejection> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| Rejection(format!("invalid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(Rejection("a command must be a JSON object".to_owned()));
    };
    let command = match field(&obj, "command") {
        None | Some(Value::Null) => return Err(Rejection("missing field \"command\"".to_owned())),
        Some(Value::String(c)) => c.as_str(),
        Some(_) => return Err(Rejection("\"command\" must be a string".to_owned())),
    };
    let topics = match field(&obj, "topics") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => {
            let mut topics = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Value::String(t) => topics.push(t.clone()),
                    _ => return Err(topics_error()),
                }
            }
            Some(topics)
        }
        Some(_) => return Err(topics_error()),
    };
    match field(&obj, "payload") {
        None | Some(Value::Null) => {}
        Some(Value::String(p)) if base64_ok(p) => {}
        Some(_) => return Err(Rejection("\"payload\" must be base64 text".to_owned())),
    }
    match command {
        "join" => Ok(Command::Join(topics)),
        "leave" => Ok(Command::Leave(topics)),
        "headers" => Ok(Command::Headers),
        other => Err(Rejection(format!(
            "unknown command {}: expected join, leave or headers",
            Value::String(other.to_owned())
        ))),
    }
}

fn topics_error() -> Rejection {
    Rejection("\"topics\" must be an array of strings".to_owned())
}

/// A field by Go's rule: the exact name, else one equal to it without
/// regard to ASCII case.
fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

/// Bytes as protobuf's JSON writes them: standard or URL-safe base64,
/// padded or not.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
    use base64::engine::DecodePaddingMode;
    let config =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    let standard = GeneralPurpose::new(&base64::alphabet::STANDARD, config);
    let url_safe = GeneralPurpose::new(&base64::alphabet::URL_SAFE, config);
    standard
        .decode(text)
        .or_else(|_| url_safe.decode(text))
        .ok()
}

fn base64_ok(text: &str) -> bool {
    base64_decode(text).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics(t: &[&str]) -> Option<Vec<String>> {
        Some(t.iter().map(|s| (*s).to_owned()).collect())
    }

    #[test]
    fn reads_commands() {
        assert_eq!(
            decode(br#"{"command":"join","topics":["a","b"]}"#),
            Ok(Command::Join(topics(&["a", "b"])))
        );
        assert_eq!(
            decode(br#"{"Command":"leave","TOPICS":["a"],"x":1}"#),
            Ok(Command::Leave(topics(&["a"])))
        );
        assert_eq!(decode(br#"{"command":"join"}"#), Ok(Command::Join(None)));
        assert_eq!(
            decode(br#"{"command":"join","topics":null}"#),
            Ok(Command::Join(None))
        );
        assert_eq!(
            decode(br#"{"command":"headers","payload":"eyJhIjoxfQ=="}"#),
            Ok(Command::Headers)
        );
        assert_eq!(
            decode(br#"{"command":"join","topics":["x"],"payload":"eyJhIjoxfQ"}"#),
            Ok(Command::Join(topics(&["x"])))
        );
    }

    #[test]
    fn rejects_what_it_cannot_read() {
        for (input, reason) in [
            (
                &b"nope"[..],
                "invalid JSON: expected ident at line 1 column 2",
            ),
            (b"[1]", "a command must be a JSON object"),
            (b"{}", "missing field \"command\""),
            (br#"{"command":1}"#, "\"command\" must be a string"),
            (
                br#"{"command":"jump"}"#,
                "unknown command \"jump\": expected join, leave or headers",
            ),
            (
                br#"{"command":"join","topics":"a"}"#,
                "\"topics\" must be an array of strings",
            ),
            (
                br#"{"command":"join","topics":[1]}"#,
                "\"topics\" must be an array of strings",
            ),
            (
                br#"{"command":"join","topics":[],"payload":"!!"}"#,
                "\"payload\" must be base64 text",
            ),
            (b"\xff", "invalid JSON: expected value at line 1 column 1"),
        ] {
            assert_eq!(
                decode(input),
                Err(Rejection(reason.to_owned())),
                "{input:?}"
            );
        }
    }

    #[test]
    fn base64_as_protobuf_json_accepts_it() {
        assert_eq!(base64_decode("aGk=").as_deref(), Some(&b"hi"[..]));
        assert_eq!(base64_decode("aGk").as_deref(), Some(&b"hi"[..]));
        assert_eq!(base64_decode("-_8").as_deref(), Some(&[0xfb, 0xff][..]));
        assert_eq!(base64_decode("+/8=").as_deref(), Some(&[0xfb, 0xff][..]));
        assert_eq!(base64_decode("a"), None);
    }
}
