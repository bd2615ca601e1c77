"""The synchronous mailbox over the native data plane, between real processes."""

from __future__ import annotations

import ctypes
import inspect
import os
import signal
import subprocess
import threading
import time
import zlib

import pytest
from conftest import readline

import capbus
from capbus import _core

# A server process: echoes opcode+1, data reversed, payload with its crc32 in data[0] when asked.
ECHO_SERVER = """
import capbus, os, sys, time, zlib
wait = sys.argv[1] if len(sys.argv) > 1 else "adaptive"
p = capbus.connect(wait=wait)
svc = p.register("echo")
print("ready", p.id, flush=True)
def handler(req):
    if req.opcode == 99:                      # sleep data[0] ms before answering
        time.sleep(req.data[0] / 1000)
        return (req.opcode, req.data)
    if req.opcode == 98:                      # report the kernel-verified sender
        return (0, (req.sender, 0, 0, 0))
    if req.opcode == 97:
        raise KeyError("no such key")
    if req.opcode == 96:                      # crc and length of the payload, no echo
        return (0, (zlib.crc32(req.payload), len(req.payload), 0, 0))
    return (req.opcode + 1, tuple(reversed(req.data)), req.payload)
svc.serve(handler)
"""


@pytest.fixture(params=["adaptive"])
def echo(request, kernel, children):
    p = children.start(ECHO_SERVER, request.param, stdin=subprocess.DEVNULL)
    line = readline(p, 20)
    assert line.startswith("ready"), line
    return p, int(line.split()[1])


def test_layouts_match_veridianos():
    assert ctypes.sizeof(capbus.SmallMessage) == 48
    offs = {name: getattr(capbus.SmallMessage, name).offset for name, _ in capbus.SmallMessage._fields_}
    assert offs == {"capability": 0, "opcode": 8, "flags": 12, "data": 16}
    assert ctypes.sizeof(capbus.LargeMessage) == 128
    assert capbus.LargeMessage.memory_region.offset == 32
    assert capbus.LargeMessage.inline_data.offset == 56
    from capbus import _core

    assert _core.SMALL_MESSAGE_SIZE == 48 and _core.SLOT_SIZE == 64
    assert ctypes.sizeof(capbus.LargeMessage) == _core.LARGE_MSG_SIZE
    assert capbus.LargeMessage.header.offset + 24 == _core.LM_CHECKSUM_OFF


def test_call_round_trip(kernel, echo):
    _, server_id = echo
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("echo")
        assert ep.process_id == server_id
        reply = ep.call(7, data=(1, 2, 3, 4), timeout=5)
        assert reply.opcode == 8 and reply.data == (4, 3, 2, 1) and reply.payload == b""
        reply = ep.call(1, data=(2**64 - 1,), timeout=5)
        assert reply.data == (0, 0, 0, 2**64 - 1)
        assert ep.call(98, timeout=5).data[0] == me.id  # the server sees our kernel-verified id


@pytest.mark.parametrize("size", [1, 63, 64, 65, 4096, 1 << 20])
def test_payload_sizes(kernel, echo, size):
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("echo")
        payload = os.urandom(size)
        reply = ep.call(5, payload=payload, timeout=10)
        assert reply.payload == payload


def test_payload_64_mib(kernel, echo):
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("echo")
        payload = os.urandom(1 << 20) * 64
        reply = ep.call(96, payload=payload, timeout=30)
        assert reply.data[:2] == (zlib.crc32(payload), len(payload))


def test_bad_arguments_fail_before_sending(kernel, echo):
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("echo")
        for data in [(1, 2, 3, 4, 5), (-1,), (2**64,)]:
            with pytest.raises(ValueError):
                ep.call(1, data=data, timeout=5)
        for data in [("x",), (1.5,)]:
            with pytest.raises(TypeError):
                ep.call(1, data=data, timeout=5)
        for opcode in (-1, 2**32):
            with pytest.raises(ValueError):
                ep.call(opcode, timeout=5)
        with pytest.raises(capbus.MessageTooLarge):
            ep.call(1, payload=b"\0" * ((128 << 20) + 1), timeout=5)
        assert ep.call(1, data=(9,), timeout=5).data == (0, 0, 0, 9)  # the channel is fine


def test_handler_error_reaches_caller(kernel, echo):
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("echo")
        with pytest.raises(capbus.IpcError, match="KeyError"):
            ep.call(97, timeout=5)
        assert ep.call(1, timeout=5).opcode == 2


