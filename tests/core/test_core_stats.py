"""The metrics counters in a channel's header page (client block at CHAN_CSTATS_OFF, written by the
Lane; server block at CHAN_SSTATS_OFF, written by the ServerSet) and _core.channel_stats, which
reads both from any buffer (the kernel uses its own mapping of the header page; so do these tests,
through a separate mapping of the channel memfd)."""

from __future__ import annotations

import random
import threading
import time

import pytest
from _core_util import Chan, RawClient, channel_layout, set_limits  # noqa: E402

from capbus import _core  # noqa: E402
from capbus._errors import (  # noqa: E402
    InvalidCapability,
    MessageTooLarge,
    PermissionDenied,
    RateLimitExceeded,
    Timeout,
    WouldBlock,
)

SEC = 1_000_000_000
KEYS = {"sent", "bytes_sent", "calls", "timeouts", "refused_wouldblock", "refused_rate",
        "refused_size", "refused_perm", "latency_max_ns", "latency_sum_ns", "latency_count",
        "sent_last_second", "hist", "received", "bytes_received", "replies", "reply_failed",
        "drops_rate", "drops_bandwidth", "drops_size", "drops_expired", "drops_rights",
        "cancelled", "received_last_second"}




def setup(db, chans, **kw):
    ch = chans(1, **kw)
    s = _core.ServerSet(db)
    s.add(1, ch.chan, ch.ctrl, ch.nslots, ch.arena, 42)
    ln = _core.Lane(ch.chan, ch.ctrl, db, 1, ch.nslots, ch.arena)
    return ch, s, ln


def stats(ch: Chan) -> dict:
    return _core.channel_stats(ch.map())


def zero_except(st: dict, **want) -> None:
    """Every counter is 0 (hist all 0) except the given ones, which are exactly as given."""
    for k in KEYS - {"hist"}:
        assert st[k] == want.get(k, 0), (k, st[k], want.get(k, 0))


def serve_one(s, delay: float = 0.0, reply: bool = True):
    def run():
        r = s.recv(5 * SEC)
        time.sleep(delay)
        if reply:
            r.reply(r.opcode, r.data)

    t = threading.Thread(target=run)
    t.start()
    return t


def test_layout():
    c = _core
    assert (c.CHAN_CSTATS_OFF, c.CHAN_SSTATS_OFF, c.STATS_HIST_BUCKETS) == (1024, 2048, 28)
    client = [c.CSTATS_SENT_OFF, c.CSTATS_BYTES_SENT_OFF, c.CSTATS_CALLS_OFF, c.CSTATS_TIMEOUTS_OFF,
              c.CSTATS_REFUSED_RATE_OFF, c.CSTATS_REFUSED_SIZE_OFF, c.CSTATS_REFUSED_PERM_OFF,
              c.CSTATS_LATENCY_MAX_OFF, c.CSTATS_LATENCY_SUM_OFF, c.CSTATS_LATENCY_COUNT_OFF,
              c.CSTATS_SEC_INDEX_OFF, c.CSTATS_SEC_COUNT_OFF, c.CSTATS_PREV_COUNT_OFF]
    assert client == list(range(0, 104, 8))
    assert c.CSTATS_HIST_OFF == 128 and c.CSTATS_SIZE == 128 + 8 * 28
    server = [c.SSTATS_RECEIVED_OFF, c.SSTATS_BYTES_RECEIVED_OFF, c.SSTATS_REPLIES_OFF,
              c.SSTATS_REPLY_FAILED_OFF, c.SSTATS_DROPS_RATE_OFF, c.SSTATS_DROPS_BANDWIDTH_OFF,
              c.SSTATS_DROPS_SIZE_OFF, c.SSTATS_DROPS_EXPIRED_OFF, c.SSTATS_DROPS_RIGHTS_OFF,
              c.SSTATS_CANCELLED_OFF, c.SSTATS_SEC_INDEX_OFF, c.SSTATS_SEC_COUNT_OFF,
              c.SSTATS_PREV_COUNT_OFF]
    assert server == list(range(0, 104, 8))
    assert c.STATS_HIST_BASE_NS == 100 and c.CHAN_REFUSED_OFF + 8 <= c.CHAN_CSTATS_OFF
    assert c.CHAN_CSTATS_OFF + c.CSTATS_SIZE <= c.CHAN_SSTATS_OFF
    assert c.CHAN_SSTATS_OFF + c.SSTATS_SIZE <= c.CHAN_HEADER_SIZE
    lay = channel_layout()
    assert (lay["cstats"], lay["sstats"]) == (1024, 2048)


