//! `calls`' caller side: native sockets on node B calling `bench:echo`
//! (`{"action":"call","service":"bench","method":"echo","params":..,"id":..}`),
//! each at its share of the offered rate or, saturating, with its window
//! always full; never more than the window in flight. The params carry the
//! send time and sequence number (the `fanout` payload), so a reply's
//! latency and whether it answers the call it names come from byte scans.
//!
//! A call due while the window is full waits for room and is counted
//! (`delayed`); its latency is measured from when it was sent, so the
//! count, not the histogram, tells of such waits.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::hist::Sharded;
use crate::net::{self, Gateway, Ws};
use crate::rds;
use crate::service::{METHOD, SERVICE};
use crate::sys::unix_nanos;

/// How a caller sends.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Pace {
    /// This many calls per second (the caller's share of `--rate`).
    Rate(f64),
    /// As many as the window allows.
    Saturate,
}

/// Counters every caller adds to.
pub(crate) struct Stats {
    /// Latency of each successful call, µs.
    pub(crate) hist: Sharded,
    pub(crate) ready: AtomicUsize,
    pub(crate) failed: AtomicUsize,
    pub(crate) sent: AtomicU64,
    pub(crate) ok: AtomicU64,
    /// Calls that were due while the window was full.
    pub(crate) delayed: AtomicU64,
    /// Calls due by the end that the window never let out.
    pub(crate) unsent: AtomicU64,
    /// Successful replies whose result was not the echo of their call.
    pub(crate) wrong: AtomicU64,
    /// Unix nanos of the last reply.
    pub(crate) last_ns: AtomicU64,
    /// Failed calls by error.
    errors: Mutex<BTreeMap<String, u64>>,
    /// The first few unexpected frames and connection errors.
    notes: Mutex<Vec<String>>,
}

impl Stats {
    pub(crate) fn new() -> Stats {
        Stats {
            hist: Sharded::new(),
            ready: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            sent: AtomicU64::new(0),
            ok: AtomicU64::new(0),
            delayed: AtomicU64::new(0),
            unsent: AtomicU64::new(0),
            wrong: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
            notes: Mutex::new(Vec::new()),
        }
    }

    fn error(&self, kind: &str, n: u64) {
        if n == 0 {
            return;
        }
        if let Ok(mut m) = self.errors.lock() {
            // Bounded: a gateway inventing error texts cannot grow this.
            if m.len() < 32 || m.contains_key(kind) {
                *m.entry(kind.to_owned()).or_default() += n;
            } else {
                *m.entry("(other errors)".to_owned()).or_default() += n;
            }
        }
    }

    fn note(&self, e: String) {
        if let Ok(mut v) = self.notes.lock() {
            if v.len() < 5 {
                v.push(e);
            }
        }
    }

