"""Endpoint: a capability to reach a service (call it, send to it, watch it)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .._protocol import frames

if TYPE_CHECKING:
    from .process import Process

log = logging.getLogger("capbus")


class Endpoint:
    def __init__(self, proc: Process, handle: int, process_id: int, name: str) -> None:
        self._proc = proc
        self.handle = handle
        self.process_id = process_id  # the serving process
        self.name = name
        self._lock = threading.Lock()
        self._death_callbacks: list[Callable[[Endpoint], None]] = []
        self._watching = False
        self.dead = False

    def __repr__(self) -> str:
        return f"<capbus.Endpoint {self.name!r} of process {self.process_id}>"

    def on_death(self, callback: Callable[[Endpoint], None]) -> None:
        """Call `callback(endpoint)` once the serving process has exited (at once if it has).

        Callbacks run on the runtime's control thread: keep them short, never block in them.
        """
        with self._lock:
            self._death_callbacks.append(callback)
            first = not self._watching
            self._watching = True
            dead = self.dead
        if dead:
            self._run_callback(callback)
        elif first:
            self._proc._watched[self.handle] = self
            self._proc._request(frames.Watch(self.handle))

    def close(self) -> None:
        """Give the capability back."""
        self._proc._watched.pop(self.handle, None)
        self._proc._endpoints.pop(self.handle, None)
        if not self._proc.closed:
            self._proc._request(frames.Release(self.handle))

    def _died(self) -> None:
        with self._lock:
            if self.dead:
                return
            self.dead = True
            callbacks = list(self._death_callbacks)
        for cb in callbacks:
            self._run_callback(cb)

    def _run_callback(self, cb: Callable[[Endpoint], None]) -> None:
        try:
            cb(self)
        except Exception:
            log.exception("on_death callback %r raised", cb)
