"""The asynchronous mailbox of capbus._core: poll, recv_many, refused counts, draining a closed
channel, and the eventfd hand-shakes an event loop uses (poll_armed on the service side,
call_start / call_poll(arm=True) on the client side).

Peers run as real processes (tests/_ring_stress_child.py) where it matters; every wait has a
timeout.
"""

from __future__ import annotations

import os
import select
import struct
import threading
import time

import pytest
from _core_util import Chan, reap, result, spawn  # noqa: E402

from capbus import _core  # noqa: E402
from capbus._errors import (  # noqa: E402
    InvalidCapability,
    PeerDied,
    Timeout,
    WouldBlock,
)

SEC = 1_000_000_000
OP_ECHO, OP_STOP, OP_SLOW = 1, 2, 3


@pytest.fixture
def efd():
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    yield fd
    os.close(fd)


def lane(ch: Chan, db: int, mode: int = 1, **kw) -> _core.Lane:
    return _core.Lane(ch.chan, ch.ctrl, db, ch.index, ch.nslots, ch.arena, mode, **kw)


def server(db: int, *chs: Chan, mode: int = 1, **kw) -> _core.ServerSet:
    s = _core.ServerSet(db, mode, **kw)
    for c in chs:
        s.add(c.index, c.chan, c.ctrl, c.nslots, c.arena, 1000 + c.index)
    return s


def efd_count(fd: int) -> int:
    """Read (and so reset) an eventfd's counter; 0 if it was empty."""
    try:
        return struct.unpack("<Q", os.read(fd, 8))[0]
    except BlockingIOError:
        return 0


def wait_readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


# ---- poll and recv_many ------------------------------------------------------------------------


def test_poll_never_waits(db, chans):
    ch = chans(1)
    s = server(db, ch, mode=2)
    ln = lane(ch, db)
    t0 = time.monotonic()
    for _ in range(100):
        assert s.poll() is None
    assert time.monotonic() - t0 < 0.5
    ln.send(0, 1, 0, (7,))
    r = s.poll()
    assert isinstance(r, _core.Request) and r.data[0] == 7
    assert s.poll() is None
    # While another thread is inside recv, poll answers None at once (that thread takes them).
    got = []
    t = threading.Thread(target=lambda: got.append(s.recv(5 * SEC)))
    t.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    assert s.poll() is None and s.poll_armed() is None
    assert time.monotonic() - t0 < 0.1
    ln.send(0, 1, 0, (8,))
    t.join(10)
    assert got[0].data[0] == 8


def test_recv_many_basics(db, chans):
    a, b, c = chans(1), chans(2), chans(3)
    s = server(db, a, b, c)
    la, lb, lc = lane(a, db), lane(b, db), lane(c, db)
    t0 = time.monotonic()
    assert s.recv_many(10, 50_000_000) == []  # [] on timeout, no exception
    assert 0.04 < time.monotonic() - t0 < 5
    assert s.recv_many(10, 0) == []
    with pytest.raises(ValueError):
        s.recv_many(0)
    with pytest.raises(TypeError):
        s.recv_many()
    assert la.send_many(0, 0, [(1, (i,)) for i in range(10)]) == 10
    assert lb.send_many(0, 0, [(2, (i,)) for i in range(3)]) == 3
    assert lc.send_many(0, 0, [(3, (i,)) for i in range(5)]) == 5
    got = s.recv_many(7)
    assert [(r.index, r.data[0]) for r in got] == [(1, 0), (2, 0), (3, 0), (1, 1), (2, 1), (3, 1),
                                                   (1, 2)]
    got = s.recv_many(100, SEC)
    # Round robin goes on where it stopped; the drained channels drop out of the turns.
    assert [(r.index, r.data[0]) for r in got] == [(2, 2), (3, 2), (1, 3), (3, 3), (1, 4), (3, 4),
                                                   (1, 5), (1, 6), (1, 7), (1, 8), (1, 9)]
    assert all(isinstance(r, _core.Request) for r in got)
    assert s.recv_many(5, 0) == [] and s.poll() is None


