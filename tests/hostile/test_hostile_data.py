"""A hostile client on the data plane: it maps every fd it was given, read-write wherever it can
(also by reopening through /proc), scribbles over rings, arenas, indices and the doorbell, and
keeps calling. The server must neither crash nor hang nor fail its other clients."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest
from _core_util import channel_layout
from conftest import readline

import capbus

SERVER = """
import capbus
p = capbus.connect(wait="adaptive")
svc = p.register("target")
print("ready", flush=True)
svc.serve(lambda req: (req.opcode + 1, req.data, req.payload))
"""

HOSTILE = """
import capbus, mmap, os, random, sys
from capbus import _core
from capbus._protocol import frames

p = capbus.connect()
ep = p.lookup("target")
ep.call(1, timeout=5)                           # a healthy first call: the server maps our lane
reply, fds = p._request_fds(frames.OpenChannel(ep.handle))   # bypass the library: raw fds
chan_fd, ctrl_fd, bell_fd, bell_event_fd, reply_event_fd, bell_sleep_fd, reply_sleep_fd = fds
report = []

# The control page: no writable mapping, not even through a fresh open of /proc/self/fd/N.
for how, fd in (("fd", ctrl_fd), ("proc", os.open(f"/proc/self/fd/{ctrl_fd}", os.O_RDWR))):
    try:
        mmap.mmap(fd, _core.CTRL_SIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        report.append(f"ctrl-writable-{how}")
    except OSError:
        pass
    try:
        os.pwrite(fd, b"\\x00" * 8, 0)
        report.append(f"ctrl-write-{how}")
    except OSError:
        pass
    try:
        os.ftruncate(fd, 0)
        report.append(f"ctrl-truncate-{how}")
    except OSError:
        pass
# The channel and doorbell cannot be shrunk under the server (that would SIGBUS it).
for name, fd in (("chan", chan_fd), ("bell", bell_fd)):
    try:
        os.ftruncate(fd, 4096 if name == "chan" else 0)
        report.append(f"{name}-truncate")
    except OSError:
        pass
print("seals", ",".join(report) or "ok", flush=True)

lane = _core.Lane(chan_fd, ctrl_fd, bell_fd, reply.index, reply.nslots, reply.arena_size, 1, 50000,
                  bell_event_fd=bell_event_fd, reply_event_fd=reply_event_fd,
                  bell_sleep_fd=bell_sleep_fd, reply_sleep_fd=reply_sleep_fd)
lane.call(1, 1, 4, (7,), None, 2_000_000_000)             # this lane works first
size = _core.channel_size(reply.nslots, reply.arena_size)
chan = mmap.mmap(os.open(f"/proc/self/fd/{chan_fd}", os.O_RDWR), size)
bell = mmap.mmap(bell_fd, _core.DOORBELL_SIZE)
rng = random.Random(int(sys.argv[1]))
resp = _core.resp_ring_off(reply.nslots)
targets = [0, _core.REQ_RING_OFF, _core.REQ_RING_OFF + 64, resp, resp + 64,
           _core.REQ_RING_OFF + 256, size - reply.arena_size * 2, size - reply.arena_size]
outcomes = set()
for round_ in range(200):
    for off in rng.sample(targets, 3):
        n = rng.choice([8, 64, 512])
        chan[off:off + n] = os.urandom(n)
    bell[0:640] = os.urandom(640)
    try:
        lane.call(1, 1, 4, (round_,), os.urandom(rng.choice([0, 100, 5000])), 200_000_000)
        outcomes.add("ok")
    except capbus.IpcError as exc:
        outcomes.add(type(exc).__name__)
    # and the library path too, through a fresh lane of its own
    try:
        ep.call(1, data=(round_,), timeout=0.2)
    except capbus.IpcError as exc:
        outcomes.add("lib-" + type(exc).__name__)
print("outcomes", ",".join(sorted(outcomes)), flush=True)
"""

HEALTHY = """
import capbus, time
p = capbus.connect()
ep = p.lookup("target")
end = time.monotonic() + 4
n = 0
while time.monotonic() < end:
    r = ep.call(5, data=(n,), payload=b"x" * (n % 300), timeout=2)
    assert r.opcode == 6 and r.data == (n, 0, 0, 0) and r.payload == b"x" * (n % 300), r
    n += 1
print("healthy", n, flush=True)
"""


def test_hostile_client_cannot_hurt_server_or_others(kernel, children, caplog):
    server = children.start(SERVER, stdin=subprocess.DEVNULL)
    assert readline(server) == "ready"
    healthy = children.start(HEALTHY, stdin=subprocess.DEVNULL)
    hostiles = [children.start(HOSTILE, str(seed), stdin=subprocess.DEVNULL) for seed in (1, 2)]
    for h in hostiles:
        line = readline(h, 20)
        assert line == "seals ok", line
    for h in hostiles:
        line = readline(h, 60)
        assert line.startswith("outcomes"), line
    line = readline(healthy, 30)
    assert line.startswith("healthy"), line
    assert int(line.split()[1]) > 100
    assert server.poll() is None, "the server died"
    # The server still answers a newcomer promptly.
    with capbus.connect(kernel.socket_path) as me:
        t0 = time.monotonic()
        assert me.lookup("target").call(1, data=(3,), timeout=2).data == (3, 0, 0, 0)
        assert time.monotonic() - t0 < 1
    assert any("reports garbage" in r.getMessage() for r in caplog.records)


def test_control_page_is_read_only_for_the_server_too(kernel):
    """The server side gets its fds through events; it may not write the control page either."""
    import mmap
    import os

    from capbus._kernel.shm import ChannelShm

    shm = ChannelShm(16, 1 << 16, 42)
    try:
        for fd in (shm.ctrl_fd, os.open(f"/proc/self/fd/{shm.ctrl_fd}", os.O_RDWR)):
            try:
                mmap.mmap(fd, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE)
                raise AssertionError("writable mapping of a sealed control page")
            except PermissionError:
                pass
        ro = mmap.mmap(shm.ctrl_fd, 4096, prot=mmap.PROT_READ)
        from capbus import _core

        assert _core.atomic_load_u64(ro, _core.CTRL_SENDER_ID_OFF) == 42
        shm.set_state(_core.STATE_REVOKED)  # the kernel's own mapping still writes
        assert _core.atomic_load_u32(ro, _core.CTRL_STATE_OFF) == _core.STATE_REVOKED
        ro.close()
    finally:
        shm.close()


def test_service_recv_goes_on_after_a_corrupt_channel(kernel):
    """Service.recv is native; a CorruptChannel goes to the Python path, which reports the channel
    and goes on serving the others, within the caller's timeout (or none)."""
    import mmap
    import os
    import struct

    from conftest import wait_for

    from capbus import _core
    from capbus._protocol import frames

    with capbus.connect(kernel.socket_path) as server, \
            capbus.connect(kernel.socket_path) as hostile, \
            capbus.connect(kernel.socket_path) as healthy:
        svc = server.register("victim")
        ep_ok = healthy.lookup("victim")
        ep_h = hostile.lookup("victim")
        ep_ok.send_async(1, data=(1,))  # the healthy client's lane (opened on first use)
        assert svc.recv(timeout=5).data[0] == 1
        mapped = []

        def scribbled_channel() -> None:
            """A raw channel of the hostile client: one valid message, then its tail far ahead."""
            reply, fds = hostile._request_fds(frames.OpenChannel(ep_h.handle))
            chan_fd, ctrl_fd, bell_fd, bell_efd, reply_efd, *_ = fds
            try:
                lane = _core.Lane(chan_fd, ctrl_fd, bell_fd, reply.index, reply.nslots,
                                  reply.arena_size, _core.WAIT_BLOCK)
                assert wait_for(lambda: reply.index in svc._set, 5)
                lane.send(ep_h.handle, 1, 0, (666,))
                fd = os.open(f"/proc/self/fd/{chan_fd}", os.O_RDWR)
                m = mmap.mmap(fd, _core.channel_size(reply.nslots, reply.arena_size))
                os.close(fd)
                lay = channel_layout(reply.nslots, reply.arena_size)
                struct.pack_into("<Q", m, lay["req_tail"], 10_000)
                mapped.append((m, lane))
            finally:
                for fd in fds:
                    os.close(fd)

        # Timed: the garbage is reported, then the wait goes on for what is left of the timeout.
        scribbled_channel()
        t0 = time.monotonic()
        with pytest.raises(capbus.Timeout):
            svc.recv(timeout=0.3)
        assert 0.25 <= time.monotonic() - t0 < 1.5
        assert svc.corrupt_channels == 1
        # No timeout: a healthy message waits behind (or before) a second corrupt channel.
        scribbled_channel()
        ep_ok.send_async(2, data=(2,))
        req = svc.recv()
        assert (req.opcode, req.data[0], req.sender) == (2, 2, healthy.id)
        with pytest.raises(capbus.Timeout):
            svc.recv(timeout=0.2)
        assert svc.corrupt_channels == 2
        # The service still serves calls.
        got = {}
        t = threading.Thread(target=lambda: got.setdefault("r", ep_ok.call(3, timeout=5)))
        t.start()
        req = svc.recv(timeout=5)
        req.reply(4, (5,))
        t.join(5)
        assert got["r"].opcode == 4 and got["r"].data[0] == 5
        for m, lane in mapped:
            m.close()
            lane.close()


def test_serve_survives_a_client_scribbling_its_response_ring(kernel, children):
    import mmap
    import os
    import struct

    from capbus import _core
    from capbus._protocol import frames

    server = children.start(SERVER, stdin=subprocess.DEVNULL)
    assert readline(server) == "ready"
    with capbus.connect(kernel.socket_path) as hostile, capbus.connect(kernel.socket_path) as me:
        ep_h = hostile.lookup("target")
        reply, fds = hostile._request_fds(frames.OpenChannel(ep_h.handle))
        chan_fd, ctrl_fd, bell_fd, bell_efd, reply_efd, *_ = fds
        try:
            lane = _core.Lane(chan_fd, ctrl_fd, bell_fd, reply.index, reply.nslots,
                              reply.arena_size, _core.WAIT_BLOCK)
            assert lane.call(ep_h.handle, 1, 0, (7,), b"x" * 100, 5 * 10**9)[0] == 2  # works
            fd = os.open(f"/proc/self/fd/{chan_fd}", os.O_RDWR)
            m = mmap.mmap(fd, _core.channel_size(reply.nslots, reply.arena_size))
            os.close(fd)
            lay = channel_layout(reply.nslots, reply.arena_size)
            struct.pack_into("<Q", m, lay["resp_arena_released"], 2**40)  # nonsense
            with pytest.raises(capbus.IpcError):  # the reply (with a payload) cannot be written
                lane.call(ep_h.handle, 1, 0, (8,), b"y" * 100, 10**9)
            m.close()
            lane.close()
        finally:
            for fd in fds:
                os.close(fd)
        time.sleep(0.2)
        assert server.poll() is None, f"the server died: {server.stderr.read()[-800:]}"
        assert me.lookup("target").call(1, data=(3,), timeout=2).data == (3, 0, 0, 0)
