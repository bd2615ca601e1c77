"""Tests of the capbus._core data plane: Lane (client end) and ServerSet (service end).

The tests create memfds themselves, the way the kernel does, and run peers as real processes
(tests/_ring_stress_child.py) where it matters. Every blocking call has a timeout.
"""

from __future__ import annotations

import os
import struct
import threading
import time
import zlib

import pytest
from _core_util import Chan, channel_layout, make_chan, reap, result, spawn  # noqa: E402

from capbus import _core  # noqa: E402
from capbus._errors import (  # noqa: E402
    Cancelled,
    InvalidCapability,
    MessageTooLarge,
    PeerDied,
    ProtocolError,
    Timeout,
    WouldBlock,
)
from capbus._kernel.shm import ChannelShm, make_doorbell  # noqa: E402

OP_ECHO, OP_STOP, OP_SLOW = 1, 2, 3
SEC = 1_000_000_000
# Set CAPBUS_STRESS_SCALE=0.1 for a quick run of the two big stress tests.
SCALE = float(os.environ.get("CAPBUS_STRESS_SCALE", "1"))


# ---- fixtures ----------------------------------------------------------------------------------




def lane(ch: Chan, db: int, mode: int = 1) -> _core.Lane:
    return _core.Lane(ch.chan, ch.ctrl, db, ch.index, ch.nslots, ch.arena, mode)


def server(db: int, *chs: Chan, mode: int = 1) -> _core.ServerSet:
    s = _core.ServerSet(db, mode)
    for c in chs:
        s.add(c.index, c.chan, c.ctrl, c.nslots, c.arena, 1000 + c.index)
    return s


# ---- constants and layout ----------------------------------------------------------------------


def test_layout_constants():
    c = _core
    assert c.SLOT_SIZE == 64 and c.SMALL_MESSAGE_SIZE == 48
    assert (c.SLOT_CAPABILITY_OFF, c.SLOT_OPCODE_OFF, c.SLOT_FLAGS_OFF, c.SLOT_DATA_OFF) == (
        0, 8, 12, 16)
    assert (c.SLOT_TAG_OFF, c.SLOT_PAYLOAD_LEN_OFF, c.SLOT_PAYLOAD_OFF_OFF) == (48, 56, 60)
    assert c.LARGE_MSG_SIZE == 128 and c.LM_INLINE_OFF == 56 and c.LM_INLINE_SIZE == 64
    assert (c.LM_TOTAL_SIZE_OFF, c.LM_CHECKSUM_OFF, c.LM_REGION_BASE_OFF, c.LM_REGION_SIZE_OFF) == (
        16, 24, 32, 40)
    assert (c.CTRL_SIZE, c.CTRL_STATE_OFF, c.CTRL_GENERATION_OFF, c.CTRL_EXPIRY_OFF) == (
        4096, 0, 4, 8)
    assert (c.CTRL_MAX_MESSAGE_SIZE_OFF, c.CTRL_RATE_LIMIT_OFF, c.CTRL_BANDWIDTH_OFF) == (16, 24, 32)
    assert (c.CTRL_RIGHTS_OFF, c.CTRL_SENDER_ID_OFF) == (40, 64)
    assert (c.STATE_OPEN, c.STATE_REVOKED, c.STATE_PEER_DEAD, c.STATE_CLOSED) == (1, 2, 3, 4)
    assert (c.DOORBELL_SIZE, c.DB_SEQ_OFF, c.DB_SERVER_SLEEPING_OFF, c.DB_BITMAP_OFF) == (
        4096, 0, 64, 128)
    assert c.MAX_CHANNELS == 4096 and c.DB_BITMAP_OFF + c.MAX_CHANNELS // 8 <= c.DOORBELL_SIZE
    assert (c.RING_TAIL_OFF, c.RING_HEAD_OFF, c.RING_CONSUMER_SLEEPING_OFF) == (0, 64, 72)
    assert (c.RING_ARENA_RELEASED_OFF, c.RING_SLOTS_OFF) == (128, 256)
    assert c.CHAN_MAGIC.to_bytes(8, "little") == c.CHAN_MAGIC_BYTES == b"CAPBUSC1"
    assert c.CHAN_CANCEL_BELOW_OFF == 64 and c.REQ_RING_OFF == c.CHAN_HEADER_SIZE == 4096
    flags = [c.FLAG_LARGE, c.FLAG_CHECKSUM, c.FLAG_REPLY_EXPECTED, c.FLAG_ERROR, c.FLAG_LOANED,
             c.FLAG_IPC_ERROR]
    assert len(set(flags)) == 6 and all(f & (f - 1) == 0 for f in flags)
    assert not any(f & c.FLAG_USER_MASK for f in flags)
    prio = c.FLAG_PRIO | c.FLAG_PRIO_RR | c.FLAG_PRIO_MASK  # the runtime's priority stamp
    assert not prio & (sum(flags) | c.FLAG_USER_MASK)
    assert sum(flags) | prio | c.FLAG_USER_MASK == c.FLAG_KNOWN_MASK
    assert (c.WAIT_SPIN, c.WAIT_ADAPTIVE, c.WAIT_BLOCK) == (0, 1, 2)
    # Added for the event-loop hand-shakes, refused counts and limits: each in the cache line of
    # the side that writes it.
    assert c.DB_EVENT_WANTED_OFF == 68 and c.DB_SERVER_SLEEPING_OFF < 68 < c.DB_BITMAP_OFF
    assert c.RING_CONSUMER_EVENT_OFF == 76 and c.RING_HEAD_OFF <= 76 < c.RING_ARENA_RELEASED_OFF
    assert c.CHAN_REFUSED_OFF == 128 and c.CHAN_REFUSED_OFF // 64 != c.CHAN_CANCEL_BELOW_OFF // 64
    assert c.CHAN_REFUSED_OFF + 8 <= c.CHAN_HEADER_SIZE and c.CHAN_REFUSED_OFF >= c.CHAN_ARENA_SIZE_OFF + 8
    assert (c.CTRL_FLAGS_OFF, c.CTRL_F_ENFORCE, c.BATCH_MAX) == (44, 1, 1024)
    lay = channel_layout(256, 1 << 20)
    assert lay["refused"] == c.CHAN_REFUSED_OFF
    assert lay["resp_consumer_event"] == lay["resp_ring"] + c.RING_CONSUMER_EVENT_OFF