def test_recv_many_waits_for_the_first(db, chans):
    ch = chans(1)
    s = server(db, ch, mode=2)
    ln = lane(ch, db)

    def later():
        time.sleep(0.1)
        ln.send_many(0, 0, [(1, (i,)) for i in range(3)])

    t = threading.Thread(target=later)
    t.start()
    t0 = time.monotonic()
    got = s.recv_many(10, 5 * SEC)
    t.join(10)
    assert 0.05 < time.monotonic() - t0 < 4
    assert 1 <= len(got) <= 3
    got += s.recv_many(10, 0)
    assert [r.data[0] for r in got] == [0, 1, 2]


def test_recv_many_and_poll_fair_across_four_producers(db, chans):
    n = 20_000
    chs = [chans(i, nslots=4096, arena=1 << 20) for i in (2, 40, 700, 4000)]
    s = server(db, *chs)
    procs = [spawn("producer", c.args(db, n=n, batch=512, tag=c.index), [db, c.chan, c.ctrl])
             for c in chs]
    try:
        maps = [c.map() for c in chs]
        tails = [c.layout()["req_tail"] for c in chs]
        end = time.monotonic() + 60
        while not all(_core.atomic_load_u64(m, t) >= 4000 for m, t in zip(maps, tails, strict=True)):
            assert time.monotonic() < end
            time.sleep(0.01)
        # Every ring holds >= 4000 messages (and is refilled): round robin must give each
        # producer exactly its share of the first 16000, whatever the batch sizes.
        counts = dict.fromkeys((c.index for c in chs), 0)
        seqs = {c.index: [] for c in chs}
        taken = 0
        k = 0
        while taken < 16_000:
            k += 1
            batch = [s.poll()] if k % 5 == 0 else s.recv_many(min(1 + k % 97, 16_000 - taken),
                                                                  10 * SEC)
            for r in batch:
                assert r is not None and r.opcode == r.index  # producers tag their messages
                counts[r.index] += 1
                seqs[r.index].append(r.data)
            taken += len(batch)
        assert set(counts.values()) == {4000}, counts
        # Then everything, complete and in order per producer.
        while sum(len(v) for v in seqs.values()) < 4 * n:
            batch = s.recv_many(256, 10 * SEC)
            assert batch, "stalled"
            for r in batch:
                seqs[r.index].append(r.data)
        for idx, got in seqs.items():
            assert got == [(i, i ^ 0xFFFF, i * 3, 0) for i in range(n)], idx
        assert s.recv_many(10, 20_000_000) == []
        for p in procs:
            assert result(p)["sent"] == n
    finally:
        reap(*procs)


def test_recv_many_returns_what_it_gathered_before_a_corruption(db, chans):
    good, bad = chans(1), chans(2)
    s = server(db, good, bad)
    lg, lb = lane(good, db), lane(bad, db)
    lg.send_many(0, 0, [(1, (i,)) for i in range(3)])
    lb.send_many(0, 0, [(2, (i,)) for i in range(3)])
    # The second message of `bad` repeats the first one's tag: corrupt when it is reached.
    lay = bad.layout()
    struct.pack_into("<Q", bad.map(), lay["req_slots"] + 64 + _core.SLOT_TAG_OFF, 1)
    got = s.recv_many(100, SEC)
    assert [(r.index, r.data[0]) for r in got] == [(1, 0), (2, 0), (1, 1)]
    assert s.is_dead(2)
    with pytest.raises(_core.CorruptChannel) as ei:  # raised by the NEXT call, once
        s.recv_many(100, SEC)
    assert ei.value.index == 2 and "tag" in ei.value.reason
    got = s.recv_many(100, SEC)
    assert [(r.index, r.data[0]) for r in got] == [(1, 2)]  # nothing was lost
    # The same for poll / recv as the next call.
    lb2 = chans(3)
    s.add(3, lb2.chan, lb2.ctrl, lb2.nslots, lb2.arena)
    l3 = lane(lb2, db)
    l3.send_many(0, 0, [(3, (i,)) for i in range(2)])
    lg.send(0, 1, 0, (3,))
    struct.pack_into("<Q", lb2.map(), lb2.layout()["req_slots"] + 64 + _core.SLOT_TAG_OFF, 1)
    got = s.recv_many(100, SEC)
    assert [(r.index, r.data[0]) for r in got] == [(1, 3), (3, 0)]
    with pytest.raises(_core.CorruptChannel):
        s.poll()
    assert s.poll() is None


