//! Fuzzes the Bayeux decoder (`wsgate::protocol::bayeux::message`) and the
//! replies built from what it returns.
//!
//! Checks, for any input:
//! - `decode_json`, `decode_form` and `decode_body` never panic;
//! - the body is refused as a whole exactly when an independent reading says
//!   so (larger than the limit, not UTF-8, not JSON as serde_json reads a
//!   `Value`, neither object nor array, nested deeper than the limit, too
//!   many messages), else there is one entry per message;
//! - each decoded message agrees with that reading: its kind follows its
//!   `channel`, its `id` is the one sent, a publish's `data` is the `data`
//!   sent; a refused message echoes the id it carried, if any;
//! - the same JSON sent as a `message=` form (percent-encoded here) decodes
//!   to the same thing;
//! - every reply rendered from the outcome is one valid JSON value that
//!   echoes the id, a publish ack has no `data`, and a publish's `data`
//!   survives the trip Redis -> delivery frame unchanged.
//!
//! Input: the bytes, as the body.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use wsgate::protocol::bayeux::channel::{self, Meta, Subscription};
use wsgate::protocol::bayeux::message::{
    decode_body, decode_form, decode_json, DecodeError, Decoded, Kind, Limits,
};
use wsgate::protocol::bayeux::reply;

const LIMITS: Limits = Limits {
    max_bytes: 8192,
    max_depth: 16,
    max_messages: 32,
};

fn depth(v: &Value) -> usize {
    match v {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// The body-level outcome the rules predict: the messages, or the error.
fn expected(body: &[u8]) -> Result<Vec<Value>, DecodeError> {
    if body.len() > LIMITS.max_bytes {
        return Err(DecodeError::TooLarge {
            size: body.len(),
            max: LIMITS.max_bytes,
        });
    }
    let text = std::str::from_utf8(body).map_err(|_| DecodeError::NotUtf8)?;
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        // serde_json's own recursion limit (128) is far above ours.
        Err(_) if wsgate_depth_guess(text) > LIMITS.max_depth => {
            return Err(DecodeError::TooDeep {
                max: LIMITS.max_depth,
            })
        }
        Err(_) => return Err(DecodeError::NotJson),
    };
    if depth(&value) > LIMITS.max_depth {
        return Err(DecodeError::TooDeep {
            max: LIMITS.max_depth,
        });
    }
    let messages = match value {
        Value::Array(items) => items,
        obj @ Value::Object(_) => vec![obj],
        _ => return Err(DecodeError::NotObjectOrArray),
    };
    if messages.len() > LIMITS.max_messages {
        return Err(DecodeError::TooManyMessages {
            max: LIMITS.max_messages,
        });
    }
    Ok(messages)
}

/// Bracket depth outside strings, for inputs serde_json refuses: the
/// decoder calls those "too deep" rather than "not JSON" by the same count.
fn wsgate_depth_guess(text: &str) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for b in text.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
        } else {
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
    }
    max
}

fn parse_reply(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("reply is not JSON ({e}): {text}"))
}

/// A rendered reply must echo the message's id exactly (as JSON).
fn check_id(reply: &Value, sent: Option<&Value>) {
    let sent = sent.filter(|v| !v.is_null());
    assert_eq!(reply.get("id"), sent, "id not echoed: {reply}");
}

