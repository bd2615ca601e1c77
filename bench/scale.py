"""Scale benchmark: one kernel (a daemon subprocess) and N processes connected to it at once.

One parent that has imported capbus but not connected forks N children. The phases are gated
(each child blocks reading one byte of a per-phase "go" pipe, the parent writes N bytes), so each
is timed on its own, as wall time from the parent's go to the last child's report:

  fork      the N children exist and are ready
  connect   each calls capbus.connect(path)
  register  each registers "scale-<i>"
  lookup    each looks up "scale-<(i+1) % N>" (with a timeout)
  exit      each closes its Process and exits; the parent reaps them all

Its table (it asserts nothing) shows the rates, and the kernel's RSS and fd count when idle,
with all N connected, and after they have all gone.

    python -m bench.scale --n 1000

run_mesh() (what `capbus bench --only scale` runs) adds live channels: N processes, S of them
serving, C channels each checked with a real call, then a bystander's lookups and fresh
processes' first calls while all are live (see its comment block below).

    python -m bench.scale --n 1000 --channels 10000 --services 100
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from typing import Any

PHASES = ("fork", "connect", "register", "lookup", "exit")
_UNITS = {
    "fork": "forks/s",
    "connect": "connects/s",
    "register": "registrations/s",
    "lookup": "lookups/s",
    "exit": "exits/s",
}
ROW_KEYS = ("metric", "value", "unit", "n", "seconds", "note")
_CHILD_ALARM = 600  # no child can outlive a broken run by more than this (seconds)


# ---- the kernel daemon --------------------------------------------------------------------------


class _Daemon:
    def __init__(self, path: str, log_path: str) -> None:
        import capbus

        src = os.path.dirname(os.path.dirname(os.path.abspath(capbus.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        env.pop("CAPBUS_FD", None)
        self.path = path
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "capbus", "kernel", "--socket", path],
            env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the kernel daemon did not start: {self.log()}")
            time.sleep(0.02)

    def _ready(self) -> bool:
        if not os.path.exists(self.path):
            return False
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            probe.connect(self.path)  # closed at once: the kernel sees a process come and go
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-2000:]

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def uss_mb(self) -> float:
        """Memory only the kernel maps (private pages): what it costs beyond shared memfds."""
        total = 0
        with open(f"/proc/{self.proc.pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1])
        return total / 1024

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def settle_fds(self, target: int, timeout: float, quiet: float = 1.0) -> int:
        """Wait (up to `timeout`) for the fd count to come down to `target`, or to stay
        unchanged for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        last, since = self.fds(), time.monotonic()
        while time.monotonic() < deadline and last > target:
            time.sleep(0.02)
            now = self.fds()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return last

    def stop(self) -> int | None:
        code = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        else:
            code = self.proc.returncode
        self._log.close()
        return code


# ---- the children -------------------------------------------------------------------------------


class _Pipes:
    def __init__(self, phases: Iterable[str] = PHASES[1:]) -> None:
        self.report_r, self.report_w = os.pipe()
        self.go = {phase: os.pipe() for phase in phases}  # phase -> (r, w)

    def report(self, i: int, tag: str, text: str = "") -> None:
        """A child's line to the parent: what child i has done."""
        os.write(self.report_w, f"{tag} {i} {text}".rstrip().encode()[:500] + b"\n")

    def wait(self, phase: str) -> None:
        """A child waits for the parent's go for this phase (exits if the parent has gone)."""
        if os.read(self.go[phase][0], 1) != b"g":
            os._exit(2)

    def close_in_child(self) -> None:
        """A child keeps only what it uses, so that EOF tells it the parent has gone."""
        os.close(self.report_r)
        for _, w in self.go.values():
            os.close(w)

    def close_in_parent(self) -> None:
        for fd in (self.report_r, self.report_w, *(fd for pair in self.go.values() for fd in pair)):
            with contextlib.suppress(OSError):
                os.close(fd)


