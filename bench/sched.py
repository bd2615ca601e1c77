"""Scheduling: what a timeout costs on each wait path, what priority propagation buys a
foreground caller under background load, and how many client processes one service serves.

Sections (python -m bench --only X):
  timed    calls and receives with and without a timeout, every wait mode, pinned, alternating
           rounds, next to the C futex ping-pong (block) and the pure-Python spin ping-pong (spin)
  sched    a foreground caller's latency while a nice-19 client hammers the same service and a
           nice-0 hog burns the same CPU: with the caller's priority propagated, and without
  clients  1..16 client processes calling one service: aggregate calls/s and per-client spread
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

from .capbus_calls import _pinned
from .results import METRIC_ROUND_TRIP, METRIC_THROUGHPUT, Result, percentile

# ---- timed vs untimed ----------------------------------------------------------------------------

_ECHO = """
import os, sys, capbus
cpu, wait, timeout = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.sched_setaffinity(0, {cpu})
p = capbus.connect(wait=wait)
svc = p.register("bench")
t = None if timeout == "none" else float(timeout)
print("ready", flush=True)

def serve(svc, t):  # the loop the README teaches, with or without a timeout on recv
    while True:
        try:
            req = svc.recv(t)
        except capbus.Timeout:
            continue
        req.reply(req.opcode, req.data, req.payload)

