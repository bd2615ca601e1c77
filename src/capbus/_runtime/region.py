"""Region: shared memory a process holds as a capability (a kernel-created memfd, mapped here).

Transfer it with call(..., regions=[r], move=True): this side loses it (.buffer raises, and any
view still held reads zeros instead of the shared memory). Share it with move=False (needs the
share right). seal_readonly() makes it read-only for every holder, for good: a receiver that sees
.sealed (read from the memfd itself, trusting no holder) can check the contents once and rely on
them. A region is mapped as its seals allow: read-only when any holder sealed it against new
writable mappings (F_SEAL_WRITE or F_SEAL_FUTURE_WRITE, which its creator can add on its fd).

The memfd is closed as soon as it is mapped: an fd left open is one more way in for whoever can
reach this process's fds (/proc/<pid>/fd, pidfd_getfd), and one fd less for channels. When an fd
is needed again (to map it anew after a seal, to read seals a holder may have added since), the
kernel hands out a fresh one for the capability (MapRegion), used and closed at once.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import TYPE_CHECKING, Any

from .._errors import IpcError, PermissionDenied
from .._mapping import Mapping
from .._protocol import frames

if TYPE_CHECKING:
    from .session import Session

F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)  # Linux 5.1
_NO_WRITE_SEALS = fcntl.F_SEAL_WRITE | F_SEAL_FUTURE_WRITE


class Region:
    def __init__(self, session: Session, granted: frames.RegionGranted, fd: int) -> None:
        self._session = session
        self._ctl = session.control  # its handle means nothing to another kernel
        self.handle = granted.handle
        self.size = granted.size
        self.rights = frozenset(granted.rights or ())
        self._held = True  # the capability, until close() / a move gives it back
        self._seals = 0  # as last read (a seal is never lifted)
        self._map: Mapping | None = None
        self._view: memoryview | None = None
        self._gone: str | None = None
        self._writable = False  # how it is mapped now
        self._map_now(fd)  # on failure the caller closes fd (and gives the capability back)
        os.close(fd)

    def __repr__(self) -> str:
        state = self._gone or ("sealed" if self.sealed else "writable" if self.writable else "read-only")
        return f"<capbus.Region {self.size} bytes {state}>"

    @property
    def writable(self) -> bool:
        """True if it is mapped writable here (the right, and no seal forbidding it)."""
        return self._writable and self._view is not None

    @property
    def sealed(self) -> bool:
        """True if the memfd is sealed against writes: read from the memfd (on a fresh fd the
        kernel gives for this capability) unless seen sealed already; False once closed, or
        while no kernel can give that fd (not sealed as far as this process knows)."""
        if self._seals & fcntl.F_SEAL_WRITE:
            return True
        if not self._held:
            return False
        try:
            fd = self._fresh_fd()
        except IpcError:
            return False
        try:
            self._seals |= fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        finally:
            os.close(fd)
        return bool(self._seals & fcntl.F_SEAL_WRITE)

    @property
    def buffer(self) -> memoryview:
        """The region's bytes (read-only unless writable)."""
        if self._view is None:
            raise IpcError(f"this region is {self._gone or 'closed'}: it is no longer accessible here")
        return self._view

    def ndarray(self, dtype: Any = "uint8", shape: Any = None) -> Any:
        """A numpy array over the region (no copy); numpy is an optional dependency."""
        try:
            import numpy as np
        except ImportError:
            raise ImportError("Region.ndarray needs numpy: pip install numpy") from None
        arr = np.frombuffer(self.buffer, dtype=dtype)
        return arr if shape is None else arr.reshape(shape)

    def seal_readonly(self) -> None:
        """Seal the region against writes everywhere, for good (PermissionDenied while another
        holder still has it mapped writable). Afterwards it is mapped read-only here too."""
        self._unmap("being sealed")
        try:
            self._session.request(frames.SealRegion(self.handle), via=self._ctl)
        finally:
            fd = self._fresh_fd()
            try:
                self._gone = None
                self._map_now(fd)
            finally:
                os.close(fd)

    def close(self) -> None:
        """Unmap it and give the capability back (the memory goes with its last holder)."""
        if not self._held:
            return
        self._unmap("closed")
        self._held = False
        self._session.forget_region(self.handle)
        if self._ctl.closed is None:
            self._session.request(frames.Release(self.handle), via=self._ctl)

    def __del__(self) -> None:
        # Dropped without close(): give the capability back; the mapping itself goes when the
        # last view of it does (see _mapping.Mapping).
        if getattr(self, "_held", False):
            self._held = False
            ctl = getattr(self, "_ctl", None)
            if ctl is not None and self._session.live(ctl):
                ctl.request_nowait(frames.Release(self.handle))

    def held_by(self, session: Session) -> bool:
        """Whether this region is a capability of that connection (what a message may carry)."""
        return self._session is session

    # ---- internals ----------------------------------------------------------------------------

    def _fresh_fd(self) -> int:
        """An fd of the memfd, from the kernel (the caller closes it)."""
        reply, fds = self._session.request_fds(frames.MapRegion(self.handle), via=self._ctl)
        for extra in fds[1:]:
            os.close(extra)
        if not fds:
            raise IpcError("the kernel sent no fd for the region")
        return fds[0]

    def _map_now(self, fd: int) -> None:
        # The kernel sized it and sealed it against growing and shrinking, but the check is
        # ours: a mapping past the end of the file would crash this process on first touch.
        if os.fstat(fd).st_size < self.size:
            raise PermissionDenied(f"a region of {self.size} bytes is shorter than announced")
        self._seals |= fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        writable = "write" in self.rights and not self._seals & _NO_WRITE_SEALS
        try:
            self._map = Mapping(fd, self.size, writable)
        except OSError as exc:
            # A seal added between the check and the mmap (or an fd opened read-only).
            if not writable or exc.errno not in (errno.EPERM, errno.EACCES):
                raise
            writable = False
            self._map = Mapping(fd, self.size, False)
        self._writable = writable
        view = memoryview(self._map.buf).cast("B")
        self._view = view if writable else view.toreadonly()

    def _unmap(self, why: str) -> None:
        self._gone = why
        self._view = None
        if self._map is not None:
            self._map.detach()  # views a caller still holds read zeros, never the region
            self._map = None

    def _moved(self) -> None:
        self._unmap("moved to another process")
        self._held = False
        self._session.forget_region(self.handle)


def region_from(session: Session, answer: tuple[frames.Frame, list[int]]) -> Region:
    """The Region of a RegionGranted answer (its fd mapped, then closed), in the session's
    table; on failure the fd is closed here."""
    reply, fds = answer
    assert isinstance(reply, frames.RegionGranted)
    try:
        region = Region(session, reply, fds[0])
    except BaseException:
        os.close(fds[0])
        raise
    session.regions[reply.handle] = region
    return region
