#!/usr/bin/env bash
# Every dialect against the native protocol, in one run on one gateway:
# `wsgate-bench fanout --dialect D --topic-kind channel` at 100k deliveries/s
# (1,000 subscribers of one channel x 100 msg/s, 10 s) for native, bayeux,
# realizehit, roadrunner, socketstream and sse, in three rounds (the second
# in reverse order, so a drift over the gateway's life favours no dialect).
# Prints the JSON result lines and a table; the ratios go to docs/benchmarks.md.
#
#   scripts/bench-dialects.sh                 # ~3 minutes
#   DIALECT_ROUNDS=1 DIALECT_SECS=5 scripts/bench-dialects.sh   # smoke test
#
# It starts its own redis-server and gateway on free loopback ports (never
# 6379 or 8080) and stops them; every run has --max-secs, the whole is
# bounded by DIALECT_MAX_SECS (default 900).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
ROUNDS=${DIALECT_ROUNDS:-3}
SECS=${DIALECT_SECS:-10}
SUBS=${DIALECT_SUBSCRIBERS:-1000}
RATE=${DIALECT_RATE:-100}
SUITE_MAX=${DIALECT_MAX_SECS:-900}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wsgate-dialects.XXXXXX")
RESULTS=$WORK/results.jsonl
GW=$ROOT/target/release/wsgate
BENCH=$ROOT/target/release/wsgate-bench
: >"$RESULTS"
PIDS=()

log() { printf '[dialects %s] %s\n' "$(date +%T)" "$*" >&2; }

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

GWP=$(free_port)
ulimit -n 20000
WSGATE_LISTEN=127.0.0.1:$GWP WSGATE_REDIS_URL=redis://127.0.0.1:$RP WSGATE_LOG=warn \
    "$GW" >"$WORK/gateway.log" 2>&1 &
GW_PID=$!
PIDS+=("$GW_PID")
until curl -sf "http://127.0.0.1:$GWP/readyz" >/dev/null 2>&1; do sleep 0.05; done
log "redis :$RP, gateway :$GWP (pid $GW_PID), $(git rev-parse --short HEAD)"

url() {
    case $1 in
        native) echo "ws://127.0.0.1:$GWP/ws" ;;
        bayeux) echo "ws://127.0.0.1:$GWP/bayeux" ;;
        realizehit) echo "ws://127.0.0.1:$GWP/ws/?EIO=3&transport=websocket" ;;
        roadrunner) echo "ws://127.0.0.1:$GWP/roadrunner" ;;
        socketstream) echo "ws://127.0.0.1:$GWP/socketstream" ;;
        sse) echo "http://127.0.0.1:$GWP/sse" ;;
    esac
}

DIALECTS=(native bayeux realizehit roadrunner socketstream sse)
for round in $(seq 1 "$ROUNDS"); do
    order=("${DIALECTS[@]}")
    if (( round % 2 == 0 )); then
        order=(); for (( i=${#DIALECTS[@]}-1; i>=0; i-- )); do order+=("${DIALECTS[$i]}"); done
    fi
    for d in "${order[@]}"; do
        log "round $round: $d"
        "$BENCH" fanout --dialect "$d" --topic-kind channel --url "$(url "$d")" --pid "$GW_PID" \
            --redis "redis://127.0.0.1:$RP" --subscribers "$SUBS" --rate "$RATE" \
            --duration-secs "$SECS" --max-secs $((SECS * 4 + 30)) \
            --label "fanout-$d-r$round" >>"$RESULTS" 2>>"$WORK/bench.log" || log "$d round $round failed"
    done
done
"$BENCH" table "$RESULTS"
cp "$RESULTS" "${DIALECT_OUT:-$WORK/results.jsonl}" 2>/dev/null || true
log "results: $RESULTS"
