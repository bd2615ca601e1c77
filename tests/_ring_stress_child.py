"""Child-process roles for the capbus._core ring tests (run as a script with inherited fds).

    python _ring_stress_child.py ROLE JSON_ARGS

Every role exits by itself (a count, a duration or a deadline), prints one JSON result line on
stdout, and exits 0 on success. The parent passes the memfds with pass_fds.
"""

from __future__ import annotations

import json
import mmap
import os
import platform
import random
import select
import signal
import statistics
import sys
import threading
import time

from _core_util import Chan, channel_layout, make_chan

from capbus import _core
from capbus._errors import IpcError, Timeout, WouldBlock
from capbus._kernel.shm import make_doorbell

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
        try:  # untimed: no deadline at all (an untimed futex sleep under the watchdog)
            req = s.recv(-1 if a.get("untimed") else 200_000_000)
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
    lay = channel_layout(a["nslots"], a["arena"])
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
    lay = channel_layout(a["nslots"], a["arena"]) if chan is not None else None
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


# ---- the sleep watchdog: a lost server wake-up costs latency, never a hang -----------------------
#
# These roles run a ServerSet and a Lane in ONE process (the child), so that a recv() with no
# deadline that blocked with the GIL held, or never returned, fails the test through the parent's
# timeout instead of hanging the test process itself.

FUTEX_NR = {"x86_64": 202, "aarch64": 98}.get(platform.machine())


def futex_wait_args(tid: int) -> tuple[int, int] | None:
    """(futex op, timeout pointer) if thread `tid` of this process is blocked in futex(), else
    None. The doorbell wait is a shared FUTEX_WAIT (op 0); the interpreter's locks and the GIL use
    private futexes (op & 128), so op 0 tells the doorbell sleep from a thread waiting on a lock."""
    try:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            fields = f.read().split()
    except OSError:
        return None
    if len(fields) < 5 or fields[0] != str(FUTEX_NR):
        return None
    return int(fields[2], 16), int(fields[4], 16)


def tasks() -> int:
    """Threads of this process, native ones (the watchdog) included, once the Python threads that
    were joined have also left the kernel's list (which can lag a join() by a moment)."""
    deadline = time.monotonic() + 2
    while True:
        n = len(os.listdir("/proc/self/task"))
        if n <= threading.active_count() + 1 or time.monotonic() > deadline:
            return n
        time.sleep(0.01)


class Sleeper:
    """A thread in S.recv() with no deadline, started and waited for until it sleeps on the
    doorbell futex with the doorbell's server_sleeping flag set."""

    def __init__(self, s: _core.ServerSet, bell: mmap.mmap) -> None:
        self.s, self.bell, self.got = s, bell, {}
        self.t0 = time.monotonic()
        started = threading.Event()

        def run() -> None:
            self.got["tid"] = threading.get_native_id()
            started.set()
            try:
                r = self.s.recv()  # no deadline: an untimed sleep under the watchdog
                self.got["req"] = (r.opcode, r.data[0])
            except BaseException as exc:
                self.got["exc"] = repr(exc)
            self.got["end"] = time.monotonic()

        self.t = threading.Thread(target=run, daemon=True)
        self.t.start()
        if not started.wait(5):
            raise AssertionError("the recv thread did not start")
        deadline = time.monotonic() + 5
        while True:
            args = futex_wait_args(self.got["tid"]) if FUTEX_NR else (0, 0)
            if (args is not None and args[0] == 0
                    and _core.atomic_load_u32(bell, _core.DB_SERVER_SLEEPING_OFF) == 1):
                break
            if not self.t.is_alive() or time.monotonic() > deadline:
                raise AssertionError(f"the server never went to sleep: {self.got}, {args}")
            time.sleep(0.0002)
        self.untimed = args[1] == 0  # FUTEX_WAIT with no timespec: no timer at all

    def fire(self, lane: _core.Lane, i: int, hostile: bool) -> None:
        """hostile: clear server_sleeping first, as any client can, so that the honest send below
        skips its futex wake: only the watchdog can get the server going again."""
        if hostile:
            _core.atomic_store_u32(self.bell, _core.DB_SERVER_SLEEPING_OFF, 0)
        self.t0 = time.monotonic()
        lane.send(7, 1, 0, (i,))

    def finish(self, limit: float) -> dict:
        self.t.join(limit)
        stuck = self.t.is_alive()
        if stuck:  # unblock it, then report
            self.s.interrupt()
            self.t.join(5)
        return {"stuck": stuck, "untimed": self.untimed, "req": self.got.get("req"),
                "exc": self.got.get("exc"),
                "latency": self.got["end"] - self.t0 if "end" in self.got else None}


