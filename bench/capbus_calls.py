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

from .results import METRIC_ROUND_TRIP, Result, percentile

_SERVER = """
import os, sys, capbus
cpu = int(sys.argv[2])
if cpu >= 0:
    os.sched_setaffinity(0, {cpu})
p = capbus.connect(wait=sys.argv[1])
svc = p.register("bench")
print("ready", flush=True)

def serve(svc):  # in a function, as a real server would be: its names are fast locals
    while True:
        req = svc.recv()
        req.reply(req.opcode, req.data, req.payload)

serve(svc)
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
        kernel = capbus.Kernel(os.path.join(tmp, "k.sock"), audit=None)
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
        _time_calls(ep.call, payload, min(20_000, iterations))
        samples = sorted(_time_calls(ep.call, payload, iterations))
    return Result(f"capbus {wait}", METRIC_ROUND_TRIP, percentile(samples, 0.5) / 1000,
                  percentile(samples, 0.99) / 1000, note=f"ep.call, {placement}, pinned",
                  samples=len(samples), size_bytes=48 + len(payload))


def _time_calls(call, payload: bytes, n: int) -> list[int]:
    """n timed calls (ns each); in a function, as the peers' loops are: fast locals."""
    data = (1, 2, 3, 4)
    clock = time.perf_counter_ns
    samples = []
    append = samples.append
    for _ in range(n):
        t0 = clock()
        call(1, data, payload)
        append(clock() - t0)
    return samples


def block_same_cpu_interleaved(rounds: int, n: int, anchor_iterations: int) -> list[Result]:
    """capbus block mode and the C futex ping-pong, both on one CPU, measured in alternating
    rounds against one echo server: [capbus row, C anchor row].

    On a virtual machine a same-CPU round trip moves by 10-20% from one minute to the next, for
    the C program as much as for capbus; measured minutes apart, the ratio of the two says more
    about the host than about capbus. Alternating rounds expose both to the same conditions.
    Each row gives the median of its rounds' medians (and of their p99s)."""
    from . import peers

    cpu = sorted(os.sched_getaffinity(0))[0]
    ours: list[tuple[float, float]] = []
    theirs: list[Result] = []
    skipped = None
    with echo_server("block", cpu) as ep, _pinned(cpu):
        _time_calls(ep.call, b"", min(20_000, n))
        for _ in range(rounds):
            anchor = peers.c_futex_round_trip(iterations=anchor_iterations, same_cpu=True)
            if anchor.skipped:
                skipped = anchor  # no C compiler: capbus is still measured, in rounds
            else:
                theirs.append(anchor)
            samples = sorted(_time_calls(ep.call, b"", n))
            ours.append((percentile(samples, 0.5) / 1000, percentile(samples, 0.99) / 1000))
    how = f"median of {rounds} rounds alternating with the other"
    capbus_row = Result("capbus block", METRIC_ROUND_TRIP, _median([m for m, _ in ours]),
                        _median([p for _, p in ours]),
                        note=f"ep.call, same CPU, pinned; {how}", samples=n * rounds)
    if skipped is not None or not theirs:
        return [capbus_row, skipped or Result.skip("C futex ping-pong (same CPU)",
                                                   METRIC_ROUND_TRIP, "no rounds")]
    anchor_row = Result(theirs[0].mechanism, METRIC_ROUND_TRIP,
                        _median([r.median_us or 0.0 for r in theirs]),
                        _median([r.p99_us or 0.0 for r in theirs]),
                        note=f"{theirs[0].note.split(';')[0]}; {how} (capbus block, same CPU)",
                        samples=sum(r.samples for r in theirs))
    return [capbus_row, anchor_row]


def _median(values: list[float]) -> float:
    return percentile(sorted(values), 0.5)


def run_calls(quick: bool = False) -> list[Result]:
    """capbus's rows, then the C futex same-CPU anchor (measured alternately with capbus block,
    same CPU): the caller puts that last row with the peers."""
    n = 2_000 if quick else 200_000
    nb = 1_000 if quick else 50_000  # blocking round trips are ~100x slower on this kind of VM
    rows = [
        call_round_trip("spin", "cross-CPU", n),
        call_round_trip("adaptive", "cross-CPU", n),
        call_round_trip("block", "cross-CPU", nb),
    ]
    rounds, per_round, anchor_n = (1, 1_000, 300) if quick else (7, 10_000, 40_000)
    return rows + block_same_cpu_interleaved(rounds, per_round, anchor_n)


