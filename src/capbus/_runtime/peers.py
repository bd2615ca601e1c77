"""The runtime's own watch on the OS processes at the other end of its channels (pidfds), so that
a peer's death is still seen when the kernel, which normally reports it, is gone.
One thread per Process, started with the first peer; it only reports, the Process decides.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable

log = logging.getLogger("capbus")

# How many exits PeerWatch.dead remembers. It only matters for the moments after an exit, until
# the kernel reports it (ChannelClosed), so that a kernel lost meanwhile does not hide it; the
# oldest are forgotten first, so that a long-lived process's peers coming and going cost nothing.
DEAD_KEPT = 1024


class PeerWatch:
    """pidfds by OS pid. A pidfd is opened when the kernel has just vouched for the pid (a channel
    was granted or opened), so a pid reused later cannot be mistaken for the peer."""

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit
        self._lock = threading.Lock()
        self._fds: dict[int, int] = {}  # pid -> pidfd
        self._pids: dict[int, int] = {}  # pidfd -> pid
        # pids seen to exit since the kernel last vouched for them, oldest first (a dict as an
        # ordered set), at most DEAD_KEPT
        self.dead: dict[int, None] = {}
        self._poll: select.epoll | None = None
        self._wake = -1
        self._thread: threading.Thread | None = None
        self._closed = False
        self._owner = os.getpid()

    def watch(self, pid: int) -> bool:
        """Watch `pid`; False if it has exited already (or cannot be watched and is gone)."""
        if pid <= 0 or pid == os.getpid():
            return True  # unknown, or ourselves (an embedded kernel's own services)
        with self._lock:
            if self._closed or os.getpid() != self._owner:
                return True
            self.dead.pop(pid, None)  # the kernel vouches for it now
            if pid in self._fds:
                return True
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                self._died(pid)
                return False
            except (OSError, AttributeError) as exc:  # Linux < 5.3: only the kernel sees deaths
                log.debug("cannot watch pid %d: %s", pid, exc)
                return True
            if self._poll is None:
                self._poll = select.epoll()
                self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self._poll.register(self._wake, select.EPOLLIN)
                self._thread = threading.Thread(target=self._run, name="capbus-peers", daemon=True)
                self._thread.start()
            self._fds[pid], self._pids[fd] = fd, pid
            self._poll.register(fd, select.EPOLLIN)
        return True

    def gone(self, pid: int) -> bool:
        """Has `pid`, watched since the kernel vouched for it, exited (or never been watchable)?"""
        if pid <= 0 or pid == os.getpid():
            return False
        with self._lock:
            return pid in self.dead or (self._poll is not None and pid not in self._fds)

    def _died(self, pid: int) -> None:
        """Remember an exit (the lock held), forgetting the oldest beyond DEAD_KEPT."""
        self.dead[pid] = None
        if len(self.dead) > DEAD_KEPT:
            del self.dead[next(iter(self.dead))]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._wake >= 0:
                os.eventfd_write(self._wake, 1)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)

    def _run(self) -> None:
        assert self._poll is not None
        while True:
            try:
                events = self._poll.poll()
            except InterruptedError:
                continue
            gone = []
            with self._lock:
                if self._closed:
                    break
                for fd, _ in events:
                    pid = self._pids.pop(fd, None)
                    if pid is None:
                        continue
                    del self._fds[pid]
                    self._poll.unregister(fd)
                    os.close(fd)
                    self._died(pid)
                    gone.append(pid)
            for pid in gone:
                try:
                    self._on_exit(pid)
                except Exception:
                    log.exception("handling the exit of peer pid %d failed", pid)
        with self._lock:
            for fd in self._pids:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._pids.clear()
            self._fds.clear()
            self._poll.close()
            os.close(self._wake)
