"""Child-process roles for the capbus._core ring tests (run as a script with inherited fds).

    python _ring_stress_child.py ROLE JSON_ARGS

Every role exits by itself (a count, a duration or a deadline), prints one JSON result line on
stdout, and exits 0 on success. The parent passes the memfds with pass_fds.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import statistics
import sys
import time

from capbus import _core
from capbus._errors import IpcError, Timeout, WouldBlock

OP_ECHO = 1
OP_STOP = 2
OP_SLOW = 3  # the echo server sleeps d1 milliseconds before replying


def out(**kw) -> None:
    print(json.dumps(kw), flush=True)


def lane_from(a: dict) -> _core.Lane:
    return _core.Lane(a["chan"], a["ctrl"], a["db"], a["index"], a.get("nslots", 256),
                      a.get("arena", 1 << 20), a.get("mode", 1), a.get("spin_ns", 50_000))


def echo_server(a: dict) -> None:
    """Serve channels until OP_STOP or the deadline: reply with opcode+100, same data/payload."""
    s = _core.ServerSet(a["db"], a.get("mode", 1), a.get("spin_ns", 50_000))
    for ch in a["channels"]:
        s.add(ch["index"], ch["chan"], ch["ctrl"], ch.get("nslots", 256), ch.get("arena", 1 << 20),
              ch.get("sender", 0))
    end = time.monotonic() + a.get("max_seconds", 50)
    served = 0
    while time.monotonic() < end:
        try:
            idx, tag, cap, op, flags, d0, d1, d2, d3, payload, sender = s.recv(200_000_000)
        except Timeout:
            continue
        if op == OP_STOP:
            if flags & _core.FLAG_REPLY_EXPECTED:
                s.reply(idx, tag, op + 100, 0, 0, 0, 0, 0)
            break
        if op == OP_SLOW:
            time.sleep(d1 / 1000)
        if flags & _core.FLAG_REPLY_EXPECTED:
            while True:
                try:
                    s.reply(idx, tag, op + 100, flags & _core.FLAG_CHECKSUM, d0, d1, d2, d3, payload)
                    break
                except WouldBlock:
                    time.sleep(0.0005)
                except IpcError:
                    break
        served += 1
    out(served=served)


def caller(a: dict) -> None:
    """N echo calls with a sequence number; verify every reply; report latency percentiles."""
    lane = lane_from(a)
    n = a["n"]
    payload = os.urandom(a["payload"]) if a.get("payload") is not None else None
    lat = []
    t_all = time.perf_counter()
    for i in range(n):
        t = time.perf_counter_ns()
        r = lane.call(7, OP_ECHO, 0, i, 2 * i, 3, 4, payload, 5_000_000_000)
        lat.append(time.perf_counter_ns() - t)
        if r[0] != OP_ECHO + 100 or r[2] != i or r[3] != 2 * i or r[6] != payload:
            out(error=f"bad reply {r[:6]} for {i}")
            sys.exit(1)
    total = time.perf_counter() - t_all
    if a.get("stop"):
        lane.call(7, OP_STOP, 0, 0, 0, 0, 0, None, 5_000_000_000)
    lat.sort()
    out(n=n, total=total, median_ns=statistics.median(lat), p99_ns=lat[int(len(lat) * 0.99)],
        p999_ns=lat[int(len(lat) * 0.999)], max_ns=lat[-1], over_1ms=sum(x > 1_000_000 for x in lat))


def timed_caller(a: dict) -> None:
    """Calls for `seconds`; each must succeed within `max_call_s`. Reports count and worst."""
    lane = lane_from(a)
    end = time.monotonic() + a["seconds"]
    n, worst = 0, 0.0
    while time.monotonic() < end:
        t = time.monotonic()
        r = lane.call(7, OP_ECHO, 0, n, 0, 0, 0, b"x" * (n % 200), 5_000_000_000)
        dt = time.monotonic() - t
        worst = max(worst, dt)
        if r[2] != n or r[6] != b"x" * (n % 200):
            out(error=f"bad reply {r[:3]} for {n}")
            sys.exit(1)
        n += 1
    out(n=n, worst=worst)


def producer(a: dict) -> None:
    """send_many `n` messages carrying 0..n-1 in data[0] (and a checkable d1/d2), in batches."""
    lane = lane_from(a)
    n, batch = a["n"], a.get("batch", 256)
    cap = a.get("cap", 9)
    seq = 0
    spins = 0
    t0 = time.perf_counter()
    while seq < n:
        k = min(batch, n - seq)
        items = [(cap, 5, 0, s, s ^ 0xFFFF, s * 3, 0) for s in range(seq, seq + k)]
        acc = lane.send_many(items)
        seq += acc
        if acc < k:
            spins += 1
            if spins % 64 == 0:
                time.sleep(0)
    out(sent=seq, seconds=time.perf_counter() - t0)


def blocked_caller(a: dict) -> None:
    """One call that the server never answers; report what ended it and when (monotonic)."""
    lane = lane_from(a)
    print("ready", flush=True)
    try:
        lane.call(7, OP_ECHO, 0, 0, 0, 0, 0, None, a.get("timeout_ns", 20_000_000_000))
        out(result="reply", t=time.monotonic())
    except IpcError as exc:
        out(result=type(exc).__name__, t=time.monotonic(), msg=str(exc))


def scribble_channel(a: dict) -> None:
    """Scribble random bytes over every part of a channel (and ring its doorbell bit)."""
    size = _core.channel_size(a["nslots"], a["arena"])
    m = mmap.mmap(a["chan"], size)
    db = mmap.mmap(a["db"], _core.DOORBELL_SIZE)
    lay = _core.channel_layout(a["nslots"], a["arena"])
    rng = random.Random(a.get("seed", 1))
    end = time.monotonic() + a["seconds"]
    idx = a["index"]
    word = _core.DB_BITMAP_OFF + (idx // 64) * 8
    writes = 0
    regions = [
        (0, _core.CHAN_HEADER_SIZE),
        (lay["req_ring"], lay["ring_size"]),
        (lay["resp_ring"], lay["ring_size"]),
        (lay["req_arena"], a["arena"]),
        (lay["resp_arena"], a["arena"]),
        (0, size),
    ]
    while time.monotonic() < end:
        start, length = rng.choice(regions)
        n = rng.choice([1, 8, 64, 512, 4096])
        off = start + rng.randrange(max(1, length - n))
        m[off:off + n] = rng.randbytes(n)
        _core.atomic_store_u64(db, word, _core.atomic_load_u64(db, word) | (1 << (idx % 64)))
        _core.atomic_add_u64(db, 0, 1)  # seq is the low u32 of this word; wraps harmlessly
        writes += 1
        if writes % 256 == 0:
            _core.futex_wake(db, _core.DB_SEQ_OFF)
    out(writes=writes)


def scribble_doorbell(a: dict) -> None:
    """Scribble the doorbell: random bytes, all bits set, sleeping flag cleared, seq frozen."""
    db = mmap.mmap(a["db"], _core.DOORBELL_SIZE)
    rng = random.Random(a.get("seed", 2))
    end = time.monotonic() + a["seconds"]
    writes = 0
    while time.monotonic() < end:
        mode = rng.randrange(5)
        if mode == 0:
            off = rng.randrange(_core.DOORBELL_SIZE - 64)
            db[off:off + 64] = rng.randbytes(64)
        elif mode == 1:
            db[_core.DB_BITMAP_OFF:_core.DB_BITMAP_OFF + 512] = b"\xff" * 512
        elif mode == 2:
            _core.atomic_store_u32(db, _core.DB_SERVER_SLEEPING_OFF, 0)
        elif mode == 3:
            db[_core.DB_BITMAP_OFF:_core.DB_BITMAP_OFF + 512] = bytes(512)
        else:
            _core.atomic_store_u32(db, _core.DB_SEQ_OFF, rng.getrandbits(32))
        writes += 1
        if writes % 64 == 0:
            time.sleep(0.0002)
    out(writes=writes)


ROLES = {
    "echo_server": echo_server,
    "caller": caller,
    "timed_caller": timed_caller,
    "producer": producer,
    "blocked_caller": blocked_caller,
    "scribble_channel": scribble_channel,
    "scribble_doorbell": scribble_doorbell,
}

if __name__ == "__main__":
    ROLES[sys.argv[1]](json.loads(sys.argv[2]))
