"""Typed services: a capbus.Interface subclass declares methods with annotations; a Service serves
an implementation of it (Service.serve_interface) and an Endpoint calls it through a proxy
(Endpoint.proxy / aproxy) with Python arguments, results and exceptions.

Wire contract (docs/API.md, "Typed interfaces"):
* opcode of a method: crc32(b"<interface name>.<method name>"); the interface query (the
  digest, below) has the opcode of the method name "__interface__". Two methods of one interface
  that collide are refused when the interface is first used.
* a call's data words: (stream length, number of out-of-band buffers, digest64, 0); its payload:
  the arguments as one msgpack array (msgspec), then, if there are out-of-band buffers, their
  u64 lengths (8-aligned, after the stream) and the buffers (each 64-aligned). With no buffers
  the payload is the stream alone. Only top-level `bytes` and numpy-array arguments (and
  results) of at least ZC_THRESHOLD (64 KiB) go out of band: in the stream a bytes value is then
  the buffer's index, an array [dtype, shape, index]; smaller arrays are [dtype, shape, bytes].
* the reply: opcode 0, the result in the same layout; a declared error (Interface.errors) is
  reply_error(1 + its index in `errors`, JSON of its args); any other exception is the
  RemoteError of Service.serve; a capbus error of the interface layer (InvalidArgument for
  arguments that do not match the annotations, InterfaceMismatch, ProtocolError for malformed
  bytes) is an IPC error reply, raised at the caller as its class.
* the digest: sha256 over the interface's name, its methods' signatures as text (parameter
  names and types; msgspec Structs and dataclasses with their fields) and its errors' names;
  digest64 is its first 8 bytes (little-endian), carried by every call and checked by the
  server, so a proxy of another version fails with InterfaceMismatch instead of misreading.
  proxy() asks the service for its interface description first and names what differs.

Everything that arrives is decoded by a msgspec Decoder typed from the signature (a fixed-size
tuple of the parameter types): a wrong type, arity or a malformed stream fails that call only,
the service goes on. Nothing here calls inspect per call: decoders, encoders, opcodes and the
argument binding are built once per interface (and cached on the class).
"""

from __future__ import annotations

import abc
import dataclasses
import dis
import enum
import functools
import hashlib
import inspect
import math
import operator
import struct
import sys
import threading
import types
import typing
import zlib
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import msgspec

from .. import _core
from .._errors import InterfaceMismatch, InvalidArgument, IpcError, ProtocolError, RemoteError
from .objects import _DTYPE_RE, _LIMIT_FOLLOWS_RECURSION, _SAFE_DEPTH, _too_deep

if TYPE_CHECKING:
    from .endpoint import Endpoint
    from .message import Message, Request

T = TypeVar("T", bound="Interface")

OOB_MIN = _core.ZC_THRESHOLD  # top-level bytes / arrays this large travel out of band
_MAX_BUFS = 64  # out-of-band buffers one message may announce
_MAX_NDIM = 64
_MAX_DIM = 1 << 48
_ALIGN = 64
_QUERY = "__interface__"
_BYTES, _ARRAY = 1, 2  # kinds of top-level values that may go out of band


class Interface(abc.ABC):  # noqa: B024 - an ABC so that declarations may be @abstractmethod
    """Base of typed service interfaces. Declare methods with annotated parameters and return,
    bodies `...` (or `@abc.abstractmethod`, which mypy's empty-body check wants for methods that
    return a value); `errors = (KeyError, ...)` are the exceptions that travel as themselves.
    Subclass the interface to implement it (methods may be `async def`) and serve it with
    Service.serve_interface; call it through Endpoint.proxy(Interface) / aproxy.

    The interface's name on the wire is `interface_name`, else the class's __name__ (not its
    module: client and server may define it in different modules)."""

    errors: ClassVar[tuple[type[BaseException], ...]] = ()
    interface_name: ClassVar[str | None] = None
    _capbus_declares: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("_capbus_proxy"):
            return
        funcs = [f for n, f in cls.__dict__.items() if not n.startswith("_") and inspect.isfunction(f)]
        # An interface declares stubs only; a class with real methods is an implementation.
        cls._capbus_declares = bool(funcs) and all(_is_stub(f) for f in funcs)


_STUB_BODIES = ([("LOAD_CONST", None), ("RETURN_VALUE", None)], [("RETURN_CONST", None)])


