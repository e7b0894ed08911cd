#!/usr/bin/env bash
# What one PUBLISH costs Redis itself, the input docs/capacity.md needs: CPU
# per PUBLISH (utime+stime of redis-server from /proc, over a pipelined
# `redis-benchmark` run) with 0, 1 and 10 subscribed connections (a node is
# one connection per channel it holds), and with 64 and 640 patterns held by
# other connections (Redis matches every pattern on every PUBLISH; 64 is one
# node's default WSGATE_MAX_REDIS_PATTERNS, 640 ten nodes').
#
#   scripts/redis-cost.sh            # ~1 minute; prints a markdown table
#
# Starts its own redis-server on a free loopback port (never 6379), stops it.
# The subscribers are redis-cli processes that may read slower than Redis
# writes, so the server runs without a pub/sub output-buffer limit (nothing
# is dropped; N is kept small enough for memory).
set -euo pipefail
N=${REDIS_COST_N:-300000}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wsgate-redis-cost.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

port=0
for _ in $(seq 1 50); do
    p=$((20000 + RANDOM % 12000))
    if ! (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null; then port=$p; break; fi
done
((port > 0)) || { echo "no free port" >&2; exit 1; }
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --daemonize no \
    --client-output-buffer-limit "pubsub 0 0 0" \
    >"$WORK/redis.log" 2>&1 &
RPID=$!
PIDS+=("$RPID")
for _ in $(seq 1 100); do redis-cli -p "$port" PING >/dev/null 2>&1 && break; sleep 0.05; done

ticks() { awk '{print $14 + $15}' "/proc/$RPID/stat"; }
HZ=$(getconf CLK_TCK)

# Holds subscriptions on background redis-cli processes (their output discarded).
hold() { # hold <count> SUBSCRIBE|PSUBSCRIBE <names...>
    local n=$1 cmd=$2
    shift 2
    for _ in $(seq 1 "$n"); do
        redis-cli -p "$port" "$cmd" "$@" >/dev/null 2>&1 &
        PIDS+=($!)
    done
}
wait_count() { # wait_count <numsub|numpat> <want>
    for _ in $(seq 1 200); do
        local got
        if [[ $1 == numpat ]]; then
            got=$(redis-cli -p "$port" PUBSUB NUMPAT)
        else
            got=$(redis-cli -p "$port" PUBSUB NUMSUB bench.ch | sed -n 2p)
        fi
        [[ $got == "$2" ]] && return 0
        sleep 0.05
    done
    echo "timed out waiting for $1 = $2" >&2
    exit 1
}

run() { # run <label>
    local before after
    before=$(ticks)
    local out
    out=$(redis-benchmark -p "$port" -P 16 -c 4 -n "$N" -q PUBLISH bench.ch 0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789 2>/dev/null |
        tr '\r' '\n' | grep -o '[0-9.]* requests per second' | tail -1 | awk '{print $1}')
    after=$(ticks)
    awk -v l="$1" -v r="$out" -v t=$((after - before)) -v hz="$HZ" -v n="$N" \
        'BEGIN { printf "| %s | %.0f | %.2f |\n", l, r, t / hz * 1e6 / n }'
}

echo "| Redis holds | PUBLISH/s (redis-benchmark -P 16 -c 4, 100 B) | Redis µs CPU per PUBLISH |"
echo "| --- | --- | --- |"
run "no subscriber"
hold 1 SUBSCRIBE bench.ch
wait_count numsub 1
run "1 subscribed connection"
hold 9 SUBSCRIBE bench.ch
wait_count numsub 10
run "10 subscribed connections"
pats=()
for i in $(seq 1 64); do pats+=("node.$i.*"); done
hold 1 PSUBSCRIBE "${pats[@]}"
wait_count numpat 64
run "10 subscribed connections + 64 patterns (not matching)"
for k in $(seq 2 10); do
    pats=()
    for i in $(seq 1 64); do pats+=("n$k.$i.*"); done
    hold 1 PSUBSCRIBE "${pats[@]}"
done
wait_count numpat 640
run "10 subscribed connections + 640 patterns (not matching)"
echo
echo "redis-server $(redis-server --version | awk '{print $3}' | sed 's/v=//'), $(nproc) cores shared with redis-benchmark, $N PUBLISH per line."
