//! Just enough RESP2 for the node's own Redis connections (pub/sub, publish,
//! and the Bayeux handoff store in `crate::handoff`).
//!
//! They send commands as arrays of bulk strings, and receive arrays of bulk
//! strings and integers, simple strings, errors and nulls. A large frame is split off the read buffer and frozen, and every
//! bulk string is a [`Bytes`] slice of it, so a large payload reaches the
//! fan-out without being copied; a small one is copied once, so that it does
//! not pin the read buffer's block (see [`parse`]).

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// One RESP2 value as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    /// `+OK`
    Simple(Bytes),
    /// `-ERR ...`
    Error(Bytes),
    /// `:3`
    Integer(i64),
    /// `$5\r\nhello`
    Bulk(Bytes),
    /// `$-1` or `*-1`
    Null,
    /// `*2\r\n...`
    Array(Vec<Value>),
}

/// The peer sent bytes that are not RESP2; the connection cannot be trusted.
#[derive(Debug, thiserror::Error)]
#[error("invalid RESP from redis: {0}")]
pub(crate) struct ProtocolError(&'static str);

/// Deepest array nesting accepted; pub/sub replies are one level deep, so
/// anything deeper is a broken peer, and the bound keeps recursion finite.
const MAX_DEPTH: usize = 8;

/// Removes and returns one complete value from the front of `buf`, or `None`
/// when more bytes are needed (then `buf` is untouched).
pub(crate) fn parse(buf: &mut BytesMut) -> Result<Option<Value>, ProtocolError> {
    let Some(len) = frame_len(buf, 0, 0)? else {
        return Ok(None);
    };
    let mut frame = if len <= COPY_BELOW {
        // A small frame is copied out, so the read buffer stays the sole
        // owner of its block and the next read reuses it: a slice would pin
        // the whole 64 KiB block for as long as the payload lives.
        let frame = Bytes::copy_from_slice(&buf[..len]);
        buf.advance(len);
        frame
    } else {
        buf.split_to(len).freeze()
    };
    decode(&mut frame).map(Some)
}

/// Frames up to this size are copied out of the read buffer (see [`parse`]);
/// larger ones are sliced, their bytes being most of what they pin anyway.
pub(crate) const COPY_BELOW: usize = 16 * 1024;

/// Length of the complete frame starting at `at`, or `None` if incomplete.
fn frame_len(buf: &[u8], at: usize, depth: usize) -> Result<Option<usize>, ProtocolError> {
    if depth > MAX_DEPTH {
        return Err(ProtocolError("nesting too deep"));
    }
    let Some((line, next)) = line(buf, at) else {
        return Ok(None);
    };
    let Some((&tag, rest)) = line.split_first() else {
        return Err(ProtocolError("empty line"));
    };
    match tag {
        b'+' | b'-' | b':' => Ok(Some(next - at)),
        b'$' => {
            let n = number(rest)?;
            if n < 0 {
                return Ok(Some(next - at));
            }
            let end = next + n as usize + 2;
            Ok((buf.len() >= end).then_some(end - at))
        }
        b'*' => {
            let n = number(rest)?;
            let mut pos = next;
            for _ in 0..n.max(0) {
                match frame_len(buf, pos, depth + 1)? {
                    Some(len) => pos += len,
                    None => return Ok(None),
                }
            }
            Ok(Some(pos - at))
        }
        _ => Err(ProtocolError("unknown type byte")),
    }
}

/// The line starting at `at` (without CRLF) and the offset after its CRLF.
fn line(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rest = buf.get(at..)?;
    let end = rest.windows(2).position(|w| w == b"\r\n")?;
    Some((&rest[..end], at + end + 2))
}

fn number(digits: &[u8]) -> Result<i64, ProtocolError> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(ProtocolError("bad length or integer"))
}

/// Decodes a frame already known to be complete (and so of bounded depth).
fn decode(frame: &mut Bytes) -> Result<Value, ProtocolError> {
    let end = frame
        .windows(2)
        .position(|w| w == b"\r\n")
        .ok_or(ProtocolError("truncated"))?;
    let head = frame.split_to(end);
    frame.advance(2);
    let tag = *head.first().ok_or(ProtocolError("empty line"))?;
    let rest = head.slice(1..);
    Ok(match tag {
        b'+' => Value::Simple(rest),
        b'-' => Value::Error(rest),
        b':' => Value::Integer(number(&rest)?),
        b'$' => {
            let n = number(&rest)?;
            if n < 0 {
                Value::Null
            } else {
                let n = n as usize;
                if frame.len() < n + 2 {
                    return Err(ProtocolError("truncated bulk string"));
                }
                let body = frame.split_to(n);
                frame.advance(2);
                Value::Bulk(body)
            }
        }
        b'*' => {
            let n = number(&rest)?;
            if n < 0 {
                Value::Null
            } else {
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(decode(frame)?);
                }
                Value::Array(items)
            }
        }
        _ => return Err(ProtocolError("unknown type byte")),
    })
}

