//! `history`: what history costs a publish, and how fast clients recover
//! what they missed (issue 14, `docs/history.md`, Limits).
//!
//! Part 1, publish rate: `--publishers` concurrent HTTP/1.1 keep-alive
//! connections each `POST /publish` one message per request (`--batch` per
//! request) for `--duration-secs`, first to a history channel
//! (`--history-channel`, which `WSGATE_HISTORY` must cover), then to a
//! channel without history (`--plain-channel`) on the same gateway:
//! publishes/s of both and their ratio (the target is >= 0.5).
//!
//! Part 2, recovery: `--subscribers` sockets subscribe to the history
//! channel `<history-channel>.recover`, one marker message gives each its
//! position (offset and epoch), then they all go (closed, or the gateway
//! is restarted by `--restart-gateway CMD`, after which the bench waits for
//! `/readyz`), `--messages` messages are published, and every client
//! reconnects and subscribes with `since`. Reported: the time from the
//! first reconnect until every client has every missed message, each
//! client's completion percentiles, and whether each got exactly those
//! messages (offsets after its position, in order, no duplicate) after a
//! `recovered:true` reply.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use crate::cli::Opts;
use crate::joinstorm::pct;
use crate::net::{self, Gateway, Ws};
use crate::report::Run;
use crate::sys;

/// Largest HTTP response head or body the publishers read.
const MAX_RESPONSE: usize = 64 * 1024;

/// One native frame, as far as this workload reads it.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(borrow)]
    action: &'a str,
    status: Option<bool>,
    recovered: Option<bool>,
    offset: Option<u64>,
    #[serde(borrow)]
    epoch: Option<&'a str>,
    payload: Option<Payload>,
    #[serde(borrow)]
    error: Option<&'a str>,
}

#[derive(Deserialize)]
struct Payload {
    n: u64,
}

/// A keep-alive HTTP/1.1 connection that POSTs and reads answers.
struct Http {
    stream: TcpStream,
    addr: SocketAddr,
    buf: Vec<u8>,
}

