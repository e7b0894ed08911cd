//! Reading what Bayeux clients send: a JSON message object or an array of
//! them, in a WebSocket text frame, a POST body (`application/json`, or the
//! `message=<urlencoded JSON>` form that Faye's cross-origin transport and
//! JSONP send), within limits.
//!
//! Errors come at two levels. A body that cannot be read at all (too large,
//! not UTF-8, not JSON, nested too deep, neither an object nor an array, too
//! many messages, a content type we do not read) is a [`DecodeError`]: one
//! `400` reply for the whole body ([`super::reply::bad_body`]). Inside a
//! readable batch, each message stands alone: one that is wrong becomes a
//! [`MessageError`] carrying whatever of its `id` and `channel` could be read,
//! answered on its own ([`super::reply::rejected`]), while the messages beside
//! it are decoded and served as usual.
//!
//! Decoding checks shape and channel syntax only. Whether the `clientId` is
//! known, the ACLs and the authorisation callback are the session's.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::channel::{self, Class, Meta};
use super::reply::Error;
use crate::protocol::native::is_strict_json;

/// Deepest nesting of arrays and objects in a body, the batch array and the
/// message object included. A published `data` may so nest 62 levels, well
/// within what any delivery can embed as JSON.
pub const DEFAULT_MAX_DEPTH: usize = 64;

/// Most messages in one body. A batch of thousands of tiny messages would
/// cost a reply each; real clients batch a handful.
pub const DEFAULT_MAX_MESSAGES: usize = 1024;

/// Bounds on one body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest body or frame in bytes, as received (`WSGATE_MAX_MESSAGE_BYTES`).
    pub max_bytes: usize,
    /// Deepest nesting, see [`DEFAULT_MAX_DEPTH`]. serde_json itself stops at
    /// 127 levels, so larger values act as 127.
    pub max_depth: usize,
    /// Most messages per body, see [`DEFAULT_MAX_MESSAGES`].
    pub max_messages: usize,
}

impl Limits {
    /// The limits for a body of at most `max_bytes`, with the default depth
    /// and count.
    pub const fn new(max_bytes: usize) -> Limits {
        Limits {
            max_bytes,
            max_depth: DEFAULT_MAX_DEPTH,
            max_messages: DEFAULT_MAX_MESSAGES,
        }
    }
}

/// A message `id`, kept as the JSON the client sent (a string or a number),
/// because every reply must echo it unchanged.
#[derive(Debug, Clone)]
pub struct Id(Box<RawValue>);

impl Id {
    /// A string id (tests, and messages the gateway itself originates).
    pub fn string(id: &str) -> Id {
        // A serialised &str is always valid JSON, so neither step can fail;
        // the fallbacks (`""`, then `null`) keep this total anyway.
        let json = serde_json::to_string(id).unwrap_or_else(|_| "\"\"".to_owned());
        Id(RawValue::from_string(json).unwrap_or_default())
    }

    /// An id from its JSON text (as [`Id::json`] gave it), if that is JSON.
    pub fn from_json(text: &str) -> Option<Id> {
        RawValue::from_string(text.to_owned()).ok().map(Id)
    }

    /// The id as JSON text, e.g. `"5"` (with the quotes) or `5`.
    pub fn json(&self) -> &RawValue {
        &self.0
    }
}

impl PartialEq for Id {
    fn eq(&self, other: &Id) -> bool {
        self.0.get() == other.0.get()
    }
}

impl Eq for Id {}

/// How a client will receive: the `connectionType` of a `/meta/connect`,
/// matched case-insensitively (nodefony sends `WEBSOCKET`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionType {
    /// `websocket`.
    WebSocket,
    /// `long-polling`.
    LongPolling,
    /// `cross-origin-long-polling`: long-polling with CORS.
    CrossOriginLongPolling,
    /// `callback-polling`: JSONP.
    CallbackPolling,
}

impl ConnectionType {
    /// Every type, in the order a handshake reply lists them.
    pub const ALL: [ConnectionType; 4] = [
        ConnectionType::WebSocket,
        ConnectionType::LongPolling,
        ConnectionType::CrossOriginLongPolling,
        ConnectionType::CallbackPolling,
    ];

    /// The type named `name`, in any case; `None` for anything else (faye's
    /// `eventsource`, `in-process`).
    pub fn parse(name: &str) -> Option<ConnectionType> {
        ConnectionType::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(name))
    }

    /// The wire name, lowercase.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionType::WebSocket => "websocket",
            ConnectionType::LongPolling => "long-polling",
            ConnectionType::CrossOriginLongPolling => "cross-origin-long-polling",
            ConnectionType::CallbackPolling => "callback-polling",
        }
    }
}

/// One decoded Bayeux message.
#[derive(Debug)]
pub struct Message {
    /// The `id`, echoed by every reply.
    pub id: Option<Id>,
    /// The `clientId` as sent (unchecked: is it a live session? the
    /// session decides; see [`super::client_id::ClientId::parse`]).
    pub client_id: Option<String>,
    /// The `ext` object, as sent (for the authorisation callback of a
    /// subscribe; a handshake's token is already taken out into
    /// [`Kind::Handshake`]).
    pub ext: Option<Box<RawValue>>,
    /// What the message asks, by channel.
    pub kind: Kind,
}

