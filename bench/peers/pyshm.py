"""Pure-Python shared memory: a spin ping-pong and an SPSC ring (anchors, x86-64 TSO only)."""

from __future__ import annotations

import array
import os
import time
from typing import Any

from bench.results import (
    Result,
)

from .harness import (
    _CTX,
    _MAX_SAMPLES,
    _MSG,
    _RING_CAP,
    _SPIN_CHECK,
    DEFAULT_DURATION,
    DEFAULT_TIMEOUT,
    MSG_SIZE,
    _Child,
    _default_warmup,
    _latency_result,
    _open_shm,
    _parent_gone,
    _rate_result,
    _run_rounds,
    _shm_file,
)

# ---- pure-Python shared-memory spin ping-pong

# Layout: ping line at 0 (u64 seq + 48-byte message), pong line at 64 (same).
_PING_SEQ, _PING_MSG = 0, 8
_PONG_SEQ, _PONG_MSG = 64, 72
_STOP_SEQ = (1 << 64) - 1


def _child_py_spin(path: str, parent_pid: int, timeout: float) -> None:
    mm = _open_shm(path)
    q = memoryview(mm).cast("Q")
    try:
        end = time.monotonic() + timeout
        last = 0
        ping, pong = _PING_SEQ // 8, _PONG_SEQ // 8
        a0, a1, b0, b1 = _PING_MSG, _PING_MSG + MSG_SIZE, _PONG_MSG, _PONG_MSG + MSG_SIZE
        stop, spin_check = _STOP_SEQ, _SPIN_CHECK
        while True:
            spins = 0
            while (v := q[ping]) == last:
                spins += 1
                if spins >= spin_check:
                    spins = 0
                    if time.monotonic() > end or _parent_gone(parent_pid):
                        return
            if v == stop:
                return
            mm[b0:b1] = mm[a0:a1]
            q[pong] = v
            last = v
    finally:
        q.release()
        mm.close()


def py_spin_round_trip(
    iterations: int | None = None,
    duration: float = DEFAULT_DURATION,
    warmup: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Result:
    """Pure-Python spin ping-pong over a shared mmap (two seq counters on separate lines).

    Each side spins reading the other's counter through a memoryview cast to
    'Q'; the 48-byte message shares the cache line with its counter.
    """
    warmup = _default_warmup(iterations, 5000) if warmup is None else warmup
    pc = time.perf_counter_ns
    with _shm_file(4096) as (path, mm):
        q = memoryview(mm).cast("Q")
        try:
            with _Child(_child_py_spin, (path, os.getpid(), timeout), timeout) as child:
                ping, pong = _PING_SEQ // 8, _PONG_SEQ // 8
                a0, a1, b0, b1 = _PING_MSG, _PING_MSG + MSG_SIZE, _PONG_MSG, _PONG_MSG + MSG_SIZE
                msg, spin_check, check = _MSG, _SPIN_CHECK, child.check
                samples = array.array("q")
                append = samples.append
                limit = iterations if iterations is not None else _MAX_SAMPLES
                end = None
                reply = b""
                for seq in range(1, warmup + limit + 1):
                    if seq == warmup + 1:
                        end = pc() + int(duration * 1e9)
                    t0 = pc()
                    mm[a0:a1] = msg
                    q[ping] = seq
                    spins = 0
                    while q[pong] != seq:
                        spins += 1
                        if spins >= spin_check:
                            spins = 0
                            check()
                    reply = mm[b0:b1]
                    t1 = pc()
                    if end is not None:
                        append(t1 - t0)
                        if iterations is None and t1 >= end:
                            break
                q[ping] = _STOP_SEQ
                if reply != _MSG:
                    raise RuntimeError("python spin: echo mismatch")
        finally:
            q.release()
    return _latency_result(
        "Python shm spin ping-pong",
        samples,
        "pure Python, mmap + memoryview('Q') counters, both sides spin",
    )


# ---- pure-Python SPSC ring

# Layout: head (consumer) at 0, tail (producer) at 64, slots of 64 bytes from 128.
_RING_HEAD, _RING_TAIL, _RING_SLOTS, _RING_SLOT = 0, 64 // 8, 128, 64


def _child_py_ring_producer(path: str, ctrl: Any, parent_pid: int, timeout: float) -> None:
    mm = _open_shm(path)
    q = memoryview(mm).cast("Q")
    try:
        end = time.monotonic() + timeout
        tail = 0
        head_i, tail_i, cap, mask = _RING_HEAD, _RING_TAIL, _RING_CAP, _RING_CAP - 1
        base, slot, size, msg, spin_check = _RING_SLOTS, _RING_SLOT, MSG_SIZE, _MSG, _SPIN_CHECK
        while True:
            n = ctrl.recv()
            if not n:
                break
            for _ in range(n):
                spins = 0
                while tail - q[head_i] >= cap:
                    spins += 1
                    if spins >= spin_check:
                        spins = 0
                        if time.monotonic() > end or _parent_gone(parent_pid):
                            return
                off = base + (tail & mask) * slot
                mm[off : off + size] = msg
                tail += 1
                q[tail_i] = tail
    except EOFError:
        pass
    finally:
        q.release()
        mm.close()
        ctrl.close()


def py_ring_throughput(
    iterations: int | None = None,
    duration: float = DEFAULT_DURATION,
    warmup: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Result:
    """Pure-Python SPSC ring over a shared mmap, unbatched (index published per message)."""
    warmup = _default_warmup(iterations, 5000) if warmup is None else warmup
    size = _RING_SLOTS + _RING_CAP * _RING_SLOT
    ctrl, child_ctrl = _CTX.Pipe()
    pc = time.perf_counter_ns
    try:
        with _shm_file(size) as (path, mm):
            q = memoryview(mm).cast("Q")
            try:
                with _Child(
                    _child_py_ring_producer, (path, child_ctrl, os.getpid(), timeout), timeout
                ) as child:
                    child_ctrl.close()
                    state = [0]  # consumer's head index, kept across rounds
                    head_i, tail_i, mask = _RING_HEAD, _RING_TAIL, _RING_CAP - 1
                    base, slot, msize = _RING_SLOTS, _RING_SLOT, MSG_SIZE
                    spin_check, check = _SPIN_CHECK, child.check

                    def recv_round(n: int) -> tuple[int, int]:
                        head = state[0]
                        t0 = 0
                        m = b""
                        for i in range(n):
                            spins = 0
                            while q[tail_i] == head:
                                spins += 1
                                if spins >= spin_check:
                                    spins = 0
                                    check()
                            off = base + (head & mask) * slot
                            m = mm[off : off + msize]
                            head += 1
                            q[head_i] = head
                            if i == 0:
                                t0 = pc()
                        t1 = pc()
                        state[0] = head
                        if m != _MSG:
                            raise RuntimeError("python ring: bad message")
                        return t0, t1

                    n, elapsed = _run_rounds(ctrl, recv_round, iterations, duration, warmup)
                    ctrl.send(0)
            finally:
                q.release()
    finally:
        ctrl.close()
    return _rate_result(
        "Python shm SPSC ring (unbatched)",
        n,
        elapsed,
        f"pure Python, {_RING_CAP} x 64 B slots, head/tail published per message, spinning",
    )
