//! The body of the `bayeux_since` fuzz target (also run by
//! `tests/fuzz_bodies.rs` on seeds): `ext.wsgate.since` of a Bayeux
//! `/meta/subscribe` (`wsgate::protocol::bayeux::resume`,
//! `docs/dialects/bayeux.md`), which any client writes.
//!
//! Input: any bytes, read as the `ext` object's JSON text (invalid UTF-8
//! replaced by U+FFFD). Checks:
//! - `Resume::read` never panics and agrees with an independent reading
//!   through `serde_json::Value`: no `ext` object or no `wsgate` member,
//!   or a `since` absent or `null`: nothing to resume; a `wsgate` that is
//!   not an object: bad; a `since` with both `offset` and `epoch`: one
//!   position when the offset is a whole number that fits a `u64` and the
//!   epoch a string of 1 to 64 bytes, else bad; another object: a map when
//!   it has at most 64 entries, each such a position, else bad; anything
//!   else: bad;
//! - `since_for` of every kind of subscription: one position serves only
//!   a message that subscribes to exactly one channel (that channel, that
//!   position); a map gives a subscription only entries of channels it
//!   delivers (at most 64), with their positions, or nothing when it
//!   delivers none of them; bad is refused for every subscription.

use bytes::Bytes;
use serde_json::Value;
use wsgate::broker::Topic;
use wsgate::history::Position;
use wsgate::protocol::bayeux::channel;
use wsgate::protocol::bayeux::resume::{BadSince, Resume};

/// What the docs say the `ext` asks for.
#[derive(Debug)]
enum Want {
    Nothing,
    One(Position),
    Map(Vec<(String, Position)>),
    Bad,
}

fn position(v: &Value) -> Option<Position> {
    let o = v.as_object()?;
    // A whole number that fits: `as_u64` is `None` for 1.5, 1.0, -1.
    let offset = o.get("offset")?.as_u64()?;
    let epoch = o.get("epoch")?.as_str()?;
    (!epoch.is_empty() && epoch.len() <= 64).then(|| Position {
        offset,
        epoch: Bytes::copy_from_slice(epoch.as_bytes()),
    })
}

fn want(text: &str) -> Want {
    let Ok(Value::Object(ext)) = serde_json::from_str::<Value>(text) else {
        return Want::Nothing;
    };
    let since = match ext.get("wsgate") {
        None => return Want::Nothing,
        Some(Value::Object(ours)) => ours.get("since"),
        Some(_) => return Want::Bad,
    };
    match since {
        None | Some(Value::Null) => Want::Nothing,
        Some(Value::Object(s)) if s.contains_key("offset") && s.contains_key("epoch") => {
            position(&Value::Object(s.clone())).map_or(Want::Bad, Want::One)
        }
        Some(Value::Object(s)) if s.len() <= 64 => {
            let mut all = Vec::new();
            for (c, p) in s {
                match position(p) {
                    Some(p) => all.push((c.clone(), p)),
                    None => return Want::Bad,
                }
            }
            Want::Map(all)
        }
        Some(_) => Want::Bad,
    }
}

/// Subscriptions to ask `since_for` about: channels and wildcards, named by
/// the map's own channels where there is a map (so that some match).
fn topics(map: &[(String, Position)]) -> Vec<Topic> {
    let mut out = vec![
        Topic::Channel(Bytes::from_static(b"/a")),
        Topic::Pattern(Bytes::from_static(b"/*")),
        Topic::Pattern(Bytes::from_static(b"/?*")),
    ];
    for (c, _) in map.iter().take(4) {
        out.push(Topic::Channel(Bytes::copy_from_slice(c.as_bytes())));
        if let Some(slash) = c.rfind('/') {
            let parent = &c[..slash];
            out.push(Topic::Pattern(Bytes::from(format!("{parent}/*"))));
            out.push(Topic::Pattern(Bytes::from(format!("{parent}/?*"))));
        }
    }
    out
}

/// Runs the checks on one input.
pub(crate) fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let resume = Resume::read(Some(&text));
    let want = want(&text);
    match (&resume, &want) {
        (Resume::None, Want::Nothing) | (Resume::Bad, Want::Bad) => {}
        (Resume::One(p), Want::One(q)) => assert_eq!(p, q),
        (Resume::Map(m), Want::Map(w)) => assert_eq!(m.len(), w.len()),
        _ => panic!("read {resume:?}, expected {want:?}: {text:?}"),
    }
    let map = match &want {
        Want::Map(m) => m.clone(),
        _ => Vec::new(),
    };
    for topic in topics(&map) {
        for count in [1, 2] {
            let got = resume.since_for(&topic, count);
            match &want {
                Want::Nothing => assert_eq!(got, Ok(None)),
                Want::Bad => assert_eq!(got, Err(BadSince)),
                Want::One(p) => match &topic {
                    Topic::Channel(c) if count == 1 => {
                        assert_eq!(got, Ok(Some(vec![(c.clone(), p.clone())])))
                    }
                    _ => assert_eq!(got, Err(BadSince), "{topic:?} x{count}"),
                },
                Want::Map(m) => {
                    let mut expect: Vec<(Bytes, Position)> = m
                        .iter()
                        .filter(|(c, _)| channel::delivers(&topic, c.as_bytes()))
                        .map(|(c, p)| (Bytes::copy_from_slice(c.as_bytes()), p.clone()))
                        .collect();
                    let got = got.unwrap_or_else(|_| panic!("map refused for {topic:?}"));
                    match got {
                        None => assert!(expect.is_empty(), "{topic:?}: {expect:?}"),
                        Some(mut got) => {
                            assert!(got.len() <= 64);
                            got.sort_by(|a, b| a.0.cmp(&b.0));
                            expect.sort_by(|a, b| a.0.cmp(&b.0));
                            assert_eq!(got, expect, "{topic:?}");
                        }
                    }
                }
            }
        }
    }
}