@pytest.mark.parametrize("nslots,arena", [(256, 128 << 20), (1, 4096), (1024, 1 << 20), (64, 8192)])
def test_channel_layout(nslots, arena):
    lay = channel_layout(nslots, arena)
    ring = 256 + 64 * nslots
    assert lay["ring_size"] == ring
    assert lay["req_ring"] == 4096 and lay["resp_ring"] == 4096 + ring
    assert lay["resp_tail"] == _core.resp_ring_off(nslots) + _core.RING_TAIL_OFF
    assert lay["resp_consumer_sleeping"] == lay["resp_ring"] + 72
    assert lay["req_arena"] % 4096 == 0 and lay["req_arena"] >= 4096 + 2 * ring
    assert lay["resp_arena"] == lay["req_arena"] + arena
    assert lay["size"] == _core.channel_size(nslots, arena) == lay["resp_arena"] + arena
    assert _core.max_payload(arena) == arena - 128
    if nslots == 256:
        assert lay["resp_tail"] == _core.RESP_TAIL_OFF


@pytest.mark.parametrize("nslots,arena", [(0, 4096), (3, 4096), (1 << 17, 4096), (8, 4095),
                                          (8, 0), (8, (1 << 32) + 4096)])
def test_bad_geometry(nslots, arena):
    with pytest.raises(ValueError):
        _core.channel_size(nslots, arena)


def test_create_channel_header_and_seals():
    import fcntl

    shm = ChannelShm(64, 8192, 0)  # as the kernel makes a channel
    fd = shm.chan_fd
    try:
        assert os.fstat(fd).st_size == _core.channel_size(64, 8192)
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_SEAL
        hdr = os.pread(fd, 24, 0)
        assert hdr[:8] == b"CAPBUSC1"
        assert struct.unpack_from("<IIQ", hdr, 8) == (_core.CHAN_VERSION, 64, 8192)
    finally:
        shm.close()


def test_unsealed_or_short_memfd_rejected(db, chans):
    ch = chans(1)
    bad = os.memfd_create("unsealable", os.MFD_CLOEXEC)  # no MFD_ALLOW_SEALING
    os.ftruncate(bad, _core.channel_size(256, 1 << 20))
    short = make_doorbell()  # a sealed page: far too short for a channel
    try:
        with pytest.raises(ValueError, match="sealed"):
            _core.Lane(bad, ch.ctrl, db, 1, 256, 1 << 20)
        with pytest.raises(ValueError, match="bytes"):
            _core.Lane(short, ch.ctrl, db, 1, 256, 1 << 20)
        with pytest.raises(ValueError):
            _core.Lane(ch.chan, ch.ctrl, db, 4096, 256, 1 << 20)
        s = _core.ServerSet(db)
        with pytest.raises(ValueError):
            s.add(1, short, ch.ctrl, 256, 1 << 20)
        with pytest.raises(ValueError):
            s.add(4096, ch.chan, ch.ctrl, 256, 1 << 20)
        s.add(1, ch.chan, ch.ctrl, 256, 1 << 20)
        with pytest.raises(ValueError):
            s.add(1, ch.chan, ch.ctrl, 256, 1 << 20)
        assert 1 in s and len(s) == 1
        s.remove(1)
        with pytest.raises(KeyError):
            s.remove(1)
    finally:
        os.close(bad)
        os.close(short)


def test_kernel_style_sealed_control_page(db, chans):
    # The kernel seals a control page with F_SEAL_FUTURE_WRITE after mapping it, and may hand
    # out a read-only fd: both ends map it PROT_READ, so that must work.
    import fcntl

    ch = chans(1)
    fcntl.fcntl(ch.ctrl, fcntl.F_ADD_SEALS, 0x0010 | fcntl.F_SEAL_SEAL)  # F_SEAL_FUTURE_WRITE
    ro = os.open(f"/proc/self/fd/{ch.ctrl}", os.O_RDONLY)
    try:
        s = _core.ServerSet(db)
        s.add(1, ch.chan, ro, ch.nslots, ch.arena)
        ln = _core.Lane(ch.chan, ro, db, 1, ch.nslots, ch.arena)
    finally:
        os.close(ro)
    ln.send(0, 0, 0, (5,))
    assert s.recv(SEC).data[0] == 5
    ch.set_state(_core.STATE_CLOSED)  # the kernel's own (earlier) writable mapping still works
    with pytest.raises(InvalidCapability):
        ln.send(0, 0, 0, (5,))


def test_crc32_matches_zlib():
    for n in (0, 1, 7, 8, 9, 63, 64, 65, 1000, 4096, 100_003):
        data = os.urandom(n)
        assert _core.crc32(data) == zlib.crc32(data)
        assert _core.crc32(data, 12345) == zlib.crc32(data, 12345)
    assert _core.crc32(memoryview(b"xhello")[1:]) == zlib.crc32(b"hello")


# ---- in-process basics -------------------------------------------------------------------------


def fields(r) -> tuple:
    return (r.index, r.tag, r.capability, r.opcode, r.flags, r.data, r.payload, r.sender,
            r.expects_reply)


