"""No view outlives its memory: views of zero-copy payloads and loans (memoryviews, their slices
and casts, numpy arrays, req.object() results) stay valid and unchanged for as long as they live,
while later messages flow; the memory goes back only when the last view is gone.

Real processes: the sender or the receiver runs in a child, the other side here, so that what is
checked is what one process's memory shows while the other keeps writing.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
import zlib

import pytest
from conftest import readline

import capbus
from capbus import _core

np = pytest.importorskip("numpy")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MIB = 1 << 20


def pattern(seed: int, n: int):
    """The bytes of message `seed` (the same in every process)."""
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


# A sender: reads "kind count size seed" lines, sends `count` messages of `size` bytes whose
# contents are pattern(seed + i), and prints "done <how many got WouldBlock>".
SENDER = """
import sys
import numpy as np
import capbus

def pattern(seed, n):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)

p = capbus.connect()
ep = p.lookup(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    kind, count, size, seed = line.split()
    count, size, seed = int(count), int(size), int(seed)
    blocked = 0
    for i in range(count):
        data = pattern(seed + i, size)
        try:
            if kind == "copy":
                ep.call(1, (seed + i,), data.tobytes(), timeout=30)
            elif kind == "loan":
                with ep.loan(size) as loan:
                    np.frombuffer(loan.buffer, np.uint8)[:] = data
                    loan.call(2, (seed + i,), timeout=30)
            elif kind == "object":
                ep.call_object({"seed": seed + i, "a": data, "b": data[::-1].copy()}, 3, timeout=30)
            elif kind == "oneway":
                with ep.loan(size) as loan:
                    np.frombuffer(loan.buffer, np.uint8)[:] = data
                    loan.send_async(4, (seed + i,))
        except capbus.WouldBlock:
            blocked += 1
    print("done", blocked, flush=True)
"""

# A receiver: answers every call with (crc32 of the payload, its length) and releases one-way
# messages after taking their crc32; opcode 9 = reply, then sleep data[0] ms; opcode 8 = reply
# with the crc32 of the last payload seen.
ECHO = """
import sys, time, zlib
import capbus

p = capbus.connect()
svc = p.register(sys.argv[1])
print("ready", flush=True)
last = 0
while True:
    req = svc.recv()
    if req.opcode == 9:
        req.reply(0)
        time.sleep(req.data[0] / 1000)
    elif req.opcode == 8:
        req.reply(0, (last,))
    else:
        last = zlib.crc32(req.payload)
        if req.expects_reply:
            req.reply(0, (last, len(req.payload)))
        else:
            req.release()
"""


def command(p: subprocess.Popen, line: str) -> None:
    p.stdin.write(line + "\n")
    p.stdin.flush()


def channel_mappings() -> int:
    """Whole-channel mappings in this process (a Lane's or a ServerSet's; the kernel maps only
    header pages)."""
    n = 0
    with open("/proc/self/maps") as f:
        for line in f:
            if "capbus-channel" in line:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                n += hi - lo > MIB
    return n


class Receiver:
    """Serves a Service in a thread; `keep(req)` may return views to keep after the reply (or the
    release, for one-way messages)."""

    def __init__(self, svc: capbus.Service, keep) -> None:
        self.svc, self.keep = svc, keep
        self.kept: list = []
        self.served = 0
        self.stop = threading.Event()
        self.errors: list = []
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    req = self.svc.recv(timeout=0.05)
                except capbus.Timeout:
                    continue
                got = self.keep(req) if self.keep else None
                if got is not None:
                    self.kept.append(got)
                if req.expects_reply:
                    req.reply(0)
                else:
                    req.release()
                self.served += 1
                del req, got
        except Exception as exc:  # noqa: BLE001 - reported by close()
            self.errors.append(exc)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive() and not self.errors, self.errors


def keep_all_kinds(req):
    """Every kind of view a consumer may take of a payload."""
    p = req.payload
    assert isinstance(p, memoryview)  # zero-copy
    if req.opcode == 3:
        return ("object", req.object())
    return ("views", req.data[0], np.frombuffer(p, np.uint8), p[7:len(p) - 3], p.cast("B"),
            memoryview(p)[::2])


def check_kept(kept: list, sizes: dict) -> int:
    """Every kept view still shows exactly its own message's bytes; returns how many views."""
    n = 0
    for item in kept:
        if item[0] == "object":
            obj = item[1]
            want = pattern(obj["seed"], sizes["object"])
            assert np.array_equal(obj["a"], want) and np.array_equal(obj["b"], want[::-1])
            n += 2
            continue
        _, seed, arr, sl, cast, strided = item
        want = pattern(seed, len(arr))
        assert np.array_equal(arr, want), f"message {seed}: its kept array changed"
        assert bytes(sl) == want[7:len(want) - 3].tobytes(), f"message {seed}: slice changed"
        assert bytes(cast) == want.tobytes() and bytes(strided) == want[::2].tobytes()
        n += 4
    return n


def test_kept_views_show_their_own_bytes_while_later_messages_reuse_the_arena(kernel, children):
    """Arrays, slices, casts and req.object() results kept after the reply while the sender goes
    on with 48 more large and loaned messages of other contents: none of them changes (before,
    the reply gave the chunk back and the next message was written over it)."""
    with capbus.connect(kernel.socket_path) as me:
        svc = me.register("views")
        c = children.start(SENDER, "views", stdin=subprocess.PIPE)
        assert readline(c) == "ready"
        rx = Receiver(svc, keep_all_kinds)
        try:
            sizes = {"copy": 300_000, "loan": 200_000, "small-loan": 100, "object": 150_000}
            seeds = {"copy": 1000, "loan": 2000, "small-loan": 3000, "object": 4000}
            for kind in ("copy", "loan", "small-loan", "object"):
                wire = "loan" if kind == "small-loan" else kind
                command(c, f"{wire} 3 {sizes[kind]} {seeds[kind]}")
                assert readline(c, 30) == "done 0"
            assert rx.served == 12 and len(rx.kept) == 12
            kept = list(rx.kept)
            small = [k for k in kept if k[0] == "views" and len(k[2]) == 100]
            rx.keep = None  # later messages are answered and dropped
            for i, kind in enumerate(["copy", "loan", "object"] * 16):
                command(c, f"{kind} 1 {[300_000, 200_000, 150_000][i % 3]} {10_000 + i}")
                assert readline(c, 30) == "done 0"
                if i % 12 == 0:
                    check_kept(kept, sizes)
            assert rx.served == 60
            assert check_kept(kept, sizes) == 9 * 4 + 3 * 2 and len(small) == 3
            # The views go: every chunk goes back, and the sender can fill the whole arena again
            # (160 MiB through a 128 MiB arena), more than once.
            del kept, small
            rx.kept.clear()
            gc.collect()
            command(c, f"loan 10 {16 * MIB} 20000")
            assert readline(c, 60) == "done 0"
        finally:
            rx.close()


def test_a_receiver_holding_views_stalls_only_its_own_channel(kernel, children):
    """A receiver that answers (or releases) every request but keeps arrays of the payloads: its
    sender runs out of arena (WouldBlock) and nobody else does; once the arrays go, the sender
    has its whole arena back."""
    with capbus.connect(kernel.socket_path) as me:
        svc = me.register("views")
        greedy = children.start(SENDER, "views", stdin=subprocess.PIPE)
        other = children.start(SENDER, "views", stdin=subprocess.PIPE)
        assert readline(greedy) == "ready" and readline(other) == "ready"
        rx = Receiver(svc, lambda req: np.frombuffer(req.payload, np.uint8)
                      if req.data[0] < 10_000 else None)
        try:
            command(greedy, f"loan 12 {16 * MIB} 0")  # answered, but its arrays kept
            blocked = int(readline(greedy, 60).split()[1])
            assert blocked == 12 - 7  # 7 chunks of 16 MiB + 128 bytes fit the 128 MiB arena
            assert len(rx.kept) == 7
            command(greedy, f"oneway 3 {16 * MIB} 50")  # full for one-way messages too
            assert readline(greedy, 30) == "done 3"
            # The other client's channel is not affected (zero-copy and copied payloads).
            command(other, f"loan 20 {4 * MIB} 10000")
            assert readline(other, 60) == "done 0"
            command(other, "copy 20 100000 20000")
            assert readline(other, 60) == "done 0"
            for i, arr in enumerate(rx.kept):  # and the held arrays never changed
                assert np.array_equal(arr, pattern(i, 16 * MIB))
            rx.kept.clear()
            del arr
            gc.collect()
            command(greedy, f"loan 12 {16 * MIB} 30000")  # the views went: room again
            assert readline(greedy, 60) == "done 0"
        finally:
            rx.close()


def test_the_senders_loan_views_after_commit_and_cancel(kernel, children):
    """A loan's buffer kept after the commit shows only its own message, however many messages
    follow, and writing into it never reaches a later message; a cancelled loan's buffer the
    same. When both places the lane could use are under such views, its payloads get
    WouldBlock: its own lane only (another thread's lane is served)."""
    c = children.start(ECHO, "echo", stdin=subprocess.DEVNULL)
    assert readline(c) == "ready"
    n = MIB
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("echo")
        first = pattern(1, n)
        with ep.loan(n) as loan:
            np.frombuffer(loan.buffer, np.uint8)[:] = first
            r = loan.call(1, timeout=10)
        assert r.data[:2] == (zlib.crc32(first), n)
        kept = loan.buffer  # committed: stays valid
        arr = np.frombuffer(kept, np.uint8)
        for i in range(2, 46):
            data = pattern(i, n - 64 * (i % 5))
            if i % 2:
                r = ep.call(1, payload=data.tobytes(), timeout=10)
            else:
                with ep.loan(len(data)) as other:
                    np.frombuffer(other.buffer, np.uint8)[:] = data
                    r = other.call(1, timeout=10)
            assert r.data[:2] == (zlib.crc32(data), len(data)), i  # the receiver saw its own
            assert np.array_equal(arr, first), f"the kept loan view shows message {i}"
        del other
        # Writing into the old loan's buffer while a later message waits in the arena.
        ep.call(9, (300,), timeout=10)  # the receiver sleeps 300 ms
        later = pattern(100, n)
        ep.send_async(1, payload=later.tobytes())
        kept[:] = b"\xff" * n
        assert ep.call(8, timeout=10).data[0] == zlib.crc32(later)  # untouched
        assert bytes(kept[:4]) == b"\xff" * 4
        # Cancelled with a view kept: the chunk stays reserved for that view.
        with ep.loan(n) as loan2:
            mine = loan2.buffer
            np.frombuffer(mine, np.uint8)[:] = pattern(7, n)
        with pytest.raises(capbus.IpcError, match="given back"):
            loan2.buffer  # noqa: B018 - the runtime dropped its own reference
        # The committed view holds offset 0, the cancelled one the lane's position: no room.
        with pytest.raises(capbus.WouldBlock, match="view of an earlier loan"):
            ep.call(1, payload=pattern(8, n).tobytes(), timeout=10)
        box: dict = {}

        def other_thread():  # its own lane
            data = pattern(9, n)
            box["r"] = ep.call(1, payload=data.tobytes(), timeout=10).data[0] == zlib.crc32(data)

        t = threading.Thread(target=other_thread)
        t.start()
        t.join(20)
        assert box["r"] is True
        del kept, arr, loan
        for i in range(40):
            data = pattern(200 + i, n // 2 + 64 * i)
            assert ep.call(1, payload=data.tobytes(), timeout=10).data[0] == zlib.crc32(data)
            assert np.array_equal(np.frombuffer(mine, np.uint8), pattern(7, n)), i
        del mine
        gc.collect()
        with ep.loan(16 * MIB) as big:  # everything is free again
            assert big.call(1, timeout=10).data[1] == 16 * MIB


def test_views_outlive_a_closed_process_and_its_mappings_go_with_them(kernel, children):
    """A Process (its ServerSet, its Lanes) closed while views of its payloads and loans live:
    the views stay readable and unchanged; the channel mappings go with the last view."""
    gc.collect()
    before = channel_mappings()
    me = capbus.connect(kernel.socket_path)
    svc = me.register("views")
    c = children.start(SENDER, "views", stdin=subprocess.PIPE)
    e = children.start(ECHO, "echo", stdin=subprocess.DEVNULL)
    assert readline(e) == "ready" and readline(c) == "ready"
    rx = Receiver(svc, keep_all_kinds)
    try:
        command(c, "loan 2 200000 1")
        assert readline(c, 30) == "done 0"
        command(c, "copy 2 300000 10")
        assert readline(c, 30) == "done 0"
    finally:
        rx.close()
    kept = list(rx.kept)
    del rx
    ep = me.lookup("echo")
    with ep.loan(MIB) as loan:
        np.frombuffer(loan.buffer, np.uint8)[:] = pattern(5, MIB)
        loan.call(1, timeout=10)
    lane_view = np.frombuffer(loan.buffer, np.uint8)
    del loan
    assert channel_mappings() == before + 2  # the service's channel and our lane
    me.close()
    del svc, ep, me  # (a closed Process's endpoints keep their lanes while it is referenced)
    gc.collect()
    assert check_kept(kept, {}) == 16 and np.array_equal(lane_view, pattern(5, MIB))
    assert channel_mappings() == before + 2
    del lane_view
    gc.collect()
    assert channel_mappings() == before + 1
    del kept
    gc.collect()
    assert channel_mappings() == before


def test_a_sender_killed_while_its_payloads_are_viewed(kernel, children):
    """The sender dies (SIGKILL) in the middle of a stream while the receiver keeps arrays of its
    payloads: the channel goes, the arrays stay readable and unchanged, another client is
    served, and the mapping goes with the last array."""
    gc.collect()
    before = channel_mappings()
    with capbus.connect(kernel.socket_path) as me:
        svc = me.register("views")
        victim = children.start(SENDER, "views", stdin=subprocess.PIPE)
        other = children.start(SENDER, "views", stdin=subprocess.PIPE)
        assert readline(victim) == "ready" and readline(other) == "ready"
        rx = Receiver(svc, lambda req: (req.data[0], np.frombuffer(req.payload, np.uint8))
                      if req.data[0] < 10_000 else None)
        try:
            command(victim, f"oneway 400 {MIB} 0")
            assert wait_until(lambda: len(rx.kept) >= 20, 30)
            victim.send_signal(signal.SIGKILL)  # mid-stream, while we hold its chunks
            victim.wait(10)
            kept = list(rx.kept)  # (at most the arena's worth: the rest got WouldBlock)
            command(other, "copy 10 100000 10000")
            assert readline(other, 30) == "done 0"
            time.sleep(0.2)
            for seed, arr in rx.kept:
                assert np.array_equal(arr, pattern(seed, MIB)), seed
        finally:
            rx.close()
        assert len(kept) >= 20
        mapped = channel_mappings()
        assert mapped == before + 2  # the dead sender's (kept for the arrays) and the other's
        rx.kept.clear()
        del kept, arr
        gc.collect()
        assert wait_until(lambda: channel_mappings() == before + 1, 5)


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def _one_channel(db, chans):
    """A test channel (1 MiB arena) between a ServerSet and a Lane in this process."""
    ch = chans(1)
    s = _core.ServerSet(db)
    s.add(1, ch.chan, ch.ctrl, ch.nslots, ch.arena, 7)
    return ch, s, _core.Lane(ch.chan, ch.ctrl, db, 1, ch.nslots, ch.arena)


# ---- the native core alone: a receiver lying about what it released ----------------------------


def test_a_receiver_claiming_everything_released_cannot_reach_a_loan_view(db, chans):
    """The receiver writes arena_released (a hostile one can write any legal value): it can make
    the lane think every chunk is free, but the lane still never writes over a live loan view."""
    ch, s, ln = _one_channel(db, chans)
    m = ch.map()
    rel_off = ch.layout()["req_arena_released"]
    v = ln.loan(300_000)
    v[:] = b"L" * 300_000
    ln.send_loan(0, 1, 0, ())
    cursor = _core.LARGE_MSG_SIZE + 300_000 + (-300_000 % 64)
    written = 0
    for i in range(12):
        _core.atomic_store_u64(m, rel_off, cursor)  # "all released", never read
        try:
            ln.send(0, 1, 0, (i,), bytes([i]) * 200_000)
        except _core.CorruptChannel:
            break
        except capbus.WouldBlock as exc:
            assert "view of an earlier loan" in str(exc)
            break
        written += 1
        cursor += _core.LARGE_MSG_SIZE + 200_000 + (-200_000 % 64)
        assert bytes(v) == b"L" * 300_000, i
    assert written >= 3 and bytes(v) == b"L" * 300_000
    del v
    s.close()
    ln.close()


def test_a_forked_child_dropping_inherited_views_gives_nothing_back(db, chans):
    """A child forked while the receiver holds views inherits them; when the child drops them,
    the chunks must not go back to the sender: the parent still reads them."""
    ch, s, ln = _one_channel(db, chans)
    m = ch.map()
    rel_off = ch.layout()["req_arena_released"]
    for i in range(3):
        ln.send(0, 1, 0, (i,), bytes([i + 1]) * 300_000)
    arrays = []
    for _ in range(3):
        r = s.poll()
        arrays.append(np.frombuffer(r.payload, np.uint8))
        r.release()
    del r
    assert _core.atomic_load_u64(m, rel_off) == 0  # the arrays hold every chunk
    pid = os.fork()
    if pid == 0:  # the child: drop everything it inherited
        code = 1
        try:
            arrays.clear()
            gc.collect()
            code = 0 if _core.atomic_load_u64(m, rel_off) == 0 else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert _core.atomic_load_u64(m, rel_off) == 0
    with pytest.raises(capbus.WouldBlock):
        ln.send(0, 1, 0, (), b"x" * 300_000)  # no room: nothing was given back
    assert [int(a[0]) for a in arrays] == [1, 2, 3] and all(len(set(a[::997])) == 1 for a in arrays)
    arrays.clear()
    assert _core.atomic_load_u64(m, rel_off) > 0  # the parent's own drop does give them back
    ln.send(0, 1, 0, (), b"x" * 300_000)
    s.close()
    ln.close()


def test_a_cancelled_loans_view_keeps_its_chunk_and_the_lane_goes_around_it(db, chans):
    """A cancelled loan whose view is kept: its chunk (at the lane's position) is never written;
    payloads go to the next lap's start once the receiver has let that go, wait (call) for it
    meanwhile, and get WouldBlock at once when only the lane's own views are in the way."""
    ch, s, ln = _one_channel(db, chans)
    ln.send(0, 1, 0, (), b"a" * 300_000)
    r1 = s.poll()  # held: offset 0 is the receiver's
    v = ln.loan(300_000)
    v[:] = b"C" * 300_000
    ln.cancel_loan()
    with pytest.raises(capbus.WouldBlock, match="arena is full"):
        ln.send(0, 1, 0, (), b"b" * 300_000)  # the receiver may still free offset 0: not ours
    with pytest.raises(capbus.Timeout):
        ln.call(0, 1, 0, (), b"b" * 300_000, 50_000_000)  # so a call waits for it
    r1.release()
    del r1
    ln.send(0, 1, 0, (1,), b"b" * 300_000)  # offset 0, around the cancelled chunk
    r2 = s.poll()
    assert r2.data[0] == 1 and bytes(r2.payload) == b"b" * 300_000
    assert bytes(v) == b"C" * 300_000
    # Everything released: a payload for which every place the receiver accepts overlaps the
    # cancelled chunk has only our own view in the way: WouldBlock at once, not a wait.
    r2.release()
    del r2
    ln.send(0, 1, 0, (2,), b"d" * 200_000)  # at offset 0 again: fits below v's chunk
    r3 = s.poll()
    r3.release()
    del r3
    with pytest.raises(capbus.WouldBlock, match="view of an earlier loan"):
        ln.send(0, 1, 0, (), b"e" * 700_000)
    assert bytes(v) == b"C" * 300_000
    del v
    ln.send(0, 1, 0, (3,), b"e" * 700_000)
    assert s.poll().data[0] == 3
    s.close()
    ln.close()
