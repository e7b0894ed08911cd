//! Everything a Bayeux client reads: replies to its meta messages and
//! publishes, deliveries, gap notices, and errors in Bayeux's
//! `code:args:message` form.
//!
//! Each function renders one Bayeux message as a JSON object; [`Batch`] joins
//! them into the array that a WebSocket frame or a long-poll response body
//! carries. A delivery is different: [`delivery`] renders the whole frame,
//! `[{"channel":..,"data":..}]`, once per Redis message per render key, and
//! the same bytes go to every Bayeux member; a long-poll response splices the
//! frames it collected into its batch ([`Batch::push_frame`]).
//!
//! Field order is fixed (`channel`, `id`, `successful`, then the rest), so
//! the tests below hold the exact bytes.
//!
//! Two rules come from the clients. A publish acknowledgement carries no
//! `data` (CometD takes any message with `data` for a delivery, and Faye
//! hands such a message to its subscribers). And no reply on `/meta/**`
//! carries `data` either, for the same reason, except where nodefony's
//! endpoint expects it in the connect reply.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::value::RawValue;

use super::channel::{self, GAP_CHANNEL};
use super::message::{ConnectionType, DecodeError, Id, JsonpCallback, MessageError};
use crate::broker::BrokerMessage;
use crate::history::Position;
use crate::protocol::native::is_strict_json;
use crate::protocol::{Notice, NoticeKind};

/// The protocol version a handshake reply announces.
pub const VERSION: &str = "1.0";

/// Deepest Redis payload embedded in a delivery as JSON: serde_json reads
/// 127 levels, and a delivery wraps `data` in two (the array and the
/// message object). Deeper payloads are delivered as a JSON string.
pub const MAX_DATA_DEPTH: usize = 125;

/// What the client should do after this reply (the `advice` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reconnect {
    /// Connect again (after `interval`), with the same clientId.
    Retry,
    /// Handshake again: the clientId is no longer valid.
    Handshake,
    /// Do not reconnect.
    None,
}

/// The `advice` field: how and when the client should come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Advice {
    /// What to do.
    pub reconnect: Reconnect,
    /// Milliseconds to wait before the next connect.
    pub interval: u64,
    /// Milliseconds the server holds a `/meta/connect` (omitted when `None`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
}

impl Advice {
    /// `{reconnect:"retry", interval:0, timeout}`: the handshake's advice,
    /// `timeout_ms` being `WSGATE_BAYEUX_CONNECT_TIMEOUT_MS`.
    pub fn retry(timeout_ms: u64) -> Advice {
        Advice {
            reconnect: Reconnect::Retry,
            interval: 0,
            timeout: Some(timeout_ms),
        }
    }

    /// `{reconnect:"handshake", interval:0}`: start over; sent with every
    /// `402 Unknown client`, after which Faye and CometD re-handshake and
    /// resubscribe by themselves.
    pub fn handshake() -> Advice {
        Advice {
            reconnect: Reconnect::Handshake,
            interval: 0,
            timeout: None,
        }
    }

    /// `{reconnect:"none", interval:0}`: do not come back (a refused
    /// handshake: retrying with the same credentials cannot help).
    pub fn none() -> Advice {
        Advice {
            reconnect: Reconnect::None,
            interval: 0,
            timeout: None,
        }
    }
}

