"""fork() and the control connection.

A Process belongs to the OS process that connected it: a forked child must refuse to use its
copy (KernelUnavailable, naming fork) and connect on its own, without disturbing the parent's
connection. The kernel ties a connection to the pid that opened it: it sees that process die
through its pidfd even while a forked child still holds a copy of the socket, and it drops a
connection on which some other pid (a child bypassing the library) writes a frame.

The scenarios run in child scripts (never by forking the test process, which embeds the
kernel's thread); every forked process there sets an alarm so none can outlive a failed test.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time

import pytest
from conftest import readline, wait_for

import capbus

pytestmark = pytest.mark.timeout(60)

# ---- the child's copy of a Process ---------------------------------------------------------------

FORK_USE = r"""
import os, signal, sys
import capbus

exit_how = sys.argv[1]
p = capbus.connect(wait="block")
p.register("fork-parent")
ep = p.lookup("fork-parent")
sub = p.subscribe_registrations()
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    signal.alarm(20)
    os.close(r)
    out = []
    try:
        ops = {
            "register": lambda: p.register("from-child"),
            "lookup": lambda: p.lookup("fork-parent"),
            "lookup_timeout": lambda: p.lookup("fork-parent", timeout=1),
            "subscribe": lambda: p.subscribe_registrations(),
            "on_death": lambda: ep.on_death(lambda e: None),
            "register_package": lambda: p.register_package(),
        }
        for name, op in ops.items():
            try:
                op()
                out.append(f"{name}=no-error")
            except capbus.KernelUnavailable as exc:
                out.append(f"{name}=KernelUnavailable:{'fork' in str(exc)}:{os.getpid() != p._pid}")
            except Exception as exc:
                out.append(f"{name}={type(exc).__name__}:{exc}")
        out.append(f"closed={p.closed}")
        out.append(f"sub_wait={sub.wait(0.05)}")
        own = capbus.connect(wait="block")
        own.register("fork-child")
        out.append(f"own={own.id}:{own.lookup('fork-parent').process_id}:{p.id}")
        if exit_how == "close-parent-copy":
            p.close()  # a no-op in the child: must not end the parent's connection
            ep.close()
            sub.close()
        own.close() if exit_how != "exit-without-close" else None
    finally:
        os.write(w, (" ".join(out) + "\n").encode())
        os.close(w)
    if exit_how == "os._exit":
        os._exit(0)
    sys.exit(0)  # interpreter shutdown in the child: finalizers must not touch the parent's socket
os.close(w)
data = b""
while chunk := os.read(r, 65536):
    data += chunk
_, status = os.waitpid(pid, 0)
print("CHILD", os.waitstatus_to_exitcode(status), data.decode().strip(), flush=True)
# The parent's connection is untouched.
p.register("fork-parent-after")
print("PARENT", p.id, p.lookup("fork-parent-after").process_id, flush=True)
input()  # hold the connection until the test is done looking
"""


@pytest.mark.parametrize("exit_how", ["os._exit", "sys.exit", "close-parent-copy",
                                      "exit-without-close"])
def test_forked_child_must_connect_on_its_own(kernel, children, exit_how):
    proc = children.start(FORK_USE, exit_how, stdin=subprocess.PIPE)
    child_line = readline(proc, 20)
    assert child_line.startswith("CHILD 0 "), child_line
    results = dict(item.split("=", 1) for item in child_line.split()[2:])
    for op in ("register", "lookup", "lookup_timeout", "subscribe", "on_death",
               "register_package"):
        # KernelUnavailable, with a message about fork, because the pid differs.
        assert results[op] == "KernelUnavailable:True:True", (op, results[op])
    assert results["closed"] == "True"
    assert results["sub_wait"] == "False"
    own_id, served_by, parent_id = (int(x) for x in results["own"].split(":"))
    assert own_id != parent_id
    assert served_by == parent_id  # the child's own connection sees the parent's service

    parent_line = readline(proc, 20)
    _, pid_seen, served = parent_line.split()
    assert int(pid_seen) == parent_id and int(served) == parent_id
    # The kernel's view: the parent is still there with its services; the child has gone.
    rows = {r["id"]: r for r in kernel.processes()}
    assert parent_id in rows and own_id not in rows
    assert sorted(rows[parent_id]["services"]) == ["fork-parent", "fork-parent-after"]
    assert rows[parent_id]["pid"] == proc.pid
    services = {s["name"]: s["id"] for s in kernel.services()}
    assert "fork-child" not in services and "from-child" not in services
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.wait(10) == 0
    assert wait_for(lambda: "fork-parent" not in {s["name"] for s in kernel.services()}, 2)


FORK_DURING_REQUEST = r"""
import os, signal, sys, threading
import capbus

