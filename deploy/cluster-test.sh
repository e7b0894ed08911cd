#!/usr/bin/env bash
# The local cluster test: redis-server, three wsgate processes on loopback
# ports and haproxy in front with deploy/haproxy.cfg (the file compose uses),
# 200 reconnecting clients, kill -9 and a rolling restart (tests/cluster.rs).
# Installs haproxy (and redis-server) with apt-get when missing, then runs the
# test, which prints what it observed: clients per node, reconnect time after
# the kill, losses.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ]; then
  echo "cluster-test.sh: installing ${missing[*]} with apt-get"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
haproxy -v | sed -n 1p  # sed reads to the end: no SIGPIPE under pipefail
redis-server --version

cargo test --test cluster -- --ignored --nocapture
