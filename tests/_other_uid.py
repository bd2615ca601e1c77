"""Processes of another uid for the tests that need one (root only): a fresh uid that no account
and no process uses, a kernel socket that such a process may reach, and the lines a child runs
first to become that uid."""

from __future__ import annotations

import os
import pwd

import pytest


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


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the test runs processes of a fresh uid (fork + setuid)")


def fresh_uid(start: int = 61_000) -> int:
    """A uid with no account and no live process."""
    used = {p.pw_uid for p in pwd.getpwall()}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                used.add(os.stat(f"/proc/{pid}").st_uid)
            except OSError:
                pass
    uid = start
    while uid in used:
        uid += 1
    return uid


def open_to_other_uids(socket_path: str) -> None:
    """Let other uids reach a kernel's socket (as a daemon serving several users is set up): the
    socket is born 0600 in a 0700 directory; the test's own sockdir is made traversable."""
    os.chmod(os.path.dirname(socket_path), 0o711)
    os.chmod(socket_path, 0o666)
