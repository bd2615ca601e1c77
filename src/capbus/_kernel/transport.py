"""The kernel's socket shell for one process connection: receive with credentials, send with a
bounded outbox. Everything about what the bytes mean is in capbus._protocol.
"""

from __future__ import annotations

import array
import collections
import os
import socket
import struct

from .._errors import ProtocolError
from .._protocol import frames

_UCRED = struct.Struct("3i")
_ANC = socket.CMSG_SPACE(_UCRED.size) + socket.CMSG_SPACE(frames.MAX_FDS * 4)

# Responses are bounded by the in-flight limit, registration notices coalesce to one, and death
# events are bounded by the watcher's capability table; a process that lets more pile up is not
# reading its socket, and is disconnected.
MAX_OUTBOX = 4096 + 256
# Frames are not what costs the kernel: a queued frame holds duplicates of the fds it carries
# (a ChannelOpened five, a RegionGranted one), and every fd the kernel holds is one fewer for
# everybody else. So the outbox is also bounded in fds (KernelLimits.outbox_fds).
DEFAULT_OUTBOX_FDS = 4096


class FdBudget:
    """Queued fds shared by several connections (all of one OS process, or of one uid), so that
    many connections from one process do not multiply its budget."""

    def __init__(self, limit: int, what: str, key: tuple[str, int] | None = None) -> None:
        self.limit = limit
        self.what = what  # for the error: "pid 123 (outbox_fds)"
        self.key = key  # the kernel's name for it
        self.used = 0
        self.users = 0  # connections sharing it


class Transport:
    def __init__(self, sock: socket.socket, max_fds: int = DEFAULT_OUTBOX_FDS) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock = sock
        self.max_fds = max_fds
        self.queued_fds = 0  # fds the outbox holds (its duplicates)
        self.budgets: tuple[FdBudget, ...] = ()  # shared budgets these fds also count against
        self.outbox: collections.deque[tuple[bytes, tuple[int, ...]]] = collections.deque()

    def fileno(self) -> int:
        return self.sock.fileno()

    def peer_creds(self) -> tuple[int, int, int]:
        raw = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        return _UCRED.unpack(raw)

    def recv(self) -> tuple[bytes, int, int] | None:
        """One frame as (data, sender pid, number of fds it carried); None at end of stream.

        Fds sent to the kernel are closed at once: no request carries any, so their count only
        serves to reject the frame. BlockingIOError propagates when nothing is there.
        """
        data, anc, flags, _ = self.sock.recvmsg(frames.MAX_FRAME + 1, _ANC)
        pid, nfds = -1, 0
        for level, kind, payload in anc:
            if level != socket.SOL_SOCKET:
                continue
            if kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
                pid = _UCRED.unpack_from(payload)[0]
            elif kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                for fd in fds:
                    os.close(fd)
                nfds += len(fds)
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("frame with more ancillary data (fds) than any request carries")
        if flags & socket.MSG_TRUNC:
            raise ProtocolError(f"frame larger than the maximum of {frames.MAX_FRAME} bytes")
        if not data and not anc:
            return None
        return data, pid, nfds

    def send(self, frame: bytes, fds: tuple[int, ...] = ()) -> bool:
        """Send or queue one frame; True if the outbox now needs the loop to watch for write."""
        if self.outbox:
            self._queue(frame, fds)
            return True
        try:
            self._sendmsg(frame, fds)
            return False
        except BlockingIOError:
            self._queue(frame, fds)
            return True

    def flush(self) -> bool:
        """Send what is queued; True while something is left."""
        while self.outbox:
            frame, fds = self.outbox[0]
            try:
                self._sendmsg(frame, fds)
            except BlockingIOError:
                return True
            self.outbox.popleft()
            self._release(len(fds))
            for fd in fds:
                os.close(fd)
        return False

    def _sendmsg(self, frame: bytes, fds: tuple[int, ...]) -> None:
        if fds:
            self.sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            self.sock.send(frame)

    def _queue(self, frame: bytes, fds: tuple[int, ...]) -> None:
        if len(self.outbox) >= MAX_OUTBOX:
            raise ProtocolError(f"process is not reading its control socket ({MAX_OUTBOX} queued)")
        if self.queued_fds + len(fds) > self.max_fds:
            raise ProtocolError(
                f"process is not reading its control socket: {self.queued_fds} fds queued for it "
                f"and the kernel keeps at most {self.max_fds} per connection (outbox_fds)")
        for budget in self.budgets:
            if budget.used + len(fds) > budget.limit:
                raise ProtocolError(
                    f"process is not reading its control socket: {budget.used} fds are queued for "
                    f"the connections of {budget.what}, which may have at most {budget.limit}")
        # Queued fds must outlive the caller's copies: the outbox owns duplicates. A dup that
        # fails half-way (out of fds) must not leak the ones already made.
        dups: list[int] = []
        try:
            for fd in fds:
                dups.append(os.dup(fd))
        except BaseException:
            for fd in dups:
                os.close(fd)
            raise
        self.outbox.append((frame, tuple(dups)))
        self.queued_fds += len(dups)
        for budget in self.budgets:
            budget.used += len(dups)

    def _release(self, n: int) -> None:
        self.queued_fds -= n
        for budget in self.budgets:
            budget.used -= n

    def close(self) -> None:
        for _, fds in self.outbox:
            for fd in fds:
                os.close(fd)
        self.outbox.clear()
        self._release(self.queued_fds)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