def test_timeout_cancels_and_late_reply_is_dropped(kernel, echo):
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("echo")
        t0 = time.monotonic()
        with pytest.raises(capbus.Timeout):
            ep.call(99, data=(300,), timeout=0.05)
        assert time.monotonic() - t0 < 0.25
        time.sleep(0.4)  # the late reply (opcode 99) arrives meanwhile
        reply = ep.call(1, data=(5,), timeout=5)
        assert reply.opcode == 2 and reply.data == (0, 0, 0, 5)


def test_cancelled_request_is_skipped(kernel, echo):
    """A call that timed out before the server got to it is never delivered at all."""
    with capbus.connect(kernel.socket_path) as me, capbus.connect(kernel.socket_path) as other:
        busy = threading.Thread(target=lambda: other.lookup("echo").call(99, data=(400,), timeout=5))
        busy.start()
        time.sleep(0.05)
        ep = me.lookup("echo")
        with pytest.raises(capbus.Timeout):
            ep.call(99, data=(2000,), timeout=0.1)  # queued behind the busy call, then cancelled
        busy.join(5)
        t0 = time.monotonic()
        assert ep.call(1, timeout=5).opcode == 2
        assert time.monotonic() - t0 < 1.5  # not 2 s: the cancelled request was skipped


def test_concurrent_threads_one_endpoint(kernel, echo):
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("echo")
        errors = []

        def worker(k: int) -> None:
            try:
                for i in range(300):
                    r = ep.call(1, data=(k, i), timeout=10)
                    assert r.data == (0, 0, i, k)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors


def test_server_sigkill_gives_peer_died_fast(kernel, echo):
    p, _ = echo
    with capbus.connect(kernel.socket_path, wait="block") as me:
        ep = me.lookup("echo")
        threading.Timer(0.2, lambda: p.send_signal(signal.SIGKILL)).start()
        t0 = time.monotonic()
        with pytest.raises(capbus.PeerDied):
            ep.call(99, data=(10_000,), timeout=10)
        assert time.monotonic() - t0 < 1.0
        with pytest.raises(capbus.PeerDied):
            ep.call(1, timeout=1)


def test_client_dying_mid_call_leaves_server_serving(kernel, echo, children):
    victim = children.start("""
        import capbus
        p = capbus.connect()
        ep = p.lookup("echo")
        print("calling", flush=True)
        ep.call(99, data=(500,), timeout=10)
    """, stdin=subprocess.DEVNULL)
    assert readline(victim) == "calling"
    time.sleep(0.1)
    victim.kill()
    victim.wait(5)
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("echo")
        for i in range(50):
            assert ep.call(1, data=(i,), timeout=5).data[3] == i


def test_fair_round_robin_across_three_clients(kernel, children):
    """Three clients keep a busy server loaded; none gets less than a fair share."""
    server = children.start("""
        import capbus, collections, time
        p = capbus.connect(wait="block")
        svc = p.register("fair")
        print("ready", flush=True)
        counts = collections.Counter()
        end = None
        while True:
            req = svc.recv(timeout=10)
            if req.opcode == 2:
                req.reply(0, tuple(counts[s] for s in sorted(counts))[:4])
                break
            if end is None:
                end = time.monotonic() + 1.5
            if time.monotonic() < end:
                counts[req.sender] += 1
            time.sleep(0.001)   # slow: every client always has a request waiting for its turn
            req.reply(0)
    """, stdin=subprocess.DEVNULL)
    assert readline(server) == "ready"
    clients = [children.start("""
        import capbus, time
        p = capbus.connect(wait="block")
        ep = p.lookup("fair")
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            ep.call(1, timeout=5)
        print("done", flush=True)
    """, stdin=subprocess.DEVNULL) for _ in range(3)]
    for c in clients:
        assert readline(c, 20) == "done"
    with capbus.connect(kernel.socket_path) as me:
        counts = me.lookup("fair").call(2, timeout=5).data[:3]
    total = sum(counts)
    assert total > 300, counts
    # Round robin: each waiting client is served once per turn (lowest-index-first would starve).
    assert min(counts) >= 0.85 * total / 3, counts


# ---- the native fronts: Endpoint.call / send_async and Service.recv in C ---------------------------
#
# capbus.Endpoint subclasses _core.EndpointBase: call() and send_async() run natively when flags are
# 0 and no capabilities or regions travel, else they call Endpoint._call_slow / _send_async_slow
# (the reference behaviour, handed to the native base by Endpoint.__init__). The native side
# caches the calling thread's lane per endpoint.