p = capbus.connect(wait="block")
got = {}

def wait_for_late():
    try:
        got["ep"] = p.lookup("late", timeout=10)
    except Exception as exc:
        got["err"] = exc

t = threading.Thread(target=wait_for_late)
t.start()
print("PARKED", p.id, flush=True)
input()  # the test checks the lookup is parked in the kernel
pid = os.fork()
if pid == 0:
    signal.alarm(10)
    sys.exit(0)
_, status = os.waitpid(pid, 0)
print("FORKED", os.waitstatus_to_exitcode(status), flush=True)
t.join(15)
print("RESULT", got.get("ep") and got["ep"].process_id, repr(got.get("err")), flush=True)
"""


def test_fork_while_a_request_is_in_flight(kernel, children):
    """A child forked (and exiting) while the parent waits on a parked lookup does not
    disturb it: the answer still reaches the parent."""
    proc = children.start(FORK_DURING_REQUEST, stdin=subprocess.PIPE)
    parent_id = int(readline(proc).split()[1])
    assert wait_for(lambda: kernel.process_stats(parent_id)["parked"] == 1, 5)
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert readline(proc) == "FORKED 0"
    assert kernel.process_stats(parent_id)["parked"] == 1
    with capbus.connect(kernel.socket_path, wait="block") as server:
        server.register("late")
        assert readline(proc) == f"RESULT {server.id} None"
    assert proc.wait(10) == 0


# ---- the parent dies while a forked child holds a copy of its socket ----------------------------

# A subreaper supervisor: P (connected, serving "doomed") forks C (sleeping). The test kills P;
# C is reparented here, so it is reaped (and killed) here, never left behind.
SUPERVISED_FORK = r"""
import ctypes, os, signal, sys, time

libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
os.environ["CAPBUS_DEBUGGABLE"] = "1"  # the test reads our /proc/<pid>/fd (as any uid)
hold_copy = sys.argv[1] == "1"
r, w = os.pipe()
p_pid = os.fork()
if p_pid == 0:
    signal.alarm(60)
    os.close(r)
    import capbus
    proc = capbus.connect(wait="block")
    proc.register("doomed")
    if hold_copy:
        # A copy the library does not know of (as one passed on through pass_fds, or held by
        # a child that forked without Python's at-fork handlers): C keeps the socket open.
        keep = os.dup(proc._control.sock.fileno())
    c_pid = os.fork()
    if c_pid == 0:
        signal.alarm(60)
        # Reported from C, so the at-fork handlers have run by the time the test looks.
        os.write(w, f"{proc.id} {os.getpid()}\n".encode())
        time.sleep(60)
        os._exit(0)
    time.sleep(60)
    os._exit(0)
