"""Messages as Python sees them, and their wire layouts as ctypes structures: the 48-byte small
message (capability u64, opcode u32, flags u32, data 4 x u64) and the large message's header (the
native core uses the same layout; a test checks sizes and offsets).
"""

from __future__ import annotations

import ctypes

from .. import _core, _errors
from . import objects

# The top two user flag bits are the runtime's own.
TRANSFER_FLAG = _core.TRANSFER_FLAG  # capabilities or regions travel with this message
OBJECT_FLAG = _core.OBJECT_FLAG  # the payload is an object (capbus._runtime.objects)
USER_FLAGS = _core.FLAG_USER_MASK & ~(TRANSFER_FLAG | OBJECT_FLAG)


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


def bad_flags(flags: int) -> ValueError:
    return ValueError(f"user flags must lie in {USER_FLAGS:#x}, got {flags:#x}")


# A call's reply is the native tuple subclass (opcode, flags, d0, d1, d2, d3, payload or None):
# .opcode, .flags, .data, .payload and .object() are native, and so is its deallocation.
# (An import, not `Message = _core.Message`: a type checker reads that assignment as an alias of
# a tuple type, which isinstance() may not take.)
from .._core import Message as Message  # noqa: E402

# A received request is the native type itself: no Python subclass to build and tear down for
# every message (object() and reply_object() are native too, calling the codec handed in below).
from .._core import Request as Request  # noqa: E402

# What the native core needs of the Python side, handed in once (it imports no capbus module):
# the error classes it raises and the object codec of object()/reply_object().
_core.register(errors=_errors, object_loads=objects.loads, object_pack=objects.pack)


def error_reply(r: Message, service: str) -> Exception:
    """The exception an error reply from `service` stands for: a capbus error where capbus itself
    refused (FLAG_IPC_ERROR), else the service's own RemoteError."""
    text = (r[6] or b"").decode(errors="replace")
    if not r[1] & _core.FLAG_IPC_ERROR:
        return _errors.RemoteError(r[2], text, service=service)
    if r[2] == _errors.RemoteError.code:  # its serve() handler raised: "TypeName: message"
        kind, sep, msg = text.partition(": ")
        return _errors.RemoteError(None, msg if sep else text, kind if sep else "Exception", service)
    return _errors.error_from_code(r[2], f"{service!r}: {text}")