class InProcess:
    """A client connection and a service in this process; a thread serves with timed recv()s and
    answers a call with opcode + 1, data (flags, payload length, channel index, data[0]) and the
    payload. What the service received is kept in .seen, in order."""

    def __init__(self, kernel, name: str = "fronts") -> None:
        self.client = capbus.connect(kernel.socket_path)
        self.server = capbus.connect(kernel.socket_path)
        self.svc = self.server.register(name)
        self.ep = self.client.lookup(name)
        self.seen: list[tuple] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                req = self.svc.recv(timeout=0.05)
            except capbus.Timeout:
                continue
            except BaseException as exc:  # pragma: no cover - reported by close()
                self.errors.append(exc)
                return
            self.seen.append((type(req), req.opcode, req.flags, req.data, bytes(req.payload),
                              req.expects_reply))
            if req.expects_reply:
                req.reply(req.opcode + 1, (req.flags, len(req.payload), req.index, req.data[0]),
                          bytes(req.payload))

    def wait_seen(self, n: int, timeout: float = 5) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.seen) < n and time.monotonic() < deadline:
            time.sleep(0.002)
        return len(self.seen) >= n

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), "the service thread did not stop"
        self.client.close()
        self.server.close()
        assert not self.errors, self.errors


@pytest.fixture
def inproc(kernel):
    ip = InProcess(kernel)
    yield ip
    ip.close()


def test_threads_keep_their_own_lanes(kernel, inproc):
    """Calls from several threads at once each get their own results, on their own channel; a
    thread that exits leaves its lane in the native cache, and the threads after it (and the
    thread that called before it) still go through their own lanes."""
    ep = inproc.ep
    main_index = ep.call(1, data=(7,), timeout=5).data[2]
    indices: dict[int, set[int]] = {}
    errors: list[BaseException] = []

    def worker(k: int, n: int) -> None:
        try:
            mine = indices.setdefault(k, set())
            for i in range(n):
                r = ep.call(1, data=(k * 1000 + i,), payload=bytes([k]) * (i % 5), timeout=10)
                assert r.opcode == 2 and r.data[3] == k * 1000 + i, (k, i, r)
                assert r.payload == bytes([k]) * (i % 5), (k, i, r)
                mine.add(r.data[2])
                ep.send_async(3, data=(k,))  # interleaved with the calls, on the same lane
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k, 100)) for k in range(1, 6)]
    for t in threads:
        t.start()
    for _ in range(100):  # the main thread calls meanwhile: the cache keeps changing hands
        assert ep.call(1, data=(5,), timeout=10).data[2:] == (main_index, 5)
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    assert not errors, errors
    assert all(len(s) == 1 for s in indices.values()), indices  # one lane per thread...
    per_thread = [next(iter(s)) for s in indices.values()]
    assert len(set(per_thread + [main_index])) == 6, (per_thread, main_index)  # ...its own

    # Threads that start after the others exited (the cache still holds a dead thread's lane).
    for k in range(6, 12):
        t = threading.Thread(target=worker, args=(k, 3))
        t.start()
        t.join(30)
        assert not t.is_alive()
        assert not errors, errors
        assert ep.call(1, data=(k,), timeout=5).data[2:] == (main_index, k)
    assert all(len(indices[k]) == 1 for k in range(6, 12))
    assert main_index not in {next(iter(indices[k])) for k in range(6, 12)}


