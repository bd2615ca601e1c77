"""Processes under a fresh uid, for tests of what one process of a uid can do to another, and
of what a kernel lets other uids do: forked ones (AsUser, the as_user fixture) and the prelude of
a child started with conftest.Children that drops to one (become()).

A fresh uid needs no account: the child calls setgroups/setgid/setuid itself (root only: see
need_root). The child then runs fn(link, *args) and exits; `link` carries JSON values both ways
(a socketpair). The OS makes a process non-dumpable when its uid changes; the child sets it
dumpable again (dumpable=True, the default), as any process of that uid would be after an exec,
so that whatever makes it non-dumpable later is what a test sees.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pwd
import random
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any

import pytest

PR_SET_DUMPABLE = 4
_libc = ctypes.CDLL(None, use_errno=True)


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: it runs processes under a fresh uid (setuid)")


def fresh_uid() -> int:
    """A uid (and gid, the same number) that no account and no live process has, random so that
    runs do not meet."""
    used = {p.pw_uid for p in pwd.getpwall()}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                used.add(os.stat(f"/proc/{pid}").st_uid)
    while True:
        uid = 60000 + random.randrange(20000)
        if uid not in used:
            return uid


def become(uid: int | None = None) -> str:
    """The lines a child (started by conftest.Children, as root) runs before anything else: the
    modules it needs are imported while it is still root (the interpreter may live under /root),
    then it drops to `uid` for good (None: it stays as it is). Connections it opens afterwards
    carry that uid (SO_PEERCRED)."""
    return f"""
import array, collections, os, select, socket, sys, time
import capbus, capbus._runtime.process
from capbus._protocol import frames
_uid = {uid!r}
if _uid is not None:
    os.setgroups([])
    os.setgid(_uid)
    os.setuid(_uid)
    assert os.getuid() == _uid and os.geteuid() == _uid
"""


def open_to_other_uids(socket_path: str) -> None:
    """Let other uids reach a kernel's socket (as a daemon serving several users is set up): the
    socket is born 0600 in a 0700 directory; the test's own sockdir is made traversable."""
    os.chmod(os.path.dirname(socket_path), 0o711)
    os.chmod(socket_path, 0o666)


class Link:
    """One JSON value a line, over a stream socket; every receive has a timeout."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""

    def send(self, value: Any) -> None:
        self.sock.sendall(json.dumps(value).encode() + b"\n")

    def recv(self, timeout: float = 20.0) -> Any:
        self.sock.settimeout(timeout)
        while b"\n" not in self._buf:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise AssertionError(f"the other process sent nothing in {timeout} s") from None
            if not chunk:
                raise AssertionError("the other process exited without answering")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)


class AsUser:
    """fn(link, *args) in a forked child running as `uid` (gid the same; None: ours)."""

    def __init__(self, uid: int | None, fn: Callable[..., None], *args: Any,
                 dumpable: bool = True, env: dict[str, str] | None = None) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                ours.close()
                if uid is not None:
                    os.setgroups([])
                    os.setgid(uid)
                    os.setuid(uid)
                if dumpable and _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) != 0:
                    raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 1)")
                os.environ.update(env or {})
                fn(Link(theirs), *args)
                code = 0
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
            finally:
                os._exit(code)
        theirs.close()
        self.pid = pid
        self.link = Link(ours)
        self._reaped = False

    def send(self, value: Any) -> None:
        self.link.send(value)

    def recv(self, timeout: float = 20.0) -> Any:
        return self.link.recv(timeout)

    def stop(self) -> None:
        """SIGKILL and reap (a no-op once done)."""
        if self._reaped:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        self._reaped = True
        self.link.sock.close()


@pytest.fixture
def as_user():
    """as_user(uid, fn, *args, **kw) -> AsUser; every one SIGKILLed and reaped at teardown."""
    made: list[AsUser] = []

    def start(uid: int | None, fn: Callable[..., None], *args: Any, **kw: Any) -> AsUser:
        p = AsUser(uid, fn, *args, **kw)
        made.append(p)
        return p

    yield start
    for p in reversed(made):
        p.stop()