/// Appends one command (an array of bulk strings) to `out`.
pub(crate) fn encode_command<'a>(
    out: &mut BytesMut,
    args: impl ExactSizeIterator<Item = &'a [u8]>,
) {
    write_header(out, b'*', args.len());
    for arg in args {
        write_header(out, b'$', arg.len());
        out.put_slice(arg);
        out.put_slice(b"\r\n");
    }
}

fn write_header(out: &mut BytesMut, tag: u8, n: usize) {
    out.put_u8(tag);
    out.put_slice(n.to_string().as_bytes());
    out.put_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(input: &[u8]) -> Vec<Value> {
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(v) = parse(&mut buf).unwrap() {
            out.push(v);
        }
        assert!(buf.is_empty(), "left over: {buf:?}");
        out
    }

    fn bulk(s: &str) -> Value {
        Value::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }

    /// Regression (issue 16, point 5): each small message read on its own
    /// used to pin a fresh 64 KiB block while its payload lived. Now the read
    /// buffer keeps reusing one block however many payloads are alive.
    #[test]
    fn small_payloads_do_not_pin_the_read_buffer() {
        let frame = b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$5\r\nhello\r\n";
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let mut alive = Vec::new();
        let mut blocks = std::collections::HashSet::new();
        for _ in 0..1000 {
            buf.reserve(64 * 1024);
            blocks.insert(buf.as_ptr() as usize);
            buf.extend_from_slice(frame);
            alive.push(parse(&mut buf).unwrap().unwrap());
        }
        assert_eq!(alive.len(), 1000);
        assert_eq!(blocks.len(), 1, "a new block per read: {}", blocks.len());
    }

    #[test]
    fn large_payloads_are_sliced_not_copied() {
        let payload = vec![b'x'; COPY_BELOW * 2];
        let mut input =
            format!("*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n${}\r\n", payload.len()).into_bytes();
        input.extend_from_slice(&payload);
        input.extend_from_slice(b"\r\n");
        let mut buf = BytesMut::from(&input[..]);
        let start = buf.as_ptr() as usize;
        let Some(Value::Array(items)) = parse(&mut buf).unwrap() else {
            panic!("expected an array");
        };
        let Value::Bulk(body) = &items[2] else {
            panic!("expected a bulk string");
        };
        let at = body.as_ptr() as usize;
        assert!(at > start && at < start + input.len(), "payload was copied");
    }

    #[test]
    fn parses_pubsub_replies() {
        let v = parse_all(b"*3\r\n$10\r\npsubscribe\r\n$6\r\nnews.*\r\n:1\r\n*4\r\n$8\r\npmessage\r\n$6\r\nnews.*\r\n$10\r\nnews.sport\r\n$2\r\n{}\r\n");
        assert_eq!(
            v[0],
            Value::Array(vec![bulk("psubscribe"), bulk("news.*"), Value::Integer(1)])
        );
        assert_eq!(
            v[1],
            Value::Array(vec![
                bulk("pmessage"),
                bulk("news.*"),
                bulk("news.sport"),
                bulk("{}")
            ])
        );
    }

    #[test]
    fn waits_for_more_bytes_at_every_split_point() {
        let whole: &[u8] = b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$4\r\nx\r\ny\r\n";
        for cut in 0..whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            assert_eq!(parse(&mut buf).unwrap(), None, "cut at {cut}");
            assert_eq!(buf.len(), cut);
            buf.extend_from_slice(&whole[cut..]);
            let v = parse(&mut buf).unwrap().unwrap();
            assert_eq!(
                v,
                Value::Array(vec![bulk("message"), bulk("a"), bulk("x\r\ny")])
            );
        }
    }

    #[test]
    fn binary_payloads_survive() {
        let mut buf = BytesMut::from(&b"$3\r\n\xff\x00\xfe\r\n"[..]);
        assert_eq!(
            parse(&mut buf).unwrap(),
            Some(Value::Bulk(Bytes::from_static(b"\xff\x00\xfe")))
        );
    }

    #[test]
    fn simple_error_integer_and_null() {
        let v = parse_all(b"+OK\r\n-ERR no\r\n:42\r\n$-1\r\n");
        assert_eq!(v[0], Value::Simple(Bytes::from_static(b"OK")));
        assert_eq!(v[1], Value::Error(Bytes::from_static(b"ERR no")));
        assert_eq!(v[2], Value::Integer(42));
        assert_eq!(v[3], Value::Null);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [&b"?x\r\n"[..], b"$x\r\n", b"*z\r\n", b"\r\n"] {
            assert!(parse(&mut BytesMut::from(bad)).is_err(), "{bad:?}");
        }
        let deep = "*1\r\n".repeat(20);
        assert!(parse(&mut BytesMut::from(deep.as_bytes())).is_err());
    }

    #[test]
    fn encodes_commands() {
        let mut out = BytesMut::new();
        encode_command(&mut out, [&b"PSUBSCRIBE"[..], b"a*", b"b"].into_iter());
        assert_eq!(
            &out[..],
            b"*3\r\n$10\r\nPSUBSCRIBE\r\n$2\r\na*\r\n$1\r\nb\r\n"
        );
    }
}
