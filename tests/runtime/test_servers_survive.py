"""Servers outlive their clients and their handlers: a client killed mid-call, a client that
scribbles its response ring, a handler that raises or returns garbage, a request dropped without
a reply. And the values Python users write: numpy arrays as payloads, numpy integers as data.

Every server here is a real process running the loop a user would write; the hostile clients are
real processes too. The server must go on serving an honest client afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from conftest import readline

import capbus

# The loop the README teaches, nothing more: recv, reply. It prints what each reply returned.
PLAIN = """
import capbus, time
p = capbus.connect()
svc = p.register("plain")
print("ready", flush=True)
while True:
    req = svc.recv()
    if req.opcode == 1:        # slow: the caller may be killed meanwhile
        time.sleep(0.5)
    if req.opcode == 2:        # dropped without a reply
        del req
        continue
    if req.opcode == 3:        # released without a reply
        req.release()
        continue
    if req.opcode == 4:        # the application's own error code 7
        req.reply_error(7, "seven")
        continue
    if req.opcode == 9:
        req.reply(0, (svc.corrupt_channels,))
        continue
    ok = req.reply(req.opcode + 100, req.data, req.payload)
    if not ok:
        print("dropped", req.opcode, flush=True)
"""


def _honest_calls(ep: capbus.Endpoint, n: int = 20) -> None:
    for i in range(n):
        r = ep.call(10, data=(i,), payload=b"p" * i, timeout=5)
        assert (r.opcode, r.data[0], bytes(r.payload or b"")) == (110, i, b"p" * i)


def test_plain_loop_survives_a_client_killed_mid_call(kernel, children):
    server = children.start(PLAIN, stdin=subprocess.DEVNULL)
    assert readline(server) == "ready"
    victim = children.start("""
        import capbus
        p = capbus.connect()
        ep = p.lookup("plain", timeout=5)
        print("calling", flush=True)
        ep.call(1, timeout=30)
    """)
    assert readline(victim) == "calling"
    time.sleep(0.2)  # the server is inside the slow request now
    victim.kill()
    victim.wait(5)
    assert readline(server, 10) == "dropped 1"  # reply() said so; it did not raise
    with capbus.connect(kernel.socket_path) as me:
        _honest_calls(me.lookup("plain", timeout=5))
    assert server.poll() is None, server.stderr.read()


def test_dropped_or_released_request_fails_its_caller_at_once(kernel, children):
    server = children.start(PLAIN, stdin=subprocess.DEVNULL)
    assert readline(server) == "ready"
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("plain", timeout=5)
        for op in (2, 3):
            t0 = time.monotonic()
            with pytest.raises(capbus.NoReply, match="without replying"):
                ep.call(op, timeout=20)
            assert time.monotonic() - t0 < 10  # at once, not at the timeout
            with pytest.raises(capbus.NoReply):
                ep.call(op)  # untimed: it would hang for ever without NoReply
        _honest_calls(ep)
    assert server.poll() is None


def test_reply_error_is_the_applications_own_code_space(kernel, children):
    server = children.start(PLAIN, stdin=subprocess.DEVNULL)
    assert readline(server) == "ready"
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("plain", timeout=5)
        with pytest.raises(capbus.RemoteError) as info:
            ep.call(4, timeout=5)  # 7 is also MessageTooLarge's code: never mistaken for it
        assert not isinstance(info.value, capbus.MessageTooLarge)
        assert (info.value.code, info.value.text) == (7, "seven")
        assert "seven" in str(info.value)


# A raw lane the hostile client drives itself, so that it can scribble its response ring.
SCRIBBLER = """
import capbus, mmap, os
from capbus import _core
from capbus._protocol import frames
p = capbus.connect()
ep = p.lookup("plain", timeout=5)
reply, fds = p._request_fds(frames.OpenChannel(ep.handle))
chan_fd, ctrl_fd, bell_fd, bell_event_fd, reply_event_fd, bell_sleep_fd, reply_sleep_fd = fds
lane = _core.Lane(chan_fd, ctrl_fd, bell_fd, reply.index, reply.nslots, reply.arena_size, 1, 50000,
                  bell_event_fd=bell_event_fd, reply_event_fd=reply_event_fd,
                  bell_sleep_fd=bell_sleep_fd, reply_sleep_fd=reply_sleep_fd)
for i in range(reply.nslots):     # honest calls: the server's cached view of our head runs out
    lane.call(1, 10, 0, (i,), None, 5_000_000_000)
chan = mmap.mmap(os.open(f"/proc/self/fd/{chan_fd}", os.O_RDWR),
                 _core.channel_size(reply.nslots, reply.arena_size))
head = _core.resp_ring_off(reply.nslots) + _core.RING_HEAD_OFF
chan[head:head + 8] = (1 << 60).to_bytes(8, "little")   # our response ring's head, far past its tail
try:
    lane.call(1, 10, 0, (0,), None, 2_000_000_000)
    print("outcome ok", flush=True)
except capbus.IpcError as exc:
    print("outcome", type(exc).__name__, flush=True)
"""


def test_a_scribbled_response_ring_drops_that_channel_only(kernel, children):
    server = children.start(PLAIN, stdin=subprocess.DEVNULL)
    assert readline(server) == "ready"
    hostile = children.start(SCRIBBLER, stdin=subprocess.DEVNULL)
    line = readline(hostile, 60)
    assert line.startswith("outcome") and line != "outcome ok", line
    assert readline(server, 10) == "dropped 10"  # the reply found the ring corrupt: dropped
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("plain", timeout=5)
        _honest_calls(ep)
        assert ep.call(9, timeout=5).data[0] == 1  # reported by the next recv, as garbage is
    assert server.poll() is None, server.stderr.read()


SERVE = """
import capbus, logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(message)s")
p = capbus.connect()
svc = p.register("served")