/// What a message asks for.
#[derive(Debug)]
pub enum Kind {
    /// `/meta/handshake`.
    Handshake {
        /// `supportedConnectionTypes`, lowercased, as listed (empty if absent).
        connection_types: Vec<String>,
        /// `ext.token`: a JWT, checked like the one on `/ws`.
        token: Option<String>,
    },
    /// `/meta/connect`.
    Connect {
        /// `connectionType`; `None` if absent.
        connection_type: Option<ConnectionType>,
        /// `advice.timeout` in milliseconds, when the client sent one (`0`:
        /// answer at once). A malformed advice is ignored: it is a hint.
        timeout_ms: Option<u64>,
    },
    /// `/meta/subscribe`: each name is checked on its own with
    /// [`channel::Subscription::parse`], and answered on its own.
    Subscribe {
        /// `subscription`: one name or several, never empty.
        subscriptions: Vec<String>,
    },
    /// `/meta/unsubscribe`, likewise.
    Unsubscribe {
        /// `subscription`: one name or several, never empty.
        subscriptions: Vec<String>,
    },
    /// `/meta/disconnect`.
    Disconnect,
    /// A publish to a broadcast channel (a valid name, no wildcard).
    Publish {
        /// The channel, also the Redis channel.
        channel: String,
        /// `data` as sent (`null` included): published to Redis verbatim.
        data: Box<RawValue>,
    },
    /// A message to a `/service/**` channel: request/response, never
    /// broadcast (refused `404 No such service` until services exist).
    Service {
        /// The channel.
        channel: String,
        /// `data` as sent.
        data: Box<RawValue>,
    },
}

/// A body that cannot be read as a batch of Bayeux messages. Answered with one
/// `400:<reason>:Bad request` for the whole body; nothing in it is acted on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// More than [`Limits::max_bytes`].
    #[error("body of {size} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Bytes received.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A POST whose `Content-Type` is neither JSON, a form nor plain text.
    #[error("unsupported content type")]
    ContentType,
    /// A form body without a `message` field.
    #[error("form body has no message field")]
    NoMessageField,
    /// A form field that is not valid percent-encoding.
    #[error("bad form encoding")]
    BadForm,
    /// Not valid UTF-8.
    #[error("not UTF-8")]
    NotUtf8,
    /// Not one JSON document (or one a strict reader rejects, such as a lone
    /// surrogate escape).
    #[error("not JSON")]
    NotJson,
    /// Nested deeper than [`Limits::max_depth`].
    #[error("nested deeper than {max} levels")]
    TooDeep {
        /// The limit.
        max: usize,
    },
    /// JSON, but neither an object nor an array.
    #[error("neither a message object nor an array of them")]
    NotObjectOrArray,
    /// More than [`Limits::max_messages`] messages.
    #[error("more than {max} messages")]
    TooManyMessages {
        /// The limit.
        max: usize,
    },
}

impl DecodeError {
    /// The short reason for the error's `args`, in the characters the
    /// Bayeux error grammar allows (letters, digits, space, `-_!~()$@/*.`).
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "body too large",
            DecodeError::ContentType => "unsupported content type",
            DecodeError::NoMessageField => "no message field",
            DecodeError::BadForm => "bad form encoding",
            DecodeError::NotUtf8 => "not UTF-8",
            DecodeError::NotJson => "not JSON",
            DecodeError::TooDeep { .. } => "nested too deep",
            DecodeError::NotObjectOrArray => "not a message",
            DecodeError::TooManyMessages { .. } => "too many messages",
        }
    }

    /// The Bayeux error for the whole body.
    pub fn error(&self) -> Error<'static> {
        Error::BadRequest(self.reason())
    }
}

/// What is wrong with one message of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Malformed: `400:<reason>:Bad request`, the reason naming the field
    /// (`missing channel`, `bad id`, `missing data`, ...).
    BadRequest(&'static str),
    /// A `/meta/` channel that is not one of the five:
    /// `404:<channel>:Unknown channel`.
    UnknownChannel,
    /// A channel that is not a valid name, or a publish to a wildcard:
    /// `405:<channel>:Invalid channel`.
    InvalidChannel,
    /// A publish to `/wsgate/**`: `403:<channel>:Forbidden`.
    Forbidden,
    /// A `connectionType` this gateway does not serve:
    /// `301:<type>:Connection types not supported`.
    ConnectionType(String),
}

/// One message of a batch that cannot be served, with what could be read of
/// it for the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageError {
    /// The message's `id`, when it was a string or a number.
    pub id: Option<Id>,
    /// The message's `channel`, when it was a string.
    pub channel: Option<String>,
    /// What is wrong.
    pub problem: Problem,
}