def test_call_keywords_and_payload_forms(inproc):
    ep = inproc.ep
    r = ep.call(opcode=1, data=[1, 2], payload=memoryview(b""), timeout=5)
    assert (r.opcode, r.data[:2], r.payload) == (2, (0, 0), b"")
    assert inproc.seen[-1][1:5] == (1, 0, (1, 2, 0, 0), b"")  # no payload at all
    r = ep.call(1, (3,), bytearray(b"xyz"), 5)  # positional, any bytes-like payload
    assert r.payload == b"xyz" and inproc.seen[-1][3:5] == ((3, 0, 0, 0), b"xyz")
    assert ep.call(1, payload=memoryview(b"abc"), timeout=None).payload == b"abc"
    assert ep.call(1, payload=None, caps=[], regions=(), move=False, timeout=5).payload == b""
    n = len(inproc.seen)
    for kw, exc in [
        (dict(timeout=-1), ValueError),
        (dict(timeout=-0.001), ValueError),
        (dict(timeout=float("nan")), ValueError),
        (dict(data=(1, 2, 3, 4, 5)), ValueError),
        (dict(data=(-1,)), ValueError),
        (dict(timeout="1"), TypeError),
        (dict(payload="text"), TypeError),
        (dict(bogus=1), TypeError),
        (dict(opcode=2), TypeError),  # given twice
        (dict(flags=1), ValueError),  # a transport bit
        (dict(flags=0x80000000), ValueError),  # the runtime's own transfer bit
        (dict(flags=-1), ValueError),
        (dict(flags=2**70), ValueError),
    ]:
        with pytest.raises(exc):
            ep.call(1, **kw)
    with pytest.raises(TypeError):
        ep.call()
    with pytest.raises(TypeError):
        ep.call(1, (), b"", None, 0, (), (), False, "one too many")
    for kw, exc in [(dict(timeout=-1), ValueError), (dict(timeout="1"), TypeError),
                    (dict(bogus=1), TypeError),
                    (dict(data=(1, 2, 3, 4, 5)), ValueError), (dict(flags=1), ValueError)]:
        with pytest.raises(exc):
            ep.send_async(1, **kw)
    # None of those sent anything: the next call is the next message the service sees.
    assert ep.call(9, data=(99,), timeout=5).data[3] == 99
    assert [s[1] for s in inproc.seen[n:]] == [9]


def test_user_flags_caps_and_regions_choose_the_path(inproc):
    """flags != 0 (or capabilities / regions to pass) go through the Python reference methods;
    flags=0 with empty caps=[] and regions=() stay native. The service sees the flag bits."""
    ep = inproc.ep
    slow: list[str] = []
    call_slow, send_slow = type(ep)._call_slow, type(ep)._send_async_slow

    def spy_call(*a, **kw):
        slow.append("call")
        return call_slow(*a, **kw)

    def spy_send(*a, **kw):
        slow.append("send")
        return send_slow(*a, **kw)

    # The up-calls are handed to the native base at construction (nothing is looked up by name).
    _core.EndpointBase.__init__(ep, open_lane=type(ep)._lane_for_thread, slow_call=spy_call,
                                slow_send=spy_send, remote_error=type(ep)._remote_error)
    r = ep.call(1, data=(4,), flags=0x10000, timeout=5)
    assert r.data[0] == 0x10000 and inproc.seen[-1][2] == 0x10000
    assert slow == ["call"]
    ep.send_async(5, flags=0x20000 | 0x10000)
    assert inproc.wait_seen(2)
    assert inproc.seen[-1][1:3] == (5, 0x30000) and slow == ["call", "send"]
    slow.clear()
    assert ep.call(1, flags=0, caps=[], regions=(), timeout=5).data[0] == 0
    ep.send_async(6, flags=0, caps=(), regions=[])
    assert inproc.wait_seen(4)
    assert inproc.seen[-1][1:3] == (6, 0)
    assert slow == []  # the plain case never left C
    with pytest.raises(ValueError):
        ep.call(1, flags=0x10000, timeout=-1)  # the Python path checks the timeout as well
    with pytest.raises(TypeError):
        ep.call(1, caps=[object()], timeout=5)  # only Endpoints of this Process travel
    assert slow == ["call", "call"]


def test_front_signatures():
    call = inspect.signature(capbus.Endpoint.call)
    assert list(call.parameters) == ["self", "opcode", "data", "payload", "timeout", "flags", "caps",
                                     "regions", "move"]
    assert [call.parameters[n].default for n in ("data", "payload", "timeout", "flags", "caps",
                                                 "regions", "move")] == [(), b"", None, 0, (), (),
                                                                         False]
    send = inspect.signature(capbus.Endpoint.send_async)
    assert list(send.parameters) == ["self", "opcode", "data", "payload", "flags", "caps", "regions",
                                     "move", "timeout"]
    assert send.parameters["timeout"].default == 0  # never waits for room unless asked
    recv = inspect.signature(capbus.Service.recv)
    assert list(recv.parameters) == ["self", "timeout"]
    assert recv.parameters["timeout"].default is None
    # The native fronts take exactly the arguments of the reference methods they stand for.
    assert (list(inspect.signature(capbus.Endpoint._call_slow).parameters) ==
            list(call.parameters))
    assert (list(inspect.signature(capbus.Endpoint._send_async_slow).parameters) ==
            list(send.parameters))
    assert list(inspect.signature(capbus.Service._recv_slow).parameters) == ["self", "timeout",
                                                                             "corrupt"]
    assert capbus.Endpoint.call.__doc__ and "reply" in capbus.Endpoint.call.__doc__


