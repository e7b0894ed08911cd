//! `resync`: P distinct patterns held through the gateways; Redis restarted
//! (or its pub/sub clients killed); how long until Redis holds them all again.

use std::time::{Duration, Instant};

use crate::cli::{Opts, TopicKind};
use crate::fanout::{prefix, spec};
use crate::net::{self, Gateway};
use crate::rds;
use crate::recv::{Pool, Subs};
use crate::report::Run;
use crate::sys::{self, unix_nanos};

const METRICS: [&str; 3] = [
    "wsgate_broker_resync_seconds_sum",
    "wsgate_broker_resync_seconds_count",
    "wsgate_broker_reconnects_total",
];

/// Distinct channels or patterns Redis holds now, over all clients
/// (`INFO stats`: `pubsub_channels` / `pubsub_patterns`, both O(1) in Redis,
/// so polling does not slow the resync it measures).
pub(crate) async fn held(
    conn: &mut redis::aio::MultiplexedConnection,
    kind: TopicKind,
) -> Result<i64, String> {
    let text = rds::info(conn, "stats").await?;
    let key = match kind {
        TopicKind::Pattern => "pubsub_patterns",
        TopicKind::Channel => "pubsub_channels",
    };
    rds::info_field(&text, key)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("INFO stats has no {key}"))
}

