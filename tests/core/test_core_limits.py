"""Capability limits in capbus._core: rights, expiry, message size, rate and bandwidth.

The kernel writes them into the (read-only) control page; the Lane checks them to fail fast and
the ServerSet enforces them again on its side, with its own token buckets, so a client that skips
its checks (tests/_core_util.RawClient writes the ring memory directly) is still held.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
from _core_util import Chan, RawClient, make_chan, set_limits  # noqa: E402

from capbus import _core  # noqa: E402
from capbus._errors import (  # noqa: E402
    InvalidCapability,
    MessageTooLarge,
    PermissionDenied,
    RateLimitExceeded,
    Timeout,
)

SEC = 1_000_000_000
NO_DROPS = {"rate": 0, "bandwidth": 0, "size": 0, "expired": 0, "rights": 0}




def lane(ch: Chan, db: int) -> _core.Lane:
    return _core.Lane(ch.chan, ch.ctrl, db, ch.index, ch.nslots, ch.arena, 1)


def server(db: int, *chs: Chan) -> _core.ServerSet:
    s = _core.ServerSet(db, 1)
    for c in chs:
        s.add(c.index, c.chan, c.ctrl, c.nslots, c.arena, 1000 + c.index)
    return s


def drain(s: _core.ServerSet) -> list:
    got = []
    while (r := s.poll()) is not None:
        got.append(r)
    return got


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def test_constants():
    c = _core
    rights = [c.RIGHT_SEND, c.RIGHT_RECEIVE, c.RIGHT_SHARE, c.RIGHT_MAP, c.RIGHT_READ, c.RIGHT_WRITE]
    assert rights == [1, 2, 4, 8, 16, 32]
    assert c.CTRL_FLAGS_OFF == 44 and c.CTRL_F_ENFORCE == 1
    # Every control-page field is inside the first cache line except the sender id.
    offs = [c.CTRL_STATE_OFF, c.CTRL_GENERATION_OFF, c.CTRL_EXPIRY_OFF, c.CTRL_MAX_MESSAGE_SIZE_OFF,
            c.CTRL_RATE_LIMIT_OFF, c.CTRL_BANDWIDTH_OFF, c.CTRL_RIGHTS_OFF, c.CTRL_FLAGS_OFF]
    assert len(set(offs)) == len(offs) and max(offs) < 64


# ---- client side: fail fast, before anything is written -----------------------------------------


def _nothing_written(ch: Chan) -> bool:
    return _core.atomic_load_u64(ch.map(), ch.layout()["req_tail"]) == 0


@pytest.mark.parametrize("how", ["send", "call", "call_start", "send_many"])
def test_client_rights_and_expiry(db, chans, how):
    ch = chans(1)
    ln = lane(ch, db)

    def go(payload=None):
        if how == "send":
            return ln.send(0, 1, 0, (), payload)
        if how == "call":
            with contextlib.suppress(Timeout):  # no server here: sent, then Timeout at once
                ln.call(0, 1, 0, (), payload, 0)
            return None
        if how == "call_start":
            return ln.call_start(0, 1, 0, (), payload)
        return ln.send_many(0, 0, [(1, (), payload)])

    set_limits(ch, rights=_core.RIGHT_RECEIVE | _core.RIGHT_MAP)
    with pytest.raises(PermissionDenied, match="right to send"):
        go()
    set_limits(ch, expiry=now_ns() - 1)
    with pytest.raises(InvalidCapability, match="expired"):
        go()
    set_limits(ch, max_size=100)
    with pytest.raises(MessageTooLarge, match="limit of 100"):
        go(bytes(101))
    assert _nothing_written(ch) and ln.last_tag == 0
    # The flag off: the same fields are ignored (the kernel sets it only when it means it).
    set_limits(ch, rights=0, expiry=1, max_size=1, rate=1, bandwidth=1, enforce=False)
    go(bytes(1000))
    assert ln.last_tag == 1


def test_client_expiry_in_the_future_is_fine(db, chans):
    ch = chans(1)
    s = server(db, ch)
    ln = lane(ch, db)
    set_limits(ch, expiry=now_ns() + 200_000_000)  # within the exact-check margin
    ln.send(0, 1, 0, ())
    set_limits(ch, expiry=now_ns() + 3600 * SEC)
    ln.send(0, 1, 0, ())
    assert len(drain(s)) == 2
    set_limits(ch, expiry=now_ns() + 30_000_000)
    time.sleep(0.05)
    with pytest.raises(InvalidCapability, match="expired"):
        ln.send(0, 1, 0, ())


def test_client_rate_bucket(db, chans):
    # (No server: it would apply the same limits with its own buckets when it reads.)
    ch = chans(1, nslots=1024)
    ln = lane(ch, db)
    set_limits(ch, rate=50)
    for i in range(50):  # one second of burst
        ln.send(0, 1, 0, (i,))
    with pytest.raises(RateLimitExceeded, match="50 messages/s"):
        ln.send(0, 1, 0, ())
    with pytest.raises(RateLimitExceeded):
        ln.call_start(0, 1, 0, ())
    with pytest.raises(RateLimitExceeded):
        ln.send_many(0, 0, [(1, ())])  # nothing accepted: the reason is raised
    assert ln.refused == 0  # not "ring full"
    time.sleep(0.2)  # ~10 tokens back
    sent = 0
    while True:
        try:
            ln.send(0, 1, 0, ())
            sent += 1
        except RateLimitExceeded:
            break
    assert 5 <= sent <= 15, sent
    time.sleep(0.2)
    # send_many takes what the bucket allows and says how many.
    n = ln.send_many(0, 0, [(1, ())] * 40)
    assert 5 <= n <= 15, n
    # The kernel changes the limit: a raised one keeps the level (no instant refill), a limit
    # that appears starts full, a lowered one clamps the level.
    set_limits(ch, rate=1000)
    time.sleep(0.05)  # ~2.5 tokens at the old rate
    assert 1 <= ln.send_many(0, 0, [(1, ())] * 500) < 100
    set_limits(ch, rate=0)
    ln.send(0, 1, 0, ())
    set_limits(ch, rate=200)
    assert 200 <= ln.send_many(0, 0, [(1, ())] * 500) <= 202
    set_limits(ch, rate=10)
    with pytest.raises(RateLimitExceeded):
        ln.send_many(0, 0, [(1, ())] * 500)


def test_client_bandwidth_bucket(db, chans):
    ch = chans(1)
    server(db, ch)
    ln = lane(ch, db)
    set_limits(ch, bandwidth=1000)
    ln.send(0, 1, 0, (), bytes(400))
    ln.send(0, 1, 0, (), bytes(400))
    with pytest.raises(RateLimitExceeded, match="bandwidth limit of 1000"):
        ln.send(0, 1, 0, (), bytes(400))
    ln.send(0, 1, 0, (), bytes(200))  # exactly what is left
    ln.send(0, 1, 0, ())  # no payload costs nothing
    with pytest.raises(RateLimitExceeded):
        ln.send(0, 1, 0, (), bytes(2000))  # more than the bucket holds: never


def test_call_charges_the_bucket(db, chans):
    ch = chans(1)
    s = server(db, ch)
    ln = lane(ch, db)
    set_limits(ch, rate=2)

    def serve():
        for _ in range(2):
            s.recv(5 * SEC).reply(7)

    t = threading.Thread(target=serve)
    t.start()
    assert ln.call(0, 1, 0, (), None, 5 * SEC)[0] == 7
    assert ln.call(0, 1, 0, (), None, 5 * SEC)[0] == 7
    t.join(10)
    with pytest.raises(RateLimitExceeded):
        ln.call(0, 1, 0, (), None, 5 * SEC)


# ---- server side: a raw client cannot get past the limits ----------------------------------------


def _codes():
    from capbus._errors import InvalidCapability as IC
    from capbus._errors import MessageTooLarge as MTL
    from capbus._errors import RateLimitExceeded as RLE

    return IC.code, MTL.code, RLE.code


def test_raw_client_rate_held_by_server(db, chans):
    ch = chans(1, nslots=256, arena=1 << 20)
    s = server(db, ch)
    raw = RawClient(ch, db)
    set_limits(ch, rate=20)
    for i in range(100):
        raw.write(1, (i,), publish=False)
    raw.publish()
    got = drain(s)
    # The burst (one second of tokens) and not one message more; the rest are dropped, in order.
    assert [r.data[0] for r in got][:20] == list(range(20)) and len(got) <= 21
    assert raw.consumed() == 100
    assert s.drops(1) == dict(NO_DROPS, rate=100 - len(got))
    time.sleep(0.25)  # ~5 tokens back, from the server's own clock
    for i in range(100, 120):
        raw.write(1, (i,), publish=False)
    raw.publish()
    n = len(drain(s))
    assert 3 <= n <= 7, n
    raw.close()


def test_raw_client_calls_get_error_replies(db, chans):
    ic, mtl, rle = _codes()
    ch = chans(1, nslots=256, arena=1 << 20)
    s = server(db, ch)
    raw = RawClient(ch, db)
    # Rate: the 3rd call in the burst is answered with RateLimitExceeded's code.
    set_limits(ch, rate=2)
    tags = [raw.write(1, (i,), call=True) for i in range(3)]
    got = drain(s)
    assert [r.tag for r in got] == tags[:2]
    for r in got:
        r.reply(5, r.data)
    replies = [raw.read_reply() for _ in range(3)]
    by_tag = {rep[0]: rep for rep in replies}
    err = by_tag[tags[2]]
    assert err[2] & _core.FLAG_ERROR and err[3][0] == rle and b"rate limit" in err[4]
    assert by_tag[tags[0]][1:4] == (5, 0, (0, 0, 0, 0))
    # Size.
    set_limits(ch, max_size=100)
    t = raw.write(1, (), b"x" * 101, call=True)
    t_ok = raw.write(1, (), b"x" * 100, call=True)
    got = drain(s)
    assert [r.tag for r in got] == [t_ok] and got[0].payload == b"x" * 100
    rep = raw.read_reply()
    assert rep[0] == t and rep[2] & _core.FLAG_ERROR and rep[3][0] == mtl
    assert b"101 bytes" in rep[4]
    # Expiry.
    set_limits(ch, expiry=now_ns() - 1)
    t = raw.write(1, (), call=True)
    assert drain(s) == []
    rep = raw.read_reply()
    assert rep[0] == t and rep[3][0] == ic and b"expired" in rep[4]
    # Rights.
    set_limits(ch, rights=_core.RIGHT_RECEIVE)
    t = raw.write(1, (), call=True)
    raw.write(1, ())  # a one-way message is dropped without a reply
    assert drain(s) == []
    rep = raw.read_reply()
    assert rep[0] == t and rep[3][0] == ic and b"right to send" in rep[4]
    assert raw.read_reply() is None
    # Bandwidth.
    set_limits(ch, bandwidth=1000)
    tags = [raw.write(1, (), bytes(400), call=True) for _ in range(3)]
    got = drain(s)
    assert [r.tag for r in got] == tags[:2]
    rep = raw.read_reply()
    assert rep[0] == tags[2] and rep[3][0] == rle and b"bandwidth" in rep[4]
    assert s.drops(1) == {"rate": 1, "bandwidth": 1, "size": 1, "expired": 1, "rights": 2}
    raw.close()


def test_lane_with_checks_skipped_is_held_by_server(db, chans):
    # A client that maps its own, limit-free "control page" (its Lane skips the checks) against
    # a server that reads the real one: every refused call comes back as the matching error.
    _, mtl, rle = _codes()
    ch = chans(1)
    fake = make_chan(99)  # only its control page is used: state OPEN, no limits
    try:
        s = server(db, ch)
        ln = _core.Lane(ch.chan, fake.ctrl, db, 1, ch.nslots, ch.arena, 1)
        set_limits(ch, rate=3, max_size=10)
        stop = threading.Event()

        def serve():
            while not stop.is_set():
                try:
                    r = s.recv(50_000_000)
                except Timeout:
                    continue
                r.reply(r.opcode, r.data)

        t = threading.Thread(target=serve)
        t.start()
        try:
            res = [ln.call(0, 1, 0, (i,), None, 5 * SEC) for i in range(5)]
            big = ln.call(0, 1, 0, (), bytes(11), 5 * SEC)
        finally:
            stop.set()
            t.join(10)
        assert [r[2] for r in res[:3]] == [0, 1, 2] and not any(r[1] & _core.FLAG_ERROR
                                                               for r in res[:3])
        assert all(r[1] & _core.FLAG_ERROR and r[2] == rle for r in res[3:])
        assert big[1] & _core.FLAG_ERROR and big[2] == mtl
        assert s.drops(1) == dict(NO_DROPS, rate=2, size=1)
    finally:
        fake.close()


def test_server_checks_only_with_enforce_flag(db, chans):
    ch = chans(1)
    s = server(db, ch)
    raw = RawClient(ch, db)
    set_limits(ch, rights=0, expiry=1, max_size=1, rate=1, bandwidth=1, enforce=False)
    for i in range(10):
        raw.write(1, (i,), b"0123456789")
    assert len(drain(s)) == 10 and s.drops(1) == NO_DROPS
    raw.close()
    with pytest.raises(KeyError):
        s.drops(5)


def test_limits_change_while_running(db, chans):
    ch = chans(1, nslots=1024, arena=1 << 20)
    s = server(db, ch)
    raw = RawClient(ch, db)
    set_limits(ch, rate=5)
    for i in range(10):
        raw.write(1, (i,), publish=False)
    raw.publish()
    assert len(drain(s)) == 5
    set_limits(ch, rate=1000)  # raised: the server's bucket is clamped to it, not refilled
    for i in range(300):
        raw.write(1, (i,), publish=False)
    raw.publish()
    n = len(drain(s))
    assert n < 150, n  # only what the new rate refills while we read, not a full bucket
    set_limits(ch, rate=0, enforce=True)  # no rate any more
    for i in range(300):
        raw.write(1, (i,), publish=False)
    raw.publish()
    assert len(drain(s)) == 300
    set_limits(ch, rate=100)  # a rate that appears starts full
    for i in range(300):
        raw.write(1, (i,), publish=False)
    raw.publish()
    assert 100 <= len(drain(s)) <= 102
    raw.close()
