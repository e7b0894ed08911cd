//! `calls`: request/response across two nodes. Echo instances of service
//! `bench` register on node A ([`crate::service`]), native callers on node
//! B call `bench:echo` ([`crate::caller`]), and the outcome is compared with
//! a direct Redis round trip measured in the same run ([`crate::rtt`]).
//!
//! Before the measured phase one probe call is repeated until node B can
//! reach the service (the directory reached B): that time is reported, and
//! the measured calls never race the registration.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::caller::{self, Caller, Pace, Stats};
use crate::cli::{Direct, Opts};
use crate::fanout::{human, prefix};
use crate::hist::{Hist, Sharded};
use crate::net::{self, Gateway};
use crate::report::Run;
use crate::rtt::{self, Measured};
use crate::service::{self, Instance, InstanceOut};
use crate::sys::{unix_nanos, Snapshot};

/// `/metrics` families read before and after the calls: whatever the
/// router exports under these names.
const ROUTER_METRICS: [&str; 4] = ["wsgate_call", "wsgate_rpc", "wsgate_service", "wsgate_node"];

/// The gateway's default call deadline (`WSGATE_CALL_TIMEOUT_MS`), for how
/// long replies are awaited when the calls do not ask for less.
const GATEWAY_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Calls `bench:echo` on `gw` every 20 ms until one succeeds; the time it
/// took. Refusals before that (`no such service` while the directory has
/// not reached this node) are expected; the last one is in the error.
async fn probe(gw: &Gateway, opts: &Opts, within: Duration) -> Result<Duration, String> {
    let t0 = Instant::now();
    let until = t0 + within;
    let src = net::source(0, opts.sources, opts.source_offset);
    let mut ws = tokio::time::timeout(within, net::connect(gw, src, opts.read_buffer))
        .await
        .map_err(|_| "probe: connect timed out".to_owned())??;
    let mut last = String::from("no answer");
    for seq in 0u64.. {
        if Instant::now() >= until {
            break;
        }
        let f = caller::call_frame(seq, unix_nanos(), 64, Some(1000));
        ws.send(Message::Text(f.into()))
            .await
            .map_err(|e| format!("probe: send: {e}"))?;
        let answer = async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => match caller::reply(t.as_bytes()) {
                        caller::Reply::Ok { id, .. } if id == seq => return Ok(None),
                        caller::Reply::Failed { id, error } if id == Some(seq) => {
                            return Ok(Some(error))
                        }
                        _ => {}
                    },
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(format!("probe: read: {e}")),
                    None => return Err("probe: connection ended".to_owned()),
                }
            }
        };
        match tokio::time::timeout_at(until.into(), answer).await {
            Ok(Ok(None)) => {
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                return Ok(t0.elapsed());
            }
            Ok(Ok(Some(error))) => last = error,
            Ok(Err(e)) => return Err(e),
            Err(_) => break,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!(
        "node B could not call {}:{} within {within:?}; last answer: {last}",
        service::SERVICE,
        service::METHOD
    ))
}

/// The direct round trip at the calls' rate and duration.
async fn direct(opts: &Opts, deadline: Instant) -> Result<Measured, String> {
    rtt::run(
        opts.redis.as_deref().unwrap_or_default(),
        &prefix(),
        opts.rate,
        Duration::from_secs_f64(opts.duration_secs),
        opts.payload_bytes,
        Duration::from_millis(opts.tick_ms),
        deadline,
    )
    .await
}

