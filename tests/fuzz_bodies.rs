//! The fuzz targets' checks (`fuzz/bodies/*.rs`) as ordinary tests: each
//! body runs on hand-written seeds and on a few thousand deterministic
//! mutations of them. This is not fuzzing (no coverage guidance, see
//! `docs/fuzzing.md` for that), but it keeps every body compiling with the
//! main crate and catches a property broken by a change on the inputs that
//! matter most.

#[path = "../fuzz/bodies/bayeux_conversation.rs"]
mod bayeux_conversation;
#[path = "../fuzz/bodies/bayeux_since.rs"]
mod bayeux_since;
#[path = "../fuzz/bodies/presence_event.rs"]
mod presence_event;
#[path = "../fuzz/bodies/sse_last_event_id.rs"]
mod sse_last_event_id;

/// Mutations of each seed per body.
const MUTATIONS: usize = 2000;

/// xorshift64: deterministic, so a failure names a reproducible input.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Bytes that matter to these parsers, for insertions.
const INTERESTING: &[u8] = b":{}[]\",0123456789/*?\\\r\n\x00\xff";

/// One mutation of `seed`: a few byte flips, insertions, deletions and
/// splices of a seed's own slices.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(5) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] = rng.next() as u8;
            }
            1 => {
                let i = rng.below(out.len() + 1);
                out.insert(i, INTERESTING[rng.below(INTERESTING.len())]);
            }
            2 if !out.is_empty() => {
                let i = rng.below(out.len());
                let n = 1 + rng.below(8.min(out.len() - i));
                out.drain(i..i + n);
            }
            3 if !out.is_empty() => {
                let a = rng.below(out.len());
                let b = a + rng.below(out.len() - a + 1);
                let piece = out[a..b].to_vec();
                let at = rng.below(out.len() + 1);
                out.splice(at..at, piece);
            }
            _ => {
                let i = rng.below(out.len() + 1);
                let digit = b'0' + rng.below(10) as u8;
                out.insert(i, digit);
            }
        }
    }
    out
}

fn exercise(seeds: &[&[u8]], run: fn(&[u8]), salt: u64) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ salt);
    for seed in seeds {
        run(seed);
        for _ in 0..MUTATIONS {
            let input = mutate(&mut rng, seed);
            let shown = String::from_utf8_lossy(&input).into_owned();
            let outcome = std::panic::catch_unwind(|| run(&input));
            assert!(outcome.is_ok(), "failed on {input:?} ({shown:?})");
        }
    }
}

#[test]
fn presence_event_body() {
    let member = br#"{"client":"n1:7","user":"alice","info":{"n":1}}"#;
    let leave = format!(
        r#"{{"action":"leave","channel":"chat.room","member":{}}}"#,
        std::str::from_utf8(member).unwrap()
    );
    let second = leave.replace("n1:7", "n0:1").replace("alice", "bob");
    let two = [leave.as_bytes(), &[0xff], second.as_bytes()].concat();
    let deep = format!("{}{}", "[".repeat(127), "]".repeat(127));
    let fits = format!("{}{}", "[".repeat(126), "]".repeat(126));
    let seeds: Vec<&[u8]> = vec![
        leave.as_bytes(),
        &two,
        br#"{"action":"join","channel":"chat.room","member":{"client":"x","user":null,"info":null}}"#,
        b"not json",
        b"\xff\xfe",
        br#"{"action":"leave","channel":"chat.room","member":{"client":1}}"#,
        br#"{"action":"leave","channel":"chat.room","member":{"user":"a"}}"#,
        deep.as_bytes(),
        fits.as_bytes(),
        b"",
    ];
    exercise(&seeds, presence_event::run, 1);
}

#[test]
fn sse_last_event_id_body() {
    let seeds: &[&[u8]] = &[
        b"e1:7:news",
        b"6b0fc038b996e:41:a:b:c",
        b"e:18446744073709551615:x",
        b"e:18446744073709551616:x",
        b"e:007:x",
        b"e:1:a\nb",
        b"e:1:a\rb",
        b"e:1:a\x00b",
        b"e:1:",
        b":1:x",
        b"e-1:1:x",
        b"e:-1:x",
        b"\xff:1:x",
    ];
    exercise(seeds, sse_last_event_id::run, 2);
}

#[test]
fn bayeux_since_body() {
    let seeds: &[&[u8]] = &[
        br#"{"wsgate":{"since":{"offset":41,"epoch":"e1"}}}"#,
        br#"{"wsgate":{"since":{"/a/x":{"offset":1,"epoch":"e"},"/b":{"offset":2,"epoch":"f"}}}}"#,
        br#"{"wsgate":{"since":{"/a":{"offset":1.5,"epoch":"e"}}}}"#,
        br#"{"wsgate":{"since":{"offset":-1,"epoch":"e"}}}"#,
        br#"{"wsgate":{"since":{"offset":1}}}"#,
        br#"{"wsgate":{"since":null},"token":"x"}"#,
        br#"{"wsgate":5}"#,
        br#"{"wsgate":{"since":[1]}}"#,
        br#"{"other":1}"#,
        b"[]",
        b"not json",
    ];
    exercise(seeds, bayeux_since::run, 3);
}

#[test]
fn bayeux_conversation_body() {
    let handshake = br#"{"channel":"/meta/handshake","version":"1.0","supportedConnectionTypes":["websocket"],"id":"h"}"#;
    let mut with_ext = vec![1u8];
    with_ext.extend_from_slice(
        br#"{"channel":"/meta/subscribe","clientId":"x","subscription":"/a","ext":{"wsgate":{"since":{"offset":1,"epoch":"e"}}},"id":"s"}"#,
    );
    let mut several = vec![3u8];
    several.extend_from_slice(
        br#"[{"channel":"/meta/subscribe","clientId":"x","subscription":["/a/*","/b"],"id":"1"}]"#,
    );
    several.push(0xff);
    several.extend_from_slice(br#"{"channel":"/a","data":{"x":1},"id":"2"}"#);
    several.push(0xff);
    several.extend_from_slice(
        br#"{"channel":"/service/billing","data":{"jsonrpc":"2.0","method":"m","id":1},"id":"3"}"#,
    );
    let mut fresh = vec![0u8];
    fresh.extend_from_slice(handshake);
    let seeds: Vec<&[u8]> = vec![&fresh, &with_ext, &several, b"\x01", b"\x00[]"];
    exercise(&seeds, bayeux_conversation::run, 4);
}
