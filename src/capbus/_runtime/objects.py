"""Python objects over capbus: pickle protocol 5 with out-of-band buffers.

The payload is [header][pickle stream][buffer 0][buffer 1]..., each buffer 64-byte aligned:
large buffers (numpy arrays, bytes, memoryviews) are not serialized into the stream but placed
as they are, and the receiver rebuilds the object with the buffers as views of the payload (no
copy). Into an arena loan, that is one copy on the sending side and none on the receiving side.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

from .._errors import ProtocolError

MAGIC = b"CBP5"
_HEAD = struct.Struct("<4sIQ")  # magic, number of buffers, length of the pickle stream
_ALIGN = 64


def _align(n: int) -> int:
    return (n + _ALIGN - 1) & ~(_ALIGN - 1)


def dumps(obj: Any) -> tuple[int, list]:
    """(total size, parts) where parts are what pack() writes: the layout is decided here."""
    buffers: list[pickle.PickleBuffer] = []
    stream = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    head = _HEAD.pack(MAGIC, len(raws), len(stream)) + struct.pack(f"<{len(raws)}Q",
                                                                   *(r.nbytes for r in raws))
    size = _align(len(head) + len(stream))
    for r in raws:
        size += _align(r.nbytes)
    return size, [head, stream, *raws]


def pack_into(buf: memoryview, parts: list) -> None:
    head, stream, *raws = parts
    pos = len(head)
    buf[:pos] = head
    buf[pos:pos + len(stream)] = stream
    pos = _align(pos + len(stream))
    for r in raws:
        buf[pos:pos + r.nbytes] = r
        pos += _align(r.nbytes)


def join(size: int, parts: list) -> bytes:
    out = bytearray(size)
    pack_into(memoryview(out), parts)
    return bytes(out)


def pack(obj: Any) -> bytes:
    return join(*dumps(obj))


# What an untrusted payload may name: plain data and numpy arrays. Unpickling may otherwise call
# any importable function: a peer's payload would run code here.
_SAFE = {
    "builtins": {"list", "dict", "set", "frozenset", "tuple", "bytes", "bytearray", "str", "int",
                 "float", "complex", "bool", "slice", "range", "NoneType"},
    "collections": {"OrderedDict", "deque"},
    "datetime": {"datetime", "date", "time", "timedelta", "timezone"},
    "numpy": {"ndarray", "dtype"},
    "numpy.core.multiarray": {"_reconstruct", "scalar"},
    "numpy._core.multiarray": {"_reconstruct", "scalar"},
    "numpy.core.numeric": {"_frombuffer"},
    "numpy._core.numeric": {"_frombuffer"},
    "numpy.dtypes": None,  # every dtype class (Float64DType, ...)
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _SAFE.get(module, set())
        if allowed is None or name in allowed:
            return super().find_class(module, name)
        raise ProtocolError(f"payload names {module}.{name}: not plain data; pass trusted=True "
                            "to unpickle arbitrary objects from a sender you trust")


def loads(payload: Any, trusted: bool = False) -> Any:
    """Rebuild an object; its buffers are views of `payload` (valid while the payload is).

    Untrusted (the default): only plain data and numpy arrays; trusted=True: anything pickle can
    build, which means the sender can run code in this process."""
    view = memoryview(payload).cast("B")
    if len(view) < _HEAD.size:
        raise ProtocolError("not a capbus object payload: too short")
    magic, nbufs, stream_len = _HEAD.unpack_from(view)
    if magic != MAGIC or nbufs > 1 << 16:
        raise ProtocolError("not a capbus object payload")
    sizes_end = _HEAD.size + 8 * nbufs
    if sizes_end + stream_len > len(view):
        raise ProtocolError("object payload truncated")
    sizes = struct.unpack_from(f"<{nbufs}Q", view, _HEAD.size)
    stream = view[sizes_end:sizes_end + stream_len]
    pos = _align(sizes_end + stream_len)
    bufs = []
    for n in sizes:
        if pos + n > len(view):
            raise ProtocolError("object payload truncated")
        bufs.append(view[pos:pos + n])
        pos += _align(n)
    try:
        if trusted:
            return pickle.loads(stream, buffers=bufs)
        return _RestrictedUnpickler(_Reader(stream), buffers=bufs).load()
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"cannot unpickle the payload: {exc}") from exc


class _Reader:
    """A file-like reader over a memoryview, without copying it into bytes."""

    def __init__(self, view: memoryview) -> None:
        self._view, self._pos = view, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n < 0 else min(len(self._view), self._pos + n)
        out = bytes(self._view[self._pos:end])
        self._pos = end
        return out

    def readinto(self, b: Any) -> int:
        n = min(len(b), len(self._view) - self._pos)
        b[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n

    def readline(self) -> bytes:
        rest = self._view[self._pos:]
        i = bytes(rest).find(b"\n")
        return self.read(len(rest) if i < 0 else i + 1)

    def peek(self, n: int = 1) -> bytes:
        return bytes(self._view[self._pos:self._pos + max(n, 1)])
