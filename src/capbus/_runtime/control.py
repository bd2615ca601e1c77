"""A process's control connection to the kernel: the socket shell around the protocol's
ProcessConnection. Callers block on their own request; one reader thread receives every frame,
hands responses to their callers and events to the Process.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable

from .._errors import KernelUnavailable, ProtocolError, error_from_code
from .._protocol import frames
from .._protocol.connection import ProcessConnection

_ANC = socket.CMSG_SPACE(frames.MAX_FDS * 4)
# A kernel answers within milliseconds; this only bounds a wait on a kernel that hangs.
_KERNEL_GRACE = 30.0


class _Pending:
    __slots__ = ("done", "reply", "fds", "waited")

    def __init__(self, waited: bool = True) -> None:
        self.waited = waited
        self.done = threading.Event()
        self.reply: frames.Frame | BaseException | None = None
        self.fds: list[int] = []


class Control:
    def __init__(
        self,
        sock: socket.socket,
        on_event: Callable[[frames.Frame, list[int]], None],
        on_response: Callable[[frames.Frame, list[int]], list[int]],
        on_lost: Callable[[KernelUnavailable], None] | None = None,
    ):
        self.sock = sock
        # Runs on the reader thread before the caller wakes, so that state a response creates
        # exists before any later frame (events are ordered behind it on the one socket).
        self._on_response = on_response
        self._proto = ProcessConnection()
        # Re-entrant: a lane's finalizer may send a request_nowait from inside a GC pass that ran
        # while this thread held the lock; each section is self-contained, so nesting is safe.
        self._lock = threading.RLock()
        self._pending: dict[int, _Pending] = {}
        self._on_event = on_event
        self._closed: BaseException | None = None
        self._reader: threading.Thread | None = None
        # Called on the reader thread when the kernel goes (not when we close): the runtime then
        # watches its peers itself and, if asked to, reconnects.
        self._on_lost = on_lost
        self.lost = False

    def hello(self, wait_mode: str) -> frames.Welcome:
        """The first exchange, done before the reader thread starts."""
        _, frame = self._proto.request(frames.Hello(frames.VERSION, wait_mode))
        # A kernel that accepted but never answers (stopped, out of fds, not a capbus kernel)
        # must not hang connect(): the exchange is bounded like every other request.
        self.sock.settimeout(_KERNEL_GRACE)
        try:
            self.sock.send(frame)
            data, fds = self._recv()
        except TimeoutError:
            raise KernelUnavailable(
                f"no answer to Hello within {_KERNEL_GRACE} s: is a capbus kernel serving this socket?"
            ) from None
        except OSError as exc:
            raise KernelUnavailable(f"the kernel closed the connection during Hello: {exc}") from None
        finally:
            self.sock.settimeout(None)
        if data is None:
            raise KernelUnavailable("the kernel closed the connection during Hello")
        msg, _ = self._proto.receive(data, len(fds))
        if isinstance(msg, frames.Error):
            raise error_from_code(msg.code, msg.text)
        assert isinstance(msg, frames.Welcome)
        self._reader = threading.Thread(target=self._read_loop, name="capbus-control", daemon=True)
        self._reader.start()
        return msg

    def request(self, msg: frames.Frame, timeout: float | None = None) -> tuple[frames.Frame, list[int]]:
        """Send one request and wait for its answer; kernel errors are raised here."""
        pending = _Pending()
        with self._lock:
            if self._closed is not None:
                raise self._closed
            request_id, frame = self._proto.request(msg)
            self._pending[request_id] = pending
            try:
                self.sock.send(frame)
            except OSError as exc:
                del self._pending[request_id]
                raise KernelUnavailable(f"lost the kernel: {exc}") from None
        wait = None if timeout is None else timeout + _KERNEL_GRACE
        if not pending.done.wait(wait):
            raise KernelUnavailable(f"the kernel did not answer {type(msg).__name__} in {wait} s")
        reply = pending.reply
        if isinstance(reply, BaseException):
            raise reply
        assert reply is not None
        if isinstance(reply, frames.Error):
            raise error_from_code(reply.code, reply.text)
        return reply, pending.fds

    def request_nowait(self, msg: frames.Frame) -> None:
        """Send a request whose answer nobody waits for (it is read and dropped); never raises."""
        with self._lock:
            if self._closed is not None:
                return
            try:
                request_id, frame = self._proto.request(msg)
                self._pending[request_id] = _Pending(waited=False)
                self.sock.send(frame)
            except (OSError, ProtocolError):
                pass

    def close(self, reason: BaseException | None = None) -> None:
        with self._lock:
            graceful = self._closed is None and reason is None
            if self._closed is None:
                self._closed = reason or KernelUnavailable("this capbus Process is closed")
        reader = self._reader if self._reader is not threading.current_thread() else None
        if graceful and reader is not None:
            # Tell the kernel we are done and wait (briefly) for its end of file: it closes its
            # end once it has let go of everything this connection held, so what close()
            # gives back (quota, names) is free for the next request of any connection.
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
            reader.join(2)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        if reader is not None:
            reader.join(5)
        self.sock.close()

    def forget_after_fork(self, reason: BaseException) -> None:
        """In a forked child: this connection belongs to the parent. Drop our copy of the fd."""
        self._closed = reason
        self._pending.clear()
        with contextlib.suppress(OSError):
            self.sock.close()

    @property
    def closed(self) -> BaseException | None:
        return self._closed

    def _recv(self) -> tuple[bytes | None, list[int]]:
        data, anc, flags, _ = self.sock.recvmsg(frames.MAX_FRAME + 1, _ANC)
        fds: list[int] = []
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                fds.extend(arr)
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            for fd in fds:
                os.close(fd)
            raise ProtocolError("oversize frame from the kernel")
        if not data and not anc:
            return None, []
        return data, fds

    def _read_loop(self) -> None:
        reason: BaseException = KernelUnavailable("the kernel closed the connection")
        try:
            while True:
                data, fds = self._recv()
                if data is None:
                    break
                with self._lock:
                    msg, request_id = self._proto.receive(data, len(fds))
                    pending = self._pending.pop(request_id, None) if request_id else None
                if pending is not None:
                    pending.reply, pending.fds = msg, self._on_response(msg, fds)
                    pending.done.set()
                    if not pending.waited:
                        for fd in fds:
                            os.close(fd)
                elif request_id == 0:
                    self._on_event(msg, fds)
        except ProtocolError as exc:
            reason = KernelUnavailable(f"the kernel sent a malformed frame ({exc})")
        except OSError as exc:
            reason = KernelUnavailable(f"lost the kernel: {exc}")
        with self._lock:
            lost = self._closed is None
            if lost:
                self._closed = reason
                self.lost = True
            for pending in self._pending.values():
                pending.reply = self._closed
                pending.done.set()
            self._pending.clear()
            self._proto.close()
        if lost and self._on_lost is not None:
            try:
                self._on_lost(reason if isinstance(reason, KernelUnavailable)
                              else KernelUnavailable(str(reason)))
            except Exception:  # the reader thread must end whatever the handler does
                logging.getLogger("capbus").exception("handling the loss of the kernel failed")
