//! realizehit's HTTP publisher (server-api): `POST {pattern, payload}`,
//! answered in plain text. The body is read here; the route publishes.

use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::Value;

use super::pattern;
use crate::broker::Publication;

/// Success.
pub const QUEUED: &str = "Your payload has been queued for delivery";
/// The body is no JSON object.
pub const NO_BODY: &str = "Please include your arguments on body";
/// `pattern` missing, no object, or empty.
pub const NO_PATTERN: &str = "Please include .pattern in your request body";
/// `payload` missing.
pub const NO_PAYLOAD: &str = "Please include .payload in your request body";
/// The broker failed.
pub const FAILED: &str = "An error has occurred on the Server, sorry";

/// The publication a body asks for, or the 400's text. The payload is
/// published as the JSON text sent (a string with its quotes), which is
/// what `JSON.stringify` of the parsed value gave, up to spacing.
pub fn parse(body: &[u8]) -> Result<Publication, &'static str> {
    let fields: serde_json::Map<String, Value> = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => map,
        _ => return Err(NO_BODY),
    };
    match fields.get("pattern") {
        Some(Value::Object(m)) if !m.is_empty() => {}
        Some(Value::Array(a)) if !a.is_empty() => {}
        _ => return Err(NO_PATTERN),
    }
    let channel = pattern::channel(fields.get("pattern"))?;
    // The payload's own text, as sent.
    #[derive(serde::Deserialize)]
    struct Raw<'a> {
        #[serde(borrow)]
        payload: Option<&'a RawValue>,
    }
    let raw: Raw<'_> = serde_json::from_slice(body).map_err(|_| NO_BODY)?;
    let payload = match (raw.payload, fields.contains_key("payload")) {
        (Some(raw), _) => Bytes::copy_from_slice(raw.get().as_bytes()),
        // `"payload": null` is a payload (only a missing one is refused).
        (None, true) => Bytes::from_static(b"null"),
        (None, false) => return Err(NO_PAYLOAD),
    };
    Ok(Publication {
        channel: Bytes::from(channel),
        payload,
        idempotency_key: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies() {
        let p = parse(r#"{"pattern":{"b":"2","a":1},"payload":{"x":"é"}}"#.as_bytes());
        let p = p.as_ref().map(|p| (&p.channel[..], &p.payload[..]));
        assert_eq!(p, Ok((&b"a:1|b:2"[..], r#"{"x":"é"}"#.as_bytes())));
        assert_eq!(parse(b"[1]").err(), Some(NO_BODY));
        assert_eq!(parse(b"nope").err(), Some(NO_BODY));
        assert_eq!(parse(br#"{"payload":1}"#).err(), Some(NO_PATTERN));
        assert_eq!(
            parse(br#"{"pattern":{},"payload":1}"#).err(),
            Some(NO_PATTERN)
        );
        assert_eq!(parse(br#"{"pattern":{"a":"b"}}"#).err(), Some(NO_PAYLOAD));
        assert_eq!(
            parse(br#"{"pattern":{"a":"b c"},"payload":1}"#).err(),
            Some(pattern::INVALID_CHUNK)
        );
        assert!(parse(br#"{"pattern":{"a":"b"},"payload":null}"#).is_ok());
    }
}
