#!/usr/bin/env bash
# Issue 15's shard benchmark (needs redis-cli with --cluster, Redis >= 7 for
# sharded pub/sub): the same `channels` load (10,000 sockets, each on
# its own exact channel, publishes pipelined and paced round-robin over the
# channels) against a gateway on one Redis and against a gateway on three
# independent Redis servers (WSGATE_REDIS_SHARDS), at the same total rate, in
# alternating rounds of one run. It reports each Redis server's CPU per
# PUBLISH, how the channels spread over the shards, and the gateway's CPU per
# delivery, and the ratios that issue 15 sets targets on. A third arm runs one
# Redis at a third of the rate: what each shard carries, so the per-server
# cost compares at the same load per server too.
#
#   scripts/bench-shards.sh                  # 2 rounds, ~4 minutes
#   SHARDS_RATE=40000 SHARDS_ROUNDS=3 scripts/bench-shards.sh
#   BIN=/path/to/target/release scripts/bench-shards.sh   # prebuilt binaries
#
# Starts its own redis-servers and gateways on free loopback ports (never
# 6379 or 8080) and stops them on exit. All servers share this machine's
# cores, so total throughput cannot show what shards add: only the per-server
# cost and the spread can.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
SUBS=${SHARDS_SUBSCRIBERS:-10000}
RATE=${SHARDS_RATE:-30000}
SECS=${SHARDS_SECS:-8}
ROUNDS=${SHARDS_ROUNDS:-2}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wsgate-shards.XXXXXX")
RESULTS=$WORK/results.jsonl
PIDS=()
log() { printf '[shards %s] %s\n' "$(date +%T)" "$*" >&2; }
cleanup() {
    set +e
    for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null; done
    sleep 0.3
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    log "logs and raw results kept in $WORK"
}
trap cleanup EXIT INT TERM
ulimit -Sn "$(ulimit -Hn)" 2>/dev/null || true

# shellcheck source=scripts/lib.sh
. scripts/lib.sh

URL=
start_redis() { # start_redis NAME: sets URL (runs in this shell, so cleanup knows the pid)
    local port
    port=$(free_port)
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
        --daemonize no >"$WORK/redis-$1.log" 2>&1 &
    PIDS+=($!)
    REDIS_PIDS+=($!)
    for _ in $(seq 1 200); do
        redis-cli -p "$port" PING >/dev/null 2>&1 && { URL="redis://127.0.0.1:$port"; return 0; }
        sleep 0.05
    done
    log "redis $1 did not start"
    return 1
}

GW_PID=
GW_PORT=
start_gateway() { # start_gateway NAME VAR=value...
    local name=$1
    shift
    GW_PORT=$(free_port)
    env WSGATE_LISTEN="127.0.0.1:$GW_PORT" WSGATE_LOG=warn WSGATE_MAX_CONNECTIONS=15000 "$@" \
        "$BIN/wsgate" >"$WORK/gateway-$name.log" 2>&1 &
    GW_PID=$!
    PIDS+=("$GW_PID")
    echo "# gateway $name: WSGATE_LISTEN=127.0.0.1:$GW_PORT $* wsgate" >>"$WORK/commands.txt"
    wait_ready "$GW_PORT" || { log "gateway $name not ready (see $WORK/gateway-$name.log)"; return 1; }
}

REDIS_PIDS=()
CLUSTER_PIDS=()
start_redis single && SINGLE=$URL
start_redis s1 && S1=$URL
start_redis s2 && S2=$URL
start_redis s3 && S3=$URL
start_gateway single "WSGATE_REDIS_URL=$SINGLE"
G1_PID=$GW_PID G1_PORT=$GW_PORT
start_gateway sharded "WSGATE_REDIS_SHARDS=$S1,$S2,$S3"
G3_PID=$GW_PID G3_PORT=$GW_PORT