serve(svc, t)
"""


@contextmanager
def _kernel():
    import capbus

    with tempfile.TemporaryDirectory(prefix="cb-bench-") as tmp:
        kernel = capbus.Kernel(os.path.join(tmp, "k.sock"), audit=None)
        try:
            yield kernel
        finally:
            kernel.stop()


def _child(kernel, code: str, *args: str, nice: int = 0, stdin: int = subprocess.DEVNULL
           ) -> subprocess.Popen:
    env = dict(os.environ, CAPBUS_SOCKET=kernel.socket_path)
    pre = (lambda: os.setpriority(os.PRIO_PROCESS, 0, nice)) if nice else None
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stdin=stdin,
                            preexec_fn=pre)  # noqa: PLW1509 - only a nice value


def _ready(child: subprocess.Popen) -> None:
    if child.stdout.readline().strip() != "ready":
        raise RuntimeError("a bench child did not start")


def _stop(*children: subprocess.Popen) -> None:
    for c in children:
        c.kill()
    for c in children:
        c.wait(10)
        c.stdout.close()
        if c.stdin:
            c.stdin.close()


def _calls(call, n: int) -> float:
    """Median ns of n untimed calls (a function of its own: fast locals, as the peers)."""
    clock, d, s = time.perf_counter_ns, (1, 2, 3, 4), []
    append = s.append
    for _ in range(n):
        t0 = clock()
        call(1, d)
        append(clock() - t0)
    s.sort()
    return s[len(s) // 2]


def _calls_timed(call, n: int) -> float:
    """As _calls, every call with timeout=10 (a careful caller)."""
    clock, d, s = time.perf_counter_ns, (1, 2, 3, 4), []
    append = s.append
    for _ in range(n):
        t0 = clock()
        call(1, d, timeout=10)
        append(clock() - t0)
    s.sort()
    return s[len(s) // 2]


def _alone(other: subprocess.Popen, calls, *args) -> float:
    """calls(*args) with the `other` server stopped meanwhile."""
    other.send_signal(signal.SIGSTOP)
    try:
        return calls(*args)
    finally:
        other.send_signal(signal.SIGCONT)


def _median(v: list[float]) -> float:
    return percentile(sorted(v), 0.5)


def run_timed(quick: bool) -> list[Result]:
    """Every wait mode and placement: untimed calls to an untimed server, and calls with
    timeout=10 to a server receiving with recv(0.2), in alternating rounds (ABBA); the C futex
    ping-pong (block) and the pure-Python spin (spin) alternate with them."""
    import capbus

    from . import peers
    from .peers.pyshm import py_spin_round_trip

    cpus = sorted(os.sched_getaffinity(0))
    rounds, n = (2, 2_000) if quick else (7, 20_000)
    rows: list[Result] = []
    places = [("same CPU", cpus[0], cpus[0])]
    if len(cpus) > 1:
        places.insert(0, ("cross-CPU", cpus[0], cpus[1]))
    for wait in ("spin", "adaptive", "block"):
        for where, scpu, ccpu in places:
            if wait != "block" and where == "same CPU":
                continue  # two spinners on one CPU measure the scheduler's slice
            nn = n // 4 if wait == "block" else n
            with _kernel() as kernel:
                untimed = _child(kernel, _ECHO, str(scpu), wait, "none")
                timed = _child(kernel, _ECHO.replace('"bench"', '"bench-t"'), str(scpu), wait, "0.2")
                try:
                    _ready(untimed)
                    _ready(timed)
                    with capbus.connect(kernel.socket_path, wait=wait) as me:
                        ep_u, ep_t = me.lookup("bench", timeout=10), me.lookup("bench-t", timeout=10)
                        a, b, anchor = [], [], []
                        for i in range(rounds + 1):  # round 0 warms up
                            with _pinned(ccpu):  # (the anchors pin their own processes)
                                # The other server is stopped meanwhile: two spinning servers
                                # pinned to one CPU would halve each other. Odd rounds go
                                # untimed first, even ones timed first (ABBA): whichever runs
                                # second follows a SIGCONT and a server's first wake-up.
                                if i % 2:
                                    ua = _alone(timed, _calls, ep_u.call, nn)
                                    tb = _alone(untimed, _calls_timed, ep_t.call, nn)
                                else:
                                    tb = _alone(untimed, _calls_timed, ep_t.call, nn)
                                    ua = _alone(timed, _calls, ep_u.call, nn)
                            if i == 0:
                                continue
                            a.append(ua)
                            b.append(tb)
                            if wait == "adaptive":
                                continue
                            untimed.send_signal(signal.SIGSTOP)  # nor beside the anchor
                            timed.send_signal(signal.SIGSTOP)
                            try:
                                r = (peers.c_futex_round_trip(iterations=nn,
                                                              same_cpu=where == "same CPU")
                                     if wait == "block" else py_spin_round_trip(iterations=nn))
                            finally:
                                untimed.send_signal(signal.SIGCONT)
                                timed.send_signal(signal.SIGCONT)
                            if not r.skipped and r.median_us:
                                anchor.append(r.median_us * 1000)
                finally:
                    _stop(untimed, timed)
            note = f"{where}, pinned, median of {rounds} alternating rounds"
            ua, tb = _median(a) / 1000, _median(b) / 1000
            rows.append(Result(f"capbus {wait}, no timeout", METRIC_ROUND_TRIP, ua, note=note,
                               samples=nn * rounds))
            rows.append(Result(f"capbus {wait}, timeout=10 / recv(0.2)", METRIC_ROUND_TRIP, tb,
                               note=f"{note}; {tb / ua:.2f}x the untimed", samples=nn * rounds))
            if anchor:
                name = "C futex ping-pong" if wait == "block" else "pure-Python spin ping-pong"
                am = _median(anchor) / 1000
                rows.append(Result(name, METRIC_ROUND_TRIP, am,
                                   note=f"{where}, alternating; timed capbus {tb / am:.2f}x",
                                   samples=nn * rounds))
    return rows


# ---- priority propagation ------------------------------------------------------------------------

_WORK_SERVER = """
import hashlib, os, sys, threading, capbus
cpu, rng, size = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
os.sched_setaffinity(0, {cpu})
p = capbus.connect(wait="block")
svc = p.register("work", priority=None if rng == "none" else tuple(map(int, rng.split(","))))
buf = os.urandom(size)
print("ready", flush=True)

def handler(req):  # ~4 ms of CPU (more than a scheduler slice) without the GIL (hashlib)
    return (0, (hashlib.sha256(buf).digest()[0],))

# Two serving threads (Binder's pool): while one runs a background call's handler, the other
# takes the next call, at its own caller's priority.
for _ in range(2):
    threading.Thread(target=svc.serve, args=(handler,), daemon=True).start()
threading.Event().wait()
"""

_BACKGROUND = """
import os, sys, time, capbus
cpu = int(sys.argv[1])
os.sched_setaffinity(0, {cpu})
p = capbus.connect(wait="block")
ep = p.lookup("work", timeout=10)
print("ready", flush=True)
n = 0
while True:
    ep.call(1, timeout=10)
    n += 1
"""

_HOG = """
import os, sys
os.sched_setaffinity(0, {int(sys.argv[1])})
print("ready", flush=True)
while True:
    pass
