//! Publishing from outside Redis: what `POST /publish` and a client's own
//! publish over its socket (in every dialect that has one) share, so that the
//! two can never disagree on what a publish means.
//!
//! - The payload rule ([`json_payload`]): a JSON-valued payload is published
//!   as its JSON text exactly as sent, a string with its quotes, so every
//!   subscriber gets back the value that was published
//!   (`docs/protocol.md`, "HTTP publish").

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

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

#[cfg(test)]
mod tests {
    use super::*;

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