def test_refused_counts(db, chans):
    ch = chans(1, nslots=4, arena=8192)
    s = server(db, ch)
    ln = lane(ch, db)
    assert ln.refused == 0 and s.refused(1) == 0
    assert ln.send_many(0, 0, [(1, ())] * 10) == 4
    assert ln.refused == 6
    with pytest.raises(WouldBlock):
        ln.send(0, 1, 0, ())
    with pytest.raises(WouldBlock):
        ln.call_start(0, 1, 0, ())
    assert ln.refused == 8 and s.refused(1) == 8
    s.recv_many(10, 0)
    ln.send(0, 1, 0, (), bytes(4000))
    with pytest.raises(WouldBlock):  # the arena, not the ring
        ln.send(0, 1, 0, (), bytes(4000))
    assert ln.refused == 9 and s.refused(1) == 9
    with pytest.raises(KeyError):
        s.refused(2)
    # Untrusted: whatever the client writes there is just reported.
    _core.atomic_store_u64(ch.map(), _core.CHAN_REFUSED_OFF, 2**64 - 1)
    assert s.refused(1) == 2**64 - 1


# ---- draining a closed channel --------------------------------------------------------------------


@pytest.mark.parametrize("state", [_core.STATE_PEER_DEAD, _core.STATE_CLOSED])
def test_drain_after_client_exit(db, chans, state):
    ch, other = chans(1), chans(2)
    s = server(db, ch, other)
    ln = lane(ch, db)
    ln.send(0, 1, 0, (0,), b"zero")
    with pytest.raises(Timeout):
        ln.call(0, 1, 0, (1,), None, 0)  # a call that timed out: cancelled, not drained
    ln.send(0, 1, 0, (2,))
    tag = ln.call_start(0, 1, 0, (3,))  # a call in flight when the client went away
    ln.send(0, 1, 0, (4,), bytes(100_000))
    ch.set_state(state)
    assert s.poll() is None  # not OPEN: skipped...
    s.remove(1, drain=True)  # ...until the runtime asks for a drain
    assert 1 not in s and len(s) == 1 and s.draining == 1
    got = s.recv_many(100, SEC)
    assert [r.data[0] for r in got] == [0, 2, 3, 4]
    assert got[0].payload == b"zero" and got[3].payload == bytes(100_000)
    call = got[2]
    assert call.expects_reply and call.tag == tag and call.index == 1
    assert call.reply(5) is False  # its client is gone: dropped
    assert call.replied
    assert s.poll() is None and s.draining == 0
    assert s.recv_many(10, 20_000_000) == []


def test_drain_while_the_index_is_reused(db, chans):
    old, new = chans(1), chans(1)
    s = server(db, old)
    lo = lane(old, db)
    lo.send_many(0, 0, [(1, (i,)) for i in range(5)])
    tag = lo.call_start(0, 1, 0, (5,))
    old.set_state(_core.STATE_CLOSED)
    s.remove(1, drain=True)
    # The kernel hands index 1 to a new channel at once.
    s.add(1, new.chan, new.ctrl, new.nslots, new.arena, 2000)
    ln = lane(new, db)
    ln.send(0, 2, 0, (100,))
    got = s.recv_many(100, SEC)
    got += s.recv_many(100, 0)
    assert sorted((r.opcode, r.data[0]) for r in got) == [(1, i) for i in range(6)] + [(2, 100)]
    drained_call = next(r for r in got if r.opcode == 1 and r.data[0] == 5)
    assert drained_call.tag == tag and drained_call.index == 1 and drained_call.sender == 1001
    # Its reply must not reach the new channel at the same index.
    assert drained_call.reply(9) is False
    assert s.draining == 0 and 1 in s and len(s) == 1
    assert _core.atomic_load_u64(new.map(), new.layout()["resp_tail"]) == 0


