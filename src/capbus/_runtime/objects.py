"""Python objects over capbus: data-only msgpack (msgspec), large buffers out of band; pickle
only between peers that trust each other. The decoder is where a hostile peer's bytes land: it
names no code, allocates only what arrived pays for, and answers anything malformed with ProtocolError.

Payload layout: [header][stream][buffer 0][buffer 1]..., each buffer 64-byte aligned. The
header is (magic, number of buffers, stream length, one u64 length per buffer). Magic b"CBM1":
the stream is msgpack; b"CBP5": it is pickle protocol 5 (refused unless the receiver passes
trusted=True). numpy arrays and bytes-like objects of 4 KiB or more are not copied into the
stream but placed as buffers and referenced from it by index (each buffer exactly once), so the
receiver rebuilds arrays as read-only views of the payload (no copy); bytes and bytearray are
copied out (they are immutable / owned), memoryviews stay read-only views.

What msgpack carries natively (None, bool, 64-bit ints, float, str, bytes, list, dict with any
such keys) goes as itself; every other plain type goes as an Ext type (codes below): tuple, set,
frozenset, complex, ints outside the 64-bit range (any size: they cost their own bytes),
bytearray, memoryview (arrives as a read-only byte view), datetime/date/time/timedelta (tz-aware
values arrive with a fixed-offset datetime.timezone of the same offset), numpy arrays (plain
fixed-size dtypes only, sent C-contiguous) and numpy scalars. Anything else, subclasses
included, is a TypeError on the sending side: send it with pickle=True to a receiver that
trusts you.

Bounds: msgspec checks every declared length against the bytes that remain before allocating,
and counts nesting against the interpreter's recursion limit (on 3.11 with a raised limit, a
scan measures it first: _too_deep); nested Ext containers are counted too (_MAX_DEPTH). Each
buffer is referenced at most once, so no reference can multiply it. What remains is the Python
object overhead per input byte: at most ~80 bytes of objects per byte of payload (a list of
empty dicts or sets), plus a fixed amount.
"""

from __future__ import annotations

import datetime as _dt
import pickle as _pickle
import re
import struct
import sys
import threading
from typing import TYPE_CHECKING, Any

import msgspec

from .._errors import ProtocolError

if TYPE_CHECKING:
    from typing_extensions import Buffer

MAGIC = b"CBM1"
PICKLE_MAGIC = b"CBP5"
_HEAD = struct.Struct("<4sIQ")  # magic, number of buffers, length of the stream
_ALIGN = 64
_MAX_BUFFERS = 1 << 16
_MAX_DEPTH = 100  # nested tuples/sets (each one a nested decode, i.e. Python frames)
_SAFE_DEPTH = 1000  # nesting of any kind, where the recursion limit does not bound it
_LIMIT_FOLLOWS_RECURSION = sys.version_info < (3, 12)  # 3.12+ counts C recursion on its own
_OOB_MIN = 4096  # bytes-like objects at least this large travel as buffers
_MAX_NDIM = 64
_MAX_DIM = 1 << 48

# Ext codes (0..127 are the application's in msgpack; capbus owns this stream entirely).
EXT_TUPLE = 1  # msgpack array of the items
EXT_SET = 2
EXT_FROZENSET = 3
EXT_COMPLEX = 4  # <dd
EXT_BIGINT = 5  # signed big-endian two's complement
EXT_BYTEARRAY = 6  # the bytes themselves (small ones)
EXT_VIEW = 7  # the bytes themselves (small ones)
EXT_BUFFER = 8  # [kind, buffer index]: kind 0 bytes, 1 bytearray, 2 memoryview
EXT_NDARRAY = 9  # [dtype.str, shape, buffer index]
EXT_NPSCALAR = 10  # [dtype.str, raw bytes]
EXT_DATETIME = 11  # [year, month, day, hour, minute, second, microsecond, fold, utcoffset us|nil]
EXT_DATE = 12  # [year, month, day]
EXT_TIME = 13  # [hour, minute, second, microsecond, fold, utcoffset us|nil]
EXT_TIMEDELTA = 14  # [days, seconds, microseconds]

_I64_MIN, _U64_MAX = -(1 << 63), (1 << 64) - 1
_US = _dt.timedelta(microseconds=1)