def test_send_recv_fields_and_sender(db, chans):
    ch = chans(7, sender=4242)
    s = _core.ServerSet(db)
    s.add(7, ch.chan, ch.ctrl, 256, 1 << 20)  # sender_id from the control page
    ln = lane(ch, db)
    ln.send(2**64 - 1, 2**32 - 1, 0x10000 | _core.FLAG_CHECKSUM, (1, 2**64 - 1, 3, 4), b"abc")
    ln.send(5, 6, 0, [7, 8, 9, 10])
    ln.send(5, 6, _core.FLAG_CHECKSUM, (7,), b"")
    r = s.recv(SEC)
    assert isinstance(r, _core.Request)
    # flags: only the user bits (the transport's own bits stay inside the core)
    assert fields(r) == (7, 1, 2**64 - 1, 2**32 - 1, 0x10000, (1, 2**64 - 1, 3, 4), b"abc", 4242,
                         False)
    assert fields(s.recv(SEC)) == (7, 2, 5, 6, 0, (7, 8, 9, 10), b"", 4242, False)
    assert fields(s.recv(SEC)) == (7, 3, 5, 6, 0, (7, 0, 0, 0), b"", 4242, False)
    with pytest.raises(Timeout):
        s.recv(0)
    assert ln.last_tag == 3
    assert "Request from 4242 opcode=4294967295" in repr(r)