def test_drain_is_bounded_by_the_tail_at_remove(db, chans):
    ch = chans(1)
    s = server(db, ch)
    ln = lane(ch, db)
    ln.send_many(0, 0, [(1, (i,)) for i in range(3)])
    ch.set_state(_core.STATE_CLOSED)
    s.remove(1, drain=True)
    # A client that is still alive keeps writing: nothing after the drain point is delivered.
    m, lay = ch.map(), ch.layout()
    tail = _core.atomic_load_u64(m, lay["req_tail"])
    for i in range(3):
        off = lay["req_slots"] + 64 * (tail + i)
        struct.pack_into("<QII4QQII", m, off, 0, 1, 0, 100 + i, 0, 0, 0, tail + i + 1, 0, 0)
    _core.atomic_store_u64(m, lay["req_tail"], tail + 3)
    got = s.recv_many(100, SEC) + s.recv_many(100, 50_000_000)
    assert [r.data[0] for r in got] == [0, 1, 2]
    assert s.draining == 0


def test_no_drain_for_a_revoked_channel(db, chans):
    ch = chans(1)
    s = server(db, ch)
    ln = lane(ch, db)
    ln.send_many(0, 0, [(1, (i,)) for i in range(3)])
    ch.set_state(_core.STATE_REVOKED)
    s.remove(1, drain=True)
    assert s.draining == 0 and 1 not in s
    assert s.recv_many(10, 50_000_000) == []


def test_drain_stops_when_revoked_midway(db, chans):
    ch = chans(1)
    s = server(db, ch)
    ln = lane(ch, db)
    ln.send_many(0, 0, [(1, (i,)) for i in range(5)])
    ch.set_state(_core.STATE_PEER_DEAD)
    s.remove(1, drain=True)
    assert s.poll().data[0] == 0
    ch.set_state(_core.STATE_REVOKED)
    assert s.poll() is None and s.draining == 0


def test_drain_of_a_corrupt_channel_ends_quietly(db, chans):
    ch = chans(1)
    s = server(db, ch)
    ln = lane(ch, db)
    ln.send_many(0, 0, [(1, (i,)) for i in range(3)])
    struct.pack_into("<Q", ch.map(), ch.layout()["req_slots"] + 64 + _core.SLOT_TAG_OFF, 1)
    ch.set_state(_core.STATE_PEER_DEAD)
    s.remove(1, drain=True)
    # Its index may already belong to someone else: no CorruptChannel to report, just the end.
    assert [r.data[0] for r in s.recv_many(10, SEC)] == [0]
    assert s.recv_many(10, 20_000_000) == [] and s.draining == 0


def test_remove_without_drain_and_empty_drain(db, chans):
    ch = chans(1)
    s = server(db, ch)
    ln = lane(ch, db)
    s.remove(1, drain=True)  # nothing queued: removed at once
    assert 1 not in s and s.draining == 0
    s.add(1, ch.chan, ch.ctrl, ch.nslots, ch.arena)
    ln.send(0, 1, 0, ())
    ch.set_state(_core.STATE_PEER_DEAD)
    s.remove(1)  # drain=False: the queued message is gone with the channel
    assert s.recv_many(10, 20_000_000) == []
    with pytest.raises(KeyError):
        s.remove(1, drain=True)


# ---- the service's eventfd: poll_armed -----------------------------------------------------------


def test_poll_armed_in_process(db, chans, efd):
    import mmap

    ch, other = chans(1), chans(2)
    s = server(db, ch, other, event_fd=efd)
    ln = lane(ch, db, bell_event_fd=efd)
    plain = lane(other, db)  # a lane that was not given the eventfd
    dbm = mmap.mmap(db, _core.DOORBELL_SIZE)
    try:
        ln.send(0, 1, 0, (1,))  # not armed: no eventfd write
        assert efd_count(efd) == 0
        assert s.poll_armed().data[0] == 1  # a message: returned, not armed
        assert _core.atomic_load_u32(dbm, _core.DB_EVENT_WANTED_OFF) == 0
        assert s.poll_armed() is None  # armed
        assert _core.atomic_load_u32(dbm, _core.DB_EVENT_WANTED_OFF) == 1
        ln.send(0, 1, 0, (2,))
        assert efd_count(efd) == 1
        ln.send(0, 1, 0, (3,))  # still armed (nobody took anything): another write
        assert efd_count(efd) == 1
        assert s.poll().data[0] == 2  # a returned message clears the flag
        assert _core.atomic_load_u32(dbm, _core.DB_EVENT_WANTED_OFF) == 0
        ln.send(0, 1, 0, (4,))
        assert efd_count(efd) == 0
        assert [r.data[0] for r in s.recv_many(10, 0)] == [3, 4]
        # A stale count is emptied by the next arming.
        os.write(efd, (5).to_bytes(8, "little"))
        assert s.poll_armed() is None and efd_count(efd) == 0
        # A lane without the eventfd cannot write it (it still rings the futex doorbell).
        plain.send(0, 1, 0, (6,))
        assert efd_count(efd) == 0
        assert s.poll_armed().data[0] == 6
    finally:
        dbm.close()


