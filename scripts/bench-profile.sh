#!/usr/bin/env bash
# Profiles the runs whose targets are bounded by something other than
# wsgate's own code (issue 13's churn and resync): each run as in
# scripts/bench.sh, with `perf record -a -g` over the whole machine during its
# measured phase, then the split of CPU time by process (wsgate, redis-server,
# wsgate-bench, idle) and the top symbols of the busiest ones.
#
#   scripts/bench-profile.sh                 # churn + resync 100k, ~4 minutes
#   PROFILE_RUNS=churn scripts/bench-profile.sh
#   BIN=/path/to/target/release scripts/bench-profile.sh
#
# Own redis-server and gateway on free loopback ports; stops them on exit.
# Needs perf (linux-perf) and kernel.perf_event_paranoid <= 1 (or root).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
RUNS=${PROFILE_RUNS:-churn,resync}
BIG=${PROFILE_RESYNC:-100000}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wsgate-profile.XXXXXX")
PIDS=()
log() { printf '[profile %s] %s\n' "$(date +%T)" "$*" >&2; }
cleanup() {
    set +e
    for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null; done
    sleep 0.3
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    [[ -s $WORK/redis.pid ]] && kill -KILL "$(cat "$WORK/redis.pid")" 2>/dev/null
    log "logs, results and perf data kept in $WORK"
}
trap cleanup EXIT INT TERM
ulimit -Sn "$(ulimit -Hn)" 2>/dev/null || true

# shellcheck source=scripts/lib.sh
. scripts/lib.sh
RPORT=$(free_port)
REDIS_URL=redis://127.0.0.1:$RPORT
REDIS_START="redis-server --port $RPORT --bind 127.0.0.1 --save '' --appendonly no --daemonize yes --pidfile $WORK/redis.pid --dir $WORK --logfile $WORK/redis.log"
RESTART_REDIS="pid=\$(cat $WORK/redis.pid); kill -9 \$pid; while kill -0 \$pid 2>/dev/null; do sleep 0.005; done; $REDIS_START"
eval "$REDIS_START"
for _ in $(seq 1 200); do redis-cli -p "$RPORT" PING >/dev/null 2>&1 && break; sleep 0.05; done

GW_PORT=$(free_port)
env WSGATE_LISTEN="127.0.0.1:$GW_PORT" WSGATE_REDIS_URL="$REDIS_URL" WSGATE_LOG=warn \
    WSGATE_SUBSCRIBE_RATE=1000000 WSGATE_SUBSCRIBE_TIMEOUT_MS=600000 \
    WSGATE_MAX_PATTERNS_PER_CONNECTION=100000 WSGATE_MAX_PATTERNS=1000000 \
    WSGATE_MAX_REDIS_PATTERNS=1000000 "$BIN/wsgate" >"$WORK/gateway.log" 2>&1 &
GW_PID=$!
PIDS+=("$GW_PID")
wait_ready "$GW_PORT" || { log "gateway not ready (see $WORK/gateway.log)"; exit 1; }
ARGS=(--url "ws://127.0.0.1:$GW_PORT/ws" --pid "$GW_PID" --redis "$REDIS_URL")

# perf over the whole machine for SECS seconds, in the background.
PERF_START="perf record -a -g -F 499 -o $WORK/LABEL.perf -- sleep SECS >/dev/null 2>&1 &"

report() { # report LABEL: the split by process, then each busy process's top symbols
    local data=$WORK/$1.perf
    [[ -s $data ]] || { log "no perf data for $1"; return 0; }
    local redis_pid bench_pid
    redis_pid=$(cat "$WORK/redis.pid")
    bench_pid=$(cat "$WORK/bench.pid" 2>/dev/null || echo 0)
    echo
    echo "#### $1: share of all CPU samples (whole machine, both cores)"
    echo '```'
    perf script -i "$data" -F pid 2>/dev/null | awk -v gw="$GW_PID" -v rd="$redis_pid" -v bn="$bench_pid" '
        { n++; if ($1 == gw) g++; else if ($1 == rd) r++; else if ($1 == bn) b++; else if ($1 == 0) i++; else o++ }
        END { printf "wsgate %.1f%%, redis-server %.1f%%, wsgate-bench %.1f%%, idle %.1f%%, other processes %.1f%% (%d samples)\n",
              100*g/n, 100*r/n, 100*b/n, 100*i/n, 100*o/n, n }'
    echo '```'
    for who in "wsgate:$GW_PID" "redis-server:$redis_pid"; do
        echo "#### $1: ${who%%:*}'s top symbols (self, share of all samples)"
        echo '```'
        perf report -i "$data" --pid "${who#*:}" --no-children -g none --sort dso,sym --stdio \
            2>/dev/null | grep -E '^ +[0-9]' | head -15 || true
        echo '```'
    done
}

run() { # run LABEL PERF_SECS ARGS...
    local label=$1 secs=$2
    shift 2
    log "run $label"
    local before=${PERF_START//LABEL/$label}
    before=${before//SECS/$secs}
    { printf 'wsgate-bench'; printf ' %q' "$@" "${ARGS[@]}" --label "$label"; echo; } >>"$WORK/commands.txt"
    "$BIN/wsgate-bench" "$@" "${ARGS[@]}" --label "$label" --before-phase "$before" \
        >>"$WORK/results.jsonl" 2>"$WORK/$label.err" &
    echo $! >"$WORK/bench.pid"
    wait $! || log "$label failed"
    tail -n 1 "$WORK/$label.err"
    # perf writes its file when its sleep ends.
    for _ in $(seq 1 600); do
        pgrep -f "perf record -a -g -F 499 -o $WORK/$label.perf" >/dev/null || break
        sleep 0.1
    done
    report "$label"
}

case ",$RUNS," in *,churn,*)
    # churn's measured phase is its whole run after 100 connections open:
    # profile it from the start, for its duration.
    for kind in channel pattern; do
        label=churn-$kind
        cmd=${PERF_START//LABEL/$label}
        eval "${cmd//SECS/8}"
        perf_pid=$!
        sleep 0.5
        log "run $label"
        "$BIN/wsgate-bench" churn "${ARGS[@]}" --connections 100 --window 32 --duration-secs 6 \
            --topic-kind "$kind" --label "$label" >>"$WORK/results.jsonl" 2>"$WORK/$label.err" &
        echo $! >"$WORK/bench.pid"
        wait $! || log "$label failed"
        tail -n 1 "$WORK/$label.err"
        wait "$perf_pid" || true
        report "$label"
    done
    ;;
esac
case ",$RUNS," in *,resync,*)
    run resync-channels 4 resync --patterns "$BIG" --topic-kind channel --restart-redis "$RESTART_REDIS"
    run resync-patterns 6 resync --patterns "$BIG" --restart-redis "$RESTART_REDIS" \
        --subscribe-timeout-secs 240 --max-secs 300
    ;;
esac
echo
echo "Commands (gateway: WSGATE_SUBSCRIBE_RATE=1000000 WSGATE_SUBSCRIBE_TIMEOUT_MS=600000 WSGATE_MAX_PATTERNS_PER_CONNECTION=100000 WSGATE_MAX_PATTERNS=1000000 WSGATE_MAX_REDIS_PATTERNS=1000000):"
echo '```'
cat "$WORK/commands.txt" 2>/dev/null
echo '```'
