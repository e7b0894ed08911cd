//! A realizehit pattern (`{"channel":"cnn","tvshow":"simpsons"}`) as the
//! exact Redis channel it names (`channel:cnn|tvshow:simpsons`), and the
//! subscription id clients know it by (the first 8 hex digits of the md5
//! of that channel).
//!
//! The checks and their error texts are those of `realizehit-subscription`
//! 0.1.9, which the shipped server used, including how JavaScript turns a
//! value into a string (`5` -> `"5"`, `true` -> `"true"`, `[1]` -> `"1"`,
//! an object -> `"[object Object]"`) and which values count as missing
//! (`0`, `false`, `null`, `""`).

use md5::{Digest, Md5};
use serde_json::Value;

/// The pattern is not an object (a string, a number, `true`).
pub const INVALID_FILTERS: &str = "invalid filters provided";
/// A filter name outside `[0-9A-Za-z]`.
pub const INVALID_FILTER: &str = "invalid filter provided";
/// A value outside `[0-9A-Za-z]` once stringified.
pub const INVALID_CHUNK: &str = "invalid chunk provided";
/// An empty name, or a value that JavaScript counts as false.
pub const CHUNK_NOT_DEFINED: &str = "chunk not defined";
/// No filters at all (`{}`, `null`, a missing `pat`).
pub const NO_FILTERS: &str = "Cannot stringify without having filters";
/// A value that stringifies to nothing (`[]`).
pub const EMPTY_CHUNK: &str = "invalid filter.prop chunk provided";

/// The channel a `pat` names, or the shipped server's error text. `None`
/// is a missing `pat`.
pub fn channel(pat: Option<&Value>) -> Result<String, &'static str> {
    let filters: Vec<(String, &Value)> = match pat {
        None | Some(Value::Null) => return Err(NO_FILTERS),
        Some(Value::Object(map)) => map.iter().map(|(k, v)| (k.clone(), v)).collect(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| (i.to_string(), v))
            .collect(),
        Some(v) if !truthy(v) => return Err(NO_FILTERS),
        Some(_) => return Err(INVALID_FILTERS),
    };
    let mut chunks = Vec::with_capacity(filters.len());
    for (name, value) in filters {
        if name.is_empty() {
            return Err(CHUNK_NOT_DEFINED);
        }
        if !alnum(&name) {
            return Err(INVALID_FILTER);
        }
        if !truthy(value) {
            return Err(CHUNK_NOT_DEFINED);
        }
        let chunk = js_string(value).ok_or(INVALID_CHUNK)?;
        if !alnum(&chunk) {
            return Err(INVALID_CHUNK);
        }
        chunks.push((name, chunk));
    }
    if chunks.is_empty() {
        return Err(NO_FILTERS);
    }
    // Names are ASCII: byte order is JavaScript's code-unit order.
    chunks.sort();
    let mut out = String::new();
    for (i, (name, chunk)) in chunks.iter().enumerate() {
        if chunk.is_empty() {
            return Err(EMPTY_CHUNK);
        }
        if i > 0 {
            out.push('|');
        }
        out.push_str(name);
        out.push(':');
        out.push_str(chunk);
    }
    Ok(out)
}

/// The subscription id of a channel: md5, hex, first 8 digits.
pub fn id(channel: &[u8]) -> [u8; 8] {
    let digest = Md5::digest(channel);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 8];
    for (i, byte) in digest.iter().take(4).enumerate() {
        out[2 * i] = HEX[usize::from(byte >> 4)];
        out[2 * i + 1] = HEX[usize::from(byte & 0xF)];
    }
    out
}

/// `[0-9A-Za-z]*`, the shipped check (which lets the empty string pass).
fn alnum(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// JavaScript's truthiness of a JSON value.
pub fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

/// `value + ''` in JavaScript, where it can matter: `None` for what can
/// only fail the `[0-9A-Za-z]` check anyway (a number with an exponent).
fn js_string(v: &Value) -> Option<String> {
    Some(match v {
        Value::Null => String::new(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => {
            let f = n.as_f64()?;
            // JavaScript writes 1e21 and beyond with an exponent; below,
            // Rust's shortest round-trip digits are JavaScript's.
            if f.abs() >= 1e21 {
                return None;
            }
            format!("{f}")
        }
        Value::String(s) => s.clone(),
        Value::Array(items) => {
            let mut parts = Vec::with_capacity(items.len());
            for item in items {
                parts.push(match item {
                    Value::Null => String::new(),
                    other => js_string(other)?,
                });
            }
            parts.join(",")
        }
        Value::Object(_) => "[object Object]".to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn channels_and_ids_match_the_shipped_code() {
        let c = channel(Some(&json!({"tvshow": "simpsons", "channel": "cnn"})));
        assert_eq!(c.as_deref(), Ok("channel:cnn|tvshow:simpsons"));
        assert_eq!(&id(b"channel:cnn|tvshow:simpsons"), b"54797868");
        assert_eq!(&id(b"testing:yolasda"), b"540d034d");
        assert_eq!(&id(b"foo:bar"), b"4e99e8c1");
        assert_eq!(channel(Some(&json!({"a": 5}))).as_deref(), Ok("a:5"));
        assert_eq!(channel(Some(&json!({"a": 1e3}))).as_deref(), Ok("a:1000"));
        assert_eq!(channel(Some(&json!({"a": true}))).as_deref(), Ok("a:true"));
        assert_eq!(channel(Some(&json!({"a": [7]}))).as_deref(), Ok("a:7"));
        assert_eq!(channel(Some(&json!(["x"]))).as_deref(), Ok("0:x"));
        assert_eq!(
            channel(Some(&json!({"B": "1", "a": "2"}))).as_deref(),
            Ok("B:1|a:2")
        );
    }

    #[test]
    fn errors_are_the_shipped_texts() {
        let cases = [
            (json!("foo"), INVALID_FILTERS),
            (json!(5), INVALID_FILTERS),
            (json!(null), NO_FILTERS),
            (json!({}), NO_FILTERS),
            (json!(false), NO_FILTERS),
            (json!({"a-b": "x"}), INVALID_FILTER),
            (json!({"": "x"}), CHUNK_NOT_DEFINED),
            (json!({"a": ""}), CHUNK_NOT_DEFINED),
            (json!({"a": 0}), CHUNK_NOT_DEFINED),
            (json!({"a": "x y"}), INVALID_CHUNK),
            (json!({"a": 1.5}), INVALID_CHUNK),
            (json!({"a": -1}), INVALID_CHUNK),
            (json!({"a": 1e21}), INVALID_CHUNK),
            (json!({"a": {}}), INVALID_CHUNK),
            (json!({"a": []}), EMPTY_CHUNK),
            (json!({"a": "é"}), INVALID_CHUNK),
        ];
        for (pat, err) in cases {
            assert_eq!(channel(Some(&pat)), Err(err), "{pat}");
        }
        assert_eq!(channel(None), Err(NO_FILTERS));
    }
}