"""


def run_priority(quick: bool) -> list[Result]:
    """All on one CPU: the server (block mode, two serving threads, a handler of ~4 ms of CPU
    that releases the GIL), a nice-19 client calling it flat out, a nice-0 busy loop, and the
    foreground caller measuring its calls: at nice -5, then SCHED_FIFO 10 (where permitted).
    Without propagation (no range declared) every handler runs at the server's nice 0, sharing
    the CPU with the hog; with it, range (0, 119): the
    foreground's handlers at its own priority, the background's at the server's nice 0; and
    range (-19, 119), the background's at nice 19 too (with ONE serving thread that would be a
    priority inversion for the call queued behind such a handler; with two, the other thread
    takes the urgent call)."""
    import capbus

    cpu = sorted(os.sched_getaffinity(0))[0]
    n = 30 if quick else 150
    rows: list[Result] = []
    for fg in ("nice -5", "SCHED_FIFO 10"):
        for label, rng in (("without propagation", "none"), ("propagated, range (0, 119)", "0,119"),
                           ("propagated, range (-19, 119)", "-19,119")):
            with _kernel() as kernel:
                server = _child(kernel, _WORK_SERVER, str(cpu), rng, str(8 << 20))
                _ready(server)
                bg = _child(kernel, _BACKGROUND, str(cpu), nice=19)
                hog = _child(kernel, _HOG, str(cpu))
                try:
                    _ready(bg)
                    _ready(hog)
                    with capbus.connect(kernel.socket_path, wait="block") as me, _pinned(cpu):
                        ep = me.lookup("work", timeout=10)
                        samples = _fg_calls(ep, fg, n)
                finally:
                    _stop(bg, hog, server)
            if samples is None:
                rows.append(Result.skip(f"foreground {fg}, {label}", METRIC_ROUND_TRIP,
                                        "SCHED_FIFO not permitted here"))
                continue
            samples.sort()
            rows.append(Result(f"foreground {fg}, {label}", METRIC_ROUND_TRIP,
                               percentile(samples, 0.5) / 1000, percentile(samples, 0.99) / 1000,
                               note="one CPU: 2-thread server + nice-19 caller + nice-0 hog",
                               samples=len(samples)))
    return rows


def _fg_calls(ep, fg: str, n: int) -> list[int] | None:
    """n calls from a thread at the foreground priority (ns each), or None if not permitted."""
    import threading

    from capbus import _core

    out: dict = {}

    def run() -> None:
        try:
            if fg.startswith("nice"):
                os.setpriority(os.PRIO_PROCESS, 0, int(fg.split()[1]))
            else:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(int(fg.split()[1])))
        except PermissionError:
            out["s"] = None
            return
        _core.refresh_priority()
        clock, s = time.perf_counter_ns, []
        for _ in range(n // 10):
            ep.call(1, timeout=10)
        for _ in range(n):
            t0 = clock()
            ep.call(1, timeout=10)
            s.append(clock() - t0)
            time.sleep(0.002)  # a foreground caller, not a flood
        out["s"] = s

    t = threading.Thread(target=run)
    t.start()
    t.join(600)
    return out.get("s")


# ---- many clients --------------------------------------------------------------------------------

_CLIENT = """
import os, resource, sys, time, capbus
dur = float(sys.argv[1])
p = capbus.connect()
ep = p.lookup("scale", timeout=10)
ep.call(1, timeout=10)
print("ready", flush=True)
sys.stdin.readline()  # every client is connected (no start-up competes with the calls): go
r0 = resource.getrusage(resource.RUSAGE_SELF)
end, n, call, d = time.time() + dur, 0, ep.call, (1, 2, 3, 4)
while True:
    for _ in range(100):
        call(1, d, timeout=10)
    n += 100
    if time.time() >= end:
        break
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(n, r1.ru_nvcsw - r0.ru_nvcsw, r1.ru_nivcsw - r0.ru_nivcsw, flush=True)
"""

_SCALE_SERVER = """
import capbus
p = capbus.connect()
svc = p.register("scale", max_channels_per_process=64)
print("ready", flush=True)
svc.serve(lambda req: (req.opcode, req.data))
"""

CLIENT_COUNTS = (1, 2, 4, 8, 16)


def _switches(pid: int) -> tuple[int, int]:
    """Voluntary and involuntary context switches of every thread of `pid` so far."""
    vol = inv = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        inv += int(line.split()[1])
        except OSError:
            continue  # a thread that ended meanwhile
    return vol, inv


def _capbus_clients(kernel, server: subprocess.Popen, k: int, dur: float) -> Result:
    cl = [_child(kernel, _CLIENT, str(dur), stdin=subprocess.PIPE) for _ in range(k)]
    try:
        for c in cl:
            _ready(c)
        time.sleep(0.2)  # the start-ups' last CPU (and the GC) settle
        s0 = _switches(server.pid)
        for c in cl:
            c.stdin.write("go\n")
            c.stdin.flush()
        out = [tuple(map(int, c.stdout.readline().split())) for c in cl]
        s1 = _switches(server.pid)
    finally:
        _stop(*cl)
    counts = [o[0] for o in out]
    calls = sum(counts) or 1
    cvol, cinv = sum(o[1] for o in out) / calls, sum(o[2] for o in out) / calls
    svol, sinv = (s1[0] - s0[0]) / calls, (s1[1] - s0[1]) / calls
    return Result(f"capbus, {k} client process{'es' if k > 1 else ''}", METRIC_THROUGHPUT,
                  msgs_per_s=sum(counts) / dur,
                  note=f"calls/s in all; per client min {min(counts) / dur:,.0f}"
                       f" max {max(counts) / dur:,.0f}/s (min {k * min(counts) / calls:.2f}x"
                       f" the mean); per call: clients {cvol:.2f} vol"
                       f" + {cinv:.2f} invol, server {svol:.2f} + {sinv:.2f} switches",
                  samples=sum(counts))


def _c_clients(k: int, dur: float, spin_ns: int, label: str) -> Result:
    from .peers import NativeUnavailable, c_clients

    name = f"C {label}, {k} client{'s' if k > 1 else ''}"
    try:
        out = c_clients(k, dur, spin_ns)
    except NativeUnavailable as exc:
        return Result.skip(name, METRIC_THROUGHPUT, str(exc))
    return Result(name, METRIC_THROUGHPUT, msgs_per_s=out["per_s"],
                  note=f"round trips/s in all; per client min {out['min_per_s']:,.0f}"
                       f" max {out['max_per_s']:,.0f}/s (min {k * out['min_per_s'] / out['per_s']:.2f}x"
                       f" the mean); {out['csw_per_call']:.2f} switches"
                       " per call (all processes)",
                  samples=int(out["per_s"] * dur))


def run_clients(quick: bool) -> list[Result]:
    """1, 2, 4, 8, 16 client processes, default (adaptive) mode, unpinned, each calling flat out
    for the same wall-clock window; aggregate calls/s, min/max calls per client and context
    switches per call. Next to each count, in the same run, the C reference of the same shape
    (bench/native/clients_pingpong.c): with capbus's default spin budget, then FUTEX_WAIT; with
    FUTEX_WAIT alone; and for one client, pure spin: the machine's own ceiling for the shape."""
    from capbus import _core

    dur = 0.5 if quick else 2.0
    spin = int(_core.DEFAULT_SPIN_NS)
    rows: list[Result] = []
    with _kernel() as kernel:
        server = _child(kernel, _SCALE_SERVER)
        _ready(server)
        try:
            for k in CLIENT_COUNTS:
                rows.append(_capbus_clients(kernel, server, k, dur))
                if k == 1:
                    rows.append(_c_clients(k, dur, -1, "pure spin"))
                rows.append(_c_clients(k, dur, spin, f"spin {spin // 1000} us, then futex"))
                rows.append(_c_clients(k, dur, 0, "futex only"))
        finally:
            _stop(server)
    return rows