pub(crate) async fn run(opts: &Opts, gws: &[Gateway], deadline: Instant) -> Result<Run, String> {
    let url = opts.redis.clone().unwrap_or_default();
    let mut admin = rds::connect(&url, Duration::from_secs(2)).await?;
    let (total, per, kind) = (opts.patterns, opts.per_conn, opts.topic_kind);
    let p = prefix();
    let base = held(&mut admin, kind).await?;
    let target = base + total as i64;
    let subs: Vec<Subs> = (0..total.div_ceil(per))
        .map(|j| {
            Subs::Native(
                (j * per..((j + 1) * per).min(total))
                    .map(|i| {
                        let name = match kind {
                            TopicKind::Pattern => format!("{p}.r.{i}.*"),
                            TopicKind::Channel => format!("{p}.r.{i}"),
                        };
                        net::request("subscribe", kind.field(), &name)
                    })
                    .collect(),
            )
        })
        .collect();
    let conns = subs.len();

    // Subscribe everything and wait until Redis holds it all.
    let t_sub = Instant::now();
    let pool = Pool::spawn(&spec(opts, gws), subs);
    let ready = pool.wait_ready(deadline).await;
    let (subscribed, refused) = (pool.subscribed(), pool.refused());
    if subscribed < total {
        let errors = pool.errors();
        pool.finish(Duration::from_secs(2)).await;
        return Err(format!(
            "only {subscribed} of {total} subscriptions confirmed ({refused} refused, {ready} of \
             {conns} connections ready; raise WSGATE_SUBSCRIBE_RATE, keep --per-conn <= \
             WSGATE_MAX_SUBSCRIPTIONS and WSGATE_MAX_PATTERNS_PER_CONNECTION, and \
             WSGATE_MAX_PATTERNS >= --patterns): {errors:?}"
        ));
    }
    loop {
        if held(&mut admin, kind).await? >= target {
            break;
        }
        if Instant::now() >= deadline {
            return Err(
                "Redis never held every topic before the restart (patterns: set \
                 WSGATE_MAX_REDIS_PATTERNS >= --patterns, or they are coalesced)"
                    .into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let subscribe_secs = t_sub.elapsed().as_secs_f64();
    let m_before = net::metric_sum(gws, &METRICS).await;
    let run_id = rds::info(&mut admin, "server")
        .await
        .ok()
        .and_then(|t| rds::info_field(&t, "run_id").map(str::to_owned));

    sys::before_phase(opts.before_phase.as_deref()).await?;
    // Cut the gateways off.
    let trigger_ns = unix_nanos();
    let t_trigger = Instant::now();
    let mut killed = None;
    if let Some(cmd) = &opts.restart_redis {
        crate::sys::shell(cmd, "restart").await?;
    } else {
        killed = Some(rds::kill_pubsub(&mut admin).await?);
    }
    let command_secs = t_trigger.elapsed().as_secs_f64();

    // t0: Redis accepts connections (a new server, after a restart; at once
    // after CLIENT KILL, which leaves Redis up).
    let (t0, mut conn) = loop {
        if opts.restart_redis.is_none() {
            break (Instant::now(), admin.clone());
        }
        if Instant::now() >= deadline {
            return Err("Redis did not come back before --max-secs".into());
        }
        if let Ok(mut c) = rds::connect(&url, Duration::from_millis(200)).await {
            let pong = redis::cmd("PING").query_async::<String>(&mut c).await;
            let now = Instant::now();
            if pong.is_ok() {
                let id = rds::info(&mut c, "server")
                    .await
                    .ok()
                    .and_then(|t| rds::info_field(&t, "run_id").map(str::to_owned));
                if id != run_id {
                    break (now, c);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    // t1: Redis holds every topic again.
    let mut lowest = i64::MAX;
    let t1 = loop {
        let n = held(&mut conn, kind).await?;
        let now = Instant::now();
        lowest = lowest.min(n);
        if n >= target && (opts.restart_redis.is_some() || lowest < target) {
            break Some(now);
        }
        if n >= target && lowest >= target {
            // CLIENT KILL mode, no dip seen yet: wait for the gateways to notice.
            let m = net::metric_sum(gws, &METRICS).await;
            if m[2] > m_before[2] {
                break Some(now);
            }
        }
        if now >= deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    // Clients: every connection told `resumed`.
    let resumed_until = (Instant::now() + Duration::from_secs(10)).min(deadline);
    let resumed_last = loop {
        let r = pool.resumed_ns();
        if r.iter().all(|&t| t > trigger_ns) {
            break r.iter().max().copied();
        }
        if Instant::now() >= resumed_until {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // The gateways' own measurement.
    let m_until = Instant::now() + Duration::from_secs(5);
    let m_after = loop {
        let m = net::metric_sum(gws, &METRICS).await;
        if m[1] > m_before[1] || Instant::now() >= m_until {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let out = pool.finish(Duration::from_secs(5)).await;

    let t0_ns = trigger_ns + (t0 - t_trigger).as_nanos() as u64;
    let resync_ms = t1.map(|t1| (t1 - t0).as_secs_f64() * 1000.0);
    let d_count = m_after[1] - m_before[1];
    let gw_resync_ms = (d_count > 0.0).then(|| (m_after[0] - m_before[0]) / d_count * 1000.0);
    let clients_ms = resumed_last.map(|t| (t.saturating_sub(t0_ns)) as f64 / 1e6);

    let mut run = Run::new();
    run.param("patterns", total);
    run.param("per_conn", per);
    run.param("connections", conns);
    run.param("gateways", gws.len());
    run.param(
        "mode",
        if opts.drop_pubsub {
            "CLIENT KILL TYPE pubsub"
        } else {
            "restart"
        },
    );
    run.result("subscribed", subscribed);
    run.float("subscribe_secs", subscribe_secs, 3);
    run.float(
        "subscribes_per_sec",
        total as f64 / subscribe_secs.max(1e-9),
        0,
    );
    run.float("trigger_command_secs", command_secs, 3);
    run.float("redis_down_ms", (t0 - t_trigger).as_secs_f64() * 1000.0, 1);
    if let Some(n) = killed {
        run.result("clients_killed", n);
    }
    run.result("lowest_held_seen", lowest);
    match resync_ms {
        Some(ms) => run.float("resync_ms", ms, 1),
        None => run.result("resync_ms", serde_json::Value::Null),
    }
    match gw_resync_ms {
        Some(ms) => run.float("gateway_resync_ms", ms, 1),
        None => run.result("gateway_resync_ms", serde_json::Value::Null),
    }
    match clients_ms {
        Some(ms) => run.float("clients_resumed_ms", ms, 1),
        None => run.result("clients_resumed_ms", serde_json::Value::Null),
    }
    run.result("gateway_reconnects", (m_after[2] - m_before[2]) as u64);
    run.result("client_interrupted", out.interrupted);
    run.result("client_resumed", out.resumed);
    run.result("client_closes", serde_json::json!(out.closes));
    if t1.is_none() {
        run.notes
            .push("Redis never held every topic again before --max-secs".into());
    }
    if clients_ms.is_none() {
        run.notes.push(format!(
            "not every connection got `resumed` within 10 s ({} resumed notices for {conns} connections)",
            out.resumed
        ));
    }
    run.summary = format!(
        "{total} {}s over {conns} connections ({:.2} s to subscribe); {}: back in Redis {} after \
         it accepted connections (gateway's own resync {}; all clients resumed {})",
        kind.field(),
        subscribe_secs,
        if opts.drop_pubsub {
            "pub/sub clients killed"
        } else {
            "Redis restarted"
        },
        fmt_ms(resync_ms),
        fmt_ms(gw_resync_ms),
        fmt_ms(clients_ms),
    );
    Ok(run)
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "never".to_owned(), |ms| format!("{ms:.0} ms"))
}