/// A Bayeux error, rendered `code:args:message`.
///
/// `args` is written only when it fits the grammar's argument list (no `:`
/// nor `,`), else left empty: a client splitting on `:` must not misread
/// it. Channels that passed validation and issued clientIds always fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error<'a> {
    /// `301:<type>:Connection types not supported`.
    ConnectionType(&'a str),
    /// `400:<reason>:Bad request`, the reason short and grammar-safe.
    BadRequest(&'a str),
    /// `402:<clientId>:Unknown client`, always with
    /// [`Advice::handshake`]: a clientId no node holds, or one that expired.
    UnknownClient(&'a str),
    /// `403:<channel>:Forbidden`: an ACL or authorisation refusal, a
    /// subscribe to `/meta/**`, a publish to `/wsgate/**`.
    Forbidden(&'a str),
    /// `404:<channel>:Unknown channel`: a `/meta/` channel not in Bayeux.
    UnknownChannel(&'a str),
    /// `404:<channel>:No such service`: a `/service/**` channel that names
    /// no service of this gateway.
    NoSuchService(&'a str),
    /// `405:<channel>:Invalid channel`: not a channel name (or a publish to
    /// a wildcard).
    InvalidChannel(&'a str),
    /// Any other refusal the session makes (rate limited, broker
    /// unavailable, a callback's reason, a refused token): `code`, `args`
    /// and `message` as given, `:` in the message written as ` -`.
    Refused {
        /// Three digits.
        code: u16,
        /// The arguments (a channel, usually).
        args: &'a str,
        /// For a human.
        message: &'a str,
    },
}

impl Error<'_> {
    /// The three-digit code.
    pub fn code(&self) -> u16 {
        match self {
            Error::ConnectionType(_) => 301,
            Error::BadRequest(_) => 400,
            Error::UnknownClient(_) => 402,
            Error::Forbidden(_) => 403,
            Error::UnknownChannel(_) | Error::NoSuchService(_) => 404,
            Error::InvalidChannel(_) => 405,
            Error::Refused { code, .. } => *code,
        }
    }

    /// The advice that goes with this error, if any.
    pub fn advice(&self) -> Option<Advice> {
        match self {
            Error::UnknownClient(_) => Some(Advice::handshake()),
            _ => None,
        }
    }
}

impl std::fmt::Display for Error<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (args, message) = match *self {
            Error::ConnectionType(t) => (t, "Connection types not supported"),
            Error::BadRequest(reason) => (reason, "Bad request"),
            Error::UnknownClient(id) => (id, "Unknown client"),
            Error::Forbidden(c) => (c, "Forbidden"),
            Error::UnknownChannel(c) => (c, "Unknown channel"),
            Error::NoSuchService(c) => (c, "No such service"),
            Error::InvalidChannel(c) => (c, "Invalid channel"),
            Error::Refused { args, message, .. } => {
                let args = if args.contains([':', ',']) { "" } else { args };
                return write!(
                    f,
                    "{:03}:{args}:{}",
                    self.code() % 1000,
                    message.replace(':', " -")
                );
            }
        };
        let args = if args.contains([':', ',']) { "" } else { args };
        write!(f, "{}:{args}:{message}", self.code())
    }
}

/// One reply message. Every reply of this module is one of these, so the
/// field order is the same everywhere.
#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct Reply<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a RawValue>,
    successful: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    supported_connection_types: Option<[&'a str; 4]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subscription: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    advice: Option<Advice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ext: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a RawValue>,
}

impl Reply<'_> {
    fn render(&self) -> String {
        // Strings, bools, integers and raw JSON that was valid when read:
        // serde_json cannot fail on these; the fallback keeps this total.
        serde_json::to_string(self).unwrap_or_else(|_| {
            "{\"successful\":false,\"error\":\"500::Internal server error\"}".to_owned()
        })
    }
}

fn id_json(id: Option<&Id>) -> Option<&RawValue> {
    id.map(Id::json)
}

/// The reply to a successful `/meta/handshake`: version `1.0`, every
/// connection type served, the new clientId and the advice
/// ([`Advice::retry`] with the connect timeout).
pub fn handshake(id: Option<&Id>, client_id: &str, advice: &Advice) -> String {
    Reply {
        channel: Some(channel::Meta::Handshake.channel()),
        id: id_json(id),
        successful: true,
        version: Some(VERSION),
        supported_connection_types: Some(ConnectionType::ALL.map(ConnectionType::as_str)),
        client_id: Some(client_id),
        advice: Some(*advice),
        ..Reply::default()
    }
    .render()
}

/// The reply to a `/meta/connect` (when the hold ends, or at once).
/// `advice` when it changed or on the first connect; `ext` to carry gap
/// notices; `data` only on nodefony's endpoint (its service
/// map), never on `/bayeux`, where Faye would hand it to `/**` subscribers.
pub fn connect(
    id: Option<&Id>,
    client_id: &str,
    advice: Option<&Advice>,
    ext: Option<&RawValue>,
    data: Option<&RawValue>,
) -> String {
    Reply {
        channel: Some(channel::Meta::Connect.channel()),
        id: id_json(id),
        successful: true,
        client_id: Some(client_id),
        advice: advice.copied(),
        ext,
        data,
        ..Reply::default()
    }
    .render()
}

/// The reply for one channel of a `/meta/subscribe` (one reply per channel
/// when the client sent several), echoing it in `subscription`; `error` when
/// refused.
pub fn subscribe(
    id: Option<&Id>,
    client_id: &str,
    subscription: &str,
    error: Option<&Error<'_>>,
) -> String {
    subscription_reply(
        channel::Meta::Subscribe,
        id,
        client_id,
        subscription,
        error,
        None,
    )
}

/// The reply to a successful subscribe that asked to resume
/// (`ext.wsgate.since`): as [`subscribe`], with
/// `"ext":{"wsgate":{"recovered":true|false}}` saying whether every message
/// after the position follows (`docs/dialects/bayeux.md`, History).
pub fn subscribe_recovered(
    id: Option<&Id>,
    client_id: &str,
    subscription: &str,
    recovered: bool,
) -> String {
    let ext = if recovered {
        r#"{"wsgate":{"recovered":true}}"#
    } else {
        r#"{"wsgate":{"recovered":false}}"#
    };
    let ext = serde_json::from_str::<&RawValue>(ext).ok();
    subscription_reply(
        channel::Meta::Subscribe,
        id,
        client_id,
        subscription,
        None,
        ext,
    )
}

/// The reply for one channel of a `/meta/unsubscribe`, as [`subscribe`].
pub fn unsubscribe(
    id: Option<&Id>,
    client_id: &str,
    subscription: &str,
    error: Option<&Error<'_>>,
) -> String {
    subscription_reply(
        channel::Meta::Unsubscribe,
        id,
        client_id,
        subscription,
        error,
        None,
    )
}

fn subscription_reply(
    meta: channel::Meta,
    id: Option<&Id>,
    client_id: &str,
    subscription: &str,
    error: Option<&Error<'_>>,
    ext: Option<&RawValue>,
) -> String {
    Reply {
        channel: Some(meta.channel()),
        id: id_json(id),
        successful: error.is_none(),
        client_id: Some(client_id),
        subscription: Some(subscription),
        error: error.map(ToString::to_string),
        advice: error.and_then(Error::advice),
        ext,
        ..Reply::default()
    }
    .render()
}

/// The reply to a `/meta/disconnect`.
pub fn disconnect(id: Option<&Id>, client_id: &str) -> String {
    Reply {
        channel: Some(channel::Meta::Disconnect.channel()),
        id: id_json(id),
        successful: true,
        client_id: Some(client_id),
        ..Reply::default()
    }
    .render()
}

/// The acknowledgement of a publish: `channel`, `id`, `successful` (and the
/// `error` when refused), and never `data`.
pub fn publish(id: Option<&Id>, channel: &str, error: Option<&Error<'_>>) -> String {
    Reply {
        channel: Some(channel),
        id: id_json(id),
        successful: error.is_none(),
        error: error.map(ToString::to_string),
        advice: error.and_then(Error::advice),
        ..Reply::default()
    }
    .render()
}

/// A message on a `/service/<name>` channel for one client: a line of its
/// TCP backend or the JSON-RPC response to its call, `data` always a JSON
/// string of `text`. A call's response names the publish it answers (`id`,
/// with `"successful":true`), as a CometD server answers a remote call, so
/// that cometd's `remoteCall` hands it to its callback; both clients take a
/// message with `data` for a delivery (the publish was acknowledged
/// before), never for an acknowledgement.
pub fn service_message(channel: &str, id: Option<&Id>, text: &str) -> String {
    let mut out = String::with_capacity(48 + channel.len() + text.len() * 5 / 4);
    out.push_str("{\"channel\":");
    push_json_str(&mut out, channel);
    if let Some(id) = id {
        out.push_str(",\"id\":");
        out.push_str(id.json().get());
        out.push_str(",\"successful\":true");
    }
    out.push_str(",\"data\":");
    push_json_str(&mut out, text);
    out.push('}');
    out
}

/// The answer to a presence request (a publish to
/// [`channel::PRESENCE_SERVICE`], `docs/dialects/bayeux.md`, Presence):
/// the publish's acknowledgement and its answer in one message, as a CometD
/// server answers a remote call, so that Faye resolves the publish and
/// hands `data` to the client's subscribers of the service channel, and
/// cometd's `remoteCall` hands it to its callback:
/// `{"channel":"/service/wsgate/presence","id":..,"successful":true,"data":{"channel":..,"clients":N,"users":M,"members":[..]}}`
/// (`members` left out for `stats`), the shape of `GET /presence`.
pub fn presence(
    id: Option<&Id>,
    channel: &str,
    stats: bool,
    members: &crate::presence::Members,
) -> String {
    let list = if stats {
        String::new()
    } else {
        members.json_array()
    };
    let mut out = String::with_capacity(128 + channel.len() + list.len());
    out.push_str("{\"channel\":\"");
    out.push_str(channel::PRESENCE_SERVICE);
    out.push('"');
    if let Some(id) = id {
        out.push_str(",\"id\":");
        out.push_str(id.json().get());
    }
    out.push_str(",\"successful\":true,\"data\":{\"channel\":");
    push_json_str(&mut out, channel);
    // Writing into a String cannot fail.
    let _ = write!(
        out,
        ",\"clients\":{},\"users\":{}",
        members.members.len(),
        members.users
    );
    if !stats {
        out.push_str(",\"members\":");
        out.push_str(&list);
    }
    out.push_str("}}");
    out
}

/// A presence channel's join or leave event (its JSON as the node
/// published it, `docs/presence.md`) as a delivery on the channel for a
/// subscriber that asked (`ext.wsgate.join_leave`):
/// `[{"channel":"/chat/room","data":{"action":"join","channel":"/chat/room","member":{..}},"ext":{"wsgate":{"presence":"join"}}}]`.
/// `data` is the native protocol's event as it is (no re-encoding, one
/// shape in every dialect); `ext.wsgate.presence` is what marks it apart
/// from a published message, where Faye and CometD extensions read it.
/// `None` for a forged envelope that is not a join or leave event in JSON
/// (a plain Redis publisher can write one; it reaches nobody).
pub fn presence_event(channel: &[u8], event: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(event).ok()?;
    let action = if text.starts_with("{\"action\":\"join\",") {
        "join"
    } else if text.starts_with("{\"action\":\"leave\",") {
        "leave"
    } else {
        return None;
    };
    if !is_strict_json(text, MAX_DATA_DEPTH) {
        return None;
    }
    let mut out = String::with_capacity(64 + channel.len() + text.len());
    out.push_str("[{\"channel\":");
    push_json_str(&mut out, &String::from_utf8_lossy(channel));
    out.push_str(",\"data\":");
    out.push_str(text);
    out.push_str(",\"ext\":{\"wsgate\":{\"presence\":\"");
    out.push_str(action);
    out.push_str("\"}}}]");
    Some(out)
}

/// What a client whose service line ended unasked reads, in order (one
/// batch): a message on the channel whose `data` is the JSON text
/// `{"error":<reason>}`, then an unsubscribe notice for the channel
/// (`successful`, no `id`: no request of the client is answered), as
/// nodefony sends when its backend socket ends.
pub fn service_ended(channel: &str, client_id: &str, reason: &str) -> String {
    let mut error = String::from("{\"error\":");
    push_json_str(&mut error, reason);
    error.push('}');
    let mut batch = Batch::new();
    batch.push(&service_message(channel, None, &error));
    batch.push(&unsubscribe(None, client_id, channel, None));
    batch.finish()
}

/// A refusal of any message on `channel` (`None`: the message had none
/// readable), with the error's advice: `402 Unknown client` is answered this
/// way on whatever channel it came, a refused handshake too.
pub fn failure(channel: Option<&str>, id: Option<&Id>, error: &Error<'_>) -> String {
    failure_with(channel, id, error, error.advice())
}

/// [`failure`] with an explicit advice, e.g. [`Advice::none`] for a
/// handshake refused for its token.
pub fn failure_with(
    channel: Option<&str>,
    id: Option<&Id>,
    error: &Error<'_>,
    advice: Option<Advice>,
) -> String {
    Reply {
        channel,
        id: id_json(id),
        successful: false,
        error: Some(error.to_string()),
        advice,
        ..Reply::default()
    }
    .render()
}

/// The reply to one message of a batch that could not be decoded.
pub fn rejected(error: &MessageError) -> String {
    failure(error.channel.as_deref(), error.id.as_ref(), &error.error())
}

/// The reply to a whole body that could not be read: a batch of one.
pub fn bad_body(error: &DecodeError) -> String {
    let mut batch = Batch::new();
    batch.push(&failure(None, None, &error.error()));
    batch.finish()
}

/// Renders a Redis message for Bayeux subscribers of its topic, or `None`
/// when the Bayeux meaning of that subscription does not cover the channel
/// ([`channel::delivers`]). Called once per message per render key.
pub fn render(message: &BrokerMessage) -> Option<String> {
    channel::delivers(&message.topic, &message.channel).then(|| {
        delivery_at(
            &message.channel,
            &message.payload,
            message.position.as_ref(),
        )
    })
}

/// A delivery frame, `[{"channel":..,"data":..}]`, from the channel and the
/// Redis payload: `data` is the payload itself when it is JSON (nested at
/// most [`MAX_DATA_DEPTH`]), else the payload as a JSON string; a payload
/// that is not UTF-8 is sent as a base64 string, with
/// `"ext":{"encoding":"base64"}` saying so, so that no byte is lost. No
/// per-client field: the same bytes serve every subscriber.
pub fn delivery(channel: &[u8], payload: &[u8]) -> String {
    delivery_at(channel, payload, None)
}

/// [`delivery`] of a history channel's message: its place in the history
/// rides in `ext`, `"ext":{"wsgate":{"offset":42,"epoch":"e1"}}` (after
/// `"encoding":"base64"` when there is one), where Faye and CometD
/// extensions read it and the subscribers' callbacks never see it
/// (`docs/dialects/bayeux.md`, History).
pub fn delivery_at(channel: &[u8], payload: &[u8], position: Option<&Position>) -> String {
    let mut out = String::with_capacity(64 + channel.len() + payload.len() * 4 / 3);
    out.push_str("[{\"channel\":");
    push_json_str(&mut out, &String::from_utf8_lossy(channel));
    out.push_str(",\"data\":");
    let mut ext_open = false;
    match std::str::from_utf8(payload) {
        Ok(text) if is_strict_json(text, MAX_DATA_DEPTH) => out.push_str(text),
        Ok(text) => push_json_str(&mut out, text),
        Err(_) => {
            use base64::Engine as _;
            out.push('"');
            base64::engine::general_purpose::STANDARD.encode_string(payload, &mut out);
            out.push_str("\",\"ext\":{\"encoding\":\"base64\"");
            ext_open = true;
        }
    }
    if let Some(p) = position {
        out.push_str(if ext_open { "," } else { ",\"ext\":{" });
        out.push_str("\"wsgate\":{\"offset\":");
        // Writing into a String cannot fail.
        let _ = write!(out, "{}", p.offset);
        out.push_str(",\"epoch\":");
        // Epochs are ASCII letters and digits ([`crate::history::open`]).
        push_json_str(&mut out, &String::from_utf8_lossy(&p.epoch));
        out.push('}');
        ext_open = true;
    }
    if ext_open {
        out.push('}');
    }
    out.push_str("}]");
    out
}

fn push_json_str(out: &mut String, s: &str) {
    // Serialising a &str into a String cannot fail.
    if let Ok(quoted) = serde_json::to_string(s) {
        out.push_str(&quoted);
    }
}

/// The `data` of a gap notice: `{"state":"interrupted"|"resumed",
/// "reason"?:..,"subscriptions":[..]}`, the subscriptions named as the
/// client wrote them (`/foo/**`, not the Redis glob).
pub fn gap_data(notice: &Notice<'_>) -> String {
    #[derive(Serialize)]
    struct Gap<'a> {
        state: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
        subscriptions: Vec<std::borrow::Cow<'a, str>>,
    }
    let gap = Gap {
        state: match notice.kind {
            NoticeKind::Interrupted => "interrupted",
            NoticeKind::Resumed => "resumed",
        },
        reason: notice.reason,
        subscriptions: notice
            .topics
            .iter()
            .map(channel::subscription_name)
            .collect(),
    };
    serde_json::to_string(&gap).unwrap_or_else(|_| "{}".to_owned())
}

/// A gap notice as a delivery on [`GAP_CHANNEL`]: a frame of its own,
/// rendered for one member (it names that member's subscriptions).
pub fn gap(notice: &Notice<'_>) -> String {
    format!(
        "[{{\"channel\":\"{GAP_CHANNEL}\",\"data\":{}}}]",
        gap_data(notice)
    )
}

/// The JSON array one WebSocket frame or one long-poll response body
/// carries: replies and deliveries, in the order pushed.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    buf: String,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Batch {
        Batch::default()
    }

    /// Appends one message (a JSON object, as the functions above render).
    pub fn push(&mut self, message: &str) {
        self.buf.push(if self.buf.is_empty() { '[' } else { ',' });
        self.buf.push_str(message);
    }

    /// Appends the messages of a rendered frame (`[...]`, e.g. a
    /// [`delivery`]), without its brackets. Anything not shaped `[...]` is
    /// appended as one message.
    pub fn push_frame(&mut self, frame: &str) {
        match frame.strip_prefix('[').and_then(|f| f.strip_suffix(']')) {
            Some("") => {}
            Some(inner) => self.push(inner),
            None => self.push(frame),
        }
    }

    /// Whether nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The array, `[]` if empty.
    pub fn finish(mut self) -> String {
        if self.buf.is_empty() {
            return "[]".to_owned();
        }
        self.buf.push(']');
        self.buf
    }
}

