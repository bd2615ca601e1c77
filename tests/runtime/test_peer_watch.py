"""The runtime's own watch on its peers' processes (PeerWatch): every exit is reported once, and
what it remembers of exits is bounded however many peers come and go."""

from __future__ import annotations

import os
import threading
import time

from capbus._runtime import peers


def _child_waiting(r: int, w: int) -> int:
    """A child that exits when the pipe (r, w) is closed by this process (end of file on r)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.close(w)
            os.read(r, 1)
        finally:
            os._exit(0)
    return pid


def _reap(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            return
        time.sleep(0.001)
    os.kill(pid, 9)
    raise AssertionError(f"child {pid} did not exit")


def test_exits_reported_once_and_remembered_within_a_bound(monkeypatch):
    monkeypatch.setattr(peers, "DEAD_KEPT", 40)
    seen: list[int] = []
    done = threading.Event()
    n = 120

    def on_exit(pid: int) -> None:
        seen.append(pid)
        if len(seen) == n:
            done.set()

    watch = peers.PeerWatch(on_exit)
    pids = []
    try:
        for _ in range(n):
            r, w = os.pipe()
            pid = _child_waiting(r, w)
            os.close(r)
            assert watch.watch(pid)
            pids.append(pid)
            os.close(w)  # the child goes
            _reap(pid)
        assert done.wait(10), f"{len(seen)} of {n} exits reported"
        assert sorted(seen) == sorted(pids)  # each once
        assert len(watch.dead) <= 40
        assert all(watch.gone(pid) for pid in pids)  # forgotten ones too: no longer watched
        # An exit before the watch began: refused, and remembered (the oldest make room).
        gone_pid = pids[-1]
        watch.dead.clear()
        assert not watch.watch(gone_pid)
        assert watch.gone(gone_pid)
    finally:
        watch.close()
        for pid in pids:
            _reap(pid)
