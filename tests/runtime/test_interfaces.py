"""Typed services (capbus.Interface) between real processes: a child serves tests/runtime/
iface_kv.py's implementations (sync, async on a private loop, async under aserve_interface) and
this process calls them through proxies; raw calls play the hostile client."""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess

import msgspec
import numpy as np
import pytest
from conftest import readline
from iface_kv import KV, SERVER, AsyncKVImpl, Box, Full, KVImpl, KVNext, Point

import capbus
from capbus._runtime.interface import Spec, interface_of, spec_of

HERE = os.path.dirname(os.path.abspath(__file__))


def _serve(children, mode: str, name: str = "kv") -> subprocess.Popen:
    p = children.start(SERVER, HERE, mode, name, stdin=subprocess.DEVNULL)
    assert readline(p, 20) == "ready"
    return p


@pytest.fixture(params=["sync", "async-in-sync", "async"])
def kv_server(request, children):
    return _serve(children, request.param), request.param


@pytest.fixture
def me(kernel):
    p = capbus.connect(kernel.socket_path)
    yield p
    p.close()


def test_calls_results_and_errors(kv_server, me):
    p, mode = kv_server
    kv = me.lookup("kv", timeout=10).proxy(KV, timeout=10)
    assert isinstance(kv, KV)
    assert kv.whoami() == ("sync" if mode == "sync" else "async")
    assert kv.put("a", b"one") is None
    kv.put(key="b", value=b"two")  # keywords bind like a local call
    assert kv.get("a") == b"one" and kv.keys() == ["a", "b"]
    assert kv.scale(Point(1, 2)) == Point(2, 4)  # a default filled in by the proxy
    assert kv.scale(Point(1, 2), factor=5) == Point(5, 10)
    assert kv.boxed(Box("x", [Point(1, 2), Point(3, 4)])) == Box("X", [Point(3, 4), Point(1, 2)])
    # A declared error arrives as its own type, with its message (its args).
    with pytest.raises(KeyError) as ki:
        kv.get("nope")
    assert ki.value.args == ("nope",)
    for i in range(98):
        kv.put(f"k{i}", b"")
    with pytest.raises(Full, match="100 keys, the most this store holds"):
        kv.put("overflow", b"")
    # Any other exception: RemoteError naming the remote type; the service goes on.
    with pytest.raises(capbus.RemoteError) as ri:
        kv.divide(1.0, 0.0)
    assert ri.value.remote_type == "ZeroDivisionError" and "division by zero" in str(ri.value)
    assert kv.divide(1.0, 4.0) == 0.25
    with pytest.raises(TypeError):  # arity: Python's own error, before anything is sent
        kv.get("a", "b")
    assert p.poll() is None


def test_wrong_types_both_directions(children, me):
    p = _serve(children, "sync")
    kv = me.lookup("kv", timeout=10).proxy(KV, timeout=10)
    with pytest.raises(capbus.InvalidArgument, match=r"KV.get: Expected `str`, got `int` - at `\$\[0\]`"):
        kv.get(1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):  # InvalidArgument is a TypeError (and an IpcError)
        kv.scale({"x": "1", "y": 2})  # type: ignore[arg-type]
    with pytest.raises(capbus.InvalidArgument, match="cannot travel"):
        kv.put("a", object())  # type: ignore[arg-type]  # refused before sending
    # The service answers with a value that is not what its annotation says.
    with pytest.raises(capbus.ProtocolError, match="KV.liar .*Expected `int`, got `str`"):
        kv.liar()
    kv.put("a", b"1")
    assert kv.get("a") == b"1" and p.poll() is None


