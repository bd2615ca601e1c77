"""Service: the capability to serve a registered name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._protocol import frames

if TYPE_CHECKING:
    from .process import Process


class Service:
    def __init__(self, proc: Process, handle: int, name: str) -> None:
        self._proc = proc
        self.handle = handle
        self.name = name

    def __repr__(self) -> str:
        return f"<capbus.Service {self.name!r} of process {self._proc.id}>"

    def close(self) -> None:
        """Unregister: the name is free again."""
        if not self._proc.closed:
            self._proc._request(frames.Release(self.handle))
