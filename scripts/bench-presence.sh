#!/usr/bin/env bash
# Presence at scale (issue 14; docs/presence.md, docs/benchmarks.md "Presence
# (issue 14)"): its own redis-server and three gateways (release binaries) on
# free loopback ports, `wsgate-bench presence` with 10,000 members of one
# channel spread over the three, the presence answer's latency at 1,000 and at
# 10,000 members; then `kill -9` of one node and the time until `GET
# /presence` on a survivor no longer lists any of its members (target: within
# one lease). Everything it starts it stops (trap); bounded in time.
#
#   scripts/bench-presence.sh
#   PRESENCE_MEMBERS=3000 PRESENCE_STEP=1000 scripts/bench-presence.sh   # smaller
#   PRESENCE_BIN=/path/to/release scripts/bench-presence.sh             # where wsgate and wsgate-bench are
#
# Environment: PRESENCE_BIN (default $CARGO_TARGET_DIR/release, else
# target/release), PRESENCE_MEMBERS [10000], PRESENCE_STEP [1000],
# PRESENCE_LEASE_MS [5000], PRESENCE_REQUESTS [1000], PRESENCE_OUT (the JSON
# lines, default $WORK/results.jsonl), PRESENCE_MAX_SECS [420].
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
BIN=${PRESENCE_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
GW=$BIN/wsgate
BENCH=$BIN/wsgate-bench
MEMBERS=${PRESENCE_MEMBERS:-10000}
STEP=${PRESENCE_STEP:-1000}
LEASE_MS=${PRESENCE_LEASE_MS:-5000}
REQUESTS=${PRESENCE_REQUESTS:-1000}
MAX_SECS=${PRESENCE_MAX_SECS:-420}
CHANNEL=presence.bench
KEY=bench-presence-key
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wsgate-bench-presence.XXXXXX")
OUT=${PRESENCE_OUT:-$WORK/results.jsonl}
READY=$WORK/ready.json
NODES=(pb-1 pb-2 pb-3)

for f in "$GW" "$BENCH"; do
    [[ -x $f ]] || { echo "missing $f: cargo build --release --bin wsgate --bin wsgate-bench" >&2; exit 2; }
done

PIDS=()       # everything we started, by pid
REDIS_PIDFILE=$WORK/redis.pid
WATCHDOG=

log() { printf '[bench-presence %s] %s\n' "$(date +%T)" "$*" >&2; }

cleanup() {
    local status=$?
    set +e
    trap - EXIT INT TERM
    rm -f "$READY"
    for pid in "${PIDS[@]}"; do kill -INT "$pid" 2>/dev/null; done
    sleep 0.5
    for pid in "${PIDS[@]}"; do
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    [[ -s $REDIS_PIDFILE ]] && kill -KILL "$(cat "$REDIS_PIDFILE")" 2>/dev/null
    [[ -n $WATCHDOG ]] && kill "$WATCHDOG" 2>/dev/null
    log "logs and results kept in $WORK"
    exit "$status"
}
trap cleanup EXIT INT TERM

# The whole run's bound: after MAX_SECS, stop (the trap cleans up).
(
    trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
    sleep "$MAX_SECS" &
    sleeper=$!
    wait "$sleeper"
    log "exceeded ${MAX_SECS}s: stopping"
    kill -TERM $$
) 2>/dev/null &
WATCHDOG=$!

# shellcheck source=scripts/lib.sh
. scripts/lib.sh

now_ms() { echo $(($(date +%s%N) / 1000000)); }

# 10,000 member sockets in the bench, ~3,334 per gateway: the soft fd limit
# at the hard one (each process inherits it; the gateways' default
# WSGATE_MAX_CONNECTIONS, 20,000, is lowered to fit it by itself).
ulimit -Sn "$(ulimit -Hn)" 2>/dev/null || true
if (($(ulimit -Sn) < MEMBERS + 256)); then
    log "the open-file limit $(ulimit -Sn) is below $MEMBERS members + 256: raise it (ulimit -Hn)"
    exit 2
fi

RPORT=$(free_port)
REDIS_URL=redis://127.0.0.1:$RPORT
redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --pidfile "$REDIS_PIDFILE" --dir "$WORK" --logfile "$WORK/redis.log"
for _ in $(seq 1 200); do
    redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break
    sleep 0.05
done
redis-cli -p "$RPORT" ping >/dev/null || { log "redis-server did not start"; exit 1; }
log "redis-server on $RPORT (work dir $WORK)"

# WSGATE_SUBSCRIBE_RATE: a presence request takes from the subscribe bucket
# (1,000 round trips back to back on one socket). WSGATE_CLIENT_QUEUE_BYTES:
# an answer of 10,000 members is ~520 KB; 8 MiB leaves room.
GW_ENV=(WSGATE_REDIS_URL="$REDIS_URL" WSGATE_PRESENCE="presence.*"
    WSGATE_PRESENCE_LEASE_MS="$LEASE_MS" WSGATE_API_KEY="$KEY"
    WSGATE_SUBSCRIBE_RATE=1000000 WSGATE_CLIENT_QUEUE_BYTES=8388608 WSGATE_LOG=warn)
PORTS=()
GW_PIDS=()
for node in "${NODES[@]}"; do
    port=$(free_port)
    env "${GW_ENV[@]}" WSGATE_LISTEN="127.0.0.1:$port" WSGATE_NODE_ID="$node" \
        "$GW" >"$WORK/gateway-$node.log" 2>&1 &
    GW_PIDS+=($!)
    PIDS+=($!)
    PORTS+=("$port")
    echo "# gateway $node: ${GW_ENV[*]} WSGATE_LISTEN=127.0.0.1:$port WSGATE_NODE_ID=$node $GW" >>"$WORK/commands.txt"
done
for i in 0 1 2; do
    for _ in $(seq 1 200); do
        curl -fsS "http://127.0.0.1:${PORTS[$i]}/readyz" >/dev/null 2>&1 && break
        sleep 0.05
    done
    curl -fsS "http://127.0.0.1:${PORTS[$i]}/readyz" >/dev/null ||
        { log "gateway ${NODES[$i]} not ready (see $WORK/gateway-${NODES[$i]}.log)"; exit 1; }
done
log "gateways ${NODES[*]} on ${PORTS[*]}, lease ${LEASE_MS} ms"

ARGS=(presence --channel "$CHANNEL" --subscribers "$MEMBERS" --steps "$STEP"
    --requests "$REQUESTS" --duration-secs 60 --subscribe-timeout-secs 60
    --connect-concurrency 128 --sources 64
    --ready-file "$READY" --hold-secs 120 --max-secs $((MAX_SECS - 60))
    --label "presence-$MEMBERS"
    --check "p99_ms_$STEP<=5" --check "wrong_counts_$STEP==0" --check "wrong_counts_$MEMBERS==0")
for i in 0 1 2; do ARGS+=(--url "ws://127.0.0.1:${PORTS[$i]}/ws" --pid "${GW_PIDS[$i]}"); done
{ printf 'wsgate-bench'; printf ' %q' "${ARGS[@]}"; echo; } >>"$WORK/commands.txt"
log "wsgate-bench ${ARGS[*]}"
"$BENCH" "${ARGS[@]}" >"$WORK/bench.jsonl" 2>"$WORK/bench.err" &
BENCH_PID=$!
PIDS+=("$BENCH_PID")

# The bench writes the ready file once it has measured, then holds its members.
until [[ -s $READY ]]; do
    if ! kill -0 "$BENCH_PID" 2>/dev/null; then
        log "wsgate-bench ended before holding its members:"
        cat "$WORK/bench.err" >&2
        exit 1
    fi
    sleep 0.1
done
log "members held: $(cat "$READY")"

# kill -9 the third node; poll the first until none of its members is listed.
VICTIM=${NODES[2]}
held=$(sed -n "s/.*\"$VICTIM\":\([0-9]*\).*/\1/p" "$READY")
total=$(sed -n 's/.*"members":\([0-9]*\).*/\1/p' "$READY")
URL="http://127.0.0.1:${PORTS[0]}/presence?channel=$CHANNEL"
t0=$(now_ms)
kill -9 "${GW_PIDS[2]}"
gone_ms=-1
polls=0
clients_after=-1
while (($(now_ms) - t0 < 3 * LEASE_MS)); do
    body=$(curl -fsS -H "Authorization: Bearer $KEY" "$URL" 2>/dev/null || true)
    polls=$((polls + 1))
    if [[ -n $body && $body != *"\"client\":\"$VICTIM:"* ]]; then
        gone_ms=$(($(now_ms) - t0))
        clients_after=$(sed -n 's/^{"channel":"[^"]*","clients":\([0-9]*\),.*/\1/p' <<<"$body")
        break
    fi
    sleep 0.02
done
if ((gone_ms >= 0)); then
    log "$VICTIM (${held:-?} members) killed: gone from GET /presence after $gone_ms ms ($polls polls); $clients_after of $total listed"
else
    log "$VICTIM's members still listed $((3 * LEASE_MS)) ms after the kill"
fi
within=false
((gone_ms >= 0 && gone_ms <= LEASE_MS)) && within=true
expected_after=$((total - ${held:-0}))
printf '{"label":"presence-kill","workload":"presence-kill","params":{"lease_ms":%s,"members":%s,"killed_node":"%s","killed_members":%s},"results":{"gone_ms":%s,"polls":%s,"clients_after":%s,"expected_after":%s},"checks":[{"check":"gone_ms<=lease_ms","value":%s,"met":%s}],"summary":"kill -9 of a node holding %s of %s members: gone from GET /presence after %s ms (lease %s ms), %s listed after (expected %s)"}\n' \
    "$LEASE_MS" "$total" "$VICTIM" "${held:-0}" "$gone_ms" "$polls" "${clients_after:-0}" "$expected_after" \
    "$gone_ms" "$within" "${held:-0}" "$total" "$gone_ms" "$LEASE_MS" "${clients_after:-?}" "$expected_after" \
    >"$WORK/kill.jsonl"

# Let the bench end (it stops holding when the ready file goes) and report.
rm -f "$READY"
for _ in $(seq 1 600); do
    kill -0 "$BENCH_PID" 2>/dev/null || break
    sleep 0.1
done
wait "$BENCH_PID" || log "wsgate-bench exit status $?"
cat "$WORK/bench.err" >&2
cat "$WORK/bench.jsonl" "$WORK/kill.jsonl" >>"$OUT"
"$BENCH" table "$OUT"
log "results: $OUT; commands: $WORK/commands.txt"
