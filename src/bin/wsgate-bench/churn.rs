//! `churn`: connections subscribing and unsubscribing distinct topics as
//! fast as the replies come back, W requests in flight per connection.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::cli::{Opts, TopicKind};
use crate::fanout::prefix;
use crate::idle::sleep_bounded;
use crate::net::{self, Gateway, Ws};
use crate::rds;
use crate::recv::Slot;
use crate::report::Run;
use crate::sys::Snapshot;

#[derive(Default)]
struct Shared {
    ready: AtomicUsize,
    failed: AtomicUsize,
    refused: AtomicU64,
    stopping: AtomicBool,
    errors: Mutex<Vec<String>>,
}

impl Shared {
    fn note(&self, e: String) {
        if let Ok(mut v) = self.errors.lock() {
            if v.len() < 5 {
                v.push(e);
            }
        }
    }
}

struct Conn {
    id: usize,
    kind: TopicKind,
    prefix: String,
    next: u64,
    in_flight: usize,
    ops: u64,
    shared: Arc<Shared>,
    slot: Arc<Slot>,
}

impl Conn {
    fn topic(&self, k: u64) -> String {
        match self.kind {
            TopicKind::Channel => format!("{}.c.{}.{k}", self.prefix, self.id),
            TopicKind::Pattern => format!("{}.c.{}.{k}.*", self.prefix, self.id),
        }
    }

    async fn subscribe_next(&mut self, ws: &mut Ws) -> Result<(), String> {
        let name = self.topic(self.next);
        self.next += 1;
        self.in_flight += 1;
        ws.feed(net::request("subscribe", self.kind.field(), &name))
            .await
            .map_err(|e| format!("send: {e}"))
    }

    /// Handles one frame; Err ends the connection.
    async fn handle(
        &mut self,
        ws: &mut Ws,
        m: Option<Result<Message, WsError>>,
    ) -> Result<(), String> {
        let t = match m {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(f))) => return Err(format!("closed by the gateway: {f:?}")),
            Some(Ok(_)) => return Ok(()),
            Some(Err(e)) => return Err(format!("read: {e}")),
            None => return Err("connection ended".into()),
        };
        let b = t.as_bytes();
        let sub = b.starts_with(b"{\"action\":\"subscribe\"");
        let unsub = b.starts_with(b"{\"action\":\"unsubscribe\"");
        if !sub && !unsub {
            return Ok(());
        }
        let ok = net::find(b, b"\"status\":true").is_some();
        if !ok {
            // Refused (e.g. rate limited): do not retry, or we would spin.
            self.in_flight -= 1;
            self.shared.refused.fetch_add(1, Ordering::Relaxed);
            self.shared.note(t.as_str().to_owned());
            return Ok(());
        }
        self.ops += 1;
        self.slot.count.store(self.ops, Ordering::Relaxed);
        if sub {
            let name = topic_of(b).ok_or_else(|| format!("no topic in {}", t.as_str()))?;
            ws.feed(net::request("unsubscribe", self.kind.field(), &name))
                .await
                .map_err(|e| format!("send: {e}"))
        } else {
            self.in_flight -= 1;
            if self.shared.stopping.load(Ordering::Relaxed) {
                Ok(())
            } else {
                self.subscribe_next(ws).await
            }
        }
    }
}

