#!/usr/bin/env bash
# The standard benchmark suite: builds the release binaries, starts its own
# redis-server (never 6379) and gateways on free loopback ports, runs
# wsgate-bench for every workload, and writes docs/benchmarks.md (machine,
# exact commands, results against the targets, a profile of the fan-out path).
#
#   scripts/bench.sh                 # the whole suite, ~10 minutes
#   BENCH_QUICK=1 scripts/bench.sh   # shorter runs, smaller counts (smoke test)
#   BENCH_OUT=/tmp/b.md scripts/bench.sh
#   BENCH_SKIP=resync-100k-patterns,idle-100k scripts/bench.sh   # skip runs (label prefixes)
#   BENCH_PROFILER=callgrind scripts/bench.sh   # valgrind instead of perf (used when perf fails)
#
# Everything it starts it stops (trap), and the whole suite is bounded
# (every run has its own --max-secs; BENCH_MAX_SECS, default 1200 s, is the
# last resort: the watchdog then stops everything, and no document is written).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${BENCH_OUT:-$ROOT/docs/benchmarks.md}
QUICK=${BENCH_QUICK:-0}
SKIP=${BENCH_SKIP:-}
SUITE_MAX=${BENCH_MAX_SECS:-1200}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wsgate-bench.XXXXXX")
RESULTS=$WORK/results.jsonl
COMMANDS=$WORK/commands.txt
GW=$ROOT/target/release/wsgate
BENCH=$ROOT/target/release/wsgate-bench
: >"$RESULTS"
: >"$COMMANDS"

PIDS=()          # gateways and background helpers we started
REDIS_PIDFILE=$WORK/redis.pid
WATCHDOG=

log() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }

cleanup() {
    local status=$?
    set +e
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do
        kill -INT "$pid" 2>/dev/null
    done
    sleep 0.5
    for pid in "${PIDS[@]}"; do
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    if [[ -s $REDIS_PIDFILE ]]; then
        kill -KILL "$(cat "$REDIS_PIDFILE")" 2>/dev/null
    fi
    [[ -n $WATCHDOG ]] && kill "$WATCHDOG" 2>/dev/null
    log "logs and raw results kept in $WORK"
    exit "$status"
}
trap cleanup EXIT INT TERM

# The suite's own bound: after SUITE_MAX seconds, stop (the trap cleans up).
(
    trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
    sleep "$SUITE_MAX" &
    sleeper=$!
    wait "$sleeper"
    log "suite exceeded ${SUITE_MAX}s: stopping"
    kill -TERM $$
) 2>/dev/null &
WATCHDOG=$!

skipped() {
    local label=$1 s
    IFS=',' read -ra s <<<"$SKIP"
    for p in "${s[@]}"; do
        [[ -n $p && $label == "$p"* ]] && return 0
    done
    return 1
}

# shellcheck source=scripts/lib.sh
. scripts/lib.sh

# ------------------------------------------------------------------ redis

RPORT=$(free_port)
REDIS_URL=redis://127.0.0.1:$RPORT
REDIS_START="redis-server --port $RPORT --bind 127.0.0.1 --save '' --appendonly no --daemonize yes --pidfile $REDIS_PIDFILE --dir $WORK --logfile $WORK/redis.log"
# Used by the resync runs: SIGKILL Redis (a crash), wait until it is gone,
# start it again on the same port. It returns without waiting for Redis to be
# ready: the bench measures from the moment Redis accepts connections.
RESTART_REDIS="pid=\$(cat $REDIS_PIDFILE); kill -9 \$pid; while kill -0 \$pid 2>/dev/null; do sleep 0.005; done; $REDIS_START"

start_redis() {
    eval "$REDIS_START"
    for _ in $(seq 1 200); do
        redis-cli -p "$RPORT" ping >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    log "redis-server did not start on $RPORT (see $WORK/redis.log)"
    return 1
}

# ------------------------------------------------------------------ gateways