def test_poll_armed_wakeups_from_another_process(db, chans, efd):
    ch = chans(1)
    s = server(db, ch, event_fd=efd)
    n = 20
    p = spawn("event_sender", ch.args(db, n=n, gap=0.02, bell_efd=efd), [db, ch.chan, ch.ctrl, efd])
    got, wakeups, spurious = [], 0, 0
    try:
        end = time.monotonic() + 30
        while len(got) < n:
            assert time.monotonic() < end
            r = s.poll_armed()
            if r is not None:
                got.append(r.data[0])
                continue
            # Armed with nothing pending: only the client's eventfd write can wake us; with no
            # hostile peers a wake-up must come within the client's gap, never the timeout.
            assert wait_readable(efd, 5.0), f"no wake-up after {len(got)} messages"
            wakeups += 1
            before = len(got)
            while (r := s.poll()) is not None:
                got.append(r.data[0])
            spurious += len(got) == before
        assert result(p)["sent"] == n
    finally:
        reap(p)
    assert got == list(range(n))
    assert wakeups >= n // 2 and spurious <= 2


def test_hostile_client_causes_only_spurious_wakeups(db, chans, efd):
    good, bad = chans(1), chans(2)
    s = server(db, good, bad, event_fd=efd)
    n = 60
    honest = spawn("event_sender", good.args(db, n=n, gap=0.01, bell_efd=efd),
                   [db, good.chan, good.ctrl, efd])
    hostile = spawn("hostile_events", bad.args(db, seconds=3, efd=efd),
                    [db, bad.chan, bad.ctrl, efd])
    got, wakeups, empty_wakeups, fallbacks = [], 0, 0, 0
    try:
        end = time.monotonic() + 40
        while len(got) < n:
            assert time.monotonic() < end
            r = s.poll_armed()
            if r is not None:
                assert r.index == 1
                got.append(r.data[0])
                continue
            # The documented bound: re-poll at least every SLEEP_CAP_NS while armed (a client
            # that clears the flag can make others skip their write).
            if wait_readable(efd, _core.SLEEP_CAP_NS / 1e9):
                wakeups += 1
                r = s.poll()
                if r is None:
                    empty_wakeups += 1
                else:
                    got.append(r.data[0])
            else:
                fallbacks += 1
        assert result(honest, 30)["sent"] == n
        result(hostile, 30)
    finally:
        reap(honest, hostile)
    # Every honest message arrived, in order, from the honest channel only (the hostile one
    # never sent anything); the hostile writes only cost empty wake-ups.
    assert got == list(range(n))
    assert wakeups > 0 and empty_wakeups > 0
    assert not s.is_dead(1) and not s.is_dead(2)


# ---- the client's eventfd: call_start / call_poll ----------------------------------------------------


