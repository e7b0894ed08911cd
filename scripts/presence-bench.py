#!/usr/bin/env python3
"""Presence on Redis, scripted (docs/benchmarks.md, "Presence"): loads the
wsgate_presence library from src/broker/redis/presence.rs into a throwaway
redis-server, writes 10,000 members of one channel from 3 nodes the way the
nodes' trackers do (batches of wsgate_presence_sync), lets one node's lease
lapse as a kill -9 would, and times wsgate_presence_read at 1,000 members.
Usage: scripts/presence-bench.py [port]"""
import re, socket, subprocess, sys, time, statistics, tempfile, os

port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
if port == 0:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
src = open(os.path.join(root, "src/broker/redis/presence.rs")).read()
body = re.search(r'const LIBRARY_BODY: &str = r#"(.*?)"#;', src, re.S).group(1)
ver = re.search(r'^version = "(.*)"', open(os.path.join(root, "Cargo.toml")).read(), re.M).group(1)
lib = "#!lua name=wsgate_presence_%s\n%s" % (ver.replace(".", "_").replace("-", "_"), body)
d = tempfile.mkdtemp()
srv = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", d],
                       stdout=subprocess.DEVNULL)
time.sleep(0.3)

def enc(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)

class Conn:
    def __init__(self):
        self.s = socket.create_connection(("127.0.0.1", port)); self.f = self.s.makefile("rb")
    def call(self, *args):
        self.s.sendall(enc(*args)); return self.read()
    def read(self):
        line = self.f.readline()
        t, rest = line[:1], line[1:-2]
        if t in b"+": return rest
        if t == b"-": raise RuntimeError(rest)
        if t == b":": return int(rest)
        if t == b"$":
            n = int(rest)
            if n < 0: return None
            data = self.f.read(n + 2); return data[:-2]
        if t == b"*":
            return [self.read() for _ in range(int(rest))]

def leave_event(channel, member):
    return '{"action":"leave","channel":"%s","member":%s}' % (channel, member)

def stored(node, channel, member):
    return (node + "\n" + leave_event(channel, member)).encode()

LEASE = 2000
c = Conn()
c.call("FUNCTION", "LOAD", "REPLACE", lib)
nodes = ["bench-1", "bench-2", "bench-3"]

def sync(node, joins, reset=False, channel="chat.big"):
    args = ["FCALL", "wsgate_presence_sync", 0, node, LEASE, 1 if reset else 0, len(joins)]
    events = []
    for client, member in joins:
        args += ["j", channel, client, stored(node, channel, member)]
        events += [channel, b"\xffwsgate-p1:" + ('{"action":"join","channel":"%s","member":%s}' % (channel, member)).encode()]
    return c.call(*(args + events))

# 10,000 members on one channel across 3 nodes, in batches of 8,192 at most.
t0 = time.perf_counter()
per = [3334, 3333, 3333]
for node, n in zip(nodes, per):
    sync(node, [], reset=True)
    members = [("%s:%d" % (node, i), '{"client":"%s:%d","user":"u%d","info":null}' % (node, i, i % 500)) for i in range(n)]
    for k in range(0, n, 8192):
        sync(node, members[k:k + 8192])
write_s = time.perf_counter() - t0
n = len(c.call("FCALL_RO", "wsgate_presence_read", 1, "chat.big"))
print("written: %d members from 3 nodes in %.1f ms" % (n, write_s * 1000))

# Renewal: one call per node per period, with no change.
lat = []
for i in range(300):
    t = time.perf_counter(); assert sync(nodes[i % 3], []) == 0; lat.append(time.perf_counter() - t)
print("renewal (no change, 10,000 members on the channel): p50 %.3f ms, p99 %.3f ms" %
      (statistics.median(lat) * 1000, sorted(lat)[int(len(lat) * 0.99)] * 1000))

# "kill -9" bench-3: it stops renewing; the others keep renewing every LEASE/3.
killed = time.perf_counter()
gone = None; reaped = None
while time.perf_counter() - killed < 3:
    assert sync("bench-1", []) == 0 and sync("bench-2", []) == 0
    if gone is None and len(c.call("FCALL_RO", "wsgate_presence_read", 1, "chat.big")) == 6667:
        gone = time.perf_counter() - killed
    if c.call("HLEN", "wsgate:presence:8:chat.big") == 6667:
        reaped = time.perf_counter() - killed; break
    time.sleep(LEASE / 3000 / 10)
print("bench-3 stopped renewing: its 3,333 members gone from reads after %.0f ms, reaped (HDEL + 3,333 leave events) after %.0f ms (lease %d ms)" %
      (gone * 1000, reaped * 1000, LEASE))

# Presence read at 1,000 members.
for node in nodes[:2]:
    assert sync(node, [], reset=True) == 0
assert sync("bench-1", [("bench-1:%d" % i, '{"client":"bench-1:%d","user":"u%d","info":{"name":"user %d"}}' % (i, i, i)) for i in range(500)], channel="chat.k") == 0
assert sync("bench-2", [("bench-2:%d" % i, '{"client":"bench-2:%d","user":"u%d","info":{"name":"user %d"}}' % (i, i, i)) for i in range(500)], channel="chat.k") == 0
lat = []
for _ in range(2000):
    t = time.perf_counter(); r = c.call("FCALL_RO", "wsgate_presence_read", 1, "chat.k"); lat.append(time.perf_counter() - t)
assert len(r) == 1000, len(r)
lat.sort()
print("presence read, 1,000 members (%d bytes): p50 %.3f ms, p99 %.3f ms, max %.3f ms (2,000 reads, one connection)" %
      (sum(len(x) for x in r), lat[1000] * 1000, lat[1980] * 1000, lat[-1] * 1000))
srv.terminate(); srv.wait()