impl MessageError {
    /// The Bayeux error to answer with.
    pub fn error(&self) -> Error<'_> {
        let channel = self.channel.as_deref().unwrap_or("");
        match &self.problem {
            Problem::BadRequest(reason) => Error::BadRequest(reason),
            Problem::UnknownChannel => Error::UnknownChannel(channel),
            Problem::InvalidChannel => Error::InvalidChannel(channel),
            Problem::Forbidden => Error::Forbidden(channel),
            Problem::ConnectionType(t) => Error::ConnectionType(t),
        }
    }
}

/// One entry of a decoded batch: a message to serve, or one to refuse.
pub type Decoded = Result<Message, MessageError>;

/// Decodes a POST body by its `Content-Type` (the header's value, `None` if
/// absent):
///
/// - `application/json` (any parameters), `text/json`, or none: JSON;
/// - `application/x-www-form-urlencoded`: the `message` field;
/// - `text/plain`: what a browser sends for a cross-origin `XMLHttpRequest`
///   whose script set no type (Faye's `cross-origin-long-polling`): JSON if
///   it starts with `[` or `{`, else a form;
/// - anything else: [`DecodeError::ContentType`].
pub fn decode_body(
    content_type: Option<&str>,
    body: &[u8],
    limits: &Limits,
) -> Result<Vec<Decoded>, DecodeError> {
    body_text(content_type, body, limits).and_then(|text| decode_text(&text, limits))
}

/// The media type of a `Content-Type` value, lowercased, without parameters.
fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// The JSON text of a POST body, read by its `Content-Type` as
/// [`decode_body`] reads it (a form's `message` field, percent-decoded),
/// for a transport that hands the text on to a session.
pub fn body_text(
    content_type: Option<&str>,
    body: &[u8],
    limits: &Limits,
) -> Result<String, DecodeError> {
    check_size(body, limits)?;
    let media = content_type.map(media_type);
    let form = |body: &[u8]| form_value(body, "message")?.ok_or(DecodeError::NoMessageField);
    let json = |body: &[u8]| {
        std::str::from_utf8(body)
            .map(str::to_owned)
            .map_err(|_| DecodeError::NotUtf8)
    };
    match media.as_deref() {
        None | Some("application/json") | Some("text/json") => json(body),
        Some("application/x-www-form-urlencoded") => form(body),
        Some("text/plain") => {
            let first = body.iter().find(|b| !b.is_ascii_whitespace());
            if matches!(first, Some(b'[' | b'{')) {
                json(body)
            } else {
                form(body)
            }
        }
        Some(_) => Err(DecodeError::ContentType),
    }
}

/// Decodes a form body (or a query string: JSONP's `GET ?message=...`) by
/// its `message` field.
pub fn decode_form(form: &[u8], limits: &Limits) -> Result<Vec<Decoded>, DecodeError> {
    check_size(form, limits)?;
    let message = form_value(form, "message")?.ok_or(DecodeError::NoMessageField)?;
    decode_text(&message, limits)
}

/// Decodes JSON: a WebSocket text frame, or a JSON POST body.
pub fn decode_json(json: &[u8], limits: &Limits) -> Result<Vec<Decoded>, DecodeError> {
    check_size(json, limits)?;
    let text = std::str::from_utf8(json).map_err(|_| DecodeError::NotUtf8)?;
    decode_text(text, limits)
}

/// The value of field `name` in an `application/x-www-form-urlencoded` body
/// or a query string (`+` is a space, `%XX` a byte), the first if repeated;
/// `None` if absent.
pub fn form_value(form: &[u8], name: &str) -> Result<Option<String>, DecodeError> {
    for pair in form.split(|&b| b == b'&') {
        let (key, value) = match pair.iter().position(|&b| b == b'=') {
            Some(eq) => (&pair[..eq], &pair[eq + 1..]),
            None => (pair, &b""[..]),
        };
        if percent_decode(key)? == name.as_bytes() {
            let value = percent_decode(value)?;
            return String::from_utf8(value)
                .map(Some)
                .map_err(|_| DecodeError::NotUtf8);
        }
    }
    Ok(None)
}

fn percent_decode(text: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.iter();
    while let Some(&b) = bytes.next() {
        out.push(match b {
            b'+' => b' ',
            b'%' => {
                let hi = bytes.next().and_then(|&h| hex(h));
                let lo = bytes.next().and_then(|&l| hex(l));
                match (hi, lo) {
                    (Some(hi), Some(lo)) => hi << 4 | lo,
                    _ => return Err(DecodeError::BadForm),
                }
            }
            b => b,
        });
    }
    Ok(out)
}