def lost_wakeup_trials(s: _core.ServerSet, lane: _core.Lane, bell: mmap.mmap, n: int,
                       hostile: bool = True, first: int = 0) -> list[dict]:
    out_ = []
    for i in range(first, first + n):
        sl = Sleeper(s, bell)
        sl.fire(lane, i, hostile)
        r = sl.finish(1.0)
        r["want"] = [1, i]
        out_.append(r)
    return out_


def own_set(a: dict) -> tuple[_core.ServerSet, _core.Lane, mmap.mmap]:
    """A ServerSet serving the one channel of `a`, and a Lane of that channel (same process)."""
    s = _core.ServerSet(a["db"], a["mode"])
    s.add(a["index"], a["chan"], a["ctrl"], a.get("nslots", 256), a.get("arena", 1 << 20), 1000)
    lane = _core.Lane(a["chan"], a["ctrl"], a["db"], a["index"], a.get("nslots", 256),
                      a.get("arena", 1 << 20), a["mode"])
    return s, lane, mmap.mmap(a["db"], _core.DOORBELL_SIZE)


def fresh_channel(a: dict, index: int) -> dict:
    """`a` with a doorbell and a channel made here, as the kernel makes them."""
    ch = make_chan(index)
    _KEEP.append(ch)  # its fds and mapping live as long as this process
    return dict(a, db=make_doorbell(), chan=ch.chan, ctrl=ch.ctrl, index=index, nslots=256,
                arena=1 << 20)


_KEEP: list[Chan] = []


def lost_wakeup(a: dict) -> None:
    """Lost wake-ups (server_sleeping cleared, then an honest send) on a server with no deadline;
    also: an idle untimed recv returns nothing spuriously and leaves the GIL to other threads."""
    tasks_before = tasks()
    s, lane, bell = own_set(a)
    trials = lost_wakeup_trials(s, lane, bell, a["trials"], hostile=a.get("hostile", True))
    tasks_after = tasks()
    # Idle: the watchdog's wake-ups are not messages; the other threads keep running meanwhile.
    sl = Sleeper(s, bell)
    ticks, end = 0, time.monotonic() + 0.2
    while time.monotonic() < end:
        time.sleep(0.005)
        ticks += 1
    idle_alive = sl.t.is_alive()
    sl.fire(lane, 99, hostile=False)
    idle = sl.finish(1.0)
    s.close()
    time.sleep(0.1)  # watchdog ticks after close(): the closed set is out of its list
    out(trials=trials, tasks_before=tasks_before, tasks_after=tasks_after, idle_ticks=ticks,
        idle_alive=idle_alive, idle=idle)


def lost_wakeup_many(a: dict) -> None:
    """Several ServerSets under one watchdog; the first one registered is closed (the watchdog's
    list is compacted), the others are still rescued."""
    sets = [own_set(a)] + [own_set(fresh_channel(a, 5 + k)) for k in range(2)]
    for s, _lane, bell in sets:  # each sleeps once untimed: all registered, in this order
        sl = Sleeper(s, bell)
        s.interrupt()
        sl.finish(5)
    sets[0][0].close()
    trials = []
    for k in (2, 1):
        trials += lost_wakeup_trials(*sets[k], 2, first=10 * k)
    out(trials=trials)


def lost_wakeup_fork(a: dict) -> None:
    """The parent's watchdog thread does not survive fork(): a child that serves on a ServerSet
    of its own must start one. The parent has a server asleep (untimed) across the fork."""
    s, lane, bell = own_set(a)
    before = lost_wakeup_trials(s, lane, bell, 1)  # the parent's watchdog thread exists now
    tasks_parent = tasks()
    sl = Sleeper(s, bell)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            signal.alarm(20)  # never outlive a failed test
            os.close(r)
            res = {"tasks_at_fork": tasks()}
            try:
                cs, clane, cbell = own_set(fresh_channel(a, 3))
                res["trials"] = lost_wakeup_trials(cs, clane, cbell, a["trials"], first=100)
                res["tasks_after"] = tasks()
            except BaseException as exc:
                res["error"] = repr(exc)
            os.write(w, json.dumps(res).encode())
        finally:
            os._exit(0)
    os.close(w)
    # Meanwhile the parent's sleeping server loses a wake-up too.
    sl.fire(lane, 50, hostile=True)
    across = sl.finish(1.0)
    data, deadline = b"", time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    status = None
    while time.monotonic() < deadline + 5:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(st)
            break
        time.sleep(0.01)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    after = lost_wakeup_trials(s, lane, bell, 1, first=60)
    out(before=before, tasks_parent=tasks_parent, across=across, after=after, child_status=status,
        child=json.loads(data) if data else None)


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
    "lost_wakeup": lost_wakeup,
    "lost_wakeup_many": lost_wakeup_many,
    "lost_wakeup_fork": lost_wakeup_fork,
}

if __name__ == "__main__":
    ROLES[sys.argv[1]](json.loads(sys.argv[2]))