def test_call_in_process_with_server_thread(db, chans):
    ch = chans(3)
    s = server(db, ch)
    ln = lane(ch, db)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                r = s.recv(SEC // 10)
            except Timeout:
                continue
            d0, d1, d2, d3 = r.data
            s.reply(r.index, r.tag, r.opcode + 1, r.flags | _core.FLAG_CHECKSUM,
                    (d0 + 1, r.capability, r.sender, d3), r.payload or None)

    t = threading.Thread(target=serve)
    t.start()
    try:
        assert ln.call(9, 10, 0, (1, 2, 3, 4)) == (11, 0, 2, 9, 1003, 4, None)
        r = ln.call(9, 10, _core.FLAG_CHECKSUM | 0x20000, (1, 2, 3, 4), b"x" * 100, timeout_ns=SEC)
        assert r == (11, _core.FLAG_CHECKSUM | _core.FLAG_LARGE | 0x20000, 2, 9, 1003, 4,
                     b"x" * 100)
        assert ln.call(9, 10, 0, [1, 2, 3, 4], payload=b"y")[6] == b"y"
        assert ln.call(capability=9, opcode=10, flags=0, data=(), timeout_ns=SEC)[:3] == (11, 0, 1)
    finally:
        stop.set()
        t.join(10)


def test_bad_arguments_write_nothing(db, chans):
    ch = chans(1, nslots=8, arena=8192)
    ln = lane(ch, db)
    m = ch.map()
    lay = ch.layout()
    for args in [
        (2**64, 0, 0, ()),
        (0, 2**32, 0, ()),
        (0, 0, 0x100, ()),  # unknown flag bit
        (0, 0, 0, (-1,)),
        (0, 0, 0, (0, 0, 0, 2**64)),
        (0, 0, 0, (1, 2, 3, 4, 5)),  # more than four data values
    ]:
        with pytest.raises(ValueError):
            ln.send(*args)
        with pytest.raises(ValueError):
            ln.call(*args, None, 1000)
        with pytest.raises(ValueError):
            ln.call_start(*args)
        with pytest.raises(ValueError):
            ln.send_many(args[0], args[2], [(args[1], args[3])])
    for bad in [(0, 0, 0, (0, 0, 0, 0.5)), (0, 0, 0, 5), (0, 0, 0, "abcd"), (0, 0, 0, (), "text"),
                (0, 0, 0, ({},))]:
        with pytest.raises(TypeError):
            ln.send(*bad)
        with pytest.raises(TypeError):
            ln.call(*bad)
    with pytest.raises(TypeError):
        ln.send(0, 0, 0)
    with pytest.raises(TypeError):
        ln.send(0, 0, 0, (), None, 5)
    with pytest.raises(TypeError):
        ln.send(0, 0, 0, (), timeout_ns=5)
    with pytest.raises(TypeError):
        ln.call(0, 0, 0, (), payload=None, bogus=1)
    with pytest.raises(TypeError):
        ln.call(0, 0, 0, (), None, payload=None)
    assert ln.max_payload == 8192 - 128
    with pytest.raises(MessageTooLarge):
        ln.send(0, 0, 0, (), bytes(8192 - 127))
    with pytest.raises(MessageTooLarge):
        ln.call(0, 0, 0, (), bytes(8192), SEC)
    assert _core.atomic_load_u64(m, lay["req_tail"]) == 0
    assert ln.last_tag == 0
    ln.send(0, 0, 0, (), bytes(8192 - 128))  # exactly the maximum fits an idle arena
    assert _core.atomic_load_u64(m, lay["req_tail"]) == 1


def test_send_wouldblock_ring_and_arena(db, chans):
    ch = chans(1, nslots=8, arena=8192)
    ln = lane(ch, db)
    for i in range(8):
        ln.send(0, 0, 0, (i,))
    with pytest.raises(WouldBlock):
        ln.send(0, 0, 0, (8,))
    s = server(db, ch)
    for i in range(8):
        assert s.recv(SEC).data[0] == i
    ln.send(0, 0, 0, (), bytes(4000))  # chunk of 4160 bytes
    with pytest.raises(WouldBlock):
        ln.send(0, 0, 0, (), bytes(4000))
    assert s.recv(SEC).payload == bytes(4000)
    ln.send(0, 0, 0, (), bytes(4000))


def test_send_many(db, chans):
    ch = chans(1, nslots=8)
    ln = lane(ch, db)
    s = server(db, ch)
    m = ch.map()
    lay = ch.layout()
    # One bad item: nothing is written.
    with pytest.raises(ValueError):
        ln.send_many(0, 0, [(0, (1,)), (0, (-1,))])
    with pytest.raises(TypeError):
        ln.send_many(0, 0, [(0, (1,)), (0,)])
    with pytest.raises(TypeError):
        ln.send_many(0, 0, [(0, (1,)), [0, (1,)]])
    with pytest.raises(TypeError):
        ln.send_many(0, 0, [(0, (1,), None, 4)])
    with pytest.raises(TypeError):
        ln.send_many(0, 0, 5)
    with pytest.raises(MessageTooLarge):
        ln.send_many(0, 0, [(0, (1,)), (0, (1,), bytes(1 << 20))])
    with pytest.raises(ValueError):
        ln.send_many(0, 0x100, [(0, (1,))])
    assert _core.atomic_load_u64(m, lay["req_tail"]) == 0
    assert ln.send_many(0, 0, []) == 0
    assert ln.refused == 0
    items = [(2, (i, 0, 0, i), bytes([i]) * i) for i in range(20)]
    assert ln.send_many(1, _core.FLAG_CHECKSUM, items) == 8
    assert ln.refused == 12  # the ring had room for 8 of 20
    assert ln.send_many(1, 0, items[8:]) == 0
    assert ln.refused == 24
    assert s.refused(1) == 24
    got = [s.recv(SEC) for _ in range(8)]
    assert [g.data for g in got] == [(i, 0, 0, i) for i in range(8)]
    assert [g.payload for g in got] == [bytes([i]) * i for i in range(8)]
    assert [g.tag for g in got] == list(range(1, 9))  # tags
    assert {(g.capability, g.opcode, g.flags) for g in got} == {(1, 2, 0)}
    assert ln.send_many(1, 0, items[8:]) == 8
    assert ln.refused == 28
    assert ln.send_many(1, 0, tuple(items[:1])) == 0  # a tuple works as well
    with pytest.raises(WouldBlock):
        ln.send(1, 2, 0, ())
    assert ln.refused == 30 and s.refused(1) == 30


def test_arena_wraps_and_jumps(db, chans):
    # Payload sizes that force wraps at the arena end and fresh-lap jumps, with mixed sizes in
    # flight; every payload must come back intact and in order.
    import random

    ch = chans(1, nslots=16, arena=16384)
    ln = lane(ch, db)
    s = server(db, ch)
    rng = random.Random(5)
    sent: list[bytes] = []
    got = 0

    def drain_some(all_: bool) -> None:
        nonlocal got
        while all_ or rng.random() < 0.6:
            try:
                r = s.recv(0)
            except Timeout:
                return
            assert r.data[0] == got and r.payload == sent[got]
            got += 1

    for _ in range(4000):
        p = rng.randbytes(rng.choice([0, 10, 64, 65, 300, 1000, 5000, 9000, 16384 - 128]))
        try:
            ln.send(0, 0, _core.FLAG_CHECKSUM, (len(sent),), p)
            sent.append(p)
        except WouldBlock:
            pass
        drain_some(False)
    drain_some(True)
    assert got == len(sent) > 1000


# ---- cancellation, timeouts, late replies ------------------------------------------------------


def test_timeout_sets_cancel_and_server_skips(db, chans):
    ch = chans(1)
    ln = lane(ch, db)
    s = server(db, ch)
    m = ch.map()
    t = time.monotonic()
    with pytest.raises(Timeout):
        ln.call(0, 0, 0, (111,), b"p" * 1000, 50_000_000)
    assert 0.04 < time.monotonic() - t < 5
    assert _core.atomic_load_u64(m, _core.CHAN_CANCEL_BELOW_OFF) == 2
    with pytest.raises(Timeout):
        ln.call(0, 0, 0, (222,), None, 0)  # zero timeout: sent, then Timeout at once
    assert _core.atomic_load_u64(m, _core.CHAN_CANCEL_BELOW_OFF) == 3
    ln.send(0, 0, 0, (333,), b"live")
    r = s.recv(SEC)
    assert r.tag == 3 and r.data[0] == 333 and r.payload == b"live"  # the two cancelled calls were skipped
    with pytest.raises(Timeout):
        s.recv(0)


def test_cancel_skips_calls_only(db, chans):
    # A one-way send queued before a call that times out is still delivered.
    ch = chans(1)
    ln = lane(ch, db)
    s = server(db, ch)
    ln.send(0, 0, 0, (1,))
    with pytest.raises(Timeout):
        ln.call(0, 0, 0, (2,), None, 0)
    ln.send(0, 0, 0, (3,))
    assert [s.recv(SEC).data[0] for _ in range(2)] == [1, 3]
    with pytest.raises(Timeout):
        s.recv(0)


def test_late_reply_dropped_in_process(db, chans):
    ch = chans(1)
    ln = lane(ch, db)
    s = server(db, ch)
    with pytest.raises(Timeout):
        ln.call(0, 0, 0, (1,), None, 1_000_000)
    ln.send(0, 0, 0, (2,))  # tag 2, so the next call (tag 3) is not skipped by cancel
    # The server never saw tag 1 (cancelled); pretend a slow server replies to it anyway.
    s.reply(1, 1, 99, 0, (), b"late" * 100)
    got = s.recv(SEC)
    assert got.tag == 2

    def serve():
        r = s.recv(5 * SEC)
        s.reply(1, r.tag, 50, 0, (r.data[0],), b"fresh")

    t = threading.Thread(target=serve)
    t.start()
    r = ln.call(0, 0, 0, (3,), None, 5 * SEC)
    t.join(10)
    assert r == (50, 0, 3, 0, 0, 0, b"fresh")


def test_late_reply_cross_process(db, chans):
    ch = chans(1, arena=1 << 20)
    srv = spawn("echo_server", {"db": db, "channels": [ch.args(db)], "max_seconds": 30},
                [db, ch.chan, ch.ctrl])
    try:
        ln = lane(ch, db)
        assert ln.call(0, OP_ECHO, 0, (5,), None, 10 * SEC)[2] == 5  # server is up
        with pytest.raises(Timeout):
            ln.call(0, OP_SLOW, 0, (1, 300), b"slow", 100_000_000)
        for i in range(20):
            r = ln.call(0, OP_ECHO, 0, (1000 + i,), b"e%d" % i, 10 * SEC)
            assert r[0] == OP_ECHO + 100 and r[2] == 1000 + i and r[6] == b"e%d" % i
        ln.call(0, OP_STOP, 0, (), None, 10 * SEC)
        assert result(srv)["served"] == 22
    finally:
        reap(srv)


# ---- control page states -----------------------------------------------------------------------


@pytest.mark.parametrize("state,exc", [(2, InvalidCapability), (3, PeerDied), (4, InvalidCapability),
                                       (0, InvalidCapability), (77, InvalidCapability)])
def test_state_checked_before_sending(db, chans, state, exc):
    ch = chans(1)
    ln = lane(ch, db)
    ch.set_state(state)
    with pytest.raises(exc):
        ln.call(0, 0, 0, (), None, SEC)
    with pytest.raises(exc):
        ln.send(0, 0, 0, ())
    with pytest.raises(exc):
        ln.send_many(0, 0, [(0, ())])
    with pytest.raises(exc):
        ln.call_start(0, 0, 0, ())
    if state == 4:
        with pytest.raises(InvalidCapability, match="channel closed"):
            ln.send(0, 0, 0, ())


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("state,exc", [(3, "PeerDied"), (2, "InvalidCapability")])
def test_state_change_wakes_blocked_caller(db, chans, mode, state, exc):
    ch = chans(1)
    p = spawn("blocked_caller", ch.args(db, mode=mode), [db, ch.chan, ch.ctrl])
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.3)  # let it get into its futex sleep (or spin)
        t0 = time.monotonic()
        ch.set_state(state)
        r = result(p, 20)
        assert r["result"] == exc
        assert r["t"] - t0 < 0.1, r
    finally:
        reap(p)


