#!/usr/bin/env bash
# wsgate against the reference fan-out server (`wsgate-bench baseline`, issue 13),
# alternating in one run, so that every figure comes with its ratio to the
# reference measured minutes apart on the same machine (absolute numbers drift
# by 20% between runs here; ratios do not).
#
#   scripts/bench-baseline.sh                   # ~6 minutes
#   BASELINE_ROUNDS=3 scripts/bench-baseline.sh # more rounds (order alternates per round)
#   BASELINE_D=3 scripts/bench-baseline.sh      # shorter fan-out runs (seconds)
#   BASELINE_PERF=1 scripts/bench-baseline.sh   # also perf record -g of wsgate at 100k/s
#   BASELINE_ENV='WSGATE_DIRECT_WRITES=off' scripts/bench-baseline.sh  # extra wsgate settings
#
# Runs, each against both servers: fanout of 1,000 subscribers of one pattern at
# 100k, 450k, 2M and 4M deliveries/s; one message at a time to 10,000 subscribers
# (arrival spread); 10,000 idle subscribed sockets on fresh processes (RSS per
# socket). Prints a markdown table of the figures and ratios (wsgate / reference)
# and keeps the raw JSON lines in its work directory. It starts its own
# redis-server on a free port (never 6379) and stops everything it started.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
ROUNDS=${BASELINE_ROUNDS:-2}
D=${BASELINE_D:-5}
PERF=${BASELINE_PERF:-0}
read -r -a EXTRA_ENV <<<"${BASELINE_ENV:-}"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
GW=$TARGET/release/wsgate
BENCH=$TARGET/release/wsgate-bench
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wsgate-baseline.XXXXXX")
RESULTS=$WORK/results.jsonl
COMMANDS=$WORK/commands.txt
: >"$RESULTS"
: >"$COMMANDS"
PIDS=()
REDIS_PIDFILE=$WORK/redis.pid

log() { printf '[baseline %s] %s\n' "$(date +%T)" "$*" >&2; }

cleanup() {
    local status=$?
    set +e
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do kill -INT "$pid" 2>/dev/null; done
    sleep 0.5
    for pid in "${PIDS[@]}"; do
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    [[ -s $REDIS_PIDFILE ]] && kill -KILL "$(cat "$REDIS_PIDFILE")" 2>/dev/null
    log "logs and raw results kept in $WORK"
    exit "$status"
}
trap cleanup EXIT INT TERM

# shellcheck source=scripts/lib.sh
. scripts/lib.sh

wait_port() {
    for _ in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    log "nothing listens on $1"
    return 1
}

