#!/usr/bin/env bash
# History's cost and recovery time (issue 14): `wsgate-bench history` on one
# release gateway over its own redis-server.
#   1. POST /publish rate to a history channel vs a channel without history
#      (HISTORY_PUBLISHERS keep-alive connections, HISTORY_SECS each);
#   2. HISTORY_CLIENTS clients subscribe to a history channel and take their
#      offset, the gateway is restarted (SIGTERM, then a new process on the
#      same port), HISTORY_MISSED messages are published, and every client
#      reconnects with `since`: time until all have all of them, checked in
#      order and exactly once.
# Prints the JSON result line and a table; the figures go to
# docs/benchmarks.md ("History (issue 14)") and docs/history.md (Limits).
#
#   scripts/bench-history.sh                                  # ~1 minute
#   HISTORY_SECS=2 HISTORY_CLIENTS=200 scripts/bench-history.sh   # smoke test
#
# Binaries: $HISTORY_BIN_DIR (default $CARGO_TARGET_DIR/release, else
# target/release), built with `cargo build --release --bin wsgate --bin
# wsgate-bench` when missing. It starts its own redis-server and gateway on
# free loopback ports (never 6379 or 8080) and stops them; the run has
# --max-secs and the whole script is bounded by HISTORY_MAX_SECS (300).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
SECS=${HISTORY_SECS:-5}
PUBLISHERS=${HISTORY_PUBLISHERS:-32}
CLIENTS=${HISTORY_CLIENTS:-1000}
MISSED=${HISTORY_MISSED:-100}
SUITE_MAX=${HISTORY_MAX_SECS:-300}
BIN=${HISTORY_BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
GW=$BIN/wsgate
BENCH=$BIN/wsgate-bench
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wsgate-history.XXXXXX")
RESULTS=$WORK/results.jsonl
: >"$RESULTS"
PIDS=()

log() { printf '[history %s] %s\n' "$(date +%T)" "$*" >&2; }

cleanup() {
    local status=$?
    set +e
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
    [[ -s $WORK/gateway.pid ]] && kill -KILL "$(cat "$WORK/gateway.pid")" 2>/dev/null
    [[ -s $WORK/redis.pid ]] && kill -KILL "$(cat "$WORK/redis.pid")" 2>/dev/null
    log "logs and raw results kept in $WORK"
    exit "$status"
}
trap cleanup EXIT INT TERM
# The watchdog's sleep holds no inherited output: killing the subshell at the
# end must not leave a sleep keeping a caller's pipe open for SUITE_MAX.
( sleep "$SUITE_MAX" </dev/null >/dev/null 2>&1; log "exceeded ${SUITE_MAX}s: stopping"; kill -TERM $$ ) &
PIDS+=($!)

free_port() {
    local p
    for _ in $(seq 1 200); do
        p=$((20000 + RANDOM % 12000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return 0; fi
    done
    return 1
}

[[ -x $GW && -x $BENCH ]] || cargo build --release --bin wsgate --bin wsgate-bench
RP=$(free_port)
redis-server --port "$RP" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --pidfile "$WORK/redis.pid" --dir "$WORK" --logfile "$WORK/redis.log"
for _ in $(seq 1 200); do redis-cli -p "$RP" ping >/dev/null 2>&1 && break; sleep 0.05; done

GWP=$(free_port)
ulimit -n 20000
# The gateway's environment, and a command that starts it in the background
# (its pid in gateway.pid): the restart the bench runs between parts uses it too.
cat >"$WORK/start.sh" <<START
#!/usr/bin/env bash
ulimit -n 20000
WSGATE_LISTEN=127.0.0.1:$GWP WSGATE_REDIS_URL=redis://127.0.0.1:$RP WSGATE_LOG=warn \\
WSGATE_HISTORY='hist.*:1000:600s' WSGATE_DRAIN_WINDOW_MS=100 \\
    nohup "$GW" >>"$WORK/gateway.log" 2>&1 </dev/null &
echo \$! >"$WORK/gateway.pid"
START
cat >"$WORK/restart.sh" <<RESTART
#!/usr/bin/env bash
old=\$(cat "$WORK/gateway.pid")
kill -TERM "\$old" 2>/dev/null
for _ in \$(seq 1 200); do kill -0 "\$old" 2>/dev/null || break; sleep 0.05; done
kill -KILL "\$old" 2>/dev/null
"$WORK/start.sh"
RESTART
chmod +x "$WORK/start.sh" "$WORK/restart.sh"
"$WORK/start.sh"
for _ in $(seq 1 200); do curl -sf "http://127.0.0.1:$GWP/readyz" >/dev/null 2>&1 && break; sleep 0.05; done
GW_PID=$(cat "$WORK/gateway.pid")
log "redis :$RP, gateway :$GWP (pid $GW_PID), $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

"$BENCH" history --url "ws://127.0.0.1:$GWP/ws" --pid "$GW_PID" \
    --history-channel hist.bench --plain-channel plain.bench \
    --publishers "$PUBLISHERS" --duration-secs "$SECS" \
    --subscribers "$CLIENTS" --messages "$MISSED" \
    --restart-gateway "$WORK/restart.sh" \
    --max-secs $((SECS * 2 + 60)) --label history \
    --check 'history_ratio>=0.5' --check 'recovery_secs<=2' \
    >>"$RESULTS" 2>>"$WORK/bench.log" || log "the history run failed (see $WORK/bench.log)"
cat "$RESULTS"
cat "$WORK/bench.log" >&2
"$BENCH" table "$RESULTS"
cp "$RESULTS" "${HISTORY_OUT:-$WORK/results.jsonl}" 2>/dev/null || true
