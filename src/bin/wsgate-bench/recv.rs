//! Subscriber sockets: one task each. A task connects (bounded concurrency),
//! sends its subscribe requests in one flush, waits for every reply, then
//! reads until told to stop, counting bench messages (latency from the
//! payload's `"t":` into its own histogram) and gap notices. A Bayeux socket
//! ([`Subs::Bayeux`]) handshakes and connects first, keeps a connect held
//! (sending the next one whenever one is answered), counts the messages of
//! its frames that are not `/meta/` replies, and disconnects when stopped.
//! A gated pool
//! (`Pool::spawn_gated`) connects every socket first and holds the subscribes
//! until `Pool::go`, so a join storm starts from sockets already open.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::bayeux;
use crate::cli::TopicKind;
use crate::dialects::{self, Wire};
use crate::hist::{Hist, Sharded};
use crate::net::{self, Gateway};
use crate::sse;
use crate::sys::unix_nanos;

/// Per-socket counters the main task reads while sockets run (one cache line
/// each, one writer each).
#[repr(align(64))]
#[derive(Default)]
pub(crate) struct Slot {
    /// Bench messages received.
    pub(crate) count: AtomicU64,
    /// Unix nanos of the last `resumed` notice.
    pub(crate) resumed_ns: AtomicU64,
    /// Unix nanos of the first `interrupted` notice.
    pub(crate) interrupted_ns: AtomicU64,
    /// Unix nanos just before the subscribe requests were sent.
    pub(crate) sent_ns: AtomicU64,
    /// Unix nanos when the last subscribe reply arrived.
    pub(crate) acked_ns: AtomicU64,
    /// The socket's task has finished (closed, failed or stopped).
    pub(crate) ended: AtomicBool,
}

/// Counters shared by every socket of a pool.
#[derive(Default)]
struct Shared {
    /// Sockets whose WebSocket handshake completed.
    connected: AtomicUsize,
    /// Sockets that finished their subscribe phase.
    ready: AtomicUsize,
    /// Sockets that could not connect or subscribe.
    failed: AtomicUsize,
    /// Subscriptions confirmed with `status:true`.
    subscribed: AtomicUsize,
    /// Subscriptions refused.
    refused: AtomicUsize,
    /// The first few errors, for the report.
    errors: Mutex<Vec<String>>,
    /// Latency of every bench message, µs.
    hist: Option<Sharded>,
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

/// What one socket saw, returned when its task ends.
#[derive(Default)]
struct RecvOut {
    count: u64,
    first_ns: u64,
    last_ns: u64,
    interrupted: u64,
    resumed: u64,
    other: u64,
    close: Option<u16>,
    error: bool,
    /// (sequence number, unix nanos) of the first `Spec::arrivals` bench
    /// messages, for the arrival spread.
    arrivals: Vec<(u64, u64)>,
    wire_bytes: u64,
    inflated: u64,
}

/// Everything the pool's sockets saw.
#[derive(Default)]
pub(crate) struct Outcome {
    /// Latency of every bench message, µs.
    pub(crate) hist: Hist,
    /// Bench messages received.
    pub(crate) delivered: u64,
    /// Earliest and latest receipt, unix nanos (0 if none).
    pub(crate) first_ns: u64,
    pub(crate) last_ns: u64,
    /// Gap notices received.
    pub(crate) interrupted: u64,
    pub(crate) resumed: u64,
    /// Other text frames (not bench messages, not notices).
    pub(crate) other: u64,
    /// Close codes sent by the gateway, with counts.
    pub(crate) closes: BTreeMap<u16, u64>,
    /// Sockets that ended with a read error or without a close frame.
    pub(crate) broken: u64,
    /// Tasks that did not stop in time (aborted).
    pub(crate) stuck: u64,
    /// With `Spec::arrivals`: each arrival minus its message's first
    /// arrival (over every socket), µs.
    pub(crate) spread: Hist,
    /// With `Spec::arrivals`: per message, last arrival minus first, µs.
    pub(crate) span: Hist,
    /// Bytes the sockets received on the wire from their subscribe replies
    /// to their end (`TCP_INFO`).
    pub(crate) wire_bytes: u64,
    /// Compressed messages the sockets inflated (`Spec::deflate`).
    pub(crate) inflated: u64,
}

/// What one socket subscribes, in its dialect.
#[derive(Clone, Debug)]
pub(crate) enum Subs {
    /// Native request frames, sent in one flush; every reply awaited.
    Native(Vec<Message>),
    /// Bayeux channels, subscribed in one `/meta/subscribe` after the
    /// handshake and the first connect.
    Bayeux(Vec<String>),
    /// Topics of another raw-WebSocket dialect, subscribed its way.
    Wire(Wire, Vec<String>),
    /// The subscriptions of an event stream (SSE), named in its URL.
    Sse(Vec<(TopicKind, String)>),
}

/// A set of subscriber sockets.
pub(crate) struct Pool {
    slots: Vec<Arc<Slot>>,
    handles: Vec<JoinHandle<RecvOut>>,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    /// Gated pools: opened by `go`.
    gate: Option<watch::Sender<bool>>,
}

/// How to open the pool's sockets.
pub(crate) struct Spec {
    pub(crate) gateways: Vec<Gateway>,
    pub(crate) sources: u32,
    pub(crate) source_offset: u32,
    pub(crate) read_buffer: usize,
    pub(crate) concurrency: usize,
    /// Bound on each connect and on each subscribe phase.
    pub(crate) timeout: Duration,
    /// Arrival times kept per socket for the spread (0: none), the first
    /// this many bench messages.
    pub(crate) arrivals: usize,
    /// Offer permessage-deflate (and inflate what comes compressed).
    pub(crate) deflate: bool,
}

impl Pool {
    /// Starts one task per entry of `subscriptions` (the frames it sends), on
    /// gateway `i mod gateways`, from source address number `i`.
    pub(crate) fn spawn(spec: &Spec, subscriptions: Vec<Subs>) -> Pool {
        Pool::start(spec, subscriptions, false)
    }

