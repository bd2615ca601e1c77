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

# SERVER for asyncio (arecv: the event loop watches the service's eventfds, the retired ones too).
ASYNC_SERVER = """
    import asyncio, sys, threading, capbus
    out = threading.Lock()

    def say(*words):
        with out:
            print(*words, flush=True)

    kw = dict(reconnect=True, on_reconnect=lambda proc: say("reconnected", proc.id))
    p = capbus.connect(sys.argv[2], wait=sys.argv[3], **(kw if sys.argv[1] == "1" else {}))
    svc = p.register("echo")
    say("ready", p.id)

    async def main():
        async for req in svc:
            if req.opcode == 3:  # never answered (nor anything after it)
                await asyncio.sleep(3600)
            elif req.opcode == 2:
                await asyncio.sleep(1.0)
                req.reply(0, (7,))
            else:
                req.reply(0, (req.data[0] + 1,))

    asyncio.run(main())
"""

# Calls in a loop; prints each change of (state, the server's ProcessId, the kernel its lane was
# opened through: 0 the first, 1 the next...), state "ok" or an error type. ProcessIds alone may
# not change: a restarted daemon numbers its processes from 1 again.
LOOPER = """
    import sys, threading, time, capbus
    out = threading.Lock()

    def say(*words):  # whole lines: on_reconnect prints from another thread
        with out:
            print(*words, flush=True)

    reconnect = sys.argv[1] == "1"
    kw = dict(reconnect=True, on_reconnect=lambda proc: say("reconnected", proc.id))
    p = capbus.connect(sys.argv[2], wait=sys.argv[3], **(kw if reconnect else {}))
    ep = p.lookup("echo", timeout=10)
    say("ready")
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
            say(*now)
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
        timeout = float(sys.argv[5]) if len(sys.argv) > 5 else None  # untimed unless given
        r = ep.call(int(sys.argv[4]), timeout=timeout)
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


@pytest.mark.parametrize("timeout", [None, "30"], ids=["untimed", "timed"])
@pytest.mark.parametrize("wait", ["block", "adaptive"])
def test_a_server_that_dies_after_the_kernel_fails_its_blocked_caller(daemon, kids, wait, timeout):
    server = _start(kids, SERVER, False, daemon.path, wait)
    assert readline(server).startswith("ready")
    blocked = _start(kids, BLOCKED, False, daemon.path, wait, "3", *([timeout] if timeout else []))
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


@pytest.mark.parametrize("how", ["kill", "term"])
def test_reconnect_brings_server_and_clients_back(daemon, kids, how):
    """how=term is `systemctl restart`: a graceful stop must not make anyone give up, nor
    break a channel (its pages stay OPEN: both ends live)."""
    server = _start(kids, SERVER, True, daemon.path, "adaptive")
    first_id = int(readline(server).split()[1])
    loopers = [_start(kids, LOOPER, True, daemon.path, "adaptive") for _ in range(2)]
    for lp in loopers:
        assert readline(lp) == "ready"
        assert _expect(lp, "ok").split()[1] == str(first_id)
    _stop(daemon, how)
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
            try:
                seen.append(readline(lp, max(0.1, deadline - time.monotonic())))
            except AssertionError as exc:
                raise AssertionError(f"still waiting for {want}, saw {seen}: {exc}") from None
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


# A client driven line by line from stdin, so the test knows each call was made and what it got:
# "call" (timed), "untimed OP", "timed OP" (30 s), "thread" (a call from a new thread: a new
# lane). argv[4] (reconnect=1 only): how long a reconnect waits to find "echo" again.
CALLER = """
    import sys, threading, time, capbus
    from capbus._runtime import process as _process
    out = threading.Lock()

    def say(*words):  # whole lines: death callbacks print from another thread
        with out:
            print(*words, flush=True)

    reconnect = sys.argv[1] == "1"
    if reconnect:
        _process._RELOOKUP = float(sys.argv[4])
    kw = dict(reconnect=True, on_reconnect=lambda proc: say("reconnected", proc.id))
    p = capbus.connect(sys.argv[2], wait=sys.argv[3], **(kw if reconnect else {}))
    ep = p.lookup("echo", timeout=10)
    ep.on_death(lambda e: say("death"))
    ep.call(1, (1,), timeout=10)  # this thread's lane is open from now on
    say("ready")

    def one(op, timeout):
        t0 = time.monotonic()
        try:
            r = ep.call(op, (5,), timeout=timeout)
            out = f"reply {r.data[0]}"
        except capbus.IpcError as exc:
            out = f"raised {type(exc).__name__}"
        say(out, round(time.monotonic() - t0, 3))

    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "call":
            one(1, 5)
        elif cmd[0] == "untimed":
            one(int(cmd[1]), None)
        elif cmd[0] == "timed":
            one(int(cmd[1]), 30)
        elif cmd[0] == "thread":
            t = threading.Thread(target=one, args=(1, 5))
            t.start()
            t.join(30)
