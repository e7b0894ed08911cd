//! `fanout`, `channels` and `cluster`: subscribers, a paced publisher, and
//! what arrived, how late, at what gateway CPU cost.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::cli::{Dialect, Opts, TopicKind, Workload};
use crate::dialects::Wire;
use crate::net::{self, Gateway};
use crate::rds::{self, Published};
use crate::recv::{Pool, Spec, Subs};
use crate::report::Run;
use crate::route::Route;
use crate::sys::Snapshot;

/// Gateway counters read before and after the publish phase.
const COUNTERS: [&str; 4] = [
    "wsgate_broker_messages_dropped_total",
    "wsgate_slow_consumer_closes_total",
    "wsgate_gap_notices_total",
    "wsgate_frames_out_total",
];

/// Messages whose arrival times `spread` keeps per socket (bounds memory:
/// 10,000 sockets x 256 x 16 bytes).
const SPREAD_MESSAGES: usize = 256;

/// The pool's connection settings from the options.
pub(crate) fn spec(opts: &Opts, gws: &[Gateway]) -> Spec {
    Spec {
        gateways: gws.to_vec(),
        sources: opts.sources,
        source_offset: opts.source_offset,
        read_buffer: opts.read_buffer,
        deflate: opts.deflate,
        concurrency: opts.connect_concurrency,
        timeout: Duration::from_secs_f64(opts.subscribe_timeout_secs),
        arrivals: if opts.workload == Workload::Spread {
            SPREAD_MESSAGES
        } else {
            0
        },
    }
}

/// A prefix no other run shares, so leftovers of an earlier run never match.
pub(crate) fn prefix() -> String {
    format!("bench{}", std::process::id())
}

/// What a socket sends to subscribe `name` as `kind`, in `dialect` (a
/// Bayeux name is a channel, or a pattern by its wildcard).
pub(crate) fn subscribe(dialect: Dialect, kind: TopicKind, name: &str) -> Subs {
    match dialect {
        Dialect::Native => Subs::Native(vec![net::request("subscribe", kind.field(), name)]),
        Dialect::Bayeux => Subs::Bayeux(vec![name.to_owned()]),
        Dialect::Realizehit => Subs::Wire(Wire::Realizehit, vec![name.to_owned()]),
        Dialect::RoadRunner => Subs::Wire(Wire::RoadRunner, vec![name.to_owned()]),
        Dialect::SocketStream => Subs::Wire(Wire::SocketStream, vec![name.to_owned()]),
        Dialect::Sse => Subs::Sse(vec![(kind, name.to_owned())]),
    }
}

/// Runs the publisher on its own thread and runtime, so its ticks do not wait
/// behind the subscriber tasks.
fn spawn_publisher(
    opts: &Opts,
    route: Route,
    deadline: Instant,
    channel: impl Fn(u64) -> String + Send + 'static,
) -> tokio::sync::oneshot::Receiver<Result<Published, String>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (rate, messages, bytes) = (opts.rate, opts.messages, opts.payload_bytes);
    let shape = rds::Shape {
        bytes,
        json: opts.payload_json,
    };
    let tick = Duration::from_millis(opts.tick_ms);
    std::thread::spawn(move || {
        let r = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(rds::publish(
                &route, rate, messages, shape, tick, deadline, channel,
            )),
            Err(e) => Err(format!("publisher runtime: {e}")),
        };
        let _ = tx.send(r);
    });
    rx
}

/// Each server's CPU seconds so far (`None` where INFO failed).
async fn servers_cpu(admins: &mut [redis::aio::MultiplexedConnection]) -> Vec<Option<f64>> {
    let mut out = Vec::with_capacity(admins.len());
    for admin in admins.iter_mut() {
        out.push(rds::cpu_secs(admin).await.ok());
    }
    out
}