def test_call_start_and_poll_in_process(db, chans, efd):
    ch = chans(1)
    s = _core.ServerSet(db)
    s.add(1, ch.chan, ch.ctrl, ch.nslots, ch.arena, 5, reply_event_fd=efd)
    ln = lane(ch, db, reply_event_fd=efd)
    cons_event = ch.layout()["resp_consumer_event"]
    m = ch.map()
    tag = ln.call_start(3, 10, 0x10000, [1, 2], b"req")
    assert tag == ln.last_tag == 1
    assert ln.call_poll(tag) is None
    assert _core.atomic_load_u32(m, cons_event) == 0
    assert ln.call_poll(tag, arm=True) is None  # armed
    assert _core.atomic_load_u32(m, cons_event) == 1
    r = s.poll()
    assert (r.capability, r.opcode, r.flags, r.data, r.payload, r.expects_reply) == (
        3, 10, 0x10000, (1, 2, 0, 0), b"req", True)
    r.reply(11, r.data, b"rep", 0x20000)
    assert efd_count(efd) == 1  # the server saw the flag
    msg = ln.call_poll(tag, arm=True)
    assert msg == (11, 0x20000, 1, 2, 0, 0, b"rep")
    assert _core.atomic_load_u32(m, cons_event) == 0  # taking the reply disarms
    # Not armed: the server does not write the eventfd.
    tag = ln.call_start(3, 10, 0, ())
    s.poll().reply(12)
    assert efd_count(efd) == 0
    assert ln.call_poll(tag)[0] == 12
    # Wrong tags.
    with pytest.raises(ValueError):
        ln.call_poll(tag + 1)
    with pytest.raises(ValueError):
        ln.call_poll(0)
    ln.send(0, 1, 0, ())  # a send after the call: the call's tag is still the one to poll
    tag = ln.call_start(0, 1, 0, ())
    ln.send(0, 1, 0, ())
    got = s.recv_many(10, 0)
    assert [g.expects_reply for g in got] == [False, True, False]
    got[1].reply(13)
    assert ln.call_poll(tag)[0] == 13


def test_call_wait_is_bounded_and_leaves_the_call_pending(db, chans):
    """call_wait: the reply if it comes within the time given (waited for without the GIL: a
    server thread of this process answers meanwhile), else None with the call still pending
    (poll, wait or cancel it later); the server's death is raised, not waited out."""
    ch = chans(1)
    s = server(db, ch)
    ln = lane(ch, db)
    tag = ln.call_start(0, 1, 0, (7,), b"q")
    t0 = time.monotonic()
    assert ln.call_wait(tag, 20_000_000) is None  # nobody serves yet: 20 ms, then None
    assert 0.015 < time.monotonic() - t0 < 2
    assert ln.call_wait(tag, 0) is None  # 0: only a look
    got = []

    def serve():
        r = s.recv(5 * SEC)
        got.append(r.data[0])
        time.sleep(0.05)
        r.reply(9, r.data, b"r")

    t = threading.Thread(target=serve)
    t.start()
    msg = ln.call_wait(tag, 5 * SEC)  # the same call, still pending: its reply comes
    t.join(10)
    assert got == [7] and msg == (9, 0, 7, 0, 0, 0, b"r")
    with pytest.raises(ValueError):
        ln.call_wait(tag + 1, 0)  # not this lane's latest call
    # Pending, then cancelled: the server skips it, and the lane goes on.
    tag = ln.call_start(0, 1, 0, ())
    assert ln.call_wait(tag, 1_000_000) is None
    ln.cancel(tag)
    assert s.poll() is None
    tag = ln.call_start(0, 1, 0, ())
    s.poll().reply(5)
    assert ln.call_wait(tag, 5 * SEC)[0] == 5
    # The server dies while we wait: PeerDied at once, not at the end of the wait.
    tag = ln.call_start(0, 1, 0, ())
    threading.Timer(0.05, ch.set_state, (_core.STATE_PEER_DEAD,)).start()
    t0 = time.monotonic()
    with pytest.raises(PeerDied):
        ln.call_wait(tag, 30 * SEC)
    assert time.monotonic() - t0 < 5


def test_call_start_then_call_drops_the_old_reply(db, chans):
    ch = chans(1)
    s = server(db, ch)
    ln = lane(ch, db)
    t1 = ln.call_start(0, 1, 0, (1,))
    s.poll().reply(1)

    def serve():
        s.recv(5 * SEC).reply(2)

    t = threading.Thread(target=serve)
    t.start()
    assert ln.call(0, 1, 0, (2,), None, 5 * SEC)[0] == 2  # the reply for t1 was dropped
    t.join(10)
    with pytest.raises(ValueError):
        ln.call_poll(t1)


