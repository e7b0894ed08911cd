//! Redis Cluster hash slots: which of the 16384 slots a key or a sharded
//! pub/sub channel lives in, by the rule every cluster node applies
//! (CRC16/XMODEM of the name, or of its `{hashtag}`, modulo 16384), so the
//! node sends each `SSUBSCRIBE`/`SPUBLISH` straight to the slot's owner
//! instead of learning it from a `MOVED` reply.

use std::sync::OnceLock;

/// Slots of a Redis Cluster.
pub const SLOTS: usize = 16384;

/// CRC16/XMODEM (polynomial 0x1021, initial value 0), the checksum Redis
/// Cluster hashes names with.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The part of `name` that is hashed: the text between the first `{` and
/// the first `}` after it when that is not empty, else the whole name
/// (Redis's hashtag rule, so `{user1}.a` and `{user1}.b` share a slot).
pub fn hashed_part(name: &[u8]) -> &[u8] {
    if let Some(open) = name.iter().position(|&b| b == b'{') {
        if let Some(len) = name[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return &name[open + 1..open + 1 + len];
            }
        }
    }
    name
}

/// The slot of key or channel `name`, as `CLUSTER KEYSLOT` says.
pub fn slot_of(name: &[u8]) -> u16 {
    crc16(hashed_part(name)) % SLOTS as u16
}

/// A short hashtag (decimal digits) whose slot is `slot`: the node puts it
/// in a key that must live in the same slot as a channel whatever the
/// channel's name holds (the idempotency key of a publish, which the
/// script reads on the node that also publishes the channel).
pub fn tag_for(slot: u16) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags: Vec<Option<String>> = vec![None; SLOTS];
        let mut left = SLOTS;
        let mut n: u64 = 0;
        while left > 0 {
            let text = n.to_string();
            let s = usize::from(slot_of(text.as_bytes()));
            if tags[s].is_none() {
                tags[s] = Some(text);
                left -= 1;
            }
            n += 1;
        }
        tags.into_iter().map(Option::unwrap_or_default).collect()
    });
    tags.get(usize::from(slot) % SLOTS)
        .map(String::as_str)
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values `CLUSTER KEYSLOT` gives on Redis 7 (and the CRC16/XMODEM
    /// check value).
    #[test]
    fn slots_match_cluster_keyslot() {
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"bar"), 5061);
        assert_eq!(slot_of(b"hello"), 866);
        assert_eq!(slot_of(b""), 0);
        // The hashtag rule: only the first {..}, and not when empty.
        assert_eq!(slot_of(b"{foo}.bar"), slot_of(b"foo"));
        assert_eq!(slot_of(b"x{foo}{bar}"), slot_of(b"foo"));
        assert_eq!(slot_of(b"{}foo"), crc16(b"{}foo") % 16384);
        assert_eq!(slot_of(b"foo{"), crc16(b"foo{") % 16384);
        assert_eq!(hashed_part(b"a{b}c"), b"b");
    }

    /// Every slot has a tag, and the tag hashes to it.
    #[test]
    fn every_slot_has_a_tag() {
        for slot in [0u16, 1, 866, 5061, 12182, 16383] {
            assert_eq!(slot_of(tag_for(slot).as_bytes()), slot);
        }
        assert!((0..SLOTS as u16).all(|s| slot_of(tag_for(s).as_bytes()) == s));
    }
}