def handler(req):
    kind = req.opcode
    if kind == 1:
        return "ok"                     # not a valid result
    if kind == 2:
        return {"a": 1}                 # nor this
    if kind == 3:
        raise ValueError("bad value")
    if kind == 4:
        raise capbus.PermissionDenied("not you")
    if kind == 5:
        return (1, (2**64,))            # a value the reply cannot carry
    if kind == 6:
        req.release()                   # dropped by the handler without a reply
        return None
    return (kind + 100, req.data)

print("ready", flush=True)
svc.serve(handler)
"""


def test_serve_answers_a_failing_handler_with_an_error_and_goes_on(kernel, children):
    server = children.start(SERVE, stdin=subprocess.DEVNULL)
    assert readline(server) == "ready"
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("served", timeout=5)
        for op in (1, 2, 5):
            with pytest.raises(capbus.RemoteError) as info:
                ep.call(op, timeout=5)
            assert info.value.code is None and info.value.remote_type in ("TypeError", "ValueError")
        with pytest.raises(capbus.RemoteError) as info:
            ep.call(3, timeout=5)
        assert (info.value.remote_type, info.value.text) == ("ValueError", "bad value")
        with pytest.raises(capbus.PermissionDenied, match="not you"):
            ep.call(4, timeout=5)
        with pytest.raises(capbus.NoReply):
            ep.call(6, timeout=5)
        for i in range(20):
            assert ep.call(10, data=(i,), timeout=5).data[0] == i
    assert server.poll() is None
    server.send_signal(signal.SIGTERM)
    server.wait(10)
    err = server.stderr.read()
    assert err.count("WARNING service 'served': handler failed") == 5, err


def test_serve_log_cannot_be_flooded(kernel, children):
    server = children.start(SERVE, stdin=subprocess.DEVNULL)
    assert readline(server) == "ready"
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("served", timeout=5)
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < 1.0:
            with pytest.raises(capbus.RemoteError):
                ep.call(3, timeout=5)
            n += 1
    server.send_signal(signal.SIGTERM)
    server.wait(10)
    lines = server.stderr.read().count("handler failed")
    assert n > 40, n  # enough failures to show the bound
    assert lines <= 25, lines  # 10 a second, with a burst of 10


# ---- values as Python users write them ------------------------------------------------------


ECHO = """
import capbus
p = capbus.connect()
svc = p.register("echo")
print("ready", flush=True)
svc.serve(lambda req: (1, req.data, bytes(req.payload)))
"""


def test_numpy_payloads_are_their_bytes_and_numpy_ints_are_data(kernel, children):
    np = pytest.importorskip("numpy")
    server = children.start(ECHO, stdin=subprocess.DEVNULL)
    assert readline(server) == "ready"
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("echo", timeout=5)
        for arr in (np.zeros(1), np.zeros(8), np.arange(12, dtype=np.int32).reshape(3, 4),
                    np.ones((2, 2), dtype=np.complex128), np.zeros(0), np.array(True),
                    np.arange(100_000, dtype=np.uint8)):
            for send in (lambda **kw: ep.call(5, **kw), lambda **kw: ep._call_slow(5, **kw)):
                r = send(payload=arr, timeout=5)
                assert bytes(r.payload or b"") == arr.tobytes(), arr
        with pytest.raises(TypeError, match="contiguous"):
            ep.call(5, payload=np.arange(10)[::2], timeout=5)
        with pytest.raises(TypeError, match="bytes-like"):
            ep.call(5, payload="text", timeout=5)
        r = ep.call(5, data=(np.int64(5), np.uint64(2**64 - 1), np.int8(1), True), timeout=5)
        assert r.data == (5, 2**64 - 1, 1, 1)
        r = ep.call(5, data=[np.int32(7)], timeout=5)  # a list with numpy ints
        assert r.data[0] == 7
        for bad, exc in (((5.0,), TypeError), ((np.float64(1),), TypeError), ((np.int64(-1),), ValueError),
                         ((2**64,), ValueError)):
            with pytest.raises(exc):
                ep.call(5, data=bad, timeout=5)
        ep.send_async(5, data=(np.int64(3),), payload=np.zeros(3))  # one-way too

        class Shrinker:  # __index__ that empties the list being read: no crash, a clear result
            def __init__(self, lst):
                self.lst = lst

            def __index__(self):
                self.lst.clear()
                return 4

        data: list = [1, 2]
        data.append(Shrinker(data))
        assert ep.call(5, data=data, timeout=5).data == (1, 2, 4, 0)
    assert server.poll() is None


def test_plain_loop_survives_clients_killed_again_and_again(kernel, children):
    # Clients killed over and over while the plain loop replies: the loop never raises.
    server = children.start(PLAIN, stdin=subprocess.DEVNULL)
    assert readline(server) == "ready"
    for _ in range(5):
        victim = children.start("""
            import capbus
            p = capbus.connect()
            ep = p.lookup("plain", timeout=5)
            print("calling", flush=True)
            while True:
                ep.call(1, timeout=30)
        """)
        assert readline(victim) == "calling"
        time.sleep(0.1)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(5)
    with capbus.connect(kernel.socket_path) as me:
        _honest_calls(me.lookup("plain", timeout=5))
    assert server.poll() is None, server.stderr.read()
