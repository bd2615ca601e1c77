"""capbus itself, measured the way the peers are: two real processes, a real kernel.

The server is a child process running the ordinary public loop (svc.recv(); req.reply(...)); the
client is this process calling ep.call(). Both are pinned like the C anchors (different CPUs, or
the same CPU), so capbus and the anchors are compared under the same placement.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

from .table import METRIC_ROUND_TRIP, Result, percentile

_SERVER = """
import os, sys, capbus
cpu = int(sys.argv[2])
if cpu >= 0:
    os.sched_setaffinity(0, {cpu})
p = capbus.connect(wait=sys.argv[1])
svc = p.register("bench")
print("ready", flush=True)
while True:
    req = svc.recv()
    req.reply(req.opcode, req.data, req.payload)
"""


@contextmanager
def _pinned(cpu: int):
    old = os.sched_getaffinity(0)
    if cpu >= 0:
        os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


@contextmanager
def echo_server(wait: str, cpu: int = -1):
    """An embedded kernel and an echo service in a child process; yields this side's Endpoint."""
    import capbus

    with tempfile.TemporaryDirectory(prefix="cb-bench-") as tmp:
        kernel = capbus.Kernel(os.path.join(tmp, "k.sock"))
        env = dict(os.environ, CAPBUS_SOCKET=kernel.socket_path)
        child = subprocess.Popen([sys.executable, "-c", _SERVER, wait, str(cpu)], env=env,
                                 stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        try:
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError("the bench server did not start")
            with capbus.connect(kernel.socket_path, wait=wait) as proc:
                yield proc.lookup("bench", timeout=10)
        finally:
            child.kill()
            child.wait(10)
            child.stdout.close()
            kernel.stop()


def call_round_trip(wait: str, placement: str, iterations: int = 200_000,
                    payload: bytes = b"") -> Result:
    """Median/p99 of ep.call() with 48-byte messages (4 x u64 of data)."""
    cpus = sorted(os.sched_getaffinity(0))
    if placement == "cross-CPU" and len(cpus) < 2:
        return Result.skip(f"capbus {wait}", METRIC_ROUND_TRIP, "needs two CPUs")
    server_cpu, client_cpu = (cpus[0], cpus[1]) if placement == "cross-CPU" else (cpus[0], cpus[0])
    with echo_server(wait, server_cpu) as ep, _pinned(client_cpu):
        data = (1, 2, 3, 4)
        call = ep.call
        for _ in range(min(20_000, iterations)):
            call(1, data, payload)
        clock = time.perf_counter_ns
        samples = []
        append = samples.append
        for _ in range(iterations):
            t0 = clock()
            call(1, data, payload)
            append(clock() - t0)
    samples.sort()
    return Result(f"capbus {wait}", METRIC_ROUND_TRIP, percentile(samples, 0.5) / 1000,
                  percentile(samples, 0.99) / 1000, note=f"ep.call, {placement}, pinned",
                  samples=len(samples), size_bytes=48 + len(payload))


def run_calls(quick: bool = False) -> list[Result]:
    n = 2_000 if quick else 200_000
    nb = 1_000 if quick else 50_000  # blocking round trips are ~100x slower on this kind of VM
    rows = [
        call_round_trip("spin", "cross-CPU", n),
        call_round_trip("adaptive", "cross-CPU", n),
        call_round_trip("block", "cross-CPU", nb),
        call_round_trip("block", "same CPU", nb),
    ]
    return rows