def _is_stub(fn: Any) -> bool:
    """A declaration: an abstract method, or a body of `...`, `pass` and/or a docstring (it
    returns None, nothing else)."""
    if getattr(fn, "__isabstractmethod__", False):
        return True
    if inspect.iscoroutinefunction(fn) or not hasattr(fn, "__code__"):
        return False
    ops = [(i.opname, i.argval) for i in dis.get_instructions(fn)
           if i.opname not in ("RESUME", "NOP", "CACHE")]
    return ops in _STUB_BODIES


def interface_of(cls: type) -> type[Interface]:
    """The interface an implementation class implements: the nearest class of its MRO that
    declares methods only."""
    for c in cls.__mro__:
        if c.__dict__.get("_capbus_declares"):
            return c
    raise TypeError(f"{cls.__qualname__} implements no capbus.Interface that declares methods "
                    "(an interface's methods have `...` bodies): pass interface= explicitly")


# ---- the spec of an interface: built once, cached on the class ---------------------------------


class _Method:
    __slots__ = ("name", "opcode", "nargs", "names", "signature", "arg_dec", "ret_dec", "oob",
                 "ret_kind", "text", "data")

    name: str
    opcode: int
    nargs: int
    names: tuple[str, ...]
    signature: inspect.Signature
    arg_dec: msgspec.msgpack.Decoder[Any]
    ret_dec: msgspec.msgpack.Decoder[Any]
    oob: tuple[tuple[int, int], ...]
    ret_kind: int
    text: str
    data: tuple[int, int, int]

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """Positional arguments for a call with keywords or defaults (TypeError as Python's)."""
        b = self.signature.bind(None, *args, **kwargs)
        b.apply_defaults()
        return tuple(b.args[1:])


class Spec:
    """What both ends derive from an interface class: methods by name and opcode, the digest."""

    def __init__(self, iface: type[Interface]) -> None:
        self.iface = iface
        self.proxies: dict[bool, type] = {}  # the generated proxy classes: sync, async
        self.name = iface.interface_name or iface.__name__
        self.errors: tuple[type[BaseException], ...] = tuple(iface.errors)
        for e in self.errors:
            if not (isinstance(e, type) and issubclass(e, Exception)):
                raise TypeError(f"{self.name}.errors must hold exception classes, not {e!r}")
        self.methods: dict[str, _Method] = {}
        seen: set[str] = set()
        for c in reversed(iface.__mro__):
            if not (isinstance(c, type) and issubclass(c, Interface)) or c is Interface:
                continue
            for n, f in c.__dict__.items():
                if not n.startswith("_") and inspect.isfunction(f) and n not in seen:
                    seen.add(n)
        if not seen:
            raise TypeError(f"interface {self.name} declares no methods")
        for n in sorted(seen):
            self.methods[n] = self._method(n, getattr(iface, n))
        self.query_opcode = _opcode(self.name, _QUERY)
        self.by_opcode: dict[int, _Method] = {}
        for m in self.methods.values():
            if m.opcode in self.by_opcode or m.opcode == self.query_opcode:
                other = self.by_opcode[m.opcode].name if m.opcode in self.by_opcode else _QUERY
                raise TypeError(f"interface {self.name}: methods {m.name!r} and {other!r} map to "
                                "the same opcode: rename one")
            self.by_opcode[m.opcode] = m
        text = "\n".join([f"interface {self.name}",
                          *(m.text for m in self.methods.values()),
                          "errors " + ", ".join(e.__qualname__ for e in self.errors)])
        self.digest = hashlib.sha256(text.encode()).digest()
        self.digest64 = int.from_bytes(self.digest[:8], "little")
        for m in self.methods.values():
            m.data = (0, 0, self.digest64)
        self.description = msgspec.msgpack.encode(
            {"name": self.name, "digest": self.digest,
             "methods": {m.name: m.text for m in self.methods.values()},
             "errors": [e.__qualname__ for e in self.errors]})

    def _method(self, name: str, fn: Any) -> _Method:
        where = f"{self.name}.{name}"
        sig = inspect.signature(fn)
        try:
            hints = typing.get_type_hints(fn)
        except Exception as exc:
            raise TypeError(f"{where}: cannot resolve its annotations ({exc})") from exc
        params = list(sig.parameters.values())
        if not params or params[0].kind not in (params[0].POSITIONAL_ONLY,
                                                params[0].POSITIONAL_OR_KEYWORD):
            raise TypeError(f"{where} must be a method (self first)")
        types_, names = [], []
        for p in params[1:]:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(f"{where}: *args and **kwargs cannot travel: name each parameter")
            if p.name not in hints:
                raise TypeError(f"{where}: annotate parameter {p.name!r} (its type is checked on "
                                "receipt)")
            types_.append(hints[p.name])
            names.append(p.name)
        if "return" not in hints:
            raise TypeError(f"{where}: annotate its return type (-> None if it returns nothing)")
        ret = hints["return"]
        m = _Method()
        m.name, m.opcode, m.names, m.nargs = name, _opcode(self.name, name), tuple(names), len(names)
        m.signature = sig
        m.oob = tuple((i, k) for i, t in enumerate(types_) if (k := _oob_kind(t)))
        m.ret_kind = _oob_kind(ret)
        wire = [(_wire(t) | int) if k == _BYTES else _wire(t)
                for t, k in ((t, _oob_kind(t)) for t in types_)]
        try:
            m.arg_dec = msgspec.msgpack.Decoder(tuple[tuple(wire)] if wire else tuple[()],  # type: ignore[misc]
                                                dec_hook=_dec_hook)
            rwire = _wire(ret)
            m.ret_dec = msgspec.msgpack.Decoder(rwire | int if m.ret_kind == _BYTES else rwire,
                                                dec_hook=_dec_hook)
        except TypeError as exc:
            raise TypeError(f"{where}: a type msgspec cannot decode ({exc})") from exc
        m.text = (f"{name}(" + ", ".join(f"{n}: {_render(t)}" for n, t in zip(names, types_, strict=True))
                  + f") -> {_render(ret)}")
        return m


