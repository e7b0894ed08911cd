//! `presence`: N members of one presence channel (native sockets spread
//! round-robin over the `--url` gateways, the first K asking for join/leave
//! events), then `{"action":"presence",..}` round trips at that member
//! count, one request in flight per prober: latency p50/p99/max, and the
//! member count every answer carries, which must be the number of members
//! (issue 14, `docs/presence.md`).
//!
//! Members join in steps (`--steps 1000`: measured at 1,000 members, then
//! at `--subscribers`), so one run gives the figures at several sizes.
//! Before each measurement the probers wait until an answer lists every
//! member (the nodes write their members to Redis in batches, after the
//! subscribe replies): that wait is reported as the convergence time.
//!
//! With `--ready-file PATH` the members stay connected after the last
//! measurement: the file is written (each node's member count, by the
//! client ids' node prefix) and the run holds until it is deleted or
//! `--hold-secs` pass, so a script can `kill -9` a node and time how long
//! its members take to vanish from presence (`scripts/bench-presence.sh`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::cli::Opts;
use crate::fanout::spec;
use crate::hist::Hist;
use crate::net::{self, Gateway, Ws};
use crate::recv::{Pool, Subs};
use crate::report::Run;
use crate::sys::Snapshot;

/// What one presence answer said.
struct Answer {
    /// Members listed.
    members: usize,
    /// Members per node, by the client id's prefix (`<node>:<n>`).
    by_node: BTreeMap<String, usize>,
}

/// One prober: a socket that asks for the channel's presence.
struct Prober {
    ws: Ws,
    channel: String,
    n: u64,
}

impl Prober {
    async fn open(gw: &Gateway, src: std::net::Ipv4Addr, channel: &str) -> Result<Prober, String> {
        let ws = tokio::time::timeout(Duration::from_secs(10), net::connect(gw, src, 65536))
            .await
            .map_err(|_| format!("prober connect to {} timed out", gw.addr))??;
        Ok(Prober {
            ws,
            channel: channel.to_owned(),
            n: 0,
        })
    }

    /// One round trip: (µs, the answer). `by_node`: also count members per
    /// node (a scan of every client id; only for the convergence and
    /// ready-file answers, not the measured ones).
    async fn ask(&mut self, timeout: Duration, by_node: bool) -> Result<(u64, Answer), String> {
        self.n += 1;
        let id = format!("p{}", self.n);
        let req = format!(
            "{{\"action\":\"presence\",\"channel\":{},\"id\":\"{id}\"}}",
            serde_json::Value::String(self.channel.clone())
        );
        let head = format!(
            "{{\"action\":\"presence\",\"channel\":{},\"id\":\"{id}\",",
            serde_json::Value::String(self.channel.clone())
        );
        let t0 = Instant::now();
        self.ws
            .send(Message::Text(req.into()))
            .await
            .map_err(|e| format!("send: {e}"))?;
        let answer = async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        let b = t.as_bytes();
                        if !b.starts_with(head.as_bytes()) {
                            continue; // not this request's answer
                        }
                        let rtt = t0.elapsed().as_micros() as u64;
                        if net::find(b, b"\"status\":true").is_none() {
                            return Err(format!("refused: {}", t.as_str()));
                        }
                        return Ok((rtt, count(b, by_node)));
                    }
                    Some(Ok(Message::Close(f))) => return Err(format!("closed: {f:?}")),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(format!("read: {e}")),
                    None => return Err("connection ended".into()),
                }
            }
        };
        tokio::time::timeout(timeout, answer)
            .await
            .map_err(|_| format!("no presence answer within {timeout:?}"))?
    }
}

/// Counts the members of an answer: one `{"client":"` right after the
/// array's `[` or a `,` per member (a byte scan, no JSON parse, so the
/// bench costs little beside the gateway; a member's `info` could fool it,
/// but the bench's members have no token, so no `info`).
fn count(b: &[u8], by_node: bool) -> Answer {
    const KEY: &[u8] = b"{\"client\":\"";
    let mut members = 0;
    let mut nodes: BTreeMap<String, usize> = BTreeMap::new();
    let mut at = 0;
    while let Some(i) = net::find(&b[at..], KEY) {
        let start = at + i + KEY.len();
        let member = at + i > 0 && matches!(b[at + i - 1], b'[' | b',');
        at = start;
        if !member {
            continue;
        }
        members += 1;
        if by_node {
            let rest = &b[start..];
            let end = rest
                .iter()
                .position(|&c| c == b':' || c == b'"')
                .unwrap_or(0);
            let node = String::from_utf8_lossy(&rest[..end]).into_owned();
            *nodes.entry(node).or_default() += 1;
        }
    }
    Answer {
        members,
        by_node: nodes,
    }
}