def test_call_after_close_or_revoke_raises_invalid_capability(kernel, inproc):
    ep = inproc.ep
    assert ep.call(1, timeout=5).opcode == 2  # this thread's lane is in the native cache
    ep.send_async(2)
    ep.close()
    for op in (lambda: ep.call(1, timeout=1), lambda: ep.call(opcode=1),
               lambda: ep.send_async(1), lambda: ep.call(1, flags=0x10000, timeout=1),
               lambda: ep.send_async(1, flags=0x10000)):
        with pytest.raises(capbus.InvalidCapability):
            op()
    got: list = []

    def other_thread() -> None:  # no lane yet: it may not open one on a closed endpoint
        try:
            ep.call(1, timeout=1)
        except BaseException as exc:
            got.append(exc)

    t = threading.Thread(target=other_thread)
    t.start()
    t.join(10)
    assert len(got) == 1 and isinstance(got[0], capbus.InvalidCapability), got
    assert "closed" in str(got[0])
    # A fresh capability to the same service works; revoking it refuses it the same way.
    ep2 = inproc.client.lookup("fronts")
    assert ep2.call(1, data=(3,), timeout=5).data[3] == 3
    ep2.revoke()
    for op in (lambda: ep2.call(1, timeout=1), lambda: ep2.send_async(1)):
        with pytest.raises(capbus.InvalidCapability, match="revoked"):
            op()


def test_received_request_is_the_native_type(kernel):
    from capbus import _core

    assert capbus.Request is _core.Request
    with pytest.raises(TypeError):
        capbus.Request()
    with capbus.connect(kernel.socket_path) as a, capbus.connect(kernel.socket_path) as b:
        svc = b.register("objects")
        got: dict = {}

        def serve() -> None:
            try:
                req = svc.recv(timeout=10)
                got["type"] = type(req)
                got["obj"] = req.object()
                got["trusted"] = req.object(trusted=True)
                with pytest.raises(TypeError):
                    req.reply_object()
                req.reply_object({"echo": got["obj"]}, opcode=42)
                got["replied"] = req.replied
            except BaseException as exc:  # pragma: no cover - reported below
                got["error"] = exc

        t = threading.Thread(target=serve)
        t.start()
        reply = a.lookup("objects").call_object([1, "two", {3: 4.5}], opcode=7, timeout=10)
        t.join(10)
        assert "error" not in got, got
        assert got["type"] is _core.Request and issubclass(got["type"], capbus.Request)
        assert got["obj"] == got["trusted"] == [1, "two", {3: 4.5}]
        assert got["replied"] is True
        assert reply.opcode == 42 and reply.object() == {"echo": [1, "two", {3: 4.5}]}


def test_recv_on_a_closed_service_raises_ipc_error(kernel):
    with capbus.connect(kernel.socket_path) as me:
        svc = me.register("shut")
        with pytest.raises(capbus.Timeout):
            svc.recv(0.01)
        for kw, exc in [(dict(timeout=-1), ValueError), (dict(timeout=float("nan")), ValueError),
                        (dict(bogus=1), TypeError)]:
            with pytest.raises(exc):
                svc.recv(**kw)
        svc.close()
        for timeout in (0.5, 0, None):
            t0 = time.monotonic()
            with pytest.raises(capbus.IpcError, match="closed") as ei:
                svc.recv(timeout=timeout)
            assert type(ei.value) is capbus.IpcError  # not a Timeout: refused at once
            assert time.monotonic() - t0 < 0.4
        with pytest.raises(capbus.IpcError, match="closed"):
            svc.recv()


CLOSE_WAKES_RECV = """
import capbus, threading, time
p = capbus.connect(wait=__import__("sys").argv[1])
svc = p.register("closing")
got = []
def run():
    try:
        svc.recv()                                 # no timeout: an untimed sleep
    except Exception as exc:
        got.append(exc)
t = threading.Thread(target=run, daemon=True)
t.start()
time.sleep(0.3)                                    # asleep by now (the GIL is free meanwhile)
t0 = time.monotonic()
svc.close()
t.join(5)
print("woke", t.is_alive(), type(got[0]).__name__ if got else None,
      round(time.monotonic() - t0, 3), flush=True)
try:
    svc.recv()
except Exception as exc:
    print("after", type(exc).__name__, exc, flush=True)
"""


