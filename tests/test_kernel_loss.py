"""Losing the kernel loses nobody: a SIGKILLed daemon fails control requests at once, open channels
keep working while both ends live, a peer's death is still seen, and reconnect=True brings a
server and its clients back through a restarted daemon on the same path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import Children, connects, readline, wait_for

import capbus


class Daemon:
    """`python -m capbus kernel --socket PATH` as a subprocess; SIGKILLed at teardown."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(os.environ)
        env.pop("CAPBUS_FD", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "capbus", "kernel", "--socket", self.path],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for(lambda: connects(self.path), 20), "the daemon did not come up"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def daemon(sockdir):
    d = Daemon(os.path.join(sockdir, "k.sock"))
    d.start()
    yield d
    d.kill()


@pytest.fixture
def kids(daemon):
    c = Children(daemon.path)
    yield c
    c.cleanup()


SERVER = """
    import sys, time, capbus
    reconnect = sys.argv[1] == "1"
    kw = dict(reconnect=True, on_reconnect=lambda proc: print("reconnected", proc.id, flush=True))
    p = capbus.connect(sys.argv[2], wait=sys.argv[3], **(kw if reconnect else {}))
    def handler(req):
        if req.opcode == 2:   # a slow answer: the kernel dies while the caller waits
            time.sleep(1.0)
            return (0, (7,))
        if req.opcode == 3:   # never answered: the caller waits until this process dies
            time.sleep(3600)
        return (0, (req.data[0] + 1,))
    svc = p.register("echo")
    print("ready", p.id, flush=True)
    try:
        svc.serve(handler)
        print("returned", flush=True)
    except capbus.KernelUnavailable as exc:
        print("lost", type(exc).__name__, flush=True)
"""

# Calls in a loop; prints each change of (state, the server's ProcessId, the kernel its lane was
# opened through: 0 the first, 1 the next...), state "ok" or an error type. ProcessIds alone may
# not change: a restarted daemon numbers its processes from 1 again.
LOOPER = """
    import sys, time, capbus
    reconnect = sys.argv[1] == "1"
    kw = dict(reconnect=True, on_reconnect=lambda proc: print("reconnected", proc.id, flush=True))
    p = capbus.connect(sys.argv[2], wait=sys.argv[3], **(kw if reconnect else {}))
    ep = p.lookup("echo", timeout=10)
    print("ready", flush=True)
    last = None
    kernels = []
    n = 0
    while True:
        try:
            r = ep.call(1, (n,), timeout=2)
            assert r.data[0] == n + 1, r
            state = "ok"
        except capbus.IpcError as exc:
            state = type(exc).__name__
            time.sleep(0.01)
        lane = ep._local.__dict__.get("lane")
        ctl = lane._ctl if lane is not None else None
        if ctl not in kernels:
            kernels.append(ctl)
        now = (state, ep.process_id, kernels.index(ctl))
        if now != last:
            print(*now, flush=True)
            last = now
        n += 1
"""

BLOCKED = """
    import sys, time, capbus
    p = capbus.connect(sys.argv[2], wait=sys.argv[3])
    ep = p.lookup("echo", timeout=10)
    ep.call(1, (1,), timeout=10)  # the lane is open before the kernel goes
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.monotonic()
    try:
        r = ep.call(int(sys.argv[4]))  # untimed
        print("reply", r.data[0], flush=True)
    except capbus.IpcError as exc:
        print("raised", type(exc).__name__, flush=True)
    print("after", round(time.monotonic() - t0, 3), flush=True)
    t0 = time.monotonic()
    try:
        p.lookup("echo")
        print("lookup ok", flush=True)
    except capbus.KernelUnavailable:
        print("lookup KernelUnavailable", round(time.monotonic() - t0, 3), flush=True)
    sys.stdin.readline()
"""


def _start(kids: Children, code: str, reconnect: bool, path: str, wait: str, *extra: str):
    p = kids.start(code, "1" if reconnect else "0", path, wait, *extra, stdin=subprocess.PIPE)
    return p