def clients_target(rows: list[Result]) -> str:
    """The issue's target line: 16 clients against the best aggregate, for capbus and for the C
    reference (the best of C's waits at 16 against C's best anywhere), with the C futex-only
    row's ratio too (C's fair wait: no client starves)."""
    def rate(r: Result) -> float:
        return 0.0 if r.skipped else r.msgs_per_s or 0.0

    last = f"{CLIENT_COUNTS[-1]} client"
    ours = [r for r in rows if r.mechanism.startswith("capbus")]
    cs = [r for r in rows if r.mechanism.startswith("C ")]
    best_ours = max(map(rate, ours), default=0.0)
    best_c = max(map(rate, cs), default=0.0)
    ours16 = max((rate(r) for r in ours if last in r.mechanism), default=0.0)
    c16 = max((rate(r) for r in cs if last in r.mechanism), default=0.0)
    cfair16 = max((rate(r) for r in cs if last in r.mechanism and "futex only" in r.mechanism),
                  default=0.0)

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "n/a"

    return (f"Target: 16 clients >= 0.8x the best aggregate: capbus {ratio(ours16, best_ours)};"
            f" C reference {ratio(c16, best_c)} (futex only: {ratio(cfair16, best_c)});"
            f" capbus at 16 = {ratio(ours16, cfair16)} C futex only")
