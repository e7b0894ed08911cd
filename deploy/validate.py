"""Checks of the deployment files that need more than a linter; run by
deploy/validate.sh with the tools venv's Python (PyYAML comes with yamllint).

1. The Grafana dashboard parses, and every wsgate_* name in its queries is a
   metric family the gateway really exports (read from the binary's /metrics)
   and is listed in the README's Metrics table.
2. Every WSGATE_* variable set in the Dockerfile, docker-compose.yml and
   deploy/k8s/ is a documented variable (README's Configuration table).
3. Every LB_* variable deploy/haproxy.cfg reads is set by docker-compose.yml
   (LB_RESOLVE is optional: used inside an .if defined() block).
4. The Deployment's terminationGracePeriodSeconds covers the ConfigMap's drain
   window plus shutdown timeout, and compose's stop_grace_period does too.
5. The Deployment sets enableServiceLinks: false (no WSGATE_SERVICE_* and
   WSGATE_PORT* variables injected for the Service named wsgate), and its
   readiness probe has failureThreshold > 1 (a Redis blip must not pull every
   pod out of the Service at once).
6. When deploy/haproxy.cfg adds X-Forwarded-For (option forwardfor), every
   compose wsgate service sets WSGATE_TRUSTED_PROXIES, and HAProxy's fixed
   address in compose is inside it.

Usage: validate.py <path to the wsgate binary>
"""

import glob
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import yaml

failures = []


def fail(msg):
    failures.append(msg)
    print(f"FAIL: {msg}")


