"""pyzmq (optional): REQ/REP round trips and PUSH/PULL throughput over ipc://."""

from __future__ import annotations

import shutil
import tempfile
import time
from typing import Any

from bench.results import (
    METRIC_ROUND_TRIP,
    METRIC_THROUGHPUT,
    Result,
)

from .harness import (
    _CTX,
    _MSG,
    DEFAULT_DURATION,
    DEFAULT_TIMEOUT,
    MSG_SIZE,
    _Child,
    _default_warmup,
    _expect_ready,
    _latency_result,
    _rate_result,
    _run_rounds,
    _time_round_trips,
)

# ---- pyzmq REQ/REP


def _zmq_or_skip(mechanism: str, metric: str) -> tuple[Any, Result | None]:
    try:
        import zmq
    except ImportError as exc:
        return None, Result.skip(mechanism, metric, f"pyzmq not importable ({exc})")
    return zmq, None


def _child_zmq_rep(endpoint: str, ctrl: Any, timeout: float) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
    try:
        sock.bind(endpoint)
        ctrl.send("ready")
        recv, send = sock.recv, sock.send
        while True:
            m = recv()
            send(m)
            if not m:
                break
    except zmq.ZMQError:
        pass
    finally:
        sock.close(0)
        ctx.term()
        ctrl.close()


def zmq_round_trip(
    iterations: int | None = None,
    duration: float = DEFAULT_DURATION,
    warmup: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Result:
    """pyzmq REQ (parent) / REP (child) over ipc:// in a temporary directory."""
    name = "pyzmq REQ/REP ipc://"
    zmq, skipped = _zmq_or_skip(name, METRIC_ROUND_TRIP)
    if skipped:
        return skipped
    warmup = _default_warmup(iterations, 2000) if warmup is None else warmup
    tmp = tempfile.mkdtemp(prefix="capbus-bench-zmq-")
    endpoint = f"ipc://{tmp}/rr.sock"
    ctrl, child_ctrl = _CTX.Pipe()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(timeout * 1000))
    try:
        with _Child(_child_zmq_rep, (endpoint, child_ctrl, timeout), timeout) as child:
            child_ctrl.close()
            _expect_ready(ctrl, child)
            sock.connect(endpoint)
            send, recv = sock.send, sock.recv

            def rt() -> bytes:
                send(_MSG)
                return recv()

            samples = _time_round_trips(rt, iterations, duration, warmup)
            if rt() != _MSG:
                raise RuntimeError("zmq: echo mismatch")
            send(b"")
            recv()
    finally:
        sock.close(0)
        ctx.term()
        ctrl.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return _latency_result(name, samples, f"pyzmq {zmq.pyzmq_version()}, blocking send/recv")


# ---- pyzmq PUSH/PULL


def _child_zmq_push(endpoint: str, ctrl: Any, timeout: float) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, int(timeout * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(timeout * 1000))
    try:
        sock.connect(endpoint)
        ctrl.send("ready")
        send = sock.send
        while True:
            n = ctrl.recv()
            if not n:
                break
            for _ in range(n):
                send(_MSG)
    except (EOFError, zmq.ZMQError):
        pass
    finally:
        sock.close()
        ctx.term()
        ctrl.close()


def zmq_throughput(
    iterations: int | None = None,
    duration: float = DEFAULT_DURATION,
    warmup: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Result:
    """pyzmq PUSH (child) -> PULL (parent) over ipc://, one send/recv per message."""
    name = "pyzmq PUSH/PULL ipc://"
    zmq, skipped = _zmq_or_skip(name, METRIC_THROUGHPUT)
    if skipped:
        return skipped
    warmup = _default_warmup(iterations, 5000) if warmup is None else warmup
    tmp = tempfile.mkdtemp(prefix="capbus-bench-zmq-")
    endpoint = f"ipc://{tmp}/pp.sock"
    ctrl, child_ctrl = _CTX.Pipe()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
    pc = time.perf_counter_ns
    try:
        sock.bind(endpoint)
        with _Child(_child_zmq_push, (endpoint, child_ctrl, timeout), timeout) as child:
            child_ctrl.close()
            _expect_ready(ctrl, child)
            recv = sock.recv

            def recv_round(n: int) -> tuple[int, int]:
                recv()
                t0 = pc()
                for _ in range(n - 2):
                    recv()
                m = recv()
                t1 = pc()
                if len(m) != MSG_SIZE:
                    raise RuntimeError("zmq: bad message")
                return t0, t1

            n, elapsed = _run_rounds(ctrl, recv_round, iterations, duration, warmup)
            ctrl.send(0)
    finally:
        sock.close(0)
        ctx.term()
        ctrl.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return _rate_result(name, n, elapsed, f"pyzmq {zmq.pyzmq_version()}, default HWM")