_specs_lock = threading.Lock()


def spec_of(iface: type[Interface]) -> Spec:
    """The interface's Spec, built at its first use and kept on the class itself (so it goes
    with the class: no registry holds interfaces made at run time)."""
    s = iface.__dict__.get("_capbus_spec") if isinstance(iface, type) else None
    if s is None:
        if not (isinstance(iface, type) and issubclass(iface, Interface)) or iface is Interface:
            raise TypeError(f"{iface!r} is not a capbus.Interface subclass")
        with _specs_lock:
            s = iface.__dict__.get("_capbus_spec") or Spec(iface)
            type.__setattr__(iface, "_capbus_spec", s)
    assert isinstance(s, Spec)
    return s


def _opcode(iface: str, method: str) -> int:
    return zlib.crc32(f"{iface}.{method}".encode())


def _numpy() -> Any:
    return sys.modules.get("numpy")


def _is_ndarray_type(t: Any) -> bool:
    np = _numpy()
    return np is not None and (t is np.ndarray or typing.get_origin(t) is np.ndarray)


def _oob_kind(t: Any) -> int:
    if t is bytes:
        return _BYTES
    return _ARRAY if _is_ndarray_type(t) else 0


def _wire(t: Any) -> Any:
    """The annotation as msgspec decodes it: numpy.typing.NDArray[...] as numpy.ndarray (its
    dtype parameter is not checked), everywhere inside generic aliases too."""
    if _is_ndarray_type(t):
        return _numpy().ndarray
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is None or not args or origin is typing.Literal or origin is typing.Annotated:
        return t
    new = tuple(_wire(a) for a in args)
    if new == args:
        return t
    if origin is typing.Union or origin is types.UnionType:
        return functools.reduce(operator.or_, new)
    return origin[new]


def _render(t: Any, seen: frozenset[type] = frozenset()) -> str:
    """A type as text for the digest: stable across processes and modules (class names, not
    module paths; Structs and dataclasses with their fields)."""
    if t is None or t is type(None):
        return "None"
    if t is Any:
        return "Any"
    if _is_ndarray_type(t):
        return "ndarray"
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is not None:
        if origin is typing.Literal:
            return f"Literal[{', '.join(map(repr, args))}]"
        if origin is typing.Annotated:
            return f"Annotated[{_render(args[0], seen)}, {', '.join(map(repr, args[1:]))}]"
        oname = "Union" if origin in (typing.Union, types.UnionType) else getattr(
            origin, "__qualname__", repr(origin))
        return f"{oname}[{', '.join(_render(a, seen) for a in args)}]"
    if isinstance(t, type):
        if t in seen:
            return t.__qualname__
        if issubclass(t, msgspec.Struct) or dataclasses.is_dataclass(t):
            hints = typing.get_type_hints(t)
            names = (t.__struct_fields__ if issubclass(t, msgspec.Struct)
                     else tuple(f.name for f in dataclasses.fields(t)))
            inner = ", ".join(f"{n}: {_render(hints[n], seen | {t})}" for n in names)
            return f"{t.__qualname__}{{{inner}}}"
        if issubclass(t, enum.Enum):
            return f"{t.__qualname__}{{{', '.join(f'{e.name}={e.value!r}' for e in t)}}}"
        return t.__qualname__
    return repr(t)