    /// Like `spawn`, but each socket, once connected, waits for `go` before
    /// sending its requests (wait for `wait_connected` first).
    pub(crate) fn spawn_gated(spec: &Spec, subscriptions: Vec<Subs>) -> Pool {
        Pool::start(spec, subscriptions, true)
    }

    fn start(spec: &Spec, subscriptions: Vec<Subs>, gated: bool) -> Pool {
        let (gate, gate_rx) = if gated {
            let (tx, rx) = watch::channel(false);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let shared = Arc::new(Shared {
            hist: Some(Sharded::new()),
            ..Shared::default()
        });
        let (stop, stop_rx) = watch::channel(false);
        let sem = Arc::new(Semaphore::new(spec.concurrency));
        let mut slots = Vec::with_capacity(subscriptions.len());
        let mut handles = Vec::with_capacity(subscriptions.len());
        for (i, subs) in subscriptions.into_iter().enumerate() {
            let slot = Arc::new(Slot::default());
            slots.push(slot.clone());
            let gw = spec.gateways[i % spec.gateways.len()].clone();
            let src = net::source(i, spec.sources, spec.source_offset);
            let task = Task {
                gw,
                src,
                subs: Some(subs),
                read_buffer: spec.read_buffer,
                deflate: spec.deflate,
                timeout: spec.timeout,
                arrivals: spec.arrivals,
                sem: sem.clone(),
                shared: shared.clone(),
                slot,
                stop: stop_rx.clone(),
                gate: gate_rx.clone(),
            };
            handles.push(tokio::spawn(task.run()));
        }
        Pool {
            slots,
            handles,
            shared,
            stop,
            gate,
        }
    }

    /// Waits until every socket is connected or failed, or `deadline`.
    /// Returns the number connected.
    pub(crate) async fn wait_connected(&self, deadline: Instant) -> usize {
        loop {
            let connected = self.shared.connected.load(Ordering::Acquire);
            if connected + self.failed() >= self.len() || Instant::now() >= deadline {
                return connected;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Gated pools: lets every connected socket send its requests.
    pub(crate) fn go(&self) {
        if let Some(g) = &self.gate {
            let _ = g.send(true);
        }
    }

    /// Sockets in the pool.
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Waits until every socket is subscribed or failed, or `deadline`.
    /// Returns the number ready.
    pub(crate) async fn wait_ready(&self, deadline: Instant) -> usize {
        loop {
            let ready = self.ready();
            if ready + self.failed() >= self.len() || Instant::now() >= deadline {
                return ready;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub(crate) fn ready(&self) -> usize {
        self.shared.ready.load(Ordering::Acquire)
    }

    pub(crate) fn failed(&self) -> usize {
        self.shared.failed.load(Ordering::Acquire)
    }

    pub(crate) fn subscribed(&self) -> usize {
        self.shared.subscribed.load(Ordering::Acquire)
    }

    pub(crate) fn refused(&self) -> usize {
        self.shared.refused.load(Ordering::Acquire)
    }

    pub(crate) fn errors(&self) -> Vec<String> {
        self.shared
            .errors
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
    }

    /// Bench messages received so far, over all sockets.
    pub(crate) fn delivered(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| s.count.load(Ordering::Relaxed))
            .sum()
    }

    /// Sockets whose task has ended.
    pub(crate) fn ended(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.ended.load(Ordering::Relaxed))
            .count()
    }

    /// Per-socket `resumed` times (unix nanos, 0 = none yet).
    pub(crate) fn resumed_ns(&self) -> Vec<u64> {
        self.times(|s| &s.resumed_ns)
    }

    /// Per-socket times of the first `interrupted` notice (unix nanos, 0 = none yet).
    pub(crate) fn interrupted_ns(&self) -> Vec<u64> {
        self.times(|s| &s.interrupted_ns)
    }

    /// Per-socket (requests sent, last reply received) times (unix nanos, 0 = not yet).
    pub(crate) fn request_ns(&self) -> Vec<(u64, u64)> {
        self.slots
            .iter()
            .map(|s| {
                (
                    s.sent_ns.load(Ordering::Acquire),
                    s.acked_ns.load(Ordering::Acquire),
                )
            })
            .collect()
    }

    fn times(&self, field: impl Fn(&Slot) -> &AtomicU64) -> Vec<u64> {
        self.slots
            .iter()
            .map(|s| field(s).load(Ordering::Relaxed))
            .collect()
    }

    /// After the traffic: waits until the delivered count reaches `expected`
    /// or stops growing for `settle`, or `deadline`. Returns true on timeout.
    pub(crate) async fn drain(&self, expected: u64, settle: Duration, deadline: Instant) -> bool {
        let mut last = self.delivered();
        let mut still_since = Instant::now();
        loop {
            let now = Instant::now();
            let got = self.delivered();
            if got >= expected {
                return false;
            }
            if got != last {
                last = got;
                still_since = now;
            } else if now - still_since >= settle {
                return false;
            }
            if now >= deadline {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops every socket and merges what they saw.
    pub(crate) async fn finish(self, timeout: Duration) -> Outcome {
        let _ = self.stop.send(true);
        let mut out = Outcome::default();
        let hist = self.shared.hist.as_ref();
        let until = Instant::now() + timeout;
        let mut arrivals: std::collections::HashMap<u64, Vec<u64>> = Default::default();
        for h in self.handles {
            let abort = h.abort_handle();
            let r = match tokio::time::timeout_at(until.into(), h).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => {
                    out.stuck += 1;
                    continue;
                }
                Err(_) => {
                    abort.abort();
                    out.stuck += 1;
                    continue;
                }
            };
            out.delivered += r.count;
            if r.count > 0 {
                out.first_ns = if out.first_ns == 0 {
                    r.first_ns
                } else {
                    out.first_ns.min(r.first_ns)
                };
                out.last_ns = out.last_ns.max(r.last_ns);
            }
            out.interrupted += r.interrupted;
            out.resumed += r.resumed;
            out.other += r.other;
            if let Some(code) = r.close {
                *out.closes.entry(code).or_default() += 1;
            }
            out.broken += u64::from(r.error);
            out.wire_bytes += r.wire_bytes;
            out.inflated += r.inflated;
            for (seq, ns) in r.arrivals {
                arrivals.entry(seq).or_default().push(ns);
            }
        }
        for times in arrivals.values() {
            let first = times.iter().copied().min().unwrap_or(0);
            let last = times.iter().copied().max().unwrap_or(0);
            for &t in times {
                out.spread.record((t - first) / 1000);
            }
            out.span.record((last - first) / 1000);
        }
        if let Some(h) = hist {
            out.hist = h.merged();
        }
        out
    }
}

/// One socket's task.
struct Task {
    gw: Gateway,
    src: std::net::Ipv4Addr,
    subs: Option<Subs>,
    read_buffer: usize,
    deflate: bool,
    timeout: Duration,
    arrivals: usize,
    sem: Arc<Semaphore>,
    shared: Arc<Shared>,
    slot: Arc<Slot>,
    stop: watch::Receiver<bool>,
    gate: Option<watch::Receiver<bool>>,
}

impl Task {
    async fn run(mut self) -> RecvOut {
        if let Some(Subs::Sse(topics)) = &self.subs {
            let topics = topics.clone();
            return self.run_sse(topics).await;
        }
        let mut out = RecvOut::default();
        let permit = self.sem.clone().acquire_owned().await.ok();
        let connected = tokio::time::timeout(
            self.timeout,
            net::connect_with(&self.gw, self.src, self.read_buffer, self.deflate),
        )
        .await
        .unwrap_or_else(|_| Err(format!("connect to {} timed out", self.gw.addr)));
        let mut ws = match connected {
            Ok(ws) => ws,
            Err(e) => return self.failed(e, out),
        };
        self.shared.connected.fetch_add(1, Ordering::AcqRel);
        let mut permit = permit;
        if let Some(mut gate) = self.gate.take() {
            // Connected: free the slot for the next connect, then wait for
            // `go` (or the stop, or the gate's sender gone).
            drop(permit.take());
            let mut stop = self.stop.clone();
            tokio::select! {
                r = gate.wait_for(|g| *g) => if r.is_err() {
                    return self.failed("gate dropped".into(), out);
                },
                _ = stop.wait_for(|s| *s) => {
                    return self.failed("stopped before go".into(), out);
                }
            }
        }
        let subs = self.subs.take().unwrap_or(Subs::Native(Vec::new()));
        self.slot.sent_ns.store(unix_nanos(), Ordering::Release);
        let mut wire = None;
        let (replies, mut session) = match subs {
            Subs::Native(frames) => (net::request_all(&mut ws, frames, self.timeout).await, None),
            // Served by `run_sse`, before any WebSocket.
            Subs::Sse(_) => (Ok((0, 0, None)), None),
            Subs::Wire(w, names) => {
                wire = Some(w);
                let setup = tokio::time::timeout(self.timeout, w.setup(&mut ws, &names)).await;
                let replies = setup.unwrap_or_else(|_| {
                    Err(format!(
                        "{w:?} setup not answered within {:?}",
                        self.timeout
                    ))
                });
                (replies, None)
            }
            Subs::Bayeux(names) => {
                match tokio::time::timeout(self.timeout, bayeux::setup(&mut ws, &names)).await {
                    Ok(Ok(s)) => (Ok((s.ok, s.refused, s.first_error)), Some(s.session)),
                    Ok(Err(e)) => (Err(e), None),
                    Err(_) => (
                        Err(format!(
                            "Bayeux setup not answered within {:?}",
                            self.timeout
                        )),
                        None,
                    ),
                }
            }
        };
        self.slot.acked_ns.store(unix_nanos(), Ordering::Release);
        match replies {
            Ok((ok, refused, error)) => {
                self.shared.subscribed.fetch_add(ok, Ordering::AcqRel);
                if refused > 0 {
                    self.shared.refused.fetch_add(refused, Ordering::AcqRel);
                    self.shared
                        .note(format!("refused: {}", error.unwrap_or_default()));
                }
            }
            Err(e) => return self.failed(e, out),
        }
        drop(permit);
        self.shared.ready.fetch_add(1, Ordering::AcqRel);
        let wire_start = net::wire_bytes(&ws);

        let mut stop = self.stop.clone();
        // Gives `()`, not the (not `Send`) watch guard, so an arm may await.
        let stopped = async {
            let _ = stop.wait_for(|s| *s).await;
        };
        tokio::pin!(stopped);
        let keepalive = wire.and_then(Wire::keepalive);
        let mut ping = tokio::time::interval(dialects::EIO_PING_EVERY);
        loop {
            tokio::select! {
                biased;
                m = ws.next() => match m {
                    Some(Ok(Message::Text(t))) => {
                        let b = t.as_bytes();
                        if let Some(w) = wire {
                            self.wire_frame(w, b, &mut out);
                            continue;
                        }
                        let Some(s) = session.as_mut() else {
                            self.native_frame(b, &mut out);
                            continue;
                        };
                        if self.bayeux_frame(b, &mut out) {
                            // The held connect was answered: hold the next.
                            if ws.send(s.connect(false)).await.is_err() {
                                out.error = true;
                                break;
                            }
                        }
                    }
                    Some(Ok(Message::Close(f))) => {
                        out.close = Some(f.map(|f| u16::from(f.code)).unwrap_or(1005));
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => {
                        out.error = true;
                        break;
                    }
                },
                _ = ping.tick(), if keepalive.is_some() => {
                    if let Some(k) = keepalive.clone() {
                        if ws.send(k).await.is_err() {
                            out.error = true;
                            break;
                        }
                    }
                }
                _ = &mut stopped => {
                    if let Some(s) = session.as_mut() {
                        // Ends the session now rather than at its timeout.
                        let bye = ws.send(s.disconnect());
                        let _ = tokio::time::timeout(Duration::from_secs(1), bye).await;
                    }
                    break;
                }
            }
        }
        out.wire_bytes = net::wire_bytes(&ws).saturating_sub(wire_start);
        out.inflated = ws.get_ref().inflated();
        self.slot.ended.store(true, Ordering::Relaxed);
        out
    }

    /// A bench message received, sent at `sent` (unix nanos).
    fn delivered(&self, sent: u64, out: &mut RecvOut) {
        let now = unix_nanos();
        if let Some(h) = &self.shared.hist {
            h.record(now.saturating_sub(sent) / 1000);
        }
        out.count += 1;
        if out.first_ns == 0 {
            out.first_ns = now;
        }
        out.last_ns = now;
        self.slot.count.store(out.count, Ordering::Relaxed);
    }

    fn interrupted(&self, out: &mut RecvOut) {
        out.interrupted += 1;
        if out.interrupted == 1 {
            self.slot
                .interrupted_ns
                .store(unix_nanos(), Ordering::Relaxed);
        }
    }

    fn resumed(&self, out: &mut RecvOut) {
        out.resumed += 1;
        self.slot.resumed_ns.store(unix_nanos(), Ordering::Relaxed);
    }

    /// One native text frame.
    fn native_frame(&self, b: &[u8], out: &mut RecvOut) {
        if let Some(sent) = net::sent_nanos(b) {
            self.delivered(sent, out);
            if out.arrivals.len() < self.arrivals {
                if let Some(seq) = net::seq(b) {
                    out.arrivals.push((seq, out.last_ns));
                }
            }
        } else if b.starts_with(b"{\"action\":\"interrupted\"") {
            self.interrupted(out);
        } else if b.starts_with(b"{\"action\":\"resumed\"") {
            self.resumed(out);
        } else {
            out.other += 1;
        }
    }

    /// One Bayeux text frame: every message in it. True when it answered
    /// the held connect.
    fn bayeux_frame(&self, b: &[u8], out: &mut RecvOut) -> bool {
        let mut connected = false;
        bayeux::scan(b, |item| match item {
            bayeux::Item::Delivery(Some(sent)) => self.delivered(sent, out),
            bayeux::Item::Gap(true) => self.interrupted(out),
            bayeux::Item::Gap(false) => self.resumed(out),
            bayeux::Item::Connected => connected = true,
            bayeux::Item::Delivery(None) | bayeux::Item::Meta => out.other += 1,
        });
        connected
    }

    /// An event stream: opened with its subscriptions in the URL, ready
    /// once each has its `event: subscribe` answer, then read until told to
    /// stop (gated pools are not for event streams: they open as they
    /// subscribe).
    async fn run_sse(self, topics: Vec<(TopicKind, String)>) -> RecvOut {
        let mut out = RecvOut::default();
        let permit = self.sem.clone().acquire_owned().await.ok();
        self.slot.sent_ns.store(unix_nanos(), Ordering::Release);
        let opened = tokio::time::timeout(self.timeout, async {
            let mut events = sse::open(&self.gw, self.src, &topics).await?;
            let (mut ok, mut refused, mut closed) = (0usize, 0usize, None);
            while ok + refused < topics.len() && closed.is_none() {
                let more = events
                    .next_batch(|item| match item {
                        sse::Item::Subscribed(true) => ok += 1,
                        sse::Item::Subscribed(false) => refused += 1,
                        sse::Item::Close(code) => closed = Some(code),
                        _ => {}
                    })
                    .await?;
                if !more {
                    return Err("stream ended while subscribing".to_owned());
                }
            }
            match closed {
                Some(code) => Err(format!("stream closed ({code}) while subscribing")),
                None => Ok((events, ok, refused)),
            }
        })
        .await
        .unwrap_or_else(|_| Err(format!("SSE setup not answered within {:?}", self.timeout)));
        let mut events = match opened {
            Ok((events, ok, refused)) => {
                self.shared.connected.fetch_add(1, Ordering::AcqRel);
                self.shared.subscribed.fetch_add(ok, Ordering::AcqRel);
                if refused > 0 {
                    self.shared.refused.fetch_add(refused, Ordering::AcqRel);
                    self.shared
                        .note(format!("{refused} SSE subscriptions refused"));
                }
                events
            }
            Err(e) => return self.failed(e, out),
        };
        self.slot.acked_ns.store(unix_nanos(), Ordering::Release);
        drop(permit);
        self.shared.ready.fetch_add(1, Ordering::AcqRel);
        let mut stop = self.stop.clone();
        let stopped = async {
            let _ = stop.wait_for(|s| *s).await;
        };
        tokio::pin!(stopped);
        loop {
            let mut closed = None;
            tokio::select! {
                biased;
                r = events.next_batch(|item| match item {
                    sse::Item::Delivery(Some(sent)) => self.delivered(sent, &mut out),
                    sse::Item::Gap(true) => self.interrupted(&mut out),
                    sse::Item::Gap(false) => self.resumed(&mut out),
                    sse::Item::Close(code) => closed = Some(code),
                    _ => out.other += 1,
                }) => match r {
                    Ok(true) => {}
                    Ok(false) | Err(_) => {
                        out.error = closed.is_none();
                        out.close = closed;
                        break;
                    }
                },
                _ = &mut stopped => break,
            }
            if closed.is_some() {
                out.close = closed;
                break;
            }
        }
        self.slot.ended.store(true, Ordering::Relaxed);
        out
    }

    /// One text frame of a [`Wire`] dialect.
    fn wire_frame(&self, w: Wire, b: &[u8], out: &mut RecvOut) {
        match w.scan(b) {
            dialects::Item::Delivery(Some(sent)) => self.delivered(sent, out),
            dialects::Item::Gap(true) => self.interrupted(out),
            dialects::Item::Gap(false) => self.resumed(out),
            dialects::Item::Delivery(None) | dialects::Item::Other => out.other += 1,
        }
    }

    fn failed(&self, e: String, out: RecvOut) -> RecvOut {
        self.shared.failed.fetch_add(1, Ordering::AcqRel);
        self.shared.note(e);
        self.slot.ended.store(true, Ordering::Relaxed);
        out
    }
}