def test_reply_published_before_state_change_is_delivered(db, chans):
    for trial in range(30):
        ch = chans(trial)
        s = server(db, ch)
        ln = lane(ch, db, mode=trial % 3)

        def serve(s=s, ch=ch):
            r = s.recv(5 * SEC)
            s.reply(r.index, r.tag, 7, 0, (r.data[0],))
            ch.set_state(_core.STATE_PEER_DEAD)

        t = threading.Thread(target=serve)
        t.start()
        assert ln.call(0, 0, 0, (trial,), None, 5 * SEC)[:2] == (7, 0)
        t.join(10)
        with pytest.raises(PeerDied):
            ln.call(0, 0, 0, (trial,), None, 5 * SEC)
        s.close()


def test_server_skips_channels_not_open(db, chans):
    a, b = chans(1), chans(2)
    s = server(db, a, b)
    la, lb = lane(a, db), lane(b, db)
    la.send(0, 0, 0, (1,))
    lb.send(0, 0, 0, (2,))
    a.set_state(_core.STATE_REVOKED)
    assert s.recv(SEC).index == 2
    with pytest.raises(Timeout):
        s.recv(20_000_000)
    with pytest.raises(PeerDied):
        s.reply(1, 1, 0, 0, ())
    a.set_state(_core.STATE_OPEN)
    assert s.recv(SEC).index == 1


# ---- server mechanics --------------------------------------------------------------------------


def test_round_robin_order(db, chans):
    a, b, c = chans(1), chans(5), chans(4095)
    s = server(db, a, b, c)
    la, lb, lc = lane(a, db), lane(b, db), lane(c, db)
    assert la.send_many(0, 0, [(0, (i,)) for i in range(200)]) == 200
    assert lb.send_many(0, 0, [(0, (i,)) for i in range(200)]) == 200
    assert lc.send_many(0, 0, [(0, (i,)) for i in range(50)]) == 50
    got = [s.recv(SEC) for _ in range(450)]
    order = [g.index for g in got]
    assert order[:150] == [1, 5, 4095] * 50
    assert order[150:] == [1, 5] * 150
    for idx in (1, 5, 4095):
        seqs = [g.data[0] for g in got if g.index == idx]
        assert seqs == list(range(len(seqs)))
    # A flooding channel does not delay a newcomer by more than one turn.
    la.send_many(0, 0, [(0, (i,)) for i in range(256)])
    assert s.recv(SEC).index == 1
    lb.send(0, 0, 0, (999,))
    assert 5 in [s.recv(SEC).index for _ in range(2)]
    assert [s.recv(SEC).index for _ in range(10)] == [1] * 10


def test_remove_while_recv_waits_and_reply_to_removed(db, chans):
    a, b = chans(1), chans(2)
    s = server(db, a, b)
    la, lb = lane(a, db), lane(b, db)
    la.send(0, 0, 0, (1,))
    r = s.recv(SEC)
    got = []
    t = threading.Thread(target=lambda: got.append(s.recv(5 * SEC)))
    t.start()
    time.sleep(0.1)  # recv is waiting (without the GIL), scanning both channels
    s.remove(1)
    with pytest.raises(PeerDied):
        s.reply(1, r.tag, 0, 0, ())
    lb.send(0, 0, 0, (22,))
    t.join(10)
    assert got and got[0].index == 2 and got[0].data[0] == 22
    assert 1 not in s and len(s) == 1
    s.add(1, a.chan, a.ctrl, a.nslots, a.arena)  # (re)added channels start from scratch
    assert len(s) == 2


def test_remove_during_concurrent_traffic(db, chans):
    # recv and reply in one thread, add/remove churn in another: nothing crashes, nothing hangs.
    chs = [chans(i, nslots=16, arena=8192) for i in range(4)]
    s = server(db, *chs)
    lanes = [lane(c, db) for c in chs]
    stop = threading.Event()
    errors = []

    def serve():
        while not stop.is_set():
            try:
                r = s.recv(10_000_000)
                s.reply(r.index, r.tag, 0, 0, (), r.payload)
            except (Timeout, PeerDied, WouldBlock):
                pass
            except Exception as e:  # pragma: no cover
                errors.append(e)

    t = threading.Thread(target=serve)
    t.start()
    try:
        end = time.monotonic() + 2
        k = 0
        while time.monotonic() < end:
            for ln in lanes:
                try:
                    ln.send(0, 0, 0, (k,), b"z" * (k % 3000))
                except WouldBlock:
                    pass
            k += 1
            if k % 50 == 0:
                i = k // 50 % 4
                if i in s:
                    s.remove(i)
    finally:
        stop.set()
        t.join(10)
    assert not errors


