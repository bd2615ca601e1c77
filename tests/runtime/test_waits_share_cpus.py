"""Adaptive waits share the CPUs (docs/ARCHITECTURE.md "The data plane"): a caller of a slow
service and an idle server sleep rather than burn a CPU, many busy callers on few cores all
progress, and a doorbell scribbler cannot stall an honest caller. (Written for a yielding wait
that was tried and taken out: its sched_yield()s left one of eight busy callers starved in about
one run in four, which this file's fairness test caught on a quiet machine.)"""

from __future__ import annotations

import os
import subprocess
import time

from conftest import readline

import capbus

SLOW_SERVER = """
import capbus, time
p = capbus.connect()                       # the default wait mode: adaptive
svc = p.register("slow")
print("ready", flush=True)
def handle(req):
    if req.opcode == 1:
        time.sleep(0.02)                   # a service slower than any spin or yield budget
    return (0,)
svc.serve(handle)
"""

SLOW_CLIENT = """
import capbus, time
p = capbus.connect()
ep = p.lookup("slow", timeout=10)
ep.call(0, timeout=10)
c0, w0 = time.thread_time(), time.monotonic()
for _ in range(25):
    ep.call(1, timeout=10)
print(f"{time.thread_time() - c0} {time.monotonic() - w0}", flush=True)
"""


def test_a_caller_of_a_slow_service_sleeps_instead_of_yielding_the_whole_wait(kernel, children):
    server = children.start(SLOW_SERVER, stdin=subprocess.DEVNULL)
    assert readline(server, 20) == "ready"
    client = children.start(SLOW_CLIENT, stdin=subprocess.DEVNULL)
    cpu, wall = map(float, readline(client, 30).split())
    assert wall >= 25 * 0.02
    # Unbounded yielding alone on a CPU is a busy wait (cpu ~= wall); bounded, each wait costs
    # at most a spin and a yield budget (<= 250 us of 20 ms) plus the call itself.
    assert cpu < 0.2 * wall, (cpu, wall)


# Never asleep (spin mode), as a server busy with many callers' calls: a caller's wait is then its
# place in the queue, not the server's wake-up.
AWAKE_SERVER = """
import capbus, time
p = capbus.connect(wait="spin")
svc = p.register("awake")
print("ready", flush=True)
def handle(req):
    if req.opcode == 1:
        time.sleep(0.005)                  # longer than any spin
    return (0,)
svc.serve(handle)
"""


def test_a_caller_stops_spinning_for_slow_replies_and_starts_again_for_fast_ones(kernel, children):
    """The adaptive wait learns (common.h "Adaptive waiting"): spins that keep losing while the
    server is awake halve down to the floor, four more lost there stop them (as for 16 callers of
    one server on 2 cores, whose replies come ~80 us apart), and a wait that slept but ended
    within spin_ns starts them again."""
    server = children.start(AWAKE_SERVER, stdin=subprocess.DEVNULL)
    assert readline(server, 20) == "ready"
    p = capbus.connect(kernel.socket_path)  # adaptive, spin_ns 50 us
    try:
        ep = p.lookup("awake", timeout=10)
        ep.call(0, timeout=10)
        lane = ep._local.__dict__["lane"].native  # this thread's (the call above made it)
        slow = []
        # Up to 0.6 s: a wait on a CPU found oversubscribed does not spin at all for 200 ms, and
        # then learns nothing.
        while (not slow or slow[-1]) and len(slow) < 120:
            ep.call(1, timeout=10)
            slow.append(lane.spin_budget)
        assert slow[-1] == 0, slow
        assert slow[-5:-1] == [1000] * 4, slow  # halved down to the floor, then 4 losses there
        fast = []
        for _ in range(300):
            ep.call(0, timeout=10)  # answered at once: most waits end within 50 us, even asleep
            fast.append(lane.spin_budget)
        assert any(fast), fast
    finally:
        p.close()
    assert server.poll() is None


def test_a_caller_whose_server_sleeps_keeps_its_floor_spin(kernel, children):
    """Spins lost to the server's own wake-up (it slept: block mode here, or a lone caller's
    server whose CPU another load took) do not stop spinning: they say nothing about queueing,
    and a caller that stopped would leave both ends asleep on every call."""
    server = children.start(AWAKE_SERVER.replace('wait="spin"', 'wait="block"'),
                            stdin=subprocess.DEVNULL)
    assert readline(server, 20) == "ready"
    p = capbus.connect(kernel.socket_path)
    try:
        ep = p.lookup("awake", timeout=10)
        ep.call(0, timeout=10)
        lane = ep._local.__dict__["lane"].native
        budgets = []
        for _ in range(60):  # 0.3 s: past a 200 ms hold without spinning (oversubscribed CPU)
            ep.call(1, timeout=10)
            budgets.append(lane.spin_budget)
        assert 0 not in budgets and budgets[-1] == 1000, budgets  # halved down to the floor
    finally:
        p.close()
    assert server.poll() is None