# ---- values on the wire ------------------------------------------------------------------------


def _enc_hook(obj: Any) -> Any:
    np = _numpy()
    if np is not None and isinstance(obj, np.ndarray):
        a = _plain_array(obj)
        return [a.dtype.str, list(a.shape), memoryview(a.reshape(-1).view(np.uint8))]
    raise TypeError(f"a {type(obj).__qualname__} cannot travel in a typed call: use the types "
                    "msgspec supports (with Structs and dataclasses), bytes or numpy arrays")


def _plain_array(a: Any) -> Any:
    if _DTYPE_RE.fullmatch(a.dtype.str) is None or a.dtype.hasobject or a.dtype.fields:
        raise TypeError(f"a numpy array of dtype {a.dtype} cannot travel: only plain fixed-size "
                        "dtypes (numbers, bool, datetime, fixed bytes/str)")
    return a if a.flags.c_contiguous else _numpy().ascontiguousarray(a)


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_encode = _encoder.encode
_ctx = threading.local()  # the out-of-band buffers of the message being decoded


def _dec_hook(t: Any, obj: Any) -> Any:
    if t is _numpy_ndarray():
        return _array_from(obj)
    raise NotImplementedError


def _numpy_ndarray() -> Any:
    np = _numpy()
    return None if np is None else np.ndarray


def _array_from(obj: Any) -> Any:
    """A numpy array from [dtype, shape, bytes | buffer index]; every claim of the header is
    checked against what arrived (ValueError: msgspec reports it as a ValidationError)."""
    np = _numpy()
    if type(obj) is not list or len(obj) != 3:
        raise ValueError("a numpy array travels as [dtype, shape, data]")
    dt, shape, data = obj
    if type(dt) is not str or _DTYPE_RE.fullmatch(dt) is None:
        raise ValueError(f"dtype {dt!r} is not a plain fixed-size dtype")
    if (type(shape) is not list or len(shape) > _MAX_NDIM
            or any(type(d) is not int or not 0 <= d <= _MAX_DIM for d in shape)):
        raise ValueError("the array's shape must be a list of at most 64 sizes")
    dtype = np.dtype(dt)
    want = math.prod(shape) * dtype.itemsize
    if type(data) is int:
        bufs = getattr(_ctx, "bufs", ())
        if not 0 <= data < len(bufs):
            raise ValueError(f"the array names buffer {data}, the message has {len(bufs)}")
        buf = bufs[data]
    elif type(data) is bytes:
        buf = data
    else:
        raise ValueError("an array's data must be bytes or a buffer index")
    have = len(buf) if type(buf) is bytes else buf.nbytes
    if have != want:
        raise ValueError(f"the array's header says {want} bytes ({dt}, shape {shape}), its data "
                         f"has {have}")
    return np.frombuffer(buf, dtype).reshape(shape)


def encode(kind: tuple[tuple[int, int], ...], values: tuple[Any, ...]) -> tuple[bytes, list[memoryview]]:
    """(stream, out-of-band buffers) of a tuple of values; kind: which positions may go out of
    band (position, _BYTES | _ARRAY)."""
    bufs: list[memoryview] = []
    if kind:
        vals = list(values)
        for pos, k in kind:
            v = vals[pos]
            if k == _BYTES:
                if type(v) in (bytes, bytearray, memoryview):
                    view = memoryview(v)
                    if view.nbytes >= OOB_MIN:
                        bufs.append(view.cast("B") if view.c_contiguous else memoryview(view.tobytes()))
                        vals[pos] = len(bufs) - 1
            elif isinstance(v, _numpy().ndarray) and v.nbytes >= OOB_MIN:
                a = _plain_array(v)
                bufs.append(memoryview(a.reshape(-1).view(_numpy().uint8)))
                vals[pos] = [a.dtype.str, list(a.shape), len(bufs) - 1]
        values = tuple(vals)
    return _encode(values), bufs