impl Http {
    async fn open(addr: SocketAddr) -> Result<Http, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("nodelay: {e}"))?;
        Ok(Http {
            stream,
            addr,
            buf: Vec::with_capacity(4096),
        })
    }

    /// POSTs `body` to `path`; the status and body of the answer.
    async fn post(&mut self, path: &str, body: &str) -> Result<(u16, String), String> {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        self.stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        self.read_response().await
    }

    async fn read_response(&mut self) -> Result<(u16, String), String> {
        let head_end = loop {
            if let Some(at) = net::find(&self.buf, b"\r\n\r\n") {
                break at;
            }
            self.fill().await?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line: {head:?}"))?;
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .ok_or_else(|| format!("no content-length: {head:?}"))?;
        if length > MAX_RESPONSE {
            return Err(format!("response of {length} bytes"));
        }
        let total = head_end + 4 + length;
        while self.buf.len() < total {
            self.fill().await?;
        }
        let body = String::from_utf8_lossy(&self.buf[head_end + 4..total]).into_owned();
        self.buf.drain(..total);
        Ok((status, body))
    }

    async fn fill(&mut self) -> Result<(), String> {
        if self.buf.len() > MAX_RESPONSE {
            return Err("response head too large".into());
        }
        let mut chunk = [0u8; 4096];
        let n = self
            .stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed".into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// The body of a publish of `{"n":from}`.. (`count` messages) to `channel`.
fn publish_body(channel: &str, from: u64, count: u64) -> String {
    if count == 1 {
        return format!(r#"{{"channel":"{channel}","payload":{{"n":{from}}}}}"#);
    }
    let messages: Vec<String> = (from..from + count)
        .map(|n| format!(r#"{{"channel":"{channel}","payload":{{"n":{n}}}}}"#))
        .collect();
    format!(r#"{{"messages":[{}]}}"#, messages.join(","))
}

/// What one publish phase measured.
struct Rate {
    published: u64,
    errors: u64,
    secs: f64,
    cpu_secs: Option<f64>,
    first_error: Option<String>,
}

impl Rate {
    fn per_sec(&self) -> f64 {
        if self.secs > 0.0 {
            self.published as f64 / self.secs
        } else {
            0.0
        }
    }
}

/// `publishers` connections POST to `channel` for `secs` seconds.
async fn publish_phase(
    addr: SocketAddr,
    pid: Option<u32>,
    channel: &str,
    publishers: usize,
    batch: u64,
    secs: f64,
    deadline: Instant,
) -> Result<Rate, String> {
    let end = (Instant::now() + Duration::from_secs_f64(secs)).min(deadline);
    let published = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let cpu0 = sys::cpu_secs(pid).ok().filter(|_| pid.is_some());
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(publishers);
    for p in 0..publishers {
        let (published, errors) = (published.clone(), errors.clone());
        let channel = channel.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut http = Http::open(addr).await?;
            let mut n = (p as u64) << 32;
            let mut first_error = None;
            while Instant::now() < end {
                let body = publish_body(&channel, n, batch);
                n += batch;
                let left = end.saturating_duration_since(Instant::now()) + Duration::from_secs(5);
                match tokio::time::timeout(left, http.post("/publish", &body)).await {
                    Ok(Ok((200, _))) => {
                        published.fetch_add(batch, Ordering::Relaxed);
                    }
                    Ok(Ok((status, body))) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.get_or_insert(format!("{status}: {body}"));
                    }
                    Ok(Err(e)) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.get_or_insert(e);
                        http = Http::open(addr).await?;
                    }
                    Err(_) => return Err("a publish took more than 5 s".to_owned()),
                }
            }
            Ok::<_, String>(first_error)
        }));
    }
    let mut first_error = None;
    for t in tasks {
        match t.await {
            Ok(Ok(e)) => first_error = first_error.or(e),
            Ok(Err(e)) => return Err(format!("publisher: {e}")),
            Err(e) => return Err(format!("publisher task: {e}")),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu_secs = match (cpu0, sys::cpu_secs(pid).ok().filter(|_| pid.is_some())) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    Ok(Rate {
        published: published.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        secs,
        cpu_secs,
        first_error,
    })
}

/// Reads frames until one satisfies `take`, within `within`.
async fn next_frame<T>(
    ws: &mut Ws,
    within: Duration,
    mut take: impl FnMut(&Frame<'_>) -> Result<Option<T>, String>,
) -> Result<T, String> {
    let until = Instant::now() + within;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let msg = match tokio::time::timeout(left, ws.next()).await {
            Err(_) => return Err(format!("nothing after {within:?}")),
            Ok(None) => return Err("socket closed".into()),
            Ok(Some(Err(e))) => return Err(format!("socket: {e}")),
            Ok(Some(Ok(m))) => m,
        };
        let Message::Text(text) = msg else {
            continue;
        };
        let frame: Frame<'_> =
            serde_json::from_str(text.as_str()).map_err(|e| format!("{e}: {text}"))?;
        if let Some(v) = take(&frame)? {
            return Ok(v);
        }
    }
}

/// A subscribed socket's position after the marker.
struct Position {
    offset: u64,
    epoch: String,
}

/// Connects socket `i` and subscribes it to `channel` (with `since`).
async fn subscribe(
    opts: &Opts,
    gw: &Gateway,
    i: usize,
    channel: &str,
    since: Option<&Position>,
    within: Duration,
) -> Result<(Ws, Option<bool>), String> {
    let src = net::source(i, opts.sources, opts.source_offset);
    let mut ws = tokio::time::timeout(within, net::connect(gw, src, opts.read_buffer))
        .await
        .map_err(|_| "connect timed out".to_owned())??;
    let req = match since {
        None => format!(r#"{{"action":"subscribe","channel":"{channel}"}}"#),
        Some(p) => format!(
            r#"{{"action":"subscribe","channel":"{channel}","since":{{"offset":{},"epoch":"{}"}}}}"#,
            p.offset, p.epoch
        ),
    };
    ws.send(Message::Text(req.into()))
        .await
        .map_err(|e| format!("send: {e}"))?;
    let recovered = next_frame(&mut ws, within, |f| {
        if f.action != "subscribe" {
            return Ok(None);
        }
        match f.status {
            Some(true) => Ok(Some(f.recovered)),
            _ => Err(format!("subscribe refused: {:?}", f.error)),
        }
    })
    .await?;
    Ok((ws, recovered))
}

/// Waits for `GET /readyz` to answer 200.
async fn ready(addr: SocketAddr, deadline: Instant) -> Result<f64, String> {
    let start = Instant::now();
    loop {
        if net::http_get(addr, "/readyz").await.is_ok() {
            return Ok(start.elapsed().as_secs_f64());
        }
        if Instant::now() >= deadline {
            return Err("the gateway did not become ready".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How one client's recovery went.
#[derive(Debug, Default, Clone, Copy)]
struct Recovery {
    /// From the first reconnect of all to this client's last missed message.
    done_ns: u64,
    recovered: bool,
    /// Messages in order and exactly once.
    exact: bool,
}

pub(crate) async fn run(opts: &Opts, gws: &[Gateway], deadline: Instant) -> Result<Run, String> {
    let gw = gws.first().ok_or("no gateway")?.clone();
    let addr = gw.addr;
    let mut run = Run::new();
    run.param("publishers", opts.publishers);
    run.param("batch", opts.batch);
    run.param("history_channel", opts.history_channel.clone());
    run.param("plain_channel", opts.plain_channel.clone());
    run.param("subscribers", opts.subscribers);
    run.param("missed", opts.messages);
    run.param("restart", opts.restart_gateway.is_some());

    // Part 1: publish rate, history first, then plain.
    let secs = opts.duration_secs;
    let batch = opts.batch as u64;
    let with = publish_phase(
        addr,
        gw.pid,
        &opts.history_channel,
        opts.publishers,
        batch,
        secs,
        deadline,
    )
    .await?;
    let without = publish_phase(
        addr,
        gw.pid,
        &opts.plain_channel,
        opts.publishers,
        batch,
        secs,
        deadline,
    )
    .await?;
    let ratio = if without.per_sec() > 0.0 {
        with.per_sec() / without.per_sec()
    } else {
        0.0
    };
    run.float("history_publishes_per_sec", with.per_sec(), 0);
    run.float("plain_publishes_per_sec", without.per_sec(), 0);
    run.float("history_ratio", ratio, 3);
    run.result("history_publish_errors", with.errors);
    run.result("plain_publish_errors", without.errors);
    if let (Some(a), Some(b)) = (with.cpu_secs, without.cpu_secs) {
        let per = |cpu: f64, n: u64| if n > 0 { cpu * 1e6 / n as f64 } else { 0.0 };
        run.float("history_cpu_us_per_publish", per(a, with.published), 2);
        run.float("plain_cpu_us_per_publish", per(b, without.published), 2);
    }
    for (what, r) in [("history", &with), ("plain", &without)] {
        if let Some(e) = &r.first_error {
            run.notes.push(format!("{what} publish failed: {e}"));
        }
    }
    // The history channel really kept history.
    let page = net::http_get(
        addr,
        &format!("/history?channel={}&limit=1", opts.history_channel),
    )
    .await;
    let top = page
        .ok()
        .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
        .and_then(|v| v["top"].as_u64());
    match top {
        Some(top) => run.result("history_top", top),
        None => run.notes.push(format!(
            "{}: GET /history found no history (is it covered by WSGATE_HISTORY?)",
            opts.history_channel
        )),
    }

    // Part 2: recovery.
    let c = opts.subscribers;
    let m = opts.messages;
    let channel = format!("{}.recover", opts.history_channel);
    let within = Duration::from_secs_f64(opts.subscribe_timeout_secs);
    let gate = Arc::new(Semaphore::new(opts.connect_concurrency));
    let t_open = Instant::now();
    let mut subscribing = Vec::with_capacity(c);
    for i in 0..c {
        let (opts, gw, gate, channel) = (opts.clone(), gw.clone(), gate.clone(), channel.clone());
        subscribing.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await;
            subscribe(&opts, &gw, i, &channel, None, within).await
        }));
    }
    let mut sockets = Vec::with_capacity(c);
    for t in subscribing {
        let (ws, _) = t.await.map_err(|e| format!("subscriber task: {e}"))??;
        sockets.push(ws);
    }
    run.float("subscribe_secs", t_open.elapsed().as_secs_f64(), 3);
    let mut http = Http::open(addr).await?;
    let (status, body) = http.post("/publish", &publish_body(&channel, 0, 1)).await?;
    if status != 200 {
        return Err(format!("marker publish: {status} {body}"));
    }
    let mut marking = Vec::with_capacity(c);
    for mut ws in sockets {
        marking.push(tokio::spawn(async move {
            let position = next_frame(&mut ws, within, |f| {
                if f.action != "message" {
                    return Ok(None);
                }
                match (f.offset, f.epoch) {
                    (Some(offset), Some(epoch)) => Ok(Some(Position {
                        offset,
                        epoch: epoch.to_owned(),
                    })),
                    _ => Err("the marker has no offset: is the channel a history channel?".into()),
                }
            })
            .await;
            let _ = ws.close(None).await;
            position
        }));
    }
    let mut positions = Vec::with_capacity(c);
    for t in marking {
        positions.push(t.await.map_err(|e| format!("marker task: {e}"))??);
    }
    drop(http);
    if let Some(cmd) = &opts.restart_gateway {
        let t = Instant::now();
        sys::shell(cmd, "--restart-gateway").await?;
        ready(addr, deadline).await?;
        run.float("restart_secs", t.elapsed().as_secs_f64(), 3);
    }
    // The missed messages, in batches of 100, `{"n":1}`..`{"n":m}`.
    let mut http = Http::open(addr).await?;
    let mut n = 1;
    while n <= m {
        let count = (m - n + 1).min(100);
        let (status, body) = http
            .post("/publish", &publish_body(&channel, n, count))
            .await?;
        if status != 200 {
            return Err(format!("publish of the missed messages: {status} {body}"));
        }
        n += count;
    }
    drop(http);

    let positions = Arc::new(positions);
    let start = Instant::now();
    let mut recovering = Vec::with_capacity(c);
    for i in 0..c {
        let (opts, gw, gate, channel, positions) = (
            opts.clone(),
            gw.clone(),
            gate.clone(),
            channel.clone(),
            positions.clone(),
        );
        recovering.push(tokio::spawn(async move {
            let since = &positions[i];
            let (mut ws, recovered) = {
                let _permit = gate.acquire_owned().await;
                subscribe(&opts, &gw, i, &channel, Some(since), within).await?
            };
            let mut r = Recovery {
                recovered: recovered == Some(true),
                exact: true,
                ..Recovery::default()
            };
            if !r.recovered {
                return Ok::<_, String>(r);
            }
            let mut want = 1;
            while want <= m {
                let (offset, n) = next_frame(&mut ws, within, |f| {
                    Ok((f.action == "message")
                        .then(|| (f.offset.unwrap_or(0), f.payload.as_ref().map_or(0, |p| p.n))))
                })
                .await?;
                if offset != since.offset + want || n != want {
                    r.exact = false;
                }
                want += 1;
            }
            r.done_ns = start.elapsed().as_nanos() as u64;
            let _ = ws.close(None).await;
            Ok(r)
        }));
    }
    let mut results = Vec::with_capacity(c);
    let mut failures = Vec::new();
    for t in recovering {
        match t.await {
            Ok(Ok(r)) => results.push(r),
            Ok(Err(e)) => failures.push(e),
            Err(e) => failures.push(format!("task: {e}")),
        }
    }
    let complete: Vec<&Recovery> = results.iter().filter(|r| r.recovered && r.exact).collect();
    let mut done: Vec<u64> = complete.iter().map(|r| r.done_ns).collect();
    done.sort_unstable();
    let secs = |ns: u64| ns as f64 / 1e9;
    let recovery_secs = secs(done.last().copied().unwrap_or(0));
    run.result("clients_recovered", complete.len() as u64);
    run.result(
        "clients_not_recovered",
        results.iter().filter(|r| !r.recovered).count() as u64,
    );
    run.result(
        "clients_out_of_order",
        results.iter().filter(|r| r.recovered && !r.exact).count() as u64,
    );
    run.result("clients_failed", failures.len() as u64);
    run.float("recovery_secs", recovery_secs, 3);
    run.float("recovery_p50_secs", secs(pct(&done, 0.5)), 3);
    run.float("recovery_p99_secs", secs(pct(&done, 0.99)), 3);
    if let Some(e) = failures.first() {
        run.notes
            .push(format!("{} clients failed, e.g.: {e}", failures.len()));
    }
    run.notes.push(
        "recovery_secs: from the first reconnect until the last client had all missed \
         messages (connect, subscribe with since, history read, delivery)"
            .into(),
    );
    run.summary = format!(
        "POST /publish x{} publishers: {:.0}/s to a history channel, {:.0}/s without \
         (ratio {:.2}); {} of {c} clients recovered {m} missed messages each{} in {:.3} s \
         (p50 {:.3} s)",
        opts.publishers,
        with.per_sec(),
        without.per_sec(),
        ratio,
        complete.len(),
        if opts.restart_gateway.is_some() {
            " after a gateway restart"
        } else {
            ""
        },
        recovery_secs,
        secs(pct(&done, 0.5)),
    );
    Ok(run)
}