pub(crate) async fn run(opts: &Opts, gws: &[Gateway], deadline: Instant) -> Result<Run, String> {
    let redis_url = opts.redis.clone().unwrap_or_default();
    let mut admin = crate::rds::connect(&redis_url, Duration::from_secs(2)).await?;
    let node_a = Gateway::parse(
        opts.service_url.as_deref().unwrap_or_default(),
        opts.service_pid,
    )?;
    let key = opts
        .service_key
        .clone()
        .or_else(|| std::env::var("WSGATE_SERVICE_KEY").ok());
    let timeout = Duration::from_secs_f64(opts.subscribe_timeout_secs);
    // CPU order: the callers' nodes (B), then A.
    let mut pids: Vec<u32> = gws.iter().filter_map(|g| g.pid).collect();
    let measured_a = opts.service_pid.is_some();
    pids.extend(opts.service_pid);
    let mut nodes = gws.to_vec();
    nodes.push(node_a.clone());

    // Services on A, registered.
    let (stop_tx, stop_rx) = watch::channel(false);
    let leg = Arc::new(Sharded::new());
    let instances = service::start(
        opts.services,
        |i| Instance {
            gateway: node_a.clone(),
            source: net::source(i, opts.sources, opts.source_offset),
            key: key.clone(),
            read_buffer: opts.read_buffer,
            timeout,
            leg: leg.clone(),
        },
        &stop_rx,
        deadline,
    )
    .await?;
    let reachable = probe(&gws[0], opts, timeout).await?;

    // Callers on B, connected.
    let stats = Arc::new(Stats::new());
    let (go_tx, go_rx) = watch::channel(None);
    let pace = if opts.saturate {
        Pace::Saturate
    } else {
        Pace::Rate(opts.rate as f64 / opts.callers as f64)
    };
    let drain = opts
        .call_timeout_ms
        .map_or(GATEWAY_CALL_TIMEOUT, Duration::from_millis)
        + Duration::from_secs(1);
    let mut callers = Vec::with_capacity(opts.callers);
    for i in 0..opts.callers {
        let cfg = Caller {
            gateway: gws[i % gws.len()].clone(),
            source: net::source(opts.services + 1 + i, opts.sources, opts.source_offset),
            read_buffer: opts.read_buffer,
            connect_timeout: timeout,
            pace,
            window: opts.window,
            payload_bytes: opts.payload_bytes,
            timeout_ms: opts.call_timeout_ms,
            drain,
            tick: Duration::from_millis(opts.tick_ms),
        };
        callers.push(tokio::spawn(caller::run(cfg, stats.clone(), go_rx.clone())));
    }
    while stats.ready.load(Ordering::Acquire) + stats.failed.load(Ordering::Acquire) < opts.callers
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ready = stats.ready.load(Ordering::Acquire);
    if ready == 0 {
        return Err(format!("no caller connected: {:?}", stats.notes()));
    }

    let duration = Duration::from_secs_f64(opts.duration_secs);
    let before_rtt = match opts.direct {
        Direct::Before => Some(direct(opts, deadline).await?),
        _ => None,
    };
    // The calls' own time must fit before the run's bound.
    let end_bound = deadline
        .checked_sub(drain + Duration::from_secs(3))
        .unwrap_or(deadline);

    let mut before = Snapshot::take(&pids)?;
    before.redis_cpu = crate::rds::cpu_secs(&mut admin).await.ok();
    let m_before = net::metrics_by_prefix(&nodes, &ROUTER_METRICS).await;
    let start = Instant::now();
    let start_ns = unix_nanos();
    let end = (start + duration).min(end_bound.max(start));
    let concurrent = match opts.direct {
        Direct::Concurrent => {
            let o = opts.clone();
            Some(tokio::spawn(async move { direct(&o, deadline).await }))
        }
        _ => None,
    };
    let _ = go_tx.send(Some((start, end)));
    for t in callers {
        let abort = t.abort_handle();
        if tokio::time::timeout_at(deadline.into(), t).await.is_err() {
            abort.abort();
        }
    }
    let calls_secs = start.elapsed().as_secs_f64();
    let mut after = Snapshot::take(&pids)?;
    after.redis_cpu = crate::rds::cpu_secs(&mut admin).await.ok();
    let m_after = net::metrics_by_prefix(&nodes, &ROUTER_METRICS).await;
    let rtt = match concurrent {
        Some(t) => Some(t.await.map_err(|e| format!("direct round trip: {e}"))??),
        None => before_rtt,
    };

    let _ = stop_tx.send(true);
    let mut outs: Vec<InstanceOut> = Vec::new();
    for t in instances {
        outs.push(
            tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default(),
        );
    }

    let mut run = Run::new();
    let r = Results {
        opts,
        stats: &stats,
        start_ns,
        calls_secs,
        before: &before,
        after: &after,
        measured_a,
        outs: &outs,
        leg: leg.merged(),
        rtt: rtt.as_ref(),
        reachable,
        ready,
        router: net::metrics_delta(&m_before, &m_after),
    };
    r.report(&mut run);
    Ok(run)
}

