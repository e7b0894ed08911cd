//! `outage`: C sockets each subscribed to the same T topics; the gateways'
//! pub/sub connections killed in Redis (`CLIENT KILL TYPE pubsub`): how long
//! until every client has its `interrupted` notice (per percentile), whether
//! every client got `resumed` afterwards, and the hub's registry-lock holds
//! during the outage (from the gateway's `/metrics`).

use std::time::{Duration, Instant};

use tokio_tungstenite::tungstenite::Message;

use crate::cli::{Opts, TopicKind};
use crate::fanout::{prefix, spec};
use crate::joinstorm::pct;
use crate::net::{self, Gateway, LockHolds};
use crate::rds;
use crate::recv::{Pool, Subs};
use crate::report::Run;
use crate::resync::held;
use crate::sys::{self, unix_nanos, Snapshot};

pub(crate) async fn run(opts: &Opts, gws: &[Gateway], deadline: Instant) -> Result<Run, String> {
    let url = opts.redis.clone().unwrap_or_default();
    let mut admin = rds::connect(&url, Duration::from_secs(2)).await?;
    let (c, t, kind) = (opts.subscribers, opts.topics, opts.topic_kind);
    let p = prefix();
    let topics: Vec<Message> = (0..t)
        .map(|j| {
            let name = match kind {
                TopicKind::Channel => format!("{p}.o.{j}"),
                TopicKind::Pattern => format!("{p}.o.{j}.*"),
            };
            net::request("subscribe", kind.field(), &name)
        })
        .collect();
    let base = held(&mut admin, kind).await?;

    // Setup: every socket holds all T topics, and Redis holds them.
    let t_sub = Instant::now();
    let pool = Pool::spawn(&spec(opts, gws), vec![Subs::Native(topics); c]);
    let ready = pool.wait_ready(deadline).await;
    let subscribed = pool.subscribed();
    if subscribed < c * t {
        let (refused, errors) = (pool.refused(), pool.errors());
        pool.finish(Duration::from_secs(2)).await;
        return Err(format!(
            "only {subscribed} of {} subscriptions confirmed ({refused} refused, {ready} of {c} \
             sockets ready; the gateway needs WSGATE_MAX_SUBSCRIPTIONS >= {t} and a high \
             WSGATE_SUBSCRIBE_RATE): {errors:?}",
            c * t
        ));
    }
    loop {
        if held(&mut admin, kind).await? >= base + t as i64 {
            break;
        }
        if Instant::now() >= deadline {
            return Err("Redis never held every topic before the kill".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let subscribe_secs = t_sub.elapsed().as_secs_f64();
    let before = LockHolds::read(gws).await;
    sys::before_phase(opts.before_phase.as_deref()).await?;
    let pids: Vec<u32> = gws.iter().filter_map(|g| g.pid).collect();
    let cpu0 = Snapshot::take(&pids)?;

    // The outage.
    let trigger_ns = unix_nanos();
    let t_trigger = Instant::now();
    let killed = rds::kill_pubsub(&mut admin).await?;
    let command_ms = t_trigger.elapsed().as_secs_f64() * 1000.0;

    // Every client told `interrupted`, then `resumed` (each bounded).
    let wait_all = |f: fn(&Pool) -> Vec<u64>, pool: &Pool| {
        let r = f(pool);
        r.iter().all(|&x| x > trigger_ns)
    };
    let until = (Instant::now() + Duration::from_secs(30)).min(deadline);
    while !wait_all(Pool::interrupted_ns, &pool) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let interrupted_ns = pool.interrupted_ns();
    let cpu1 = Snapshot::take(&pids)?;
    let until = (Instant::now() + Duration::from_secs(30)).min(deadline);
    while !wait_all(Pool::resumed_ns, &pool) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let resumed_ns = pool.resumed_ns();
    let after = LockHolds::read(gws).await;
    let out = pool.finish(Duration::from_secs(5)).await;

    let since = |v: &[u64]| -> Vec<u64> {
        let mut d: Vec<u64> = v
            .iter()
            .filter(|&&x| x > trigger_ns)
            .map(|&x| x - trigger_ns)
            .collect();
        d.sort_unstable();
        d
    };
    let intr = since(&interrupted_ns);
    let resm = since(&resumed_ns);
    let ms = |ns: u64| ns as f64 / 1e6;

    let mut run = Run::new();
    run.param("subscribers", c);
    run.param("topics", t);
    run.param("gateways", gws.len());
    run.float("subscribe_secs", subscribe_secs, 2);
    run.result("subscriptions", subscribed);
    run.result("clients_killed", killed);
    run.float("kill_command_ms", command_ms, 2);
    run.result("interrupted_clients", intr.len());
    run.float(
        "interrupted_first_ms",
        ms(intr.first().copied().unwrap_or(0)),
        2,
    );
    run.float("interrupted_p50_ms", ms(pct(&intr, 0.5)), 2);
    run.float("interrupted_p90_ms", ms(pct(&intr, 0.9)), 2);
    run.float("interrupted_p99_ms", ms(pct(&intr, 0.99)), 2);
    run.float(
        "interrupted_max_ms",
        ms(intr.last().copied().unwrap_or(0)),
        2,
    );
    run.result("resumed_clients", resm.len());
    run.float("resumed_max_ms", ms(resm.last().copied().unwrap_or(0)), 1);
    run.result("interrupted_notices", out.interrupted);
    run.result("resumed_notices", out.resumed);
    run.result("client_closes", serde_json::json!(out.closes));
    net::report_lock_holds(&mut run, &before, &after, 1e-3, "phase_holds_over_1ms");
    // CPU from the kill until the last `interrupted` (or the 30 s bound).
    sys::report_cpu(&mut run, &cpu0, &cpu1, !pids.is_empty());
    if intr.len() < c {
        run.notes.push(format!(
            "only {} of {c} clients got `interrupted` within 30 s",
            intr.len()
        ));
    }
    if resm.len() < c {
        run.notes.push(format!(
            "only {} of {c} clients got `resumed` within 30 s of the last `interrupted`",
            resm.len()
        ));
    }
    run.notes.push(
        "interrupted_*_ms: from just before CLIENT KILL was sent to each client's receipt of \
         its first `interrupted` notice (client clock; includes the client's own read queueing)"
            .into(),
    );
    run.summary = format!(
        "{c} sockets x {t} {}s; CLIENT KILL TYPE pubsub: {}/{c} clients told `interrupted` \
         (p50 {:.1} ms, p99 {:.1} ms, last {:.1} ms), {}/{c} `resumed` (last {:.0} ms); \
         longest registry lock hold since start {}",
        kind.field(),
        intr.len(),
        ms(pct(&intr, 0.5)),
        ms(pct(&intr, 0.99)),
        ms(intr.last().copied().unwrap_or(0)),
        resm.len(),
        ms(resm.last().copied().unwrap_or(0)),
        after
            .max_secs
            .map_or_else(|| "n/a".to_owned(), |s| format!("{:.1} µs", s * 1e6)),
    );
    Ok(run)
}
