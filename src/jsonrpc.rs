//! JSON-RPC 2.0, as nodefony's clients and cometd's `remoteCall` speak it on
//! Bayeux `/service/<name>` channels: a client publishes a request, the
//! gateway calls the registered service and answers with a response, both as
//! JSON text in the message's `data` (`docs/dialects/bayeux.md`).
//!
//! Only the codec lives here: [`parse`] reads a request from a message's
//! `data` (a JSON string holding the request's text, as nodefony sends it, or
//! the request object itself), and [`result`] / [`error`] write a response
//! byte for byte in the shape nodefony's demo and cometd read:
//!
//! ```text
//! {"jsonrpc":"2.0","result":68,"error":null,"id":7}
//! {"jsonrpc":"2.0","result":null,"error":{"code":-32601,"message":"no such method"},"id":7}
//! ```
//!
//! Batches (a JSON array of requests) are not served: they are answered
//! `-32600`, as one invalid request.

use std::borrow::Cow;

use bytes::Bytes;
use serde::de::{Deserialize, Deserializer};
use serde_json::value::RawValue;

/// `-32700`: the text is not JSON.
pub const PARSE_ERROR: i64 = -32700;
/// `-32600`: JSON, but not a JSON-RPC 2.0 request object.
pub const INVALID_REQUEST: i64 = -32600;
/// `-32601`: the method does not exist.
pub const METHOD_NOT_FOUND: i64 = -32601;

/// Deepest nesting of arrays and objects in a request, or in a result
/// embedded in a response (the request object counts as one level).
/// Deeper requests are parse errors, deeper results are carried as strings.
pub const MAX_DEPTH: usize = 64;

/// Strict JSON as the gateway embeds it anywhere: no lone surrogate
/// escapes, no number beyond `f64`, at most [`MAX_DEPTH`] deep.
fn strict(text: &str) -> bool {
    crate::protocol::native::is_strict_json(text, MAX_DEPTH)
}

/// A request read by [`parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The method's name, as sent (the router checks it).
    pub method: String,
    /// `params` as JSON text (an array or an object), `null` when absent.
    pub params: Bytes,
    /// `id` as JSON text (a string, a number or `null`); `None` for a
    /// notification (no `id` member), which gets no response.
    pub id: Option<String>,
}

/// Why [`parse`] refused: the response to send (`code`, `message`, and the
/// request's `id` when it could be read, else `null`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// [`PARSE_ERROR`] or [`INVALID_REQUEST`].
    pub code: i64,
    /// For a human.
    pub message: &'static str,
    /// The request's `id` as JSON text, when it had a valid one.
    pub id: Option<String>,
}

impl Invalid {
    /// The error response to send for it.
    pub fn response(&self) -> String {
        error(self.id.as_deref(), self.code, self.message)
    }
}

/// A member that may be present with any value, `null` included (an
/// `Option<&RawValue>` cannot tell `"id":null` from no `id`).
#[derive(Default)]
enum Member<'a> {
    #[default]
    Absent,
    Present(&'a RawValue),
}

impl<'de: 'a, 'a> Deserialize<'de> for Member<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&'a RawValue>::deserialize(d).map(Member::Present)
    }
}

/// The members of a request object; unknown ones are ignored, a repeated
/// one makes the request invalid.
#[derive(serde::Deserialize)]
struct Fields<'a> {
    #[serde(default, borrow)]
    jsonrpc: Member<'a>,
    #[serde(default, borrow)]
    method: Member<'a>,
    #[serde(default, borrow)]
    params: Member<'a>,
    #[serde(default, borrow)]
    id: Member<'a>,
}

