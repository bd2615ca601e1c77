"""Subscription to registration notices: opt-in, coalesced, carrying no identity (Tock)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from .._protocol import frames

if TYPE_CHECKING:
    from .session import Session


class Subscription:
    def __init__(self, session: Session, handle: int) -> None:
        self._session = session
        self._ctl = session.control  # its handle means nothing to another kernel
        self.handle = handle
        self._cond = threading.Condition()
        self._pending = False
        self._closed = False

    def wait(self, timeout: float | None = None) -> bool:
        """True once some service has registered since the last wait (then re-discover: the
        notice says nothing about which); False on timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._pending or self._ctl.closed is not None, timeout):
                return False
            if not self._pending:
                return False
            self._pending = False
        # Acknowledge, so the kernel may send the next (one outstanding at a time).
        self._session.request(frames.NotifyAck(self.handle), via=self._ctl)
        return True

    def close(self) -> None:
        """Stop the notices (a second close does nothing)."""
        closed, self._closed = self._closed, True
        if not closed and self._ctl.closed is None:
            self._session.request(frames.Release(self.handle), via=self._ctl)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def _notify(self) -> None:
        with self._cond:
            self._pending = True
            self._cond.notify_all()