def test_reply_wouldblock_never_blocks(db, chans):
    ch = chans(1, nslots=4, arena=8192)
    s = server(db, ch)
    ln = lane(ch, db)
    for i in range(4):
        ln.send(0, 0, 0, (i,))
    tags = [s.recv(SEC).tag for _ in range(4)]
    for t in tags:
        s.reply(1, t, 0, 0, ())
    t0 = time.monotonic()
    with pytest.raises(WouldBlock):
        s.reply(1, tags[-1], 0, 0, ())
    assert time.monotonic() - t0 < 0.5
    with pytest.raises(PeerDied):
        s.reply(2, 1, 0, 0, ())


def test_interrupt(db, chans):
    ch = chans(1)
    s = server(db, ch, mode=2)
    got = []

    def run():
        try:
            s.recv(10 * SEC)
        except Cancelled:
            got.append(time.monotonic())

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    s.interrupt()
    t.join(5)
    assert got and got[0] - t0 < 0.5


def test_lane_one_thread_at_a_time(db, chans):
    ch = chans(1)
    ln = lane(ch, db, mode=2)
    started = threading.Event()

    def blocked():
        started.set()
        with pytest.raises(Timeout):
            ln.call(0, 0, 0, (), None, 500_000_000)

    t = threading.Thread(target=blocked)
    t.start()
    started.wait(5)
    time.sleep(0.05)
    with pytest.raises(RuntimeError):
        ln.send(0, 0, 0, ())
    t.join(5)
    ln.send(0, 0, 0, ())
    ln.close()
    with pytest.raises(ValueError):
        ln.send(0, 0, 0, ())


# ---- corruption from a hostile client: CorruptChannel --------------------------------------------


def _slot(lay, i=0):
    return lay["req_slots"] + 64 * i


def _chunk(lay, off=0):
    return lay["req_arena"] + off


def _put(m, off, fmt, *v):
    struct.pack_into(fmt, m, off, *v)


