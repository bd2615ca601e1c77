"""Reading a running kernel, for every verb that looks at one (ps, services, caps, stats, top,
metrics, the demo): always through `Process.query()`, the runtime's public face of the kernel's
Query frames; never a private request.

The tool is a capbus process like any other (it shows up in the "processes" it lists). The
kernel answers only its own user (or root), and never a sandboxed or lookup-listed process.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import TYPE_CHECKING, Any

from .. import _paths
from .._errors import IpcError
from .stats import build

if TYPE_CHECKING:
    from .._runtime.process import Process


def default_socket() -> str:
    """The socket a verb without --socket talks to (as connect() picks it)."""
    return os.environ.get(_paths.ENV_SOCKET) or _paths.default_socket()


def rows(socket_path: str | None, what: str, process_id: int = 0) -> list[dict[str, Any]]:
    """Every row of one query, on a connection of its own (closed before returning)."""
    from .._runtime.process import connect

    with connect(socket_path) as proc:
        return proc.query(what, process_id)


class KernelSource:
    """One connection to the kernel for repeated queries; reconnects after the kernel restarts.

    It is a capbus process like any other, so it shows up in the "processes" it lists (as
    `viewer`). Thread-safe (the metrics server scrapes from several threads)."""

    def __init__(self, socket_path: str | None = None) -> None:
        self.socket_path = socket_path
        self._proc: Process | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> KernelSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def viewer(self) -> int | None:
        return None if self._proc is None else self._proc.id

    def close(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.close()

    def query(self, what: str, process_id: int = 0) -> list[dict[str, Any]]:
        """All rows of a query (paged, like `capbus ps`)."""
        from .._runtime.process import connect

        with self._lock:
            if self._proc is not None and self._proc.closed:
                self._proc = None
            if self._proc is None:
                self._proc = connect(self.socket_path)
            proc = self._proc
            try:
                return proc.query(what, process_id, timeout=10.0)
            except (OSError, IpcError):
                if proc.closed:  # the kernel went away: start afresh next time
                    self._proc = None
                raise

    def snapshot(self) -> dict[str, Any]:
        processes = self.query("processes")
        services = self.query("services")
        errors: list[str] = []
        try:
            channels = self.query("channels")
        except IpcError as exc:  # a kernel without channel counters: show the rest
            if self._proc is None:
                raise
            channels = []
            errors.append(f"channels query failed: {type(exc).__name__}: {exc}")
        try:
            topics = self.query("topics")
        except IpcError as exc:  # a kernel without topics: show the rest
            if self._proc is None:
                raise
            topics = []
            errors.append(f"topics query failed: {type(exc).__name__}: {exc}")
        return build(processes, services, channels, socket=self.socket_path or default_socket(),
                     viewer=self.viewer, errors=errors, topics=topics)


def snapshot(socket_path: str | None = None) -> dict[str, Any]:
    """One snapshot of the kernel at socket_path: processes, services and channels with their
    counters, "stats" aggregates on every service and process row, and "totals"."""
    with KernelSource(socket_path) as source:
        return source.snapshot()