/// Everything the report is made of.
struct Results<'a> {
    opts: &'a Opts,
    stats: &'a Stats,
    start_ns: u64,
    calls_secs: f64,
    before: &'a Snapshot,
    after: &'a Snapshot,
    measured_a: bool,
    outs: &'a [InstanceOut],
    leg: Hist,
    rtt: Option<&'a Measured>,
    reachable: Duration,
    ready: usize,
    router: serde_json::Map<String, serde_json::Value>,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl Results<'_> {
    fn report(&self, run: &mut Run) {
        let (opts, stats) = (self.opts, self.stats);
        let sent = stats.sent.load(Ordering::Relaxed);
        let ok = stats.ok.load(Ordering::Relaxed);
        let errors = stats.errors();
        let failed_calls = stats.failed_calls();
        let wrong = stats.wrong.load(Ordering::Relaxed);
        let last_ns = stats.last_ns.load(Ordering::Relaxed);
        let window = if last_ns > self.start_ns {
            (last_ns - self.start_ns) as f64 / 1e9
        } else {
            self.calls_secs
        };
        let per_sec = ok as f64 / window.max(1e-9);
        let h = stats.hist.merged();
        let gw_cpu = self.after.gateway_cpu() - self.before.gateway_cpu();
        let bench_cpu = self.after.bench_cpu - self.before.bench_cpu;
        let per_call = |cpu: f64| {
            if ok > 0 {
                cpu * 1e6 / ok as f64
            } else {
                0.0
            }
        };
        let each: Vec<f64> = self
            .after
            .gateways_cpu
            .iter()
            .zip(&self.before.gateways_cpu)
            .map(|(a, b)| a - b)
            .collect();

        run.param(
            "rate",
            if opts.saturate {
                json!("max")
            } else {
                json!(opts.rate)
            },
        );
        run.param("callers", opts.callers);
        run.param("window", opts.window);
        run.param("services", opts.services);
        run.param("duration_secs", opts.duration_secs);
        run.param("payload_bytes", opts.payload_bytes);
        run.param("call_timeout_ms", json!(opts.call_timeout_ms));
        run.param("direct", opts.direct.name());
        run.param("service_url", json!(opts.service_url));
        run.param("service_pid", json!(opts.service_pid));
        run.result("callers_ready", self.ready);
        run.result("callers_failed", stats.failed.load(Ordering::Relaxed));
        run.float("reachable_ms", self.reachable.as_secs_f64() * 1000.0, 1);
        run.result("sent", sent);
        run.result("ok", ok);
        run.result("failed_calls", failed_calls);
        run.result("errors_by_kind", json!(errors));
        run.result("wrong_results", wrong);
        run.result("delayed_by_window", stats.delayed.load(Ordering::Relaxed));
        run.result("unsent", stats.unsent.load(Ordering::Relaxed));
        run.float("calls_per_sec", per_sec, 0);
        run.result("latency_samples", h.count());
        run.float("p50_ms", ms(h.quantile(0.50)), 3);
        run.float("p99_ms", ms(h.quantile(0.99)), 3);
        run.float("p999_ms", ms(h.quantile(0.999)), 3);
        run.float("max_ms", ms(h.max()), 3);
        run.float("mean_ms", h.mean() / 1000.0, 3);
        run.float("to_service_p50_ms", ms(self.leg.quantile(0.50)), 3);
        run.float("to_service_p99_ms", ms(self.leg.quantile(0.99)), 3);
        run.result(
            "service_answered_each",
            json!(self.outs.iter().map(|o| o.answered).collect::<Vec<_>>()),
        );
        run.result(
            "service_error_frames",
            self.outs.iter().map(|o| o.error_frames).sum::<u64>(),
        );
        let ratio = match self.rtt {
            Some(d) => {
                let (p50, p99) = (d.hist.quantile(0.50), d.hist.quantile(0.99));
                run.result("direct_sent", d.sent);
                run.result("direct_received", d.received);
                run.float("direct_per_sec", d.received as f64 / d.secs.max(1e-9), 0);
                run.float("direct_p50_ms", ms(p50), 3);
                run.float("direct_p99_ms", ms(p99), 3);
                run.float("direct_p999_ms", ms(d.hist.quantile(0.999)), 3);
                run.float("direct_max_ms", ms(d.hist.max()), 3);
                let r = (p99 > 0).then(|| h.quantile(0.99) as f64 / p99 as f64);
                if let Some(r) = r {
                    run.float("p99_ratio", r, 2);
                    run.float("p50_ratio", h.quantile(0.5) as f64 / p50.max(1) as f64, 2);
                }
                if d.timed_out {
                    run.notes.push(format!(
                        "direct round trip: {} of {} came back",
                        d.received, d.sent
                    ));
                }
                r
            }
            None => None,
        };
        run.float("gateway_cpu_secs", gw_cpu, 3);
        run.float("gateway_cpu_us_per_call", per_call(gw_cpu), 2);
        run.result(
            "gateway_cpu_us_per_call_each",
            json!(each
                .iter()
                .map(|c| (per_call(*c) * 100.0).round() / 100.0)
                .collect::<Vec<_>>()),
        );
        run.float("gateway_cores", gw_cpu / self.calls_secs.max(1e-9), 3);
        run.float("bench_cpu_us_per_call", per_call(bench_cpu), 2);
        if let (Some(a), Some(b)) = (self.after.redis_cpu, self.before.redis_cpu) {
            run.float("redis_cpu_us_per_call", per_call(a - b), 2);
        }
        run.result(
            "router_metrics",
            serde_json::Value::Object(self.router.clone()),
        );
        run.float("window_secs", window, 3);

        let notes = stats.notes();
        if !notes.is_empty() {
            run.notes.push(format!("callers: {notes:?}"));
        }
        for (i, o) in self.outs.iter().enumerate() {
            if !o.errors.is_empty() {
                run.notes
                    .push(format!("service instance {i}: {:?}", o.errors));
            }
        }
        if self.before.gateways_cpu.is_empty() {
            run.notes
                .push("no --pid: gateway CPU not measured".to_owned());
        } else if !self.measured_a {
            run.notes
                .push("no --service-pid: node A's CPU not counted".to_owned());
        }
        if opts.saturate {
            run.notes.push(
                "saturation: latency is that of a full window, not of an offered rate".into(),
            );
        }
        let errs = if errors.is_empty() {
            "no errors".to_owned()
        } else {
            format!("errors {errors:?}")
        };
        run.summary = format!(
            "{} instance(s) on A, {} callers x {} window on B, {} for {:.0} s: {ok}/{sent} ok \
             ({errs}), {:.0} calls/s; p50 {:.2} / p99 {:.2} / p999 {:.2} ms; {}; gateways {:.1} \
             µs/call ({:.2} cores), bench {:.1} µs/call",
            opts.services,
            self.ready,
            opts.window,
            if opts.saturate {
                "saturating".to_owned()
            } else {
                format!("{} calls/s offered", human(opts.rate as f64))
            },
            opts.duration_secs,
            per_sec,
            ms(h.quantile(0.50)),
            ms(h.quantile(0.99)),
            ms(h.quantile(0.999)),
            match (self.rtt, ratio) {
                (Some(d), Some(r)) => format!(
                    "direct Redis round trip ({}) p50 {:.3} / p99 {:.3} ms, p99 ratio {r:.2}",
                    opts.direct.name(),
                    ms(d.hist.quantile(0.5)),
                    ms(d.hist.quantile(0.99)),
                ),
                _ => "no direct round trip".to_owned(),
            },
            per_call(gw_cpu),
            gw_cpu / self.calls_secs.max(1e-9),
            per_call(bench_cpu),
        );
    }
}