pub(crate) async fn run(opts: &Opts, gws: &[Gateway], deadline: Instant) -> Result<Run, String> {
    let route = Route::from_opts(opts).await?;
    let mut admins = Vec::new();
    for url in &route.servers {
        admins.push(rds::connect(url, Duration::from_secs(2)).await?);
    }
    let pids: Vec<u32> = gws.iter().filter_map(|g| g.pid).collect();
    let (c, kind) = (opts.subscribers, opts.topic_kind);
    let per_socket = opts.workload == Workload::Channels;
    let (p, d) = (prefix(), opts.dialect);
    // Native: bench123.f.*, publishing to bench123.f.x; Bayeux: /bench123/f/*
    // and /bench123/f/x (the same shape in the Bayeux channel grammar).
    let topic = |i: usize| {
        let i = i.to_string();
        match (per_socket, kind) {
            (true, TopicKind::Channel) => d.topic(&[&p, "ch", &i]),
            (true, TopicKind::Pattern) => d.topic(&[&p, "pt", &i, "*"]),
            (false, TopicKind::Pattern) => d.topic(&[&p, "f", "*"]),
            (false, TopicKind::Channel) => d.topic(&[&p, "f", "x"]),
        }
    };
    let subs: Vec<Subs> = (0..c).map(|i| subscribe(d, kind, &topic(i))).collect();
    let pc = p.clone();
    let channel = move |seq: u64| {
        let n = (seq % c as u64).to_string();
        match (per_socket, kind) {
            (true, TopicKind::Channel) => d.topic(&[&pc, "ch", &n]),
            (true, TopicKind::Pattern) => d.topic(&[&pc, "pt", &n, "x"]),
            (false, _) => d.topic(&[&pc, "f", "x"]),
        }
    };

    let t0 = Instant::now();
    let pool = Pool::spawn(&spec(opts, gws), subs);
    let ready = pool.wait_ready(deadline).await;
    let connect_secs = t0.elapsed().as_secs_f64();
    if ready == 0 || pool.subscribed() == 0 {
        return Err(format!(
            "no subscriber ready ({} failed): {:?}",
            pool.failed(),
            pool.errors()
        ));
    }

    crate::sys::before_phase(opts.before_phase.as_deref()).await?;
    let mut before = Snapshot::take(&pids)?;
    let cpu_before = servers_cpu(&mut admins).await;
    before.redis_cpu = cpu_before.iter().copied().sum();
    let m_before = net::metric_sum(gws, &COUNTERS).await;

    let published = spawn_publisher(opts, route.clone(), deadline, channel)
        .await
        .map_err(|_| "publisher thread died".to_owned())??;
    let subscribed = pool.subscribed() as u64;
    let expected = if per_socket {
        published.receivers.max(0) as u64
    } else {
        subscribed * published.messages
    };
    let drain_timed_out = pool
        .drain(expected, Duration::from_millis(opts.settle_ms), deadline)
        .await;

    let mut after = Snapshot::take(&pids)?;
    let cpu_after = servers_cpu(&mut admins).await;
    after.redis_cpu = cpu_after.iter().copied().sum();
    let m_after = net::metric_sum(gws, &COUNTERS).await;
    let open_before_stop = pool.len() - pool.ended();
    let (failed, refused, errors) = (pool.failed(), pool.refused(), pool.errors());
    let out = pool.finish(Duration::from_secs(5)).await;

    let delivered = out.delivered;
    let lost = expected.saturating_sub(delivered);
    let window = if out.last_ns > published.start_ns {
        (out.last_ns - published.start_ns) as f64 / 1e9
    } else {
        published.secs
    };
    let gw_cpu = after.gateway_cpu() - before.gateway_cpu();
    let bench_cpu = after.bench_cpu - before.bench_cpu;
    let per = |cpu: f64| {
        if delivered > 0 {
            cpu * 1e6 / delivered as f64
        } else {
            0.0
        }
    };
    let ms = |us: u64| us as f64 / 1000.0;
    let nominal = if per_socket {
        opts.rate
    } else {
        opts.rate * subscribed
    };

    let mut run = Run::new();
    run.param("subscribers", c);
    run.param("gateways", gws.len());
    run.param("rate", opts.rate);
    run.param("messages", opts.messages);
    run.param("payload_bytes", opts.payload_bytes);
    run.param("nominal_deliveries_per_sec", nominal);
    run.result("ready", ready);
    run.result("failed", failed);
    run.result("refused", refused);
    run.float("connect_secs", connect_secs, 3);
    run.result("published", published.messages);
    run.float("publish_secs", published.secs, 3);
    run.float(
        "publish_rate",
        published.messages as f64 / published.secs.max(1e-9),
        1,
    );
    run.result("redis_receivers", published.receivers);
    run.result("expected", expected);
    run.result("delivered", delivered);
    run.result("lost", lost);
    run.float(
        "loss",
        if expected > 0 {
            lost as f64 / expected as f64
        } else {
            0.0
        },
        6,
    );
    run.float("deliveries_per_sec", delivered as f64 / window.max(1e-9), 0);
    run.result("latency_samples", out.hist.count());
    run.float("p50_ms", ms(out.hist.quantile(0.50)), 3);
    run.float("p90_ms", ms(out.hist.quantile(0.90)), 3);
    run.float("p99_ms", ms(out.hist.quantile(0.99)), 3);
    run.float("max_ms", ms(out.hist.max()), 3);
    run.float("mean_ms", out.hist.mean() / 1000.0, 3);
    run.float("gateway_cpu_secs", gw_cpu, 3);
    run.float("gateway_cpu_us_per_delivery", per(gw_cpu), 3);
    run.float("gateway_cores", gw_cpu / window.max(1e-9), 3);
    run.result(
        "gateway_cpu_secs_each",
        json!(after
            .gateways_cpu
            .iter()
            .zip(&before.gateways_cpu)
            .map(|(a, b)| ((a - b) * 1000.0).round() / 1000.0)
            .collect::<Vec<_>>()),
    );
    run.result("gateway_rss_bytes", after.gateway_rss());
    run.float("bench_cpu_secs", bench_cpu, 3);
    run.float("bench_cpu_us_per_delivery", per(bench_cpu), 3);
    if let (Some(a), Some(b)) = (after.redis_cpu, before.redis_cpu) {
        run.float("redis_cpu_secs", a - b, 3);
        run.float(
            "redis_cpu_us_per_publish",
            (a - b) * 1e6 / published.messages.max(1) as f64,
            3,
        );
    }
    if route.spread() {
        shard_results(
            &mut run,
            opts,
            &route,
            &published,
            &cpu_before,
            &cpu_after,
            &topic,
        );
    }
    run.result("gateway_dropped", (m_after[0] - m_before[0]) as u64);
    run.result("gateway_slow_closes", (m_after[1] - m_before[1]) as u64);
    run.result("gateway_gap_notices", (m_after[2] - m_before[2]) as u64);
    run.result("gateway_frames_out", (m_after[3] - m_before[3]) as u64);
    run.param("deflate", opts.deflate);
    run.param(
        "payload_shape",
        if opts.payload_json { "json" } else { "pad" },
    );
    run.result("client_wire_bytes", out.wire_bytes);
    run.float(
        "client_wire_bytes_per_delivery",
        out.wire_bytes as f64 / delivered.max(1) as f64,
        1,
    );
    run.result("client_inflated", out.inflated);
    if opts.workload == Workload::Spread {
        run.result("spread_samples", out.spread.count());
        run.result("spread_messages", out.span.count());
        run.float("spread_p50_ms", ms(out.spread.quantile(0.50)), 3);
        run.float("spread_p99_ms", ms(out.spread.quantile(0.99)), 3);
        run.float("spread_max_ms", ms(out.spread.max()), 3);
        run.float("span_p50_ms", ms(out.span.quantile(0.50)), 3);
        run.float("span_max_ms", ms(out.span.max()), 3);
        if opts.messages as usize > SPREAD_MESSAGES {
            run.notes.push(format!(
                "spread from the first {SPREAD_MESSAGES} messages of each socket"
            ));
        }
    }
    run.result("client_interrupted", out.interrupted);
    run.result("client_closes", json!(out.closes));
    run.result("client_broken", out.broken);
    run.result("open_at_end", open_before_stop);
    run.float("window_secs", window, 3);

    if failed > 0 || refused > 0 {
        run.notes.push(format!(
            "{failed} sockets failed, {refused} subscriptions refused: {errors:?}"
        ));
    }
    if published.timed_out || drain_timed_out {
        run.notes
            .push("the run hit --max-secs before finishing".to_owned());
    }
    if delivered > expected {
        run.notes.push(format!(
            "{} more deliveries than expected",
            delivered - expected
        ));
    }
    if pids.is_empty() {
        run.notes
            .push("no --pid: gateway CPU and RSS not measured".to_owned());
    }
    let spread = if opts.workload == Workload::Spread {
        format!(
            "; arrival spread p50 {:.2} / p99 {:.2} / max {:.2} ms (span p50 {:.2} ms)",
            ms(out.spread.quantile(0.5)),
            ms(out.spread.quantile(0.99)),
            ms(out.spread.max()),
            ms(out.span.quantile(0.5)),
        )
    } else {
        String::new()
    };
    run.summary = format!(
        "{} subs{}{}, {} msg/s x {} ({} B) = {}/s nominal: {}/{} delivered ({} lost), {:.0}/s; \
         latency p50 {:.2} / p90 {:.2} / p99 {:.2} / max {:.2} ms; gateway {:.3} µs/delivery \
         ({:.2} cores), bench {:.3} µs/delivery; {:.0} B/delivery on the wire{}{}",
        subscribed,
        match d {
            Dialect::Native => String::new(),
            other => format!(" ({})", other.name()),
        },
        if gws.len() > 1 {
            format!(" on {} gateways", gws.len())
        } else {
            String::new()
        },
        opts.rate,
        published.messages,
        opts.payload_bytes,
        human(nominal as f64),
        delivered,
        expected,
        lost,
        delivered as f64 / window.max(1e-9),
        ms(out.hist.quantile(0.5)),
        ms(out.hist.quantile(0.9)),
        ms(out.hist.quantile(0.99)),
        ms(out.hist.max()),
        per(gw_cpu),
        gw_cpu / window.max(1e-9),
        per(bench_cpu),
        out.wire_bytes as f64 / delivered.max(1) as f64,
        if opts.deflate {
            format!(" ({} inflated)", out.inflated)
        } else {
            String::new()
        },
        spread,
    );
    Ok(run)
}