def layout(stream: bytes, bufs: list[memoryview]) -> tuple[int, list[tuple[int, Any]]]:
    """Total size and (offset, bytes) parts of a message with out-of-band buffers."""
    off = (len(stream) + 7) & ~7
    lengths = struct.pack(f"<{len(bufs)}Q", *(b.nbytes for b in bufs))
    parts: list[tuple[int, Any]] = [(0, stream), (off, lengths)]
    off += 8 * len(bufs)
    for b in bufs:
        off = (off + _ALIGN - 1) & ~(_ALIGN - 1)
        parts.append((off, b))
        off += b.nbytes
    return off, parts


def write_parts(dst: memoryview, parts: list[tuple[int, Any]]) -> None:
    for off, p in parts:
        n = len(p) if type(p) is bytes else p.nbytes
        dst[off:off + n] = p


def joined(size: int, parts: list[tuple[int, Any]]) -> bytearray:
    out = bytearray(size)
    write_parts(memoryview(out), parts)
    return out


def split(payload: Any, stream_len: int, nbufs: int) -> tuple[Any, list[memoryview]]:
    """The stream and the out-of-band buffers of a received payload; ProtocolError where the
    header lies (a length past the end, too many buffers)."""
    if nbufs == 0:
        return (payload if payload is not None else b""), []
    if nbufs > _MAX_BUFS:
        raise ProtocolError(f"a typed message announces {nbufs} buffers (at most {_MAX_BUFS})")
    mv = memoryview(payload if payload is not None else b"")
    n = mv.nbytes
    off = (stream_len + 7) & ~7
    if stream_len > n or off + 8 * nbufs > n:
        raise ProtocolError(f"a typed message's stream of {stream_len} bytes and {nbufs} buffer "
                            f"lengths do not fit in its {n}-byte payload")
    lens = struct.unpack_from(f"<{nbufs}Q", mv, off)
    off += 8 * nbufs
    bufs = []
    for size in lens:
        off = (off + _ALIGN - 1) & ~(_ALIGN - 1)
        if off + size > n:
            raise ProtocolError(f"a typed message's buffer of {size} bytes runs past the end of "
                                f"its {n}-byte payload")
        bufs.append(mv[off:off + size])
        off += size
    return mv[:stream_len], bufs


def check_depth(stream: Any) -> None:
    """ProtocolError for a stream nested deeper than _SAFE_DEPTH where msgspec's own bound is the
    recursion limit and the application raised it (Python < 3.12): there, nesting a peer chose
    could overflow the C stack of a type that takes Any (as in objects.loads)."""
    if (_LIMIT_FOLLOWS_RECURSION and len(stream) > _SAFE_DEPTH
            and sys.getrecursionlimit() > _SAFE_DEPTH):
        view = memoryview(stream)
        if _too_deep(view, 0, view.nbytes, 0):
            raise ProtocolError(f"not one value, or nested deeper than {_SAFE_DEPTH}")


def decode(dec: msgspec.msgpack.Decoder[Any], payload: Any, stream_len: int, nbufs: int,
           oob: tuple[tuple[int, int], ...] | int) -> Any:
    """Decode a payload; top-level bytes that went out of band come back as read-only views.
    msgspec.ValidationError (wrong types) / DecodeError, ProtocolError propagate."""
    stream, bufs = split(payload, stream_len, nbufs)
    check_depth(stream)
    _ctx.bufs = bufs
    try:
        value = dec.decode(stream)
    finally:
        _ctx.bufs = ()
    if isinstance(oob, int):  # a result
        if oob == _BYTES and type(value) is int:
            return _buffer(bufs, value)
        return value
    for pos, k in oob:
        if k == _BYTES and type(value[pos]) is int:
            value = (*value[:pos], _buffer(bufs, value[pos]), *value[pos + 1:])
    return value


def _buffer(bufs: list[memoryview], i: int) -> memoryview:
    if not 0 <= i < len(bufs):
        raise ProtocolError(f"a bytes value names buffer {i}, the message has {len(bufs)}")
    return bufs[i]


# ---- the server side ---------------------------------------------------------------------------


