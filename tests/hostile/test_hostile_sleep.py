"""Hostile peers against the sleep wake-ups: a blocking server sleeps in read(2) on its service's
sleep eventfd, which every client holds (blocking); a blocking client sleeps in read(2) on its
channel's reply-sleep pipe, whose other end the server holds. A peer can read those empty (steal
a wake-up), fill the eventfd's counter (an honest writer would block) or make it non-blocking.
None of that may hang anyone: kicks (the watchdog's signal) end a stalled read or write within
~2 ticks, and a non-blocking eventfd sends the server back to futex sleeps."""

from __future__ import annotations

import os
import threading
import time

import pytest
from conftest import readline

import capbus

SERVER = """
import signal, sys, capbus
if sys.argv[1] == "foreign":  # the kick signal is someone else's here
    signal.signal(signal.SIGRTMAX - 3, lambda *a: None)
p = capbus.connect(wait="block")
svc = p.register("target")
print("ready", flush=True)
def serve(svc):  # recv() with no timeout: the sleeps that use the eventfd
    while True:
        req = svc.recv()
        req.reply(req.opcode + 1, req.data, req.payload)
serve(svc)
"""

# A client that attacks the service's sleep eventfd (argv: attack, seconds).
ATTACKER = """
import mmap, os, struct, sys, threading, time
import capbus
from capbus import _core
from capbus._protocol import frames

attack, seconds = sys.argv[1], float(sys.argv[2])
p = capbus.connect(wait="block")
ep = p.lookup("target", timeout=10)
ep.call(1, timeout=5)
reply, fds = p._request_fds(frames.OpenChannel(ep.handle))   # raw fds, past the library
chan_fd, ctrl_fd, bell_fd, bell_event_fd, reply_event_fd, sleep_fd, reply_sleep_fd = fds
bell = mmap.mmap(bell_fd, _core.DOORBELL_SIZE)
deadline = time.monotonic() + 5
while _core.atomic_load_u32(bell, _core.DB_SERVER_SLEEPING_OFF) != 2:  # asleep on the eventfd
    if time.monotonic() > deadline:
        print("the server never slept on its eventfd", flush=True)
        sys.exit(1)
    time.sleep(0.001)
stop = time.monotonic() + seconds
hits = [0]

def steal():  # read the counter empty as fast as it fills
    buf = bytearray(8)
    while time.monotonic() < stop:
        try:
            os.preadv(sleep_fd, [buf], -1, os.RWF_NOWAIT)
            hits[0] += 1
        except BlockingIOError:
            pass

def steal_blocking():  # and wait in read(2) next to the server
    while True:
        os.read(sleep_fd, 8)
        hits[0] += 1

def saturate():  # keep the counter at its maximum, and claim the server sleeps on it
    while time.monotonic() < stop:
        os.write(sleep_fd, struct.pack("<Q", 0xFFFFFFFFFFFFFFFE))  # waits for a read when full
        _core.atomic_store_u32(bell, _core.DB_SERVER_SLEEPING_OFF, 2)
        hits[0] += 1

if attack == "nonblock":
    os.set_blocking(sleep_fd, False)  # the description every holder shares
    hits[0] = 1
    threads = []
else:
    targets = {"steal": [steal, steal_blocking], "saturate": [saturate]}[attack]
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
print("attacking", flush=True)
for t in threads:
    t.start()
time.sleep(seconds)
print("hits", hits[0], flush=True)
"""

# A service that steals the wake-up bytes of its clients' reply-sleep pipes: for every pipe it
# holds, a thread waits in read(2) on a fresh (blocking) open of it, next to the client.
THIEF_SERVER = """
import os, threading, time
import capbus
p = capbus.connect(wait="block")
svc = p.register("thief")
stolen = [0]
robbed = set()

def rob(fd):
    while True:
        stolen[0] += len(os.read(fd, 64))

def look():
    for n in os.listdir("/proc/self/fd"):
        if n in ("0", "1", "2") or n in robbed:  # not our own stdout
            continue
        try:
            if os.readlink(f"/proc/self/fd/{n}").startswith("pipe:"):
                fd = os.open(f"/proc/self/fd/{n}", os.O_RDONLY)
                robbed.add(n)
                threading.Thread(target=rob, args=(fd,), daemon=True).start()
        except OSError:
            pass  # listdir's own fd, a write end, an fd gone meanwhile

print("ready", flush=True)
def serve(svc):
    n = 0
    while True:
        req = svc.recv()
        req.reply(req.opcode + 1, req.data)
        n += 1
        if n == 1:
            look()  # the client's channel exists now
        if n % 50 == 0:
            print("stolen", stolen[0], flush=True)
serve(svc)
"""


