//! Bayeux client ids: the only credential a Bayeux client presents after its
//! handshake, so they must be unguessable.
//!
//! 128 bits from the kernel's CSPRNG (`/dev/urandom`, kept open after first
//! use so a node near its file limit can still hand out ids), written as 32
//! lowercase hex digits: alphanumeric, as the spec's `clientId` grammar
//! wants, and fixed-size, so a session table can key on it without
//! allocating. Read from the device rather than through `getrandom(2)` via
//! `libc` so the library stays free of `unsafe`; a handshake is not a hot
//! path, and one `read` of 16 bytes is all it costs.

use std::fs::File;
use std::io::{self, Read};
use std::sync::OnceLock;

/// Hex digits in a client id (16 random bytes).
pub const LEN: usize = 32;

/// A client id, as issued at a handshake and presented on every later
/// message.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId([u8; LEN]);

impl ClientId {
    /// A fresh, random id. Fails only if the kernel's random device cannot be
    /// read (answer the handshake with a server error; nothing to retry here).
    pub fn generate() -> io::Result<ClientId> {
        let mut random = [0u8; LEN / 2];
        let mut device: &File = urandom()?;
        device.read_exact(&mut random)?;
        Ok(ClientId::from_random(random))
    }

    fn from_random(random: [u8; LEN / 2]) -> ClientId {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut id = [0u8; LEN];
        for (pair, byte) in id.chunks_exact_mut(2).zip(random) {
            pair[0] = HEX[usize::from(byte >> 4)];
            pair[1] = HEX[usize::from(byte & 0xf)];
        }
        ClientId(id)
    }

    /// The id a client sent, if it has the shape of one this gateway issues
    /// (32 lowercase hex digits). Anything else cannot be a live session:
    /// answer it `402 Unknown client` without a lookup.
    pub fn parse(text: &str) -> Option<ClientId> {
        let bytes: [u8; LEN] = text.as_bytes().try_into().ok()?;
        bytes
            .iter()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            .then_some(ClientId(bytes))
    }

    /// The id as sent on the wire.
    pub fn as_str(&self) -> &str {
        // Only ever built from ASCII hex digits, so this never falls back.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientId({})", self.as_str())
    }
}

/// `/dev/urandom`, opened on first use and then shared (a `&File` reads
/// without a lock). A failed open is not remembered: the next call retries.
fn urandom() -> io::Result<&'static File> {
    static DEVICE: OnceLock<File> = OnceLock::new();
    if let Some(file) = DEVICE.get() {
        return Ok(file);
    }
    let file = File::open("/dev/urandom")?;
    Ok(DEVICE.get_or_init(|| file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn hex_encoding_is_exact() {
        let id = ClientId::from_random([
            0x00, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xff, 0x10, 0x20, 0x30, 0x40,
            0x50, 0x60,
        ]);
        assert_eq!(id.as_str(), "000123456789abcdefff102030405060");
        assert_eq!(id.to_string(), id.as_str());
        assert_eq!(
            format!("{id:?}"),
            "ClientId(000123456789abcdefff102030405060)"
        );
    }

    #[test]
    fn generated_ids_are_distinct_and_parse_back() {
        let ids: HashSet<ClientId> = (0..1000).map(|_| ClientId::generate().unwrap()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            assert_eq!(id.as_str().len(), LEN);
            assert_eq!(ClientId::parse(id.as_str()), Some(*id));
        }
        // All 16 hex digits turn up across 32,000 of them (not stuck bits).
        let digits: HashSet<char> = ids.iter().flat_map(|id| id.as_str().chars()).collect();
        assert_eq!(digits.len(), 16);
    }

    #[test]
    fn only_the_issued_shape_parses() {
        assert!(ClientId::parse("0123456789abcdef0123456789abcdef").is_some());
        for bad in [
            "",
            "abc",
            "0123456789ABCDEF0123456789abcdef",
            "0123456789abcdef0123456789abcde",
            "0123456789abcdef0123456789abcdef0",
            "0123456789abcdef0123456789abcdeg",
            "0123456789abcdef0123456789abcd\u{e9}",
        ] {
            assert_eq!(ClientId::parse(bad), None, "{bad:?}");
        }
    }
}