CORRUPTIONS = {
    "tail far ahead": lambda m, L: _put(m, L["req_tail"], "<Q", 10_000),
    "tail behind head": lambda m, L: _put(m, L["req_tail"], "<Q", 2**64 - 1),
    "unknown flag": lambda m, L: _put(m, _slot(L) + 12, "<I", _core.FLAG_CHECKSUM | 0x100),
    "chunk len unaligned": lambda m, L: _put(m, _slot(L) + 56, "<I", 100),
    "chunk len huge": lambda m, L: _put(m, _slot(L) + 56, "<I", 2**32 - 64),
    "chunk past arena": lambda m, L: _put(m, _slot(L) + 60, "<I", (1 << 20) - 64),
    "chunk not fifo": lambda m, L: _put(m, _slot(L) + 60, "<I", 4096),
    "header opcode": lambda m, L: _put(m, _chunk(L) + 8, "<I", 12345),
    "header capability": lambda m, L: _put(m, _chunk(L), "<Q", 1),
    "header pad": lambda m, L: _put(m, _chunk(L) + 28, "<I", 1),
    "total size": lambda m, L: _put(m, _chunk(L) + 16, "<Q", 2**63),
    "region base": lambda m, L: _put(m, _chunk(L) + 32, "<Q", 0),
    "region size": lambda m, L: _put(m, _chunk(L) + 40, "<Q", 1),
    "region perms": lambda m, L: _put(m, _chunk(L) + 48, "<I", 7),
    "checksum": lambda m, L: _put(m, _chunk(L) + 24, "<I", 0xDEADBEEF),
    "payload byte": lambda m, L: _put(m, _chunk(L) + 128 + 500, "<B", 0x5A ^ 0xFF),
    "no chunk but large": lambda m, L: _put(m, _slot(L) + 56, "<II", 0, 0),
    "tag repeats": lambda m, L: _put(m, _slot(L, 1) + 48, "<Q", 1),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_channel_detected(db, chans, name):
    good, bad = chans(1), chans(2)
    s = server(db, good, bad)
    lg, lb = lane(good, db), lane(bad, db)
    lb.send(3, 4, _core.FLAG_CHECKSUM, (), b"\x5a" * 1000)
    lb.send(3, 4, 0, (1,))
    lg.send(0, 0, 0, (10,))
    CORRUPTIONS[name](bad.map(), bad.layout())
    assert s.recv(SEC).data[0] == 10  # index 1 comes first in the turn
    if name == "tag repeats":
        r = s.recv(SEC)
        assert (r.index, r.tag) == (2, 1)  # the first message is fine; the second repeats its tag
    with pytest.raises(_core.CorruptChannel) as ei:
        s.recv(SEC)
    assert isinstance(ei.value, ProtocolError)
    assert ei.value.index == 2 and isinstance(ei.value.reason, str) and ei.value.reason
    assert s.is_dead(2)
    # Dead: never read again, replies refused; the healthy channel goes on.
    lg.send(0, 0, 0, (11,))
    assert s.recv(SEC).data[0] == 11
    with pytest.raises(Timeout):
        s.recv(20_000_000)
    with pytest.raises(PeerDied):
        s.reply(2, 1, 0, 0, ())


def test_random_slot_and_chunk_garbage_fuzz(db, chans):
    # A valid-looking tail in front of random slot / chunk bytes: every outcome is either a
    # delivered message or CorruptChannel for that channel -- never a crash, hang or a payload
    # read from outside the arena.
    import random

    rng = random.Random(11)
    outcomes = {"delivered": 0, "corrupt": 0}
    for trial in range(300):
        good = make_chan(0)
        bad = make_chan(1, nslots=8, arena=8192)
        try:
            lg = lane(good, db)
            s = server(db, good, bad)
            lb = lane(bad, db)
            lb.send(1, 2, _core.FLAG_CHECKSUM if trial % 2 else 0, (),
                    rng.randbytes(rng.choice([0, 5, 64, 65, 1000])))
            m = bad.map()
            L = bad.layout()
            for _ in range(rng.randint(1, 6)):
                base = rng.choice([L["req_slots"], L["req_arena"], L["req_arena"] + 32])
                off = base + rng.randrange(64)
                m[off:off + 1] = bytes([rng.randrange(256)])
            if rng.random() < 0.2:
                struct.pack_into("<Q", m, L["req_tail"], rng.choice([1, 2, 8, 9, 2**64 - 1]))
            lg.send(0, 0, 0, (trial,))
            seen_good = False
            for _ in range(3):
                try:
                    r = s.recv(0)
                except Timeout:
                    break
                except _core.CorruptChannel as e:
                    assert e.index == 1
                    outcomes["corrupt"] += 1
                    continue
                if r.index == 0:
                    assert r.data[0] == trial
                    seen_good = True
                else:
                    outcomes["delivered"] += 1
                    assert len(r.payload) <= 8192
            assert seen_good
            s.close()
        finally:
            bad.close()
            good.close()
    assert outcomes["corrupt"] > 100


def test_checksum_present_without_flag(db, chans):
    ch = chans(1)
    s = server(db, ch)
    ln = lane(ch, db)
    ln.send(0, 0, 0, (), b"abc")
    _put(ch.map(), ch.layout()["req_arena"] + 24, "<I", 1)
    with pytest.raises(_core.CorruptChannel, match="checksum"):
        s.recv(SEC)


def test_hostile_client_on_reply_side(db, chans):
    # The client scribbles the response ring's head: reply() detects it as soon as it reads the
    # head, i.e. once the room it saw last (all 8 slots, at first) is used up. Until then the
    # replies go into slots the server knows are free: nothing unvalidated is trusted.
    ch = chans(1, nslots=8, arena=8192)
    s = server(db, ch)
    ln = lane(ch, db)
    ln.send(0, 0, 0, ())
    r = s.recv(SEC)
    _put(ch.map(), ch.layout()["resp_head"], "<Q", 10**6)  # past anything ever published
    for _ in range(8):
        s.reply(1, r.tag, 0, 0, ())
    with pytest.raises(_core.CorruptChannel) as ei:
        s.reply(1, r.tag, 0, 0, ())
    assert ei.value.index == 1 and s.is_dead(1)


# ---- corruption from a hostile server: ProtocolError on the client -------------------------------


def test_hostile_server_garbage_tail(db, chans):
    ch = chans(1)
    ln = lane(ch, db)
    _put(ch.map(), ch.layout()["resp_tail"], "<Q", 10**6)
    with pytest.raises(ProtocolError):
        ln.call(0, 0, 0, (), None, SEC)
    assert ln.broken
    with pytest.raises(ProtocolError):
        ln.send(0, 0, 0, ())


def test_hostile_server_reply_from_the_future(db, chans):
    ch = chans(1)
    s = server(db, ch)
    ln = lane(ch, db)
    s.reply(1, 99, 0, 0, ())
    with pytest.raises(ProtocolError, match="never sent"):
        ln.call(0, 0, 0, (), None, SEC)


@pytest.mark.parametrize("field,value", [("req_head", 10**6), ("req_arena_released", 1 << 40)])
def test_hostile_server_consumer_fields(db, chans, field, value):
    # A scribbled head is read (and refused) once the room the client saw last is used up; the
    # arena's released mark is read for every payload.
    ch = chans(1, nslots=8)
    ln = lane(ch, db)
    ln.send(0, 0, 0, (), b"x")
    _put(ch.map(), ch.layout()[field], "<Q", value)
    with pytest.raises(ProtocolError):
        for _ in range(8):
            ln.send(0, 0, 0, (), b"y")
    assert ln.broken


def test_hostile_server_bad_reply_checksum(db, chans):
    ch = chans(1)
    s = server(db, ch)
    ln = lane(ch, db)
    with pytest.raises(Timeout):
        ln.call(0, 0, 0, (), None, 0)
    ln.send(0, 0, 0, ())
    s.reply(1, 3, 0, _core.FLAG_CHECKSUM, (), b"q" * 300)
    _put(ch.map(), ch.layout()["resp_arena"] + 128 + 7, "<B", 0)
    with pytest.raises(ProtocolError, match="checksum"):
        ln.call(0, 0, 0, (), None, SEC)


# ---- cross-process -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_call_round_trips_cross_process(db, chans, mode):
    ch = chans(1)
    srv = spawn("echo_server", {"db": db, "mode": mode, "channels": [ch.args(db)]},
                [db, ch.chan, ch.ctrl])
    cl = spawn("caller", ch.args(db, n=5000, mode=mode, stop=True), [db, ch.chan, ch.ctrl])
    try:
        assert result(cl)["n"] == 5000
        assert result(srv)["served"] == 5000
    finally:
        reap(cl, srv)


def test_payload_sizes_cross_process(db, chans):
    ch = chans(1, arena=128 << 20)
    srv = spawn("echo_server", {"db": db, "channels": [ch.args(db)]}, [db, ch.chan, ch.ctrl])
    try:
        ln = lane(ch, db)
        for n in (0, 1, 63, 64, 65, 128, 4096, 1 << 20, 64 << 20, 0, 65):
            p = os.urandom(n)
            r = ln.call(0, OP_ECHO, _core.FLAG_CHECKSUM, (n,), p, 30 * SEC)
            assert r[0] == OP_ECHO + 100 and r[2] == n
            # (the echo server replies with FLAG_CHECKSUM; an empty reply has no payload at all)
            assert bool(r[1] & _core.FLAG_CHECKSUM) == (n > 0)
            assert bool(r[1] & _core.FLAG_LARGE) == (n > 64)
            assert (r[6] or b"") == p and (r[6] is None) == (n == 0)
        ln.call(0, OP_STOP, 0, (), None, 10 * SEC)
        result(srv)
    finally:
        reap(srv)


def test_stress_10m_one_way_no_loss_dup_or_reorder(db, chans):
    n = int(10_000_000 * SCALE)
    ch = chans(5, nslots=1024, arena=1 << 20)
    s = server(db, ch)
    p = spawn("producer", ch.args(db, n=n, batch=512), [db, ch.chan, ch.ctrl])
    try:
        recv = s.recv
        expect = 0
        while expect < n:
            r = recv(10 * SEC)
            d0 = r.data[0]
            if d0 != expect or r.data[1] != d0 ^ 0xFFFF or r.data[2] != d0 * 3:
                pytest.fail(f"message {expect}: got {r}")
            expect += 1
        assert result(p)["sent"] == n
        with pytest.raises(Timeout):
            recv(50_000_000)  # nothing extra (no duplicates)
    finally:
        reap(p)


def test_stress_call_round_trips(db, chans):
    # Blocking mode on both sides: 500,000 round trips of ~50-65 us each on this kind of VM (the
    # server's own deadline must outlast them, or the caller times out on a server that left).
    n = int(500_000 * SCALE)
    ch = chans(1)
    srv = spawn("echo_server", {"db": db, "mode": 2, "channels": [ch.args(db)], "max_seconds": 170},
                [db, ch.chan, ch.ctrl])
    cl = spawn("caller", ch.args(db, n=n, mode=2, stop=True), [db, ch.chan, ch.ctrl])
    try:
        assert result(cl, 180)["n"] == n
        assert result(srv, 30)["served"] == n
    finally:
        reap(cl, srv)


def test_fairness_three_clients_cross_process(db, chans):
    chs = [chans(i, nslots=4096, arena=1 << 20) for i in (3, 17, 200)]
    s = server(db, *chs)
    procs = [spawn("producer", c.args(db, n=400_000, batch=1024, cap=c.index), [db, c.chan, c.ctrl])
             for c in chs]
    try:
        lay = [c.layout() for c in chs]
        maps = [c.map() for c in chs]
        end = time.monotonic() + 30
        # Start counting once every ring is full, so every client is "under load".
        tails = [L["req_tail"] for L in lay]
        while not all(_core.atomic_load_u64(m, t) >= 4000 for m, t in zip(maps, tails, strict=True)):
            assert time.monotonic() < end
            time.sleep(0.01)
        # Every ring holds >= 4000 messages and keeps being refilled, so no ring can run dry
        # before it has delivered 4000: round robin must give exactly a third each.
        counts = {c.index: 0 for c in chs}
        order = []
        for _ in range(12_000):
            r = s.recv(10 * SEC)
            counts[r.index] += 1
            order.append(r.index)
        assert counts == {3: 4000, 17: 4000, 200: 4000}
        assert order[:30] == [3, 17, 200] * 10
    finally:
        reap(*procs)


@pytest.mark.parametrize("how", ["recv", "recv_many", "poll"])
def test_hostile_scribbler_only_kills_its_channel(db, chans, how):
    good, bad = chans(1), chans(2, nslots=64, arena=65536)
    s = server(db, good, bad, mode=1)
    cl = spawn("timed_caller", good.args(db, seconds=3), [db, good.chan, good.ctrl])
    sc = spawn("scribble_channel", bad.args(db, seconds=3), [db, bad.chan, bad.ctrl])
    corrupt = []
    served = 0

    def take() -> list:
        if how == "recv":
            return [s.recv(100_000_000)]
        if how == "recv_many":
            return s.recv_many(16, 100_000_000)
        r = s.poll()
        if r is None:
            time.sleep(0.0001)
        return [] if r is None else [r]

    try:
        end = time.monotonic() + 40
        while cl.poll() is None and time.monotonic() < end:
            try:
                batch = take()
            except Timeout:
                continue
            except _core.CorruptChannel as e:
                corrupt.append((e.index, e.reason))
                continue
            for r in batch:
                if r.index == 1:
                    served += 1
                try:
                    s.reply(r.index, r.tag, r.opcode + 100, 0, r.data, r.payload)
                except _core.CorruptChannel as e:
                    corrupt.append((e.index, e.reason))
                except (WouldBlock, PeerDied):
                    pass
        res = result(cl, 30)
        result(sc, 30)
    finally:
        reap(cl, sc)
    assert "error" not in res and res["n"] > 10 and served >= res["n"]
    assert [c[0] for c in corrupt] == [2], corrupt
    assert s.is_dead(2) and not s.is_dead(1)


@pytest.mark.parametrize("mode", [1, 2])
def test_doorbell_scribbler_never_hangs_server(db, chans, mode):
    good = chans(1)
    s = server(db, good, mode=mode)
    cl = spawn("timed_caller", good.args(db, seconds=3, mode=mode), [db, good.chan, good.ctrl])
    sc = spawn("scribble_doorbell", {"db": db, "seconds": 3}, [db])
    try:
        end = time.monotonic() + 40
        while cl.poll() is None and time.monotonic() < end:
            try:
                r = s.recv(100_000_000)
            except Timeout:
                continue
            s.reply(r.index, r.tag, r.opcode + 100, 0, r.data, r.payload)
        res = result(cl, 30)
        result(sc, 30)
    finally:
        reap(cl, sc)
    assert res["n"] > 10
    # A lost wake-up costs at most the 50 ms sleep cap (plus scheduling noise), never a hang.
    assert res["worst"] < 2.0, res


def test_waking_a_channel_as_the_kernel_does(db, chans):
    # How the kernel wakes a channel's clients (ChannelShm.set_state): futex_wake on the response
    # tail word, which resp_ring_off places (and checks the geometry of).
    ch = chans(1)
    m = ch.map()
    assert _core.futex_wake(m, _core.resp_ring_off(ch.nslots) + _core.RING_TAIL_OFF) == 0
    assert _core.futex_wake(m, _core.resp_ring_off(ch.nslots) + _core.RING_TAIL_OFF) == 0
    with pytest.raises(ValueError):
        _core.resp_ring_off(3)
