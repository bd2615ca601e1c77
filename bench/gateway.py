"""`python -m bench --only gateway`: a remote call through two gateways, beside raw zenoh-python
between two processes on the same hosts, and a local call for scale.

Two kernels run in this process (host-a, host-b); each gateway, the service on host-b and the
raw Zenoh peer are processes of their own (loopback TCP, scouting off). Round trip: this process
calls `echo@host-b` (client -> gateway A -> Zenoh -> gateway B -> service and back) and, raw,
`get` on a queryable in another process. One-way: `send_async` of 64-byte messages (retrying on
WouldBlock: back-pressure, not loss) against raw `put` to a subscriber, counted on arrival.
Remote topic: a publisher process on host-b publishes 64-byte samples of `camera/b` as fast as it
can; this process subscribes to `camera/b@host-b` and counts what arrives (drop-oldest: the
samples a slow hop loses are not counted).
The gateways and the raw peers use the same Zenoh transport settings (Zenoh's defaults, shared
memory off); `transport/unicast/lowlatency` on both sides measured no better on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

from .results import METRIC_ROUND_TRIP, METRIC_THROUGHPUT, Result, percentile

_SERVICE = """
import sys, capbus
p = capbus.connect(sys.argv[1]); svc = p.register(sys.argv[2]); print("ready", flush=True)
seen = 0
while True:
    for req in svc.recv_many(256):
        if not req.expects_reply:
            seen += 1
        elif req.opcode == 6:
            req.reply(0, (seen,))
        else:
            req.reply(1, (), req.payload)
"""
_GATEWAY = """
import json, sys, capbus
gw = capbus.Gateway(sys.argv[1], **json.loads(sys.argv[2])).start()
print("ready", flush=True); sys.stdin.read(); gw.stop()
"""
_PUB = """
import sys, threading, capbus
p = capbus.connect(sys.argv[1]); pub = p.publish(sys.argv[2], max_size=64)
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
print("ready", flush=True)
while not done.is_set():
    pub.publish(1, (), b"t" * 64)
"""
_RAW = """
import json, sys, threading, zenoh
c = zenoh.Config()
c.insert_json5("mode", '"peer"'); c.insert_json5("scouting/multicast/enabled", "false")
c.insert_json5("transport/shared_memory/enabled", "false")
c.insert_json5("listen/endpoints", json.dumps([sys.argv[1]]))
s = zenoh.open(c)
seen = [0]
def on_q(q):
    if q.parameters.get("count") is not None:
        q.reply(q.key_expr, str(seen[0]).encode())
    else:
        q.reply(q.key_expr, q.payload.to_bytes() if q.payload is not None else b"")
def on_s(sample):
    seen[0] += 1
