"""The native topic data path (TopicPub, TopicSub, SampleView) against its layout, in one
process: the layout numbers agree with the kernel's, and the accounting rules hold."""

from __future__ import annotations

import mmap
import struct

import pytest

from capbus import _core
from capbus import _topic_layout as L


def test_native_layout_matches_the_kernels():
    for name in ("POOL_PUBLISHED_OFF", "POOL_HEADER", "R_HEAD_OFF", "R_WAKE_OFF",
                 "R_PUB_WAITING_OFF", "R_REL_TAIL_OFF", "R_DELIVERED_OFF", "R_SLEEPING_OFF",
                 "R_PUB_WAKE_OFF", "R_REL_HEAD_OFF", "R_TAKEN_OFF", "R_DROPPED_OFF",
                 "R_ENTRIES_OFF", "ENTRY_SIZE", "ST_WRITTEN", "ST_TAKEN", "ST_BUSY"):
        assert getattr(_core, "TP_" + name) == getattr(L, name), name
    assert L.ENTRY.size + 8 == L.ENTRY_SIZE


def _pair(slots=16, depth=4, max_held=2, history=0, max_size=64):
    pool = mmap.mmap(-1, L.pool_size(slots, L.slot_size_for(max_size)))
    relcap = L.relcap_for(depth, max_held)
    ring = mmap.mmap(-1, L.ring_size(depth, relcap))
    pub = _core.TopicPub(pool, slots, L.slot_size_for(max_size), history, max_held)
    pub.add(0, ring, depth, -1)
    sub = _core.TopicSub(ring, pool, slots, depth, L.slot_size_for(max_size), max_size, relcap,
                         max_held, 7)
    return pool, ring, pub, sub


def test_publish_take_release_and_drops():
    pool, ring, pub, sub = _pair()
    assert pub.publish(b"abc", 7, (1, 2)) == 1
    s = sub.take()
    assert (bytes(s.payload), s.opcode, s.data, s.seq, s.dropped, s.publisher) == (
        b"abc", 7, (1, 2, 0, 0), 1, 0, 7)
    assert s.payload.readonly
    assert sub.take() is None
    view = s.payload[1:]
    s.release()
    assert sub.held == 1  # a view is left
    del view
    assert sub.held == 0 and sub.flush()
    for _ in range(10):  # four fit; six are taken back by the publisher itself
        pub.publish(b"x", 0, ())
    got = sub.take()
    assert (got.seq, got.dropped) == (8, 6) and sub.dropped == 6  # 8 after 1: 2..7 lost
    assert pub.refs() == 4  # the ring's four entries (one now claimed), nothing leaked
    held = [got, sub.take()]
    assert sub.take() is False  # max_held 2: release some first
    del held
    with pytest.raises(ValueError):
        pub.publish(b"x", 0, (1 << 64,))


def test_a_false_release_cuts_that_subscriber_off():
    pool, ring, pub, sub = _pair()
    pub.publish(b"x", 0, ())
    struct.pack_into("<I", ring, L.rel_off(4), 9)  # a slot it does not hold
    _core.atomic_store_u64(ring, L.R_REL_HEAD_OFF, 1)
    pub.publish(b"y", 0, ())
    assert pub.take_cuts() == [(0, "released slot 9, which it does not hold")]
    pub.remove(0)
    assert pub.refs() == 0 and pub.cuts == 0


def test_sample_view_frees_after_done_and_last_view():
    freed = []
    buf = bytearray(100)
    v = _core.SampleView(buf, 10, 20, True, freed.append, 3)
    mv = memoryview(v)
    part = mv[2:5]
    v.done()
    del mv
    assert freed == [] and not v.freed  # a slice still shows the memory
    del part
    assert freed == [3] and v.freed
    with pytest.raises(BufferError):
        memoryview(v)
    with pytest.raises(ValueError):
        _core.SampleView(buf, 90, 20, True, freed.append, 0)