def test_async_proxy(kv_server, me):
    p, _ = kv_server
    ep = me.lookup("kv", timeout=10)

    async def main() -> None:
        akv = ep.aproxy(KV, timeout=10)
        await asyncio.wait_for(akv.put("a", b"x"), 10)
        assert await asyncio.wait_for(akv.get("a"), 10) == b"x"
        with pytest.raises(KeyError):
            await asyncio.wait_for(akv.get("zz"), 10)
        results = await asyncio.wait_for(asyncio.gather(*(akv.scale(Point(i, i)) for i in range(8))), 10)
        assert results == [Point(2 * i, 2 * i) for i in range(8)]
        a = np.arange(20000, dtype=np.float64)  # large: out of band, copied into the arena once
        assert await asyncio.wait_for(akv.total(a), 10) == float(a.sum())
        bad = ep.aproxy(KVNext, timeout=10)
        with pytest.raises(capbus.InterfaceMismatch, match="get: here get\\(key: int\\)"):
            await asyncio.wait_for(bad.get(1), 10)

    asyncio.run(main())
    assert p.poll() is None


def test_version_mismatch_fails_clearly(children, me):
    _serve(children, "sync")
    ep = me.lookup("kv", timeout=10)
    with pytest.raises(capbus.InterfaceMismatch) as mi:
        ep.proxy(KVNext)
    msg = str(mi.value)
    assert "get: here get(key: int) -> bytes, there get(key: str) -> bytes" in msg
    assert "only the service has" in msg and "keys" in msg
    assert isinstance(mi.value, capbus.ProtocolError)
    # A call that skips the check (the same opcode as KV.get) is refused by the digest it carries.
    nxt, cur = spec_of(KVNext), spec_of(KV)
    assert nxt.methods["get"].opcode == cur.methods["get"].opcode
    with pytest.raises(capbus.InterfaceMismatch, match="another version"):
        ep.call(nxt.methods["get"].opcode, (0, 0, nxt.digest64), msgspec.msgpack.encode((1,)), 10)
    assert ep.proxy(KV).keys() == []


def test_proxy_of_a_service_without_interface(children, me):
    p = children.start("""
import capbus
svc = capbus.connect().register("plain")
print("ready", flush=True)
svc.serve(lambda req: None)
""", stdin=subprocess.DEVNULL)
    assert readline(p, 20) == "ready"
    with pytest.raises(capbus.InterfaceMismatch, match="does not serve a capbus interface"):
        me.lookup("plain", timeout=10).proxy(KV, check_timeout=10)


def test_large_bytes_and_arrays_zero_copy(children, me):
    _serve(children, "sync")
    kv = me.lookup("kv", timeout=10).proxy(KV, timeout=30)
    # Small bytes travel in the msgpack stream (bytes); large ones out of band, through a loan:
    # the server's argument is a read-only view of the request arena (no copy on receipt).
    assert kv.kind(b"ab" * 10) == "bytes 20 b'abab'"
    big = b"\x07" * (1 << 20)
    assert kv.kind(big) == "memoryview 1048576 b'\\x07\\x07\\x07\\x07'"
    assert kv.kind(bytearray(big)) == "memoryview 1048576 b'\\x07\\x07\\x07\\x07'"
    blob = kv.blob(1 << 20)  # a large bytes result: a read-only view of the reply
    assert isinstance(blob, memoryview) and blob.readonly and bytes(blob) == bytes(range(256)) * 4096
    a = np.random.default_rng(1).random(1 << 17)  # 1 MiB of float64
    assert kv.total(a) == pytest.approx(float(a.sum()))
    writeable, owndata, has_base = kv.view_of(a)
    assert (writeable, owndata, has_base) == (False, False, True)  # a view, not a copy
    assert kv.total(a[::2]) == pytest.approx(float(a[::2].sum()))  # non-contiguous: sent as C order
    doubled = kv.double(a)
    assert doubled.dtype == np.float64 and doubled.shape == a.shape and np.array_equal(doubled, a * 2)
    m = np.arange(12, dtype=np.float64).reshape(3, 4)  # small: inline, shape kept
    assert np.array_equal(kv.double(m), m * 2)
    with pytest.raises(capbus.InvalidArgument, match="dtype"):
        kv.total(np.array([object()]))  # type: ignore[arg-type]


def _raw(ep, spec: Spec, method: str, payload, data=None, timeout: float = 10):
    m = spec.methods[method]
    return ep.call(m.opcode, data if data is not None else (0, 0, spec.digest64), payload, timeout)


