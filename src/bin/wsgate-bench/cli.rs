//! Command line, parsed by hand.

use std::fmt;

/// Printed by `--help`.
pub(crate) const USAGE: &str = "\
wsgate-bench: load client for the wsgate gateway (native protocol or Bayeux over WebSocket,
publishes through Redis)

USAGE:
  wsgate-bench <WORKLOAD> --url ws://127.0.0.1:PORT/ws [--url ...] --redis redis://127.0.0.1:PORT
               [--pid GATEWAY_PID ...] [options]
  wsgate-bench table RESULTS.jsonl     markdown table of JSON result lines
  wsgate-bench --help

WORKLOADS:
  fanout    C subscribers on one pattern; a publisher at R msg/s for M messages:
            delivered/s, loss, latency p50/p90/p99/max, gateway CPU per delivery
  channels  C subscribers, each on its own exact channel (--topic-kind pattern: its own
            pattern); messages published round-robin over them
  cluster   fanout with subscribers spread over several gateways (two or more --url)
  spread    fanout of one message at a time (default 10,000 subscribers, 5 msg/s x 20):
            each message's arrival spread over its subscribers (arrival minus that
            message's first arrival), p50/p99/max, and its span (last - first)
  idle      C subscribed idle sockets held for D seconds: gateway RSS per socket
  churn     N connections subscribing/unsubscribing distinct topics, W requests in
            flight each, for D seconds: ops/s, Redis commands per op (INFO commandstats)
  resync    P distinct patterns over P/per-conn connections; Redis restarted
            (--restart-redis CMD) or its pub/sub clients killed (--drop-pubsub):
            time from Redis accepting connections until PUBSUB NUMPAT == P again
  joinstorm C sockets opened first (all of them), then each sends one subscribe to the
            same channel at once: time from the first send to the last ack; the
            gateway's longest registry lock hold (wsgate_hub_lock_hold_*; n/a if absent)
  outage    C sockets each subscribed to the same T channels (--topics); CLIENT KILL
            TYPE pubsub: time from the kill to each client's `interrupted` (p50/p99/max),
            clients later `resumed`, lock holds during the outage. The gateway needs
            WSGATE_MAX_SUBSCRIPTIONS >= T and a high WSGATE_SUBSCRIBE_RATE
  calls     request/response across two nodes: --services echo instances of service
            `bench` on node A (--service-url ws://A/services), --callers native sockets
            on node B (--url ws://B/ws) calling bench:echo at R calls/s in total (or
            --rate max: every caller keeps its window full), at most --window in flight
            per caller, for D seconds: calls/s, latency p50/p99/p999, errors by kind,
            gateway CPU per call; and a direct Redis round trip at the same rate (a
            PUBLISH whose subscriber PUBLISHes it back) and the ratio of the p99s.
            The gateways need WSGATE_CALL_ALLOW=bench:echo and WSGATE_SERVICE_KEY
  presence  C members (--subscribers) of one presence channel (--channel), native sockets
            round-robin over the --url gateways, the first --join-leave K of them asking
            for join/leave events; then --requests presence round trips at that count
            (--probers sockets, one request in flight each): p50/p99/max, and the member
            count of every answer, which must be C (wrong_counts_C). --steps 1000 also
            measures at 1,000 members on the way. --ready-file PATH: afterwards, write
            each node's member count there and hold the members until PATH is deleted
            (or --hold-secs), for a node kill (scripts/bench-presence.sh). The gateways
            need WSGATE_PRESENCE covering the channel and a high WSGATE_SUBSCRIBE_RATE
  history   (1) --publishers HTTP keep-alive connections POST /publish (--batch messages
            each) for D seconds to --history-channel, then to --plain-channel:
            publishes/s of both and the ratio; (2) C sockets subscribe to
            <history-channel>.recover, a marker gives each its offset, they go (or
            --restart-gateway CMD restarts the gateway; then /readyz is awaited),
            M messages [100] are published, and all C reconnect with `since`: time until
            every client has all M (checked: recovered:true, in order, no duplicate).
            The gateway needs WSGATE_HISTORY covering both history channels; --redis is
            not needed (everything goes through the gateway)

OPTIONS:
  --url URL               gateway WebSocket URL; repeatable (sockets spread round-robin)
  --pid PID               gateway process id for CPU/RSS; repeatable, same order as --url
  --redis URL             Redis the gateways use (redis://127.0.0.1:PORT)
  --shard URL             fanout/channels/cluster: one of the gateways' WSGATE_REDIS_SHARDS,
                          repeatable, in the same order (replaces --redis): each message is
                          published on its channel's owner, one pipeline per server; reports
                          each server's CPU per PUBLISH and how the channels spread
  --cluster-seed URL      fanout/channels/cluster: a node of the Redis Cluster the gateways
                          use with WSGATE_REDIS_CLUSTER_PUBSUB=sharded (replaces --redis):
                          each message is SPUBLISHed on its slot's master (CLUSTER SLOTS);
                          reported per master as for --shard
  --subscribers C         sockets for fanout/channels/cluster/idle/joinstorm/outage [1000]
  --rate R                messages per second published [100]; calls: calls per second
                          over all callers, or `max` (saturation) [10000]
  --messages M            messages to publish [R x duration]
  --payload-bytes N       published payload size, at least ~45 [100]
  --payload-shape S       pad: a timestamp padded with x; json: records with varied names
                          and numbers, about N bytes (what compression is measured on) [pad]
  --duration-secs D       publish time when --messages is absent; idle hold; churn time [10]
  --max-secs S            bound on the whole run; the process exits 3 at S + 30 [60]
  --sources K             client source addresses 127.0.0.1 .. (IP_BIND_ADDRESS_NO_PORT) [50]
  --source-offset O       first source address is 127.0.0.1 + O [0]
  --topic-kind KIND       pattern | channel (fanout/cluster: pattern; channels/idle/churn: channel)
  --dialect D             native | bayeux | realizehit | roadrunner | socketstream | sse: what the
                          sockets speak (fanout, channels, cluster, idle) [native]; --url is
                          that dialect's path. bayeux (ws://HOST:PORT/bayeux): each socket
                          handshakes, connects, subscribes and keeps a connect held; topics
                          are Bayeux channels (/benchN/f/x, pattern /benchN/f/*). realizehit
                          (ws://HOST:PORT/ws/?EIO=3&transport=websocket): channels
                          a:benchN|b:f|c:x, pinging every 10 s; roadrunner (/roadrunner):
                          one join; socketstream (/socketstream): connect, then
                          wsgate.subscribe calls; sse (http://HOST:PORT/sse): one GET naming
                          the topic. realizehit and roadrunner: channels only
  --connect-concurrency N connection attempts in flight [256]
  --connections N         churn: connections [100]
  --window W              churn: requests in flight per connection; calls: calls in
                          flight per caller (<= WSGATE_MAX_CALLS_IN_FLIGHT) [32]
  --callers N             calls: caller sockets on the --url gateways [8]
  --services N            calls: service instances on the --service-url gateway [1]
  --service-url URL       calls: the /services endpoint of node A (ws://HOST:PORT/services)
  --service-pid PID       calls: node A's process id, for its CPU
  --service-key KEY       calls: WSGATE_SERVICE_KEY (sent as Authorization: Bearer);
                          default: the environment's WSGATE_SERVICE_KEY
  --call-timeout-ms MS    calls: the timeout_ms each call asks for [none: the gateway's]
  --direct MODE           calls: the direct Redis round trip, `before` the calls (same
                          rate and duration), `concurrent` with them, or `off` [before;
                          off with --rate max]
  --publishers N          history: concurrent HTTP publishers [32]
  --batch B               history: messages per POST /publish [1]
  --history-channel NAME  history: the history channel published to [hist.bench]
  --plain-channel NAME    history: the channel without history [plain.bench]
  --restart-gateway CMD   history: shell command that restarts the gateway between the
                          clients' leaving and the missed messages (returns at once or
                          once the new gateway started; /readyz is awaited after it)
  --patterns P            resync: distinct patterns [1000]
  --per-conn N            resync: patterns per connection (<= WSGATE_MAX_SUBSCRIPTIONS and
                          WSGATE_MAX_PATTERNS_PER_CONNECTION; the gateway also needs
                          WSGATE_MAX_PATTERNS and WSGATE_MAX_REDIS_PATTERNS >= P) [200]
  --topics T              outage: topics every socket subscribes [256]
  --channel NAME          presence: the presence channel [presence.bench]
  --steps N,N,...         presence: member counts measured on the way to --subscribers []
  --requests R            presence: round trips per step [1000], within --duration-secs
  --probers P             presence: sockets asking, one request in flight each [1]
  --join-leave K          presence: the first K members subscribe with join_leave [0]
  --ready-file PATH       presence: hold the members after measuring (see presence)
  --hold-secs S           presence: longest hold with --ready-file [60]
  --restart-redis CMD     resync: shell command that stops Redis and starts it again on the
                          same port; it should return without waiting for Redis to be ready
  --drop-pubsub           resync: CLIENT KILL TYPE pubsub instead of a restart
  --deflate               fanout/channels/cluster/spread: subscribers offer permessage-deflate
                          (the gateway needs WSGATE_COMPRESSION=on) and inflate RSV1 frames;
                          every run reports client_wire_bytes_per_delivery
  --before-phase CMD      joinstorm/outage/resync/fanout/channels: shell command run (and
                          waited for) right before the measured phase, e.g. to start a
                          profiler on the gateway
  --subscribe-timeout-secs S  bound on each connect and each socket's subscribe phase [10]
  --settle-ms MS          after publishing, wait until counts stop growing this long [1000]
  --read-buffer BYTES     client WebSocket read buffer [16384; idle: 4096]
  --tick-ms MS            publisher pacing tick [1]
  --threads N             bench runtime worker threads [number of CPUs]
  --label TEXT            name of this run in the output
  --check EXPR            a target on a result, e.g. p99_ms<=6, loss==0, ops_per_sec>=50000;
                          repeatable; reported as met / not met

OUTPUT: one JSON line on stdout (parameters, results, checks); a table on stderr.
Exit status: 0 when the run completed (whether or not checks were met), 1 on error,
2 on bad usage, 3 if the run overran --max-secs.
";

/// Which workload to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Workload {
    Fanout,
    Spread,
    Channels,
    Cluster,
    Idle,
    Churn,
    Resync,
    JoinStorm,
    Outage,
    Calls,
    Presence,
    History,
}

impl Workload {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Workload::Fanout => "fanout",
            Workload::Spread => "spread",
            Workload::Channels => "channels",
            Workload::Cluster => "cluster",
            Workload::Idle => "idle",
            Workload::Churn => "churn",
            Workload::Resync => "resync",
            Workload::JoinStorm => "joinstorm",
            Workload::Outage => "outage",
            Workload::Calls => "calls",
            Workload::Presence => "presence",
            Workload::History => "history",
        }
    }
}

/// Exact channel (`SUBSCRIBE`) or glob pattern (`PSUBSCRIBE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TopicKind {
    Pattern,
    Channel,
}

impl TopicKind {
    pub(crate) fn field(self) -> &'static str {
        match self {
            TopicKind::Pattern => "pattern",
            TopicKind::Channel => "channel",
        }
    }
}

/// The protocol the subscriber sockets speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// wsgate's own JSON protocol (`/ws`).
    Native,
    /// Bayeux 1.0 over a WebSocket (`/bayeux`).
    Bayeux,
    /// realizehit over Engine.IO 3, websocket-only (`/ws/?EIO=3&transport=websocket`).
    Realizehit,
    /// RoadRunner websockets v2 (`/roadrunner`).
    RoadRunner,
    /// SocketStream 0.4 (`/socketstream`).
    SocketStream,
    /// Server-sent events of the native protocol (`http://HOST:PORT/sse`).
    Sse,
}

impl Dialect {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Dialect::Native => "native",
            Dialect::Bayeux => "bayeux",
            Dialect::Realizehit => "realizehit",
            Dialect::RoadRunner => "roadrunner",
            Dialect::SocketStream => "socketstream",
            Dialect::Sse => "sse",
        }
    }

    /// Whether subscribers of this dialect can hold patterns (realizehit and
    /// RoadRunner topics are exact).
    pub(crate) fn has_patterns(self) -> bool {
        !matches!(self, Dialect::Realizehit | Dialect::RoadRunner)
    }

    /// A topic name from its parts: `a.b.c` (native), `/a/b/c` (Bayeux
    /// channel grammar: segments of letters, digits and `-_!~()$@`, a
    /// pattern's wildcard as its last segment), `a:x|b:y|c:z` (realizehit:
    /// one filter per part, keys in order).
    pub(crate) fn topic(self, parts: &[&str]) -> String {
        match self {
            Dialect::Native | Dialect::RoadRunner | Dialect::SocketStream | Dialect::Sse => {
                parts.join(".")
            }
            Dialect::Bayeux => format!("/{}", parts.join("/")),
            Dialect::Realizehit => parts
                .iter()
                .zip('a'..='z')
                .map(|(v, k)| format!("{k}:{v}"))
                .collect::<Vec<_>>()
                .join("|"),
        }
    }
}

/// When `calls` measures the direct Redis round trip it compares with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direct {
    /// A phase of its own right before the calls: the same rate and
    /// duration on an otherwise quiet machine (the harder baseline).
    Before,
    /// At the same time as the calls, sharing the cores with them.
    Concurrent,
    /// Not measured.
    Off,
}

impl Direct {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Direct::Before => "before",
            Direct::Concurrent => "concurrent",
            Direct::Off => "off",
        }
    }
}

/// A target on one result: `name op value`.
#[derive(Clone, Debug)]
pub(crate) struct Check {
    pub(crate) text: String,
    pub(crate) name: String,
    pub(crate) op: &'static str,
    pub(crate) value: f64,
}

impl Check {
    fn parse(s: &str) -> Result<Check, String> {
        for op in ["<=", ">=", "==", "<", ">"] {
            if let Some((name, value)) = s.split_once(op) {
                let value: f64 = value
                    .trim()
                    .parse()
                    .map_err(|_| format!("--check {s:?}: {value:?} is not a number"))?;
                let name = name.trim();
                if name.is_empty() {
                    break;
                }
                return Ok(Check {
                    text: s.to_owned(),
                    name: name.to_owned(),
                    op,
                    value,
                });
            }
        }
        Err(format!(
            "--check {s:?}: expected NAME<=N, NAME>=N, NAME==N, NAME<N or NAME>N"
        ))
    }

    /// Whether `v` meets the target.
    pub(crate) fn met(&self, v: f64) -> bool {
        match self.op {
            "<=" => v <= self.value,
            ">=" => v >= self.value,
            "<" => v < self.value,
            ">" => v > self.value,
            _ => (v - self.value).abs() < 1e-9,
        }
    }
}

/// Everything a run needs.
#[derive(Clone, Debug)]
pub(crate) struct Opts {
    pub(crate) workload: Workload,
    pub(crate) urls: Vec<String>,
    pub(crate) pids: Vec<u32>,
    pub(crate) redis: Option<String>,
    /// `--shard`: the gateways' `WSGATE_REDIS_SHARDS`, in order.
    pub(crate) shards: Vec<String>,
    /// `--cluster-seed`: a node of the gateways' Redis Cluster (sharded mode).
    pub(crate) cluster_seed: Option<String>,
    pub(crate) subscribers: usize,
    pub(crate) rate: u64,
    pub(crate) messages: u64,
    pub(crate) payload_bytes: usize,
    pub(crate) duration_secs: f64,
    pub(crate) max_secs: f64,
    pub(crate) sources: u32,
    pub(crate) source_offset: u32,
    pub(crate) topic_kind: TopicKind,
    pub(crate) dialect: Dialect,
    pub(crate) connect_concurrency: usize,
    pub(crate) connections: usize,
    pub(crate) window: usize,
    pub(crate) patterns: usize,
    pub(crate) per_conn: usize,
    pub(crate) topics: usize,
    pub(crate) restart_redis: Option<String>,
    pub(crate) drop_pubsub: bool,
    /// Subscribers offer permessage-deflate (the gateway needs
    /// WSGATE_COMPRESSION=on) and inflate what comes compressed.
    pub(crate) deflate: bool,
    /// Published payloads are JSON records (`--payload-shape json`), not
    /// padding.
    pub(crate) payload_json: bool,
    pub(crate) before_phase: Option<String>,
    pub(crate) settle_ms: u64,
    pub(crate) subscribe_timeout_secs: f64,
    pub(crate) read_buffer: usize,
    pub(crate) tick_ms: u64,
    pub(crate) threads: usize,
    pub(crate) label: String,
    pub(crate) checks: Vec<Check>,
    /// calls: every caller keeps its window full instead of a paced rate.
    pub(crate) saturate: bool,
    pub(crate) callers: usize,
    pub(crate) services: usize,
    pub(crate) service_url: Option<String>,
    pub(crate) service_pid: Option<u32>,
    pub(crate) service_key: Option<String>,
    pub(crate) call_timeout_ms: Option<u64>,
    pub(crate) direct: Direct,
    /// presence: the channel.
    pub(crate) channel: String,
    /// presence: member counts measured before `subscribers`.
    pub(crate) steps: Vec<usize>,
    /// presence: round trips per step.
    pub(crate) requests: usize,
    /// presence: sockets asking at once.
    pub(crate) probers: usize,
    /// presence: members that ask for join/leave events.
    pub(crate) join_leave: usize,
    /// presence: hold the members after measuring, until this file is gone.
    pub(crate) ready_file: Option<String>,
    /// presence: longest hold.
    pub(crate) hold_secs: f64,
    /// history: concurrent HTTP publishers.
    pub(crate) publishers: usize,
    /// history: messages per `POST /publish`.
    pub(crate) batch: usize,
    /// history: a channel `WSGATE_HISTORY` covers.
    pub(crate) history_channel: String,
    /// history: a channel without history.
    pub(crate) plain_channel: String,
    /// history: restarts the gateway before the missed messages.
    pub(crate) restart_gateway: Option<String>,
}

/// What the command line asks for.
pub(crate) enum Command {
    Help,
    Table(String),
    Run(Box<Opts>),
}

/// A usage error, printed with a pointer to `--help`.
#[derive(Debug)]
pub(crate) struct UsageError(pub(crate) String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (see --help)", self.0)
    }
}

fn num<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, UsageError> {
    v.parse()
        .map_err(|_| UsageError(format!("{flag} {v:?}: not a valid number")))
}

/// Parses the arguments after the program name.
pub(crate) fn parse(args: &[String]) -> Result<Command, UsageError> {
    let Some(first) = args.first() else {
        return Err(UsageError("missing workload".into()));
    };
    if args.iter().any(|a| a == "--help" || a == "-h") || first == "help" {
        return Ok(Command::Help);
    }
    let workload = match first.as_str() {
        "fanout" => Workload::Fanout,
        "spread" => Workload::Spread,
        "channels" => Workload::Channels,
        "cluster" => Workload::Cluster,
        "idle" => Workload::Idle,
        "churn" => Workload::Churn,
        "resync" => Workload::Resync,
        "joinstorm" => Workload::JoinStorm,
        "outage" => Workload::Outage,
        "calls" => Workload::Calls,
        "presence" => Workload::Presence,
        "history" => Workload::History,
        "table" => {
            return match args.get(1..) {
                Some([path]) => Ok(Command::Table(path.clone())),
                _ => Err(UsageError("table takes exactly one file".into())),
            }
        }
        other => return Err(UsageError(format!("unknown workload {other:?}"))),
    };
    let mut urls = Vec::new();
    let mut pids = Vec::new();
    let mut redis = None;
    let mut shards = Vec::new();
    let mut cluster_seed = None;
    let mut subscribers = if workload == Workload::Spread {
        10_000usize
    } else {
        1000
    };
    let mut rate = None;
    let mut saturate = false;
    let mut messages = None;
    let mut payload_bytes = 100usize;
    let mut duration_secs = 10.0f64;
    let mut max_secs = 60.0f64;
    let mut sources = 50u32;
    let mut source_offset = 0u32;
    let mut topic_kind = None;
    let mut dialect = Dialect::Native;
    let mut connect_concurrency = 256usize;
    let mut connections = 100usize;
    let mut window = 32usize;
    let mut patterns = 1000usize;
    let mut per_conn = 200usize;
    let mut topics = 256usize;
    let mut restart_redis = None;
    let mut drop_pubsub = false;
    let mut deflate = false;
    let mut payload_json = false;
    let mut before_phase = None;
    let mut settle_ms = 1000u64;
    let mut subscribe_timeout_secs = 10.0f64;
    let mut read_buffer = None;
    let mut tick_ms = 1u64;
    let mut threads = super::sys::nproc();
    let mut label = None;
    let mut checks = Vec::new();
    let mut callers = 8usize;
    let mut services = 1usize;
    let mut service_url = None;
    let mut service_pid = None;
    let mut service_key = None;
    let mut call_timeout_ms = None;
    let mut direct = None;
    let mut channel = "presence.bench".to_owned();
    let mut steps = Vec::new();
    let mut requests = 1000usize;
    let mut probers = 1usize;
    let mut join_leave = 0usize;
    let mut ready_file = None;
    let mut hold_secs = 60.0f64;
    let mut publishers = 32usize;
    let mut batch = 1usize;
    let mut history_channel = "hist.bench".to_owned();
    let mut plain_channel = "plain.bench".to_owned();
    let mut restart_gateway = None;

    let mut it = args[1..].iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
            _ => (arg.as_str(), None),
        };
        if flag == "--drop-pubsub" {
            drop_pubsub = true;
            continue;
        }
        if flag == "--deflate" {
            deflate = true;
            continue;
        }
        let value = match inline {
            Some(v) => v,
            None => it
                .next()
                .cloned()
                .ok_or_else(|| UsageError(format!("{flag} needs a value")))?,
        };
        let v = value.as_str();
        match flag {
            "--url" => urls.push(value.clone()),
            "--pid" => pids.push(num(flag, v)?),
            "--redis" => redis = Some(value.clone()),
            "--shard" => shards.push(value.clone()),
            "--cluster-seed" => cluster_seed = Some(value.clone()),
            "--subscribers" => subscribers = num(flag, v)?,
            "--rate" if v == "max" => saturate = true,
            "--rate" => {
                rate = Some(num(flag, v)?);
                saturate = false;
            }
            "--messages" => messages = Some(num(flag, v)?),
            "--payload-bytes" => payload_bytes = num(flag, v)?,
            "--duration-secs" => duration_secs = num(flag, v)?,
            "--max-secs" => max_secs = num(flag, v)?,
            "--sources" => sources = num(flag, v)?,
            "--source-offset" => source_offset = num(flag, v)?,
            "--topic-kind" => {
                topic_kind = Some(match v {
                    "pattern" => TopicKind::Pattern,
                    "channel" => TopicKind::Channel,
                    _ => {
                        return Err(UsageError(format!(
                            "--topic-kind {v:?}: pattern or channel"
                        )))
                    }
                })
            }
            "--dialect" => {
                dialect = match v {
                    "native" => Dialect::Native,
                    "bayeux" => Dialect::Bayeux,
                    "realizehit" => Dialect::Realizehit,
                    "roadrunner" => Dialect::RoadRunner,
                    "socketstream" => Dialect::SocketStream,
                    "sse" => Dialect::Sse,
                    _ => {
                        return Err(UsageError(format!(
                    "--dialect {v:?}: native, bayeux, realizehit, roadrunner, socketstream or sse"
                )))
                    }
                }
            }
            "--connect-concurrency" => connect_concurrency = num(flag, v)?,
            "--connections" => connections = num(flag, v)?,
            "--window" => window = num(flag, v)?,
            "--publishers" => publishers = num(flag, v)?,
            "--batch" => batch = num(flag, v)?,
            "--history-channel" => history_channel = value.clone(),
            "--plain-channel" => plain_channel = value.clone(),
            "--restart-gateway" => restart_gateway = Some(value.clone()),
            "--patterns" => patterns = num(flag, v)?,
            "--per-conn" => per_conn = num(flag, v)?,
            "--topics" => topics = num(flag, v)?,
            "--restart-redis" => restart_redis = Some(value.clone()),
            "--before-phase" => before_phase = Some(value.clone()),
            "--settle-ms" => settle_ms = num(flag, v)?,
            "--subscribe-timeout-secs" => subscribe_timeout_secs = num(flag, v)?,
            "--read-buffer" => read_buffer = Some(num(flag, v)?),
            "--payload-shape" => {
                payload_json = match v {
                    "json" => true,
                    "pad" => false,
                    _ => return Err(UsageError(format!("--payload-shape {v:?}: json or pad"))),
                }
            }
            "--tick-ms" => tick_ms = num(flag, v)?,
            "--threads" => threads = num(flag, v)?,
            "--label" => label = Some(value.clone()),
            "--check" => checks.push(Check::parse(v).map_err(UsageError)?),
            "--callers" => callers = num(flag, v)?,
            "--services" => services = num(flag, v)?,
            "--service-url" => service_url = Some(value.clone()),
            "--service-pid" => service_pid = Some(num(flag, v)?),
            "--service-key" => service_key = Some(value.clone()),
            "--call-timeout-ms" => call_timeout_ms = Some(num(flag, v)?),
            "--channel" => channel = value.clone(),
            "--steps" => {
                steps = v
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| num(flag, s))
                    .collect::<Result<Vec<usize>, _>>()?
            }
            "--requests" => requests = num(flag, v)?,
            "--probers" => probers = num(flag, v)?,
            "--join-leave" => join_leave = num(flag, v)?,
            "--ready-file" => ready_file = Some(value.clone()),
            "--hold-secs" => hold_secs = num(flag, v)?,
            "--direct" => {
                direct = Some(match v {
                    "before" => Direct::Before,
                    "concurrent" => Direct::Concurrent,
                    "off" => Direct::Off,
                    _ => {
                        return Err(UsageError(format!(
                            "--direct {v:?}: before, concurrent or off"
                        )))
                    }
                })
            }
            _ => return Err(UsageError(format!("unknown option {flag:?}"))),
        }
    }

    let bad = |m: &str| Err(UsageError(m.to_owned()));
    if urls.is_empty() {
        return bad("at least one --url is required");
    }
    if !pids.is_empty() && pids.len() != urls.len() {
        return bad("give one --pid per --url (same order), or none");
    }
    if !shards.is_empty() || cluster_seed.is_some() {
        if redis.is_some() || (!shards.is_empty() && cluster_seed.is_some()) {
            return bad("give one of --redis, --shard or --cluster-seed");
        }
        if !matches!(
            workload,
            Workload::Fanout | Workload::Channels | Workload::Cluster
        ) {
            return bad("--shard and --cluster-seed are for fanout, channels and cluster");
        }
        redis = shards.first().cloned().or_else(|| cluster_seed.clone());
    }
    if redis.is_none()
        && !matches!(
            workload,
            Workload::Idle | Workload::JoinStorm | Workload::Presence | Workload::History
        )
    {
        return bad("--redis is required");
    }
    if workload == Workload::Cluster && urls.len() < 2 {
        return bad("cluster needs two or more --url");
    }
    if workload == Workload::Calls && service_url.is_none() {
        return bad("calls needs --service-url (node A's /services endpoint)");
    }
    if saturate && workload != Workload::Calls {
        return bad("--rate max is for calls");
    }
    if callers == 0 || services == 0 || call_timeout_ms == Some(0) {
        return bad("--callers, --services and --call-timeout-ms must be >= 1");
    }
    let rate = rate.unwrap_or(match workload {
        Workload::Calls => 10_000,
        Workload::Spread => 5,
        _ => 100,
    });
    if workload == Workload::Spread && messages.is_none() {
        messages = Some(20);
    }
    if workload == Workload::History && messages.is_none() {
        messages = Some(100);
    }
    if publishers == 0 || batch == 0 || batch > 1000 {
        return bad("--publishers must be >= 1, --batch from 1 to 1000");
    }
    // Channel names go into JSON and query strings as they are.
    let plain_name = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b))
    };
    if !plain_name(&history_channel) || !plain_name(&plain_channel) {
        return bad("--history-channel and --plain-channel: letters, digits and . _ - : only");
    }
    let direct = match direct {
        Some(d) => d,
        None if saturate => Direct::Off,
        None => Direct::Before,
    };
    if workload == Workload::Resync && restart_redis.is_some() == drop_pubsub {
        return bad("resync needs exactly one of --restart-redis CMD or --drop-pubsub");
    }
    if dialect != Dialect::Native
        && !matches!(
            workload,
            Workload::Fanout | Workload::Channels | Workload::Cluster | Workload::Idle
        )
    {
        return bad("--dialect other than native is for fanout, channels, cluster and idle");
    }
    if sources == 0 || u64::from(sources) + u64::from(source_offset) >= (1 << 24) - 2 {
        return bad("--sources must be >= 1 and stay inside 127.0.0.0/8 with --source-offset");
    }
    // Bounded so that every Duration built from them is valid.
    let within = |v: f64, low: f64| v.is_finite() && v >= low && v <= 86_400.0;
    if !within(max_secs, 0.001)
        || !within(subscribe_timeout_secs, 0.001)
        || !within(duration_secs, 0.0)
    {
        return bad(
            "--max-secs and --subscribe-timeout-secs must be in (0, 86400], --duration-secs in [0, 86400]",
        );
    }
    if requests == 0 || probers == 0 || channel.is_empty() || !within(hold_secs, 0.0) {
        return bad(
            "--requests and --probers must be >= 1, --channel non-empty, --hold-secs in [0, 86400]",
        );
    }
    if subscribers == 0 || rate == 0 || connections == 0 || window == 0 || patterns == 0 {
        return bad("--subscribers, --rate, --connections, --window, --patterns must be >= 1");
    }
    if per_conn == 0 || topics == 0 || connect_concurrency == 0 || threads == 0 || tick_ms == 0 {
        return bad(
            "--per-conn, --topics, --connect-concurrency, --threads, --tick-ms must be >= 1",
        );
    }
    let messages = messages.unwrap_or(((rate as f64) * duration_secs).round().max(1.0) as u64);
    let explicit_kind = topic_kind.is_some();
    let topic_kind = topic_kind.unwrap_or(match workload {
        Workload::Fanout | Workload::Spread | Workload::Cluster | Workload::Resync => {
            TopicKind::Pattern
        }
        Workload::Channels
        | Workload::Idle
        | Workload::Churn
        | Workload::JoinStorm
        | Workload::Outage
        | Workload::Calls
        | Workload::Presence
        | Workload::History => TopicKind::Channel,
    });
    let topic_kind = if dialect.has_patterns() {
        topic_kind
    } else if topic_kind == TopicKind::Pattern && explicit_kind {
        return bad("--dialect realizehit and roadrunner subscribe channels only");
    } else {
        TopicKind::Channel
    };
    let read_buffer = read_buffer.unwrap_or(match workload {
        Workload::Idle
        | Workload::Resync
        | Workload::Churn
        | Workload::JoinStorm
        | Workload::Outage
        | Workload::Presence => 4096,
        _ => 16384,
    });
    let label = label.unwrap_or_else(|| workload.name().to_owned());
    Ok(Command::Run(Box::new(Opts {
        workload,
        urls,
        pids,
        redis,
        shards,
        cluster_seed,
        subscribers,
        rate,
        messages,
        payload_bytes,
        duration_secs,
        max_secs,
        sources,
        source_offset,
        topic_kind,
        dialect,
        connect_concurrency,
        connections,
        window,
        patterns,
        per_conn,
        topics,
        restart_redis,
        drop_pubsub,
        deflate,
        payload_json,
        before_phase,
        settle_ms,
        subscribe_timeout_secs,
        read_buffer,
        tick_ms,
        threads,
        label,
        checks,
        saturate,
        callers,
        services,
        service_url,
        service_pid,
        service_key,
        call_timeout_ms,
        direct,
        channel,
        steps,
        requests,
        probers,
        join_leave,
        ready_file,
        hold_secs,
        publishers,
        batch,
        history_channel,
        plain_channel,
        restart_gateway,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(args: &[&str]) -> Result<Opts, UsageError> {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        match parse(&args)? {
            Command::Run(o) => Ok(*o),
            _ => Err(UsageError("not a run".into())),
        }
    }

    #[test]
    fn dialects() {
        let base = [
            "fanout",
            "--url",
            "ws://127.0.0.1:1/bayeux",
            "--redis",
            "redis://x",
        ];
        assert_eq!(opts(&base).map(|o| o.dialect).ok(), Some(Dialect::Native));
        let bx = [&base[..], &["--dialect", "bayeux"]].concat();
        assert_eq!(opts(&bx).map(|o| o.dialect).ok(), Some(Dialect::Bayeux));
        let bad = [&base[..], &["--dialect=cometd"]].concat();
        assert!(opts(&bad).is_err());
        let churn = [
            "churn",
            "--url",
            "ws://a:1/",
            "--redis",
            "r",
            "--dialect",
            "bayeux",
        ];
        assert!(opts(&churn).is_err());
        assert_eq!(Dialect::Native.topic(&["b1", "f", "*"]), "b1.f.*");
        assert_eq!(Dialect::Bayeux.topic(&["b1", "f", "*"]), "/b1/f/*");
        assert_eq!(Dialect::Realizehit.topic(&["b1", "f", "x"]), "a:b1|b:f|c:x");
        assert_eq!(Dialect::Sse.topic(&["b1", "f", "x"]), "b1.f.x");
        for (name, want) in [
            ("realizehit", Dialect::Realizehit),
            ("roadrunner", Dialect::RoadRunner),
            ("socketstream", Dialect::SocketStream),
            ("sse", Dialect::Sse),
        ] {
            let o = opts(&[&base[..], &["--dialect", name]].concat());
            assert_eq!(o.as_ref().map(|o| o.dialect).ok(), Some(want));
            // fanout defaults to a pattern: exact-only dialects take a channel.
            let kind = o.map(|o| o.topic_kind).ok();
            let exact = !want.has_patterns();
            assert_eq!(kind == Some(TopicKind::Channel), exact, "{name}");
        }
        let rr_pattern = [
            &base[..],
            &["--dialect", "roadrunner", "--topic-kind", "pattern"],
        ]
        .concat();
        assert!(opts(&rr_pattern).is_err());
    }

    #[test]
    fn spread_defaults() {
        let o = opts(&["spread", "--url", "ws://a:1/ws", "--redis", "r"]).ok();
        assert_eq!(
            o.as_ref()
                .map(|o| (o.subscribers, o.rate, o.messages, o.topic_kind)),
            Some((10_000, 5, 20, TopicKind::Pattern))
        );
        let o = opts(&[
            "spread",
            "--url",
            "ws://a:1/ws",
            "--redis",
            "r",
            "--messages",
            "3",
        ])
        .ok();
        assert_eq!(o.map(|o| o.messages), Some(3));
    }

    #[test]
    fn presence() {
        let o = opts(&[
            "presence",
            "--url",
            "ws://a:1/ws",
            "--subscribers",
            "10000",
            "--steps",
            "1000",
            "--join-leave=2",
        ])
        .ok();
        assert_eq!(
            o.as_ref()
                .map(|o| (o.steps.clone(), o.requests, o.probers, o.join_leave)),
            Some((vec![1000], 1000, 1, 2))
        );
        assert_eq!(o.map(|o| o.channel), Some("presence.bench".to_owned()));
        assert!(opts(&["presence", "--url", "ws://a:1/ws", "--probers", "0"]).is_err());
    }

    #[test]
    fn calls() {
        let base = [
            "calls",
            "--url",
            "ws://127.0.0.1:1/ws",
            "--service-url",
            "ws://127.0.0.1:2/services",
            "--redis",
            "redis://127.0.0.1:3",
        ];
        let o = opts(&base).ok();
        assert_eq!(o.as_ref().map(|o| o.rate), Some(10_000));
        assert_eq!(o.as_ref().map(|o| o.saturate), Some(false));
        assert_eq!(o.as_ref().map(|o| o.direct), Some(Direct::Before));
        assert_eq!(
            o.as_ref().map(|o| (o.callers, o.services, o.window)),
            Some((8, 1, 32))
        );
        let max = opts(&[&base[..], &["--rate", "max"]].concat()).ok();
        assert_eq!(
            max.as_ref().map(|o| (o.saturate, o.direct)),
            Some((true, Direct::Off))
        );
        let both = [
            &base[..],
            &["--rate=max", "--direct", "concurrent", "--rate", "5"],
        ]
        .concat();
        let both = opts(&both).ok();
        assert_eq!(
            both.map(|o| (o.saturate, o.rate, o.direct)),
            Some((false, 5, Direct::Concurrent))
        );
        assert!(opts(&base[..5]).is_err(), "--redis is required");
        assert!(
            opts(&[&base[..3], &base[5..]].concat()).is_err(),
            "--service-url too"
        );
        assert!(opts(&[&base[..], &["--direct", "after"]].concat()).is_err());
        assert!(opts(&[&base[..], &["--callers", "0"]].concat()).is_err());
        let fanout_max = [
            "fanout",
            "--url",
            "ws://a:1/",
            "--redis",
            "r",
            "--rate",
            "max",
        ];
        assert!(opts(&fanout_max).is_err());
        assert_eq!(opts(&fanout_max[..5]).map(|o| o.rate).ok(), Some(100));
    }
}