def test_a_fresh_channel_reads_all_zero(db, chans):
    ch, s, ln = setup(db, chans)
    st = stats(ch)
    assert set(st) == KEYS and st["hist"] == [0] * 28
    zero_except(st)


def test_counters_match_the_traffic_exactly(db, chans):
    ch, s, ln = setup(db, chans)
    calls = sends = nbytes = 0
    for i in range(20):  # call_start / call_poll: calls with a measured round trip
        p = b"x" * i if i % 2 else None
        tag = ln.call_start(0, 1, 0, (i,), p)
        s.poll().reply(1)
        assert ln.call_poll(tag) is not None
        calls += 1
        nbytes += len(p or b"")
    for n in (0, 10, 1000):  # call(): the server answers from a thread
        t = serve_one(s)
        ln.call(0, 2, 0, (), b"y" * n if n else None, 5 * SEC)
        t.join()
        calls += 1
        nbytes += n
    t = serve_one(s)  # call_loan
    ln.loan(5000)[:] = b"z" * 5000
    ln.call_loan(0, 3, 0, (), 5 * SEC)
    t.join()
    calls += 1
    nbytes += 5000
    for i in range(7):  # one-way
        ln.send(0, 4, 0, (i,), b"s" * i)
        sends += 1
        nbytes += i
    ln.loan(70_000)
    ln.send_loan(0, 5, 0, ())
    sends += 1
    nbytes += 70_000
    assert ln.send_many(0, 0, [(6, (j,), b"m" * j) for j in range(30)]) == 30
    sends += 30
    nbytes += sum(range(30))
    got = 0
    while s.poll() is not None:
        got += 1
    assert got == 7 + 1 + 30
    st = stats(ch)
    zero_except(st, sent=calls + sends, bytes_sent=nbytes, calls=calls, received=calls + sends,
                bytes_received=nbytes, replies=calls, latency_count=calls,
                latency_max_ns=st["latency_max_ns"], latency_sum_ns=st["latency_sum_ns"],
                sent_last_second=st["sent_last_second"],
                received_last_second=st["received_last_second"])
    assert sum(st["hist"]) == calls
    assert 0 < st["latency_max_ns"] <= st["latency_sum_ns"] < 60 * SEC
    assert st["latency_sum_ns"] >= calls * 100  # no round trip takes less than 100 ns


