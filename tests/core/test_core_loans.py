"""Loans (Lane.loan / call_loan / send_loan / cancel_loan) and zero-copy receive (Request.payload as
a read-only view of the request arena, its chunk held until the request is done and its last view
is gone) in capbus._core.

Peers run in this process where only the memory matters (a Lane and a ServerSet map the same memfd
separately, so what one writes the other sees through its own mapping: that is the sharing), and in
two processes where it must be real (tests/_ring_stress_child.py zc_server).
"""

from __future__ import annotations

import gc
import os
import random
import struct
import sys
import time
import zlib

import pytest
from _core_util import Chan, RawClient, reap, result, spawn  # noqa: E402
from _ring_stress_child import memfd_ranges, view_address  # noqa: E402

from capbus import _core  # noqa: E402
from capbus._errors import IpcError, MessageTooLarge, PeerDied, Timeout, WouldBlock  # noqa: E402

np = pytest.importorskip("numpy")

OP_STOP = 2
OP_REPORT = 4
SEC = 1_000_000_000
ZC = _core.ZC_THRESHOLD


def setup(db, chans, index=1, **kw):
    ch = chans(index, **kw)
    s = _core.ServerSet(db)
    s.add(index, ch.chan, ch.ctrl, ch.nslots, ch.arena, 42)
    ln = _core.Lane(ch.chan, ch.ctrl, db, index, ch.nslots, ch.arena)
    return ch, s, ln


def released(ch: Chan, m=None) -> int:
    """The request ring's arena_released, as the client sees it."""
    m = m if m is not None else ch.map()
    return _core.atomic_load_u64(m, ch.layout()["req_arena_released"])


