"""Shared memory regions: memfds the kernel creates and hands out as capabilities.

The kernel keeps a region's fd while any capability names it, and closes it with the last one;
the memory itself is freed by the OS when the last process that maps it lets go or dies (a memfd
never appears in /dev/shm). Sealing with F_SEAL_WRITE makes it read-only for everyone, for good:
a receiver that checks the seal on its own fd can trust the contents without copying them.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass

from .._errors import OutOfMemory, PermissionDenied

F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
MAX_REGION = 1 << 40
REGION_RIGHTS = frozenset({"map", "read", "write", "share"})


@dataclass(eq=False)
class RegionObject:
    fd: int
    size: int
    refs: int = 0  # capabilities naming it
    on_free: Callable[[], None] | None = None  # called once, when the last capability goes

    @classmethod
    def create(cls, size: int) -> RegionObject:
        if not 0 < size <= MAX_REGION:
            raise ValueError(f"region size must be 1..{MAX_REGION} bytes, got {size}")
        try:
            fd = os.memfd_create("capbus-region", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as exc:
            raise OutOfMemory(f"cannot create a region: {exc}") from None
        try:
            os.ftruncate(fd, size)
            # Nobody may shrink it under another holder's mapping (that would SIGBUS them).
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        except OSError as exc:
            os.close(fd)
            raise OutOfMemory(f"cannot size a region of {size} bytes: {exc}") from None
        return cls(fd, size)

    @property
    def name(self) -> str:
        return f"region of {self.size} bytes"

    @property
    def sealed(self) -> bool:
        return bool(fcntl.fcntl(self.fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE)

    @property
    def write_sealed(self) -> bool:
        """No new writable mapping can be made: sealed by seal(), or by a holder with a
        writable fd (any seal a creator adds on its own fd, F_SEAL_FUTURE_WRITE included)."""
        seals = fcntl.fcntl(self.fd, fcntl.F_GET_SEALS)
        return bool(seals & (fcntl.F_SEAL_WRITE | F_SEAL_FUTURE_WRITE))

    def fd_for(self, rights: frozenset[str]) -> int:
        """A new fd for a holder: read-only unless it may write (and no seal forbids writing).

        A read-only fd keeps a well-behaved runtime from mapping it writable; only the seal makes
        that a guarantee against a hostile one (it could reopen /proc/self/fd/N read-write)."""
        if "write" in rights and not self.write_sealed:
            return os.dup(self.fd)
        return os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)

    def seal(self) -> None:
        try:
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | F_SEAL_FUTURE_WRITE)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise PermissionDenied(
                    "the region is still mapped writable somewhere: every holder must close its "
                    "writable mapping before it can be sealed"
                ) from None
            # EPERM: a holder with a writable fd sealed its seals (F_SEAL_SEAL) first.
            raise PermissionDenied(f"the region cannot be sealed: {exc.strerror}") from None

    def release(self) -> bool:
        """One capability fewer; True when it was the last (the fd is closed)."""
        self.refs -= 1
        if self.refs <= 0 and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            if self.on_free is not None:
                on_free, self.on_free = self.on_free, None
                on_free()
            return True
        return False
