#!/usr/bin/env bash
# Pattern-cost abuse (issue 10, docs/security.md "Pattern cost"): Redis's
# PUBLISH rate on an unrelated channel, clean and while 40 anonymous sockets
# ask the gateway for 256 patterns each, with the gateway's default caps.
# usage: scripts/pattern_abuse.sh [path/to/wsgate]   (release build by default)
# Needs redis-server, redis-benchmark, node (tests/js has `ws` installed).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/wsgate}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
RP=$(free_port); GP=$(free_port); DIR=$(mktemp -d)
redis-server --port "$RP" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --dir "$DIR" --pidfile "$DIR/redis.pid" --logfile "$DIR/redis.log"
trap 'kill $(cat "$DIR/redis.pid") 2>/dev/null; kill "${GW:-0}" 2>/dev/null; [ -n "${KEEP:-}" ] || rm -rf "$DIR"' EXIT
for _ in $(seq 50); do redis-cli -p "$RP" ping >/dev/null 2>&1 && break; sleep 0.1; done
WSGATE_LISTEN=127.0.0.1:$GP WSGATE_REDIS_URL=redis://127.0.0.1:$RP WSGATE_LOG=${WSGATE_LOG:-warn} \
    WSGATE_SUBSCRIBE_RATE=100000 "$BIN" >"$DIR/gw.log" 2>&1 &
GW=$!
for _ in $(seq 100); do curl -fs "127.0.0.1:$GP/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
rate() { redis-benchmark -p "$RP" -n "$2" $1 -q PUBLISH some.unrelated.channel hello 2>&1 \
    | tr '\r' '\n' | grep 'requests per' | tail -1 | awk '{for (i = 2; i <= NF; i++) if ($i == "requests") print $(i - 1)}'; }
measure() {
    echo "$1: numpat=$(redis-cli -p "$RP" pubsub numpat)" \
        "rate(50 clients)=$(rate '' 200000)/s rate(pipeline 16)=$(rate '-P 16' 400000)/s"
}
measure clean
for mode in ${MODES:-crafted plain prefixed}; do
    flag=""; [ "$mode" = plain ] && flag=--plain; [ "$mode" = prefixed ] && flag=--prefixed
    node tests/js/pattern_abuse.js "ws://127.0.0.1:$GP/ws" --hold-ms 12000 $flag >"$DIR/$mode.log" &
    ABUSE=$!
    for _ in $(seq 600); do grep -q subscribed "$DIR/$mode.log" 2>/dev/null && break; sleep 0.1; done
    echo "$mode: $(cat "$DIR/$mode.log")"
    measure "$mode"
    wait "$ABUSE" || true
done
