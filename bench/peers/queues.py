"""multiprocessing.Queue and faster-fifo (optional) throughput."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from bench.results import (
    METRIC_THROUGHPUT,
    Result,
)

from .harness import (
    _CTX,
    _MSG,
    DEFAULT_DURATION,
    DEFAULT_TIMEOUT,
    _Child,
    _default_warmup,
    _dist_version,
    _rate_result,
    _run_rounds,
)

# ---- multiprocessing.Queue


def _child_queue_put(q: Any, ctrl: Any) -> None:
    put = q.put
    try:
        while True:
            n = ctrl.recv()
            if not n:
                break
            for _ in range(n):
                put(_MSG)
    except EOFError:
        pass
    finally:
        ctrl.close()
        with contextlib.suppress(Exception):
            q.close()
            q.join_thread()


def mp_queue_throughput(
    iterations: int | None = None,
    duration: float = DEFAULT_DURATION,
    warmup: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Result:
    """multiprocessing.Queue: put (child) -> get (parent), one message per call."""
    warmup = _default_warmup(iterations, 5000) if warmup is None else warmup
    q = _CTX.Queue()
    ctrl, child_ctrl = _CTX.Pipe()
    pc = time.perf_counter_ns
    try:
        with _Child(_child_queue_put, (q, child_ctrl), timeout) as child:
            child_ctrl.close()
            child.on_timeout.append(lambda: q.put(None))  # wakes a blocked get()
            get = q.get

            def recv_round(n: int) -> tuple[int, int]:
                if get() is None:
                    raise TimeoutError("multiprocessing.Queue: timed out")
                t0 = pc()
                for _ in range(n - 2):
                    if get() is None:
                        raise TimeoutError("multiprocessing.Queue: timed out")
                m = get()
                t1 = pc()
                if m != _MSG:
                    raise RuntimeError("multiprocessing.Queue: bad message")
                return t0, t1

            n, elapsed = _run_rounds(ctrl, recv_round, iterations, duration, warmup)
            ctrl.send(0)
    finally:
        ctrl.close()
        q.close()
        q.cancel_join_thread()
    return _rate_result("multiprocessing.Queue", n, elapsed, "put/get, pickled bytes")


# ---- faster-fifo


def _child_ffifo_put(q: Any, ctrl: Any, timeout: float) -> None:
    put = q.put
    try:
        while True:
            n = ctrl.recv()
            if not n:
                break
            for _ in range(n):
                put(_MSG, True, timeout)
    except Exception:  # EOFError (parent gone), queue Full/timeout
        pass
    finally:
        ctrl.close()


def faster_fifo_throughput(
    iterations: int | None = None,
    duration: float = DEFAULT_DURATION,
    warmup: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    batched: bool = False,
) -> Result:
    """faster-fifo Queue: put (child) -> get (parent); ``batched`` uses get_many()."""
    name = "faster-fifo Queue" + (" (get_many)" if batched else "")
    try:
        import faster_fifo
    except ImportError as exc:
        return Result.skip(name, METRIC_THROUGHPUT, f"faster-fifo not importable ({exc})")
    warmup = _default_warmup(iterations, 5000) if warmup is None else warmup
    q = faster_fifo.Queue(max_size_bytes=1 << 20)
    ctrl, child_ctrl = _CTX.Pipe()
    pc = time.perf_counter_ns
    try:
        with _Child(_child_ffifo_put, (q, child_ctrl, timeout), timeout):
            child_ctrl.close()
            get, get_many = q.get, q.get_many

            def recv_round(n: int) -> tuple[int, int]:
                get(True, timeout)
                t0 = pc()
                if batched:
                    left = n - 1
                    m = None
                    while left:
                        got = get_many(True, timeout, left)
                        left -= len(got)
                        m = got[-1]
                else:
                    for _ in range(n - 2):
                        get(True, timeout)
                    m = get(True, timeout)
                t1 = pc()
                if m != _MSG:
                    raise RuntimeError("faster-fifo: bad message")
                return t0, t1

            n, elapsed = _run_rounds(ctrl, recv_round, iterations, duration, warmup)
            ctrl.send(0)
    finally:
        ctrl.close()
        with contextlib.suppress(Exception):
            q.close()
    how = "put + get_many (receiver batches)" if batched else "put/get, one message per call"
    return _rate_result(name, n, elapsed, f"faster-fifo {_dist_version('faster-fifo')}, {how}")
