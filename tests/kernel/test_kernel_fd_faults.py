"""No fd leaks on any error path of the kernel: faults injected into an embedded kernel (the n-th
os.dup / os.memfd_create / mmap / socket send fails, a full capability table) and a daemon
kernel under a low RLIMIT_NOFILE. The clients are real processes; the kernel's fds (this test
process's /proc/self/fd) come back to their baseline once the clients go and after stop().
"""

from __future__ import annotations

import errno
import os
import socket
import threading

import pytest
from conftest import Children, readline, wait_for
from test_fd_leak import Daemon

import capbus
from capbus._kernel import shm as shm_mod

pytestmark = pytest.mark.timeout(120)


# The test's own pipes to its children (their stdout/stderr) are not the kernel's.
_ours: set[int] = set()


def nfds() -> int:
    """This process's fds but the test's own pipes and the audit log's SQLite files (opened
    lazily, at the first flush)."""
    n = 0
    for fd in set(map(int, os.listdir("/proc/self/fd"))) - _ours:
        try:
            n += "audit.db" not in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return n


def start(children: Children, code: str, *args: str):
    p = children.start(code, *args)
    _ours.update((p.stdout.fileno(), p.stderr.fileno()))
    return p


def fd_list() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(f"{fd}:{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass
    return sorted(out)


def back_to(baseline: int, timeout: float = 10.0) -> bool:
    return wait_for(lambda: nfds() <= baseline, timeout, 0.02)


SERVER = r"""
import sys, capbus
p = capbus.connect(wait="block")
s = p.register(sys.argv[1])
print("ready", p.id, flush=True)
while True:
    try:
        req = s.recv(timeout=20)
    except capbus.Timeout:
        break
    print("got", len(req.regions), s.dropped_attachments, flush=True)
    req.reply(0)
"""

SENDER = r"""
import sys, capbus
p = capbus.connect(wait="block")
regions = [p.create_region(4096) for _ in range(int(sys.argv[2]))]
p.lookup(sys.argv[1]).call(1, regions=regions, move=sys.argv[3] == "move", timeout=10)
print("sent", flush=True)
"""


@pytest.mark.parametrize("at_stop", [False, True], ids=["clients-gone", "stop-with-server"])
@pytest.mark.parametrize("move", ["move", "copy"])
def test_claim_into_a_full_table_leaks_no_region(sockdir, move, at_stop):
    before = nfds()
    kernel = capbus.Kernel(os.path.join(sockdir, "k.sock"))
    children = Children(kernel.socket_path)
    try:
        baseline = nfds()
        server = start(children, SERVER, "sink")
        sid = int(readline(server).split()[1])

        def fill() -> None:  # the server's table has room for nothing more
            rec = kernel._st.procs[sid]
            rec.caps._limit = len(rec.caps)

        kernel._call(fill)
        sender = start(children, SENDER, "sink", "15", move)
        assert readline(server) == "got 0 15"
        assert readline(sender) == "sent"
        sender.wait(10)
        if not at_stop:
            server.kill()
            server.wait(10)
            assert back_to(baseline), f"{nfds()} > {baseline}: " + " ".join(fd_list())
    finally:
        kernel.stop()  # with the server still connected when at_stop
        children.cleanup()
    assert back_to(before), (nfds(), before)


class FailNth:
    """Make the n-th call of `fn` from the kernel's thread raise an OSError (errno EMFILE)."""

    def __init__(self, fn, n: int, err: int = errno.EMFILE) -> None:
        self.fn, self.n, self.err, self.calls, self.failed = fn, n, err, 0, False

    def __call__(self, *args, **kw):
        if threading.current_thread().name == "capbus-kernel":
            self.calls += 1
            if self.calls == self.n:
                self.failed = True
                raise OSError(self.err, os.strerror(self.err))
        return self.fn(*args, **kw)

    def __get__(self, obj, owner=None):  # patched onto a class: a method like the one it wraps
        return self if obj is None else (lambda *args, **kw: self(obj, *args, **kw))


# Registers, looks up, calls (opens a channel), creates, maps and seals a region, then checks the
# connection still works; every capbus error on the way is printed, not fatal.
WORKLOAD = r"""
import capbus
p = capbus.connect(wait="block")
def step(name, fn):
    try:
        fn()
        print(name, "ok", flush=True)
    except (capbus.IpcError, ValueError, OSError, KeyError) as exc:
        print(name, "error", type(exc).__name__, flush=True)
box = {}
step("register", lambda: box.setdefault("s", p.register("w")))
step("lookup", lambda: box.setdefault("ep", p.lookup("w")))
step("channel", lambda: box.setdefault("lane", box["ep"]._open_lane()))
step("region", lambda: box.setdefault("r", p.create_region(8192)))
step("map", lambda: p._request(capbus._protocol.frames.MapRegion(box["r"].handle)))
step("seal", lambda: box["r"].seal_readonly())
step("again", lambda: p.register("still-connected"))
try:
    p.lookup("no-such-service")
except capbus.ServiceNotFound:
    print("alive", flush=True)
"""


def _targets():
    return {
        "dup": (os, "dup"),
        "memfd_create": (os, "memfd_create"),
        "mmap": (shm_mod, "Mapping"),
        "eventfd": (os, "eventfd"),
        "pipe2": (os, "pipe2"),
        "sendmsg": (socket.socket, "sendmsg"),
    }


@pytest.mark.parametrize("target", sorted(_targets()))
def test_the_nth_call_failing_leaks_nothing(sockdir, monkeypatch, target):
    before = nfds()
    owner, attr = _targets()[target]
    real = getattr(owner, attr)
    for n in range(1, 13):
        kernel = capbus.Kernel(os.path.join(sockdir, f"k{n}.sock"))
        children = Children(kernel.socket_path)
        try:
            baseline = nfds()
            fault = FailNth(real, n)
            monkeypatch.setattr(owner, attr, fault)
            c = start(children, WORKLOAD)
            lines = [readline(c, 20) for _ in range(8)]
            assert lines[-1] == "alive", (n, lines)
            monkeypatch.setattr(owner, attr, real)
            c.wait(10)
            assert back_to(baseline), (target, n, nfds(), baseline, lines)
        finally:
            monkeypatch.setattr(owner, attr, real)
            children.cleanup()
            kernel.stop()
        assert back_to(before), (target, n, nfds(), before)
        if not fault.failed:
            break  # fewer than n calls: every position was tried


EXHAUST = r"""
import sys, capbus
p = capbus.connect(sys.argv[1], wait="block")
s = p.register("hog")
ep = p.lookup("hog")
errors = set()
regions = []
for _ in range(200):
    try:
        regions.append(p.create_region(4096))
    except capbus.IpcError as exc:
        errors.add(type(exc).__name__)
        break
for r in regions:
    r.close()
p.register("after-exhaustion")
print("errors", ",".join(sorted(errors)) or "-", flush=True)
print("alive", flush=True)
"""


def test_emfile_in_a_daemon_kernel_is_an_error_and_leaks_nothing(sockdir):
    path = os.path.join(sockdir, "k.sock")
    d = Daemon(path, nofile=64)
    try:
        d.wait_ready()
        children = Children(path)
        try:
            with capbus.connect(path, wait="block") as probe:
                probe.register("probe")
                baseline = d.fds()
            assert wait_for(lambda: d.fds() < baseline, 5)
            baseline = d.fds()
            c = start(children, EXHAUST, path)
            assert readline(c, 30) == "errors OutOfMemory"
            assert readline(c, 30) == "alive"
            c.wait(10)
            assert wait_for(lambda: d.fds() <= baseline, 10), (d.fds(), baseline, d.fd_kinds())
        finally:
            children.cleanup()
        assert d.proc.poll() is None
    finally:
        d.cleanup()





FULL_CLIENT = r"""
import sys, capbus
p = capbus.connect(wait="block")
ep = p.lookup("g")
print("ready", p.id, flush=True)
sys.stdin.readline()
for name, fn in (("lookup", lambda: p.lookup("g2")), ("region", lambda: p.create_region(4096)),
                 ("restrict", lambda: ep.restrict(rate_limit=5)),
                 ("subscribe", lambda: p.subscribe_registrations()),
                 ("register", lambda: p.register("g3"))):
    try:
        fn()
        print(name, "ok", flush=True)
    except capbus.OutOfMemory:
        print(name, "full", flush=True)
try:
    p.lookup("no-such-service")
except capbus.ServiceNotFound:
    print("alive", flush=True)
"""


def test_grants_into_a_full_table_leak_nothing(sockdir):
    before = nfds()
    kernel = capbus.Kernel(os.path.join(sockdir, "k.sock"))
    children = Children(kernel.socket_path)
    try:
        server = start(children, SERVER, "g")
        server2 = start(children, SERVER, "g2")
        readline(server), readline(server2)
        baseline = nfds()
        client = children.start(FULL_CLIENT, stdin=-1)
        _ours.update((client.stdout.fileno(), client.stderr.fileno(), client.stdin.fileno()))
        cid = int(readline(client).split()[1])

        def fill() -> None:
            rec = kernel._st.procs[cid]
            rec.caps._limit = len(rec.caps)

        kernel._call(fill)
        client.stdin.write("go\n")
        client.stdin.flush()
        got = [readline(client) for _ in range(6)]
        assert got == ["lookup full", "region full", "restrict full", "subscribe full",
                       "register full", "alive"], got
        client.wait(10)
        assert back_to(baseline), f"{nfds()} > {baseline}: " + " ".join(fd_list())
    finally:
        children.cleanup()
        kernel.stop()
    assert back_to(before), f"{nfds()} > {before}: " + " ".join(fd_list())