fn hex(digit: u8) -> Option<u8> {
    char::from(digit)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// A JSONP callback name (`jsonp=` of a `callback-polling` GET), safe to
/// write in front of `(` in a script: an identifier path such as
/// `__jsonp1__` or `app.cb`, at most 64 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonpCallback(String);

impl JsonpCallback {
    /// Longest callback name accepted.
    pub const MAX_LEN: usize = 64;

    /// The callback when a request names none (`jsonpcallback`, as Faye's
    /// server has it).
    pub fn default_name() -> JsonpCallback {
        JsonpCallback("jsonpcallback".to_owned())
    }

    /// Accepts `[A-Za-z_$][A-Za-z0-9_$]*` segments joined by `.`; anything
    /// else could inject script into the reply and is refused (`None`).
    pub fn parse(name: &str) -> Option<JsonpCallback> {
        let ident = |s: &str| {
            let mut chars = s.bytes();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_' || c == b'$')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'$')
        };
        (name.len() <= Self::MAX_LEN && name.split('.').all(ident))
            .then(|| JsonpCallback(name.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn check_size(body: &[u8], limits: &Limits) -> Result<(), DecodeError> {
    if body.len() > limits.max_bytes {
        return Err(DecodeError::TooLarge {
            size: body.len(),
            max: limits.max_bytes,
        });
    }
    Ok(())
}

fn decode_text(text: &str, limits: &Limits) -> Result<Vec<Decoded>, DecodeError> {
    check_size(text.as_bytes(), limits)?;
    if !is_strict_json(text, limits.max_depth) {
        return Err(if depth(text) > limits.max_depth {
            DecodeError::TooDeep {
                max: limits.max_depth,
            }
        } else {
            DecodeError::NotJson
        });
    }
    let elements: Vec<&RawValue> = match text.trim_start().as_bytes().first() {
        Some(b'[') => serde_json::from_str(text).map_err(|_| DecodeError::NotJson)?,
        Some(b'{') => vec![serde_json::from_str(text).map_err(|_| DecodeError::NotJson)?],
        _ => return Err(DecodeError::NotObjectOrArray),
    };
    if elements.len() > limits.max_messages {
        return Err(DecodeError::TooManyMessages {
            max: limits.max_messages,
        });
    }
    Ok(elements.into_iter().map(decode_message).collect())
}

/// The deepest nesting of `[`/`{` outside strings. Only used to tell "too
/// deep" from "not JSON" once the strict check failed, so it need not
/// validate anything.
fn depth(text: &str) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for b in text.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// The fields a message may carry, each kept as raw JSON so that a field of
/// the wrong type is this message's error, not a failure of the whole parse.
/// `null` counts as absent, except for `data`.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    channel: Option<&'a RawValue>,
    #[serde(borrow, rename = "clientId")]
    client_id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    ext: Option<&'a RawValue>,
    #[serde(borrow)]
    advice: Option<&'a RawValue>,
    #[serde(borrow, rename = "connectionType")]
    connection_type: Option<&'a RawValue>,
    #[serde(borrow)]
    subscription: Option<&'a RawValue>,
    #[serde(borrow, rename = "supportedConnectionTypes")]
    supported_connection_types: Option<&'a RawValue>,
}

/// `data` is present even when it is `null` (a publish of `null` is valid).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Reads a raw field as `T`; `Err(())` if it is of another type.
fn field<'a, T: Deserialize<'a>>(raw: Option<&'a RawValue>) -> Result<Option<T>, ()> {
    raw.map(|r| serde_json::from_str(r.get()).map_err(|_| ()))
        .transpose()
}

fn is_object(raw: &RawValue) -> bool {
    raw.get().starts_with('{')
}

fn decode_message(raw: &RawValue) -> Decoded {
    let mut error = MessageError {
        id: None,
        channel: None,
        problem: Problem::BadRequest("not an object"),
    };
    if !is_object(raw) {
        return Err(error);
    }
    let Ok(fields) = serde_json::from_str::<Fields<'_>>(raw.get()) else {
        // Only a repeated field gets here: the text is a valid object.
        error.problem = Problem::BadRequest("repeated field");
        return Err(error);
    };
    let bad = |error: &mut MessageError, reason| {
        error.problem = Problem::BadRequest(reason);
        Err(error.clone())
    };

    match fields.id {
        None => {}
        Some(id) if matches!(id.get().as_bytes().first(), Some(b'"' | b'-' | b'0'..=b'9')) => {
            error.id = Some(Id(id.to_owned()));
        }
        Some(_) => return bad(&mut error, "bad id"),
    }
    let channel: String = match field(fields.channel) {
        Ok(Some(c)) => c,
        Ok(None) => return bad(&mut error, "missing channel"),
        Err(()) => return bad(&mut error, "bad channel"),
    };
    error.channel = Some(channel.clone());
    let Ok(client_id) = field::<String>(fields.client_id) else {
        return bad(&mut error, "bad clientId");
    };
    let ext = match fields.ext {
        Some(ext) if !is_object(ext) => return bad(&mut error, "bad ext"),
        ext => ext,
    };

    let kind = match Meta::parse(&channel) {
        Some(Meta::Handshake) => {
            let Ok(types) = field::<Vec<String>>(fields.supported_connection_types) else {
                return bad(&mut error, "bad supportedConnectionTypes");
            };
            let token = match ext.map(|e| serde_json::from_str::<ExtToken>(e.get())) {
                None => None,
                Some(Ok(ExtToken { token })) => token,
                Some(Err(_)) => return bad(&mut error, "bad ext.token"),
            };
            Kind::Handshake {
                connection_types: types
                    .unwrap_or_default()
                    .into_iter()
                    .map(|t| t.to_ascii_lowercase())
                    .collect(),
                token,
            }
        }
        Some(Meta::Connect) => {
            let connection_type = match field::<String>(fields.connection_type) {
                Ok(None) => None,
                Ok(Some(t)) => match ConnectionType::parse(&t) {
                    Some(t) => Some(t),
                    None => {
                        error.problem = Problem::ConnectionType(t);
                        return Err(error);
                    }
                },
                Err(()) => return bad(&mut error, "bad connectionType"),
            };
            let timeout_ms = fields
                .advice
                .and_then(|a| serde_json::from_str::<AdviceIn>(a.get()).ok())
                .and_then(|a| a.timeout)
                .filter(|t| t.is_finite() && *t >= 0.0)
                // Saturating: a float past u64::MAX becomes u64::MAX.
                .map(|t| t as u64);
            Kind::Connect {
                connection_type,
                timeout_ms,
            }
        }
        Some(meta @ (Meta::Subscribe | Meta::Unsubscribe)) => {
            let subscriptions = match fields.subscription {
                None => return bad(&mut error, "missing subscription"),
                Some(s) if s.get().starts_with('"') => match field::<String>(Some(s)) {
                    Ok(Some(s)) => vec![s],
                    _ => return bad(&mut error, "bad subscription"),
                },
                Some(s) => match field::<Vec<String>>(Some(s)) {
                    Ok(Some(list)) if !list.is_empty() => list,
                    Ok(_) => return bad(&mut error, "missing subscription"),
                    Err(()) => return bad(&mut error, "bad subscription"),
                },
            };
            if meta == Meta::Subscribe {
                Kind::Subscribe { subscriptions }
            } else {
                Kind::Unsubscribe { subscriptions }
            }
        }
        Some(Meta::Disconnect) => Kind::Disconnect,
        None => {
            match channel::parse(&channel) {
                Ok(None) => {}
                // A wildcard or a malformed name cannot be published to.
                Ok(Some(_)) | Err(_) => {
                    error.problem = Problem::InvalidChannel;
                    return Err(error);
                }
            }
            let class = channel::class(&channel);
            match class {
                Class::Meta => {
                    error.problem = Problem::UnknownChannel;
                    return Err(error);
                }
                Class::Gateway => {
                    error.problem = Problem::Forbidden;
                    return Err(error);
                }
                Class::Service | Class::Broadcast => {}
            }
            let Some(data) = fields.data else {
                return bad(&mut error, "missing data");
            };
            let data = data.to_owned();
            if class == Class::Service {
                Kind::Service { channel, data }
            } else {
                Kind::Publish { channel, data }
            }
        }
    };
    Ok(Message {
        id: error.id,
        client_id,
        ext: ext.map(ToOwned::to_owned),
        kind,
    })
}

/// The part of a handshake's `ext` the gateway reads.
#[derive(Deserialize)]
struct ExtToken {
    token: Option<String>,
}

/// The part of a connect's `advice` the gateway reads.
#[derive(Deserialize)]
struct AdviceIn {
    timeout: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits::new(65536);

    fn one(text: &str) -> Decoded {
        let mut all = decode_json(text.as_bytes(), &LIMITS).expect("body decodes");
        assert_eq!(all.len(), 1, "{text}");
        all.remove(0)
    }

    fn problem(text: &str) -> (Option<String>, Option<String>, Problem) {
        let e = one(text).expect_err(text);
        (
            e.id.map(|i| i.json().get().to_owned()),
            e.channel,
            e.problem,
        )
    }

    fn json(raw: &RawValue) -> &str {
        raw.get()
    }

    #[test]
    fn handshake_single_object_and_batch() {
        let m = one(
            r#"{"channel":"/meta/handshake","version":"1.0","supportedConnectionTypes":["websocket","LONG-POLLING"],"id":"1","ext":{"token":"a.b.c","x":1}}"#,
        )
        .unwrap();
        assert_eq!(m.id, Some(Id::string("1")));
        assert_eq!(m.client_id, None);
        assert_eq!(
            json(m.ext.as_deref().unwrap()),
            r#"{"token":"a.b.c","x":1}"#
        );
        match m.kind {
            Kind::Handshake {
                connection_types,
                token,
            } => {
                assert_eq!(connection_types, ["websocket", "long-polling"]);
                assert_eq!(token.as_deref(), Some("a.b.c"));
            }
            other => panic!("{other:?}"),
        }
        let all = decode_json(
            br#"[{"channel":"/meta/handshake"},{"channel":"/meta/disconnect","clientId":"c","id":7}]"#,
            &LIMITS,
        )
        .unwrap();
        assert_eq!(all.len(), 2);
        let m = all[1].as_ref().unwrap();
        assert_eq!(m.id.as_ref().map(|i| i.json().get()), Some("7"));
        assert_eq!(m.client_id.as_deref(), Some("c"));
        assert!(matches!(m.kind, Kind::Disconnect));
        assert!(matches!(
            all[0].as_ref().unwrap().kind,
            Kind::Handshake { ref connection_types, token: None } if connection_types.is_empty()
        ));
    }

    #[test]
    fn connect_reads_type_and_timeout() {
        let m = one(r#"{"channel":"/meta/connect","clientId":"abc","connectionType":"WEBSOCKET","advice":{"timeout":0}}"#).unwrap();
        assert!(matches!(
            m.kind,
            Kind::Connect {
                connection_type: Some(ConnectionType::WebSocket),
                timeout_ms: Some(0)
            }
        ));
        for (advice, want) in [
            (r#""advice":{"timeout":30000}"#, Some(30000)),
            (r#""advice":{"timeout":1.5}"#, Some(1)),
            (r#""advice":{"timeout":-1}"#, None),
            (r#""advice":{"timeout":"x"}"#, None),
            (r#""advice":"x""#, None),
            (r#""advice":{"interval":5}"#, None),
            (r#""advice":{"timeout":1e300}"#, Some(u64::MAX)),
        ] {
            let text = format!(
                r#"{{"channel":"/meta/connect","connectionType":"long-polling",{advice}}}"#
            );
            match one(&text).unwrap().kind {
                Kind::Connect {
                    connection_type: Some(ConnectionType::LongPolling),
                    timeout_ms,
                } => assert_eq!(timeout_ms, want, "{advice}"),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            problem(r#"{"channel":"/meta/connect","connectionType":"eventsource","id":"9"}"#),
            (
                Some("\"9\"".into()),
                Some("/meta/connect".into()),
                Problem::ConnectionType("eventsource".into())
            )
        );
        assert_eq!(
            problem(r#"{"channel":"/meta/connect","connectionType":3}"#).2,
            Problem::BadRequest("bad connectionType")
        );
        for t in ConnectionType::ALL {
            assert_eq!(ConnectionType::parse(&t.as_str().to_uppercase()), Some(t));
        }
    }

    #[test]
    fn subscribe_takes_a_string_or_an_array() {
        match one(r#"{"channel":"/meta/subscribe","clientId":"c","subscription":"/foo/*","ext":{"authToken":"t"}}"#).unwrap() {
            Message {
                kind: Kind::Subscribe { subscriptions },
                ext: Some(ext),
                ..
            } => {
                assert_eq!(subscriptions, ["/foo/*"]);
                assert_eq!(ext.get(), r#"{"authToken":"t"}"#);
            }
            other => panic!("{other:?}"),
        }
        match one(r#"{"channel":"/meta/unsubscribe","subscription":["/a","/b/**"]}"#)
            .unwrap()
            .kind
        {
            Kind::Unsubscribe { subscriptions } => assert_eq!(subscriptions, ["/a", "/b/**"]),
            other => panic!("{other:?}"),
        }
        // Names are not judged here: each gets its own reply later.
        match one(r#"{"channel":"/meta/subscribe","subscription":["/meta/*","a b"]}"#)
            .unwrap()
            .kind
        {
            Kind::Subscribe { subscriptions } => assert_eq!(subscriptions, ["/meta/*", "a b"]),
            other => panic!("{other:?}"),
        }
        for (body, reason) in [
            (r#"{"channel":"/meta/subscribe"}"#, "missing subscription"),
            (
                r#"{"channel":"/meta/subscribe","subscription":null}"#,
                "missing subscription",
            ),
            (
                r#"{"channel":"/meta/subscribe","subscription":[]}"#,
                "missing subscription",
            ),
            (
                r#"{"channel":"/meta/subscribe","subscription":5}"#,
                "bad subscription",
            ),
            (
                r#"{"channel":"/meta/subscribe","subscription":["/a",5]}"#,
                "bad subscription",
            ),
            (
                r#"{"channel":"/meta/unsubscribe","subscription":{}}"#,
                "bad subscription",
            ),
        ] {
            assert_eq!(problem(body).2, Problem::BadRequest(reason), "{body}");
        }
    }

    #[test]
    fn publish_keeps_data_verbatim() {
        match one(r#"{"channel":"/chat/room1","data":{"text" : "hi"},"clientId":"c","id":"5"}"#)
            .unwrap()
            .kind
        {
            Kind::Publish { channel, data } => {
                assert_eq!(channel, "/chat/room1");
                assert_eq!(data.get(), r#"{"text" : "hi"}"#);
            }
            other => panic!("{other:?}"),
        }
        for data in ["null", "\"42\"", "42", "[1,2]", "\"\\u00e9\""] {
            let text = format!(r#"{{"channel":"/a","data":{data}}}"#);
            match one(&text).unwrap().kind {
                Kind::Publish { data: d, .. } => assert_eq!(d.get(), data),
                other => panic!("{other:?}"),
            }
        }
        match one(r#"{"channel":"/service/random","data":"x"}"#)
            .unwrap()
            .kind
        {
            Kind::Service { channel, data } => {
                assert_eq!(channel, "/service/random");
                assert_eq!(data.get(), "\"x\"");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_messages_are_told_apart_and_echo_what_could_be_read() {
        let s = |v: &str| Some(v.to_owned());
        for (body, want) in [
            (
                r#"{}"#,
                (None, None, Problem::BadRequest("missing channel")),
            ),
            (
                r#"{"id":"1"}"#,
                (s("\"1\""), None, Problem::BadRequest("missing channel")),
            ),
            (
                r#"{"id":"1","channel":5}"#,
                (s("\"1\""), None, Problem::BadRequest("bad channel")),
            ),
            (
                r#"{"id":true,"channel":"/a"}"#,
                (None, None, Problem::BadRequest("bad id")),
            ),
            (
                r#"{"id":{},"channel":"/a"}"#,
                (None, None, Problem::BadRequest("bad id")),
            ),
            (
                r#"{"id":"2","channel":"/meta/foo"}"#,
                (s("\"2\""), s("/meta/foo"), Problem::UnknownChannel),
            ),
            (
                r#"{"channel":"/meta/*","data":1}"#,
                (None, s("/meta/*"), Problem::InvalidChannel),
            ),
            (
                r#"{"channel":"/foo/*","data":1}"#,
                (None, s("/foo/*"), Problem::InvalidChannel),
            ),
            (
                r#"{"channel":"/foo/**","data":1}"#,
                (None, s("/foo/**"), Problem::InvalidChannel),
            ),
            (
                r#"{"channel":"/a b","data":1}"#,
                (None, s("/a b"), Problem::InvalidChannel),
            ),
            (
                r#"{"channel":"nope","data":1}"#,
                (None, s("nope"), Problem::InvalidChannel),
            ),
            (
                r#"{"channel":"/wsgate/gap","data":1}"#,
                (None, s("/wsgate/gap"), Problem::Forbidden),
            ),
            (
                r#"{"channel":"/a","id":"3"}"#,
                (s("\"3\""), s("/a"), Problem::BadRequest("missing data")),
            ),
            (
                r#"{"channel":"/a","data":1,"clientId":7}"#,
                (None, s("/a"), Problem::BadRequest("bad clientId")),
            ),
            (
                r#"{"channel":"/a","data":1,"ext":[1]}"#,
                (None, s("/a"), Problem::BadRequest("bad ext")),
            ),
            (
                r#"{"channel":"/meta/handshake","ext":{"token":5}}"#,
                (
                    None,
                    s("/meta/handshake"),
                    Problem::BadRequest("bad ext.token"),
                ),
            ),
            (
                r#"{"channel":"/meta/handshake","supportedConnectionTypes":"websocket"}"#,
                (
                    None,
                    s("/meta/handshake"),
                    Problem::BadRequest("bad supportedConnectionTypes"),
                ),
            ),
            (
                r#"{"channel":"/a","channel":"/b","data":1}"#,
                (None, None, Problem::BadRequest("repeated field")),
            ),
        ] {
            assert_eq!(problem(body), want, "{body}");
        }
        // `null` is absent for every field but `data`.
        assert!(one(r#"{"channel":"/meta/connect","id":null,"clientId":null,"ext":null}"#).is_ok());
        // Ids may be numbers, echoed as sent.
        assert_eq!(
            one(r#"{"channel":"/meta/connect","id":-1.5e3}"#)
                .unwrap()
                .id
                .unwrap()
                .json()
                .get(),
            "-1.5e3"
        );
    }

    #[test]
    fn one_bad_message_does_not_spoil_its_batch() {
        let all = decode_json(
            br#"[{"channel":"/meta/connect","clientId":"c"}, 42, {"channel":"/a","data":[]}, "x"]"#,
            &LIMITS,
        )
        .unwrap();
        assert_eq!(all.len(), 4);
        assert!(all[0].is_ok());
        assert_eq!(
            all[1].as_ref().unwrap_err().problem,
            Problem::BadRequest("not an object")
        );
        assert!(matches!(
            all[2].as_ref().unwrap().kind,
            Kind::Publish { .. }
        ));
        assert!(all[3].is_err());
        assert!(decode_json(b"[]", &LIMITS).unwrap().is_empty());
    }

    #[test]
    fn unreadable_bodies() {
        let small = Limits {
            max_bytes: 20,
            max_depth: 4,
            max_messages: 2,
        };
        let big = "[".repeat(200) + &"]".repeat(200);
        for (body, limits, want) in [
            (&b"not json"[..], LIMITS, DecodeError::NotJson),
            (b"", LIMITS, DecodeError::NotJson),
            (b"{\"channel\":\"/a\"", LIMITS, DecodeError::NotJson),
            (b"{} {}", LIMITS, DecodeError::NotJson),
            (br#"{"channel":"\ud800"}"#, LIMITS, DecodeError::NotJson),
            (b"\xff\xfe", LIMITS, DecodeError::NotUtf8),
            (b"42", LIMITS, DecodeError::NotObjectOrArray),
            (
                b"\"/meta/handshake\"",
                LIMITS,
                DecodeError::NotObjectOrArray,
            ),
            (b"null", LIMITS, DecodeError::NotObjectOrArray),
            (
                b"[{},{},{}]",
                small,
                DecodeError::TooManyMessages { max: 2 },
            ),
            (b"[[[[[]]]]]", small, DecodeError::TooDeep { max: 4 }),
            (big.as_bytes(), LIMITS, DecodeError::TooDeep { max: 64 }),
            (
                b"[{\"channel\":\"/meta/connect\"}]",
                small,
                DecodeError::TooLarge { size: 29, max: 20 },
            ),
        ] {
            assert_eq!(
                decode_json(body, &limits).map(|v| v.len()),
                Err(want.clone()),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        // Exactly at the limits is fine.
        assert!(decode_json(b"[[[{}]]]", &small).is_ok());
        assert!(decode_json(b"[{},{}]", &small).is_ok());
        let reasons: Vec<&str> = [
            DecodeError::TooLarge { size: 2, max: 1 },
            DecodeError::ContentType,
            DecodeError::NoMessageField,
            DecodeError::BadForm,
            DecodeError::NotUtf8,
            DecodeError::NotJson,
            DecodeError::TooDeep { max: 1 },
            DecodeError::NotObjectOrArray,
            DecodeError::TooManyMessages { max: 1 },
        ]
        .iter()
        .map(DecodeError::reason)
        .collect();
        assert_eq!(
            reasons,
            [
                "body too large",
                "unsupported content type",
                "no message field",
                "bad form encoding",
                "not UTF-8",
                "not JSON",
                "nested too deep",
                "not a message",
                "too many messages"
            ]
        );
        assert_eq!(
            DecodeError::NotJson.error().to_string(),
            "400:not JSON:Bad request"
        );
    }

    #[test]
    fn form_bodies_and_content_types() {
        let form = b"jsonp=__jsonp1__&message=%5B%7B%22channel%22%3A%22%2Fmeta%2Fhandshake%22%2C%22id%22%3A%221%20+2%22%7D%5D";
        for ct in [
            Some("application/x-www-form-urlencoded"),
            Some("application/x-www-form-urlencoded; charset=UTF-8"),
            Some("text/plain;charset=UTF-8"),
        ] {
            let all = decode_body(ct, form, &LIMITS).unwrap();
            let m = all[0].as_ref().unwrap();
            assert!(matches!(m.kind, Kind::Handshake { .. }), "{ct:?}");
            assert_eq!(m.id, Some(Id::string("1  2")));
        }
        assert_eq!(form_value(form, "jsonp"), Ok(Some("__jsonp1__".to_owned())));
        assert_eq!(form_value(form, "nope"), Ok(None));
        assert_eq!(form_value(b"a&b=1", "a"), Ok(Some(String::new())));
        assert_eq!(form_value(b"m%65ssage=x", "message"), Ok(Some("x".into())));
        assert_eq!(
            form_value(b"message=%zz", "message"),
            Err(DecodeError::BadForm)
        );
        assert_eq!(
            form_value(b"message=%4", "message"),
            Err(DecodeError::BadForm)
        );
        assert_eq!(
            form_value(b"message=%ff", "message"),
            Err(DecodeError::NotUtf8)
        );
        assert_eq!(
            decode_form(b"jsonp=x", &LIMITS).map(|v| v.len()),
            Err(DecodeError::NoMessageField)
        );
        let json = br#"{"channel":"/meta/handshake"}"#;
        for ct in [
            None,
            Some("application/json"),
            Some("Application/JSON; charset=utf-8"),
            Some("text/json"),
            Some("text/plain"),
        ] {
            assert_eq!(
                decode_body(ct, json, &LIMITS).map(|v| v.len()),
                Ok(1),
                "{ct:?}"
            );
        }
        for ct in [
            "text/html",
            "multipart/form-data; boundary=x",
            "application/xml",
        ] {
            assert_eq!(
                decode_body(Some(ct), json, &LIMITS).map(|v| v.len()),
                Err(DecodeError::ContentType),
                "{ct}"
            );
        }
        // The size limit applies to the body as received.
        let tiny = Limits::new(10);
        assert_eq!(
            decode_form(form, &tiny).map(|v| v.len()),
            Err(DecodeError::TooLarge {
                size: form.len(),
                max: 10
            })
        );
    }

    #[test]
    fn jsonp_callbacks_are_identifiers() {
        for ok in ["__jsonp1__", "cb", "$", "app.handlers.cb_2", "A$b"] {
            assert_eq!(JsonpCallback::parse(ok).unwrap().as_str(), ok);
        }
        let long = "a".repeat(65);
        for bad in [
            "", "1cb", "a.", ".a", "a..b", "alert(1)", "a-b", "a b", "a;b", "é", &long,
        ] {
            assert_eq!(JsonpCallback::parse(bad), None, "{bad}");
        }
        assert!(JsonpCallback::parse(&"a".repeat(64)).is_some());
    }

    #[test]
    fn depth_scan_ignores_brackets_in_strings() {
        assert_eq!(depth(r#"[{"a":"[[[[\"[["}]"#), 2);
        assert_eq!(depth("[]"), 1);
        assert_eq!(depth("7"), 0);
        assert_eq!(depth("]]]["), 1);
    }
}