def test_hostile_raw_calls(children, me):
    """A client that skips the proxy and sends the worst bytes: each gets a clear error, the
    service goes on answering everyone."""
    p = _serve(children, "sync")
    ep = me.lookup("kv", timeout=10)
    spec = spec_of(KV)
    d64 = spec.digest64
    enc = msgspec.msgpack.encode
    cases = [
        # (method, payload, data, error)
        ("get", b"\xc1\xc1\xc1", None, capbus.ProtocolError),  # not msgpack
        ("get", b"\x91", None, capbus.ProtocolError),  # truncated
        ("get", b"", None, capbus.ProtocolError),  # nothing
        ("get", enc(("a", "b")), None, capbus.InvalidArgument),  # one argument too many
        ("get", enc([]), None, capbus.InvalidArgument),
        ("get", b"\x91" * 100000 + b"\xc0", None, capbus.InvalidArgument),  # deep nesting
        ("keys", b"\x91" * 100000 + b"\x90", None, capbus.InvalidArgument),
        ("put", enc(("a", -1)), None, capbus.ProtocolError),  # names buffer -1
        ("scale", enc(({"x": 1},)), None, capbus.InvalidArgument),  # a Struct missing a field
        # numpy headers that lie: more bytes claimed than sent, a bad dtype, a huge shape
        ("total", enc((["<f8", [1000], b"\0" * 8],)), None, capbus.InvalidArgument),
        ("total", enc((["<f8", [1 << 47, 1 << 47], b""],)), None, capbus.InvalidArgument),
        ("total", enc((["O", [1], b"\0" * 8],)), None, capbus.InvalidArgument),
        ("total", enc((["<f8", [-1], b""],)), None, capbus.InvalidArgument),
        ("total", enc((["<f8", [1], 0],)), None, capbus.InvalidArgument),  # buffer 0 of none
        ("total", enc((["<f8", [1] * 65, b"\0" * 8],)), None, capbus.InvalidArgument),
        # out-of-band layouts that lie
        ("kind", enc((0,)), (3, 1000, d64), capbus.ProtocolError),  # too many buffers
        ("kind", enc((0,)), (2, 1, d64), capbus.ProtocolError),  # no room for the length
        ("kind", enc((0,)) + b"\0" * 6 + struct.pack("<Q", 1 << 40), (2, 1, d64),
         capbus.ProtocolError),  # a buffer past the end
        ("kind", enc((5,)) + b"\0" * 6 + struct.pack("<Q", 0), (2, 1, d64),
         capbus.ProtocolError),  # names buffer 5 of 1
        ("kind", enc((0,)), None, capbus.ProtocolError),  # names buffer 0 of none
        ("kind", enc((b"ab",)), (1 << 40, 0, d64), None),  # no buffers: the stream is all of it
    ]
    for method, payload, data, err in cases:
        if err is None:
            assert _raw(ep, spec, method, payload, data) is not None
            continue
        with pytest.raises(err):
            _raw(ep, spec, method, payload, data)
    with pytest.raises(capbus.InterfaceMismatch, match="no method with opcode"):
        ep.call(12345, (0, 0, d64), b"\x90", 10)
    with pytest.raises(capbus.InterfaceMismatch):
        ep.call(spec.methods["keys"].opcode, (0, 0, d64 ^ 1), b"\x90", 10)
    ep.send_async(spec.methods["get"].opcode, (0, 0, d64), b"\xc1")  # one-way garbage: no reply
    kv = ep.proxy(KV, timeout=10)
    kv.put("still", b"here")
    assert kv.get("still") == b"here" and p.poll() is None