stop_pid() {
    kill -INT "$1" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$1" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

log "building release binaries"
cargo build --release --bin wsgate --bin wsgate-bench 2>&1 | tail -n 2 >&2
ulimit -Sn "$(ulimit -Hn)" 2>/dev/null || true
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

RPORT=$(free_port)
REDIS_URL=redis://127.0.0.1:$RPORT
redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --pidfile "$REDIS_PIDFILE" --dir "$WORK" --logfile "$WORK/redis.log"
for _ in $(seq 1 200); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
echo "redis-server --port $RPORT --bind 127.0.0.1 --save '' --appendonly no" >>"$COMMANDS"

# start_servers TAG: a fresh wsgate and a fresh reference server; sets
# WS_URL/WS_PID and REF_URL/REF_PID.
start_servers() {
    local tag=$1 port
    port=$(free_port)
    env WSGATE_LISTEN="127.0.0.1:$port" WSGATE_REDIS_URL="$REDIS_URL" WSGATE_LOG=warn \
        "${EXTRA_ENV[@]}" "$GW" >"$WORK/wsgate-$tag.log" 2>&1 &
    WS_PID=$!
    PIDS+=("$WS_PID")
    WS_URL=ws://127.0.0.1:$port/ws
    echo "# $tag: WSGATE_LISTEN=127.0.0.1:$port WSGATE_REDIS_URL=$REDIS_URL WSGATE_LOG=warn ${EXTRA_ENV[*]} wsgate" >>"$COMMANDS"
    for _ in $(seq 1 200); do
        curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
        sleep 0.05
    done
    port=$(free_port)
    "$BENCH" baseline --listen "127.0.0.1:$port" --redis "$REDIS_URL" >"$WORK/reference-$tag.log" 2>&1 &
    REF_PID=$!
    PIDS+=("$REF_PID")
    REF_URL=ws://127.0.0.1:$port/ws
    echo "# $tag: wsgate-bench baseline --listen 127.0.0.1:$port --redis $REDIS_URL" >>"$COMMANDS"
    wait_port "$port"
}

# run LABEL SERVER(wsgate|reference) ARGS...
run() {
    local label=$1 server=$2
    shift 2
    local url=$WS_URL pid=$WS_PID
    [[ $server == reference ]] && url=$REF_URL pid=$REF_PID
    log "run $label ($server)"
    { printf 'wsgate-bench'; printf ' %q' "$@" --url "$url" --pid "$pid" --label "$label"; echo; } >>"$COMMANDS"
    timeout 300 "$BENCH" "$@" --url "$url" --pid "$pid" --redis "$REDIS_URL" --label "$label" \
        >>"$RESULTS" 2>"$WORK/$label.err" || log "$label failed (exit $?)"
    sed 's/^/    /' "$WORK/$label.err" >&2
}

start_servers fanout
for r in $(seq 1 "$ROUNDS"); do
    order=(wsgate reference)
    ((r % 2 == 0)) && order=(reference wsgate)
    for rate in 100 450 2000 4000; do
        for s in "${order[@]}"; do
            run "fanout-${rate}-$s-r$r" "$s" fanout --subscribers 1000 --rate "$rate" --duration-secs "$D"
        done
    done
done
for s in wsgate reference; do
    run "spread-10k-$s" "$s" spread --subscribers 10000 --rate 5 --messages 20 --sources 100 \
        --subscribe-timeout-secs 60 --max-secs 120
done

PROFILE=$WORK/profile.txt
: >"$PROFILE"
if [[ $PERF == 1 ]] && perf stat -e cpu-clock true >/dev/null 2>&1; then
    log "perf record -g on wsgate during a 100k deliveries/s fan-out"
    perf record -e cpu-clock -F 999 -g -p "$WS_PID" -o "$WORK/perf.data" -- sleep $((D + 2)) \
        >"$WORK/perf-record.log" 2>&1 &
    PERF_PID=$!
    PIDS+=("$PERF_PID")
    sleep 0.5
    run "profile-fanout-100-wsgate" wsgate fanout --subscribers 1000 --rate 100 --duration-secs "$D"
    wait "$PERF_PID" 2>/dev/null || true
    echo "perf record -e cpu-clock -F 999 -g -p <wsgate pid> -- sleep $((D + 2))" >>"$COMMANDS"
    log "perf record -g on wsgate during the 10,000-subscriber spread run"
    perf record -e cpu-clock -F 999 -g -p "$WS_PID" -o "$WORK/perf-spread.data" -- sleep 12 \
        >"$WORK/perf-record-spread.log" 2>&1 &
    PERF_PID=$!
    PIDS+=("$PERF_PID")
    sleep 0.5
    run "profile-spread-10k-wsgate" wsgate spread --subscribers 10000 --rate 5 --messages 20 \
        --sources 100 --subscribe-timeout-secs 60 --max-secs 120
    wait "$PERF_PID" 2>/dev/null || true
    for data in perf perf-spread; do
        {
            echo "### $data: self time by binary"
            perf report -i "$WORK/$data.data" --stdio --no-children --sort dso 2>/dev/null |
                grep -E '^ +[0-9]' | sed -n '1,6p'
            echo "### $data: top functions by self time"
            perf report -i "$WORK/$data.data" --stdio --no-children --sort dso,sym -g none 2>/dev/null |
                grep -E '^ +[0-9]' | sed -n '1,25p' | cut -c1-150
        } >>"$PROFILE"
    done
fi
stop_pid "$WS_PID"
stop_pid "$REF_PID"

# Idle memory: fresh processes, so the RSS growth is the sockets' own.
start_servers idle
for s in wsgate reference; do
    run "idle-10k-$s" "$s" idle --subscribers 10000 --duration-secs 3 --sources 100 \
        --subscribe-timeout-secs 60 --max-secs 120
done
stop_pid "$WS_PID"
stop_pid "$REF_PID"
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ------------------------------------------------------------------ summary

SUMMARY=$WORK/summary.md
jq -rs --arg load "$LOAD_START -> $LOAD_END" '
  def r(k): .results[k];
  def fmt(d): if . == null then "-" else (. * pow(10; d) | round / pow(10; d) | tostring) end;
  def ratio(a; b): if a == null or b == null or b == 0 then null else a / b end;
  def rate_h: if . >= 1000 then "\(. / 1000)M" else "\(.)k" end;
  def mean: if length == 0 then null else add / length end;
  [.[] | select(.results)] as $all
  | def get($lb): ($all | map(select(.label == $lb)) | first);
  ($all | map(.label | capture("^fanout-(?<rate>[0-9]+)-(?<s>[a-z]+)-r(?<r>[0-9]+)$")?) ) as $keys
  | ($keys | map(.rate) | unique | map(tonumber) | sort) as $rates
  | ($keys | map(.r) | unique) as $rounds
  | "Load average \($load).\n",
    "| deliveries/s | round | wsgate µs CPU/delivery | reference | ratio | wsgate p99 ms | reference p99 ms | ratio | wsgate lost | reference lost | wsgate delivered/s | reference delivered/s |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ($rates[] as $rate | ($rounds[] as $n
      | get("fanout-\($rate)-wsgate-r\($n)") as $w | get("fanout-\($rate)-reference-r\($n)") as $b
      | select($w != null and $b != null)
      | "| \($rate | rate_h) | \($n) | \($w | r("gateway_cpu_us_per_delivery") | fmt(3)) | \($b | r("gateway_cpu_us_per_delivery") | fmt(3)) | \(ratio($w | r("gateway_cpu_us_per_delivery"); $b | r("gateway_cpu_us_per_delivery")) | fmt(2))x | \($w | r("p99_ms") | fmt(2)) | \($b | r("p99_ms") | fmt(2)) | \(ratio($w | r("p99_ms"); $b | r("p99_ms")) | fmt(2))x | \($w | r("lost")) | \($b | r("lost")) | \($w | r("deliveries_per_sec")) | \($b | r("deliveries_per_sec")) |"),
      ([$rounds[] as $n | get("fanout-\($rate)-wsgate-r\($n)") as $w | get("fanout-\($rate)-reference-r\($n)") as $b
        | select($w != null and $b != null)
        | [ratio($w | r("gateway_cpu_us_per_delivery"); $b | r("gateway_cpu_us_per_delivery")),
           ratio($w | r("p99_ms"); $b | r("p99_ms"))]] as $rs
      | "| \($rate | rate_h) | mean | | | **\($rs | map(.[0] | select(. != null)) | mean | fmt(2))x** | | | **\($rs | map(.[1] | select(. != null)) | mean | fmt(2))x** | | | | |")),
    "",
    (get("spread-10k-wsgate") as $w | get("spread-10k-reference") as $b
      | "| one message to 10,000 subscribers | wsgate | reference | ratio |",
        "| --- | --- | --- | --- |",
        "| arrival spread p50 ms | \($w | r("spread_p50_ms") | fmt(2)) | \($b | r("spread_p50_ms") | fmt(2)) | \(ratio($w | r("spread_p50_ms"); $b | r("spread_p50_ms")) | fmt(2))x |",
        "| arrival spread p99 ms | \($w | r("spread_p99_ms") | fmt(2)) | \($b | r("spread_p99_ms") | fmt(2)) | **\(ratio($w | r("spread_p99_ms"); $b | r("spread_p99_ms")) | fmt(2))x** |",
        "| span (last - first) p50 ms | \($w | r("span_p50_ms") | fmt(2)) | \($b | r("span_p50_ms") | fmt(2)) | \(ratio($w | r("span_p50_ms"); $b | r("span_p50_ms")) | fmt(2))x |",
        "| µs CPU/delivery | \($w | r("gateway_cpu_us_per_delivery") | fmt(3)) | \($b | r("gateway_cpu_us_per_delivery") | fmt(3)) | \(ratio($w | r("gateway_cpu_us_per_delivery"); $b | r("gateway_cpu_us_per_delivery")) | fmt(2))x |",
        "| lost | \($w | r("lost")) | \($b | r("lost")) | |"),
    "",
    (get("idle-10k-wsgate") as $w | get("idle-10k-reference") as $b
      | "| 10,000 idle subscribed sockets | wsgate | reference | ratio |",
        "| --- | --- | --- | --- |",
        "| RSS per socket, bytes | \($w | r("rss_per_socket_bytes")) | \($b | r("rss_per_socket_bytes")) | \(ratio($w | r("rss_per_socket_bytes"); $b | r("rss_per_socket_bytes")) | fmt(2))x |",
        "| sockets subscribed | \($w | r("subscribed")) | \($b | r("subscribed")) | |")
' "$RESULTS" >"$SUMMARY"
{
    echo
    echo '```'
    cat "$COMMANDS"
    echo '```'
    if [[ -s $PROFILE ]]; then
        echo
        echo '```'
        cat "$PROFILE"
        echo '```'
    fi
} >>"$SUMMARY"
cat "$SUMMARY"
