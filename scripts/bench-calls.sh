#!/usr/bin/env bash
# Calls across two nodes (issue 12): `wsgate-bench calls` with one echo
# instance of service `bench` on gateway A and native callers on gateway B,
# both on one Redis:
#   - calls-10k: 10,000 calls/s offered for 10 s, and the direct Redis round
#     trip (PUBLISH, an echo subscriber PUBLISHing back) at the same rate and
#     duration right before it; targets p99 <= 3x the direct p99, no errors;
#   - calls-10k-concurrent: the same, the direct round trip measured at the
#     same time as the calls (both under the same load);
#   - calls-max: every caller keeps its window full for 10 s; target >= 20,000
#     calls/s through the node pair.
# Prints the JSON result lines and a table; the figures go to docs/benchmarks.md.
#
#   scripts/bench-calls.sh                          # ~1 minute
#   CALLS_ROUNDS=3 scripts/bench-calls.sh           # three rounds of both
#   CALLS_SECS=3 scripts/bench-calls.sh             # smoke test
#   CALLS_PERF=1 scripts/bench-calls.sh             # also perf-record both gateways
#                                                   # during a third, profiled run
#
# It starts its own redis-server and two gateways on free loopback ports
# (never 6379 or 8080) and stops them; every run has --max-secs, the whole
# is bounded by CALLS_MAX_SECS (default 900).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
ROUNDS=${CALLS_ROUNDS:-1}
SECS=${CALLS_SECS:-10}
RATE=${CALLS_RATE:-10000}
CALLERS=${CALLS_CALLERS:-8}
WINDOW=${CALLS_WINDOW:-32}
SUITE_MAX=${CALLS_MAX_SECS:-900}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wsgate-calls.XXXXXX")
RESULTS=$WORK/results.jsonl
GW=$ROOT/target/release/wsgate
BENCH=$ROOT/target/release/wsgate-bench
: >"$RESULTS"
PIDS=()

log() { printf '[calls %s] %s\n' "$(date +%T)" "$*" >&2; }

cleanup() {
    local status=$?
    set +e
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
    [[ -s $WORK/redis.pid ]] && kill -KILL "$(cat "$WORK/redis.pid")" 2>/dev/null
    log "logs and raw results kept in $WORK"
    exit "$status"
}
trap cleanup EXIT INT TERM
( sleep "$SUITE_MAX"; log "exceeded ${SUITE_MAX}s: stopping"; kill -TERM $$ ) 2>/dev/null &
PIDS+=($!)

# shellcheck source=scripts/lib.sh
. scripts/lib.sh

[[ -x $GW && -x $BENCH ]] || cargo build --release --bins
RP=$(free_port)
redis-server --port "$RP" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --pidfile "$WORK/redis.pid" --dir "$WORK" --logfile "$WORK/redis.log"
until redis-cli -p "$RP" ping >/dev/null 2>&1; do sleep 0.05; done

# The service key is handed to the bench through the environment, not argv.
export WSGATE_SERVICE_KEY
WSGATE_SERVICE_KEY=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
ulimit -n 20000
start_gateway() { # name -> GW_PORT, GW_PID
    GW_PORT=$(free_port)
    WSGATE_LISTEN=127.0.0.1:$GW_PORT WSGATE_REDIS_URL=redis://127.0.0.1:$RP WSGATE_LOG=warn \
        WSGATE_NODE_ID="bench-$1" WSGATE_CALL_ALLOW='bench:echo' \
        "$GW" >"$WORK/gateway-$1.log" 2>&1 &
    GW_PID=$!
    PIDS+=("$GW_PID")
    for _ in $(seq 1 200); do
        curl -sf "http://127.0.0.1:$GW_PORT/readyz" >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    log "gateway $1 did not become ready"; return 1
}
start_gateway a; A_PORT=$GW_PORT; A_PID=$GW_PID
start_gateway b; B_PORT=$GW_PORT; B_PID=$GW_PID
log "redis :$RP, gateway A :$A_PORT (pid $A_PID), B :$B_PORT (pid $B_PID), $(git rev-parse --short HEAD)"

COMMON=(--url "ws://127.0.0.1:$B_PORT/ws" --pid "$B_PID"
    --service-url "ws://127.0.0.1:$A_PORT/services" --service-pid "$A_PID"
    --redis "redis://127.0.0.1:$RP" --callers "$CALLERS" --window "$WINDOW"
    --duration-secs "$SECS" --max-secs $((SECS * 3 + 40)))

run() { # label, extra args...
    local label=$1; shift
    log "$label"
    { printf 'wsgate-bench calls'; printf ' %q' "${COMMON[@]}" "$@" --label "$label"; echo; } >>"$WORK/commands.txt"
    "$BENCH" calls "${COMMON[@]}" "$@" --label "$label" >>"$RESULTS" 2>>"$WORK/bench.log" ||
        log "$label failed (see $WORK/bench.log)"
}

for round in $(seq 1 "$ROUNDS"); do
    run "calls-10k-r$round" --rate "$RATE" --check 'p99_ratio<=3' --check 'failed_calls==0'
    run "calls-10k-concurrent-r$round" --rate "$RATE" --direct concurrent \
        --check 'p99_ratio<=3' --check 'failed_calls==0'
    run "calls-max-r$round" --rate max --check 'calls_per_sec>=20000' --check 'failed_calls==0'
done

if [[ ${CALLS_PERF:-0} == 1 ]]; then
    for mode in 10k max; do
        rate=$RATE; [[ $mode == max ]] && rate=max
        # Both gateways, from 1 s into the run for SECS-2 s.
        perf record -e cpu-clock -F 999 -g -o "$WORK/perf-$mode-a.data" -p "$A_PID" \
            -- sleep $((SECS - 2)) >/dev/null 2>&1 &
        pa=$!
        perf record -e cpu-clock -F 999 -g -o "$WORK/perf-$mode-b.data" -p "$B_PID" \
            -- sleep $((SECS - 2)) >/dev/null 2>&1 &
        pb=$!
        run "profile-calls-$mode" --rate "$rate" --direct off
        wait "$pa" "$pb" || true
        for n in a b; do
            {
                perf report -i "$WORK/perf-$mode-$n.data" --no-children --sort dso --stdio -g none
                perf report -i "$WORK/perf-$mode-$n.data" --no-children --sort symbol --stdio -g none
                perf report -i "$WORK/perf-$mode-$n.data" --children --sort symbol --stdio -g none
            } 2>/dev/null | grep -v '^#' | grep '%' | awk 'NR<=8 || /\[k\]|\[\.\]/' |
                head -120 | cut -c1-160 >"$WORK/perf-$mode-$n.txt" || true
        done
    done
    log "profiles: $WORK/perf-*.txt"
fi

"$BENCH" table "$RESULTS"
cp "$RESULTS" "${CALLS_OUT:-$WORK/results.jsonl}" 2>/dev/null || true
log "results: $RESULTS"
