//! `joinstorm`: C sockets connected first (all open, none subscribed), then
//! every socket sends one subscribe to the same channel at once: the time
//! from the first subscribe sent to the last ack, and the hub's registry-lock
//! holds during the storm (from the gateway's `/metrics`).

use std::time::{Duration, Instant};

use crate::cli::{Opts, TopicKind};
use crate::fanout::{prefix, spec};
use crate::net::{self, Gateway, LockHolds};
use crate::recv::{Pool, Subs};
use crate::report::Run;
use crate::sys::{self, Snapshot};

/// Percentile `q` (0..=1) of sorted `v`, nearest rank.
pub(crate) fn pct(v: &[u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

pub(crate) async fn run(opts: &Opts, gws: &[Gateway], deadline: Instant) -> Result<Run, String> {
    let c = opts.subscribers;
    let kind = opts.topic_kind;
    let name = match kind {
        TopicKind::Channel => format!("{}.join", prefix()),
        TopicKind::Pattern => format!("{}.join.*", prefix()),
    };
    let subs: Vec<Subs> = (0..c)
        .map(|_| Subs::Native(vec![net::request("subscribe", kind.field(), &name)]))
        .collect();

    // Phase 1: every socket open, none subscribed.
    let t_open = Instant::now();
    let pool = Pool::spawn_gated(&spec(opts, gws), subs);
    let connected = pool.wait_connected(deadline).await;
    let open_secs = t_open.elapsed().as_secs_f64();
    if connected < c {
        let errors = pool.errors();
        pool.finish(Duration::from_secs(2)).await;
        return Err(format!(
            "only {connected} of {c} sockets connected (raise the gateway's fd limit with \
             `ulimit -n` and WSGATE_MAX_CONNECTIONS, spread --sources): {errors:?}"
        ));
    }
    let conns_open = net::metric_sum(gws, &["wsgate_connections"]).await[0];
    let before = LockHolds::read(gws).await;
    sys::before_phase(opts.before_phase.as_deref()).await?;
    let pids: Vec<u32> = gws.iter().filter_map(|g| g.pid).collect();
    let cpu0 = Snapshot::take(&pids)?;

    // Phase 2: the storm.
    pool.go();
    let ready = pool.wait_ready(deadline).await;
    let cpu1 = Snapshot::take(&pids)?;
    let after = LockHolds::read(gws).await;
    let times = pool.request_ns();
    let (subscribed, refused, failed, errors) = (
        pool.subscribed(),
        pool.refused(),
        pool.failed(),
        pool.errors(),
    );
    pool.finish(Duration::from_secs(5)).await;

    let first_sent = times.iter().map(|t| t.0).filter(|&t| t > 0).min();
    let last_sent = times.iter().map(|t| t.0).max().unwrap_or(0);
    let mut acks: Vec<u64> = match first_sent {
        Some(f) => times
            .iter()
            .filter(|t| t.1 >= t.0 && t.0 > 0)
            .map(|t| t.1.saturating_sub(f))
            .collect(),
        None => Vec::new(),
    };
    acks.sort_unstable();
    let ms = |ns: u64| ns as f64 / 1e6;
    let total_secs = acks.last().map_or(0.0, |&ns| ns as f64 / 1e9);
    // Per socket: its own request to its own reply.
    let mut own: Vec<u64> = times
        .iter()
        .filter(|t| t.0 > 0 && t.1 >= t.0)
        .map(|t| t.1 - t.0)
        .collect();
    own.sort_unstable();

    let mut run = Run::new();
    run.param("subscribers", c);
    run.param("gateways", gws.len());
    run.param("topic", name.clone());
    run.float("open_secs", open_secs, 3);
    run.result("connected", conns_open as u64);
    run.result("acks", subscribed);
    run.result("refused", refused);
    run.result("failed", failed);
    run.float("total_secs", total_secs, 4);
    run.float(
        "send_spread_ms",
        ms(first_sent.map_or(0, |f| last_sent.saturating_sub(f))),
        2,
    );
    run.float("ack_first_ms", ms(acks.first().copied().unwrap_or(0)), 2);
    run.float("ack_p50_ms", ms(pct(&acks, 0.5)), 2);
    run.float("ack_p99_ms", ms(pct(&acks, 0.99)), 2);
    run.float("own_reply_p50_ms", ms(pct(&own, 0.5)), 2);
    run.float("own_reply_max_ms", ms(own.last().copied().unwrap_or(0)), 2);
    net::report_lock_holds(&mut run, &before, &after, 50e-6, "phase_holds_over_50us");
    sys::report_cpu(&mut run, &cpu0, &cpu1, !pids.is_empty());
    if ready < c || subscribed < c {
        run.notes.push(format!(
            "only {subscribed} of {c} subscribes acknowledged ({refused} refused, {failed} \
             failed; raise WSGATE_SUBSCRIBE_TIMEOUT_MS or --subscribe-timeout-secs): {errors:?}"
        ));
    }
    run.notes.push(
        "total_secs: first subscribe sent to last ack, on the client's clock; send_spread_ms \
         is how long the client took to send them all (the storm is client-bound below it)"
            .into(),
    );
    run.summary = format!(
        "{c} open sockets subscribe one {} at once: {subscribed} acks, last {:.3} s after the \
         first send (sends spread over {:.1} ms; p50 ack {:.1} ms); longest registry lock hold \
         since start {}",
        kind.field(),
        total_secs,
        ms(first_sent.map_or(0, |f| last_sent.saturating_sub(f))),
        ms(pct(&acks, 0.5)),
        after
            .max_secs
            .map_or_else(|| "n/a".to_owned(), |s| format!("{:.1} µs", s * 1e6)),
    );
    Ok(run)
}
