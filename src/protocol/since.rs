//! The resume position a subscribe may carry, read from the JSON each
//! dialect phrases it in (the native `since`, Bayeux's `ext.wsgate.since`),
//! so that every dialect accepts exactly the same positions
//! (`docs/history.md`, Recovery).

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::history::{Position, Since, MAX_EPOCH_BYTES, MAX_SINCE_CHANNELS};

/// `{"offset":<whole number>,"epoch":"<1 to 64 bytes>"}`, as a delivery
/// gave them; other fields are ignored. `None` for anything else.
pub fn position(v: &Map<String, Value>) -> Option<Position> {
    match (v.get("offset"), v.get("epoch")) {
        (Some(Value::Number(n)), Some(Value::String(e)))
            if !e.is_empty() && e.len() <= MAX_EPOCH_BYTES =>
        {
            n.as_u64().map(|offset| Position {
                offset,
                epoch: Bytes::copy_from_slice(e.as_bytes()),
            })
        }
        _ => None,
    }
}

/// Whether `v` has the shape of one position rather than a map of them
/// (channel names never are `offset` and `epoch` both).
pub fn is_position(v: &Map<String, Value>) -> bool {
    v.contains_key("offset") && v.contains_key("epoch")
}

/// A map of channels to positions: at most [`MAX_SINCE_CHANNELS`], each
/// channel one that `covers` accepts (a channel the subscription
/// delivers). `None` when any entry is not.
pub fn map(v: &Map<String, Value>, covers: impl Fn(&[u8]) -> bool) -> Option<Since> {
    if v.len() > MAX_SINCE_CHANNELS {
        return None;
    }
    let mut out = Vec::with_capacity(v.len());
    for (channel, p) in v {
        let p = match p {
            Value::Object(p) => position(p)?,
            _ => return None,
        };
        if !covers(channel.as_bytes()) {
            return None;
        }
        out.push((Bytes::copy_from_slice(channel.as_bytes()), p));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn positions_and_maps() {
        let p = position(&obj(json!({"offset":41,"epoch":"e1"}))).unwrap();
        assert_eq!((p.offset, &p.epoch[..]), (41, &b"e1"[..]));
        for bad in [
            json!({"offset":-1,"epoch":"e1"}),
            json!({"offset":1.5,"epoch":"e1"}),
            json!({"offset":"1","epoch":"e1"}),
            json!({"offset":1,"epoch":""}),
            json!({"offset":1,"epoch":"x".repeat(65)}),
            json!({"offset":1}),
        ] {
            assert!(position(&obj(bad.clone())).is_none(), "{bad}");
        }
        assert!(is_position(&obj(json!({"offset":1,"epoch":"e"}))));
        assert!(!is_position(&obj(json!({"/a":{"offset":1,"epoch":"e"}}))));
        let m = obj(json!({"a.1":{"offset":1,"epoch":"e"},"a.2":{"offset":2,"epoch":"f"}}));
        assert_eq!(map(&m, |c| c.starts_with(b"a.")).map(|s| s.len()), Some(2));
        assert!(map(&m, |c| c == b"a.1").is_none());
        let many: Map<String, Value> = (0..65)
            .map(|i| (format!("a.{i}"), json!({"offset":1,"epoch":"e"})))
            .collect();
        assert!(map(&many, |_| true).is_none());
    }
}
