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

U64_MAX = (1 << 64) - 1
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


def pack_data(data: tuple[int, ...] | list[int]) -> tuple[int, int, int, int]:
    """Up to four u64 values, zero-padded; anything else is a ValueError before sending."""
    n = len(data)
    if n == 4:
        d = tuple(data)
    elif n < 4:
        d = tuple(data) + _ZEROS[n:]
    else:
        raise ValueError(f"data carries at most 4 values, got {n}")
    for v in d:
        if type(v) is not int or not 0 <= v <= U64_MAX:
            raise ValueError(f"data values must be ints in 0..2**64-1, got {v!r}")
    return d  # type: ignore[return-value]


def check_flags(flags: int) -> int:
    if flags & ~USER_FLAGS or flags < 0:
        raise ValueError(f"user flags must lie in {USER_FLAGS:#x}, got {flags:#x}")
    return flags


class Message:
    """A reply (or any received message): opcode, flags, four u64 of data, and a payload."""

    __slots__ = ("opcode", "flags", "data", "payload")

    def __init__(self, opcode: int, flags: int, data: tuple[int, int, int, int],
                 payload: bytes | None) -> None:
        self.opcode = opcode
        self.flags = flags & USER_FLAGS
        self.data = data
        self.payload = payload if payload is not None else b""

    def __repr__(self) -> str:
        return f"<capbus.{type(self).__name__} opcode={self.opcode} data={self.data} " \
               f"payload={len(self.payload)} bytes>"


class Request(Message):
    """A message a Service received: .sender is the kernel-verified ProcessId of the caller."""

    __slots__ = ("sender", "expects_reply", "regions", "caps", "_svc", "_index", "_tag", "_done")

    def __init__(self, svc: Service, raw: tuple) -> None:
        index, tag, _cap, opcode, flags, d0, d1, d2, d3, payload, sender = raw
        super().__init__(opcode, flags, (d0, d1, d2, d3), payload)
        self.sender: int = sender
        self.expects_reply = bool(flags & _core.FLAG_REPLY_EXPECTED)
        self.regions: list = []
        self.caps: list = []
        self._svc, self._index, self._tag, self._done = svc, index, tag, False

    def reply(self, opcode: int = 0, data: tuple[int, ...] = (), payload: bytes = b"",
              flags: int = 0) -> None:
        """Answer a call. PeerDied if the caller has gone (its reply is dropped)."""
        if not self.expects_reply:
            raise IpcError("this message came from send_async: it takes no reply")
        if self._done:
            raise IpcError("this request has already been replied to")
        d = pack_data(data)
        self._done = True
        self._svc._reply(self._index, self._tag, opcode, check_flags(flags), d, payload)

    def reply_error(self, exc: BaseException) -> None:
        """Answer a call with an error: the caller raises IpcError carrying this text."""
        if not self.expects_reply or self._done:
            return
        self._done = True
        text = f"{type(exc).__name__}: {exc}".encode()[:4096]
        code = exc.code if isinstance(exc, IpcError) else IpcError.code
        self._svc._reply(self._index, self._tag, 0, _core.FLAG_ERROR, (code, 0, 0, 0), text)
