"""Shared-memory mappings that hold no file descriptor, shared by kernel and runtime.

Python's mmap.mmap keeps a dup of the fd it maps, so a kernel keeping mappings of many channels
would spend an fd on each (and run out). A Mapping maps with libc directly and exposes the bytes
through the buffer protocol; the caller closes its fd right away.
"""

from __future__ import annotations

import ctypes
import mmap
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = 0x10


class Mapping:
    """size bytes of fd from offset 0, MAP_SHARED. `.buf` supports the buffer protocol.

    Only for memory whose every user the owner controls (the kernel's own mappings): unmapping
    while someone still reads `.buf` would fault. close() is idempotent.
    """

    __slots__ = ("addr", "size", "writable", "buf")

    def __init__(self, fd: int, size: int, writable: bool = True) -> None:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        addr = _libc.mmap(None, size, prot, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of {size} bytes failed: {os.strerror(err)}")
        self.addr, self.size, self.writable = addr, size, writable
        self.buf = (ctypes.c_char * size).from_address(addr)
        # Any memoryview of .buf keeps .buf alive, and .buf keeps us: we are never unmapped
        # (by __del__) while a view of the memory exists.
        self.buf._mapping = self  # type: ignore[attr-defined]  # a ctypes instance takes any attribute

    def detach(self) -> None:
        """Replace the mapping with private zero pages at the same address: the shared memory is
        no longer reachable from this process, yet any view still held stays valid memory (it
        reads zeros) instead of faulting. For memory whose views may outlive our control."""
        if self.addr:
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED
            got = _libc.mmap(self.addr, self.size, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
            if got is None or got == _MAP_FAILED:
                err = ctypes.get_errno()
                raise OSError(err, f"cannot detach a mapping: {os.strerror(err)}")
            self.addr = 0  # never unmapped: the zero pages cost address space only

    def close(self) -> None:
        """Unmap now: only when no view of .buf can be in use (else use detach())."""
        if self.addr:
            self.buf = None  # type: ignore[assignment]
            _libc.munmap(self.addr, self.size)
            self.addr = 0

    def __del__(self) -> None:
        self.close()
