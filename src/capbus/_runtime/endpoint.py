"""Endpoint: a capability to reach a service (call it, send to it, watch it).

Each calling thread gets its own lane (a channel with its own rings, opened on first use), so
calls from several threads run concurrently and every ring keeps a single producer.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import _core
from .._errors import InvalidCapability, error_from_code
from .._protocol import frames
from .message import USER_FLAGS, Message, bad_flags, pad_data

if TYPE_CHECKING:
    from .process import Process

log = logging.getLogger("capbus")
_WAIT_CODES = {"spin": 0, "adaptive": 1, "block": 2}
_REPLY = _core.FLAG_REPLY_EXPECTED
_ERROR = _core.FLAG_ERROR
ADAPTIVE_SPIN_NS = 50_000


class _LaneHolder:
    """A thread's lane; when the thread ends, the holder goes and the channel is given back."""

    __slots__ = ("lane", "index", "_ep", "__weakref__")

    def __init__(self, ep: Endpoint, lane: object, index: int) -> None:
        self.lane, self.index, self._ep = lane, index, ep

    def __del__(self) -> None:
        ep = self._ep
        if not ep._closed and not ep._proc.closed and os.getpid() == ep._proc._pid:
            ep._proc._control.request_nowait(frames.CloseChannel(ep.handle, self.index))


def timeout_ns(timeout: float | None) -> int:
    if timeout is None:
        return -1
    if timeout < 0:
        raise ValueError("timeout must be >= 0 or None")
    return int(timeout * 1e9)


class Endpoint:
    def __init__(self, proc: Process, handle: int, process_id: int, name: str) -> None:
        self._proc = proc
        self.handle = handle
        self.process_id = process_id  # the serving process
        self.name = name
        self._lock = threading.Lock()
        self._local = threading.local()
        self._death_callbacks: list[Callable[[Endpoint], None]] = []
        self._watching = False
        self._closed = False
        self.dead = False

    def __repr__(self) -> str:
        return f"<capbus.Endpoint {self.name!r} of process {self.process_id}>"

    # ---- calls --------------------------------------------------------------------------------

    def call(self, opcode: int, data: tuple[int, ...] = (), payload: bytes = b"",
             timeout: float | None = None, flags: int = 0) -> Message:
        """Send a request and wait for the reply.

        Timeout cancels the transaction (a late reply is dropped); PeerDied if the server exits;
        ValueError / MessageTooLarge before anything is sent if the arguments cannot travel.
        """
        # The hot path: no helper calls unless something needs fixing up.
        holder = getattr(self._local, "holder", None)
        lane = holder.lane if holder is not None else self._lane()
        if len(data) != 4:
            data = pad_data(data)
        if flags & ~USER_FLAGS:
            raise bad_flags(flags)
        r = lane.call(self.handle, opcode, flags | _REPLY, data[0], data[1], data[2], data[3],
                      payload or None, -1 if timeout is None else timeout_ns(timeout))
        if r[1] & _ERROR:
            text = (r[6] or b"").decode(errors="replace")
            raise error_from_code(r[2], f"{self.name!r} failed: {text}")
        return Message(r)

    def _lane(self):
        holder = getattr(self._local, "holder", None)
        if holder is not None:
            return holder.lane
        if self._closed:
            raise InvalidCapability(f"endpoint {self.name!r} is closed")
        proc = self._proc
        reply, fds = proc._request_fds(frames.OpenChannel(self.handle))
        assert isinstance(reply, frames.ChannelGranted)
        chan_fd, ctrl_fd, doorbell_fd = fds
        try:
            lane = _core.Lane(chan_fd, ctrl_fd, doorbell_fd, reply.index, reply.nslots,
                              reply.arena_size, _WAIT_CODES[proc.wait_mode], ADAPTIVE_SPIN_NS)
        finally:
            for fd in fds:
                os.close(fd)
        self._local.holder = _LaneHolder(self, lane, reply.index)
        return lane

    # ---- death --------------------------------------------------------------------------------

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
        """Give the capability back (its lanes close with it)."""
        self._closed = True
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