"""


def _ask(p, cmd: str, want: str, timeout: float = 10.0) -> float:
    """Send a command to a CALLER; its answer must start with `want`; returns how long it took."""
    p.stdin.write(cmd + "\n")
    p.stdin.flush()
    line = _expect(p, "reply" if want.startswith("reply") else "raised", timeout)
    assert line.startswith(want), (cmd, line)
    return float(line.split()[-1])


def _died(caller) -> str:
    """The call in flight raised PeerDied, and on_death ran (in either order); that line."""
    raised, death = None, False
    deadline = time.monotonic() + 10
    while raised is None or not death:
        line = readline(caller, max(0.1, deadline - time.monotonic()))
        if line == "death":
            death = True
        else:
            assert line.startswith("raised PeerDied"), line
            raised = line
    return raised


def _stop(daemon: Daemon, how: str) -> None:
    """SIGKILL (a crash), or SIGTERM (`systemctl stop`: the kernel's graceful shutdown)."""
    if how == "kill":
        daemon.kill()
    else:
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(10) == 0


def _fresh_call(path: str, want_id: int) -> None:
    """A process that never knew the old kernel reaches the service through the new one."""
    with capbus.connect(path) as p:
        ep = p.lookup("echo", timeout=10)
        assert ep.process_id == want_id
        assert ep.call(1, (41,), timeout=5).data[0] == 42


@pytest.mark.parametrize("how, timed, server_code", [
    ("kill", False, SERVER), ("kill", True, SERVER), ("term", False, SERVER),
    ("term", True, SERVER), ("kill", False, ASYNC_SERVER), ("term", True, ASYNC_SERVER)],
    ids=["kill-untimed", "kill-timed", "term-untimed", "term-timed", "kill-untimed-asyncio",
         "term-timed-asyncio"])
def test_a_reconnected_server_keeps_serving_a_client_that_did_not_reconnect(daemon, kids, how,
                                                                             timed, server_code):
    server = _start(kids, server_code, True, daemon.path, "adaptive")
    assert readline(server).startswith("ready")
    caller = _start(kids, CALLER, False, daemon.path, "adaptive")
    assert readline(caller) == "ready"
    _stop(daemon, how)
    _ask(caller, "call", "reply 6")  # the outage: the channel needs no kernel
    daemon.start()
    new_id = int(_expect(server, "reconnected", 15).split()[1])
    # The server is back under the new kernel, and still serves the channel of the old one: to
    # the caller nothing happened (no death either: a graceful stop is not the server's death).
    for _ in range(3):
        _ask(caller, "call", "reply 6")
    _ask(caller, "untimed 1", "reply 6")
    _fresh_call(daemon.path, new_id)  # new channels through the new kernel, side by side
    _ask(caller, "call", "reply 6")
    assert caller.lines.empty(), caller.lines.get()  # type: ignore[attr-defined]
    # A new thread needs a new lane, which only a kernel could open: a clear error, no hang.
    _ask(caller, "thread", "raised KernelUnavailable")
    # The server dies with a call in flight: the caller hears PeerDied at once, from its own
    # watch on the server's pidfd (no kernel it knows of can tell it).
    caller.stdin.write(("timed 3" if timed else "untimed 3") + "\n")
    caller.stdin.flush()
    time.sleep(0.3)  # the call waits in the handler that never answers
    server.send_signal(signal.SIGKILL)
    server.wait(10)
    line = _died(caller)
    assert float(line.split()[-1]) < 0.3 + 1.5, line
    assert _ask(caller, "call", "raised PeerDied") < 1.0  # and so does every later call


@pytest.mark.parametrize("how", ["kill", "term"])
def test_a_reconnected_client_keeps_its_lanes_to_a_server_that_did_not(daemon, kids, how):
    server = _start(kids, SERVER, False, daemon.path, "adaptive")
    assert readline(server).startswith("ready")
    caller = _start(kids, CALLER, True, daemon.path, "adaptive", "1.0")
    assert readline(caller) == "ready"
    _stop(daemon, how)
    daemon.start()
    # It reconnects; "echo" never comes back (its server stays with the lost kernel)...
    _expect(caller, "reconnected", 15)
    # ...yet the lane it had keeps reaching that live server; a new lane cannot be had.
    for _ in range(3):
        _ask(caller, "call", "reply 6")
    _ask(caller, "untimed 1", "reply 6")
    _ask(caller, "thread", "raised InvalidCapability")
    assert server.poll() is None
    caller.stdin.write("untimed 3\n")
    caller.stdin.flush()
    time.sleep(0.3)
    server.send_signal(signal.SIGKILL)
    server.wait(10)
    line = _died(caller)
    assert float(line.split()[-1]) < 0.3 + 1.5, line


def test_both_reconnect_and_a_call_in_flight_gets_its_answer(daemon, kids):
    """A call waiting in the server's handler while both ends move to the new kernel: answered
    on the old channel, never failed for the move; the next call goes through the new kernel."""
    server = _start(kids, SERVER, True, daemon.path, "adaptive")
    assert readline(server).startswith("ready")
    caller = _start(kids, CALLER, True, daemon.path, "adaptive", "10")
    assert readline(caller) == "ready"
    daemon.kill()
    caller.stdin.write("untimed 2\n")  # the handler takes 1 s: both reconnect meanwhile
    caller.stdin.flush()
    daemon.start()
    want = {"reconnected", "reply"}
    deadline = time.monotonic() + 15
    while want:
        line = readline(caller, max(0.1, deadline - time.monotonic()))
        assert not line.startswith("raised"), line
        want.discard(line.split()[0])
    new_id = int(_expect(server, "reconnected", 15).split()[1])
    _ask(caller, "call", "reply 6")
    _fresh_call(daemon.path, new_id)


@pytest.mark.parametrize("how", ["kill", "term"])
def test_the_next_daemon_starts_over_what_the_last_one_left(sockdir, how):
    """A killed daemon leaves its socket file, lock file and audit WAL: none stops the next one
    on the same path (a stopped one leaves none of them)."""
    d = Daemon(os.path.join(sockdir, "k.sock"))
    try:
        d.start()
        with capbus.connect(d.path) as p:
            p.register("before")
        _stop(d, how)
        left = set(os.listdir(sockdir))
        if how == "kill":
            assert {"k.sock", "k.sock.lock", "audit.db-wal"} <= left, left
        d.start()
        with capbus.connect(d.path) as p:
            p.register("before")  # the name is free: the old registry went with its kernel
            assert p.lookup("before").process_id == p.id
    finally:
        d.kill()


# A server that says how many channels it dropped for garbage (opcode 9).
COUNTING_SERVER = """
    import sys, capbus
    p = capbus.connect(sys.argv[2], reconnect=True,
                       on_reconnect=lambda proc: print("reconnected", proc.id, flush=True))
    svc = p.register("echo")
    print("ready", p.id, flush=True)
    svc.serve(lambda req: (0, (svc.corrupt_channels if req.opcode == 9 else req.data[0] + 1,)))
"""

# A client that did not reconnect, holding a raw lane; told to, it scribbles its request ring's
# tail far past its head (garbage the server must find on the old kernel's channel).
SCRIBBLER = """
    import mmap, os, struct, sys, capbus
    from capbus import _core
    from capbus._protocol import frames
    p = capbus.connect(sys.argv[2])
    ep = p.lookup("echo", timeout=10)
    reply, fds = p._request_fds(frames.OpenChannel(ep.handle))
    chan_fd, ctrl_fd, bell_fd, bell_event_fd, reply_event_fd, bell_sleep_fd, reply_sleep_fd = fds
    lane = _core.Lane(chan_fd, ctrl_fd, bell_fd, reply.index, reply.nslots, reply.arena_size, 1,
                      50000, bell_event_fd=bell_event_fd, reply_event_fd=reply_event_fd,
                      bell_sleep_fd=bell_sleep_fd, reply_sleep_fd=reply_sleep_fd)
    assert lane.call(1, 1, 4, (7,), None, 2_000_000_000)[2] == 8
    print("ready", reply.index, flush=True)
    sys.stdin.readline()
    layout = {"size": _core.channel_size(reply.nslots, reply.arena_size),
              "req_tail": _core.REQ_RING_OFF + _core.RING_TAIL_OFF}
    chan = mmap.mmap(chan_fd, layout["size"])
    chan[layout["req_tail"]:layout["req_tail"] + 8] = struct.pack("<Q", 1 << 40)
    print("scribbled", flush=True)
    sys.stdin.readline()
"""


def test_garbage_on_an_old_kernels_channel_drops_only_that_channel(daemon, kids):
    """Nothing is reported to the new kernel about a channel it never knew: the index would name
    one of its own channels (here: a fresh client's, at the same index), and that one lives."""
    server = _start(kids, COUNTING_SERVER, True, daemon.path, "adaptive")
    assert readline(server).startswith("ready")
    hostile = _start(kids, SCRIBBLER, False, daemon.path, "adaptive")
    assert readline(hostile) == "ready 0"  # index 0 of the old kernel
    honest = _start(kids, CALLER, False, daemon.path, "adaptive")
    assert readline(honest) == "ready"
    daemon.kill()
    daemon.start()
    _expect(server, "reconnected", 15)
    with capbus.connect(daemon.path) as p:
        fresh = p.lookup("echo", timeout=10)
        assert fresh.call(1, (1,), timeout=5).data[0] == 2  # holds channel index 0 of the new kernel
        hostile.stdin.write("\n")
        hostile.stdin.flush()
        assert readline(hostile) == "scribbled"
        assert wait_for(lambda: fresh.call(9, timeout=5).data[0] == 1, 10), "garbage not found"
        # the honest old client and the fresh one: both still served
        _ask(honest, "call", "reply 6")
        for n in range(50):
            assert fresh.call(1, (n,), timeout=5).data[0] == n + 1
    assert server.poll() is None


# ---- topics ---------------------------------------------------------------------------------------

TOPIC_PUBLISHER = """
    import sys, threading, time, capbus
    back = threading.Event()
    p = capbus.connect(sys.argv[2], wait=sys.argv[3], reconnect=True,
                       on_reconnect=lambda proc: back.set())
    pub = p.publish("news", max_size=16, history=2)
    old = pub.loan(4)  # made under the first kernel: void after the reconnect
    print("ready", p.id, flush=True)
    i = 0
    end = time.monotonic() + 60
    while time.monotonic() < end:  # publishing goes on through the outage (to nobody)
        i += 1
        pub.publish(opcode=1, data=(i,), payload=b"n%d" % i)
        if back.is_set():
            back.clear()
            print("reconnected", p.id, flush=True)
            try:
                old.publish()
            except capbus.KernelUnavailable as exc:
                print("old loan", type(exc).__name__, flush=True)
        time.sleep(0.005)
"""

TOPIC_SUBSCRIBER = """
    import sys, threading, capbus
    back = threading.Event()
    p = capbus.connect(sys.argv[2], wait=sys.argv[3], reconnect=True,
                       on_reconnect=lambda proc: back.set())
    sub = p.subscribe("news", timeout=10)
    s = sub.recv(10)
    print("got", s.publisher, flush=True)
    s.release()
    try:
        while True:
            sub.recv(30).release()
    except (capbus.KernelUnavailable, capbus.PeerDied) as exc:
        print("lost", type(exc).__name__, flush=True)
    assert back.wait(30)
    sub = p.subscribe("news", timeout=10)  # the publisher published the name again
    s = sub.recv(10)
    print("again", s.publisher, s.seq, flush=True)
"""


@pytest.mark.parametrize("how", ["kill", "term"])
def test_reconnect_publishes_a_topic_again_and_subscribers_subscribe_again(daemon, kids, how):
    """A publisher with reconnect=True publishes its name again in the new kernel; the old
    subscriptions end (drained, then KernelUnavailable: a stopping kernel says so too, never
    PeerDied) and subscribing again reaches the same Publisher object."""
    pub = _start(kids, TOPIC_PUBLISHER, True, daemon.path, "adaptive")
    first_id = int(_expect(pub, "ready").split()[1])
    sub = _start(kids, TOPIC_SUBSCRIBER, True, daemon.path, "adaptive")
    assert _expect(sub, "got", 15) == f"got {first_id}"
    _stop(daemon, how)
    assert _expect(sub, "lost", 15) == "lost KernelUnavailable"  # never PeerDied: it lives
    daemon.start()
    new_id = int(_expect(pub, "reconnected", 15).split()[1])
    assert _expect(pub, "old loan", 5) == "old loan KernelUnavailable"
    again = _expect(sub, "again", 20).split()
    assert int(again[1]) == new_id and int(again[2]) >= 1
    # a process that never knew the old kernel finds the topic in the new one
    with capbus.connect(daemon.path) as p:
        s = p.subscribe("news", timeout=5)
        first = s.recv(5)
        assert first.publisher == new_id and bytes(first.payload).startswith(b"n")
        first.release()
        s.close()