/// Reads a request from a Bayeux message's `data` (its JSON text): a JSON
/// string is the request's text, anything else is the request itself.
pub fn parse(data: &str) -> Result<Call, Invalid> {
    let invalid = |code, message, id: Option<&RawValue>| Invalid {
        code,
        message,
        id: id.map(|i| i.get().to_owned()),
    };
    let text: Cow<'_, str> = match serde_json::from_str::<Cow<'_, str>>(data) {
        Ok(inner) => inner,
        Err(_) => Cow::Borrowed(data),
    };
    // Strict first: a lone surrogate or an out-of-range number would pass
    // through to the service, and to clients, as text a strict reader
    // refuses.
    let value = match serde_json::from_str::<&RawValue>(&text) {
        Ok(value) if strict(&text) => value,
        _ => return Err(invalid(PARSE_ERROR, "parse error", None)),
    };
    let trimmed = value.get();
    if !trimmed.starts_with('{') {
        return Err(invalid(
            INVALID_REQUEST,
            if trimmed.starts_with('[') {
                "batch requests are not supported"
            } else {
                "invalid request"
            },
            None,
        ));
    }
    let Ok(fields) = serde_json::from_str::<Fields<'_>>(trimmed) else {
        return Err(invalid(INVALID_REQUEST, "invalid request", None));
    };
    // The id first: every later refusal echoes it.
    let id = match fields.id {
        Member::Absent => None,
        Member::Present(id) => match id.get().as_bytes().first() {
            Some(b'"' | b'-' | b'0'..=b'9') => Some(id),
            _ if id.get() == "null" => Some(id),
            _ => return Err(invalid(INVALID_REQUEST, "invalid id", None)),
        },
    };
    let version = match fields.jsonrpc {
        Member::Present(v) => serde_json::from_str::<Cow<'_, str>>(v.get()).ok(),
        Member::Absent => None,
    };
    if version.as_deref() != Some("2.0") {
        return Err(invalid(INVALID_REQUEST, "jsonrpc must be \"2.0\"", id));
    }
    let method = match fields.method {
        Member::Present(m) => serde_json::from_str::<String>(m.get()).ok(),
        Member::Absent => None,
    };
    let Some(method) = method else {
        return Err(invalid(INVALID_REQUEST, "method must be a string", id));
    };
    let params = match fields.params {
        Member::Absent => Bytes::from_static(b"null"),
        Member::Present(p) if p.get().starts_with(['[', '{']) => {
            Bytes::copy_from_slice(p.get().as_bytes())
        }
        Member::Present(_) => {
            return Err(invalid(
                INVALID_REQUEST,
                "params must be an array or an object",
                id,
            ))
        }
    };
    Ok(Call {
        method,
        params,
        id: id.map(|i| i.get().to_owned()),
    })
}

/// A successful response: `{"jsonrpc":"2.0","result":<result>,"error":null,"id":<id>}`.
/// `result` is embedded as it is when it is strict JSON (at most
/// [`MAX_DEPTH`] deep), else as a JSON string of its text (a service cannot
/// break the response); `id` `None` is `null`.
pub fn result(id: Option<&str>, result: &[u8]) -> String {
    let id = id.unwrap_or("null");
    let embedded: Cow<'_, str> = match std::str::from_utf8(result) {
        Ok(text) if strict(text) => Cow::Borrowed(text.trim()),
        _ => Cow::Owned(json_string(&String::from_utf8_lossy(result))),
    };
    format!(r#"{{"jsonrpc":"2.0","result":{embedded},"error":null,"id":{id}}}"#)
}

/// An error response: `{"jsonrpc":"2.0","result":null,"error":{"code":..,"message":..},"id":<id>}`.
pub fn error(id: Option<&str>, code: i64, message: &str) -> String {
    let id = id.unwrap_or("null");
    let message = json_string(message);
    format!(
        r#"{{"jsonrpc":"2.0","result":null,"error":{{"code":{code},"message":{message}}},"id":{id}}}"#
    )
}

