//! The Engine.IO protocol 3 codec: packets, and the payloads that carry
//! several of them in one polling request or response.
//!
//! A packet is a type digit and its data (`4hello`: a message). Over a
//! WebSocket each frame is one packet, as is. Over polling, engine.io 1.8
//! (the server realizehit shipped) frames packets into a *payload*:
//!
//! - string payloads (the client asked `b64=1`, as engine.io-client 1.8
//!   does under Node): `<len>:<packet>` repeated, where the packet is
//!   UTF-8-encoded *into a string of byte-valued characters* and `<len>`
//!   counts those characters (so the UTF-8 bytes), and the whole string is
//!   then sent as UTF-8 again. A `é` (C3 A9) goes on the wire as
//!   `C3 83 C2 A9`, counted 2. Both directions work this way.
//! - binary payloads (no `b64`): per packet a marker byte (0: string, 1:
//!   binary), the length as one byte per decimal digit, 255, then the
//!   packet's bytes (a string packet's UTF-8).
//!
//! Binary packets (marker 1, or `b<type><base64>` in a string payload)
//! are refused: realizehit speaks text only.

use thiserror::Error;

/// The packet types of protocol 3: a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `0`: the handshake (server to client).
    Open,
    /// `1`: the end of the session, either way.
    Close,
    /// `2`: a liveness check (the client's; `2probe` starts an upgrade).
    Ping,
    /// `3`: its answer (`3probe` to a probe).
    Pong,
    /// `4`: application data.
    Message,
    /// `5`: the client switches to the probed WebSocket.
    Upgrade,
    /// `6`: nothing (answers a pending poll during an upgrade).
    Noop,
}

impl Kind {
    fn from_digit(d: u8) -> Option<Kind> {
        Some(match d {
            b'0' => Kind::Open,
            b'1' => Kind::Close,
            b'2' => Kind::Ping,
            b'3' => Kind::Pong,
            b'4' => Kind::Message,
            b'5' => Kind::Upgrade,
            b'6' => Kind::Noop,
            _ => return None,
        })
    }
}

/// One decoded packet; `data` borrows the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    /// Its type.
    pub kind: Kind,
    /// What follows the type digit.
    pub data: &'a str,
}

/// Why a packet or payload could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CodecError {
    /// An empty packet, or one whose first byte is no packet type.
    #[error("unknown packet type")]
    UnknownType,
    /// A binary packet (realizehit speaks text only).
    #[error("binary packets are not supported: send text")]
    Binary,
    /// A payload whose framing is broken (a length that is no number, or
    /// that does not match what follows).
    #[error("malformed payload framing")]
    Framing,
    /// A payload whose packets are not UTF-8 once unframed.
    #[error("packet is not valid UTF-8")]
    Utf8,
}

/// Decodes one packet (a WebSocket frame, or one out of a payload).
pub fn decode_packet(text: &str) -> Result<Packet<'_>, CodecError> {
    let first = *text.as_bytes().first().ok_or(CodecError::UnknownType)?;
    if first == b'b' {
        return Err(CodecError::Binary);
    }
    let kind = Kind::from_digit(first).ok_or(CodecError::UnknownType)?;
    // The first byte is ASCII, so index 1 is a char boundary.
    let data = text.get(1..).unwrap_or("");
    Ok(Packet { kind, data })
}

/// Decodes a string payload (a `b64` POST body, already checked as UTF-8)
/// into its packets' texts, each the real UTF-8 text (the byte-valued
/// characters turned back into bytes and read as UTF-8).
pub fn decode_string_payload(body: &str) -> Result<Vec<String>, CodecError> {
    if body.is_empty() {
        return Err(CodecError::Framing);
    }
    let mut out = Vec::new();
    let mut chars = body.chars();
    loop {
        // The length: ASCII digits up to ':'.
        let mut len: usize = 0;
        let mut digits = 0usize;
        let mut next = chars.next();
        if next.is_none() {
            break;
        }
        while let Some(c) = next {
            if c == ':' {
                break;
            }
            let d = c.to_digit(10).ok_or(CodecError::Framing)? as usize;
            digits += 1;
            if digits > 9 {
                return Err(CodecError::Framing);
            }
            len = len * 10 + d;
            next = chars.next();
        }
        if next.is_none() || digits == 0 {
            return Err(CodecError::Framing);
        }
        // `len` characters, each a byte of the packet's UTF-8.
        let mut bytes = Vec::with_capacity(len.min(body.len()));
        for _ in 0..len {
            let c = chars.next().ok_or(CodecError::Framing)?;
            let b = u8::try_from(u32::from(c)).map_err(|_| CodecError::Utf8)?;
            bytes.push(b);
        }
        if len == 0 {
            continue;
        }
        let text = String::from_utf8(bytes).map_err(|_| CodecError::Utf8)?;
        out.push(text);
    }
    Ok(out)
}