def test_latency_histogram_buckets(db, chans):
    ch, s, ln = setup(db, chans)
    t = serve_one(s, delay=0.03)
    ln.call(0, 1, 0, (), None, 5 * SEC)
    t.join()
    st = stats(ch)
    lat = st["latency_max_ns"]
    assert lat >= 30_000_000 and st["latency_count"] == 1 and st["latency_sum_ns"] == lat
    bucket = (lat // 100).bit_length() - 1  # [100 ns * 2^i, 100 ns * 2^(i+1))
    assert st["hist"][bucket] == 1 and sum(st["hist"]) == 1
    assert 100 * 2**bucket <= lat < 100 * 2 ** (bucket + 1)


def test_timeouts_and_wouldblock(db, chans):
    ch, s, ln = setup(db, chans, nslots=4)
    with pytest.raises(Timeout):
        ln.call(0, 1, 0, (), None, 20_000_000)  # nobody serves
    st = stats(ch)
    assert (st["timeouts"], st["calls"], st["sent"], st["latency_count"]) == (1, 1, 1, 0)
    refused = 0
    for _ in range(6):  # 3 slots left
        try:
            ln.send(0, 1, 0, ())
        except WouldBlock:
            refused += 1
    assert refused == 3
    assert ln.send_many(0, 0, [(1, ())] * 5) == 0
    st = stats(ch)
    assert st["refused_wouldblock"] == ln.refused == 8 and st["sent"] == 4
    while s.poll() is not None:
        pass
    st = stats(ch)
    # the timed-out call was cancelled: the server skipped it
    assert (st["received"], st["cancelled"]) == (3, 1)


def test_refusals_at_the_lane(db, chans):
    ch, s, ln = setup(db, chans)
    set_limits(ch, rate=2)
    ln.send(0, 1, 0, ())
    ln.send(0, 1, 0, ())
    with pytest.raises(RateLimitExceeded):
        ln.send(0, 1, 0, ())
    assert stats(ch)["refused_rate"] == 1
    with pytest.raises(RateLimitExceeded):
        ln.send_many(0, 0, [(1, ())] * 4)  # 4 stopped by the bucket
    assert stats(ch)["refused_rate"] == 5
    set_limits(ch, bandwidth=100)
    with pytest.raises(RateLimitExceeded):
        ln.send(0, 1, 0, (), b"b" * 101)
    assert stats(ch)["refused_rate"] == 6
    set_limits(ch, max_size=10)
    with pytest.raises(MessageTooLarge):
        ln.send(0, 1, 0, (), b"x" * 11)
    with pytest.raises(MessageTooLarge):
        ln.loan(11)
    with pytest.raises(MessageTooLarge):
        ln.send_many(0, 0, [(1, (), b"x" * 11)])
    set_limits(ch, enforce=False)
    with pytest.raises(MessageTooLarge):
        ln.send(0, 1, 0, (), b"x" * (ln.max_payload + 1))
    with pytest.raises(MessageTooLarge):
        ln.loan(ln.max_payload + 1)
    assert stats(ch)["refused_size"] == 5
    set_limits(ch, rights=0)
    with pytest.raises(PermissionDenied):
        ln.send(0, 1, 0, ())
    with pytest.raises(PermissionDenied):
        ln.send_many(0, 0, [(1, ())])
    set_limits(ch, expiry=1)
    with pytest.raises(InvalidCapability, match="expired"):
        ln.call(0, 1, 0, (), None, SEC)
    st = stats(ch)
    zero_except(st, sent=2, calls=0, refused_rate=6, refused_size=5, refused_perm=3,
                sent_last_second=st["sent_last_second"])


def test_drops_cancels_and_failed_replies_at_the_server(db, chans):
    ch = chans(1)
    s = _core.ServerSet(db)
    s.add(1, ch.chan, ch.ctrl, ch.nslots, ch.arena, 1)
    rc = RawClient(ch, db)  # skips every client-side check

    def drain():
        while s.poll() is not None:
            pass

    set_limits(ch, rights=0)
    rc.write(1)
    drain()
    set_limits(ch, expiry=1)
    rc.write(1)
    rc.write(1)
    drain()
    set_limits(ch, max_size=10)
    rc.write(1, payload=b"x" * 11)
    drain()
    set_limits(ch, rate=1)
    for _ in range(4):
        rc.write(1)
    drain()
    set_limits(ch, bandwidth=100)
    rc.write(1, payload=b"y" * 60)
    rc.write(1, payload=b"y" * 60)
    drain()
    set_limits(ch, enforce=False)
    st = stats(ch)
    want = {"rights": 1, "expired": 2, "size": 1, "rate": 3, "bandwidth": 1}
    assert s.drops(1) == want
    for k, v in want.items():
        assert st["drops_" + k] == v
    assert (st["received"], st["bytes_received"]) == (2, 60)  # the ones that passed
    # Cancelled calls are skipped and counted.
    m = ch.map()
    _core.atomic_store_u64(m, _core.CHAN_CANCEL_BELOW_OFF, rc.tail + 3)
    rc.write(1, call=True)
    rc.write(1, call=True)
    rc.write(1)  # one-way: never cancelled
    drain()
    st = stats(ch)
    assert (st["cancelled"], st["received"]) == (2, 3)
    # A reply to a client that is gone.
    rc.write(1, call=True)
    r = s.poll()
    ch.set_state(_core.STATE_PEER_DEAD)
    assert r.reply(0) is False
    st = stats(ch)
    assert (st["reply_failed"], st["replies"]) == (1, 0)
    ch.set_state(_core.STATE_OPEN)
    rc.write(1, call=True)
    s.poll().reply(0)
    assert stats(ch)["replies"] == 1
    rc.close()


def test_per_second_counts(db, chans):
    ch, s, ln = setup(db, chans)
    # Start right after a whole second (CLOCK_MONOTONIC = time.monotonic) so the burst fits in it.
    now = time.monotonic()
    time.sleep(1.05 - now % 1 if now % 1 > 0.5 else max(0.0, 0.05 - now % 1))
    start = int(time.monotonic())
    n = 50
    for i in range(n):
        ln.send(0, 1, 0, (i,))
    assert len(s.recv_many(256, SEC)) == n
    if int(time.monotonic()) != start:
        pytest.skip("the machine is too busy: the burst crossed a second boundary")
    st = stats(ch)
    assert (st["sent_last_second"], st["received_last_second"]) == (0, 0)  # the second before
    time.sleep(start + 1.2 - time.monotonic())
    st = stats(ch)
    assert (st["sent_last_second"], st["received_last_second"]) == (n, n)
    ln.send(0, 1, 0, ())  # a new second: the burst's moves to prev_count
    s.poll()
    st = stats(ch)
    if int(time.monotonic()) == start + 1:
        assert (st["sent_last_second"], st["received_last_second"]) == (n, n)
    time.sleep(start + 3.1 - time.monotonic())
    st = stats(ch)
    assert (st["sent_last_second"], st["received_last_second"]) == (0, 0)  # too old


def test_channel_stats_on_garbage():
    rng = random.Random(5)
    bufs = [bytes(4096), b"\xff" * 4096, bytearray(rng.randbytes(4096)),
            memoryview(bytearray(rng.randbytes(4097)))[1:],  # unaligned
            rng.randbytes(_core.CHAN_SSTATS_OFF + _core.SSTATS_SIZE)]
    bufs += [rng.randbytes(4096) for _ in range(50)]
    for b in bufs:
        st = _core.channel_stats(b)
        assert set(st) == KEYS and len(st["hist"]) == 28
        assert all(isinstance(v, int) and 0 <= v < 2**64 for k, v in st.items() if k != "hist")
    # A second index of the current/previous second picks the right count.
    import struct

    b = bytearray(4096)
    now = int(time.monotonic())
    struct.pack_into("<QQQ", b, _core.CHAN_CSTATS_OFF + 80, now, 7, 9)
    struct.pack_into("<QQQ", b, _core.CHAN_SSTATS_OFF + 80, now - 1, 7, 9)
    st = _core.channel_stats(b)
    assert (st["sent_last_second"], st["received_last_second"]) == (9, 7)
    with pytest.raises(ValueError):
        _core.channel_stats(bytes(_core.CHAN_SSTATS_OFF + _core.SSTATS_SIZE - 1))
    with pytest.raises(TypeError):
        _core.channel_stats(12)


def test_a_scribbled_block_is_overwritten_by_the_writer(db, chans):
    ch, s, ln = setup(db, chans)
    ln.send(0, 1, 0, ())
    s.poll()
    m = ch.map()
    m[_core.CHAN_CSTATS_OFF:_core.CHAN_CSTATS_OFF + 8] = (10**9).to_bytes(8, "little")
    m[_core.CHAN_SSTATS_OFF:_core.CHAN_SSTATS_OFF + 8] = (10**9).to_bytes(8, "little")
    assert stats(ch)["sent"] == 10**9  # a reader sees the scribble ...
    ln.send(0, 1, 0, ())
    s.poll()
    st = stats(ch)
    assert (st["sent"], st["received"]) == (2, 2)  # ... until the writer's next store