class Dispatcher:
    """Answers requests for one implementation: decode, call, encode, reply; never raises for
    what a caller sent (each failure is that caller's error reply)."""

    def __init__(self, impl: Any, iface: type[Interface] | None,
                 reply_failure: Callable[[Any, Exception], None],
                 warn: Callable[..., None], service: str) -> None:
        iface = iface if iface is not None else interface_of(type(impl))
        if not isinstance(impl, iface):
            raise TypeError(f"{type(impl).__qualname__} does not implement {iface.__qualname__} "
                            "(subclass the interface)")
        self.spec = spec_of(iface)
        self.service = service
        self._reply_failure, self._warn = reply_failure, warn
        self.table: dict[int, tuple[_Method, Callable[..., Any], bool]] = {}
        for m in self.spec.methods.values():
            fn = getattr(impl, m.name)
            if _is_stub(getattr(fn, "__func__", fn)):
                warn("service %r: %s.%s is not implemented (its body is `...`)", service,
                     self.spec.name, m.name)
            self.table[m.opcode] = (m, fn, inspect.iscoroutinefunction(fn))

    def handle(self, req: Request) -> Coroutine[Any, Any, None] | None:
        """Answer `req`; a coroutine to await when the method is async."""
        entry = self.table.get(req.opcode)
        if entry is None:
            if req.opcode == self.spec.query_opcode:
                req.reply(0, (), self.spec.description)
                return None
            self._fail(req, InterfaceMismatch(
                f"interface {self.spec.name} has no method with opcode "
                f"{req.opcode:#x}: the caller was built from another interface or version"))
            return None
        m, fn, is_async = entry
        d = req.data
        if d[2] != self.spec.digest64:
            self._fail(req, InterfaceMismatch(
                f"the caller's {self.spec.name} is another version than the "
                "service's (their digests differ): build both from the same interface"))
            return None
        try:
            if d[1] or m.oob:
                args = decode(m.arg_dec, req.payload, d[0], d[1], m.oob)
            else:  # no out-of-band buffer: the stream is the payload
                payload = req.payload
                if len(payload) > _SAFE_DEPTH:  # (the test of check_depth, without its frame)
                    check_depth(payload)
                args = m.arg_dec.decode(payload)
        except msgspec.ValidationError as exc:
            self._fail(req, InvalidArgument(f"{self.spec.name}.{m.name}: {exc}"))
            return None
        except (msgspec.DecodeError, ProtocolError, RecursionError) as exc:
            self._fail(req, ProtocolError(f"{self.spec.name}.{m.name}: malformed arguments ({exc})"))
            return None
        if is_async:
            return self._finish(req, m, fn, args)
        try:
            result = fn(*args)
        except Exception as exc:
            self._error(req, m, exc)
            return None
        self._reply(req, m, result)
        return None

    async def _finish(self, req: Request, m: _Method, fn: Callable[..., Any],
                      args: tuple[Any, ...]) -> None:
        try:
            result = await fn(*args)
        except Exception as exc:
            self._error(req, m, exc)
            return
        self._reply(req, m, result)

    def _reply(self, req: Request, m: _Method, result: Any) -> None:
        if not req.expects_reply:
            return
        try:
            if not m.ret_kind:  # the common case: no out-of-band buffer possible
                req.reply(0, (), _encode(result))
                return
            stream, bufs = encode(((0, m.ret_kind),), (result,))
        except (TypeError, ValueError, OverflowError) as exc:
            self._error(req, m, TypeError(f"{self.spec.name}.{m.name} returned a "
                                          f"{type(result).__qualname__} it cannot send: {exc}"))
            return
        # One element array: the result travels as (result,), the caller decodes the element.
        stream = stream[1:]  # msgpack fixarray(1) header: one byte
        if not bufs:
            req.reply(0, (), stream)
            return
        size, parts = layout(stream, bufs)
        req.reply(0, (len(stream), len(bufs)), joined(size, parts))

    def _error(self, req: Request, m: _Method, exc: Exception) -> None:
        for i, cls in enumerate(self.spec.errors):
            if isinstance(exc, cls):
                if req.expects_reply:
                    try:
                        text = msgspec.json.encode(list(exc.args))
                    except (TypeError, ValueError, OverflowError):
                        text = msgspec.json.encode([str(exc)])
                    req.reply_error(i + 1, text)
                return
        self._warn("service %r: %s.%s raised %s: %s", self.service, self.spec.name, m.name,
                   type(exc).__name__, exc)
        if req.expects_reply:
            self._reply_failure(req, exc)

    def _fail(self, req: Request, exc: IpcError) -> None:
        self._warn("service %r: refused a call: %s", self.service, exc)
        if req.expects_reply:
            req._reply_ipc_error(type(exc).code, str(exc))


