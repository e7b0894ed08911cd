//! `idle`: C sockets, each subscribed to its own topic, held for D seconds;
//! the gateway's RSS growth per socket.

use std::time::{Duration, Instant};

use crate::cli::{Dialect, Opts, TopicKind};
use crate::fanout::{prefix, spec, subscribe};
use crate::net::{self, Gateway};
use crate::recv::{Pool, Subs};
use crate::report::Run;
use crate::sys::Snapshot;

pub(crate) async fn run(opts: &Opts, gws: &[Gateway], deadline: Instant) -> Result<Run, String> {
    let pids: Vec<u32> = gws.iter().filter_map(|g| g.pid).collect();
    let c = opts.subscribers;
    let (p, d) = (prefix(), opts.dialect);
    let kind = opts.topic_kind;
    let subs: Vec<Subs> = (0..c)
        .map(|i| {
            let i = i.to_string();
            let name = match kind {
                TopicKind::Channel => d.topic(&[&p, "i", &i]),
                TopicKind::Pattern => d.topic(&[&p, "i", &i, "*"]),
            };
            subscribe(d, kind, &name)
        })
        .collect();
    let conns_before = net::metric_sum(gws, &["wsgate_connections"]).await[0];
    let before = Snapshot::take(&pids)?;
    let t0 = Instant::now();
    let pool = Pool::spawn(&spec(opts, gws), subs);
    let ready = pool.wait_ready(deadline).await;
    let connect_secs = t0.elapsed().as_secs_f64();
    if ready == 0 {
        return Err(format!("no socket ready: {:?}", pool.errors()));
    }
    // Let allocations settle before reading RSS.
    sleep_bounded(Duration::from_secs(1), deadline).await;
    let after = Snapshot::take(&pids)?;
    let conns_held = net::metric_sum(gws, &["wsgate_connections"]).await[0];
    let hold = Duration::from_secs_f64(opts.duration_secs);
    sleep_bounded(hold, deadline).await;
    let end = Snapshot::take(&pids)?;
    let conns_end = net::metric_sum(gws, &["wsgate_connections"]).await[0];
    let open_at_end = pool.len() - pool.ended();
    let (failed, refused, subscribed, errors) = (
        pool.failed(),
        pool.refused(),
        pool.subscribed(),
        pool.errors(),
    );
    let out = pool.finish(Duration::from_secs(5)).await;

    let n = ready.max(1) as f64;
    let gw_growth = after.gateway_rss() as f64 - before.gateway_rss() as f64;
    let bench_growth = after.bench_rss as f64 - before.bench_rss as f64;
    let mut run = Run::new();
    run.param("subscribers", c);
    run.param("gateways", gws.len());
    run.param("hold_secs", opts.duration_secs);
    run.result("ready", ready);
    run.result("failed", failed);
    run.result("subscribed", subscribed);
    run.result("refused", refused);
    run.float("connect_secs", connect_secs, 3);
    run.float("connects_per_sec", ready as f64 / connect_secs.max(1e-9), 0);
    run.result("gateway_rss_before_bytes", before.gateway_rss());
    run.result("gateway_rss_after_bytes", after.gateway_rss());
    run.result("gateway_rss_end_bytes", end.gateway_rss());
    run.float("rss_per_socket_bytes", gw_growth / n, 0);
    run.float("bench_rss_per_socket_bytes", bench_growth / n, 0);
    run.result("gateway_connections_before", conns_before as u64);
    run.result("gateway_connections_held", conns_held as u64);
    run.result("gateway_connections_end", conns_end as u64);
    run.result("sockets", ready);
    run.result("open_at_end", open_at_end);
    run.result("client_closes", serde_json::json!(out.closes));
    if failed > 0 || refused > 0 {
        run.notes.push(format!(
            "{failed} sockets failed, {refused} subscriptions refused: {errors:?}"
        ));
    }
    if pids.is_empty() {
        run.notes
            .push("no --pid: gateway RSS not measured".to_owned());
    }
    run.summary = format!(
        "{ready} of {c}{} sockets subscribed ({}) in {connect_secs:.2} s, {open_at_end} still open after \
         {:.0} s; gateway RSS +{:.0} B per socket ({:.1} MiB -> {:.1} MiB); bench +{:.0} B per socket",
        match d {
            Dialect::Native => String::new(),
            other => format!(" {}", other.name()),
        },
        kind.field(),
        opts.duration_secs,
        gw_growth / n,
        before.gateway_rss() as f64 / 1048576.0,
        after.gateway_rss() as f64 / 1048576.0,
        bench_growth / n,
    );
    Ok(run)
}

/// Sleeps `d`, but not past `deadline` minus a little room for the report.
pub(crate) async fn sleep_bounded(d: Duration, deadline: Instant) {
    let until = (Instant::now() + d).min(
        deadline
            .checked_sub(Duration::from_secs(2))
            .unwrap_or(deadline),
    );
    tokio::time::sleep_until(until.into()).await;
}
