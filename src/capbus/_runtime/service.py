"""Service: the capability to serve a registered name, and the receiving end of its channels.

All of a service's channels share one doorbell; the native ServerSet waits on it and serves
the channels round robin. Garbage found on a channel closes that channel only, and is reported
to the kernel.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import _core
from .._errors import IpcError, PeerDied, Timeout
from .._protocol import frames
from .endpoint import _WAIT_CODES, ADAPTIVE_SPIN_NS, timeout_ns
from .message import Message, Request

if TYPE_CHECKING:
    from .process import Process

log = logging.getLogger("capbus")


class Service:
    def __init__(self, proc: Process, handle: int, name: str, doorbell_fd: int) -> None:
        self._proc = proc
        self.handle = handle
        self.name = name
        self.corrupt_channels = 0  # channels dropped for garbage (reported to the kernel)
        try:
            self._set = _core.ServerSet(doorbell_fd, _WAIT_CODES[proc.wait_mode], ADAPTIVE_SPIN_NS)
        finally:
            os.close(doorbell_fd)
        self._closed = False

    def __repr__(self) -> str:
        return f"<capbus.Service {self.name!r} of process {self._proc.id}>"

    def recv(self, timeout: float | None = None) -> Request:
        """The next request from any client (round robin across them); Timeout if none."""
        if self._closed:
            raise IpcError(f"service {self.name!r} is closed")
        if timeout is None:
            deadline = 0.0
            ns = -1
        else:
            deadline = time.monotonic() + timeout
            ns = timeout_ns(timeout)
        while True:
            try:
                return Request(self, self._set.recv(ns))
            except _core.CorruptChannel as exc:
                self._corrupt(exc.index, exc.reason)
            if self._closed:
                raise IpcError(f"service {self.name!r} is closed")
            if timeout is not None:  # garbage does not extend the caller's timeout
                ns = timeout_ns(max(0.0, deadline - time.monotonic()))

    def serve(self, handler: Callable[[Request], Any], *, poll: float = 0.2) -> None:
        """Receive and answer until the service is closed.

        handler(req) returns None (reply opcode 0), an opcode, (opcode, data),
        (opcode, data, payload) or a Message; an exception is sent back to the caller as an
        error, and the loop goes on. A caller that died meanwhile just loses its reply.
        """
        while not self._closed and not self._proc.closed:
            try:
                req = self.recv(poll)
            except Timeout:
                continue
            except IpcError:
                if self._closed or self._proc.closed:
                    return
                raise
            try:
                result = handler(req)
            except Exception as exc:  # the caller hears of it; the service goes on
                log.debug("handler raised for %s", req, exc_info=True)
                try:
                    req.reply_error(exc)
                except PeerDied:
                    pass
                continue
            if req.expects_reply and not req._done:
                try:
                    _reply_with(req, result)
                except PeerDied:
                    pass

    def allow(self, *who: int | str) -> None:
        """Accept these senders (ProcessIds, "uid:N", "package:P", "name:N") from now on."""
        self._proc._request(frames.Access(self.handle, [str(w) for w in who], None))

    def deny(self, *who: int | str) -> None:
        """Refuse these senders from now on; their open channels close at once."""
        self._proc._request(frames.Access(self.handle, None, [str(w) for w in who]))

    def close(self) -> None:
        """Unregister: the name is free again, and every channel to this service closes."""
        self._closed = True
        self._proc._services.pop(self.handle, None)
        if not self._proc.closed:
            self._proc._request(frames.Release(self.handle))

    # ---- called by the runtime ----------------------------------------------------------------

    def _channel_opened(self, msg: frames.ChannelOpened, fds: list[int]) -> None:
        try:
            self._set.add(msg.index, fds[0], fds[1], msg.nslots, msg.arena_size, msg.sender)
        except Exception as exc:  # could not map it: the kernel closes it for its client
            log.warning("service %r cannot map channel %d: %s", self.name, msg.index, exc)
            self._proc._control.request_nowait(frames.ReportBad(self.handle, msg.index, str(exc)))

    def _channel_closed(self, index: int) -> None:
        try:
            self._set.remove(index)
        except KeyError:  # never mapped, or already dropped as corrupt
            pass

    def _corrupt(self, index: int, reason: str) -> None:
        # Free the index here first: once the kernel hears of it, it may reuse the index.
        self._channel_closed(index)
        self.corrupt_channels += 1
        log.warning("service %r: garbage on channel %d (%s): channel dropped", self.name, index,
                    reason)
        self._proc._control.request_nowait(frames.ReportBad(self.handle, index, reason))


def _reply_with(req: Request, result: Any) -> None:
    if result is None:
        req.reply(0)
    elif isinstance(result, int):
        req.reply(result)
    elif isinstance(result, Message):
        req.reply(result.opcode, result.data, result.payload, result.flags)
    elif isinstance(result, tuple):
        req.reply(*result)
    else:
        raise TypeError(f"handler returned {type(result).__name__}: return None, an opcode, "
                        "(opcode, data[, payload]) or a Message")