os.close(w)
proc_id, c_pid = os.read(r, 100).decode().split()
print("PIDS", p_pid, proc_id, c_pid, flush=True)
sys.stdin.readline()
for pid in (int(c_pid), p_pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
reaped = []
while True:
    try:
        reaped.append(os.wait()[0])
    except ChildProcessError:
        break
print("REAPED", sorted(reaped), flush=True)
"""


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:"):
            out.add(target)
    return out


@pytest.mark.parametrize("hold_copy", [True, False], ids=["child-holds-copy", "library-only"])
def test_parent_death_is_seen_while_child_holds_socket(kernel, children, caplog, hold_copy):
    caplog.set_level(logging.INFO, logger="capbus.kernel")
    sup = children.start(SUPERVISED_FORK, "1" if hold_copy else "0", stdin=subprocess.PIPE)
    try:
        _, p_pid, proc_id, c_pid = readline(sup, 20).split()
        p_pid, proc_id, c_pid = int(p_pid), int(proc_id), int(c_pid)
        shared = _socket_inodes(p_pid) & _socket_inodes(c_pid)
        assert bool(shared) == hold_copy, shared
        with capbus.connect(kernel.socket_path, wait="block") as watcher:
            ep = watcher.lookup("doomed", timeout=5)
            assert ep.process_id == proc_id
            died = threading.Event()
            ep.on_death(lambda e: died.set())
            t0 = time.monotonic()
            os.kill(p_pid, signal.SIGKILL)
            assert died.wait(1.0), "no on_death within 1 s of SIGKILL"
            elapsed = time.monotonic() - t0
            assert elapsed < 1.0
            assert ep.dead
            assert "doomed" not in {s["name"] for s in kernel.services()}
            assert proc_id not in {p["id"] for p in kernel.processes()}
            with pytest.raises(capbus.ServiceNotFound):
                watcher.lookup("doomed")
            os.kill(c_pid, 0)  # the child (and its copy) is still there
        gone = [r.getMessage() for r in caplog.records
                if r.name == "capbus.kernel" and f"process {proc_id} " in r.getMessage()
                and "gone" in r.getMessage()]
        assert len(gone) == 1, gone
        if hold_copy:  # the socket stayed open: only the pidfd can have told
            assert gone[0].endswith("gone: exited"), gone
    finally:
        if sup.poll() is None:
            sup.stdin.write("\n")
            sup.stdin.flush()
    reaped = readline(sup, 10)
    assert reaped.startswith("REAPED")
    assert sup.wait(10) == 0


# ---- a child that writes on the inherited socket -------------------------------------------------

CHILD_WRITES = r"""
import array, os, signal, socket, sys
import capbus
from capbus._protocol import frames

mode = sys.argv[1]
path = os.environ["CAPBUS_SOCKET"]

def recv_frame(s):
    data, anc, _, _ = s.recvmsg(frames.MAX_FRAME + 1, socket.CMSG_SPACE(frames.MAX_FDS * 4))
    nfds = 0
    for level, kind, payload in anc:
        if kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            for fd in fds:
                os.close(fd)
            nfds += len(fds)
    return frames.decode(data, nfds) if data else None

if mode == "library":
    proc = capbus.connect(wait="block")
    proc.register("victim")
    my_id = proc.id
    fd = os.dup(proc._control.sock.fileno())  # a copy that survives the library's at-fork close
else:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(5)
    s.connect(path)
    s.send(frames.encode(frames.Hello(frames.VERSION, "block"), 1))
    my_id = recv_frame(s)[0].process_id
    s.send(frames.encode(frames.Register("victim"), 2))
    assert recv_frame(s)[0].name == "victim"
    fd = s.fileno()
print("READY", os.getpid(), my_id, flush=True)
input()
pid = os.fork()
if pid == 0:
    signal.alarm(10)
    try:
        # A perfectly valid frame, with a fresh request id, on the parent's connection.
        os.write(fd, frames.encode(frames.Lookup("victim", 0), 4242))
    finally:
        os._exit(0)
_, status = os.waitpid(pid, 0)
print("CHILD", pid, os.waitstatus_to_exitcode(status), flush=True)
if mode == "library":
    import time
    deadline = time.monotonic() + 5
    while not proc.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        proc.lookup("victim")
        outcome = "still-works"
    except capbus.KernelUnavailable:
        outcome = "KernelUnavailable"
else:
    try:
        got = recv_frame(s)
        outcome = "closed" if got is None else f"got {got}"
    except ConnectionResetError:
        outcome = "closed"
    except TimeoutError:
        outcome = "still-open"
print("PARENT", outcome, flush=True)
"""


@pytest.mark.parametrize("mode", ["library", "raw"])
def test_frame_from_forked_child_closes_the_connection(kernel, children, caplog, mode):
    caplog.set_level(logging.INFO, logger="capbus.kernel")
    proc = children.start(CHILD_WRITES, mode, stdin=subprocess.PIPE)
    _, parent_pid, parent_id = readline(proc, 20).split()
    parent_pid, parent_id = int(parent_pid), int(parent_id)
    assert {s["name"]: s["id"] for s in kernel.services()}.get("victim") == parent_id
    proc.stdin.write("\n")
    proc.stdin.flush()
    _, child_pid, code = readline(proc, 20).split()
    assert code == "0"
    expected = "KernelUnavailable" if mode == "library" else "closed"
    assert readline(proc, 20) == f"PARENT {expected}"
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "capbus.kernel" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "forked child" in warnings[0]
    assert f"pid {child_pid} on the connection of pid {parent_pid}" in warnings[0]
    assert "victim" not in {s["name"] for s in kernel.services()}
    assert parent_id not in {p["id"] for p in kernel.processes()}
    assert proc.wait(10) == 0
    # A fresh connection from anyone still works.
    with capbus.connect(kernel.socket_path, wait="block") as p:
        p.register("victim")


# ---- the child's copy of an Endpoint: the native call/send_async ---------------------------------

# The parent serves "fork-ep" on a thread and calls it (twice: the native front has cached this
# thread's lane), then forks; the child tries the parent's endpoint in the same (copied) thread.
FORK_ENDPOINT = r"""
import os, signal, sys, threading
import capbus

ops = sys.argv[1].split(",")
p = capbus.connect(wait="block")
svc = p.register("fork-ep")
stop = threading.Event()
served = []

def serve():
    while not stop.is_set():
        try:
            req = svc.recv(timeout=0.05)
        except capbus.Timeout:
            continue
        served.append((req.opcode, req.sender == p.id))
        if req.expects_reply:
            req.reply(req.opcode + 1, (os.getpid(),))

t = threading.Thread(target=serve, daemon=True)
t.start()
ep = p.lookup("fork-ep")
assert ep.call(1, timeout=5).data[0] == os.getpid()
assert ep.call(1, data=(2,), timeout=5).opcode == 2
ep.send_async(2)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        signal.alarm(20)
        os.close(r)
        child = {
            "call": lambda: ep.call(10, timeout=1),
            "call_kw": lambda: ep.call(opcode=11, data=(1,), payload=b"x", timeout=None),
            "send_async": lambda: ep.send_async(12),
            "send_async_kw": lambda: ep.send_async(opcode=13, payload=b"y" * 100),
            "call_flags": lambda: ep.call(14, flags=0x10000, timeout=1),
            "send_flags": lambda: ep.send_async(15, flags=0x10000),
            "send_many": lambda: ep.send_many([(16, ())]),
            "call_object": lambda: ep.call_object([1], opcode=17, timeout=1),
            # The parent's service, while a parent thread is inside recv (its lock held).
            "recv": lambda: svc.recv(timeout=0.3),
            "recv_none": lambda: svc.recv(),
            "poll": lambda: svc.poll(),
            "recv_many": lambda: svc.recv_many(4, timeout=0.3),
        }
        out = []
        for name in ops:
            try:
                child[name]()
                out.append(f"{name}=no-error")
            except capbus.KernelUnavailable as exc:
                out.append(f"{name}=KernelUnavailable:{'fork' in str(exc)}")
            except Exception as exc:
                out.append(f"{name}={type(exc).__name__}")
        os.write(w, (" ".join(out) + "\n").encode())
    finally:
        os._exit(0)
os.close(w)
data = b""
while chunk := os.read(r, 65536):
    data += chunk
_, status = os.waitpid(pid, 0)
print("CHILD", os.waitstatus_to_exitcode(status), data.decode().strip(), flush=True)
# The parent's endpoint, in the same thread, on the lane the child saw: untouched.
try:
    after = ep.call(3, data=(4,), timeout=5).opcode
except Exception as exc:
    after = type(exc).__name__
stop.set()
t.join(5)
print("PARENT", after, ",".join(str(op) for op, mine in served if mine), flush=True)
"""

FAST_OPS = ["call", "call_kw", "send_async", "send_async_kw"]


def test_forked_child_cannot_use_the_parents_endpoint(kernel, children):
    proc = children.start(FORK_ENDPOINT, ",".join(FAST_OPS), stdin=subprocess.DEVNULL)
    child_line = readline(proc, 30)
    assert child_line.startswith("CHILD 0 "), child_line
    results = dict(item.split("=", 1) for item in child_line.split()[2:])
    # Refused although this thread's lane was warm in the native cache before the fork.
    assert results == {op: "KernelUnavailable:True" for op in FAST_OPS}, results
    # Nothing reached the parent's service from the child, and the parent's lane still works.
    assert readline(proc, 20) == "PARENT 4 1,1,2,3"
    assert proc.wait(10) == 0


# The Python paths of the endpoint, and every receive on the parent's service (a parent thread is
# inside recv at the fork, its lock held). Before: the child sent on the parent's lane and broke
# it, took the parent's messages, or hung on that lock. Now each refuses at once.
@pytest.mark.parametrize("op", ["call_flags", "send_flags", "send_many", "call_object",
                                "recv", "recv_none", "poll", "recv_many"])
def test_forked_child_cannot_use_the_parents_lanes_or_service(kernel, children, op):
    proc = children.start(FORK_ENDPOINT, op, stdin=subprocess.DEVNULL)
    child_line = readline(proc, 30)
    assert child_line == f"CHILD 0 {op}=KernelUnavailable:True", child_line
    assert readline(proc, 20) == "PARENT 4 1,1,2,3"
    assert proc.wait(10) == 0