/// The figures at one member count.
struct Step {
    members: usize,
    ready: usize,
    connect_secs: f64,
    converge_ms: Option<f64>,
    hist: Hist,
    /// Answers whose member count was not `ready`.
    wrong: u64,
    min_seen: usize,
    max_seen: usize,
    errors: Vec<String>,
    elapsed: f64,
    gateway_cpu: f64,
}

/// A result name that carries the step's member count (`p99_ms_1000`);
/// leaked: a handful per run.
fn named(base: &str, n: usize) -> &'static str {
    Box::leak(format!("{base}_{n}").into_boxed_str())
}

pub(crate) async fn run(opts: &Opts, gws: &[Gateway], deadline: Instant) -> Result<Run, String> {
    let pids: Vec<u32> = gws.iter().filter_map(|g| g.pid).collect();
    let channel = opts.channel.clone();
    let timeout = Duration::from_secs_f64(opts.subscribe_timeout_secs);
    let mut steps: Vec<usize> = opts
        .steps
        .iter()
        .copied()
        .filter(|&s| s < opts.subscribers)
        .collect();
    steps.push(opts.subscribers);
    steps.sort_unstable();
    steps.dedup();

    // Probers first (they are not members): their sources come after the members'.
    let mut probers = Vec::new();
    for i in 0..opts.probers {
        let src = net::source(opts.subscribers + i, opts.sources, opts.source_offset);
        probers.push(Prober::open(&gws[i % gws.len()], src, &channel).await?);
    }

    let mut pools = Vec::new();
    let mut done = 0usize;
    let mut results = Vec::new();
    for &target in &steps {
        let subs: Vec<Subs> = (done..target)
            .map(|i| {
                let jl = if i < opts.join_leave {
                    ",\"join_leave\":true"
                } else {
                    ""
                };
                Subs::Native(vec![Message::Text(
                    format!(
                        "{{\"action\":\"subscribe\",\"channel\":{}{jl}}}",
                        serde_json::Value::String(channel.clone())
                    )
                    .into(),
                )])
            })
            .collect();
        let mut s = spec(opts, gws);
        // Socket i of this pool is member `done + i`: the same gateway
        // (round-robin) and source as if all had been one pool.
        s.gateways = (0..gws.len())
            .map(|k| gws[(done + k) % gws.len()].clone())
            .collect();
        let t0 = Instant::now();
        let pool = Pool::spawn(&s, subs);
        pool.wait_ready(deadline).await;
        let connect_secs = t0.elapsed().as_secs_f64();
        pools.push(pool);
        let ready: usize = pools.iter().map(Pool::ready).sum();
        let mut errors: Vec<String> = pools.iter().flat_map(Pool::errors).take(5).collect();
        done = target;

        // Convergence: until an answer lists every member that is ready.
        let t1 = Instant::now();
        let converge_by = (t1 + timeout).min(deadline);
        let mut converge_ms = None;
        let mut last = 0;
        while Instant::now() < converge_by {
            match probers[0].ask(timeout, false).await {
                Ok((_, a)) if a.members == ready => {
                    converge_ms = Some(t1.elapsed().as_secs_f64() * 1e3);
                    break;
                }
                Ok((_, a)) => last = a.members,
                Err(e) => {
                    errors.push(e);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if converge_ms.is_none() {
            errors.push(format!(
                "presence listed {last} of {ready} members after {timeout:?}"
            ));
        }

        // The measured round trips: one in flight per prober, `requests` in all.
        let before = Snapshot::take(&pids)?;
        let t2 = Instant::now();
        let bound = (t2 + Duration::from_secs_f64(opts.duration_secs)).min(deadline);
        let per = opts.requests.div_ceil(probers.len());
        let asks = probers.iter_mut().map(|p| async move {
            let mut h = Hist::default();
            let (mut wrong, mut lo, mut hi) = (0u64, usize::MAX, 0usize);
            let mut err = None;
            for _ in 0..per {
                if Instant::now() >= bound {
                    break;
                }
                match p.ask(timeout, false).await {
                    Ok((us, a)) => {
                        h.record(us);
                        wrong += u64::from(a.members != ready);
                        lo = lo.min(a.members);
                        hi = hi.max(a.members);
                    }
                    Err(e) => {
                        err = Some(e);
                        break;
                    }
                }
            }
            (h, wrong, lo, hi, err)
        });
        let outs = futures_util::future::join_all(asks).await;
        let elapsed = t2.elapsed().as_secs_f64();
        let after = Snapshot::take(&pids)?;
        let mut hist = Hist::default();
        let (mut wrong, mut min_seen, mut max_seen) = (0, usize::MAX, 0);
        for (h, w, lo, hi, err) in outs {
            hist.merge(&h);
            wrong += w;
            min_seen = min_seen.min(lo);
            max_seen = max_seen.max(hi);
            errors.extend(err);
        }
        if hist.count() == 0 {
            min_seen = 0;
        }
        results.push(Step {
            members: target,
            ready,
            connect_secs,
            converge_ms,
            hist,
            wrong,
            min_seen,
            max_seen,
            errors,
            elapsed,
            gateway_cpu: after.gateway_cpu() - before.gateway_cpu(),
        });
    }

    // The hold, for a kill: each node's count in the ready file.
    let mut by_node = BTreeMap::new();
    let mut held_secs = 0.0;
    if let Some(path) = &opts.ready_file {
        if let Ok((_, a)) = probers[0].ask(timeout, true).await {
            by_node = a.by_node;
        }
        let line = serde_json::json!({
            "channel": channel,
            "members": done,
            "by_node": by_node,
        });
        std::fs::write(path, format!("{line}\n")).map_err(|e| format!("{path}: {e}"))?;
        let t = Instant::now();
        let hold_until = (t + Duration::from_secs_f64(opts.hold_secs)).min(
            deadline
                .checked_sub(Duration::from_secs(8))
                .unwrap_or(deadline),
        );
        while Instant::now() < hold_until && std::path::Path::new(path).exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        held_secs = t.elapsed().as_secs_f64();
    }
    let mut closes = BTreeMap::new();
    for pool in pools {
        let out = pool.finish(Duration::from_secs(5)).await;
        for (code, n) in out.closes {
            *closes.entry(code).or_insert(0u64) += n;
        }
    }

    let mut run = Run::new();
    run.param("subscribers", opts.subscribers);
    run.param("steps", serde_json::json!(steps));
    run.param("join_leave_members", opts.join_leave.min(opts.subscribers));
    run.param("requests", opts.requests);
    run.param("probers", opts.probers);
    run.param("channel", channel.clone());
    run.param("gateways", gws.len());
    let mut summary = Vec::new();
    let mut notes = Vec::new();
    for s in &results {
        let n = s.members;
        let q = |x: f64| s.hist.quantile(x) as f64 / 1e3;
        run.result(named("ready", n), s.ready);
        run.float(named("connect_secs", n), s.connect_secs, 3);
        run.float(named("converge_ms", n), s.converge_ms.unwrap_or(-1.0), 1);
        run.result(named("answers", n), s.hist.count());
        run.float(named("p50_ms", n), q(0.5), 3);
        run.float(named("p99_ms", n), q(0.99), 3);
        run.float(named("max_ms", n), s.hist.max() as f64 / 1e3, 3);
        run.float(
            named("answers_per_sec", n),
            s.hist.count() as f64 / s.elapsed.max(1e-9),
            0,
        );
        run.result(named("wrong_counts", n), s.wrong);
        run.result(named("members_seen_min", n), s.min_seen);
        run.result(named("members_seen_max", n), s.max_seen);
        let per = if s.hist.count() > 0 {
            s.gateway_cpu * 1e6 / s.hist.count() as f64
        } else {
            0.0
        };
        run.float(named("gateway_cpu_us_per_answer", n), per, 1);
        summary.push(format!(
            "{} members: presence p50 {:.2} / p99 {:.2} / max {:.2} ms over {} answers, \
             {} with a wrong count, converged in {} ms",
            s.ready,
            q(0.5),
            q(0.99),
            s.hist.max() as f64 / 1e3,
            s.hist.count(),
            s.wrong,
            s.converge_ms
                .map(|m| format!("{m:.0}"))
                .unwrap_or_else(|| "n/a".into())
        ));
        if s.ready < s.members {
            notes.push(format!(
                "{} of {} members ready: {:?}",
                s.ready, s.members, s.errors
            ));
        } else if !s.errors.is_empty() {
            notes.push(format!("at {n}: {:?}", s.errors));
        }
        if s.wrong > 0 {
            notes.push(format!(
                "at {n}: {} answers did not list {} members (seen {}..{})",
                s.wrong, s.ready, s.min_seen, s.max_seen
            ));
        }
    }
    if opts.ready_file.is_some() {
        run.result("by_node", serde_json::json!(by_node));
        run.float("held_secs", held_secs, 3);
    }
    run.result("closes", serde_json::json!(closes));
    run.summary = summary.join("; ");
    run.notes = notes;
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_members_by_node() {
        let b = br#"{"action":"presence","channel":"c","id":"p1","status":true,"members":[{"client":"a:1","user":null,"info":null},{"client":"b:2","user":"x","info":{"client":"no"}},{"client":"a:3","user":null,"info":null}]}"#;
        let a = count(b, true);
        // The info's own "client" key is not a member's.
        assert_eq!(a.members, 3);
        assert_eq!(a.by_node.get("a"), Some(&2));
        assert_eq!(a.by_node.get("b"), Some(&1));
        assert_eq!(count(b, false).members, 3);
    }
}
