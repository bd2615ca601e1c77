"""Messages as Python sees them, and the wire layouts of the VeridianOS design as ctypes
structures (the native core uses the same layout; a test checks sizes and offsets).
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

from .. import _core
from .._errors import IpcError

if TYPE_CHECKING:
    from .service import Service

USER_FLAGS = _core.FLAG_USER_MASK
_ZEROS = (0, 0, 0, 0)


class SmallMessage(ctypes.LittleEndianStructure):
    """The 48-byte fast-path message: what one ring slot carries."""

    _pack_ = 1
    _fields_ = [
        ("capability", ctypes.c_uint64),
        ("opcode", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("data", ctypes.c_uint64 * 4),
    ]


class MessageHeader(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("capability", ctypes.c_uint64),
        ("opcode", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("total_size", ctypes.c_uint64),
        ("checksum", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class MemoryRegion(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("base_addr", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("permissions", ctypes.c_uint32),
        ("cache_policy", ctypes.c_uint32),
    ]


class LargeMessage(ctypes.LittleEndianStructure):
    """The header of every payload-carrying message, at the start of its arena chunk."""

    _pack_ = 1
    _fields_ = [
        ("header", MessageHeader),
        ("memory_region", MemoryRegion),
        ("inline_data", ctypes.c_uint8 * 64),
        ("pad", ctypes.c_uint8 * 8),
    ]


def pad_data(data: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """Up to four u64 values, zero-padded (the native core checks each is an int in range)."""
    n = len(data)
    if n > 4:
        raise ValueError(f"data carries at most 4 values, got {n}")
    return tuple(data) + _ZEROS[n:]


def bad_flags(flags: int) -> ValueError:
    return ValueError(f"user flags must lie in {USER_FLAGS:#x}, got {flags:#x}")


class Message(tuple):
    """A received message: .opcode, .flags, .data (four u64) and .payload (bytes).

    A tuple underneath (opcode, flags, d0, d1, d2, d3, payload), exactly as the native core
    returns it: building one costs no more than the call that produced it.
    """

    __slots__ = ()

    @property
    def opcode(self) -> int:
        return self[0]

    @property
    def flags(self) -> int:
        return self[1] & USER_FLAGS

    @property
    def data(self) -> tuple[int, int, int, int]:
        return self[2:6]

    @property
    def payload(self) -> bytes:
        return self[6] or b""

    def __repr__(self) -> str:
        return f"<capbus.Message opcode={self[0]} data={self[2:6]} payload={len(self.payload)} bytes>"


class Request:
    """A message a Service received: .sender is the kernel-verified ProcessId of the caller."""

    __slots__ = ("_raw", "_svc", "_done")
    regions: tuple = ()
    caps: tuple = ()

    def __init__(self, svc: Service, raw: tuple) -> None:
        # raw: (index, tag, capability, opcode, flags, d0, d1, d2, d3, payload, sender)
        self._raw, self._svc, self._done = raw, svc, False

    @property
    def sender(self) -> int:
        return self._raw[10]

    @property
    def opcode(self) -> int:
        return self._raw[3]

    @property
    def flags(self) -> int:
        return self._raw[4] & USER_FLAGS

    @property
    def data(self) -> tuple[int, int, int, int]:
        return self._raw[5:9]

    @property
    def payload(self) -> bytes:
        return self._raw[9] or b""

    @property
    def expects_reply(self) -> bool:
        return bool(self._raw[4] & _core.FLAG_REPLY_EXPECTED)

    def __repr__(self) -> str:
        return (f"<capbus.Request from {self.sender} opcode={self.opcode} data={self.data} "
                f"payload={len(self.payload)} bytes>")

    def reply(self, opcode: int = 0, data: tuple[int, ...] = (), payload: bytes = b"",
              flags: int = 0) -> None:
        """Answer a call. PeerDied if the caller has gone (its reply is dropped)."""
        raw = self._raw
        if self._done or not raw[4] & _core.FLAG_REPLY_EXPECTED:
            raise IpcError("this request has already been replied to" if self._done else
                           "this message came from send_async: it takes no reply")
        if len(data) != 4:
            data = pad_data(data)
        if flags & ~USER_FLAGS:
            raise bad_flags(flags)
        self._done = True
        self._svc._set.reply(raw[0], raw[1], opcode, flags, data[0], data[1], data[2], data[3],
                             payload or None)

    def reply_error(self, exc: BaseException) -> None:
        """Answer a call with an error: the caller raises the matching IpcError with this text."""
        if not self.expects_reply or self._done:
            return
        self._done = True
        text = f"{type(exc).__name__}: {exc}".encode()[:4096]
        code = exc.code if isinstance(exc, IpcError) else IpcError.code
        raw = self._raw
        self._svc._set.reply(raw[0], raw[1], 0, _core.FLAG_ERROR, code, 0, 0, 0, text)