/// Decodes a binary payload (a POST with `application/octet-stream`):
/// string packets only.
pub fn decode_binary_payload(body: &[u8]) -> Result<Vec<String>, CodecError> {
    if body.is_empty() {
        return Err(CodecError::Framing);
    }
    let mut out = Vec::new();
    let mut rest = body;
    while let Some((&marker, tail)) = rest.split_first() {
        let mut len: usize = 0;
        let mut digits = 0usize;
        let mut i = 0;
        loop {
            let b = *tail.get(i).ok_or(CodecError::Framing)?;
            i += 1;
            if b == 255 {
                break;
            }
            if b > 9 || digits >= 9 {
                return Err(CodecError::Framing);
            }
            digits += 1;
            len = len * 10 + usize::from(b);
        }
        if digits == 0 {
            return Err(CodecError::Framing);
        }
        let end = i.checked_add(len).ok_or(CodecError::Framing)?;
        let packet = tail.get(i..end).ok_or(CodecError::Framing)?;
        match marker {
            0 => {}
            1 => return Err(CodecError::Binary),
            _ => return Err(CodecError::Framing),
        }
        let text = std::str::from_utf8(packet).map_err(|_| CodecError::Utf8)?;
        out.push(text.to_owned());
        rest = tail.get(end..).unwrap_or(&[]);
    }
    Ok(out)
}

/// Appends one packet to a string payload: its UTF-8 length, `:`, and its
/// bytes each as the character of that value (so a byte from 0x80 takes
/// two bytes on the wire).
pub fn push_string_packet(body: &mut Vec<u8>, packet: &str) {
    let mut digits = itoa(packet.len());
    body.append(&mut digits);
    body.push(b':');
    for &b in packet.as_bytes() {
        if b < 0x80 {
            body.push(b);
        } else {
            body.push(0xC0 | (b >> 6));
            body.push(0x80 | (b & 0x3F));
        }
    }
}

/// Appends one packet to a binary payload: marker 0 (a string), the length
/// one digit per byte, 255, the packet's UTF-8.
pub fn push_binary_packet(body: &mut Vec<u8>, packet: &str) {
    body.push(0);
    body.extend(itoa(packet.len()).into_iter().map(|d| d - b'0'));
    body.push(255);
    body.extend_from_slice(packet.as_bytes());
}

fn itoa(n: usize) -> Vec<u8> {
    n.to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_payloads_count_utf8_bytes_and_double_encode() {
        let mut body = Vec::new();
        push_string_packet(&mut body, "4é");
        push_string_packet(&mut body, "3");
        assert_eq!(body, b"3:4\xC3\x83\xC2\xA91:3".to_vec());
        let text = String::from_utf8(body).expect("utf-8");
        assert_eq!(
            decode_string_payload(&text),
            Ok(vec!["4é".into(), "3".into()])
        );
    }

    #[test]
    fn binary_payloads_round_trip_string_packets() {
        let mut body = Vec::new();
        push_binary_packet(&mut body, "4héllo wörld");
        assert_eq!(&body[..4], &[0, 1, 4, 255]);
        assert_eq!(
            decode_binary_payload(&body),
            Ok(vec!["4héllo wörld".into()])
        );
        assert_eq!(
            decode_binary_payload(&[1, 1, 255, 4]),
            Err(CodecError::Binary)
        );
    }

    #[test]
    fn broken_framing_is_an_error() {
        for bad in [
            "",
            "x:4a",
            "3:4a",
            "2:4ab",
            ":4",
            "1",
            "99999999999:4",
            "2:4Ā",
        ] {
            assert!(decode_string_payload(bad).is_err(), "{bad:?}");
        }
        assert_eq!(decode_packet(""), Err(CodecError::UnknownType));
        assert_eq!(decode_packet("9x"), Err(CodecError::UnknownType));
        assert_eq!(decode_packet("b4AAA"), Err(CodecError::Binary));
        assert_eq!(
            decode_packet("4{}"),
            Ok(Packet {
                kind: Kind::Message,
                data: "{}"
            })
        );
    }
}