# Plain fixed-size dtypes, by their .str: bool, ints, floats, complex, datetime/timedelta,
# fixed bytes/str. Never object, void or structured (those could hold pointers or padding).
_DTYPE_RE = re.compile(
    r"[<>|](?:b1|[iu][1248]|f(?:2|4|8|16)|c(?:8|16|32)"
    r"|[mM]8(?:\[(?:[1-9][0-9]{0,5})?(?:Y|M|W|D|h|m|s|ms|us|ns|ps|fs|as)\])?"
    r"|S[1-9][0-9]{0,8}|U[1-9][0-9]{0,7})")


def _align(n: int) -> int:
    return (n + _ALIGN - 1) & ~(_ALIGN - 1)


# ---- encoding ---------------------------------------------------------------------------------


class _Key:
    """An Ext as a dict key (msgspec's Ext is not hashable); the encoder's hook unwraps it."""

    __slots__ = ("code", "data")

    def __init__(self, code: int, data: Buffer) -> None:
        self.code, self.data = code, data

    def __hash__(self) -> int:
        return hash((self.code, self.data))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Key) and (self.code, self.data) == (other.code, other.data)


def _enc_hook(obj: Any) -> Any:
    if type(obj) is _Key:
        return msgspec.msgpack.Ext(obj.code, obj.data)
    raise TypeError(f"{type(obj).__qualname__} cannot travel as plain data")  # pragma: no cover


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_enc = _encoder.encode
_Ext = msgspec.msgpack.Ext
# Containers whose items are all of these types are encoded as they are (no Python-level walk);
# an int out of the 64-bit range makes msgspec raise OverflowError and the walk runs after all.
_FLAT = frozenset({str, int, float, bool, type(None), bytes})


def _cannot(obj: Any, why: str = "") -> TypeError:
    return TypeError(
        f"a {type(obj).__module__}.{type(obj).__qualname__} cannot travel as capbus plain data"
        f"{why} (msgpack carries None, bool, int, float, complex, str, bytes, bytearray, "
        "memoryview, list, tuple, dict, set, frozenset, datetime types, numpy arrays and scalars): "
        "send it with pickle=True, to a receiver that trusts you (it unpickles with trusted=True)")


def _dtype_ok(dt: Any) -> bool:
    return (_DTYPE_RE.fullmatch(dt.str) is not None and not dt.hasobject and dt.fields is None
            and dt.subdtype is None and dt.itemsize > 0)