def test_call_poll_errors_and_cancel(db, chans):
    ch = chans(1, nslots=4)
    s = server(db, ch)
    ln = lane(ch, db)
    tag = ln.call_start(0, 1, 0, ())
    ln.cancel(tag)
    assert _core.atomic_load_u64(ch.map(), _core.CHAN_CANCEL_BELOW_OFF) == tag + 1
    assert s.poll() is None  # the server skips a cancelled call
    with pytest.raises(ValueError):
        ln.cancel(tag + 5)  # never sent
    ln.cancel(0)  # never moves the mark back
    assert _core.atomic_load_u64(ch.map(), _core.CHAN_CANCEL_BELOW_OFF) == tag + 1
    # Ring full: WouldBlock, counted as refused.
    for _ in range(4):
        ln.send(0, 1, 0, ())
    with pytest.raises(WouldBlock):
        ln.call_start(0, 1, 0, ())
    assert ln.refused == 1
    s.recv_many(10, 0)
    tag = ln.call_start(0, 1, 0, ())
    ch.set_state(_core.STATE_PEER_DEAD)
    with pytest.raises(PeerDied):
        ln.call_poll(tag, arm=True)
    with pytest.raises(PeerDied):
        ln.call_start(0, 1, 0, ())
    ch.set_state(_core.STATE_REVOKED)
    with pytest.raises(InvalidCapability):
        ln.call_poll(tag)


def test_reply_published_before_state_change_reaches_call_poll(db, chans):
    ch = chans(1)
    s = server(db, ch)
    ln = lane(ch, db)
    tag = ln.call_start(0, 1, 0, ())
    s.poll().reply(4)
    ch.set_state(_core.STATE_PEER_DEAD)
    assert ln.call_poll(tag)[0] == 4


def test_call_poll_hostile_server_reply(db, chans):
    from capbus._errors import ProtocolError

    ch = chans(1)
    s = server(db, ch)
    ln = lane(ch, db)
    tag = ln.call_start(0, 1, 0, ())
    s.reply(1, tag + 7, 0, 0, ())  # a reply for a request never sent
    with pytest.raises(ProtocolError, match="never sent"):
        ln.call_poll(tag)
    assert ln.broken


def test_call_poll_wakeup_from_another_process(db, chans, efd):
    ch = chans(1)
    # The echo server in another process knows the client's reply eventfd.
    args = ch.args(db)
    srv = spawn("echo_server", {"db": db, "channels": [dict(args, reply_efd=efd)], "mode": 2},
                [db, ch.chan, ch.ctrl, efd])
    try:
        ln = lane(ch, db, reply_event_fd=efd)
        for i in range(10):
            tag = ln.call_start(0, OP_SLOW, 0, (i, 20), b"p%d" % i)  # the server sleeps 20 ms
            t0 = time.monotonic()
            msg = ln.call_poll(tag, arm=True)
            while msg is None:
                assert wait_readable(efd, 5.0), "no wake-up for the reply"
                msg = ln.call_poll(tag, arm=True)
            assert time.monotonic() - t0 >= 0.015
            assert msg[0] == OP_SLOW + 100 and msg[2] == i and msg[6] == b"p%d" % i
        ln.call(0, OP_STOP, 0, (), None, 10 * SEC)
        assert result(srv)["served"] == 10
    finally:
        reap(srv)


def test_hostile_consumer_event_flag_costs_only_its_own_wakeups(db, chans, efd):
    # A client that keeps its own consumer-event flag set makes the server write ITS reply
    # eventfd on every reply; nothing else changes.
    ch = chans(1)
    s = _core.ServerSet(db)
    s.add(1, ch.chan, ch.ctrl, ch.nslots, ch.arena, 5, reply_event_fd=efd)
    ln = lane(ch, db)
    _core.atomic_store_u32(ch.map(), ch.layout()["resp_consumer_event"], 1)

    def serve():
        for _ in range(20):
            s.recv(5 * SEC).reply(1)

    t = threading.Thread(target=serve)
    t.start()
    for i in range(20):
        assert ln.call(0, 1, 0, (i,), None, 5 * SEC)[0] == 1
    t.join(10)
    assert efd_count(efd) == 20