def _child_setup(pipes: _Pipes) -> None:
    """A forked child's first steps: default signal handlers, an alarm, only its own pipe ends."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # not whatever handler the parent had
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.alarm(_CHILD_ALARM)
    pipes.close_in_child()


def _child(i: int, n: int, path: str, pipes: _Pipes) -> None:
    """Runs in a forked child; never returns."""
    code = 1
    try:
        _child_setup(pipes)
        import capbus

        def report(tag: str, text: str = "") -> None:
            pipes.report(i, tag, text)

        go = pipes.wait

        report("ready")
        proc = None
        phase = "connect"
        try:
            go("connect")
            proc = capbus.connect(path)
            report("connect")
            phase = "register"
            go("register")
            proc.register(f"scale-{i}")
            report("register")
            phase = "lookup"
            go("lookup")
            ep = proc.lookup(f"scale-{(i + 1) % n}", timeout=60)
            if ep.process_id == proc.id and n > 1:
                raise RuntimeError("lookup answered with the wrong process")
            report("lookup")
            phase = "exit"
            go("exit")
            proc.close()
            proc = None
            code = 0
        except Exception as exc:
            report("error", f"{phase}: {type(exc).__name__}: {exc}")
            code = 3
        finally:
            if proc is not None:
                with contextlib.suppress(Exception):
                    proc.close()
    finally:
        os._exit(code)


class _Reports:
    """Lines from the children's shared report pipe."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""
        self.errors: list[str] = []
        self.failed: set[int] = set()
        self.texts: dict[int, str] = {}  # child -> the text of its last report

    def collect(self, tag: str, expected: Iterable[int], timeout: float) -> float:
        """Wait until every child in `expected` has reported `tag` (or an error); the time of
        the last report."""
        waiting = set(expected)
        deadline = time.monotonic() + timeout
        last = time.perf_counter()
        while waiting:
            while b"\n" not in self.buf:
                left = deadline - time.monotonic()
                r, _, _ = select.select([self.fd], [], [], max(0.0, left))
                if not r:
                    raise TimeoutError(f"{len(waiting)} children did not report {tag!r} "
                                       f"within {timeout} s")
                chunk = os.read(self.fd, 1 << 16)
                if not chunk:
                    raise RuntimeError("the report pipe closed")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\n", 1)
            last = time.perf_counter()
            word, idx, *rest = line.decode(errors="replace").split(" ", 2)
            child = int(idx)
            if word == "error":
                self.errors.append(f"child {child}: {rest[0] if rest else ''}")
                self.failed.add(child)
                waiting.discard(child)
            elif word == tag:
                waiting.discard(child)
                self.texts[child] = rest[0] if rest else ""
            else:
                raise RuntimeError(f"unexpected report {line!r} while waiting for {tag!r}")
        return last


# ---- the run ------------------------------------------------------------------------------------


def _raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _row(metric: str, value: float, unit: str, n: int, seconds: float | None = None,
         note: str = "") -> dict[str, Any]:
    return {"metric": metric, "value": float(value), "unit": unit, "n": n,
            "seconds": None if seconds is None else float(seconds), "note": note}


