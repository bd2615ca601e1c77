"""Subscription to registration notices: opt-in, coalesced, carrying no identity (Tock)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from .._protocol import frames

if TYPE_CHECKING:
    from .process import Process


class Subscription:
    def __init__(self, proc: Process, handle: int) -> None:
        self._proc = proc
        self.handle = handle
        self._cond = threading.Condition()
        self._pending = False

    def wait(self, timeout: float | None = None) -> bool:
        """True once some service has registered since the last wait (then re-discover: the
        notice says nothing about which); False on timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._pending or self._proc.closed, timeout):
                return False
            if not self._pending:
                return False
            self._pending = False
        # Acknowledge, so the kernel may send the next (one outstanding at a time).
        self._proc._request(frames.NotifyAck(self.handle))
        return True

    def close(self) -> None:
        if not self._proc.closed:
            self._proc._request(frames.Release(self.handle))

    def _notify(self) -> None:
        with self._cond:
            self._pending = True
            self._cond.notify_all()
