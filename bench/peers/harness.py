"""What every peer benchmark shares: the message, the knobs' defaults, timing and
result helpers, and the child-process harness (a watchdog kills a child after its
timeout, and every child is reaped)."""

from __future__ import annotations

import array
import contextlib
import mmap
import multiprocessing
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from bench.results import (
    METRIC_ROUND_TRIP,
    METRIC_THROUGHPUT,
    Result,
    percentile,
)

MSG_SIZE = 48
_MSG = bytes(range(MSG_SIZE))  # first byte 0: never the stop marker below
_STOP_BYTE = 0xFF
LARGE_SIZES = (64 << 10, 1 << 20, 64 << 20)
KINDS = ("call", "async", "large")

DEFAULT_DURATION = 1.5
DEFAULT_TIMEOUT = 60.0
_MAX_SAMPLES = 2_000_000  # cap on stored per-round-trip samples (duration mode)
_MAX_MSGS = 50_000_000  # cap on one throughput round
_CALIBRATE_NS = 100_000_000  # a calibration round this long is enough to size the real one
_SPIN_CHECK = 1 << 16  # spinning loops look at the clock every this many spins

_RING_CAP = 1024  # slots of the SPSC ring anchors (the Python one and bench/native/spsc_ring.c)

_CTX = multiprocessing.get_context("spawn")


# =========================================================================== helpers


def _default_warmup(iterations: int | None, full: int) -> int:
    if iterations is None:
        return full
    return max(1, min(full, iterations // 10))


def _latency_result(mechanism: str, samples_ns: Sequence[int], note: str, size: int = MSG_SIZE) -> Result:
    if not samples_ns:
        raise RuntimeError(f"{mechanism}: no samples measured")
    s = sorted(samples_ns)
    return Result(
        mechanism,
        METRIC_ROUND_TRIP,
        median_us=percentile(s, 0.5) / 1000.0,
        p99_us=percentile(s, 0.99) / 1000.0,
        note=note,
        size_bytes=size,
        samples=len(s),
    )


def _rate_result(mechanism: str, n: int, elapsed_ns: int, note: str) -> Result:
    return Result(
        mechanism,
        METRIC_THROUGHPUT,
        msgs_per_s=(n - 1) * 1e9 / max(elapsed_ns, 1),
        note=note,
        samples=n,
    )


def _time_round_trips(
    rt: Callable[[], Any], iterations: int | None, duration: float, warmup: int
) -> Sequence[int]:
    """Call ``rt`` warmup times, then time each call (``iterations`` or ``duration``)."""
    pc = time.perf_counter_ns
    for _ in range(warmup):
        rt()
    samples = array.array("q")
    append = samples.append
    if iterations is not None:
        for _ in range(iterations):
            t0 = pc()
            rt()
            append(pc() - t0)
        return samples
    end = pc() + int(duration * 1e9)
    for _ in range(_MAX_SAMPLES):
        t0 = pc()
        rt()
        t1 = pc()
        append(t1 - t0)
        if t1 >= end:
            break
    return samples


def _run_rounds(
    ctrl: Any,
    recv_round: Callable[[int], tuple[int, int]],
    iterations: int | None,
    duration: float,
    warmup: int,
) -> tuple[int, int]:
    """Drive a sender child round by round; returns (messages, elapsed ns) of the last round.

    For each round the parent sends the message count over ``ctrl`` and
    ``recv_round(n)`` receives exactly ``n`` messages, returning the
    perf_counter_ns timestamps of the first and the last one.
    """

    def one(n: int) -> int:
        ctrl.send(n)
        t_first, t_last = recv_round(n)
        return max(t_last - t_first, 1)

    if warmup:
        one(max(warmup, 2))
    if iterations is not None:
        n = max(iterations, 2)
        return n, one(n)
    n = 1000
    while True:
        elapsed = one(n)
        if elapsed >= _CALIBRATE_NS or n >= _MAX_MSGS:
            break
        n = min(n * 4, _MAX_MSGS)
    rate = (n - 1) * 1e9 / elapsed
    n = int(min(max(rate * duration, 2), _MAX_MSGS))
    return n, one(n)


class _Child:
    """Start a child process (spawn) and always reap it; a watchdog kills it on timeout.

    ``on_timeout`` callbacks run in the watchdog thread after the kill, to wake
    a parent blocked on something the child's death does not close (e.g. put a
    poison pill into a queue).
    """

    def __init__(self, target: Callable[..., Any], args: tuple[Any, ...], timeout: float):
        self.proc = _CTX.Process(target=target, args=args, daemon=True)
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.expired = False
        self.on_timeout: list[Callable[[], Any]] = []
        self._timer = threading.Timer(timeout, self._expire)
        self._timer.daemon = True

    def _expire(self) -> None:
        self.expired = True
        with contextlib.suppress(Exception):
            self.proc.kill()
        for cb in self.on_timeout:
            with contextlib.suppress(Exception):
                cb()

    def check(self) -> None:
        """Raise if the run has timed out or the child died (for spinning parents)."""
        if self.expired or time.monotonic() > self.deadline:
            raise TimeoutError(f"benchmark child did not finish within {self.timeout:g} s")
        if not self.proc.is_alive():
            raise RuntimeError(f"benchmark child exited early (code {self.proc.exitcode})")

    def __enter__(self) -> _Child:
        self.proc.start()
        self._timer.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._timer.cancel()
        grace = 0.5 if exc_type is not None else max(self.deadline - time.monotonic(), 0.5)
        self.proc.join(min(grace, 10.0))
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(2.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.proc.close()
        if self.expired and (exc_type is None or not issubclass(exc_type, TimeoutError)):
            # the watchdog fired: whatever the parent saw (EOF, reset, zmq.Again...) is a timeout
            raise TimeoutError(f"benchmark child did not finish within {self.timeout:g} s") from exc


def _expect_ready(conn: Any, child: _Child, what: str = "ready") -> Any:
    if not conn.poll(max(child.deadline - time.monotonic(), 0.1)):
        raise TimeoutError("benchmark child did not start in time")
    msg = conn.recv()
    if isinstance(msg, tuple) and msg and msg[0] == "error":
        raise RuntimeError(f"benchmark child failed: {msg[1]}")
    if msg != what:
        raise RuntimeError(f"unexpected message from benchmark child: {msg!r}")
    return msg


def _parent_gone(parent_pid: int) -> bool:
    return os.getppid() != parent_pid


@contextlib.contextmanager
def _shm_file(size: int) -> Iterator[tuple[str, mmap.mmap]]:
    """A zeroed shared-memory file (in /dev/shm when available), removed on exit."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    path = os.path.join(base, f"capbus-bench-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    try:
        yield path, mm
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        with contextlib.suppress(BufferError):
            mm.close()


def _open_shm(path: str) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


# =========================================================================== round trips

def _dist_version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return "?"