def _expect(p, want: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        try:
            line = readline(p, max(0.1, deadline - time.monotonic()))
        except AssertionError as exc:
            raise AssertionError(f"waiting for {want!r}, saw {seen}: {exc}") from None
        seen.append(line)
        if line == want or line.startswith(want + " ") or (want.endswith(" ") and line.startswith(want)):
            return line


@pytest.mark.parametrize("wait", ["block", "adaptive"])
def test_a_killed_kernel_fails_control_at_once_and_open_channels_keep_working(daemon, kids, wait):
    server = _start(kids, SERVER, False, daemon.path, wait)
    assert readline(server).startswith("ready")
    looper = _start(kids, LOOPER, False, daemon.path, wait)
    assert readline(looper).startswith("ready")
    assert _expect(looper, "ok").startswith("ok")
    blocked = _start(kids, BLOCKED, False, daemon.path, wait, "2")
    assert readline(blocked) == "ready"
    blocked.stdin.write("\n")
    blocked.stdin.flush()
    time.sleep(0.3)  # the call is in the server's slow handler
    daemon.kill()
    # the untimed call in flight gets its answer: the channel outlives the kernel
    assert readline(blocked, 10) == "reply 7"
    readline(blocked)
    line = readline(blocked, 5)
    assert line.startswith("lookup KernelUnavailable"), line
    assert float(line.split()[2]) < 1.0
    # the loop's calls go on succeeding (no line means no change from "ok")
    time.sleep(1.5)
    assert looper.lines.empty(), looper.lines.get()  # type: ignore[attr-defined]
    assert server.poll() is None
    # once its last client is gone, serve() raises KernelUnavailable instead of returning
    blocked.stdin.write("\n")
    blocked.stdin.flush()
    blocked.wait(10)
    looper.kill()
    looper.wait(10)
    assert readline(server, 10) == "lost KernelUnavailable"
    server.wait(10)


@pytest.mark.parametrize("wait", ["block", "adaptive"])
def test_a_server_that_dies_after_the_kernel_fails_its_blocked_caller(daemon, kids, wait):
    server = _start(kids, SERVER, False, daemon.path, wait)
    assert readline(server).startswith("ready")
    blocked = _start(kids, BLOCKED, False, daemon.path, wait, "3")
    assert readline(blocked) == "ready"
    blocked.stdin.write("\n")
    blocked.stdin.flush()
    time.sleep(0.3)
    daemon.kill()
    time.sleep(0.3)
    server.send_signal(signal.SIGKILL)
    server.wait(10)
    assert readline(blocked, 10) == "raised PeerDied"
    after = float(readline(blocked).split()[1])
    assert after < 0.6 + 1.0, after  # 0.6 s of it is this test's own sleeps


def test_reconnect_brings_server_and_clients_back(daemon, kids):
    server = _start(kids, SERVER, True, daemon.path, "adaptive")
    first_id = int(readline(server).split()[1])
    loopers = [_start(kids, LOOPER, True, daemon.path, "adaptive") for _ in range(2)]
    for lp in loopers:
        assert readline(lp) == "ready"
        assert _expect(lp, "ok").split()[1] == str(first_id)
    daemon.kill()
    time.sleep(1.0)  # the outage: open channels keep working meanwhile
    for lp in loopers:
        assert lp.lines.empty(), lp.lines.get()  # type: ignore[attr-defined]
    daemon.start()
    new_id = int(_expect(server, "reconnected", 15).split()[1])
    assert server.poll() is None
    for lp in loopers:
        # on_reconnect ran, and the same Endpoint object reaches the re-registered service
        # through the new kernel (in either order: the loop runs while the callback is called)
        want = {"reconnected", f"ok {new_id} 1"}
        deadline = time.monotonic() + 15
        seen = []
        while want:
            seen.append(readline(lp, max(0.1, deadline - time.monotonic())))
            want.discard(seen[-1].split()[0] if seen[-1].startswith("reconnected") else seen[-1])
    # the server registered "echo" again: a fresh process finds it in the new kernel
    with capbus.connect(daemon.path) as p:
        ep = p.lookup("echo", timeout=5)
        assert ep.process_id == new_id
        assert ep.call(1, (41,), timeout=5).data[0] == 42


def test_reconnect_calls_during_the_outage_fail_fast(daemon, kids, sockdir):
    with capbus.connect(daemon.path, reconnect=True) as p:
        daemon.kill()
        assert wait_for(lambda: p.kernel_lost is not None, 5)
        t0 = time.monotonic()
        with pytest.raises(capbus.KernelUnavailable):
            p.lookup("nothing", timeout=30)
        with pytest.raises(capbus.KernelUnavailable):
            p.register("x")
        assert time.monotonic() - t0 < 1.0
        done = []
        p.on_reconnect(lambda proc: done.append(proc.id))
        daemon.start()
        assert wait_for(lambda: done, 15)
        svc = p.register("x")  # works again, through the new kernel
        assert svc.name == "x"
