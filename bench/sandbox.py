"""`capbus bench --only sandbox`: what a sandbox adds to launching a process, and to its calls.

Measured: from kernel.spawn() until the child's first capbus call is answered (the server's
reply time), plain and sandboxed, alternating runs so that drift in the machine's load hits both
alike. To show where the difference comes from, how long subprocess.Popen() itself takes
without and with a (no-op) preexec_fn: a preexec_fn makes Popen fork instead of vfork. And the
hot path: the round trip of a small call from a plain and from a sandboxed child, in spin and
in block mode (block mode makes futex syscalls, each of which passes the seccomp filter), the
children alternating. Children reach the service through a startup grant: a sandboxed process
may look nothing up.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from .results import METRIC_ROUND_TRIP, Result, percentile

METRIC_SPAWN = "spawn_to_first_call"  # not a round trip: the plot leaves these rows out
_SERVICE = "bench.sandbox.echo"
_CHILD = """
import capbus
p = capbus.connect()
p.grant("echo", timeout=30).call(1, timeout=30)
"""
# Times its own calls and reports median and p99 (ns) in one last call (opcode 2).
_CALLER = """
import sys, time
import capbus
p = capbus.connect(wait=sys.argv[1])
ep = p.grant("echo", timeout=30)
n = int(sys.argv[2])
for _ in range(n // 10):
    ep.call(1, timeout=30)
lat = []
for _ in range(n):
    t0 = time.perf_counter_ns()
    ep.call(1, timeout=30)
    lat.append(time.perf_counter_ns() - t0)
lat.sort()
ep.call(2, data=(lat[len(lat) // 2], lat[min(n - 1, int(n * 0.99))], 0, 0), timeout=30)
"""


def _row(mechanism: str, samples_s: list[float], note: str) -> Result:
    us = sorted(s * 1e6 for s in samples_s)
    return Result(mechanism, METRIC_SPAWN, median_us=statistics.median(us),
                  p99_us=percentile(us, 0.99), note=note, size_bytes=0, samples=len(us))


def run_spawn(quick: bool, rounds: int | None = None) -> list[Result]:
    """Rows: plain spawn, sandboxed spawn, Popen without and with a preexec_fn (in that order).
    rounds: of each kind (default 30, quick 10)."""
    from capbus._kernel.kernel import Kernel
    from capbus._kernel.sandbox import Sandbox
    from capbus._runtime.process import connect

    avail = Sandbox.available()
    rounds = rounds or (10 if quick else 30)
    tmp = tempfile.mkdtemp(prefix="cb-bench-sbx-")
    script = os.path.join(tmp, "child.py")
    with open(script, "w") as f:
        f.write(_CHILD.format(name=_SERVICE))
    answered: list[float] = []
    got = threading.Event()

    def handler(req: object) -> int:
        answered.append(time.perf_counter())
        got.set()
        return 0

    plain: list[float] = []
    boxed: list[float] = []
    skipped = ""
    try:
        with Kernel(os.path.join(tmp, "k.sock"), audit=None) as kernel:
            server = connect(kernel.socket_path)
            svc = server.register(_SERVICE)
            t = threading.Thread(target=svc.serve, args=(handler,), daemon=True)
            t.start()
            try:
                sandbox = None
                try:
                    sandbox = Sandbox()
                    sandbox.check()
                except Exception as exc:  # the plain row is still worth printing
                    skipped = f"{type(exc).__name__}: {exc}"
                    sandbox = None
                for i in range(2 * rounds):
                    box = sandbox if i % 2 else None
                    if i % 2 and box is None:
                        continue
                    got.clear()
                    t0 = time.perf_counter()
                    child = kernel.spawn([sys.executable, script], sandbox=box,
                                         grants={"echo": _SERVICE})
                    if not got.wait(60):
                        child.kill()
                        raise RuntimeError("a bench child made no call within 60 s")
                    (boxed if i % 2 else plain).append(answered[-1] - t0)
                    child.wait(30)
            finally:
                server.close()
                t.join(5)
        rows = [_row("kernel.spawn, plain", plain, "spawn() -> first call answered")]
        if boxed:
            abi = avail["landlock_abi"]
            rows.append(_row("kernel.spawn, sandboxed", boxed,
                             f"Landlock ABI {abi} + seccomp, same child"))
        else:
            rows.append(Result("kernel.spawn, sandboxed", METRIC_SPAWN, note=skipped,
                               skipped=True, size_bytes=0))
        rows += _popen_rows(rounds)
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_calls(quick: bool, rounds: int | None = None) -> list[Result]:
    """Rows: the round trip from a plain and from a sandboxed child, for each wait mode ("spin",
    "block"), children alternating; each row is the median over its children of their medians.
    The server is a thread of this process waiting in the same mode."""
    from capbus._kernel.kernel import Kernel
    from capbus._kernel.sandbox import Sandbox
    from capbus._runtime.process import connect

    rounds = rounds or (2 if quick else 5)
    n = 2_000 if quick else 20_000
    tmp = tempfile.mkdtemp(prefix="cb-bench-sbx-")
    script = os.path.join(tmp, "caller.py")
    with open(script, "w") as f:
        f.write(_CALLER)
    try:
        sandbox: Sandbox | None = Sandbox()
        sandbox.check()
    except Exception:  # the plain rows are still worth printing
        sandbox = None
    rows: list[Result] = []
    try:
        for mode in ("spin", "block"):
            reported: list[tuple[int, int]] = []
            got = threading.Event()

            def handler(req: Any, reported: list = reported, got: threading.Event = got) -> int:
                if req.opcode == 2:
                    reported.append((req.data[0], req.data[1]))
                    got.set()
                return 0

            samples: dict[bool, list[tuple[int, int]]] = {False: [], True: []}
            with Kernel(os.path.join(tmp, f"{mode}.sock"), audit=None) as kernel:
                server = connect(kernel.socket_path, wait=mode)
                svc = server.register(_SERVICE)
                t = threading.Thread(target=svc.serve, args=(handler,), daemon=True)
                t.start()
                try:
                    for i in range(2 * rounds):
                        boxed = bool(i % 2)
                        if boxed and sandbox is None:
                            continue
                        got.clear()
                        child = kernel.spawn([sys.executable, script, mode, str(n)],
                                             sandbox=sandbox if boxed else None,
                                             grants={"echo": _SERVICE})
                        if not got.wait(120):
                            child.kill()
                            raise RuntimeError("a bench caller reported nothing within 120 s")
                        samples[boxed].append(reported[-1])
                        child.wait(30)
                finally:
                    server.close()
                    t.join(5)
            for boxed, what in ((False, "plain"), (True, "sandboxed")):
                got_ = samples[boxed]
                name = f"capbus {mode} call from a {what} child"
                if not got_:
                    rows.append(Result.skip(name, METRIC_ROUND_TRIP, "no sandbox on this Linux"))
                    continue
                rows.append(Result(name, METRIC_ROUND_TRIP,
                                   median_us=statistics.median(m for m, _ in got_) / 1e3,
                                   p99_us=statistics.median(p for _, p in got_) / 1e3,
                                   note=f"{len(got_)} children x {n} calls, median of medians",
                                   samples=len(got_) * n))
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _popen_rows(rounds: int) -> list[Result]:
    """Popen() of /bin/true from this (the kernel's) process: vfork, then fork for preexec_fn."""
    true = shutil.which("true") or "/bin/true"
    fast: list[float] = []
    forked: list[float] = []
    for i in range(2 * rounds):
        kw = {"preexec_fn": int} if i % 2 else {}
        t0 = time.perf_counter()
        p = subprocess.Popen([true], close_fds=True, **kw)
        (forked if i % 2 else fast).append(time.perf_counter() - t0)
        p.wait()
    return [_row("Popen() returns, no preexec_fn", fast, "vfork where CPython can"),
            _row("Popen() returns, no-op preexec_fn", forked, "fork: what a sandbox's spawn uses")]