def run(n: int = 1000, quick: bool = False) -> list[dict]:
    """Run the benchmark with `n` processes (`quick`: at most 50); print_table() shows it.

    Returns one dict per table row, with the keys ROW_KEYS: metric, value (float), unit, n,
    seconds (the phase's wall time, or None for a measurement) and note.
    """
    if quick:
        n = min(n, 50)
    if n < 1:
        raise ValueError("n must be >= 1")
    phase_timeout = 30.0 + n * 0.1
    _raise_nofile()
    tmp = tempfile.mkdtemp(prefix="cb-scale-")
    path = os.path.join(tmp, "k.sock")
    daemon = _Daemon(path, os.path.join(tmp, "kernel.log"))
    pipes = _Pipes()
    reports = _Reports(pipes.report_r)
    pids: dict[int, int] = {}  # child index -> pid
    exited: dict[int, int] = {}  # pid -> exit code
    seconds: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    try:
        # After the start-up probe connection's teardown:
        idle_fds, idle_rss = daemon.settle_fds(0, 2.0, quiet=0.2), daemon.rss_mb()
        gc.collect()
        gc.freeze()  # fewer copy-on-write faults in the children
        sys.stdout.flush()
        sys.stderr.flush()

        t0 = time.perf_counter()
        for i in range(n):
            pid = os.fork()
            if pid == 0:
                _child(i, n, path, pipes)
            pids[i] = pid
        last = reports.collect("ready", range(n), phase_timeout)
        seconds["fork"] = last - t0
        first_go = None
        for phase in PHASES[1:-1]:
            alive = [i for i in range(n) if i not in reports.failed]
            start = time.perf_counter()
            first_go = first_go or start
            os.write(pipes.go[phase][1], b"g" * len(alive))
            last = reports.collect(phase, alive, phase_timeout)
            seconds[phase] = last - start
        all_three = last - (first_go or last)
        connected_fds, connected_rss = daemon.fds(), daemon.rss_mb()

        alive = [i for i in range(n) if i not in reports.failed]
        start = time.perf_counter()
        os.write(pipes.go["exit"][1], b"g" * len(alive))
        for pid in pids.values():
            exited[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        seconds["exit"] = time.perf_counter() - start
        gc.unfreeze()
        after_fds = daemon.settle_fds(idle_fds, 10.0)
        after_rss = daemon.rss_mb()

        ok = len(alive)
        for phase in PHASES:
            count = n if phase == "fork" else ok
            rows.append(_row(phase, count / seconds[phase] if seconds[phase] > 0 else 0.0,
                             _UNITS[phase], count, seconds[phase]))
        rows.append(_row("connect+register+lookup", ok / all_three if all_three > 0 else 0.0,
                         "processes/s", ok, all_three, "from the first go to the last lookup"))
        rows += [
            _row("kernel RSS, idle", idle_rss, "MB", 0),
            _row(f"kernel RSS, {ok} connected", connected_rss, "MB", ok),
            _row("kernel RSS, after all exit", after_rss, "MB", 0),
            _row("kernel RSS per process", (connected_rss - idle_rss) * 1024 / max(ok, 1),
                 "KB", ok, None, "(connected - idle) / n"),
            _row("kernel fds, idle", idle_fds, "fds", 0),
            _row(f"kernel fds, {ok} connected", connected_fds, "fds", ok),
            _row("kernel fds, after all exit", after_fds, "fds", 0,
                 None, "" if after_fds == idle_fds else f"idle was {idle_fds}"),
        ]
        bad = {code for code in exited.values() if code != 0}
        if reports.errors or bad:
            note = f"{len(reports.errors)} errors, exit codes {sorted(bad)}: " + "; ".join(
                reports.errors[:3])
            rows.append(_row("failed processes", len(reports.failed), "processes", n, None, note))
    finally:
        for pid in pids.values():
            if pid not in exited:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for pid in pids.values():
            if pid not in exited:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
        with contextlib.suppress(ValueError):
            gc.unfreeze()
        pipes.close_in_parent()
        daemon.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    return rows


# ---- the mesh: N processes, S services, C live channels -----------------------------------------
#
# Every child connects; the first S also serve "mesh-<j>" (one serve thread each); every child then
# looks up K = C / N services and makes one real call on each (its first call opens the channel),
# and keeps them all open. With everything live, a bystander times lookups, and F fresh processes,
# one after the other, each time their first call on a fresh channel (lookup done; the call
# includes the channel's opening). Then everyone exits and the kernel's fds must come back down.

MESH_PHASES = ("fork", "connect", "register", "lookup", "open", "exit")
_OPCODE = 7


def _targets(i: int, services: int, per: int) -> list[int]:
    """The services child i calls: `per` distinct ones, never its own."""
    return [(i + 1 + k) % services for k in range(per)]


def _serve_mesh(req: Any) -> tuple[int, tuple[int, int]]:
    d = req.data
    return _OPCODE + 1, (d[0], d[1] + 1)


def _call_checked(ep: Any, a: int, b: int) -> None:
    r = ep.call(_OPCODE, (a, b), timeout=30)
    if r.opcode != _OPCODE + 1 or tuple(r.data[:2]) != (a, b + 1):
        raise RuntimeError(f"wrong reply {tuple(r)!r} from {ep!r}")


def _mesh_child(i: int, services: int, per: int, uid_bound: int, path: str,
                pipes: _Pipes) -> None:
    """A gated child of the mesh; never returns."""
    code = 1
    try:
        _child_setup(pipes)
        import threading

        import capbus

        def report(tag: str, text: str = "") -> None:
            pipes.report(i, tag, text)

        go = pipes.wait

        report("ready")
        proc = None
        phase = "connect"
        try:
            go("connect")
            proc = capbus.connect(path)
            report("connect")
            phase = "register"
            go("register")
            if i < services:
                svc = proc.register(f"mesh-{i}", max_channels_per_uid=uid_bound)
                threading.Thread(target=svc.serve, args=(_serve_mesh,), daemon=True).start()
            report("register")
            phase = "lookup"
            go("lookup")
            eps = [proc.lookup(f"mesh-{j}", timeout=60) for j in _targets(i, services, per)]
            report("lookup")
            phase = "open"
            go("open")
            for k, ep in enumerate(eps):
                _call_checked(ep, i, k)
            report("open")
            phase = "exit"
            go("exit")
            proc.close()
            proc = None
            code = 0
        except Exception as exc:
            report("error", f"{phase}: {type(exc).__name__}: {exc}")
            code = 3
        finally:
            if proc is not None:
                with contextlib.suppress(Exception):
                    proc.close()
    finally:
        os._exit(code)


def _quantiles(values: list[float]) -> str:
    """p50 p99 max of `values`, as the text of one report."""
    v = sorted(values)
    return " ".join(f"{_pick(v, q):.1f}" for q in (0.5, 0.99, 1.0))


def _solo_child(i: int, role: str, services: int, count: int, path: str, pipes: _Pipes) -> None:
    """The bystander ("lookups": `count` lookups, timed) or a fresh process ("first": its first
    call on a fresh channel, timed); reports microseconds and exits."""
    code = 1
    try:
        _child_setup(pipes)
        import capbus

        try:
            with capbus.connect(path) as proc:
                if role == "lookups":
                    times = []
                    for k in range(count):
                        t0 = time.perf_counter()
                        proc.lookup(f"mesh-{k % services}", timeout=5)
                        times.append((time.perf_counter() - t0) * 1e6)
                    text = _quantiles(times)
                else:
                    ep = proc.lookup(f"mesh-{i % services}", timeout=5)
                    t0 = time.perf_counter()
                    _call_checked(ep, i, 0)
                    t1 = time.perf_counter()
                    _call_checked(ep, i, 1)
                    t2 = time.perf_counter()
                    text = f"{(t1 - t0) * 1e6:.1f} {(t2 - t1) * 1e6:.1f}"
            os.write(pipes.report_w, f"{role} {i} {text}\n".encode())
            code = 0
        except Exception as exc:
            os.write(pipes.report_w, f"error {i} {role}: {type(exc).__name__}: {exc}"
                     .encode()[:500] + b"\n")
            code = 3
    finally:
        os._exit(code)


class _Snapshot:
    def __init__(self, daemon: _Daemon) -> None:
        self.fds, self.rss, self.uss = daemon.fds(), daemon.rss_mb(), daemon.uss_mb()


def run_mesh(n: int = 1000, channels: int = 10_000, services: int = 100, fresh: int = 100,
             lookups: int = 2000, kill_clients: float | None = None) -> list[dict]:
    """N processes, `services` of them serving, `channels` live channels (channels / n per
    process, each to another service), then a bystander's `lookups` and `fresh` new processes'
    first calls while all are live; print_table() shows it. Rows as run() returns them; a child
    that failed adds a "failed processes" row, and the fds check a "kernel fds, after all exit"
    row whose note names the idle count when they differ.

    kill_clients (for tests): this many seconds into the channel-opening phase, SIGKILL every
    child that does not serve (while they open channels and call); the bystander and the fresh
    processes then run against the surviving services, and the fds must still come back."""
    if n < 2 or not 1 <= services <= n:
        raise ValueError("need n >= 2 and 1 <= services <= n")
    per = channels // n
    if not 1 <= per < services:
        raise ValueError(f"{channels} channels over {n} processes: each would call {per} of "
                         f"{services} services; need 1 <= channels / n < services")
    channels = per * n
    load = [0] * services
    for i in range(n):
        for j in _targets(i, services, per):
            load[j] += 1
    # Every bench process has one uid: the default per-uid bound (1024) would cap a busy service.
    uid_bound = min(_core_max_channels() - 1, max(1024, max(load) + fresh // services + 16))
    phase_timeout = 30.0 + n * 0.1 + channels * 0.01
    _raise_nofile()
    tmp = tempfile.mkdtemp(prefix="cb-scale-")
    path = os.path.join(tmp, "k.sock")
    daemon = _Daemon(path, os.path.join(tmp, "kernel.log"))
    pipes = _Pipes(MESH_PHASES[1:])
    reports = _Reports(pipes.report_r)
    pids: dict[int, int] = {}  # child index -> pid
    exited: dict[int, int] = {}  # pid -> exit code
    seconds: dict[str, float] = {}
    rows: list[dict[str, Any]] = []

    def fork(index: int, target: Any, *args: Any) -> int:
        pid = os.fork()
        if pid == 0:
            target(index, *args)
        pids[index] = pid
        return pid

    def reap(pid: int) -> None:
        exited[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    try:
        daemon.settle_fds(0, 2.0, quiet=0.2)  # after the start-up probe connection's teardown
        idle = _Snapshot(daemon)
        gc.collect()
        gc.freeze()  # fewer copy-on-write faults in the children
        sys.stdout.flush()
        sys.stderr.flush()

        t0 = time.perf_counter()
        for i in range(n):
            fork(i, _mesh_child, services, per, uid_bound, path, pipes)
        seconds["fork"] = reports.collect("ready", range(n), phase_timeout) - t0
        snaps: dict[str, _Snapshot] = {}
        killed: list[int] = []
        for phase in MESH_PHASES[1:-1]:
            alive = [i for i in range(n) if i not in reports.failed]
            start = time.perf_counter()
            os.write(pipes.go[phase][1], b"g" * len(alive))
            if phase == "open" and kill_clients is not None:
                time.sleep(kill_clients)
                killed = [i for i in alive if i >= services]
                for i in killed:
                    os.kill(pids[i], signal.SIGKILL)
                for i in killed:
                    reap(pids[i])
                reports.failed.update(killed)  # not errors: they were told to die
                alive = [i for i in alive if i < services]
            seconds[phase] = reports.collect(phase, alive, phase_timeout) - start
            snaps[phase] = _Snapshot(daemon)
        ok = n - len(reports.failed)

        # Everything is live: a bystander's lookups, then fresh processes one at a time.
        reap(fork(n, _solo_child, "lookups", services, lookups, path, pipes))
        reports.collect("lookups", [n], 60)
        by_p50, by_p99, by_max = (float(x) for x in reports.texts.get(n, "nan nan nan").split())
        firsts: list[float] = []
        seconds_: list[float] = []
        for k in range(fresh):
            index = n + 1 + k
            reap(fork(index, _solo_child, "first", services, 0, path, pipes))
            reports.collect("first", [index], 60)
            if index in reports.texts:
                first, second = (float(x) for x in reports.texts[index].split())
                firsts.append(first)
                seconds_.append(second)
        live = _Snapshot(daemon)

        alive = [i for i in range(n) if i not in reports.failed]
        start = time.perf_counter()
        os.write(pipes.go["exit"][1], b"g" * len(alive))
        for i in range(n):
            if pids[i] not in exited:
                reap(pids[i])
        seconds["exit"] = time.perf_counter() - start
        gc.unfreeze()
        after_fds = daemon.settle_fds(idle.fds, 10.0)
        after_rss = daemon.rss_mb()

        conn, looked, opened = snaps["connect"], snaps["lookup"], snaps["open"]
        units = {"fork": "forks/s", "connect": "connects/s", "register": "processes/s",
                 "lookup": "processes/s", "open": "channels/s", "exit": "exits/s"}
        for phase in MESH_PHASES:
            count = channels if phase == "open" else (n if phase == "fork" else ok)
            note = {"register": f"{services} of them register a service",
                    "lookup": f"{per} lookups each", "open": "first real call on each channel",
                    "connect": "capbus.connect() in each"}.get(phase, "")
            rows.append(_row(phase, count / seconds[phase] if seconds[phase] > 0 else 0.0,
                             units[phase], count, seconds[phase], note))
        q = sorted(firsts)
        rows += [
            _row("bystander lookup p50", by_p50, "us", lookups, None, f"{ok} processes live"),
            _row("bystander lookup p99", by_p99, "us", lookups, None, f"max {by_max:.0f} us"),
            _row("fresh first call p50", _pick(q, 0.5), "us", len(q), None,
                 "fresh process: channel open + first call"),
            _row("fresh first call p99", _pick(q, 0.99), "us", len(q), None, "target < 5,000 us"),
            _row("fresh first call max", _pick(q, 1.0), "us", len(q), None,
                 f"{sum(x > 5000 for x in q)} over 5 ms"),
            _row("fresh second call p50", _pick(sorted(seconds_), 0.5), "us", len(seconds_), None,
                 f"p99 {_pick(sorted(seconds_), 0.99):.0f} us: the channel open is the rest"),
            _row("kernel RSS, idle", idle.rss, "MB", 0),
            _row(f"kernel RSS, {ok} connected", conn.rss, "MB", ok),
            _row(f"kernel RSS, {channels} channels", opened.rss, "MB", channels),
            _row("kernel RSS per process", (conn.rss - idle.rss) * 1024 / max(ok, 1), "KB", ok,
                 None, "(connected - idle) / n"),
            _row("kernel USS per process", (conn.uss - idle.uss) * 1024 / max(ok, 1), "KB", ok,
                 None, "private pages only"),
            _row("kernel RSS per channel", (opened.rss - looked.rss) * 1024 / channels, "KB",
                 channels, None, "(channels open - looked up) / channels"),
            _row("kernel USS per channel", (opened.uss - looked.uss) * 1024 / channels, "KB",
                 channels, None, "private pages only"),
            _row("kernel fds, idle", idle.fds, "fds", 0),
            _row(f"kernel fds, {ok} connected", conn.fds, "fds", ok),
            _row(f"kernel fds, {channels} channels", opened.fds, "fds", channels),
            _row("kernel fds per process", (conn.fds - idle.fds) / max(ok, 1), "fds", ok, None,
                 "socket + pidfd"),
            _row("kernel fds per channel", (opened.fds - looked.fds) / channels,
                 "fds", channels, None, "the kernel keeps none once both ends have theirs"),
            _row("kernel fds, all live + fresh done", live.fds, "fds", channels),
            _row("kernel RSS, after all exit", after_rss, "MB", 0),
            _row("kernel fds, after all exit", after_fds, "fds", 0, None,
                 "back to idle" if after_fds == idle.fds else f"idle was {idle.fds}"),
        ]
        if killed:
            rows.append(_row("killed clients", len(killed), "processes", n, None,
                             f"SIGKILL {kill_clients} s into the open phase"))
        dead = {pids[i] for i in killed}
        bad = {code for pid, code in exited.items() if code != 0 and pid not in dead}
        if reports.errors or bad:
            note = f"{len(reports.errors)} errors, exit codes {sorted(bad)}: " + "; ".join(
                reports.errors[:3])
            rows.append(_row("failed processes", len(reports.errors) or len(bad), "processes",
                             n, None, note))
    finally:
        _kill_rest(pids, exited)
        with contextlib.suppress(ValueError):
            gc.unfreeze()
        pipes.close_in_parent()
        daemon.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _pick(sorted_values: list[float], q: float) -> float:
    """The nearest-rank quantile: of 100 values, p99 is the 99th (not the largest)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(len(sorted_values), rank) - 1]


def _core_max_channels() -> int:
    from capbus import _core

    return int(_core.MAX_CHANNELS)


def _kill_rest(pids: dict[int, int], exited: dict[int, int]) -> None:
    for pid in pids.values():
        if pid not in exited:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for pid in pids.values():
        if pid not in exited:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def format_table(rows: list[dict[str, Any]], n: int, nofile: int | None = None,
                 title: str | None = None) -> str:
    try:
        from .results import machine_line

        machine = machine_line()
    except Exception:  # the shared table module is optional here
        import platform

        machine = (f"{os.cpu_count()} cores | Linux {platform.release()} | "
                   f"Python {platform.python_version()}")

    def value(r: dict[str, Any]) -> str:
        v = r["value"]
        return f"{v:,.0f}" if abs(v) >= 100 or r["unit"] == "fds" else f"{v:,.1f}"

    cells = [
        [r["metric"], value(r), r["unit"],
         "-" if r["seconds"] is None else f"{r['seconds']:.3f}", r["note"]]
        for r in rows
    ]
    headers = ["metric", "value", "unit", "seconds", "note"]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

    def line(c: list[str]) -> str:
        return "  ".join([c[0].ljust(widths[0]), c[1].rjust(widths[1]), c[2].ljust(widths[2]),
                          c[3].rjust(widths[3]), c[4]]).rstrip()

    title = title or f"capbus scale: {n} processes on one kernel daemon"
    if nofile is not None:
        title += f" (RLIMIT_NOFILE {nofile})"
    out = [title, machine, line(headers), "-" * len(line(headers))]
    out += [line(c) for c in cells]
    return "\n".join(out)


def print_table(rows: list[dict[str, Any]], n: int, nofile: int | None = None,
                title: str | None = None) -> None:
    print(format_table(rows, n, nofile, title), flush=True)


def mesh_title(n: int, channels: int, services: int) -> str:
    return (f"capbus scale: {n} processes, {channels:,} live channels to {services} services, "
            "one kernel daemon")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="number of processes (default 1000)")
    parser.add_argument("--quick", action="store_true", help="at most 50 processes")
    parser.add_argument("--channels", type=int, default=0,
                        help="the mesh: this many live channels (e.g. 10000), see run_mesh()")
    parser.add_argument("--services", type=int, default=100, help="the mesh's services")
    parser.add_argument("--fresh", type=int, default=100,
                        help="the mesh's fresh processes timing a first call")
    args = parser.parse_args(argv)
    n = min(args.n, 50) if args.quick else args.n
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if args.channels:
        services = min(args.services, n)
        rows = run_mesh(n, args.channels, services, args.fresh)
        print_table(rows, n, nofile, mesh_title(n, args.channels // n * n, services))
    else:
        print_table(run(args.n, args.quick), n, nofile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