# A Redis Cluster of three masters (no replicas: only the pub/sub cost is
# measured), its gateway in sharded mode (SSUBSCRIBE per slot owner, SPUBLISH).
cluster_port() { # a free port whose cluster bus port (+10000) is free too
    local p
    for _ in $(seq 1 100); do
        p=$(free_port)
        ((p < 22000)) && ! (exec 3<>"/dev/tcp/127.0.0.1/$((p + 10000))") 2>/dev/null && { echo "$p"; return 0; }
    done
    return 1
}
CLUSTER_NODES=()
for i in 1 2 3; do
    port=$(cluster_port)
    mkdir -p "$WORK/c$i"
    (cd "$WORK/c$i" && exec redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
        --cluster-enabled yes --cluster-config-file "$WORK/c$i/nodes.conf" >"$WORK/redis-c$i.log" 2>&1) &
    PIDS+=($!)
    CLUSTER_PIDS+=($!)
    CLUSTER_NODES+=("127.0.0.1:$port")
done
for n in "${CLUSTER_NODES[@]}"; do
    for _ in $(seq 1 200); do redis-cli -p "${n#*:}" PING >/dev/null 2>&1 && break; sleep 0.05; done
done
redis-cli --cluster create "${CLUSTER_NODES[@]}" --cluster-yes >"$WORK/cluster-create.log" 2>&1
for _ in $(seq 1 200); do
    ok=0
    for n in "${CLUSTER_NODES[@]}"; do
        redis-cli -p "${n#*:}" CLUSTER INFO 2>/dev/null | grep -q cluster_state:ok && ok=$((ok + 1))
    done
    ((ok == 3)) && break
    sleep 0.1
done
SEED=redis://${CLUSTER_NODES[0]}
start_gateway cluster "WSGATE_REDIS_CLUSTER=redis://${CLUSTER_NODES[0]},${CLUSTER_NODES[1]}" \
    WSGATE_REDIS_CLUSTER_PUBSUB=sharded
GC_PID=$GW_PID GC_PORT=$GW_PORT

COMMON=(channels --subscribers "$SUBS" --rate "$RATE" --duration-secs "$SECS" --max-secs 120
    --topic-kind channel --sources 50 --subscribe-timeout-secs 60)
# With perf (root, or perf_event_paranoid <= 0): syscalls and context
# switches of each server and of the gateway over the publish phase.
PERF=0
command -v perf >/dev/null && perf stat -e raw_syscalls:sys_enter -- true >/dev/null 2>&1 && PERF=1
stat_phase() { # stat_phase LABEL PID... : a --before-phase command
    local label=$1 cmd="" pid
    shift
    for pid in "$@"; do
        cmd+="perf stat -x, -e raw_syscalls:sys_enter,context-switches -o $WORK/$label.$pid.stat -p $pid -- sleep $SECS >/dev/null 2>&1 & "
    done
    echo "$cmd"
}
run() { # run LABEL PIDS ARGS... (PIDS: comma-separated, whose syscalls to count)
    local label=$1 pids=$2
    shift 2
    if ((PERF)); then
        set -- "$@" --before-phase "$(stat_phase "$label" ${pids//,/ })"
        echo "$label $pids" >>"$WORK/stat-pids.txt"
    fi
    log "run $label"
    { printf 'wsgate-bench'; printf ' %q' "${COMMON[@]}" "$@" --label "$label"; echo; } >>"$WORK/commands.txt"
    "$BIN/wsgate-bench" "${COMMON[@]}" "$@" --label "$label" >>"$RESULTS" 2>"$WORK/$label.err" ||
        { log "$label failed"; cat "$WORK/$label.err" >&2; }
    tail -n 1 "$WORK/$label.err" >&2
}
for r in $(seq 1 "$ROUNDS"); do
    one=(--url "ws://127.0.0.1:$G1_PORT/ws" --pid "$G1_PID" --redis "$SINGLE")
    three=(--url "ws://127.0.0.1:$G3_PORT/ws" --pid "$G3_PID" --shard "$S1" --shard "$S2" --shard "$S3")
    # The third arm: one Redis at a third of the rate, which is what each
    # shard sees of the total: the same load per server.
    third=("${one[@]}" --rate $((RATE / 3)))
    p1="$G1_PID,${REDIS_PIDS[0]}"
    p3="$G3_PID,${REDIS_PIDS[1]},${REDIS_PIDS[2]},${REDIS_PIDS[3]}"
    # The fourth: three shards with a 3 ms publisher tick, so each server
    # gets as many PUBLISH per pipeline as the one Redis does at 1 ms.
    tick3=("${three[@]}" --tick-ms 3)
    # The fifth: Redis Cluster, three masters, sharded pub/sub.
    clu=(--url "ws://127.0.0.1:$GC_PORT/ws" --pid "$GC_PID" --cluster-seed "$SEED")
    pc="$GC_PID,${CLUSTER_PIDS[0]},${CLUSTER_PIDS[1]},${CLUSTER_PIDS[2]}"
    if ((r % 2 == 1)); then
        run "one-redis-r$r" "$p1" "${one[@]}"
        run "three-shards-r$r" "$p3" "${three[@]}"
        run "cluster-sharded-r$r" "$pc" "${clu[@]}"
        run "third-rate-r$r" "$p1" "${third[@]}"
        run "batched-shards-r$r" "$p3" "${tick3[@]}"
    else
        run "batched-shards-r$r" "$p3" "${tick3[@]}"
        run "third-rate-r$r" "$p1" "${third[@]}"
        run "cluster-sharded-r$r" "$pc" "${clu[@]}"
        run "three-shards-r$r" "$p3" "${three[@]}"
        run "one-redis-r$r" "$p1" "${one[@]}"
    fi
