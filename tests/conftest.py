"""Shared fixtures: a real embedded kernel on a private socket, and real child processes."""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading

import pytest

import capbus


@pytest.fixture
def sockdir():
    # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer.
    d = tempfile.mkdtemp(prefix="cb-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def kernel(sockdir):
    k = capbus.Kernel(os.path.join(sockdir, "k.sock"))
    yield k
    k.stop()


class Children:
    """Python child processes running a snippet; all killed and reaped at teardown."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.procs: list[subprocess.Popen] = []

    def start(self, code: str, *args: str, **kw) -> subprocess.Popen:
        env = dict(os.environ, CAPBUS_SOCKET=self.socket_path, PYTHONUNBUFFERED="1")
        env.pop("CAPBUS_FD", None)
        p = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw,
        )
        p.lines = queue.Queue()  # type: ignore[attr-defined]

        def pump() -> None:
            for line in p.stdout:
                p.lines.put(line.rstrip("\n"))  # type: ignore[attr-defined]
            p.lines.put(None)  # type: ignore[attr-defined]

        threading.Thread(target=pump, daemon=True).start()
        self.procs.append(p)
        return p

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
            p.stderr.close()


@pytest.fixture
def children(kernel):
    c = Children(kernel.socket_path)
    yield c
    c.cleanup()


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.005) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def connects(path: str) -> bool:
    """Does a kernel answer at `path` (a daemon that is up, not a stale socket file)?"""
    try:
        capbus.connect(path).close()
        return True
    except capbus.KernelUnavailable:
        return False


def region_fds() -> int:
    """Region memfds this process holds (an embedded kernel's included)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:capbus-region")
        except OSError:
            pass
    return n


def readline(p: subprocess.Popen, timeout: float = 10.0) -> str:
    """One line of a child's stdout, or fail after `timeout` (never hang the suite)."""
    try:
        line = p.lines.get(timeout=timeout)  # type: ignore[attr-defined]
    except queue.Empty:
        raise AssertionError(f"child {p.pid} printed nothing in {timeout} s") from None
    if line is None:
        p.wait(5)
        raise AssertionError(f"child exited {p.returncode}: {p.stderr.read()}")
    return line


# ---- fixtures of the native-core tests (tests/test_core_*.py) ------------------------------------


@pytest.fixture
def db():
    """A service doorbell page, as the kernel would create it."""
    from capbus._kernel.shm import make_doorbell

    fd = make_doorbell()
    yield fd
    os.close(fd)


@pytest.fixture
def chans():
    """make(index, **kw) -> a test channel (tests/_core_util.py), all closed at teardown."""
    from _core_util import make_chan

    made = []

    def make(index: int, **kw):
        c = make_chan(index, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


# Processes under a fresh uid (tests/_users.py): as_user(uid, fn, *args) in any test.
from _users import as_user  # noqa: E402, F401


@pytest.fixture(autouse=True)
def no_zenoh_segments_left(request):
    """A gateway test leaves nothing in /dev/shm: Zenoh's shared-memory transport is off in every
    config a gateway, the bench or a test makes (a Zenoh process killed with a segment open would
    leave <n>.zenoh there)."""
    if "gateway" not in request.node.path.parts:
        yield
        return
    before = {n for n in os.listdir("/dev/shm") if n.endswith(".zenoh")}
    yield
    left = {n for n in os.listdir("/dev/shm") if n.endswith(".zenoh")} - before
    assert not left, f"Zenoh segments left in /dev/shm: {sorted(left)}"