/// A `callback-polling` (JSONP) response body: the batch wrapped in a call
/// of the client's callback, `/**/cb([...]);`. The leading comment keeps the
/// body from ever starting with bytes of the client's choosing.
pub fn jsonp(callback: &JsonpCallback, batch: &str) -> String {
    format!("/**/{}({batch});", callback.as_str())
}

#[cfg(test)]
mod presence_tests {
    use super::*;

    #[test]
    fn presence_events_and_answers() {
        let ev = br#"{"action":"join","channel":"/chat/room","member":{"client":"n:1","user":null,"info":null}}"#;
        assert_eq!(
            presence_event(b"/chat/room", ev).unwrap(),
            r#"[{"channel":"/chat/room","data":{"action":"join","channel":"/chat/room","member":{"client":"n:1","user":null,"info":null}},"ext":{"wsgate":{"presence":"join"}}}]"#
        );
        let leave = br#"{"action":"leave","channel":"/c","member":{}}"#;
        assert!(presence_event(b"/c", leave)
            .unwrap()
            .ends_with(r#""ext":{"wsgate":{"presence":"leave"}}}]"#));
        assert_eq!(presence_event(b"/c", br#"{"action":"join", nope"#), None);
        assert_eq!(presence_event(b"/c", br#"{"text":"hi"}"#), None);
        let members = crate::presence::Members {
            members: vec![r#"{"client":"n:1","user":"a","info":null}"#.to_owned()],
            users: 1,
        };
        let id = Id::string("7");
        assert_eq!(
            presence(Some(&id), "/chat/room", false, &members),
            r#"{"channel":"/service/wsgate/presence","id":"7","successful":true,"data":{"channel":"/chat/room","clients":1,"users":1,"members":[{"client":"n:1","user":"a","info":null}]}}"#
        );
        assert_eq!(
            presence(None, "/chat/room", true, &members),
            r#"{"channel":"/service/wsgate/presence","successful":true,"data":{"channel":"/chat/room","clients":1,"users":1}}"#
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::Topic;
    use bytes::Bytes;
    use serde_json::Value;

    const CID: &str = "0123456789abcdef0123456789abcdef";

    fn id(s: &str) -> Id {
        Id::string(s)
    }

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn service_messages() {
        assert_eq!(
            service_message("/service/random", None, "READY"),
            r#"{"channel":"/service/random","data":"READY"}"#
        );
        assert_eq!(
            service_message(
                "/service/billing",
                Id::from_json("5").as_ref(),
                r#"{"id":7}"#
            ),
            r#"{"channel":"/service/billing","id":5,"successful":true,"data":"{\"id\":7}"}"#
        );
        assert_eq!(
            service_ended("/service/random", CID, "service closed: the connection"),
            format!(
                r#"[{{"channel":"/service/random","data":"{{\"error\":\"service closed: the connection\"}}"}},{{"channel":"/meta/unsubscribe","successful":true,"clientId":"{CID}","subscription":"/service/random"}}]"#
            )
        );
    }

    #[test]
    fn handshake_reply() {
        assert_eq!(
            handshake(Some(&id("1")), CID, &Advice::retry(30000)),
            r#"{"channel":"/meta/handshake","id":"1","successful":true,"version":"1.0","supportedConnectionTypes":["websocket","long-polling","cross-origin-long-polling","callback-polling"],"clientId":"0123456789abcdef0123456789abcdef","advice":{"reconnect":"retry","interval":0,"timeout":30000}}"#
        );
    }

    #[test]
    fn connect_replies() {
        assert_eq!(
            connect(Some(&id("2")), CID, None, None, None),
            r#"{"channel":"/meta/connect","id":"2","successful":true,"clientId":"0123456789abcdef0123456789abcdef"}"#
        );
        let ext = raw(r#"{"wsgate":{"gaps":[]}}"#);
        let data = raw("{}");
        assert_eq!(
            connect(None, "c", Some(&Advice::retry(0)), Some(&ext), Some(&data)),
            r#"{"channel":"/meta/connect","successful":true,"clientId":"c","advice":{"reconnect":"retry","interval":0,"timeout":0},"ext":{"wsgate":{"gaps":[]}},"data":{}}"#
        );
    }

    #[test]
    fn subscribe_and_unsubscribe_replies_echo_the_subscription() {
        assert_eq!(
            subscribe(Some(&id("3")), CID, "/foo/*", None),
            r#"{"channel":"/meta/subscribe","id":"3","successful":true,"clientId":"0123456789abcdef0123456789abcdef","subscription":"/foo/*"}"#
        );
        assert_eq!(
            subscribe(
                Some(&id("3")),
                "c",
                "/secret",
                Some(&Error::Forbidden("/secret"))
            ),
            r#"{"channel":"/meta/subscribe","id":"3","successful":false,"clientId":"c","subscription":"/secret","error":"403:/secret:Forbidden"}"#
        );
        assert_eq!(
            unsubscribe(None, "c", "/foo/bar", None),
            r#"{"channel":"/meta/unsubscribe","successful":true,"clientId":"c","subscription":"/foo/bar"}"#
        );
        assert_eq!(
            unsubscribe(None, "c", "a b", Some(&Error::InvalidChannel("a b"))),
            r#"{"channel":"/meta/unsubscribe","successful":false,"clientId":"c","subscription":"a b","error":"405:a b:Invalid channel"}"#
        );
    }

    #[test]
    fn disconnect_and_publish_replies() {
        assert_eq!(
            disconnect(Some(&id("9")), "c"),
            r#"{"channel":"/meta/disconnect","id":"9","successful":true,"clientId":"c"}"#
        );
        let ack = publish(Some(&id("4")), "/chat/room1", None);
        assert_eq!(
            ack,
            r#"{"channel":"/chat/room1","id":"4","successful":true}"#
        );
        let v: Value = serde_json::from_str(&ack).unwrap();
        assert!(v.get("data").is_none(), "a publish ack must not carry data");
        assert_eq!(
            publish(
                None,
                "/service/x",
                Some(&Error::NoSuchService("/service/x"))
            ),
            r#"{"channel":"/service/x","successful":false,"error":"404:/service/x:No such service"}"#
        );
    }

    #[test]
    fn errors_in_code_args_message_form() {
        let cases: &[(Error<'_>, &str)] = &[
            (
                Error::ConnectionType("eventsource"),
                "301:eventsource:Connection types not supported",
            ),
            (Error::BadRequest(""), "400::Bad request"),
            (
                Error::BadRequest("missing channel"),
                "400:missing channel:Bad request",
            ),
            (
                Error::UnknownClient(CID),
                "402:0123456789abcdef0123456789abcdef:Unknown client",
            ),
            (Error::UnknownClient("a:b"), "402::Unknown client"),
            (Error::UnknownClient("a,b"), "402::Unknown client"),
            (Error::Forbidden("/chat/x"), "403:/chat/x:Forbidden"),
            (
                Error::UnknownChannel("/meta/foo"),
                "404:/meta/foo:Unknown channel",
            ),
            (
                Error::NoSuchService("/service/r"),
                "404:/service/r:No such service",
            ),
            (
                Error::InvalidChannel("/a/*/b"),
                "405:/a/*/b:Invalid channel",
            ),
            (
                Error::Refused {
                    code: 429,
                    args: "/a",
                    message: "rate limited",
                },
                "429:/a:rate limited",
            ),
            (
                Error::Refused {
                    code: 401,
                    args: "",
                    message: "invalid token: bad signature",
                },
                "401::invalid token - bad signature",
            ),
            (
                Error::Refused {
                    code: 5,
                    args: "x:y",
                    message: "m",
                },
                "005::m",
            ),
        ];
        for (error, want) in cases {
            assert_eq!(error.to_string(), *want);
            assert_eq!(error.code() % 1000, want[..3].parse::<u16>().unwrap());
        }
        assert_eq!(
            Error::UnknownClient("x").advice(),
            Some(Advice::handshake())
        );
        assert_eq!(Error::Forbidden("x").advice(), None);
    }

    #[test]
    fn failures_carry_the_advice_of_their_error() {
        assert_eq!(
            failure(
                Some("/meta/connect"),
                Some(&id("5")),
                &Error::UnknownClient("abc")
            ),
            r#"{"channel":"/meta/connect","id":"5","successful":false,"error":"402:abc:Unknown client","advice":{"reconnect":"handshake","interval":0}}"#
        );
        assert_eq!(
            subscribe(
                Some(&id("6")),
                "abc",
                "/a",
                Some(&Error::UnknownClient("abc"))
            ),
            r#"{"channel":"/meta/subscribe","id":"6","successful":false,"clientId":"abc","subscription":"/a","error":"402:abc:Unknown client","advice":{"reconnect":"handshake","interval":0}}"#
        );
        assert_eq!(
            failure_with(
                Some("/meta/handshake"),
                None,
                &Error::Refused {
                    code: 401,
                    args: "",
                    message: "token expired"
                },
                Some(Advice::none())
            ),
            r#"{"channel":"/meta/handshake","successful":false,"error":"401::token expired","advice":{"reconnect":"none","interval":0}}"#
        );
    }

    #[test]
    fn rejections_of_bad_input() {
        use super::super::message::{decode_json, Limits};
        let limits = Limits::new(1 << 16);
        let all = decode_json(
            br#"[{"id":"1"},{"channel":"/meta/nope","id":2},{"channel":"/x y","data":1},7]"#,
            &limits,
        )
        .unwrap();
        let replies: Vec<String> = all
            .iter()
            .map(|d| rejected(d.as_ref().unwrap_err()))
            .collect();
        assert_eq!(
            replies,
            [
                r#"{"id":"1","successful":false,"error":"400:missing channel:Bad request"}"#,
                r#"{"channel":"/meta/nope","id":2,"successful":false,"error":"404:/meta/nope:Unknown channel"}"#,
                r#"{"channel":"/x y","successful":false,"error":"405:/x y:Invalid channel"}"#,
                r#"{"successful":false,"error":"400:not an object:Bad request"}"#,
            ]
        );
        assert_eq!(
            bad_body(&DecodeError::NotJson),
            r#"[{"successful":false,"error":"400:not JSON:Bad request"}]"#
        );
        assert_eq!(
            bad_body(&DecodeError::TooLarge { size: 9, max: 1 }),
            r#"[{"successful":false,"error":"400:body too large:Bad request"}]"#
        );
    }

    fn msg(topic: Topic, channel: &'static [u8], payload: &'static [u8]) -> BrokerMessage {
        BrokerMessage {
            topic,
            channel: Bytes::from_static(channel),
            payload: Bytes::from_static(payload),
            position: None,
        }
    }

    #[test]
    fn deliveries_for_each_payload_kind() {
        assert_eq!(
            delivery(b"/chat/room1", br#"{"text":"hi"}"#),
            r#"[{"channel":"/chat/room1","data":{"text":"hi"}}]"#
        );
        assert_eq!(delivery(b"/a", b"42"), r#"[{"channel":"/a","data":42}]"#);
        assert_eq!(
            delivery(b"/a", br#""42""#),
            r#"[{"channel":"/a","data":"42"}]"#
        );
        assert_eq!(
            delivery(b"/a", b" [1, 2] "),
            r#"[{"channel":"/a","data": [1, 2] }]"#
        );
        assert_eq!(
            delivery(b"/a", b"hello \"world\""),
            r#"[{"channel":"/a","data":"hello \"world\""}]"#
        );
        assert_eq!(delivery(b"/a", b""), r#"[{"channel":"/a","data":""}]"#);
        assert_eq!(
            delivery(b"/a", br#""\ud800""#),
            r#"[{"channel":"/a","data":"\"\\ud800\""}]"#
        );
        assert_eq!(
            delivery(b"/a", b"\xff\x00"),
            r#"[{"channel":"/a","data":"/wA=","ext":{"encoding":"base64"}}]"#
        );
        assert_eq!(
            delivery(b"/a\"b", b"1"),
            r#"[{"channel":"/a\"b","data":1}]"#
        );
    }

    #[test]
    fn history_deliveries_carry_their_position_in_ext() {
        let p = Position {
            offset: 42,
            epoch: bytes::Bytes::from_static(b"e1"),
        };
        assert_eq!(
            delivery_at(b"/a", b"{\"x\":1}", Some(&p)),
            r#"[{"channel":"/a","data":{"x":1},"ext":{"wsgate":{"offset":42,"epoch":"e1"}}}]"#
        );
        assert_eq!(
            delivery_at(b"/a", b"\xff\x00", Some(&p)),
            r#"[{"channel":"/a","data":"/wA=","ext":{"encoding":"base64","wsgate":{"offset":42,"epoch":"e1"}}}]"#
        );
        assert_eq!(
            subscribe_recovered(None, "c", "/a", false),
            r#"{"channel":"/meta/subscribe","successful":true,"clientId":"c","subscription":"/a","ext":{"wsgate":{"recovered":false}}}"#
        );
    }

    #[test]
    fn deep_payloads_stay_readable() {
        for depth in [1, 124, 125, 126, 127, 128, 300] {
            let payload = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            let frame = delivery(b"/a", payload.as_bytes());
            let v: Value =
                serde_json::from_str(&frame).unwrap_or_else(|e| panic!("depth {depth}: {e}"));
            if depth <= MAX_DATA_DEPTH {
                assert!(v[0]["data"].is_array(), "depth {depth} embedded");
            } else {
                assert_eq!(
                    v[0]["data"],
                    Value::String(payload),
                    "depth {depth} as a string"
                );
            }
        }
    }

    #[test]
    fn render_filters_by_the_bayeux_meaning() {
        let one = channel::Subscription::parse("/foo/*").unwrap();
        let one = one.topic().unwrap().clone();
        assert_eq!(
            render(&msg(one.clone(), b"/foo/bar", b"1")).as_deref(),
            Some(r#"[{"channel":"/foo/bar","data":1}]"#)
        );
        assert_eq!(render(&msg(one.clone(), b"/foo/a/b", b"1")), None);
        assert_eq!(render(&msg(one, b"/foo/", b"1")), None);
        let exact = Topic::Channel(Bytes::from_static(b"/meta/connect"));
        assert_eq!(render(&msg(exact, b"/meta/connect", b"1")), None);
    }

    #[test]
    fn gap_notices() {
        let topics = [
            channel::Subscription::parse("/foo/**")
                .unwrap()
                .topic()
                .unwrap()
                .clone(),
            Topic::Channel(Bytes::from_static(b"/chat/room1")),
        ];
        let interrupted = Notice {
            kind: NoticeKind::Interrupted,
            topics: &topics,
            reason: Some("broker connection lost"),
            recovered: None,
        };
        assert_eq!(
            gap(&interrupted),
            r#"[{"channel":"/wsgate/gap","data":{"state":"interrupted","reason":"broker connection lost","subscriptions":["/foo/**","/chat/room1"]}}]"#
        );
        let resumed = Notice {
            kind: NoticeKind::Resumed,
            topics: &topics[1..],
            reason: None,
            recovered: None,
        };
        let (a, b) = (gap_data(&interrupted), gap_data(&resumed));
        assert_eq!(b, r#"{"state":"resumed","subscriptions":["/chat/room1"]}"#);
        assert_eq!(
            a,
            r#"{"state":"interrupted","reason":"broker connection lost","subscriptions":["/foo/**","/chat/room1"]}"#
        );
    }

    #[test]
    fn batches_join_replies_and_delivery_frames() {
        assert_eq!(Batch::new().finish(), "[]");
        let mut b = Batch::new();
        assert!(b.is_empty());
        b.push(&connect(None, "c", None, None, None));
        b.push_frame(&delivery(b"/a", b"1"));
        b.push_frame("[]");
        b.push_frame(&delivery(b"/b", b"[2]"));
        assert!(!b.is_empty());
        let body = b.finish();
        assert_eq!(
            body,
            r#"[{"channel":"/meta/connect","successful":true,"clientId":"c"},{"channel":"/a","data":1},{"channel":"/b","data":[2]}]"#
        );
        assert_eq!(
            serde_json::from_str::<Value>(&body)
                .unwrap()
                .as_array()
                .unwrap()
                .len(),
            3
        );
        let cb = JsonpCallback::parse("__jsonp1__").unwrap();
        assert_eq!(jsonp(&cb, "[]"), "/**/__jsonp1__([]);");
    }
}