def test_eventfd_arguments(db, chans):
    ch = chans(1)
    with pytest.raises(OSError):
        _core.ServerSet(db, event_fd=999_999)
    with pytest.raises(OSError):
        lane(ch, db, bell_event_fd=999_999)
    s = _core.ServerSet(db)
    with pytest.raises(OSError):
        s.add(1, ch.chan, ch.ctrl, ch.nslots, ch.arena, reply_event_fd=999_999)
    assert 1 not in s
    # The core keeps its own duplicates: the caller may close its fds.
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    ln = lane(ch, db, bell_event_fd=fd)
    s2 = _core.ServerSet(db, event_fd=fd)
    s2.add(1, ch.chan, ch.ctrl, ch.nslots, ch.arena)
    os.close(fd)
    assert s2.poll_armed() is None
    ln.send(0, 1, 0, ())
    assert s2.poll().opcode == 1
    ln.close()
    s2.close()
    s.close()


# ---- waiting for room: Lane.want_room and the server's wake-up --------------------------------


def test_want_room_makes_the_server_write_the_reply_eventfd_as_it_frees_room(db, chans, efd):
    ch = chans(1, nslots=4, arena=1 << 18)
    s = _core.ServerSet(db)
    s.add(1, ch.chan, ch.ctrl, ch.nslots, ch.arena, 5, reply_event_fd=efd)
    ln = lane(ch, db, reply_event_fd=efd)
    flag = ch.layout()["req_ring"] + _core.RING_PRODUCER_WAITING_OFF
    m = ch.map()
    for i in range(4):
        ln.send(0, 1, 0, (i,))
    with pytest.raises(WouldBlock):
        ln.send(0, 1, 0, (4,))
    # Not waiting: consuming frees room, and nobody is told.
    assert s.poll().data[0] == 0
    assert efd_count(efd) == 0
    ln.send(0, 1, 0, (4,))
    os.eventfd_write(efd, 5)  # a stale count: arming empties it
    ln.want_room(True)
    # The target: head 1 + half of the 4 outstanding (woken once per half ring, not per message).
    assert _core.atomic_load_u32(m, flag) == 3 and efd_count(efd) == 0
    with pytest.raises(WouldBlock):
        ln.send(0, 1, 0, (5,))
    assert s.poll().data[0] == 1
    assert efd_count(efd) == 0  # head 2: not yet
    assert s.poll().data[0] == 2
    assert efd_count(efd) == 1  # head 3: woken
    assert s.poll().data[0] == 3
    assert efd_count(efd) == 0  # once per target
    ln.send(0, 1, 0, (5,))
    ln.want_room(False)
    assert _core.atomic_load_u32(m, flag) == 0
    assert [s.poll().data[0] for _ in range(2)] == [4, 5]
    assert efd_count(efd) == 0
    # Arena room: a held zero-copy payload fills the arena; its release wakes the waiter.
    big = 150_000  # >= ZC_THRESHOLD: received in place, held until released
    ln.send(0, 1, 0, (), b"x" * big)
    req = s.poll()
    assert len(req.payload) == big
    with pytest.raises(WouldBlock):
        ln.send(0, 1, 0, (), b"y" * big)
    ln.want_room(True)
    req.release()
    assert efd_count(efd) == 1
    ln.send(0, 1, 0, (), b"y" * big)
    ln.want_room(False)
    assert bytes(s.poll().payload) == b"y" * big


def test_a_scribbled_producer_waiting_flag_only_wakes_that_client(db, chans, efd):
    """The flag is client-written: any value only makes the server write that client's own
    eventfd (no error, no effect on another channel)."""
    a, b = chans(1, nslots=4), chans(2, nslots=4)
    other = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        s = _core.ServerSet(db)
        s.add(1, a.chan, a.ctrl, a.nslots, a.arena, 5, reply_event_fd=efd)
        s.add(2, b.chan, b.ctrl, b.nslots, b.arena, 6, reply_event_fd=other)
        la, lb = lane(a, db, reply_event_fd=efd), lane(b, db, reply_event_fd=other)
        flag = a.layout()["req_ring"] + _core.RING_PRODUCER_WAITING_OFF
        _core.atomic_store_u32(a.map(), flag, 0xDEADBEEF)
        la.send(0, 1, 0, (1,))
        lb.send(0, 1, 0, (2,))
        assert sorted(s.poll().data[0] for _ in range(2)) == [1, 2]
        assert efd_count(efd) == 1 and efd_count(other) == 0
        assert not s.is_dead(1) and not s.is_dead(2)
    finally:
        os.close(other)