qa = s.declare_queryable("raw/q", zenoh.handlers.Callback(on_q, indirect=False))
sb = s.declare_subscriber("raw/s", zenoh.handlers.Callback(on_s, indirect=False))
print("ready", flush=True); sys.stdin.read()
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(code: str, *args: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    if p.stdout.readline().strip() != "ready":
        raise RuntimeError("a benchmark child did not start")
    return p


def _rtt(name: str, fn: Any, n: int, note: str, size: int) -> Result:
    for _ in range(min(200, n)):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t)
    times.sort()
    return Result(name, METRIC_ROUND_TRIP, median_us=times[len(times) // 2] / 1000,
                  p99_us=percentile(times, 0.99) / 1000, note=note, size_bytes=size, samples=n)


def run(quick: bool) -> list[Result]:
    import zenoh

    import capbus

    n = 500 if quick else 5000
    secs = 0.5 if quick else 2.0
    d = tempfile.mkdtemp(prefix="cbbench-gw-")
    kernels = [capbus.Kernel(os.path.join(d, f"{h}.sock"), audit=False) for h in "ab"]
    sa, sb = (os.path.join(d, f"{h}.sock") for h in "ab")
    children: list[subprocess.Popen[str]] = []
    rows: list[Result] = []
    proc = None
    raw = None
    try:
        gport, rport = _port(), _port()
        children.append(_child(_SERVICE, sb, "echo"))
        children.append(_child(_SERVICE, sa, "local"))
        children.append(_child(_GATEWAY, sb, json.dumps(
            {"name": "host-b", "listen": [f"tcp/127.0.0.1:{gport}"], "export": ["echo", "camera/*"]})))
        children.append(_child(_GATEWAY, sa, json.dumps(
            {"name": "host-a", "connect": [f"tcp/127.0.0.1:{gport}"]})))
        children.append(_child(_RAW, f"tcp/127.0.0.1:{rport}"))
        proc = capbus.connect(sa)
        local = proc.lookup("local", timeout=10)
        remote = proc.lookup("echo@host-b", timeout=30)
        c = zenoh.Config()
        c.insert_json5("mode", '"peer"')
        c.insert_json5("scouting/multicast/enabled", "false")
        c.insert_json5("transport/shared_memory/enabled", "false")
        c.insert_json5("connect/endpoints", json.dumps([f"tcp/127.0.0.1:{rport}"]))
        raw = zenoh.open(c)
        time.sleep(0.5)
        querier = raw.declare_querier("raw/q", timeout=10)
        # BLOCK: raw Zenoh's default (DROP) loses messages under load; capbus never does
        pub = raw.declare_publisher("raw/s", congestion_control=zenoh.CongestionControl.BLOCK)
        small = b"x" * 64

        def raw_get() -> None:
            for r in querier.get(payload=small):
                r.ok  # noqa: B018 - the reply is what is waited for

        rows.append(_rtt("capbus local call", lambda: local.call(1, (), small, timeout=10), n,
                         "same host, no gateway", 64))
        rows.append(_rtt("capbus remote call via 2 gateways",
                         lambda: remote.call(1, (), small, timeout=10), n,
                         "client -> gw A -> zenoh -> gw B -> service", 64))
        rows.append(_rtt("raw zenoh-python get/queryable", raw_get, n, "two processes", 64))
        big = b"y" * (1 << 20)
        rows.append(_rtt("capbus remote call 1 MiB", lambda: remote.call(1, (), big, timeout=30),
                         max(20, n // 50), "payload both ways", 1 << 20))

        def raw_big() -> None:
            for r in querier.get(payload=big):
                r.ok  # noqa: B018

        rows.append(_rtt("raw zenoh get 1 MiB", raw_big, max(20, n // 50), "payload both ways",
                         1 << 20))
        # one-way: messages per second counted on arrival
        base = remote.call(6, timeout=10).data[0]
        t0 = time.perf_counter()
        sent = 0
        while time.perf_counter() - t0 < secs:
            try:
                remote.send_async(1, (), small)
                sent += 1
            except capbus.WouldBlock:
                time.sleep(0.0001)
        while remote.call(6, timeout=30).data[0] - base < sent:
            time.sleep(0.001)
        dt = time.perf_counter() - t0
        rows.append(Result("capbus remote send_async via 2 gateways", METRIC_THROUGHPUT,
                           msgs_per_s=sent / dt, note="counted by the service", size_bytes=64,
                           samples=sent))

        def raw_count() -> int:
            for r in raw.get("raw/q?count=1", timeout=10):  # type: ignore[union-attr]
                if r.ok is not None:
                    return int(r.ok.payload.to_bytes())
            return 0

        base = raw_count()
        t0 = time.perf_counter()
        sent = 0
        while time.perf_counter() - t0 < secs:
            pub.put(small)
            sent += 1
        got = 0
        deadline = time.perf_counter() + 30
        while got < sent and time.perf_counter() < deadline:
            got = raw_count() - base
            time.sleep(0.001)
        dt = time.perf_counter() - t0
        rows.append(Result("raw zenoh-python put/subscriber", METRIC_THROUGHPUT,
                           msgs_per_s=got / dt, note="counted by the subscriber", size_bytes=64,
                           samples=sent))
        children.append(_child(_PUB, sb, "camera/b"))
        sub = proc.subscribe("camera/b@host-b", timeout=30)
        sub.recv(timeout=30).release()  # the flow is up
        t0 = time.perf_counter()
        got = 0
        while time.perf_counter() - t0 < secs:
            sub.recv(timeout=10).release()
            got += 1
        dt = time.perf_counter() - t0
        rows.append(Result("capbus remote topic via 2 gateways", METRIC_THROUGHPUT,
                           msgs_per_s=got / dt, note="samples delivered to a subscriber on A",
                           size_bytes=64, samples=got))
        sub.close()
    finally:
        if raw is not None:
            raw.close()
        if proc is not None:
            proc.close()
        for p in reversed(children):
            if p.stdin:
                p.stdin.close()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for k in kernels:
            k.stop()
        shutil.rmtree(d, ignore_errors=True)
    return rows