/// `s` as a JSON string.
fn json_string(s: &str) -> String {
    // Serialising a &str cannot fail; the fallback keeps this total.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(method: &str, params: &str, id: Option<&str>) -> Call {
        Call {
            method: method.to_owned(),
            params: Bytes::copy_from_slice(params.as_bytes()),
            id: id.map(str::to_owned),
        }
    }

    fn refused(code: i64, message: &'static str, id: Option<&str>) -> Invalid {
        Invalid {
            code,
            message,
            id: id.map(str::to_owned),
        }
    }

    #[test]
    fn reads_an_object_or_its_text_in_a_string() {
        let text = r#"{"jsonrpc":"2.0","method":"charge","params":{"cents":5},"id":7}"#;
        let want = call("charge", r#"{"cents":5}"#, Some("7"));
        assert_eq!(parse(text), Ok(want.clone()));
        let quoted = serde_json::to_string(text).unwrap();
        assert_eq!(parse(&quoted), Ok(want));
    }

    #[test]
    fn ids_are_kept_as_sent() {
        for id in [r#""c9""#, "7", "-1.5e3", "null", r#""\u00e9""#] {
            let text = format!(r#"{{"jsonrpc":"2.0","method":"m","id":{id}}}"#);
            assert_eq!(parse(&text), Ok(call("m", "null", Some(id))), "{id}");
        }
        let note = r#"{"jsonrpc":"2.0","method":"m","params":[1,2]}"#;
        assert_eq!(parse(note), Ok(call("m", "[1,2]", None)));
    }

    #[test]
    fn refusals_echo_the_id_when_it_was_readable() {
        let cases: &[(&str, Invalid)] = &[
            ("READY", refused(PARSE_ERROR, "parse error", None)),
            (r#""READY""#, refused(PARSE_ERROR, "parse error", None)),
            ("{", refused(PARSE_ERROR, "parse error", None)),
            (
                r#"{"jsonrpc":"2.0","method":"m","params":["\ud800"],"id":1}"#,
                refused(PARSE_ERROR, "parse error", None),
            ),
            (
                r#"{"jsonrpc":"2.0","method":"m","params":[1e400],"id":1}"#,
                refused(PARSE_ERROR, "parse error", None),
            ),
            ("42", refused(INVALID_REQUEST, "invalid request", None)),
            (
                r#"[{"jsonrpc":"2.0","method":"m","id":1}]"#,
                refused(INVALID_REQUEST, "batch requests are not supported", None),
            ),
            (
                r#"{"method":"m","id":3}"#,
                refused(INVALID_REQUEST, "jsonrpc must be \"2.0\"", Some("3")),
            ),
            (
                r#"{"jsonrpc":2.0,"method":"m","id":"a"}"#,
                refused(INVALID_REQUEST, "jsonrpc must be \"2.0\"", Some(r#""a""#)),
            ),
            (
                r#"{"jsonrpc":"2.0","method":5,"id":3}"#,
                refused(INVALID_REQUEST, "method must be a string", Some("3")),
            ),
            (
                r#"{"jsonrpc":"2.0","id":3}"#,
                refused(INVALID_REQUEST, "method must be a string", Some("3")),
            ),
            (
                r#"{"jsonrpc":"2.0","method":"m","params":5,"id":3}"#,
                refused(
                    INVALID_REQUEST,
                    "params must be an array or an object",
                    Some("3"),
                ),
            ),
            (
                r#"{"jsonrpc":"2.0","method":"m","id":{"x":1}}"#,
                refused(INVALID_REQUEST, "invalid id", None),
            ),
            (
                r#"{"jsonrpc":"2.0","method":"m","method":"n","id":1}"#,
                refused(INVALID_REQUEST, "invalid request", None),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse(text).as_ref(), Err(want), "{text}");
        }
    }

    #[test]
    fn responses_byte_for_byte() {
        assert_eq!(
            result(Some("7"), b"68"),
            r#"{"jsonrpc":"2.0","result":68,"error":null,"id":7}"#
        );
        assert_eq!(
            result(None, br#"{"ok":true}"#),
            r#"{"jsonrpc":"2.0","result":{"ok":true},"error":null,"id":null}"#
        );
        // Not strict JSON: carried as a string rather than breaking the
        // response.
        assert_eq!(
            result(Some("1"), b"1e400"),
            r#"{"jsonrpc":"2.0","result":"1e400","error":null,"id":1}"#
        );
        assert_eq!(
            result(Some(r#""a""#), b"not \"json\""),
            r#"{"jsonrpc":"2.0","result":"not \"json\"","error":null,"id":"a"}"#
        );
        assert_eq!(
            error(Some("7"), METHOD_NOT_FOUND, "no such method"),
            r#"{"jsonrpc":"2.0","result":null,"error":{"code":-32601,"message":"no such method"},"id":7}"#
        );
        assert_eq!(
            refused(PARSE_ERROR, "parse error", None).response(),
            r#"{"jsonrpc":"2.0","result":null,"error":{"code":-32700,"message":"parse error"},"id":null}"#
        );
    }

    #[test]
    fn every_response_is_json_that_reads_back() {
        for text in ["x", "{}", r#"{"jsonrpc":"2.0","method":"m","id":"q\"\\"}"#] {
            let response = match parse(text) {
                Ok(c) => result(c.id.as_deref(), b"[1]"),
                Err(e) => e.response(),
            };
            let v: serde_json::Value = serde_json::from_str(&response).unwrap();
            assert_eq!(v["jsonrpc"], "2.0", "{response}");
        }
    }
}
