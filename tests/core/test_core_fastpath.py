"""The round trip's fast paths in the native core, checked for what they must not change:

* Messages and Requests come from free lists: a reused object carries only its own message's
  fields, and objects still alive are never reused;
* recv_mu and a channel's reply lock are taken without a locked instruction when free (the GIL
  serialises takers): several receiving threads, and several replying threads with small and big
  (copied without the GIL) payloads on one channel, lose, duplicate and mix up nothing;
* small ints are read and made without calls into the interpreter: every boundary still
  round-trips, and every bad value is still refused;
* keyword arguments are found by the identity of the call site's interned name when it was seen
  before: a fresh (not interned) name, a str subclass, a misspelt or repeated one, and a flood of
  distinct names are each still read or refused as by name;
* the call-latency clock (the TSC where it is the kernel's clocksource) agrees with wall time.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time

import pytest
from _core_util import RawClient  # noqa: E402

from capbus import _core  # noqa: E402
from capbus._errors import Timeout  # noqa: E402

SEC = 1_000_000_000


def server(db, ch):
    s = _core.ServerSet(db)
    s.add(ch.index, ch.chan, ch.ctrl, ch.nslots, ch.arena, 1000 + ch.index)
    return s


def lane(ch, db):
    return _core.Lane(ch.chan, ch.ctrl, db, ch.index, ch.nslots, ch.arena)


@contextlib.contextmanager
def echoing(db, chans, index: int, delay: float = 0.0):
    """(channel, Lane) with an echo server thread in this process, stopped and closed after."""
    ch = chans(index)
    s = server(db, ch)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                r = s.recv(SEC // 20)
            except Timeout:
                continue
            if delay:
                time.sleep(delay)
            r.reply(r.opcode, r.data, r.payload)

    t = threading.Thread(target=serve)
    t.start()
    try:
        yield ch, lane(ch, db)
    finally:
        stop.set()
        t.join(10)
        s.close()


def test_recycled_requests_carry_their_own_fields(db, chans):
    ch = chans(1)
    s = server(db, ch)
    raw = RawClient(ch, db)
    try:
        kept = []
        seen_ids = set()
        for i in range(60):
            raw.write(i, (i, i + 1, 2**40 + i, 2**64 - 1 - i), b"p%d" % i if i % 3 else None,
                      call=i % 2 == 0)
            r = s.recv(SEC)
            seen_ids.add(id(r))
            assert r.data == (i, i + 1, 2**40 + i, 2**64 - 1 - i)  # built now, cached
            assert (r.opcode, r.payload, r.caps, r.regions) == (
                i, b"p%d" % i if i % 3 else b"", (), ())
            assert r.expects_reply == (i % 2 == 0) and not r.replied and r.sender == 1001
            if i % 4 == 0:
                kept.append((i, r))  # alive: must never be handed out again
            elif r.expects_reply:
                r.reply(i)  # answered, then freed: the next request starts unanswered
                assert r.replied
            del r
        # fewer distinct objects than requests: the free list was used
        assert len(seen_ids) < 60
        for i, r in kept:
            assert r.opcode == i and r.data == (i, i + 1, 2**40 + i, 2**64 - 1 - i)
            assert r.payload == (b"p%d" % i if i % 3 else b"")
        # a recycled request answers for itself
        raw.write(77, (7,), b"last", call=True)
        r = s.recv(SEC)
        r.reply(78, (r.data[0] + 1,), b"ok")
        assert r.replied
        replies = []
        while (rep := raw.read_reply()) is not None:
            replies.append(rep)
        assert [rep[1] for rep in replies] == [i for i in range(60) if i % 4 == 2] + [78]
        assert replies[-1][1:] == (78, replies[-1][2], (8, 0, 0, 0), b"ok")
    finally:
        raw.close()
        s.close()


def test_recycled_messages_keep_their_values(db, chans):
    with echoing(db, chans, 2) as (_ch, ln):
        kept = []
        for i in range(200):
            m = ln.call(0, i % 300, 0, (i, 255, 256, 2**62 + i), b"m%d" % i if i % 2 else None,
                        SEC * 5)
            assert tuple(m) == (i % 300, 0, i, 255, 256, 2**62 + i,
                                b"m%d" % i if i % 2 else None)
            if i % 10 == 0:
                kept.append((i, m))
            del m
        for i, m in kept:
            assert m[0] == i and m[2] == i and m[5] == 2**62 + i
        gc.collect()  # the collector sees well-formed objects (tracked, sized, typed)
        for i, m in kept:
            assert m[6] == (b"m%d" % i if i % 2 else None)


def test_int_boundaries_and_bad_values(db, chans):
    class MyInt(int):
        pass

    with echoing(db, chans, 3) as (_ch, ln):
        values = (0, 255, 256, 2**30 - 1, 2**30, 2**31, 2**63, 2**64 - 1)
        for v in values:
            got = ln.call(0, 7, 0, (v, v, v, v), None, SEC * 5)
            assert got[2:6] == (v, v, v, v)
        # bool and int subclasses take the general path, with the same result
        assert ln.call(0, True, 0, (True, MyInt(5), MyInt(2**40), False), None, SEC * 5)[:6] == (
            1, 0, 1, 5, 2**40, 0)
        assert ln.call(0, 2**32 - 1, 0, (), None, SEC * 5)[0] == 2**32 - 1
        for bad in [(-1,), (2**64,), (-(2**30),), (1.0,), ("1",)]:
            with pytest.raises((ValueError, TypeError)):
                ln.call(0, 1, 0, bad, None, SEC)
        for bad_opcode in (-1, 2**32, MyInt(-3)):
            with pytest.raises(ValueError):
                ln.call(0, bad_opcode, 0, (), None, SEC)
        assert ln.call(0, 1, 0, (1, 2, 3, 4), None, SEC * 5)[:6] == (1, 0, 1, 2, 3, 4)


def test_keyword_names_by_identity_and_by_value(db, chans):
    class Name(str):
        pass

    fresh = "".join(["timeout", "_ns"])  # equal to the interned name, another object
    assert fresh == "timeout_ns" and fresh is not "timeout_ns"  # noqa: F632
    with echoing(db, chans, 5) as (_ch, ln):
        for _ in range(3):  # the first call remembers the interned name, the next find it so
            assert ln.call(0, 7, 0, (1,), None, timeout_ns=SEC * 5)[0] == 7
            assert ln.call(0, 8, 0, (1,), None, **{fresh: SEC * 5})[0] == 8
            assert ln.call(0, 9, 0, (1,), None, **{Name("timeout_ns"): SEC * 5})[0] == 9
            assert ln.call(capability=0, opcode=10, flags=0, data=(2,), payload=b"x",
                           timeout_ns=SEC * 5)[:3] == (10, 0, 2)
        with pytest.raises(TypeError, match="unexpected keyword argument 'timeout'"):
            ln.call(0, 1, 0, (), None, timeout=SEC)
        with pytest.raises(TypeError, match="multiple values for argument 'opcode'"):
            ln.call(0, 1, opcode=2)
        with pytest.raises(TypeError, match="missing required argument 'data'"):
            ln.call(0, 1, 0, timeout_ns=SEC)
        # Many distinct names (each a fresh object) hold nothing and confuse nothing.
        for i in range(2000):
            with pytest.raises(TypeError, match="unexpected keyword"):
                ln.call(0, 1, 0, (), None, **{f"t{i}": SEC})
        assert ln.call(0, 11, 0, (), None, timeout_ns=SEC * 5)[0] == 11


def test_two_receiving_threads_share_every_message(db, chans):
    ch = chans(4)
    s = server(db, ch)
    raw = RawClient(ch, db)
    n = 200
    got: list[list[int]] = [[], []]
    errors = []

    def receive(k):
        try:
            while sum(map(len, got)) < n:
                try:
                    r = s.recv(SEC // 10)
                except Timeout:
                    continue
                got[k].append(r.opcode)
                time.sleep(0)  # let the other thread contend for the receive lock
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=receive, args=(k,)) for k in range(2)]
    for th in threads:
        th.start()
    try:
        for i in range(n):
            raw.write(i + 1, (i,))
            if i % 7 == 0:
                time.sleep(0.001)
    finally:
        for th in threads:
            th.join(30)
        raw.close()
        s.close()
    assert not errors and not any(th.is_alive() for th in threads)
    assert sorted(got[0] + got[1]) == list(range(1, n + 1))


def test_replies_from_threads_small_and_big_on_one_channel(db, chans):
    ch = chans(5, arena=8 << 20)
    s = server(db, ch)
    raw = RawClient(ch, db)
    n, big = 40, 80 << 10  # big replies are copied without the GIL, under the channel's lock
    try:
        for i in range(n):
            raw.write(i, (i,), call=True)
        reqs = [s.recv(SEC) for _ in range(n)]
        assert [r.opcode for r in reqs] == list(range(n))

        def payload(i):
            return bytes([i]) * (big if i % 2 else 100)

        def answer(part):
            for r in part:
                r.reply(r.opcode + 1000, (r.data[0],), payload(r.opcode))

        threads = [threading.Thread(target=answer, args=(reqs[k::4],)) for k in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        assert not any(th.is_alive() for th in threads)
        replies = {}
        while (rep := raw.read_reply()) is not None:
            tag, op, _flags, data, pl = rep
            replies[op - 1000] = (tag, data, pl)
        assert sorted(replies) == list(range(n))
        for i, (tag, data, pl) in replies.items():
            assert tag == i + 1 and data == (i, 0, 0, 0) and pl == payload(i)
    finally:
        raw.close()
        s.close()


def test_call_latency_clock_agrees_with_wall_time(db, chans):
    with echoing(db, chans, 6, delay=0.2) as (ch, ln):
        time.sleep(0.06)  # past the TSC rate measurement window (50 ms after import)
        ln.call(0, 1, 0, (), None, SEC * 5)  # the first call after it measures the rate
        clock = _core.latency_clock()
        with open("/sys/devices/system/clocksource/clocksource0/current_clocksource") as f:
            source = f.read().strip()
        if source == "tsc" and os.uname().machine == "x86_64":
            assert clock == "tsc"
        else:
            assert clock.startswith("monotonic")
        before = _core.channel_stats(ch.map())
        t0 = time.monotonic_ns()
        ln.call(0, 1, 0, (), None, SEC * 5)
        wall = time.monotonic_ns() - t0
        after = _core.channel_stats(ch.map())
        lat = after["latency_sum_ns"] - before["latency_sum_ns"]
        assert after["latency_count"] == before["latency_count"] + 1
        assert 0.2 * SEC * 0.99 <= lat <= wall * 1.01, (lat, wall, clock)
