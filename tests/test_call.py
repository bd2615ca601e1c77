"""The synchronous mailbox over the native data plane, between real processes."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import time
import zlib

import pytest
from conftest import readline

import capbus

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