def ok(msg):
    print(f"ok: {msg}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exported_metrics(binary):
    """Metric family names from a real node's /metrics (embedded broker)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGATE_")}
    env.update(WSGATE_LISTEN=f"127.0.0.1:{port}", WSGATE_LOG="warn")
    proc = subprocess.Popen([binary], env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    text = r.read().decode()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"FAIL: {binary} did not serve /metrics on port {port}")
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    return set(re.findall(r"^# TYPE (\S+) ", text, re.M))


def readme_metrics():
    text = open("README.md", encoding="utf-8").read()
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(wsgate_[a-z_]+)", section, re.M))


def readme_variables():
    text = open("README.md", encoding="utf-8").read()
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(WSGATE_[A-Z_]+)`", section, re.M))


def dashboard_exprs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "expr" and isinstance(v, str):
                yield v
            else:
                yield from dashboard_exprs(v)
    elif isinstance(node, list):
        for v in node:
            yield from dashboard_exprs(v)


def check_dashboard(binary):
    path = "deploy/grafana/wsgate-dashboard.json"
    try:
        dash = json.load(open(path, encoding="utf-8"))
    except ValueError as e:
        fail(f"{path} is not valid JSON: {e}")
        return
    exprs = list(dashboard_exprs(dash))
    if not exprs:
        fail(f"{path} has no queries")
        return
    exported = exported_metrics(binary)
    documented = readme_metrics()
    used = set()
    for expr in exprs:
        for name in re.findall(r"\bwsgate_[a-z_]+", expr):
            family = re.sub(r"_(bucket|sum|count)$", "", name)
            if family not in exported:
                family = name
            used.add(family)
            if family not in exported:
                fail(f"{path}: {name} is not a metric the gateway exports")
            elif family not in documented:
                fail(f"{path}: {family} is exported but missing from README's Metrics table")
    ok(f"{path}: {len(exprs)} queries over {len(used)} metric names, all exported by the gateway")
    unused = sorted(exported - used)
    if unused:
        print(f"note: metrics not on the dashboard: {', '.join(unused)}")
    undocumented = sorted(exported - documented)
    if undocumented:
        fail(f"README's Metrics table lacks: {', '.join(undocumented)}")


def check_variables():
    known = readme_variables()
    files = ["Dockerfile", "docker-compose.yml"] + sorted(glob.glob("deploy/k8s/**/*.yaml", recursive=True))
    seen = set()
    for f in files:
        for name in re.findall(r"\bWSGATE_[A-Z_]+\b", open(f, encoding="utf-8").read()):
            seen.add(name)
            if name not in known:
                fail(f"{f}: {name} is not a documented WSGATE_* variable")
    ok(f"WSGATE_* variables used in the deployment files are documented: {', '.join(sorted(seen))}")


def check_haproxy_variables(compose):
    cfg = open("deploy/haproxy.cfg", encoding="utf-8").read()
    wanted = set(re.findall(r'"\$\{(LB_[A-Z0-9_]+)\}"', cfg))
    optional = set(re.findall(r"defined\((LB_[A-Z0-9_]+)\)", cfg))
    env = compose["services"]["haproxy"].get("environment", {})
    missing = sorted((wanted | optional) - set(env))
    if missing:
        fail(f"docker-compose.yml does not set {', '.join(missing)} read by deploy/haproxy.cfg")
    volumes = compose["services"]["haproxy"].get("volumes", [])
    if not any(str(v).startswith("./deploy/haproxy.cfg:") for v in volumes):
        fail("docker-compose.yml does not mount ./deploy/haproxy.cfg into haproxy")
    ok(f"haproxy.cfg variables {', '.join(sorted(wanted | optional))} are set by docker-compose.yml")


def seconds(duration):
    m = re.fullmatch(r"(\d+)(ms|s|m)", str(duration))
    if not m:
        raise ValueError(duration)
    n, unit = int(m.group(1)), m.group(2)
    return n / 1000 if unit == "ms" else n * 60 if unit == "m" else n


def check_grace(compose):
    docs = k8s_docs()
    cm = docs[("ConfigMap", "wsgate")]["data"]
    need = (int(cm["WSGATE_DRAIN_WINDOW_MS"]) + int(cm["WSGATE_SHUTDOWN_TIMEOUT_MS"])) / 1000
    grace = docs[("Deployment", "wsgate")]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    if grace <= need:
        fail(f"terminationGracePeriodSeconds {grace} does not cover drain + shutdown ({need} s)")
    else:
        ok(f"terminationGracePeriodSeconds {grace} s covers drain window + shutdown timeout ({need} s)")
    for name, svc in compose["services"].items():
        env = svc.get("environment", {})
        if "WSGATE_DRAIN_WINDOW_MS" not in env:
            continue
        need = (int(env["WSGATE_DRAIN_WINDOW_MS"]) + int(env.get("WSGATE_SHUTDOWN_TIMEOUT_MS", 5000))) / 1000
        grace = seconds(svc.get("stop_grace_period", "10s"))
        if grace <= need:
            fail(f"compose {name}: stop_grace_period {grace} s does not cover drain + shutdown ({need} s)")
        else:
            ok(f"compose {name}: stop_grace_period {grace} s covers drain + shutdown ({need} s)")


def k8s_docs():
    docs = {}
    for f in glob.glob("deploy/k8s/*.yaml"):
        for doc in yaml.safe_load_all(open(f, encoding="utf-8")):
            if doc:
                docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def check_pod_spec():
    pod = k8s_docs()[("Deployment", "wsgate")]["spec"]["template"]["spec"]
    if pod.get("enableServiceLinks") is not False:
        fail("deploy/k8s/deployment.yaml: set enableServiceLinks: false (service links inject WSGATE_SERVICE_*/WSGATE_PORT*)")
    else:
        ok("Deployment: enableServiceLinks: false")
    for c in pod["containers"]:
        probe = c.get("readinessProbe")
        if probe is None:
            fail(f"Deployment container {c['name']}: no readinessProbe")
            continue
        threshold = probe.get("failureThreshold", 3)
        period = probe.get("periodSeconds", 10)
        if threshold <= 1:
            fail(f"Deployment container {c['name']}: readinessProbe failureThreshold {threshold} must be > 1 "
                 "(a Redis blip would pull every pod at once)")
        else:
            ok(f"Deployment container {c['name']}: readiness failureThreshold {threshold} "
               f"(a blip under ~{threshold * period} s keeps pods in the Service)")


def check_trusted_proxies(compose):
    cfg = open("deploy/haproxy.cfg", encoding="utf-8").read()
    if not re.search(r"^\s*option\s+forwardfor\b", cfg, re.M):
        ok("haproxy.cfg adds no X-Forwarded-For: no WSGATE_TRUSTED_PROXIES needed")
        return
    nets = compose["services"]["haproxy"].get("networks", {})
    addrs = [n.get("ipv4_address") for n in nets.values() if isinstance(n, dict)] if isinstance(nets, dict) else []
    addrs = [a for a in addrs if a]
    if not addrs:
        fail("docker-compose.yml: haproxy has no fixed ipv4_address for the nodes to trust")
        return
    for name, svc in compose["services"].items():
        env = svc.get("environment", {})
        if not any(str(k).startswith("WSGATE_") for k in env):
            continue
        raw = env.get("WSGATE_TRUSTED_PROXIES")
        if not raw:
            fail(f"compose {name}: haproxy adds X-Forwarded-For but WSGATE_TRUSTED_PROXIES is unset")
            continue
        trusted = [ipaddress.ip_network(t.strip(), strict=False) for t in str(raw).split(",") if t.strip()]
        for a in addrs:
            if not any(ipaddress.ip_address(a) in n for n in trusted):
                fail(f"compose {name}: WSGATE_TRUSTED_PROXIES={raw} does not cover haproxy's address {a}")
                break
        else:
            ok(f"compose {name}: WSGATE_TRUSTED_PROXIES={raw} covers haproxy ({', '.join(addrs)})")


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    compose = yaml.safe_load(open("docker-compose.yml", encoding="utf-8"))
    check_dashboard(sys.argv[1])
    check_variables()
    check_haproxy_variables(compose)
    check_grace(compose)
    check_pod_spec()
    check_trusted_proxies(compose)
    if failures:
        raise SystemExit(f"{len(failures)} check(s) failed")


if __name__ == "__main__":
    main()