def test_random_garbage(children, me):
    """Random bytes, random layouts and mutated valid calls for every method: each call gets an
    answer or a capbus error, never a hang, and the service goes on."""
    import random

    p = _serve(children, "sync")
    ep = me.lookup("kv", timeout=10)
    spec = spec_of(KV)
    rng = random.Random(20)
    valid = [msgspec.msgpack.encode(v) for v in (("a",), ("a", b"b"), (), ({"x": 1, "y": 2}, 3),
                                                    (["<f8", [2], b"\0" * 16],), ([[1]],))]
    names = sorted(spec.methods)
    for i in range(600):
        kind = i % 3
        if kind == 0:
            payload = rng.randbytes(rng.randrange(1, 200))
        else:
            payload = bytearray(rng.choice(valid))
            for _ in range(rng.randrange(1, 4)):
                payload[rng.randrange(len(payload))] = rng.randrange(256)
            payload = bytes(payload)
        data = (rng.choice([0, len(payload), rng.randrange(1 << 20)]),
                rng.choice([0, 0, 1, 2, rng.randrange(1 << 16)]), spec.digest64)
        try:
            _raw(ep, spec, rng.choice(names), payload, data)
        except capbus.IpcError:
            pass
    kv = ep.proxy(KV, timeout=10)
    kv.put("alive", b"yes")
    assert kv.get("alive") == b"yes" and p.poll() is None


@pytest.mark.parametrize("mode", ["sync", "deep"])
def test_deep_nesting_for_any(children, me, mode):
    """A parameter typed Any: nesting is bounded even where the application raised the recursion
    limit (on Python < 3.12 msgspec's bound follows it: 200,000 levels would overflow the C
    stack); a nesting that fits is decoded."""
    p = _serve(children, mode)
    ep = me.lookup("kv", timeout=10)
    spec = spec_of(KV)
    kv = ep.proxy(KV, timeout=10)
    assert kv.depth([[[[1]]]]) == 4
    with pytest.raises((capbus.ProtocolError, capbus.InvalidArgument)):
        _raw(ep, spec, "depth", b"\x91" * 200_000 + b"\xc0")
    assert kv.depth([[[[1]]]]) == 4 and p.poll() is None


def test_interface_definitions():
    """What both ends derive without talking: opcodes from names, digests from signatures."""
    spec = spec_of(KV)
    import zlib

    assert spec.methods["get"].opcode == zlib.crc32(b"KV.get")
    assert spec.query_opcode == zlib.crc32(b"KV.__interface__")
    assert interface_of(KVImpl) is KV and interface_of(AsyncKVImpl) is KV

    def make(key_type):
        class KV(capbus.Interface):  # the same name, defined again (as another process would)
            errors = (KeyError,)

            def get(self, key: str) -> bytes: ...

        KV.get.__annotations__ = {"key": key_type, "return": bytes}  # (this module's are strings)
        return spec_of(KV)

    assert make(str).digest == make(str).digest
    assert make(str).digest != make(int).digest
    with pytest.raises(TypeError, match="annotate parameter 'key'"):
        class NoHints(capbus.Interface):
            def get(self, key) -> bytes: ...  # type: ignore[no-untyped-def]

        spec_of(NoHints)
    with pytest.raises(TypeError, match=r"\*args"):
        class Star(capbus.Interface):
            def get(self, *keys: str) -> bytes: ...

        spec_of(Star)
    with pytest.raises(TypeError, match="does not implement"):
        from capbus._runtime.interface import Dispatcher

        Dispatcher(object(), KV, lambda r, e: None, lambda *a: None, "x")


@pytest.mark.parametrize("how", ["sync", "async"])
def test_served_until_closed(kernel, how):
    """serve_interface / aserve_interface return when the service is closed (the sync one from
    another thread, the async one from its event loop)."""
    import threading

    server = capbus.connect(kernel.socket_path)
    svc = server.register("kv-local")
    loops: list[asyncio.AbstractEventLoop] = []
    if how == "sync":
        t = threading.Thread(target=svc.serve_interface, args=(AsyncKVImpl(),), kwargs={"poll": 0.05})
    else:
        async def main() -> None:
            loops.append(asyncio.get_running_loop())
            await svc.aserve_interface(AsyncKVImpl())

        t = threading.Thread(target=asyncio.run, args=(main(),))
    t.start()
    try:
        client = capbus.connect(kernel.socket_path)
        kv = client.lookup("kv-local", timeout=10).proxy(KV, timeout=10)
        kv.put("x", b"y")
        assert kv.get("x") == b"y" and kv.whoami() == "async"
        client.close()
    finally:
        if loops:
            loops[0].call_soon_threadsafe(svc.close)
        else:
            svc.close()
        t.join(10)
        server.close()
    assert not t.is_alive()