# ---- the client side ---------------------------------------------------------------------------


class _ProxyBase:
    _capbus_proxy = True
    _ep: Endpoint
    _spec: Spec
    _timeout: float | None

    def __repr__(self) -> str:
        return f"<capbus proxy of {self._spec.name} on {self._ep.name!r}>"


def _declared(spec: Spec, exc: RemoteError) -> BaseException:
    """The declared error a service's reply_error stands for (else the RemoteError itself)."""
    code = exc.code
    if exc.remote_type is not None or code is None or not 1 <= code <= len(spec.errors):
        return exc
    cls = spec.errors[code - 1]
    try:
        args = msgspec.json.decode(exc.text)
        if type(args) is not list:
            raise TypeError
        return cls(*args)
    except Exception:  # args this class does not take: the text as its message
        try:
            return cls(exc.text)
        except Exception:
            return exc


def _result(spec: Spec, m: _Method, ep: Endpoint, r: Message) -> Any:
    try:
        if not r[3] and not m.ret_kind:
            payload = r[6] or b""
            if len(payload) > _SAFE_DEPTH:
                check_depth(payload)
            return m.ret_dec.decode(payload)
        return decode(m.ret_dec, r[6], r[2], r[3], m.ret_kind)
    except (msgspec.ValidationError, msgspec.DecodeError, ProtocolError, RecursionError) as exc:
        raise _bad_result(spec, m, ep, exc) from None


def _bad_result(spec: Spec, m: _Method, ep: Endpoint, exc: Exception) -> ProtocolError:
    return ProtocolError(f"{ep.name!r} answered {spec.name}.{m.name} with a value that does not "
                         f"match its annotation: {exc}")


def _sync_method(spec: Spec, m: _Method) -> Callable[..., Any]:
    op, n, data, oob, ret_kind, ret_decode = m.opcode, m.nargs, m.data, m.oob, m.ret_kind, m.ret_dec.decode

    def method(self: _ProxyBase, *args: Any, **kwargs: Any) -> Any:
        if kwargs or len(args) != n:
            args = m.bind(args, kwargs)
        ep = self._ep
        try:
            if not oob:  # no argument can go out of band: the stream is the payload
                stream, bufs = _encode(args), None
            else:
                stream, bufs = encode(oob, args)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidArgument(f"{spec.name}.{m.name}: {exc}") from None
        if bufs is None:  # the hot path, in this frame
            try:
                r = ep.call(op, data, stream, self._timeout)
            except RemoteError as exc:
                raise _declared(spec, exc) from None
            if not r[3] and not ret_kind:
                payload = r[6] or b""
                if len(payload) <= _SAFE_DEPTH:
                    try:
                        return ret_decode(payload)
                    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                        raise _bad_result(spec, m, ep, exc) from None
            return _result(spec, m, ep, r)
        try:
            if not bufs:
                r = ep.call(op, data, stream, self._timeout)
            else:
                size, parts = layout(stream, bufs)
                with ep.loan(size) as loan:
                    write_parts(loan.buffer, parts)
                    r = loan.call(op, (len(stream), len(bufs), spec.digest64), self._timeout)
        except RemoteError as exc:
            raise _declared(spec, exc) from None
        return _result(spec, m, ep, r)

    method.__name__ = method.__qualname__ = m.name
    return method


def _async_method(spec: Spec, m: _Method) -> Callable[..., Any]:
    op, n, data, oob = m.opcode, m.nargs, m.data, m.oob

    async def method(self: _ProxyBase, *args: Any, **kwargs: Any) -> Any:
        if kwargs or len(args) != n:
            args = m.bind(args, kwargs)
        ep = self._ep
        if not self.__dict__.get("_checked"):
            await _acheck(self)
        try:
            stream, bufs = encode(oob, args)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidArgument(f"{spec.name}.{m.name}: {exc}") from None
        try:
            if not bufs:
                r = await ep.acall(op, data, stream, self._timeout)
            else:  # acall has no loan: one copy into the arena
                size, parts = layout(stream, bufs)
                r = await ep.acall(op, (len(stream), len(bufs), spec.digest64),
                                   bytes(joined(size, parts)), self._timeout)
        except RemoteError as exc:
            raise _declared(spec, exc) from None
        return _result(spec, m, ep, r)

    method.__name__ = method.__qualname__ = m.name
    return method