GW_PID=
GW_PORT=
# start_gateway NAME [VAR=value ...]: sets GW_PID and GW_PORT.
start_gateway() {
    local name=$1
    shift
    GW_PORT=$(free_port)
    env WSGATE_LISTEN="127.0.0.1:$GW_PORT" WSGATE_REDIS_URL="$REDIS_URL" WSGATE_LOG=warn "$@" \
        "$GW" >"$WORK/gateway-$name.log" 2>&1 &
    GW_PID=$!
    PIDS+=("$GW_PID")
    echo "# gateway $name: WSGATE_LISTEN=127.0.0.1:$GW_PORT WSGATE_REDIS_URL=$REDIS_URL WSGATE_LOG=warn $* target/release/wsgate" >>"$COMMANDS"
    for _ in $(seq 1 200); do
        if curl -fsS "http://127.0.0.1:$GW_PORT/readyz" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.05
    done
    log "gateway $name did not become ready (see $WORK/gateway-$name.log)"
    return 1
}

stop_gateway() {
    local pid=$1
    kill -INT "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# bench LABEL ARGS...: one run; its JSON line goes to the results, its table to
# the terminal. A failing run leaves an error line and the suite goes on.
bench() {
    local label=$1
    shift
    if skipped "$label"; then
        log "skip $label"
        return 0
    fi
    log "run $label"
    { printf 'wsgate-bench'; printf ' %q' "$@" --label "$label"; echo; } >>"$COMMANDS"
    local rc=0
    timeout 900 "$BENCH" "$@" --label "$label" >>"$RESULTS" 2>"$WORK/$label.err" || rc=$?
    sed 's/^/    /' "$WORK/$label.err" >&2
    if ((rc != 0)); then
        log "$label failed with exit status $rc"
        grep -q "\"label\":\"$label\"" "$RESULTS" ||
            printf '{"label":"%s","workload":"%s","error":"exit status %s"}\n' "$label" "$1" "$rc" >>"$RESULTS"
    fi
}

# ------------------------------------------------------------------ build

log "building release binaries"
cargo build --release --bins 2>&1 | tail -n 2 >&2
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "load average at start: $LOAD_START"
start_redis
log "redis-server on $RPORT (work dir $WORK)"

if [[ $QUICK == 1 ]]; then
    D=3; CH_D=2; IDLE_PAIRS=2; IDLE_PER=2000; CHURN_D=3; RESYNC_BIG=10000; PROF_D=3; STORM=2000
else
    D=10; CH_D=5; IDLE_PAIRS=6; IDLE_PER=17000; CHURN_D=10; RESYNC_BIG=100000; PROF_D=8; STORM=10000
fi
# 10,000 sockets on one gateway (joinstorm, outage) and 17,000 per idle pair need
# the soft fd limit at the hard limit (20,000 here); gateways inherit it.
ulimit -Sn "$(ulimit -Hn)" 2>/dev/null || true

# ------------------------------------------------------------------ fanout

# Pattern caps are set explicitly wherever a run holds many patterns (the
# defaults of WSGATE_MAX_PATTERNS_PER_CONNECTION, WSGATE_MAX_PATTERNS and
# WSGATE_MAX_REDIS_PATTERNS would refuse or coalesce them; docs/security.md):
# channels-pattern holds 1,000 distinct patterns, one per socket, and measures
# them held in Redis as themselves.
start_gateway fanout WSGATE_MAX_REDIS_PATTERNS=100000
FAN_PID=$GW_PID FAN_PORT=$GW_PORT
COMMON=(--url "ws://127.0.0.1:$FAN_PORT/ws" --pid "$FAN_PID" --redis "$REDIS_URL")
bench fanout-100k fanout "${COMMON[@]}" --subscribers 1000 --rate 100 --duration-secs $D \
    --check 'loss==0' --check 'gateway_cpu_us_per_delivery<=4' --check 'p99_ms<=6'
bench fanout-450k fanout "${COMMON[@]}" --subscribers 1000 --rate 450 --duration-secs $D \
    --check 'loss==0' --check 'p99_ms<=10'
bench fanout-2m fanout "${COMMON[@]}" --subscribers 1000 --rate 2000 --duration-secs $D \
    --check 'loss==0' --check 'gateway_cpu_us_per_delivery<=0.4'
bench fanout-4m fanout "${COMMON[@]}" --subscribers 1000 --rate 4000 --duration-secs $D \
    --check 'loss==0'

# ------------------------------------------------------------------ profile

PROFILE=$WORK/profile.txt
: >"$PROFILE"
if skipped profile; then
    log "skip profile"
elif [[ ${BENCH_PROFILER:-perf} == perf ]] && perf stat -e cpu-clock true >/dev/null 2>&1; then
    log "profile: perf record on the gateway during a 2M deliveries/s fan-out"
    perf record -e cpu-clock -F 999 --call-graph dwarf,32768 -p "$FAN_PID" -o "$WORK/perf.data" \
        -- sleep $((PROF_D + 1)) >"$WORK/perf-record.log" 2>&1 &
    PERF_PID=$!
    PIDS+=("$PERF_PID")
    sleep 0.5
    bench profile-fanout-2m fanout "${COMMON[@]}" --subscribers 1000 --rate 2000 --duration-secs $PROF_D
    wait "$PERF_PID" 2>/dev/null || true
    echo "perf record -e cpu-clock -F 999 --call-graph dwarf,32768 -p <gateway pid> -- sleep $((PROF_D + 1)) (during profile-fanout-2m)" >>"$COMMANDS"
    {
        echo "Sampled with \`perf record -e cpu-clock\` (no hardware counters needed) on the"
        echo "gateway while \`profile-fanout-2m\` ran (1,000 subscribers, one pattern, 2,000"
        echo "msg/s): self time by binary and by function, then inclusive time (self +"
        echo "callees, DWARF call graphs) of the gateway's own functions and the syscalls."
        echo
        echo "### Where the gateway's CPU goes, by binary (self time)"
        echo
        echo '```'
        perf report -i "$WORK/perf.data" --stdio --no-children --sort dso 2>/dev/null |
            grep -E '^ +[0-9]' | sed -n "1,8p"
        echo '```'
        echo
        echo "### Top functions by self time"
        echo
        echo '```'
        perf report -i "$WORK/perf.data" --stdio --no-children --sort dso,sym -g none 2>/dev/null |
            grep -E '^ +[0-9]' | sed -n "1,30p" | cut -c1-150
        echo '```'
        echo
        echo "### Gateway functions by inclusive time (self + callees)"
        echo
        echo '```'
        perf report -i "$WORK/perf.data" --stdio --children --sort sym -g none 2>/dev/null |
            grep -E '^ +[0-9]' | grep -E 'wsgate::|tokio_tungstenite|tungstenite::|hyper|redis|sys_sendto|sys_write|sys_recvfrom|sys_epoll|tcp_sendmsg|do_syscall' |
            sed -n "1,30p" | cut -c1-150
        echo '```'
    } >>"$PROFILE"
else
    log "perf unavailable: callgrind on a short fan-out (slow)"
    VG_PORT=$(free_port)
    env WSGATE_LISTEN="127.0.0.1:$VG_PORT" WSGATE_REDIS_URL="$REDIS_URL" WSGATE_LOG=warn \
        valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind.out" "$GW" \
        >"$WORK/gateway-callgrind.log" 2>&1 &
    VG_PID=$!
    PIDS+=("$VG_PID")
    for _ in $(seq 1 600); do
        curl -fsS "http://127.0.0.1:$VG_PORT/readyz" >/dev/null 2>&1 && break
        sleep 0.1
    done
    bench profile-fanout-callgrind fanout --url "ws://127.0.0.1:$VG_PORT/ws" --pid "$VG_PID" \
        --redis "$REDIS_URL" --subscribers 200 --rate 50 --duration-secs 3 --max-secs 120
    kill -INT "$VG_PID"; wait "$VG_PID" 2>/dev/null || true
    {
        echo "perf was not usable: \`valgrind --tool=callgrind\` on a gateway serving"
        echo "\`profile-fanout-callgrind\` (200 subscribers, one pattern, 50 msg/s for 3 s)."
        echo "Counts are instructions, not time: syscalls and cache misses do not show."
        echo
        echo "### callgrind (instructions), top functions"
        echo
        echo '```'
        callgrind_annotate "$WORK/callgrind.out" 2>/dev/null | sed -n '/PROGRAM TOTALS/,$p' |
            grep -v '^-*$' | sed -n "1,32p" | cut -c1-170
        echo '```'
    } >>"$PROFILE"
fi

# ------------------------------------------------------------------ channels

bench channels-exact channels "${COMMON[@]}" --subscribers 1000 --rate 5000 --duration-secs $CH_D \
    --topic-kind channel --check 'loss==0'
bench channels-pattern channels "${COMMON[@]}" --subscribers 1000 --rate 5000 --duration-secs $CH_D \
    --topic-kind pattern --check 'loss==0'
stop_gateway "$FAN_PID"

# ------------------------------------------------------------------ cluster

CL_ARGS=()
CL_PIDS=()
for i in 1 2 3; do
    start_gateway "cluster-$i"
    CL_ARGS+=(--url "ws://127.0.0.1:$GW_PORT/ws" --pid "$GW_PID")
    CL_PIDS+=("$GW_PID")
done
bench cluster-3x-450k cluster "${CL_ARGS[@]}" --redis "$REDIS_URL" \
    --subscribers 1000 --rate 450 --duration-secs $D --check 'loss==0' --check 'p99_ms<=10'
for pid in "${CL_PIDS[@]}"; do stop_gateway "$pid"; done

# ------------------------------------------------------------------ compression

# permessage-deflate (issue 13): the same 2 KiB JSON fan-out to 1,000 sockets on one
# gateway with WSGATE_COMPRESSION=on, first uncompressed (no offer), then with every
# subscriber offering it. Target: CPU per delivery <= 1.3x and wire bytes per
# delivery <= 0.4x the uncompressed run's (gateway_cpu_us_per_delivery,
# client_wire_bytes_per_delivery).
start_gateway compression WSGATE_COMPRESSION=on
CMP=(--url "ws://127.0.0.1:$GW_PORT/ws" --pid "$GW_PID" --redis "$REDIS_URL" --subscribers 1000
    --rate 100 --duration-secs $D --payload-bytes 2048 --payload-shape json --check 'loss==0')
bench compression-plain-100k fanout "${CMP[@]}"
bench compression-deflate-100k fanout "${CMP[@]}" --deflate --check 'client_inflated>0'
stop_gateway "$GW_PID"

# ------------------------------------------------------------------ idle

start_gateway idle
bench idle-1k idle --url "ws://127.0.0.1:$GW_PORT/ws" --pid "$GW_PID" --redis "$REDIS_URL" \
    --subscribers 1000 --duration-secs 3 --check 'rss_per_socket_bytes<=8192'
stop_gateway "$GW_PID"

# 100k sockets: the fd limit is 20,000 per process here, so IDLE_PAIRS pairs of
# (gateway, bench) processes each hold IDLE_PER sockets at the same time.
if ! skipped idle-100k; then
    log "idle-100k: $IDLE_PAIRS pairs x $IDLE_PER sockets"
    PAIR_GW=()
    PAIR_BENCH=()
    PAIR_PORTS=()
    for i in $(seq 1 "$IDLE_PAIRS"); do
        start_gateway "idle-pair-$i"
        PAIR_GW+=("$GW_PID")
        PAIR_PORTS+=("$GW_PORT")
    done
    HOLD=$((IDLE_PER / 1000 + 15))
    for i in $(seq 1 "$IDLE_PAIRS"); do
        port=${PAIR_PORTS[$((i - 1))]}
        pid=${PAIR_GW[$((i - 1))]}
        args=(idle --url "ws://127.0.0.1:$port/ws" --pid "$pid" --redis "$REDIS_URL"
            --subscribers "$IDLE_PER" --duration-secs "$HOLD" --sources 50 --source-offset $((i * 50))
            --max-secs 180 --label "idle-100k-pair-$i" --check 'rss_per_socket_bytes<=8192')
        { printf 'wsgate-bench'; printf ' %q' "${args[@]}"; echo "   # pair $i, in parallel"; } >>"$COMMANDS"
        "$BENCH" "${args[@]}" >"$WORK/idle-pair-$i.json" 2>"$WORK/idle-100k-pair-$i.err" &
        PAIR_BENCH+=($!)
        PIDS+=($!)
    done
    # The simultaneous total, from the gateways' own gauges.
    PEAK=0
    for _ in $(seq 1 $((HOLD + 60))); do
        sum=0
        for port in "${PAIR_PORTS[@]}"; do
            n=$(curl -fsS "http://127.0.0.1:$port/metrics" 2>/dev/null | awk '$1=="wsgate_connections"{print $2}')
            sum=$((sum + ${n:-0}))
        done
        ((sum > PEAK)) && PEAK=$sum
        alive=0
        for pid in "${PAIR_BENCH[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive == 0)) && break
        sleep 1
    done
    for pid in "${PAIR_BENCH[@]}"; do wait "$pid" 2>/dev/null || true; done
    cat "$WORK"/idle-pair-*.json >>"$RESULTS"
    for i in $(seq 1 "$IDLE_PAIRS"); do sed 's/^/    /' "$WORK/idle-100k-pair-$i.err" >&2; done
    # One summary line over the pairs.
    jq -cs --argjson peak "$PEAK" --argjson pairs "$IDLE_PAIRS" --argjson per "$IDLE_PER" '
        [.[] | select(.label|startswith("idle-100k-pair-")) | select(.results)] as $p
        | ($p | map(.results.sockets) | add // 0) as $sockets
        | ($p | map(.results.rss_per_socket_bytes * .results.sockets) | add // 0) as $w
        | (if $sockets > 0 then ($w / $sockets | round) else null end) as $rss
        | {workload: "idle", label: "idle-100k",
           results: {pairs: $pairs, sockets_per_pair: $per, sockets: $sockets,
                     peak_simultaneous: $peak, rss_per_socket_bytes: $rss},
           checks: [{check: "peak_simultaneous>=100000", value: $peak, met: ($peak >= 100000)},
                    {check: "rss_per_socket_bytes<=8192", value: $rss, met: ($rss != null and $rss <= 8192)}],
           summary: "\($pairs) gateway+bench process pairs (fd limit 20,000 per process), \($per) sockets each: \($sockets) subscribed, \($peak) open at once (sum of wsgate_connections); gateway RSS \($rss) B per socket (weighted mean over pairs)"}' \
        "$RESULTS" >>"$RESULTS"
    for pid in "${PAIR_GW[@]}"; do stop_gateway "$pid"; done
fi

# ------------------------------------------------------------------ churn

start_gateway churn WSGATE_SUBSCRIBE_RATE=1000000 WSGATE_MAX_PATTERNS_PER_CONNECTION=100000 \
    WSGATE_MAX_PATTERNS=1000000 WSGATE_MAX_REDIS_PATTERNS=1000000
CHURN=(--url "ws://127.0.0.1:$GW_PORT/ws" --pid "$GW_PID" --redis "$REDIS_URL")
bench churn-channels churn "${CHURN[@]}" --connections 100 --window 32 --duration-secs $CHURN_D \
    --topic-kind channel --check 'ops_per_sec>=50000'
bench churn-patterns churn "${CHURN[@]}" --connections 100 --window 32 --duration-secs $CHURN_D \
    --topic-kind pattern --check 'ops_per_sec>=50000'
stop_gateway "$GW_PID"

# ------------------------------------------------------------------ resync

start_gateway resync WSGATE_SUBSCRIBE_RATE=1000000 WSGATE_SUBSCRIBE_TIMEOUT_MS=600000 \
    WSGATE_MAX_PATTERNS_PER_CONNECTION=100000 WSGATE_MAX_PATTERNS=1000000 WSGATE_MAX_REDIS_PATTERNS=1000000
RS=(--url "ws://127.0.0.1:$GW_PORT/ws" --pid "$GW_PID" --redis "$REDIS_URL")
bench resync-1k resync "${RS[@]}" --patterns 1000 --restart-redis "$RESTART_REDIS" --check 'resync_ms<=1000'
bench resync-100k-channels resync "${RS[@]}" --patterns $RESYNC_BIG --topic-kind channel \
    --restart-redis "$RESTART_REDIS" --check 'resync_ms<=1000'
bench resync-100k-patterns resync "${RS[@]}" --patterns $RESYNC_BIG --restart-redis "$RESTART_REDIS" \
    --subscribe-timeout-secs 240 --max-secs 300 --check 'resync_ms<=1000'
stop_gateway "$GW_PID"

# ------------------------------------------------------------------ join storm, outage

# Each on a freshly started gateway: wsgate_hub_lock_hold_max_seconds is the
# longest hold since start, so it covers the connect phase too; the bench also
# reports the holds of the measured phase alone (histogram delta).
start_gateway joinstorm WSGATE_SUBSCRIBE_RATE=1000000
bench joinstorm-10k joinstorm --url "ws://127.0.0.1:$GW_PORT/ws" --pid "$GW_PID" --redis "$REDIS_URL" \
    --subscribers $STORM --sources 100 --max-secs 120 \
    --check "acks>=$STORM" --check 'total_secs<=0.2' --check 'lock_hold_max_us<=50'
stop_gateway "$GW_PID"
start_gateway outage WSGATE_SUBSCRIBE_RATE=1000000 WSGATE_MAX_SUBSCRIPTIONS=256 \
    WSGATE_SUBSCRIBE_TIMEOUT_MS=600000
bench outage-10k-256 outage --url "ws://127.0.0.1:$GW_PORT/ws" --pid "$GW_PID" --redis "$REDIS_URL" \
    --subscribers $STORM --topics 256 --sources 100 --subscribe-timeout-secs 240 --max-secs 300 \
    --check 'interrupted_max_ms<=100' --check 'phase_holds_over_1ms==0' \
    --check "resumed_clients>=$STORM"
stop_gateway "$GW_PID"

LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ------------------------------------------------------------------ the document

log "writing $OUT"
cpu_model=$(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)
mem_total=$(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo)
notes=
sections=
if [[ -f $OUT ]]; then
    notes=$(awk '/<!-- notes:begin -->/{on=1; next} /<!-- notes:end -->/{on=0} on' "$OUT")
    # The sections other scripts write (bench-baseline.sh, bench-calls.sh,
    # bench-dialects.sh, hand-run tables) live between these marks; kept too.
    sections=$(awk '/<!-- sections:begin -->/{on=1; next} /<!-- sections:end -->/{on=0} on' "$OUT")
fi
{
    cat <<EOF
# Benchmarks

Generated by \`scripts/bench.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'). Rerun it to refresh
this file (the *Notes* section and the sections between the \`sections\` marks are kept).
Raw JSON lines are at the end.

## Machine

| | |
| --- | --- |
| CPU | $cpu_model, $(nproc) cores (\`nproc\`) |
| memory | $mem_total |
| kernel | $(uname -r) |
| rustc | $(rustc --version) |
| redis-server | $(redis-server --version | awk '{print $3}' | sed 's/v=//') |
| fd limit per process | $(ulimit -Sn) soft / $(ulimit -Hn) hard |
| load average (1, 5, 15 min) | $LOAD_START at start, $LOAD_END at the end |

Everything runs on this one machine over loopback: the gateway(s), Redis and the
load client share the same $(nproc) cores, so a delivery's cost shows up twice
(the gateway writes it, the client reads it) and latency includes the client's
own queueing. The load client's CPU is reported next to the gateway's
(\`bench_cpu_us_per_delivery\`; it includes the publisher). Gateway CPU is
utime+stime from \`/proc/<pid>/stat\` (clock ticks of $(getconf CLK_TCK) Hz, so a
run needs a few seconds of CPU to be precise); RSS is \`VmRSS\`. Loss is exact:
every socket counts what it received, against subscribers x messages published.
Latency is receive time minus the send time written into each payload by the
publisher (same clock), so it includes Redis and the client's queueing.
**If the load average above is well over 0, other work shared the cores and the
numbers are pessimistic.**

## Results

EOF
    "$BENCH" table "$RESULTS"
    cat <<EOF

*load*: the 1-minute load average when the run started (2 cores). *targets*: the
issue's targets, checked by the bench on its own results (\`--check\`).

100k sockets: one process may hold at most ~19,900 sockets here (hard fd limit
20,000), so that figure comes from several (gateway, load client) process pairs
started together, each pair with its own sockets; "open at once" sums the
gateways' \`wsgate_connections\` sampled every second.

Redis here is $(redis-server --version | awk '{print $3}' | sed 's/v=//'): before 7.2 a client's pattern set is a list, so each
\`PSUBSCRIBE\`/\`PUNSUBSCRIBE\` of one pattern costs O(patterns that connection
already holds) (redis/redis#12298 made it a dict in 7.2). With every pattern on one
pub/sub connection, resubscribing P patterns costs O(P²) in Redis: compare
\`resync-100k\` (patterns) with \`resync-100k-channels\`.

<!-- sections:begin -->
${sections}
<!-- sections:end -->

## Exact commands

Ports are picked at random per run; \`scripts/bench.sh\` is the reference.

\`\`\`
$REDIS_START
$(cat "$COMMANDS")
\`\`\`

Restart command given to the resync runs:

\`\`\`
$RESTART_REDIS
\`\`\`

## Profile of the fan-out path

$(cat "$PROFILE")

## Notes

<!-- notes:begin -->
${notes:-
(Hand-written observations go here; scripts/bench.sh keeps this section.)
}
<!-- notes:end -->

## Raw results

<details><summary>JSON lines, one per run</summary>

\`\`\`
$(cat "$RESULTS")
\`\`\`

</details>
EOF
} >"$OUT.tmp"
mv "$OUT.tmp" "$OUT"
log "done: $OUT"