# ---- one-way throughput (the asynchronous mailbox) -----------------------------------------------

_SENDER = """
import os, sys, capbus
cpu, n, batch = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if cpu >= 0:
    os.sched_setaffinity(0, {cpu})
p = capbus.connect(wait="spin")
ep = p.lookup("sink", timeout=10)
print("ready", flush=True)
sys.stdin.readline()

def send_all(ep, n, batch):  # in a function, as the peers' senders are: fast locals
    sent = 0
    data = (1, 2, 3, 4)
    if batch == 1:
        send, full = ep.send_async, capbus.WouldBlock
        while sent < n:
            try:
                send(1, data)
                sent += 1
            except full:
                pass
    elif batch == 0:  # send_async(timeout=None): the thread sleeps while the ring is full
        send = ep.send_async
        while sent < n:
            send(1, data, timeout=None)
            sent += 1
    elif batch < 0:  # asyncio: await asend, which waits for room in the event loop
        import asyncio

        async def go():
            s, asend = 0, ep.asend
            while s < n:
                await asend(1, data)
                s += 1
            return s

        sent = asyncio.run(go())
    else:
        msgs = [(1, data)] * batch
        while sent < n:
            sent += ep.send_many(msgs if n - sent >= batch else msgs[: n - sent])
    return sent

print("sent", send_all(ep, n, batch), flush=True)
"""