def _proxy_class(iface: type[Interface], asynchronous: bool) -> type:
    spec = spec_of(iface)
    cls = spec.proxies.get(asynchronous)
    if cls is None:
        make = _async_method if asynchronous else _sync_method
        ns: dict[str, Any] = {name: make(spec, m) for name, m in spec.methods.items()}
        ns["_capbus_proxy"] = True
        ns["_spec"] = spec
        cls = type(f"{iface.__name__}{'Async' if asynchronous else ''}Proxy", (_ProxyBase, iface), ns)
        spec.proxies[asynchronous] = cls
    return cls


def _check(spec: Spec, ep: Endpoint, answer: Any) -> None:
    """Compare the service's interface description with ours: InterfaceMismatch naming what
    differs."""
    r: Any = answer
    try:
        desc = msgspec.msgpack.decode(r[6] or b"", type=dict[str, Any])
        theirs = desc["methods"]
        if not isinstance(theirs, dict) or not isinstance(desc["digest"], bytes):
            raise TypeError
    except Exception:
        raise InterfaceMismatch(f"{ep.name!r} does not serve a capbus interface (its answer to "
                                f"the interface query for {spec.name} was not one)") from None
    if desc["digest"] == spec.digest:
        return
    ours = {m.name: m.text for m in spec.methods.values()}
    diff = []
    if desc.get("name") != spec.name:
        diff.append(f"it serves interface {str(desc.get('name'))[:100]!r}, this proxy is for "
                    f"{spec.name!r}")
    missing = sorted(set(ours) - set(theirs))
    extra = sorted(str(n)[:100] for n in set(theirs) - set(ours))
    for name in sorted(set(ours) & set(theirs)):
        if ours[name] != theirs[name]:
            diff.append(f"{name}: here {ours[name]}, there {str(theirs[name])[:200]}")
    if missing:
        diff.append(f"the service lacks {', '.join(missing[:10])}")
    if extra:
        diff.append(f"only the service has {', '.join(extra[:10])}"
                    + (f" and {len(extra) - 10} more" if len(extra) > 10 else ""))
    if desc.get("errors") != [e.__qualname__ for e in spec.errors]:
        diff.append(f"errors: here {[e.__qualname__ for e in spec.errors]}, there "
                    f"{str(desc.get('errors'))[:200]}")
    raise InterfaceMismatch(f"{ep.name!r} serves another version of {spec.name}: "
                            + "; ".join(diff[:20] or ["their digests differ"])
                            + ": build both from the same interface definition")


def make_proxy(ep: Endpoint, iface: type[T], timeout: float | None, check_timeout: float) -> T:
    cls = _proxy_class(iface, False)
    spec = spec_of(iface)
    try:
        answer = ep.call(spec.query_opcode, (), b"", check_timeout)
    except RemoteError as exc:
        raise InterfaceMismatch(f"{ep.name!r} does not serve capbus interface {spec.name} "
                                f"(the interface query failed: {exc})") from None
    _check(spec, ep, answer)
    proxy: object = object.__new__(cls)
    proxy.__dict__.update(_ep=ep, _timeout=timeout, _checked=True)
    return typing.cast(T, proxy)


def make_aproxy(ep: Endpoint, iface: type[Interface], timeout: float | None,
                check_timeout: float) -> Any:
    cls = _proxy_class(iface, True)
    proxy: Any = object.__new__(cls)
    proxy.__dict__.update(_ep=ep, _timeout=timeout, _check_timeout=check_timeout, _checked=False)
    return proxy


async def _acheck(proxy: Any) -> None:
    spec, ep = proxy._spec, proxy._ep
    try:
        answer = await ep.acall(spec.query_opcode, (), b"", proxy._check_timeout)
    except RemoteError as exc:
        raise InterfaceMismatch(f"{ep.name!r} does not serve capbus interface {spec.name} "
                                f"(the interface query failed: {exc})") from None
    _check(spec, ep, answer)
    proxy._checked = True