IDLE_SERVER = """
import capbus
p = capbus.connect()
svc = p.register("idle")
print("ready", flush=True)
svc.serve(lambda req: (0,))
"""

ONE_CALL = """
import capbus
p = capbus.connect()
ep = p.lookup("idle", timeout=10)
for _ in range(200):
    ep.call(0, timeout=10)
print("done", flush=True)
"""


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_an_idle_adaptive_server_sleeps(kernel, children):
    server = children.start(IDLE_SERVER, stdin=subprocess.DEVNULL)
    assert readline(server, 20) == "ready"
    client = children.start(ONE_CALL, stdin=subprocess.DEVNULL)
    assert readline(client, 30) == "done"
    client.wait(10)
    time.sleep(0.1)  # the last waits' budgets run out
    c0, w0 = _cpu_s(server.pid), time.monotonic()
    time.sleep(1.0)
    cpu, wall = _cpu_s(server.pid) - c0, time.monotonic() - w0
    assert cpu < 0.1 * wall, (cpu, wall)
    assert server.poll() is None


BUSY_SERVER = """
import capbus
p = capbus.connect()
svc = p.register("busy", max_channels_per_process=64)
print("ready", flush=True)
svc.serve(lambda req: (req.opcode, req.data))
"""

BUSY_CLIENT = """
import capbus, sys, time
p = capbus.connect()
ep = p.lookup("busy", timeout=10)
ep.call(0, timeout=10)
print("go", flush=True)
sys.stdin.readline()                       # all start together
end, n = time.monotonic() + 1.5, 0
while time.monotonic() < end:
    ep.call(1, (1, 2, 3, 4), timeout=10)
    n += 1
print(n, flush=True)
"""


def test_eight_busy_callers_on_few_cores_all_progress_fairly(kernel, children):
    server = children.start(BUSY_SERVER, stdin=subprocess.DEVNULL)
    assert readline(server, 20) == "ready"
    clients = [children.start(BUSY_CLIENT, stdin=subprocess.PIPE) for _ in range(8)]
    for c in clients:
        assert readline(c, 30) == "go"
    for c in clients:
        c.stdin.write("\n")
        c.stdin.flush()
    counts = [int(readline(c, 30)) for c in clients]
    for c in clients:
        c.wait(10)
    mean = sum(counts) / len(counts)
    # Nine busy processes on this project's 2 cores: no waiter keeps the CPU from the others
    # (nor from the server), and nobody is starved.
    assert min(counts) >= 0.25 * mean, counts
    assert server.poll() is None


# A client that keeps every hint bit of the doorbell set, bumps seq and clears the sleeping flag
# as fast as it can, past the library: the adaptive server's spin and yield phases watch those
# words, so they return at once, over and over. The honest caller must still be served, in time.
SCRIBBLER = """
import mmap, sys, time
import capbus
from capbus import _core
from capbus._protocol import frames
p = capbus.connect()
ep = p.lookup("busy", timeout=10)
ep.call(0, timeout=10)
reply, fds = p._request_fds(frames.OpenChannel(ep.handle))   # raw fds, past the library
bell = mmap.mmap(fds[2], _core.DOORBELL_SIZE)
print("go", flush=True)
stop = time.monotonic() + float(sys.argv[1])
while time.monotonic() < stop:
    for w in range(8):
        _core.atomic_store_u64(bell, _core.DB_BITMAP_OFF + 8 * w, 2**64 - 1)
    _core.atomic_add_u64(bell, _core.DB_SEQ_OFF, 1)
    _core.atomic_store_u32(bell, _core.DB_SERVER_SLEEPING_OFF, 0)
print("done", flush=True)
"""


def test_a_doorbell_scribbler_does_not_stall_an_honest_caller(kernel, children):
    server = children.start(BUSY_SERVER, stdin=subprocess.DEVNULL)
    assert readline(server, 20) == "ready"
    scribbler = children.start(SCRIBBLER, "3", stdin=subprocess.DEVNULL)
    assert readline(scribbler, 30) == "go"
    p = capbus.connect(kernel.socket_path)
    try:
        ep = p.lookup("busy", timeout=10)
        worst, n, end = 0.0, 0, time.monotonic() + 2.0
        while time.monotonic() < end:
            t0 = time.monotonic()
            assert ep.call(3, (1, 2, 3, 4), timeout=5).opcode == 3
            worst, n = max(worst, time.monotonic() - t0), n + 1
    finally:
        p.close()
    assert readline(scribbler, 30) == "done"
    assert n > 100 and worst < 0.5, (n, worst)
    assert server.poll() is None