    /// Failed calls by kind.
    pub(crate) fn errors(&self) -> BTreeMap<String, u64> {
        self.errors.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Total failed calls.
    pub(crate) fn failed_calls(&self) -> u64 {
        self.errors().values().sum()
    }

    pub(crate) fn notes(&self) -> Vec<String> {
        self.notes.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// What the callers are told when they may start: the common start and the
/// end of sending.
pub(crate) type Go = watch::Receiver<Option<(Instant, Instant)>>;

/// One caller's settings.
pub(crate) struct Caller {
    pub(crate) gateway: Gateway,
    pub(crate) source: std::net::Ipv4Addr,
    pub(crate) read_buffer: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) pace: Pace,
    pub(crate) window: usize,
    pub(crate) payload_bytes: usize,
    pub(crate) timeout_ms: Option<u64>,
    /// How long after the end of sending replies are still awaited.
    pub(crate) drain: Duration,
    pub(crate) tick: Duration,
}

/// Error kinds the bench itself reports (the others are the gateway's texts).
pub(crate) const NO_REPLY: &str = "no reply by the end (bench)";
pub(crate) const CONN_LOST: &str = "connection lost (bench)";

/// The call frame for sequence number `seq` sent at `t`.
pub(crate) fn call_frame(seq: u64, t: u64, bytes: usize, timeout_ms: Option<u64>) -> String {
    let params = rds::payload(t, seq, bytes);
    let mut f = format!(
        "{{\"action\":\"call\",\"service\":\"{SERVICE}\",\"method\":\"{METHOD}\",\"params\":{params},\"id\":\"{seq}\""
    );
    if let Some(ms) = timeout_ms {
        f.push_str(&format!(",\"timeout_ms\":{ms}"));
    }
    f.push('}');
    f
}

/// A gateway frame, as a caller sees it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    /// `status:true`: the call's id, the echoed sequence number and send time.
    Ok {
        id: u64,
        seq: Option<u64>,
        sent: Option<u64>,
    },
    /// `status:false`: the call's id and the error text.
    Failed { id: Option<u64>, error: String },
    /// Not a call's answer.
    Other,
}

fn digits(b: &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    let mut n = 0;
    for &c in b {
        if !c.is_ascii_digit() {
            break;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
        n += 1;
    }
    (n > 0).then_some(v)
}

/// Reads a frame: scans for a success (the common case), parses a failure.
pub(crate) fn reply(b: &[u8]) -> Reply {
    const HEAD: &[u8] = b"{\"action\":\"call\",";
    const ID: &[u8] = b"\"id\":\"";
    const OK: &[u8] = b"\",\"status\":true,\"result\":";
    let Some(rest) = b.strip_prefix(HEAD) else {
        return Reply::Other;
    };
    if let Some(id) = rest.strip_prefix(ID).and_then(|r| Some((r, digits(r)?))) {
        let (after, id) = id;
        let tail = &after[id.to_string().len()..];
        if let Some(result) = tail.strip_prefix(OK) {
            return Reply::Ok {
                id,
                seq: net::find(result, b"\"s\":").and_then(|i| digits(&result[i + 4..])),
                sent: net::sent_nanos(result),
            };
        }
    }
    let v: serde_json::Value = serde_json::from_slice(b).unwrap_or_default();
    if v["status"] != serde_json::json!(false) {
        return Reply::Other;
    }
    Reply::Failed {
        id: v["id"].as_str().and_then(|s| s.parse().ok()),
        error: v["error"].as_str().unwrap_or("(no error text)").to_owned(),
    }
}

struct State<'a> {
    cfg: &'a Caller,
    stats: &'a Stats,
    next: u64,
    in_flight: HashSet<u64>,
    /// Calls counted due so far (open loop).
    last_due: u64,
}

impl State<'_> {
    /// Sends calls until `due` are out or the window is full.
    async fn send_until(&mut self, ws: &mut Ws, due: u64) -> Result<(), String> {
        let room = self.cfg.window.saturating_sub(self.in_flight.len()) as u64;
        let want = due.saturating_sub(self.next);
        if want > room && matches!(self.cfg.pace, Pace::Rate(_)) {
            let newly = due.saturating_sub(self.last_due.max(self.next));
            self.stats
                .delayed
                .fetch_add(newly.min(want - room), Ordering::Relaxed);
        }
        self.last_due = self.last_due.max(due);
        let n = want.min(room);
        if n == 0 {
            return Ok(());
        }
        let t = unix_nanos();
        for _ in 0..n {
            let seq = self.next;
            self.next += 1;
            self.in_flight.insert(seq);
            let f = call_frame(seq, t, self.cfg.payload_bytes, self.cfg.timeout_ms);
            ws.feed(Message::Text(f.into()))
                .await
                .map_err(|e| format!("send: {e}"))?;
        }
        self.stats.sent.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    fn handle(
        &mut self,
        m: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) -> Result<(), String> {
        let t = match m {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(f))) => return Err(format!("closed by the gateway: {f:?}")),
            Some(Ok(_)) => return Ok(()),
            Some(Err(e)) => return Err(format!("read: {e}")),
            None => return Err("connection ended".into()),
        };
        let now = unix_nanos();
        match reply(t.as_bytes()) {
            Reply::Ok { id, seq, sent } => {
                if !self.in_flight.remove(&id) {
                    self.stats
                        .note(format!("a reply to no call in flight: {t}"));
                    return Ok(());
                }
                self.stats.last_ns.store(now, Ordering::Relaxed);
                if seq != Some(id) {
                    self.stats.wrong.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                self.stats.ok.fetch_add(1, Ordering::Relaxed);
                if let Some(sent) = sent {
                    self.stats.hist.record(now.saturating_sub(sent) / 1000);
                }
            }
            Reply::Failed { id, error } => {
                // A refusal without an id (none is sent without one) frees
                // nothing: it is counted, and its call ends as unanswered.
                if let Some(id) = id {
                    self.in_flight.remove(&id);
                }
                self.stats.last_ns.store(now, Ordering::Relaxed);
                self.stats.error(&error, 1);
            }
            Reply::Other => self.stats.note(format!("unexpected frame: {t}")),
        }
        Ok(())
    }

    /// Handles `m` and every frame already buffered behind it.
    async fn read(
        &mut self,
        ws: &mut Ws,
        m: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) -> Result<(), String> {
        self.handle(m)?;
        while let Some(m) = ws.next().now_or_never() {
            self.handle(m)?;
        }
        Ok(())
    }
}