/// With `--shard` or `--cluster-seed`: each server's PUBLISH count and CPU
/// per PUBLISH, and how the subscribed channels spread over the servers (the
/// largest deviation from an even share, as a fraction of it).
fn shard_results(
    run: &mut Run,
    opts: &Opts,
    route: &Route,
    published: &Published,
    before: &[Option<f64>],
    after: &[Option<f64>],
    topic: &dyn Fn(usize) -> String,
) {
    let n = route.servers.len();
    let per_us: Vec<Option<f64>> = before
        .iter()
        .zip(after)
        .zip(&published.per_server)
        .map(|((b, a), &count)| match (a, b) {
            (Some(a), Some(b)) if count > 0 => Some(((a - b) * 1e9 / count as f64).round() / 1e3),
            _ => None,
        })
        .collect();
    run.param("shards", n);
    run.result("shard_publishes", json!(published.per_server));
    run.result("shard_redis_cpu_us_per_publish", json!(per_us));
    if opts.workload == Workload::Channels && opts.topic_kind == TopicKind::Channel {
        let mut held = vec![0u64; n];
        for i in 0..opts.subscribers {
            held[route.owner(topic(i).as_bytes()).min(n - 1)] += 1;
        }
        let even = opts.subscribers as f64 / n as f64;
        let worst = held
            .iter()
            .map(|&h| (h as f64 - even).abs() / even.max(1e-9))
            .fold(0.0f64, f64::max);
        run.result("shard_channels", json!(held));
        run.float("shard_spread_max_deviation", worst, 4);
    }
}

/// 1234567 -> "1.23M".
pub(crate) fn human(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}