fn check_entry(entry: &Decoded, sent: &Value) {
    let obj = sent.as_object();
    let sent_id = obj.and_then(|o| o.get("id"));
    match entry {
        Err(e) => {
            if let Some(id) = &e.id {
                let id: Value = serde_json::from_str(id.json().get()).expect("id is JSON");
                assert_eq!(Some(&id), sent_id, "refusal echoes another id");
            }
            let r = parse_reply(&reply::rejected(e));
            assert_eq!(r.get("successful"), Some(&Value::Bool(false)));
            let error = r["error"].as_str().expect("error is a string");
            assert!(error.len() > 4 && error.as_bytes()[3] == b':', "{error}");
        }
        Ok(m) => {
            let obj = obj.expect("a decoded message was an object");
            let ch = obj
                .get("channel")
                .and_then(Value::as_str)
                .expect("a decoded message had a string channel");
            let id = m.id.as_ref();
            if let Some(id) = id {
                let id: Value = serde_json::from_str(id.json().get()).expect("id is JSON");
                assert_eq!(Some(&id), sent_id);
            } else {
                assert!(sent_id.is_none_or(Value::is_null), "id lost");
            }
            let cid = m.client_id.as_deref().unwrap_or("");
            match (&m.kind, Meta::parse(ch)) {
                (Kind::Handshake { .. }, Some(Meta::Handshake)) => {
                    let r = parse_reply(&reply::handshake(id, cid, &reply::Advice::retry(1)));
                    check_id(&r, sent_id);
                }
                (Kind::Connect { .. }, Some(Meta::Connect)) => {
                    let r = parse_reply(&reply::connect(id, cid, None, None, None));
                    check_id(&r, sent_id);
                }
                (Kind::Disconnect, Some(Meta::Disconnect)) => {
                    check_id(&parse_reply(&reply::disconnect(id, cid)), sent_id);
                }
                (
                    Kind::Subscribe { subscriptions } | Kind::Unsubscribe { subscriptions },
                    Some(Meta::Subscribe | Meta::Unsubscribe),
                ) => {
                    assert!(!subscriptions.is_empty());
                    for s in subscriptions {
                        let error = Subscription::parse(s).err().map(|e| e.error(s));
                        let r = parse_reply(&reply::subscribe(id, cid, s, error.as_ref()));
                        check_id(&r, sent_id);
                        assert_eq!(r["subscription"].as_str(), Some(s.as_str()));
                        assert_eq!(r["successful"].as_bool(), Some(error.is_none()));
                    }
                }
                (Kind::Publish { channel: c, data } | Kind::Service { channel: c, data }, None) => {
                    assert_eq!(c, ch);
                    assert_eq!(channel::parse(c), Ok(None), "published to a non-name {c}");
                    let is_service = matches!(m.kind, Kind::Service { .. });
                    assert_eq!(is_service, channel::class(c) == channel::Class::Service);
                    let want = obj.get("data").expect("publish without data");
                    let got: Value = serde_json::from_str(data.get()).expect("data is JSON");
                    assert_eq!(&got, want, "data changed");
                    let ack = parse_reply(&reply::publish(id, c, None));
                    check_id(&ack, sent_id);
                    assert!(ack.get("data").is_none(), "publish ack with data: {ack}");
                    // Published to Redis verbatim, delivered back unchanged.
                    let frame = parse_reply(&reply::delivery(c.as_bytes(), data.get().as_bytes()));
                    assert_eq!(&frame[0]["data"], want, "delivery changed data");
                    assert_eq!(frame[0]["channel"].as_str(), Some(c.as_str()));
                    if !is_service {
                        let sub = Subscription::parse(c).expect("a publishable name subscribes");
                        let topic = sub.topic().expect("a broadcast channel has a topic");
                        assert!(channel::delivers(topic, c.as_bytes()));
                    }
                }
                (kind, meta) => panic!("channel {ch:?} ({meta:?}) decoded as {kind:?}"),
            }
        }
    }
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fuzz_target!(|body: &[u8]| {
    let got = decode_json(body, &LIMITS);
    match (&got, expected(body)) {
        (Ok(entries), Ok(messages)) => {
            assert_eq!(entries.len(), messages.len());
            for (entry, sent) in entries.iter().zip(&messages) {
                check_entry(entry, sent);
            }
        }
        (Err(e), Err(want)) => {
            assert_eq!(e, &want);
            let r = parse_reply(&reply::bad_body(e));
            assert_eq!(r[0]["successful"], Value::Bool(false));
        }
        (got, want) => panic!(
            "input {:?}: decoded {got:?}, expected {want:?}",
            String::from_utf8_lossy(body)
        ),
    }

    // The same JSON as a form body decodes the same (when it fits).
    if let Ok(text) = std::str::from_utf8(body) {
        let form = format!("jsonp=cb&message={}", percent_encode(text));
        if form.len() <= LIMITS.max_bytes {
            let via_form = decode_form(form.as_bytes(), &LIMITS);
            assert_eq!(format!("{via_form:?}"), format!("{got:?}"), "form differs");
            let via_body = decode_body(Some("text/plain"), form.as_bytes(), &LIMITS);
            assert_eq!(
                format!("{via_body:?}"),
                format!("{got:?}"),
                "text/plain form differs"
            );
        }
    }
    // Raw bytes as a form and as any content type: no panic, a readable reply.
    for ct in [
        None,
        Some("application/x-www-form-urlencoded"),
        Some("image/png"),
    ] {
        if let Err(e) = decode_body(ct, body, &LIMITS) {
            parse_reply(&reply::bad_body(&e));
        }
    }
});