def one_way_throughput(batch: int, n: int) -> Result:
    """48-byte messages sender -> receiver, msgs/s timed at the receiver (first to last)."""
    import capbus

    cpus = sorted(os.sched_getaffinity(0))
    sender_cpu, receiver_cpu = (cpus[0], cpus[1]) if len(cpus) > 1 else (-1, -1)
    name = {1: "capbus send_async", 0: "capbus send_async(timeout=None)",
            -1: "capbus await asend"}.get(batch, f"capbus send_many x{batch}")
    with tempfile.TemporaryDirectory(prefix="cb-bench-") as tmp, \
            capbus.Kernel(os.path.join(tmp, "k.sock"), audit=None) as kernel, \
            capbus.connect(kernel.socket_path, wait="spin") as me, _pinned(receiver_cpu):
        svc = me.register("sink")
        env = dict(os.environ, CAPBUS_SOCKET=kernel.socket_path)
        child = subprocess.Popen([sys.executable, "-c", _SENDER, str(sender_cpu), str(n), str(batch)],
                                 env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            child.stdin.write("go\n")
            child.stdin.flush()
            got, first, recv_many = 0, 0, svc.recv_many
            while got < n:
                reqs = recv_many(256, 10.0)
                if not reqs:
                    raise RuntimeError(f"throughput run stalled after {got} of {n} messages")
                if not first:
                    first = time.perf_counter_ns()
                got += len(reqs)
            elapsed = time.perf_counter_ns() - first
        finally:
            child.kill()
            child.wait(10)
            child.stdout.close()
            child.stdin.close()
    return Result(name, "one_way_throughput", msgs_per_s=(n - 1) / (elapsed / 1e9) if elapsed else None,
                  note="sender child -> recv_many(256), spin, cross-CPU, pinned", samples=n)


def run_async(quick: bool = False) -> list[Result]:
    n = 20_000 if quick else 2_000_000
    return [one_way_throughput(1, n), one_way_throughput(0, n), one_way_throughput(-1, n),
            one_way_throughput(64, n), one_way_throughput(256, n)]


# ---- large payloads --------------------------------------------------------------------------------

def large_round_trip(size: int, how: str, iterations: int) -> Result:
    """Round trip of `size` bytes: "bytes" (copied through the arena) or "region" (a shared
    region passed with each call, the receiver maps it and touches one byte)."""
    import capbus

    with tempfile.TemporaryDirectory(prefix="cb-bench-") as tmp, \
            capbus.Kernel(os.path.join(tmp, "k.sock"), audit=None) as kernel:
        env = dict(os.environ, CAPBUS_SOCKET=kernel.socket_path)
        child = subprocess.Popen([sys.executable, "-c", _LARGE_SERVER], env=env,
                                 stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            with capbus.connect(kernel.socket_path, wait="spin") as proc:
                ep = proc.lookup("large", timeout=10)
                if how == "bytes":
                    payload = b"\x01" * size

                    def once():
                        ep.call(1, (), payload)
                elif how == "loan":

                    def once():
                        with ep.loan(size) as loan:
                            loan.call(1)
                else:
                    region = proc.create_region(size)
                    region.buffer[:1] = b"\x01"

                    def once():
                        ep.call(2, regions=[region])
                for _ in range(min(3, iterations)):
                    once()
                samples = []
                for _ in range(iterations):
                    t0 = time.perf_counter_ns()
                    once()
                    samples.append(time.perf_counter_ns() - t0)
        finally:
            child.kill()
            child.wait(10)
            child.stdout.close()
    samples.sort()
    label, note = {
        "bytes": ("capbus bytes", "payload copied into and out of the arena"),
        "loan": ("capbus loan", "written in place in the arena (not timed: no bytes touched), "
                                "received as a view, released by the reply"),
        "region": ("capbus region share", "region passed with each call (kernel delegates, "
                                          "receiver maps it)"),
    }[how]
    return Result(label, METRIC_ROUND_TRIP, percentile(samples, 0.5) / 1000,
                  percentile(samples, 0.99) / 1000, note=note, size_bytes=size, samples=len(samples))


_LARGE_SERVER = """
import capbus
p = capbus.connect(wait="spin")
svc = p.register("large")
print("ready", flush=True)
while True:
    req = svc.recv()
    if req.regions:
        req.regions[0].buffer[0]
        for r in req.regions:
            r.close()
    req.reply(0)
"""

LARGE_SIZES = (64 << 10, 1 << 20, 64 << 20)


def run_large(quick: bool = False) -> list[Result]:
    rows = [large_round_trip(0, "bytes", 200 if quick else 20_000)]
    rows[0].mechanism, rows[0].note = "capbus small call", "48-byte call, same server (reference)"
    for size in LARGE_SIZES:
        n = (3 if size >= 16 << 20 else 50) if quick else (15 if size >= 16 << 20 else 2_000)
        rows.append(large_round_trip(size, "loan", n * 5))
        rows.append(large_round_trip(size, "bytes", n))
        rows.append(large_round_trip(size, "region", n))
    return rows


# ---- the cost of capability checks on the call path ---------------------------------------------

def capability_check_cost(iterations: int) -> list[Result]:
    """The same echo, called through a plain endpoint and through a restricted one whose limits
    (a rate far above what is reached, a size limit, an expiry) are checked on every message by
    both sides; alternated in rounds so drift affects both alike."""
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, client_cpu = (cpus[0], cpus[1]) if len(cpus) > 1 else (-1, -1)
    plain, limited = [], []
    with echo_server("spin", server_cpu) as ep, _pinned(client_cpu):
        lim = ep.restrict(rate_limit=10**9, max_message_size=1 << 20, expires_in=3600)
        data = (1, 2, 3, 4)
        for _ in range(20_000):
            ep.call(1, data)
            lim.call(1, data)
        clock = time.perf_counter_ns
        for _ in range(10):
            for target, out in ((ep, plain), (lim, limited)):
                call = target.call
                for _ in range(iterations // 10):
                    t0 = clock()
                    call(1, data)
                    out.append(clock() - t0)
    plain.sort()
    limited.sort()
    return [
        Result("capbus spin, no limits", METRIC_ROUND_TRIP, percentile(plain, 0.5) / 1000,
               percentile(plain, 0.99) / 1000, note="plain endpoint", samples=len(plain)),
        Result("capbus spin, limits checked", METRIC_ROUND_TRIP, percentile(limited, 0.5) / 1000,
               percentile(limited, 0.99) / 1000,
               note="rate+size+expiry checked by caller and receiver", samples=len(limited)),
    ]