/// One caller: connects, waits for `go`, calls until the end, waits for
/// the replies still due, and adds what it saw to `stats`.
pub(crate) async fn run(cfg: Caller, stats: std::sync::Arc<Stats>, mut go: Go) {
    let connected = tokio::time::timeout(
        cfg.connect_timeout,
        net::connect(&cfg.gateway, cfg.source, cfg.read_buffer),
    )
    .await
    .unwrap_or_else(|_| Err("connect timed out".into()));
    let mut ws = match connected {
        Ok(ws) => ws,
        Err(e) => {
            stats.failed.fetch_add(1, Ordering::AcqRel);
            stats.note(e);
            return;
        }
    };
    stats.ready.fetch_add(1, Ordering::AcqRel);
    let (start, end) = match go.wait_for(Option::is_some).await.map(|g| *g) {
        Ok(Some(se)) => se,
        _ => return,
    };
    let mut st = State {
        cfg: &cfg,
        stats: &stats,
        next: 0,
        in_flight: HashSet::with_capacity(cfg.window),
        last_due: 0,
    };
    let r: Result<(), String> = async {
        let mut next_tick = start;
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            let due = match cfg.pace {
                Pace::Rate(r) => ((now - start).as_secs_f64() * r) as u64 + 1,
                Pace::Saturate => u64::MAX,
            };
            st.send_until(&mut ws, due).await?;
            ws.flush().await.map_err(|e| format!("send: {e}"))?;
            while next_tick <= now {
                next_tick += cfg.tick;
            }
            let wake = match cfg.pace {
                Pace::Rate(_) => next_tick.min(end),
                Pace::Saturate => end,
            };
            tokio::select! {
                m = ws.next() => st.read(&mut ws, m).await?,
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
        if let Pace::Rate(r) = cfg.pace {
            let due_at_end = ((end - start).as_secs_f64() * r).ceil() as u64;
            stats
                .unsent
                .fetch_add(due_at_end.saturating_sub(st.next), Ordering::Relaxed);
        }
        let until = end + cfg.drain;
        while !st.in_flight.is_empty() {
            match tokio::time::timeout_at(until.into(), ws.next()).await {
                Ok(m) => st.read(&mut ws, m).await?,
                Err(_) => break,
            }
        }
        Ok(())
    }
    .await;
    match r {
        Ok(()) => stats.error(NO_REPLY, st.in_flight.len() as u64),
        Err(e) => {
            stats.note(e);
            stats.error(CONN_LOST, st.in_flight.len() as u64);
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames() {
        let f = call_frame(7, 1_712_345_678_901_234_567, 60, Some(2000));
        let v: serde_json::Value = serde_json::from_str(&f).unwrap_or_default();
        assert_eq!(v["action"], "call");
        assert_eq!(v["service"], SERVICE);
        assert_eq!(v["method"], METHOD);
        assert_eq!(v["id"], "7");
        assert_eq!(v["params"]["s"], 7);
        assert_eq!(v["timeout_ms"], 2000);
        assert_eq!(rds::payload(1, 7, 60).len(), 60);
        assert!(!call_frame(1, 1, 60, None).contains("timeout_ms"));
    }

    #[test]
    fn replies() {
        // What the gateway writes (src/protocol/native.rs `called`).
        let ok = br#"{"action":"call","id":"42","status":true,"result":{"t":1712345678901234567,"s":42,"p":"xx"}}"#;
        assert_eq!(
            reply(ok),
            Reply::Ok {
                id: 42,
                seq: Some(42),
                sent: Some(1_712_345_678_901_234_567)
            }
        );
        let other = br#"{"action":"call","id":"42","status":true,"result":{"t":5,"s":41,"p":""}}"#;
        assert!(matches!(
            reply(other),
            Reply::Ok {
                id: 42,
                seq: Some(41),
                ..
            }
        ));
        let failed =
            br#"{"action":"call","id":"9","status":false,"error":"no such service","code":404}"#;
        assert_eq!(
            reply(failed),
            Reply::Failed {
                id: Some(9),
                error: "no such service".into()
            }
        );
        let busy =
            br#"{"action":"call","status":false,"error":"too many calls in flight","code":429}"#;
        assert_eq!(
            reply(busy),
            Reply::Failed {
                id: None,
                error: "too many calls in flight".into()
            }
        );
        assert_eq!(
            reply(br#"{"action":"error","error":"unknown action"}"#),
            Reply::Other
        );
        assert_eq!(reply(br#"{"action":"call","id":"x""#), Reply::Other);
    }

    #[test]
    fn error_kinds_are_bounded() {
        let s = Stats::new();
        for i in 0..100 {
            s.error(&format!("e{i}"), 1);
        }
        s.error("e0", 2);
        let m = s.errors();
        assert_eq!(m.len(), 33);
        assert_eq!(m["e0"], 3);
        assert_eq!(m["(other errors)"], 68);
        assert_eq!(s.failed_calls(), 102);
    }
}