def _calls(ep, n: int) -> float:
    """n calls, each checked; the slowest one's seconds."""
    worst = 0.0
    for i in range(n):
        t0 = time.monotonic()
        assert ep.call(1, data=(i,), timeout=5).data == (i, 0, 0, 0)
        worst = max(worst, time.monotonic() - t0)
    return worst


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("attack", ["steal", "saturate", "nonblock"])
def test_a_client_attacking_the_sleep_eventfd_stalls_no_one(kernel, children, attack):
    server = children.start(SERVER, "plain")
    assert readline(server) == "ready"
    attacker = children.start(ATTACKER, attack, "3")
    assert readline(attacker) == "attacking"
    with capbus.connect(kernel.socket_path, wait="block") as me:
        ep = me.lookup("target", timeout=5)
        # Calls spaced out, so the server goes back to sleep (and is robbed) before each one.
        worst = 0.0
        for _ in range(40):
            worst = max(worst, _calls(ep, 1))
            time.sleep(0.01)
        assert worst < 1.0, f"a call took {worst:.3f} s under the {attack} attack"
        hits = readline(attacker, timeout=15)
        assert hits.startswith("hits ") and int(hits.split()[1]) > 0, hits  # it did attack
        if attack == "nonblock":  # back on the futex, and not spinning on EAGAIN
            cpu0 = _cpu_seconds(server.pid)
            time.sleep(1.0)
            assert _cpu_seconds(server.pid) - cpu0 < 0.3
        assert _calls(ep, 20) < 1.0
    assert server.poll() is None, server.stderr.read()[-800:]


def test_a_server_stealing_reply_wakeups_stalls_no_call(kernel, children):
    server = children.start(THIEF_SERVER)
    assert readline(server) == "ready"
    with capbus.connect(kernel.socket_path, wait="block") as me:
        ep = me.lookup("thief", timeout=5)
        got: dict = {"worst": 0.0, "n": 0}

        def calls() -> None:  # untimed calls: those sleep on the pipe (bounded by the join below)
            for i in range(100):
                t0 = time.monotonic()
                assert ep.call(7, data=(i,)).opcode == 8
                got["worst"] = max(got["worst"], time.monotonic() - t0)
                got["n"] += 1

        t = threading.Thread(target=calls, daemon=True)
        t.start()
        t.join(30)
        assert got["n"] == 100, got  # (a stuck call ends when the server is killed at teardown)
        assert got["worst"] < 1.0, f"a call took {got['worst']:.3f} s"
        stolen = [readline(server) for _ in range(2)][-1]
        assert int(stolen.split()[1]) > 0, stolen  # the thief did get wake-up bytes


CLIENT_FOREIGN = """
import signal, sys, capbus
signal.signal(signal.SIGRTMAX - 3, lambda *a: None)  # before capbus ever sleeps
with capbus.connect(wait="block") as p:
    ep = p.lookup("target", timeout=10)
    for i in range(50):
        assert ep.call(1, data=(i,), timeout=5).data == (i, 0, 0, 0)
print("ok", flush=True)
"""


def test_a_foreign_handler_on_the_kick_signal_means_futex_sleeps(kernel, children):
    """Neither side takes over a signal the application already handles: both then sleep on
    futexes, and calls work the same."""
    server = children.start(SERVER, "foreign")
    assert readline(server) == "ready"
    assert readline(children.start(CLIENT_FOREIGN)) == "ok"
    with capbus.connect(kernel.socket_path, wait="block") as me:
        assert _calls(me.lookup("target", timeout=5), 50) < 1.0
