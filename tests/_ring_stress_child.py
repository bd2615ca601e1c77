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
                      a.get("arena", 1 << 20), a.get("mode", 1), a.get("spin_ns", 50_000),
                      bell_event_fd=a.get("bell_efd", -1), reply_event_fd=a.get("reply_efd", -1))


def echo_server(a: dict) -> None:
    """Serve channels until OP_STOP or the deadline: reply with opcode+100, same data/payload."""
    s = _core.ServerSet(a["db"], a.get("mode", 1), a.get("spin_ns", 50_000))
    for ch in a["channels"]:
        s.add(ch["index"], ch["chan"], ch["ctrl"], ch.get("nslots", 256), ch.get("arena", 1 << 20),
              ch.get("sender", 0), ch.get("reply_efd", -1))
    end = time.monotonic() + a.get("max_seconds", 50)
    served = 0
    while time.monotonic() < end:
        try:
            req = s.recv(200_000_000)
        except Timeout:
            continue
        op = req.opcode
        if op == OP_STOP:
            if req.expects_reply:
                req.reply(op + 100)
            break
        if op == OP_SLOW:
            time.sleep(req.data[1] / 1000)
        if req.expects_reply:
            while True:
                try:
                    req.reply(op + 100, req.data, req.payload, _core.FLAG_CHECKSUM)
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
        r = lane.call(7, OP_ECHO, 0, (i, 2 * i, 3, 4), payload, 5_000_000_000)
        lat.append(time.perf_counter_ns() - t)
        if r[0] != OP_ECHO + 100 or r[2] != i or r[3] != 2 * i or r[6] != (payload or None):
            out(error=f"bad reply {r[:6]} for {i}")
            sys.exit(1)
    total = time.perf_counter() - t_all
    if a.get("stop"):
        lane.call(7, OP_STOP, 0, (), None, 5_000_000_000)
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
        r = lane.call(7, OP_ECHO, 0, (n,), b"x" * (n % 200), 5_000_000_000)
        dt = time.monotonic() - t
        worst = max(worst, dt)
        if r[2] != n or (r[6] or b"") != b"x" * (n % 200):
            out(error=f"bad reply {r[:3]} for {n}")
            sys.exit(1)
        n += 1
    out(n=n, worst=worst)


def producer(a: dict) -> None:
    """send_many `n` messages carrying 0..n-1 in data[0] (and a checkable d1/d2), in batches
    (batch 0: one send() each). Opcode = the producer's `tag` (default 5)."""
    lane = lane_from(a)
    n, batch = a["n"], a.get("batch", 256)
    cap = a.get("cap", 9)
    op = a.get("tag", 5)
    seq = 0
    spins = 0
    t0 = time.perf_counter()
    while seq < n:
        if batch:
            k = min(batch, n - seq)
            acc = lane.send_many(cap, 0, [(op, (s, s ^ 0xFFFF, s * 3)) for s in range(seq, seq + k)])
        else:
            k = 1
            try:
                lane.send(cap, op, 0, (seq, seq ^ 0xFFFF, seq * 3))
                acc = 1
            except WouldBlock:
                acc = 0
        seq += acc
        if acc < k:
            spins += 1
            if spins % 64 == 0:
                time.sleep(0)
    out(sent=seq, seconds=time.perf_counter() - t0, refused=lane.refused)


def blocked_caller(a: dict) -> None:
    """One call that the server never answers; report what ended it and when (monotonic)."""
    lane = lane_from(a)
    print("ready", flush=True)
    try:
        lane.call(7, OP_ECHO, 0, (), None, a.get("timeout_ns", 20_000_000_000))
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


def event_sender(a: dict) -> None:
    """Send `n` one-way messages (data[0] = i), `gap` seconds apart, through a Lane that knows the
    service's eventfd (it writes it when an event-loop server asked for a wake-up)."""
    lane = lane_from(a)
    for i in range(a["n"]):
        time.sleep(a["gap"])
        while True:
            try:
                lane.send(1, a.get("tag", 5), 0, (i,))
                break
            except WouldBlock:
                time.sleep(0.001)
    out(sent=a["n"])


def hostile_events(a: dict) -> None:
    """Flip the doorbell's event-wanted flag, write the service's eventfd (small values and the
    saturating maximum), and set/clear this channel's consumer-event flag, at random."""
    db = mmap.mmap(a["db"], _core.DOORBELL_SIZE)
    chan = mmap.mmap(a["chan"], _core.channel_size(a["nslots"], a["arena"])) if "chan" in a else None
    lay = _core.channel_layout(a["nslots"], a["arena"]) if chan is not None else None
    rng = random.Random(a.get("seed", 3))
    end = time.monotonic() + a["seconds"]
    writes = 0
    while time.monotonic() < end:
        mode = rng.randrange(6)
        try:
            if mode == 0:
                _core.atomic_store_u32(db, _core.DB_EVENT_WANTED_OFF, 1)
            elif mode == 1:
                _core.atomic_store_u32(db, _core.DB_EVENT_WANTED_OFF, 0)
            elif mode == 2:
                os.write(a["efd"], (1).to_bytes(8, "little"))
            elif mode == 3:
                os.write(a["efd"], (2**64 - 2).to_bytes(8, "little"))
            elif chan is not None:
                _core.atomic_store_u32(chan, lay["resp_consumer_event"], mode - 4)
        except BlockingIOError:
            pass
        writes += 1
        time.sleep(rng.choice([0, 0.0001, 0.001]))
    out(writes=writes)


def memfd_ranges(name: str = "memfd:capbus-channel") -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of memfds called `name`."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            if name in line:
                lo, hi = line.split()[0].split("-")
                ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def view_address(view) -> int:
    """Where a (read-only) buffer's bytes are (numpy gives the pointer without copying)."""
    import numpy as np

    a = np.frombuffer(view, np.uint8)
    addr = a.ctypes.data
    del a
    return addr


def zc_server(a: dict) -> None:
    """Serve calls until OP_STOP: reply (crc32 of the payload, its length, 1 if the payload was
    a zero-copy view lying inside a channel memfd mapping, else 0). With "touch": 0 the payload
    is not read at all (crc 0)."""
    import zlib

    s = _core.ServerSet(a["db"], a.get("mode", 1))
    for ch in a["channels"]:
        s.add(ch["index"], ch["chan"], ch["ctrl"], ch.get("nslots", 256), ch.get("arena", 1 << 20),
              ch.get("sender", 0))
    print("ready", flush=True)
    touch = a.get("touch", 1)
    end = time.monotonic() + a.get("max_seconds", 50)
    served = 0
    while time.monotonic() < end:
        try:
            req = s.recv(200_000_000)
        except Timeout:
            continue
        if req.opcode == OP_STOP:
            req.reply(OP_STOP + 100)
            break
        p = req.payload
        inside = 0
        if req.zero_copy:
            addr = view_address(p) if len(p) else 0
            inside = int(not len(p) or any(lo <= addr and addr + len(p) <= hi
                                           for lo, hi in memfd_ranges()))
        crc = zlib.crc32(p) if touch else 0
        n = len(p)
        del p
        req.reply(req.opcode + 100, (crc, n, inside, int(req.zero_copy)))
        served += 1
    out(served=served)


ROLES = {
    "zc_server": zc_server,
    "event_sender": event_sender,
    "hostile_events": hostile_events,
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