/// The channel or pattern named in a reply.
fn topic_of(b: &[u8]) -> Option<String> {
    let at = net::find(b, b"\"channel\":\"")
        .map(|i| i + 11)
        .or_else(|| net::find(b, b"\"pattern\":\"").map(|i| i + 11))?;
    let len = b.get(at..)?.iter().position(|&c| c == b'"')?;
    Some(String::from_utf8_lossy(&b[at..at + len]).into_owned())
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    mut conn: Conn,
    gw: Gateway,
    src: std::net::Ipv4Addr,
    read_buffer: usize,
    window: usize,
    sem: Arc<Semaphore>,
    mut go: watch::Receiver<bool>,
) {
    let permit = sem.acquire_owned().await.ok();
    let connected =
        tokio::time::timeout(Duration::from_secs(10), net::connect(&gw, src, read_buffer))
            .await
            .unwrap_or_else(|_| Err("connect timed out".into()));
    drop(permit);
    let mut ws = match connected {
        Ok(ws) => ws,
        Err(e) => {
            conn.shared.failed.fetch_add(1, Ordering::AcqRel);
            conn.shared.note(e);
            conn.slot.ended.store(true, Ordering::Relaxed);
            return;
        }
    };
    conn.shared.ready.fetch_add(1, Ordering::AcqRel);
    if go.wait_for(|g| *g).await.is_err() {
        return;
    }
    let r: Result<(), String> = async {
        for _ in 0..window {
            conn.subscribe_next(&mut ws).await?;
        }
        ws.flush().await.map_err(|e| format!("send: {e}"))?;
        while conn.in_flight > 0 {
            let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .map_err(|_| format!("no reply for 10 s with {} in flight", conn.in_flight))?;
            conn.handle(&mut ws, m).await?;
            // Handle whatever else is already buffered, then write all replies at once.
            while let Some(m) = ws.next().now_or_never() {
                conn.handle(&mut ws, m).await?;
            }
            ws.flush().await.map_err(|e| format!("send: {e}"))?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = r {
        conn.shared.note(e);
    }
    let _ = ws.close(None).await;
    conn.slot.ended.store(true, Ordering::Relaxed);
}

pub(crate) async fn run(opts: &Opts, gws: &[Gateway], deadline: Instant) -> Result<Run, String> {
    let redis_url = opts.redis.clone().unwrap_or_default();
    let mut admin = rds::connect(&redis_url, Duration::from_secs(2)).await?;
    let pids: Vec<u32> = gws.iter().filter_map(|g| g.pid).collect();
    let shared = Arc::new(Shared::default());
    let (go, go_rx) = watch::channel(false);
    let sem = Arc::new(Semaphore::new(opts.connect_concurrency));
    let p = prefix();
    let numpat_before = rds::numpat(&mut admin).await?;
    let mut slots = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..opts.connections {
        let slot = Arc::new(Slot::default());
        slots.push(slot.clone());
        let conn = Conn {
            id: i,
            kind: opts.topic_kind,
            prefix: p.clone(),
            next: 0,
            in_flight: 0,
            ops: 0,
            shared: shared.clone(),
            slot,
        };
        tasks.push(tokio::spawn(connection(
            conn,
            gws[i % gws.len()].clone(),
            net::source(i, opts.sources, opts.source_offset),
            opts.read_buffer,
            opts.window,
            sem.clone(),
            go_rx.clone(),
        )));
    }
    while shared.ready.load(Ordering::Acquire) + shared.failed.load(Ordering::Acquire)
        < opts.connections
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ready = shared.ready.load(Ordering::Acquire);
    if ready == 0 {
        return Err(format!(
            "no connection: {:?}",
            shared.errors.lock().map(|v| v.clone())
        ));
    }
    let ops = |slots: &[Arc<Slot>]| -> u64 {
        slots.iter().map(|s| s.count.load(Ordering::Relaxed)).sum()
    };

    let before = Snapshot::take(&pids)?;
    let calls_before = rds::subscribe_calls(&mut admin).await?;
    let t0 = Instant::now();
    let _ = go.send(true);
    sleep_bounded(Duration::from_secs_f64(opts.duration_secs), deadline).await;
    let ops_done = ops(&slots);
    let elapsed = t0.elapsed().as_secs_f64();
    let after = Snapshot::take(&pids)?;
    let calls_after = rds::subscribe_calls(&mut admin).await?;
    shared.stopping.store(true, Ordering::Relaxed);

    let until = Instant::now() + Duration::from_secs(10);
    for t in tasks {
        let abort = t.abort_handle();
        if tokio::time::timeout_at(until.into(), t).await.is_err() {
            abort.abort();
        }
    }
    // Everything was unsubscribed or closed: Redis should hold nothing of ours.
    let leftover_until = Instant::now() + Duration::from_secs(3);
    let leftover = loop {
        let n = match opts.topic_kind {
            TopicKind::Channel => {
                rds::channels_matching(&mut admin, &format!("{p}.c.*")).await? as i64
            }
            TopicKind::Pattern => rds::numpat(&mut admin).await? - numpat_before,
        };
        if n <= 0 || Instant::now() >= leftover_until {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let refused = shared.refused.load(Ordering::Relaxed);
    let errors = shared.errors.lock().map(|v| v.clone()).unwrap_or_default();
    let calls = calls_after.saturating_sub(calls_before);
    let gw_cpu = after.gateway_cpu() - before.gateway_cpu();
    let bench_cpu = after.bench_cpu - before.bench_cpu;
    let per_op = |x: f64| {
        if ops_done > 0 {
            x / ops_done as f64
        } else {
            0.0
        }
    };
    let ops_per_sec = ops_done as f64 / elapsed.max(1e-9);

    let mut run = Run::new();
    run.param("connections", opts.connections);
    run.param("window", opts.window);
    run.param("duration_secs", opts.duration_secs);
    run.param("gateways", gws.len());
    run.result("ready", ready);
    run.result("ops", ops_done);
    run.float("ops_per_sec", ops_per_sec, 0);
    run.result("refused", refused);
    run.result("redis_subscribe_commands", calls);
    run.float("redis_cmds_per_op", per_op(calls as f64), 4);
    run.float("gateway_cpu_us_per_op", per_op(gw_cpu * 1e6), 3);
    run.float("gateway_cores", gw_cpu / elapsed.max(1e-9), 3);
    run.float("bench_cpu_us_per_op", per_op(bench_cpu * 1e6), 3);
    run.result("leftover_topics_in_redis", leftover);
    run.float("elapsed_secs", elapsed, 3);
    if refused > 0 || !errors.is_empty() {
        run.notes.push(format!(
            "{refused} refused (raise WSGATE_SUBSCRIBE_RATE for churn runs, and for patterns \
             WSGATE_MAX_PATTERNS_PER_CONNECTION and WSGATE_MAX_PATTERNS); errors: {errors:?}"
        ));
    }
    if leftover > 0 {
        run.notes.push(format!(
            "{leftover} topics still subscribed in Redis 3 s after every connection closed"
        ));
    }
    run.summary = format!(
        "{ready} connections x {} in flight, {} topics, {:.0} s: {:.0} subscribe+unsubscribe/s, \
         {:.3} Redis (P)(UN)SUBSCRIBE commands per op, gateway {:.2} µs/op ({:.2} cores), \
         {refused} refused, {leftover} left in Redis",
        opts.window,
        opts.topic_kind.field(),
        elapsed,
        ops_per_sec,
        per_op(calls as f64),
        per_op(gw_cpu * 1e6),
        gw_cpu / elapsed.max(1e-9),
    );
    Ok(run)
}