@pytest.mark.parametrize("wait", ["block", "adaptive"])
def test_close_wakes_an_untimed_recv(kernel, children, wait):
    # In a child: a recv() with no deadline that never woke up would hang the process it is in.
    p = children.start(CLOSE_WAKES_RECV, wait, stdin=subprocess.DEVNULL)
    woke = readline(p, 20).split()
    assert woke[:3] == ["woke", "False", "Cancelled"], woke
    assert float(woke[3]) < 1.0, woke
    assert readline(p, 10) == "after IpcError service 'closing' is closed"
    assert p.wait(10) == 0


def test_huge_timeouts_mean_the_same_on_both_paths(inproc):
    for timeout in (float("inf"), 1e12):
        outcomes = []
        for flags in (0, 0x10000):
            try:
                inproc.ep.call(1, timeout=timeout, flags=flags)
                outcomes.append("ok")
            except Exception as exc:
                outcomes.append(type(exc).__name__)
        assert outcomes[0] == outcomes[1], (timeout, outcomes)


def test_reply_is_the_native_message_type(kernel, inproc):
    """A reply is capbus.Message, the native tuple subclass: tuple semantics, native fields
    (the runtime's own flag bits masked), object(), repr, pickling and subclassing."""
    import pickle

    from capbus import _core

    assert capbus.Message is _core.Message and issubclass(capbus.Message, tuple)
    reply = inproc.ep.call(5, (1, 2, 3, 4), b"abc", timeout=10)
    assert type(reply) is capbus.Message
    assert reply.opcode == 6 and reply.payload == b"abc"
    assert reply.data[:2] == (0, 3) and reply.data[3] == 1 and reply[2:6] == reply.data
    assert type(reply.data) is tuple and reply[0] == 6 and len(reply) == 7
    assert "opcode=6" in repr(reply) and "payload=3 bytes" in repr(reply)
    assert pickle.loads(pickle.dumps(reply)) == reply
    empty = inproc.ep.call(5, (1, 2, 3, 4), timeout=10)
    assert empty.payload == b"" and empty[6] is None and "payload=0 bytes" in repr(empty)

    m = capbus.Message((1, 0x80010000 | 0x40000000 | 0x2, 0, 0, 0, 0, b""))
    assert m.flags == 0x10000  # the runtime's two bits and the core's low bits are not user flags
    assert m.payload == b""

    class Mine(capbus.Message):
        pass

    assert Mine((1, 0, 2, 3, 4, 5, b"x")).data == (2, 3, 4, 5)
    with pytest.raises(IndexError):
        _ = capbus.Message(()).opcode
    with pytest.raises(IndexError):
        _ = capbus.Message((1, 2)).payload


def test_request_fields_are_built_on_receipt(kernel):
    """.opcode, .data and .payload are plain object fields of the native Request: the same
    objects on every read, b'' when there is no payload, read-only."""
    with capbus.connect(kernel.socket_path) as a, capbus.connect(kernel.socket_path) as b:
        svc = b.register("fields")
        got: dict = {}

        def serve() -> None:
            try:
                for _ in range(2):
                    req = svc.recv(timeout=10)
                    got.setdefault("seen", []).append((req.opcode, req.data, req.payload))
                    got["same"] = req.data is req.data and req.payload is req.payload
                    for name in ("opcode", "data", "payload"):
                        try:
                            setattr(req, name, 1)
                        except AttributeError:
                            continue
                        got["writable"] = name
                    req.reply(req.opcode, req.data, req.payload)
            except BaseException as exc:  # pragma: no cover - reported below
                got["error"] = exc

        t = threading.Thread(target=serve)
        t.start()
        ep = a.lookup("fields", timeout=10)
        assert ep.call(2**32 - 1, (2**64 - 1, 0, 1, 2), timeout=10).data == (2**64 - 1, 0, 1, 2)
        assert ep.call(0, payload=b"xy", timeout=10).payload == b"xy"
        t.join(10)
        assert "error" not in got and "writable" not in got, got
        assert got["same"] is True
        assert got["seen"] == [(2**32 - 1, (2**64 - 1, 0, 1, 2), b""), (0, (0, 0, 0, 0), b"xy")]