class _Writer:
    """One object's conversion to msgspec-native values + Ext; collects the out-of-band buffers."""

    def __init__(self, flat: bool) -> None:
        self.bufs: list[memoryview] = []
        self.flat = flat  # False after an OverflowError: walk every container

    def buffer(self, kind: int, view: memoryview) -> _Ext:
        self.bufs.append(view)
        return _Ext(EXT_BUFFER, _enc((kind, len(self.bufs) - 1)))

    def key(self, k: Any) -> Any:
        c = self.conv(k)
        return _Key(c.code, c.data) if type(c) is _Ext else c

    def conv(self, x: Any) -> Any:  # noqa: C901 - one dispatch on the exact type
        t = type(x)
        if t is str or t is float or t is bool or x is None:
            return x
        if t is int:
            if _I64_MIN <= x <= _U64_MAX:
                return x
            return _Ext(EXT_BIGINT, x.to_bytes((x.bit_length() + 8) // 8, "big", signed=True))
        if t is list:
            if self.flat and set(map(type, x)) <= _FLAT:
                return x
            return [self.conv(v) for v in x]
        if t is dict:
            if self.flat and set(map(type, x)) <= _FLAT and set(map(type, x.values())) <= _FLAT:
                return x
            return {self.key(k): self.conv(v) for k, v in x.items()}
        if t is tuple:
            return _Ext(EXT_TUPLE, _enc([self.conv(v) for v in x]))
        if t is bytes:
            return self.buffer(0, memoryview(x)) if len(x) >= _OOB_MIN else x
        if t is set or t is frozenset:
            return _Ext(EXT_SET if t is set else EXT_FROZENSET, _enc([self.conv(v) for v in x]))
        if t is complex:
            return _Ext(EXT_COMPLEX, struct.pack("<dd", x.real, x.imag))
        if t is bytearray or t is memoryview:
            view = memoryview(x)
            view = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
            kind, code = (1, EXT_BYTEARRAY) if t is bytearray else (2, EXT_VIEW)
            return self.buffer(kind, view) if view.nbytes >= _OOB_MIN else _Ext(code, view.tobytes())
        if t is _dt.datetime:
            return _Ext(EXT_DATETIME, _enc((x.year, x.month, x.day, x.hour, x.minute, x.second,
                                            x.microsecond, x.fold, _offset(x.utcoffset()))))
        if t is _dt.date:
            return _Ext(EXT_DATE, _enc((x.year, x.month, x.day)))
        if t is _dt.time:
            return _Ext(EXT_TIME, _enc((x.hour, x.minute, x.second, x.microsecond, x.fold,
                                        _offset(x.utcoffset()))))
        if t is _dt.timedelta:
            return _Ext(EXT_TIMEDELTA, _enc((x.days, x.seconds, x.microseconds)))
        np = sys.modules.get("numpy")
        if np is not None:
            if t is np.ndarray:
                if not _dtype_ok(x.dtype):
                    raise _cannot(x, f" (dtype {x.dtype!s}: only plain fixed-size dtypes)")
                a = x if x.flags.c_contiguous else x.copy(order="C")
                index = len(self.bufs)
                self.bufs.append(memoryview(a.reshape(-1).view(np.uint8)))
                return _Ext(EXT_NDARRAY, _enc((a.dtype.str, a.shape, index)))
            if isinstance(x, np.generic):
                dt = x.dtype
                if dt.itemsize == 0 and dt.kind in "SU":  # b"" or "" (dtype S0/U0): one NUL
                    dt = np.dtype(dt.kind + "1")
                if not _dtype_ok(dt):
                    raise _cannot(x, f" (dtype {dt!s}: only plain fixed-size dtypes)")
                return _Ext(EXT_NPSCALAR, _enc((dt.str, np.asarray(x, dt).tobytes())))
            if isinstance(x, np.ndarray):  # a mask, a memmap's file...: what would be dropped?
                raise _cannot(x, " (an ndarray subclass: send np.asarray(x) to send its data)")
        raise _cannot(x)


def _offset(off: _dt.timedelta | None) -> int | None:
    return None if off is None else off // _US


def dumps(obj: Any, pickle: bool = False) -> tuple[int, list[Any]]:
    """(total size, parts) where parts are what pack_into() writes: the layout is decided here.

    pickle=False (the default): data-only msgpack, TypeError for what it cannot carry.
    pickle=True: pickle protocol 5, which only a receiver that trusts this sender decodes."""
    if pickle:
        pbufs: list[_pickle.PickleBuffer] = []
        stream = _pickle.dumps(obj, protocol=5, buffer_callback=pbufs.append)
        raws = [b.raw() for b in pbufs]
        magic = PICKLE_MAGIC
    else:
        w = _Writer(flat=True)
        try:
            stream = _enc(w.conv(obj))
        except OverflowError:  # a big int inside a container taken as it was: walk it all
            w = _Writer(flat=False)
            stream = _enc(w.conv(obj))
        raws = w.bufs
        magic = MAGIC
    if len(raws) > _MAX_BUFFERS:
        raise ValueError(f"an object payload holds at most {_MAX_BUFFERS} out-of-band buffers "
                         f"(arrays and large bytes), this one {len(raws)}: pack them together")
    head = _HEAD.pack(magic, len(raws), len(stream)) + struct.pack(f"<{len(raws)}Q",
                                                                   *(r.nbytes for r in raws))
    size = _align(len(head) + len(stream))
    for r in raws:
        size += _align(r.nbytes)
    return size, [head, stream, *raws]


def pack_into(buf: memoryview, parts: list[Any]) -> None:
    head, stream, *raws = parts
    pos = len(head)
    buf[:pos] = head
    buf[pos:pos + len(stream)] = stream
    pos = _align(pos + len(stream))
    for r in raws:
        buf[pos:pos + r.nbytes] = r
        pos += _align(r.nbytes)


def join(size: int, parts: list[Any]) -> bytes:
    out = bytearray(size)
    pack_into(memoryview(out), parts)
    return bytes(out)


def pack(obj: Any, pickle: bool = False) -> bytes:
    """The whole payload as bytes (see dumps)."""
    return join(*dumps(obj, pickle))


# ---- decoding ---------------------------------------------------------------------------------


class _State:
    __slots__ = ("bufs", "used", "depth")

    def __init__(self, bufs: list[memoryview]) -> None:
        self.bufs, self.used, self.depth = bufs, bytearray(len(bufs)), 0


_tls = threading.local()
_dtypes: dict[str, Any] = {}


def _bad(what: str) -> ProtocolError:
    return ProtocolError(f"malformed object payload: {what}")


def _nested(data: memoryview) -> Any:
    st: _State = _tls.state
    if st.depth >= _MAX_DEPTH:
        raise _bad(f"tuples/sets nested deeper than {_MAX_DEPTH}")
    st.depth += 1
    try:
        items = _decoder.decode(data)
    finally:
        st.depth -= 1
    if type(items) is not list:
        raise _bad("a tuple or set whose items are not an array")
    return items


def _take(index: int) -> memoryview:
    st: _State = _tls.state
    if not 0 <= index < len(st.bufs):
        raise _bad(f"buffer {index} referenced, the payload has {len(st.bufs)}")
    if st.used[index]:
        raise _bad(f"buffer {index} referenced twice")
    st.used[index] = 1
    return st.bufs[index]


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        raise ProtocolError("the object payload holds numpy data but numpy is not installed "
                            "here: install numpy or ask the sender for plain data") from None
    return numpy


def _dtype(s: str) -> Any:
    dt = _dtypes.get(s)
    if dt is None:
        if _DTYPE_RE.fullmatch(s) is None:
            raise _bad(f"dtype {s[:40]!r} is not a plain fixed-size one")
        dt = _numpy().dtype(s)
        if not _dtype_ok(dt):  # pragma: no cover - the pattern admits only these
            raise _bad(f"dtype {s!r} is not a plain fixed-size one")
        if len(_dtypes) < 1024:
            _dtypes[s] = dt
    return dt


def _array(np: Any, dt: Any, raw: Any) -> Any:
    arr = np.frombuffer(raw, dtype=dt)
    # Bytes other than 0 and 1 in a bool array would make its elements neither True nor False.
    if dt.kind == "b" and len(raw) and np.frombuffer(raw, np.uint8).max() > 1:
        raise _bad("a bool array holding values other than 0 and 1")
    return arr


def _tz(off: int | None) -> _dt.timezone | None:
    return None if off is None else _dt.timezone(_dt.timedelta(microseconds=off))


_dec_buffer = msgspec.msgpack.Decoder(tuple[int, int])
_dec_ndarray = msgspec.msgpack.Decoder(tuple[str, tuple[int, ...], int])
_dec_npscalar = msgspec.msgpack.Decoder(tuple[str, bytes])
_dec_datetime = msgspec.msgpack.Decoder(tuple[int, int, int, int, int, int, int, int, int | None])
_dec_int3 = msgspec.msgpack.Decoder(tuple[int, int, int])
_dec_time = msgspec.msgpack.Decoder(tuple[int, int, int, int, int, int | None])


def _ext_hook(code: int, data: memoryview) -> Any:  # noqa: C901 - one dispatch on the code
    if code == EXT_TUPLE:
        return tuple(_nested(data))
    if code == EXT_SET:
        return set(_nested(data))
    if code == EXT_FROZENSET:
        return frozenset(_nested(data))
    if code == EXT_COMPLEX:
        if len(data) != 16:
            raise _bad("a complex number that is not 16 bytes")
        return complex(*struct.unpack("<dd", data))
    if code == EXT_BIGINT:
        return int.from_bytes(data, "big", signed=True)
    if code == EXT_BYTEARRAY:
        return bytearray(data)
    if code == EXT_VIEW:
        return memoryview(bytes(data)).toreadonly()
    if code == EXT_BUFFER:
        kind, index = _dec_buffer.decode(data)
        if kind not in (0, 1, 2):
            raise _bad(f"buffer kind {kind}")
        raw: bytes | memoryview = _take(index)
        return bytes(raw) if kind == 0 else bytearray(raw) if kind == 1 else raw
    if code == EXT_NDARRAY:
        dstr, shape, index = _dec_ndarray.decode(data)
        np = _numpy()
        dt = _dtype(dstr)
        if len(shape) > _MAX_NDIM or not all(0 <= n <= _MAX_DIM for n in shape):
            raise _bad(f"array shape {shape[:8]}: at most {_MAX_NDIM} dimensions of 0..2**48")
        raw = _take(index)
        count = 1
        for n in shape:
            count *= n
        if count * dt.itemsize != len(raw):
            raise _bad(f"array of shape {shape} and dtype {dstr} in a buffer of {len(raw)} bytes")
        return _array(np, dt, raw).reshape(shape)
    if code == EXT_NPSCALAR:
        dstr, raw = _dec_npscalar.decode(data)
        np = _numpy()
        dt = _dtype(dstr)
        if len(raw) != dt.itemsize:
            raise _bad(f"a {dstr} scalar of {len(raw)} bytes")
        return _array(np, dt, raw)[0]
    if code == EXT_DATETIME:
        y, mo, d, h, mi, s, us, fold, off = _dec_datetime.decode(data)
        return _dt.datetime(y, mo, d, h, mi, s, us, tzinfo=_tz(off), fold=fold)
    if code == EXT_DATE:
        return _dt.date(*_dec_int3.decode(data))
    if code == EXT_TIME:
        h, mi, s, us, fold, off = _dec_time.decode(data)
        return _dt.time(h, mi, s, us, tzinfo=_tz(off), fold=fold)
    if code == EXT_TIMEDELTA:
        days, secs, us = _dec_int3.decode(data)
        return _dt.timedelta(days, secs, us)
    raise _bad(f"unknown ext type {code}")


_decoder = msgspec.msgpack.Decoder(ext_hook=_ext_hook)


def _split(payload: Any) -> tuple[bytes, memoryview, list[memoryview]]:
    """(magic, stream, buffers) of a payload, every length checked against what arrived."""
    try:
        view = memoryview(payload).cast("B").toreadonly()
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"an object payload must be a contiguous bytes-like object: {exc}") from None
    if len(view) < _HEAD.size:
        raise ProtocolError(f"not a capbus object payload: {len(view)} bytes, shorter than its header")
    magic, nbufs, stream_len = _HEAD.unpack_from(view)
    if magic not in (MAGIC, PICKLE_MAGIC):
        raise ProtocolError(f"not a capbus object payload (magic {bytes(magic)!r}): the sender did "
                            "not use call_object/send_object/reply_object")
    if nbufs > _MAX_BUFFERS:
        raise _bad(f"{nbufs} buffers declared, at most {_MAX_BUFFERS}")
    sizes_end = _HEAD.size + 8 * nbufs
    if sizes_end + stream_len > len(view):
        raise _bad(f"truncated: header and stream need {sizes_end + stream_len} bytes, "
                   f"{len(view)} arrived")
    sizes = struct.unpack_from(f"<{nbufs}Q", view, _HEAD.size)
    stream = view[sizes_end:sizes_end + stream_len]
    if type(payload) is not bytes:
        # A zero-copy payload is memory the sender can still write: the decoder must not read a
        # length, check it and read it again while the sender changes it, so it reads a private
        # copy of the stream (small: arrays and large buffers are not in it).
        stream = memoryview(bytes(stream))
    pos = _align(sizes_end + stream_len)
    bufs = []
    for n in sizes:
        if pos + n > len(view):
            raise _bad(f"truncated: a buffer of {n} bytes at offset {pos} of {len(view)}")
        bufs.append(view[pos:pos + n])
        pos += _align(n)
    return magic, stream, bufs


# Fixed-size msgpack items after their first byte: scalars, then the length-prefixed ones
# (str/bin/ext) as the size of their length field.
_SKIP = {0xca: 4, 0xcb: 8, 0xcc: 1, 0xcd: 2, 0xce: 4, 0xcf: 8, 0xd0: 1, 0xd1: 2, 0xd2: 4, 0xd3: 8}
_LEN = {0xc4: 1, 0xc5: 2, 0xc6: 4, 0xd9: 1, 0xda: 2, 0xdb: 4}
_EXT = {0xc7: 1, 0xc8: 2, 0xc9: 4}  # the width of the length; fixext: the length itself
_FIXEXT = {0xd4: 1, 0xd5: 2, 0xd6: 4, 0xd7: 8, 0xd8: 16}
_COUNT = {0xdc: (2, 1), 0xdd: (4, 1), 0xde: (2, 2), 0xdf: (4, 2)}
_CONTAINER_EXTS = (EXT_TUPLE, EXT_SET, EXT_FROZENSET)


def _too_deep(b: memoryview, start: int, end: int, depth: int) -> bool:
    """Whether the one value in b[start:end] nests deeper than _SAFE_DEPTH (counting `depth`
    levels above it), or is not exactly one value. Iterative but for our container Ext types,
    whose nested decodes _MAX_DEPTH bounds. Only run where msgspec's own check is not a bound."""
    pos, todo = start, 1
    stack: list[int] = []
    while True:
        if todo == 0:
            if not stack:
                return pos != end
            todo = stack.pop()
            continue
        if pos >= end:
            return True
        c = b[pos]
        pos += 1
        todo -= 1
        if c <= 0x7f or c >= 0xe0 or c in (0xc0, 0xc2, 0xc3):
            continue
        if c <= 0x9f:
            count = (c & 0x0F) * 2 if c <= 0x8f else c & 0x0F
        elif c <= 0xbf:
            pos += c & 0x1F
            continue
        elif c in _SKIP:
            pos += _SKIP[c]
            continue
        elif c in _LEN:
            w = _LEN[c]
            pos += w + int.from_bytes(b[pos:pos + w], "big")
            continue
        elif c in _EXT or c in _FIXEXT:
            if c in _EXT:
                w = _EXT[c]
                n, pos = int.from_bytes(b[pos:pos + w], "big"), pos + w
            else:
                n = _FIXEXT[c]
            if pos >= end:
                return True
            code, pos = b[pos], pos + 1
            inner = depth + len(stack) + 1
            if code in _CONTAINER_EXTS and (inner > _SAFE_DEPTH or pos + n > end
                                             or _too_deep(b, pos, pos + n, inner)):
                return True
            pos += n
            continue
        elif c in _COUNT:
            w, per = _COUNT[c]
            count = int.from_bytes(b[pos:pos + w], "big") * per
            pos += w
        else:
            return True  # 0xc1: never used
        if count:
            stack.append(todo)
            todo = count
            if depth + len(stack) > _SAFE_DEPTH:
                return True


def loads(payload: Any, trusted: bool = False) -> Any:
    """Rebuild an object; its arrays (and memoryviews sent large) are read-only views of
    `payload`, valid while the payload is. Any malformed payload is ProtocolError.

    Untrusted (the default): msgpack payloads only, which name no code. trusted=True also
    unpickles pickle payloads (sent with pickle=True), which lets the sender run code here."""
    magic, stream, bufs = _split(payload)
    if magic == PICKLE_MAGIC:
        if not trusted:
            raise ProtocolError(
                "the object payload is a pickle, and unpickling lets its sender run code here: "
                "pass trusted=True only for a sender you trust, or ask it for plain data "
                "(call_object/send_object/reply_object without pickle)")
        try:
            return _pickle.loads(stream, buffers=bufs)
        except Exception as exc:
            raise ProtocolError(f"cannot unpickle the payload: {exc}") from exc
    # msgspec bounds nesting by Py_EnterRecursiveCall, which on Python 3.11 follows the
    # recursion limit: raised high, a deep enough stream overflows the C stack (a crash), so
    # then the nesting is measured first (in Python: only in that configuration).
    if (_LIMIT_FOLLOWS_RECURSION and len(stream) > _SAFE_DEPTH
            and sys.getrecursionlimit() > _SAFE_DEPTH and _too_deep(stream, 0, len(stream), 0)):
        raise _bad(f"not one value, or nested deeper than {_SAFE_DEPTH}")
    st = _State(bufs)
    prev = getattr(_tls, "state", None)
    _tls.state = st
    try:
        obj = _decoder.decode(stream)
    except ProtocolError:
        raise
    except RecursionError:
        raise _bad("nested too deeply") from None
    except Exception as exc:
        raise _bad(f"{type(exc).__name__}: {exc}") from None
    finally:
        _tls.state = prev
    if not all(st.used):
        raise _bad(f"buffer {st.used.index(0)} is not referenced by the stream")
    return obj