def chunk(n: int) -> int:
    return _core.LARGE_MSG_SIZE + (-(-n // 64) * 64 if n > _core.LM_INLINE_SIZE else 0)


def mappings_of(fd: int) -> int:
    """How many mappings of this memfd the process has."""
    ino = os.fstat(fd).st_ino
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if len(line.split()) >= 5 and int(line.split()[4]) == ino)


def dead(v) -> bool:
    """A released memoryview (what a finished request's .payload reads as)."""
    try:
        bytes(v)
    except ValueError as exc:
        return "released memoryview" in str(exc)
    return False


# ---- the lane side --------------------------------------------------------------------------


def test_loan_view_and_one_loan_rule(db, chans):
    ch, s, ln = setup(db, chans)
    assert ln.loaned is None
    v = ln.loan(100)
    assert isinstance(v, memoryview) and len(v) == 100 and not v.readonly and ln.loaned == 100
    with pytest.raises(RuntimeError, match="already has a loan"):
        ln.loan(1)
    # Nothing else may take arena memory while the loan is out; payload-less messages may go.
    for bad in (lambda: ln.send(0, 1, 0, (), b"x"), lambda: ln.call_start(0, 1, 0, (), b"x"),
                lambda: ln.call(0, 1, 0, (), b"x", SEC),
                lambda: ln.send_many(0, 0, [(1, ()), (1, (), b"x")])):
        with pytest.raises(RuntimeError, match="loan is out"):
            bad()
    ln.send(0, 1, 0, (7,))
    v[:] = bytes(range(100))
    ln.send_loan(0, 2, _core.FLAG_CHECKSUM | 0x10000, (8,))
    assert ln.loaned is None
    r1, r2 = s.poll(), s.poll()
    assert (r1.data[0], r1.payload, r1.zero_copy) == (7, b"", False)
    assert (r2.opcode, r2.data[0], r2.flags, r2.zero_copy) == (2, 8, 0x10000, True)
    p = r2.payload
    assert isinstance(p, memoryview) and p.readonly and bytes(p) == bytes(range(100))
    with pytest.raises(TypeError):
        p[0] = 1
    assert repr(r2).endswith("payload=100 bytes (one-way)>")
    for commit in (lambda: ln.send_loan(0, 1, 0, ()), lambda: ln.call_loan(0, 1, 0, (), SEC)):
        with pytest.raises(RuntimeError, match="no loan"):
            commit()
    ln.cancel_loan()  # no loan: a no-op
    with pytest.raises(MessageTooLarge):
        ln.loan(ln.max_payload + 1)
    for bad in (-1, 2**64, 1.5):
        with pytest.raises((ValueError, TypeError)):
            ln.loan(bad)
    # loan(0): an empty payload, still zero-copy; the largest loan fits.
    assert len(ln.loan(0)) == 0
    ln.send_loan(0, 3, 0, ())
    r3 = s.poll()
    assert r3.zero_copy and bytes(r3.payload) == b""
    del p, r1, r2, r3, v  # no loan view left: the whole arena can be loaned
    big = ln.loan(ln.max_payload)
    assert len(big) == ln.max_payload
    ln.cancel_loan()
    del big
    # FLAG_LOANED is the core's to set: passed to send() it is dropped (the payload is copied).
    ln.send(0, 1, _core.FLAG_LOANED, (), b"abc")
    r = s.poll()
    assert r.payload == b"abc" and not r.zero_copy


def test_loan_call_roundtrip_and_inline_sizes(db, chans):
    ch, s, ln = setup(db, chans)
    import threading

    for n in (1, 63, 64, 65, 127, 128, 1000):
        data = os.urandom(n)
        ln.loan(n)[:] = data  # the view may go at once: the loan stays out
        flags = _core.FLAG_CHECKSUM if n % 2 else 0

        # call_loan waits for the reply: answer it from a thread.
        def serve(data=data):
            r = s.recv(5 * SEC)
            assert r.zero_copy and bytes(r.payload) == data and r.expects_reply
            r.reply(9, (zlib.crc32(r.payload), len(r.payload)))

        t = threading.Thread(target=serve)
        t.start()
        m = ln.call_loan(0, 5, flags, (n,), 5 * SEC)
        t.join()
        assert m[:4] == (9, 0, zlib.crc32(data), n), (n, m)
        assert ln.loaned is None


def test_cancel_loan_rolls_back_and_keeps_the_chunk_while_views_live(db, chans):
    ch, s, ln = setup(db, chans)
    v = ln.loan(1000)
    a = view_address(v)
    v[:4] = b"abcd"
    ln.cancel_loan()
    assert ln.loaned is None and bytes(v[:4]) == b"abcd"  # still valid, still its own bytes
    # The chunk (at offset 0 of a fresh arena: no other place to go) stays reserved for v.
    for again in (lambda: ln.loan(1000), lambda: ln.send(0, 1, 0, (), b"q" * 1000)):
        with pytest.raises(WouldBlock, match="view of an earlier loan"):
            again()
    ln.send(0, 1, 0, (5,))  # payload-less messages still go
    assert s.poll().data[0] == 5
    del v
    w = ln.loan(1000)  # the same chunk again: the cursor went back
    assert view_address(w) == a
    ln.cancel_loan()
    del w
    assert s.poll() is None  # nothing was sent
    ln.send(0, 1, 0, (), b"q" * 1000)
    r = s.poll()
    assert r.payload == b"q" * 1000 and view_address(r.payload) != a  # server's own mapping
    slot = ch.layout()["req_slots"] + _core.SLOT_SIZE * 1
    assert struct.unpack_from("<I", ch.map(), slot + _core.SLOT_PAYLOAD_OFF_OFF)[0] == 0


def test_loan_wouldblock_when_the_receiver_holds_the_arena(db, chans):
    ch, s, ln = setup(db, chans)  # 1 MiB arena
    n = 200_000
    held = []
    for _ in range(100):
        try:
            v = ln.loan(n)
        except WouldBlock as exc:
            assert "the arena for this channel is full" in str(exc)
            assert "still holds earlier payloads" in str(exc)
            break
        v[:8] = struct.pack("<Q", len(held))
        ln.send_loan(0, 1, 0, ())
        held.append(s.poll())
    assert len(held) == (ch.arena // chunk(n)) and ln.refused == 1
    assert _core.channel_stats(ch.map())["refused_wouldblock"] == 1
    held[0].release()
    v = ln.loan(n)  # room again
    ln.cancel_loan()
    del v, held


# ---- zero-copy receive ----------------------------------------------------------------------


def test_zero_copy_shares_the_senders_memory(db, chans):
    ch, s, ln = setup(db, chans)
    v = ln.loan(200_000)
    v[:] = b"a" * 200_000
    ln.send_loan(0, 1, 0, ())
    r = s.poll()
    p = r.payload
    assert bytes(p[:3]) == b"aaa"
    v[0:3] = b"xyz"  # the sender writes after the commit (documented hazard) ...
    assert bytes(p[:3]) == b"xyz"  # ... and the receiver sees it: one memory, no copy
    pa, va = view_address(p), view_address(v)
    assert pa != va  # two mappings of one memfd
    assert [rng for rng in memfd_ranges() if rng[0] <= pa < rng[1]]
    assert [rng for rng in memfd_ranges() if rng[0] <= va < rng[1]]
    before = released(ch)
    r.release()
    assert bytes(p[:3]) == b"xyz" and released(ch) == before  # p still holds the chunk
    del p
    assert released(ch) > before
    # A copied (send) payload above the threshold is read in place as well.
    ln.send(0, 1, 0, (), b"b" * ZC)
    r = s.poll()
    p = r.payload
    off = struct.unpack_from("<I", ch.map(), ch.layout()["req_slots"] + _core.SLOT_SIZE + 60)[0]
    m = ch.map()
    m[ch.layout()["req_arena"] + off + 128] = ord("Z")
    assert p[0] == ord("Z")


def test_threshold_and_flags(db, chans):
    ch, s, ln = setup(db, chans)
    ln.send(0, 1, 0, (), b"c" * (ZC - 1))
    ln.send(0, 1, _core.FLAG_CHECKSUM, (), b"d" * ZC)
    r1, r2 = s.poll(), s.poll()
    assert type(r1.payload) is bytes and not r1.zero_copy
    assert isinstance(r2.payload, memoryview) and r2.zero_copy and r2.payload == b"d" * ZC


def test_views_outlive_reply_release_and_dealloc(db, chans):
    ch, s, ln = setup(db, chans, nslots=4)
    m = ch.map()
    tag = ln.call_start(0, 1, 0, (), b"z" * 100_000)
    r = s.poll()
    p = r.payload
    sl, cast = p[10:20], p.cast("c")
    base = p.obj
    assert bytes(memoryview(base)[:2]) == b"zz"  # any number of exports
    # A full response ring (a client that does not read its replies): the reply is dropped, and
    # the views stay valid.
    for _ in range(4):
        s.reply(1, tag, 0, 0, ())
    assert bytes(sl) == b"z" * 10
    assert r.reply(1) is False and r.replied
    # Answered: the request lets go of its .payload, but every view taken before stays valid.
    assert dead(r.payload) and not any(dead(v) for v in (p, sl, cast))
    assert bytes(sl) == b"z" * 10 and cast[0] == b"z" and bytes(memoryview(sl)) == b"z" * 10
    assert released(ch, m) == 0  # ... and the chunk stays the receiver's while they live
    del p, sl
    assert released(ch, m) == 0
    del cast
    assert released(ch, m) == chunk(100_000)  # the last view went: the chunk went back at once
    with pytest.raises(BufferError, match="went back"):
        memoryview(base)  # the spent buffer object cannot reach the reused memory
    del base, r
    while ln.call_poll(tag) is not None:  # empty the response ring
        pass
    # reply_error, release() and dealloc end the request too.
    ln.call_start(0, 1, 0, (), b"e" * ZC)
    r = s.poll()
    p = r.payload
    before = released(ch, m)
    r.reply_error(5, "nope")
    assert bytes(p[:1]) == b"e" and released(ch, m) == before
    del p
    assert released(ch, m) > before
    ln.send(0, 1, 0, (), b"f" * ZC)
    r = s.poll()
    before = released(ch, m)
    p = r.payload
    r.release()
    r.release()  # twice: a no-op
    assert bytes(p[-1:]) == b"f" and released(ch, m) == before
    del p
    assert released(ch, m) > before
    ln.send(0, 1, 0, (), b"g" * ZC)
    r = s.poll()
    before = released(ch, m)
    del r  # nothing else holds a view
    assert released(ch, m) > before
    # A view the user release()s counts as gone: the request's end then returns the chunk.
    ln.send(0, 1, 0, (), b"h" * ZC)
    r = s.poll()
    before = released(ch, m)
    r.payload.release()
    assert released(ch, m) == before
    r.release()
    assert released(ch, m) > before


def test_reply_to_a_gone_client_releases(db, chans):
    ch, s, ln = setup(db, chans)
    ln.call_start(0, 1, 0, (), b"h" * ZC)
    r = s.poll()
    p = r.payload
    ch.set_state(_core.STATE_PEER_DEAD)
    assert r.reply(1) is False  # dropped, not raised
    assert dead(r.payload) and bytes(p[:1]) == b"h"


def test_out_of_order_release_never_reuses_held_memory(db, chans):
    ch, s, ln = setup(db, chans)  # 1 MiB arena
    m = ch.map()
    n, c = 300_000, chunk(300_000)
    for i in range(3):
        ln.send(0, 1, 0, (i,), bytes([i + 1]) * n)
    rs = [s.poll() for _ in range(3)]
    addr0 = view_address(rs[0].payload)
    keep = rs[2].payload[:10]  # a slice of the 3rd: keeps its chunk after its release
    assert released(ch, m) == 0
    rs[1].release()  # the 2nd of 3 first: nothing may be reused yet
    assert released(ch, m) == 0 and dead(rs[1].payload)
    with pytest.raises(WouldBlock):
        ln.send(0, 1, 0, (), b"x" * n)
    rs[0].release()  # now the 1st and the 2nd are one released prefix
    assert released(ch, m) == 2 * c
    ln.send(0, 1, 0, (3,), b"\x09" * n)  # wraps to offset 0: the 1st chunk's place
    assert bytes(rs[2].payload) == b"\x03" * n  # the 3rd, still held, is untouched
    r4 = s.poll()
    assert bytes(r4.payload) == b"\x09" * n and view_address(r4.payload) == addr0
    rs[2].release()
    assert released(ch, m) == 2 * c and bytes(keep) == b"\x03" * 10  # the slice holds it
    del keep
    assert released(ch, m) == 3 * c
    r4.release()
    assert released(ch, m) == ch.arena + c


def test_random_holds_and_releases_keep_payloads_intact(db, chans):
    """A receiver holding up to 8 payloads and releasing them in random order, while the sender
    keeps the arena as full as it can: no held payload ever changes."""
    ch, s, ln = setup(db, chans, nslots=16, arena=1 << 20)
    rng = random.Random(7)
    held: list = []
    seq = 0
    got = 0
    for _ in range(3000):
        if rng.random() < 0.6:
            n = rng.choice([1, 70, 5000, ZC, 150_000])
            body = struct.pack("<Q", seq) + bytes([seq % 251]) * max(0, n - 8)
            try:
                if rng.random() < 0.5:
                    ln.loan(len(body))[:] = body
                    ln.send_loan(0, 1, 0, (seq, len(body)))
                else:
                    ln.send(0, 1, 0, (seq, len(body)), body)
                seq += 1
            except WouldBlock:
                ln.cancel_loan()
        if len(held) < 8 and rng.random() < 0.6:
            r = s.poll()
            if r is not None:
                got += 1
                k, n = r.data[0], r.data[1]
                if r.zero_copy:
                    held.append(r)
                else:
                    assert r.payload == (struct.pack("<Q", k) + bytes([k % 251]) * n)[:n]
        if held and rng.random() < 0.4:
            r = held.pop(rng.randrange(len(held)))
            k, n = r.data[0], r.data[1]
            want = (struct.pack("<Q", k) + bytes([k % 251]) * max(0, n - 8))[:n]
            assert bytes(r.payload) == want, k
            r.release()
        for r in held:  # every held payload still intact
            k, n = r.data[0], r.data[1]
            assert bytes(r.payload[:8]) == struct.pack("<Q", k)[:n]
    assert got > 500
    del held, r
    while s.poll() is not None:
        pass
    ln.cancel_loan()
    ln.loan(ln.max_payload)  # everything was given back: the whole arena is free again


def test_holding_receiver_stalls_only_its_own_channel(db, chans):
    a = chans(1, nslots=4)
    b = chans(2)
    s = _core.ServerSet(db)
    for c in (a, b):
        s.add(c.index, c.chan, c.ctrl, c.nslots, c.arena, c.index)
    la = _core.Lane(a.chan, a.ctrl, db, 1, a.nslots, a.arena)
    lb = _core.Lane(b.chan, b.ctrl, db, 2, b.nslots, b.arena)

    def b_flows():
        tag = lb.call_start(0, 7, 0, (tag_seq[0],))
        r = s.poll()
        assert r is not None and r.index == 2
        r.reply(8, r.data)
        assert lb.call_poll(tag)[2] == tag_seq[0]
        tag_seq[0] += 1

    tag_seq = [0]
    # 1. Arena: the receiver holds every payload of channel 1; its sender gets WouldBlock.
    held = []
    for _ in range(10):
        try:
            la.send(0, 1, 0, (len(held),), b"p" * 250_000)
        except WouldBlock:
            break
        held.append(s.poll())
        b_flows()
    assert len(held) == 4 and la.refused == 1
    b_flows()
    del held
    # 2. The held-chunk queue (2 * nslots, at least 64 entries): one-byte loans, all held.
    held = []
    for _ in range(100):
        la.loan(1)[0] = 1
        la.send_loan(0, 1, 0, (len(held),))
        r = s.poll()
        if r is None:
            break  # channel 1 is not served any more...
        assert r.index == 1
        held.append(r)
    assert len(held) == 64
    b_flows()  # ... but channel 2 is
    t0 = time.process_time()
    with pytest.raises(Timeout):
        s.recv(200_000_000)  # channel 1 has a message, but is blocked: no spinning on it
    assert time.process_time() - t0 < 0.1
    held[5].release()  # a middle one: still blocked
    assert s.poll() is None
    held[0].release()  # the oldest: the queue moves, channel 1 is served again
    r = s.poll()
    assert r is not None and r.index == 1 and r.data[0] == 64
    del held, r


def test_two_processes_loan_sizes(db, chans):
    ch = chans(1, nslots=64, arena=128 << 20)
    p = spawn("zc_server", {"db": db, "channels": [ch.args(db) | {"sender": 5}]},
              [db, ch.chan, ch.ctrl])
    try:
        assert p.stdout.readline().strip() == "ready"
        ln = _core.Lane(ch.chan, ch.ctrl, db, 1, ch.nslots, ch.arena)
        rnd = os.urandom(1 << 20)
        sizes = [1, 63, 64, 65, 4096, ZC - 1, ZC, 1 << 20, 16 << 20, 64 << 20]
        for i, n in enumerate(sizes):
            v = ln.loan(n)
            v[:] = (rnd * (n // len(rnd) + 1))[:n]
            flags = _core.FLAG_CHECKSUM if i % 2 else 0
            m = ln.call_loan(0, 10, flags, (n,), 60 * SEC)
            # (opcode, flags, crc, length, inside a channel memfd mapping, zero-copy)
            assert m[:6] == (110, 0, zlib.crc32(v), n, 1, 1), (n, m)
        # The same sizes without a loan: copied in, still read in place above the threshold.
        for n in (100, ZC - 1, ZC, 4 << 20):
            data = rnd[:n] if n <= len(rnd) else rnd * (n // len(rnd))
            m = ln.call(0, 10, 0, (n,), data, 60 * SEC)
            assert m[:6] == (110, 0, zlib.crc32(data), n, int(n >= ZC), int(n >= ZC)), n
        ln.call(0, OP_STOP, 0, (), None, 10 * SEC)
        assert result(p)["served"] == len(sizes) + 4
    finally:
        reap(p)


# ---- lifetimes: what keeps a mapping, and a chunk ----------------------------------------------


def test_remove_and_close_defer_the_unmap_until_views_go(db, chans):
    ch, s, ln = setup(db, chans)
    ln.send(0, 1, 0, (), b"1" * ZC)
    ln.send(0, 1, 0, (), b"2" * ZC)
    r1, r2 = s.poll(), s.poll()
    p1 = r1.payload
    arr = np.frombuffer(r2.payload, np.uint8)  # a raw consumer: keeps the view object
    both = mappings_of(ch.chan)  # the lane's and the server's
    s.remove(1)
    assert mappings_of(ch.chan) == both and bytes(p1[:2]) == b"11"
    s.close()
    assert mappings_of(ch.chan) == both and bytes(p1[:2]) == b"11"
    r1.release()
    assert bytes(p1[:2]) == b"11"
    del r1, p1
    assert mappings_of(ch.chan) == both  # r2 and arr still there
    r2.release()
    assert dead(r2.payload) and int(arr[:3].sum()) == 3 * ord("2")  # memory still mapped
    del r2
    assert mappings_of(ch.chan) == both and bytes(arr[-2:]) == b"22"
    del arr
    assert mappings_of(ch.chan) == both - 1  # the server's mapping went with the last view


def test_lane_close_cancels_the_loan_and_keeps_its_views(db, chans):
    ch, s, ln = setup(db, chans)
    v = ln.loan(1000)
    v[:] = b"v" * 1000
    ln.send_loan(0, 1, 0, ())
    arr = np.frombuffer(v, np.uint8)
    w = ln.loan(10)
    assert mappings_of(ch.chan) == 2
    ln.close()
    assert ln.closed and ln.loaned is None and bytes(v[:2]) == b"vv" and len(w) == 10
    assert int(arr[0]) == ord("v")  # the lane's mapping is kept for them
    assert mappings_of(ch.chan) == 2
    r = s.poll()
    assert bytes(r.payload) == b"v" * 1000
    del v, w
    assert mappings_of(ch.chan) == 2 and int(arr[999]) == ord("v")
    del arr
    assert mappings_of(ch.chan) == 1
    # A lane that simply goes away (no close()) with a loan out: the view keeps it (and its
    # mapping) alive, valid, until the view goes.
    c2 = chans(2)
    ln2 = _core.Lane(c2.chan, c2.ctrl, db, 2, c2.nslots, c2.arena)
    x = ln2.loan(5)
    del ln2
    gc.collect()
    assert not dead(x) and mappings_of(c2.chan) == 1
    del x
    assert mappings_of(c2.chan) == 0


def test_lane_dealloc_with_an_outstanding_loan(db, chans):
    c = chans(3)
    ln = _core.Lane(c.chan, c.ctrl, db, 3, c.nslots, c.arena)
    ln.loan(100)  # the view is dropped at once: the loan is still out
    assert ln.loaned == 100
    with pytest.raises(RuntimeError):
        ln.loan(1)
    del ln
    gc.collect()
    assert mappings_of(c.chan) == 0


# ---- hostile peers ---------------------------------------------------------------------------


def test_checksum_mismatch_on_a_zero_copy_payload(db, chans):
    ch, s, ln = setup(db, chans)
    ln.send(0, 1, _core.FLAG_CHECKSUM, (), b"k" * ZC)
    m = ch.map()
    m[ch.layout()["req_arena"] + 128 + 7] ^= 1
    with pytest.raises(_core.CorruptChannel, match="checksum"):
        s.poll()


def test_loaned_flag_without_a_chunk_is_corrupt(db, chans):
    ch = chans(1)
    s = _core.ServerSet(db)
    s.add(1, ch.chan, ch.ctrl, ch.nslots, ch.arena, 1)
    rc = RawClient(ch, db)
    rc.write(1, extra_flags=_core.FLAG_LOANED)
    with pytest.raises(_core.CorruptChannel, match="payload flags"):
        s.poll()
    rc.close()


def test_hostile_client_scribbles_while_the_server_holds_views(db, chans):
    a, b = chans(1), chans(2)
    s = _core.ServerSet(db)
    for c in (a, b):
        s.add(c.index, c.chan, c.ctrl, c.nslots, c.arena, c.index)
    la = _core.Lane(a.chan, a.ctrl, db, 1, a.nslots, a.arena)
    lb = _core.Lane(b.chan, b.ctrl, db, 2, b.nslots, b.arena)
    for i in range(3):
        la.send(0, 1, 0, (i,), bytes([65 + i]) * 100_000)
    held = [s.poll() for _ in range(3)]
    views = [r.payload for r in held]
    slices = [v[1000:2000] for v in views]
    mapped = mappings_of(a.chan)
    p = spawn("scribble_channel", a.args(db, seconds=0.6), [db, a.chan, a.ctrl])
    corrupt = 0
    served_b = 0
    try:
        end = time.monotonic() + 5
        while p.poll() is None and time.monotonic() < end:
            try:
                r = s.recv(5_000_000)
                if r.index == 1 and r.expects_reply:
                    try:
                        r.reply(0)  # whatever the scribbler made up: answering is harmless
                    except _core.CorruptChannel:
                        corrupt += 1  # it scribbled the response ring
                    except (WouldBlock, PeerDied):
                        pass
            except Timeout:
                pass
            except _core.CorruptChannel as exc:
                assert exc.index == 1
                corrupt += 1
            for v in views:  # readable all along (the bytes may be garbage)
                assert len(bytes(v)) == 100_000
            tag = lb.call_start(0, 7, 0, (served_b,))
            for _ in range(1000):  # channel 1's made-up requests may come first
                try:
                    r = s.recv(SEC)
                except _core.CorruptChannel as exc:
                    assert exc.index == 1
                    corrupt += 1
                    continue
                if r.index == 2:
                    break
            assert r.index == 2
            r.reply(8, r.data)
            assert lb.call_poll(tag)[2] == served_b
            served_b += 1
        result(p)
    finally:
        reap(p)
    if not s.is_dead(1):  # the scribbles may have missed the ring: corrupt it for sure
        m = a.map()
        _core.atomic_store_u64(m, a.layout()["req_tail"], 2**63)
        with pytest.raises(_core.CorruptChannel):
            s.poll()
        corrupt += 1
    assert corrupt == 1 and s.is_dead(1) and served_b > 0
    s.remove(1)
    for v, sl in zip(views, slices, strict=True):
        assert len(bytes(v)) == 100_000 and len(bytes(sl)) == 1000  # still mapped
    assert mappings_of(a.chan) == mapped
    for r in held:
        r.release()
    assert not any(dead(v) for v in views + slices)  # still valid, still mapped
    assert mappings_of(a.chan) == mapped
    del held, views, slices, v, sl, r
    assert mappings_of(a.chan) == mapped - 1
    # Channel 2 is fine.
    tag = lb.call_start(0, 7, 0, (99,))
    s.poll().reply(8, (99,))
    assert lb.call_poll(tag)[2] == 99


def test_many_zero_copy_messages_leak_nothing(db, chans):
    ch, s, ln = setup(db, chans)

    def burst(k):
        for i in range(k):
            if i % 2:
                v = ln.loan(ZC)
                v[:8] = struct.pack("<Q", i)
                ln.send_loan(0, 1, 0, (i,))
                del v
            else:
                ln.send(0, 1, 0, (i,), struct.pack("<Q", i) * (ZC // 8))
            r = s.poll()
            assert struct.unpack_from("<Q", r.payload)[0] == i
            if i % 3 == 0:
                keep = r.payload[:8]  # a view outliving its request
                r.release()
                del keep
            elif i % 3 == 1:
                with pytest.raises(IpcError):
                    r.reply(0)  # one-way: no reply; the view stays until the request goes
                assert not dead(r.payload)
            del r  # (the others: released by the dealloc)

    burst(1000)
    gc.collect()
    blocks = sys.getallocatedblocks()
    for _ in range(3):
        burst(1000)
    gc.collect()
    assert sys.getallocatedblocks() - blocks < 200
    ln.loan(ln.max_payload)  # the whole arena is free again
