"""`capbus bench --only sandbox`: what a sandbox adds to launching a process.

Measured: from kernel.spawn() until the child's first capbus call is answered (the server's
reply time), plain and sandboxed, alternating runs so that drift in the machine's load hits both
alike. And, to show where the difference comes from, how long subprocess.Popen() itself takes
without and with a (no-op) preexec_fn: a preexec_fn makes Popen fork instead of vfork.
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

from .table import Result, percentile

METRIC_SPAWN = "spawn_to_first_call"  # not a round trip: the plot leaves these rows out
_SERVICE = "bench.sandbox.echo"
_CHILD = """
import capbus
p = capbus.connect()
p.lookup({name!r}, timeout=30).call(1, timeout=30)
"""


def _row(mechanism: str, samples_s: list[float], note: str) -> Result:
    us = sorted(s * 1e6 for s in samples_s)
    return Result(mechanism, METRIC_SPAWN, median_us=statistics.median(us),
                  p99_us=percentile(us, 0.99), note=note, size_bytes=0, samples=len(us))


def run_spawn(quick: bool, rounds: int | None = None) -> list[Result]:
    """Rows: plain spawn, sandboxed spawn, Popen without and with a preexec_fn (in that order).
    rounds: of each kind (default 30, quick 10)."""
    from .._kernel.kernel import Kernel
    from .._kernel.sandbox import Sandbox
    from .._runtime.process import connect

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
                    child = kernel.spawn([sys.executable, script], sandbox=box)
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