done

sleep 1
echo
echo "Commands:"
echo '```'
cat "$WORK/commands.txt"
echo '```'
echo
python3 - "$RESULTS" "$WORK" <<'EOF'
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
work = sys.argv[2]
stat_pids = {}
if os.path.exists(f"{work}/stat-pids.txt"):
    for line in open(f"{work}/stat-pids.txt"):
        label, pids = line.split()
        stat_pids[label] = pids.split(",")
def stat(label, pid):
    """(syscalls, context switches) of pid over the publish phase, or None."""
    try:
        got = {}
        for line in open(f"{work}/{label}.{pid}.stat"):
            f = line.strip().split(",")
            if len(f) > 2 and f[0].isdigit():
                got[f[2]] = int(f[0])
        return got.get("raw_syscalls:sys_enter"), got.get("context-switches")
    except OSError:
        return None
def res(r, k):
    return r.get("results", {}).get(k)
print("| run | delivered/s | lost | gateway µs CPU/delivery | Redis µs CPU/PUBLISH (each server) | PUBLISH per server | channels per shard | spread: worst deviation from even | syscalls / context switches per delivery (gateway) and per PUBLISH (each server) |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
by = {}
for r in rows:
    label = r.get("label", "?")
    if "error" in r:
        print(f"| {label} | error: {r['error']} | | | | | | | |")
        continue
    shards = res(r, "shard_redis_cpu_us_per_publish")
    cpu = shards if shards is not None else [res(r, "redis_cpu_us_per_publish")]
    pubs = res(r, "shard_publishes") or [res(r, "published")]
    chans = res(r, "shard_channels") or ""
    dev = res(r, "shard_spread_max_deviation")
    sc = ""
    if label in stat_pids:
        gw, *servers = stat_pids[label]
        g = stat(label, gw)
        s_ = [stat(label, p) for p in servers]
        delivered = res(r, "delivered") or 1
        if g and all(s_):
            sc = f"gateway {g[0]/delivered:.2f} / {g[1]/delivered:.2f}; servers " + ", ".join(
                f"{x[0]/max(n,1):.2f} / {x[1]/max(n,1):.2f}" for x, n in zip(s_, pubs))
    print(f"| {label} | {res(r,'deliveries_per_sec')} | {res(r,'lost')} | {res(r,'gateway_cpu_us_per_delivery')} | {cpu} | {pubs} | {chans} | {'' if dev is None else f'{dev*100:.1f}%'} | {sc} |")
    kind = label.split("-")[0]
    by.setdefault(kind, []).append(r)
print()
if "one" in by and "three" in by:
    import statistics as st
    one_cpu = st.mean(res(r, "redis_cpu_us_per_publish") for r in by["one"])
    shard_cpu = [c for r in by["three"] for c in res(r, "shard_redis_cpu_us_per_publish") if c is not None]
    gw1 = st.mean(res(r, "gateway_cpu_us_per_delivery") for r in by["one"])
    gw3 = st.mean(res(r, "gateway_cpu_us_per_delivery") for r in by["three"])
    worst = max(abs(c / one_cpu - 1) for c in shard_cpu)
    dev = max(res(r, "shard_spread_max_deviation") for r in by["three"])
    print("| target (issue 15) | measured | |")
    print("| --- | --- | --- |")
    print(f"| Redis CPU per PUBLISH per shard within 10% of one Redis's | one Redis {one_cpu:.3f} µs; shards {', '.join(f'{c:.3f}' for c in shard_cpu)} µs (worst {worst*100:.1f}% off) | {'met' if worst <= 0.10 else 'not met'} |")
    print(f"| channels spread within 10% of even | worst shard {dev*100:.1f}% off | {'met' if dev <= 0.10 else 'not met'} |")
    if "third" in by:
        third = st.mean(res(r, "redis_cpu_us_per_publish") for r in by["third"])
        worst3 = max(abs(c / third - 1) for c in shard_cpu)
        print(f"| (the same, against one Redis at a third of the rate: each shard's load) | one Redis {third:.3f} µs; shards worst {worst3*100:.1f}% off | {'met' if worst3 <= 0.10 else 'not met'} |")
    if "batched" in by:
        b = [c for r in by["batched"] for c in res(r, "shard_redis_cpu_us_per_publish") if c is not None]
        worstb = max(abs(c / one_cpu - 1) for c in b)
        print(f"| (the same, shards with as many PUBLISH per pipeline as one Redis: 3 ms tick) | one Redis {one_cpu:.3f} µs; shards {', '.join(f'{c:.3f}' for c in b)} µs (worst {worstb*100:.1f}% off) | {'met' if worstb <= 0.10 else 'not met'} |")
    if "cluster" in by:
        cc = [c for r in by["cluster"] for c in res(r, "shard_redis_cpu_us_per_publish") if c is not None]
        worstc = max(abs(c / one_cpu - 1) for c in cc)
        devc = max(res(r, "shard_spread_max_deviation") for r in by["cluster"])
        gwc = st.mean(res(r, "gateway_cpu_us_per_delivery") for r in by["cluster"])
        print(f"| Redis Cluster, sharded mode: Redis CPU per SPUBLISH per master within 10% of one Redis's | masters {', '.join(f'{c:.3f}' for c in cc)} µs (worst {worstc*100:.1f}% off) | {'met' if worstc <= 0.10 else 'not met'} |")
        print(f"| Redis Cluster: channels spread over the masters within 10% of even | worst master {devc*100:.1f}% off | {'met' if devc <= 0.10 else 'not met'} |")
        print(f"| Redis Cluster: gateway CPU per delivery within 10% of one Redis's | {gwc:.3f} vs {gw1:.3f} µs ({gwc/gw1:.2f}x) | {'met' if abs(gwc/gw1-1) <= 0.10 else 'not met'} |")
    print(f"| gateway CPU per delivery unchanged within 10% | {gw3:.3f} vs {gw1:.3f} µs ({gw3/gw1:.2f}x) | {'met' if abs(gw3/gw1-1) <= 0.10 else 'not met'} |")
EOF
