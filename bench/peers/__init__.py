"""Comparison ("peer") benchmarks: what capbus is measured against.

Every measurement runs between two real processes: the measuring (parent)
process and one child it starts (``multiprocessing`` *spawn* context, or a
forking C program) and always reaps.  Each run is guarded by a watchdog that
kills the child after ``timeout`` seconds, which makes the parent's blocking
call fail instead of hanging; children also exit by themselves when their
parent goes away or their own deadline passes.

Three kinds (see :func:`run_peers`):

``"call"``
    Round trip of a 48-byte message (request -> echo reply).  Every round trip
    is timed with :func:`time.perf_counter_ns` after a warm-up; the result has
    the median and p99 in microseconds.
``"async"``
    One-way throughput of 48-byte messages, child (sender) -> parent
    (receiver), timed at the receiver from the first to the last message of a
    round.  Unless ``iterations`` is given, a few growing calibration rounds
    pick a message count that lasts about ``duration`` seconds.
``"large"``
    Round trip of a 64 KiB / 1 MiB / 64 MiB payload (receiver obtains the data,
    replies with a tiny ack).

Every benchmark function takes ``iterations`` (exact count, for tiny test
runs), ``duration`` (seconds, used when ``iterations`` is None), ``warmup``
and ``timeout``, and returns a :class:`~capbus._bench.table.Result`.  A
mechanism whose optional dependency (pyzmq, iceoryx2, faster-fifo, a C
compiler) is missing returns a skipped Result with a note; a mechanism that
fails raises.

Children are started with the *spawn* method, so a script that calls these
functions needs the usual ``if __name__ == "__main__":`` guard (``python -c``,
``python -m capbus._bench.peers`` and pytest are fine).  Command line::

    python -m capbus._bench.peers [call] [async] [large] [--quick] [--json FILE]

The pure-Python shared-memory anchors rely on the interpreter executing plain
stores in program order, which holds on x86-64 (TSO); they are anchors, not
a correct cross-architecture protocol.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import glob
import hashlib
import importlib.resources
import math
import mmap
import multiprocessing
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capbus._bench.table import (
    METRIC_ROUND_TRIP,
    METRIC_THROUGHPUT,
    Result,
    machine_line,
    percentile,
    print_table,
)

__all__ = [
    "KINDS",
    "LARGE_SIZES",
    "MSG_SIZE",
    "PeerSpec",
    "NativeUnavailable",
    "c_futex_round_trip",
    "c_ring_throughput",
    "c_spin_round_trip",
    "compile_native",
    "faster_fifo_throughput",
    "iceoryx2_round_trip",
    "iceoryx2_throughput",
    "mp_queue_throughput",
    "full_knobs",
    "main",
    "peer_specs",
    "quick_knobs",
    "pickle_pipe_large_round_trip",
    "pipe_round_trip",
    "py_ring_throughput",
    "py_spin_round_trip",
    "run_peers",
    "shm_pipe_large_round_trip",
    "socketpair_round_trip",
    "zmq_round_trip",
    "zmq_throughput",
]

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

# ---- multiprocessing.Pipe


def _child_pipe_echo(conn: Any) -> None:
    recv, send = conn.recv_bytes, conn.send_bytes
    try:
        while True:
            m = recv()
            if not m:
                break
            send(m)
    except EOFError:
        pass
    finally:
        conn.close()


def pipe_round_trip(
    iterations: int | None = None,
    duration: float = DEFAULT_DURATION,
    warmup: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Result:
    """multiprocessing.Pipe (duplex): send_bytes / recv_bytes of 48 bytes, child echoes."""
    warmup = _default_warmup(iterations, 2000) if warmup is None else warmup
    parent, child_end = _CTX.Pipe()
    try:
        with _Child(_child_pipe_echo, (child_end,), timeout):
            child_end.close()
            send, recv = parent.send_bytes, parent.recv_bytes

            def rt() -> bytes:
                send(_MSG)
                return recv()

            samples = _time_round_trips(rt, iterations, duration, warmup)
            if rt() != _MSG:
                raise RuntimeError("multiprocessing.Pipe: echo mismatch")
            send(b"")
    finally:
        parent.close()
    return _latency_result("multiprocessing.Pipe", samples, "duplex Pipe, send_bytes/recv_bytes")


# ---- socket.socketpair


def _recv_exact(sock: Any, n: int) -> bytes:
    data = sock.recv(n)
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise EOFError("socket closed")
        data += more
    return data


def _child_socket_echo(sock: Any) -> None:
    try:
        while True:
            m = sock.recv(MSG_SIZE)
            if not m:
                break
            if len(m) < MSG_SIZE:
                m += _recv_exact(sock, MSG_SIZE - len(m))
            sock.sendall(m)
    except OSError:
        pass
    finally:
        sock.close()


def socketpair_round_trip(
    iterations: int | None = None,
    duration: float = DEFAULT_DURATION,
    warmup: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Result:
    """socket.socketpair(AF_UNIX, SOCK_STREAM): sendall / recv of 48 bytes, child echoes."""
    import socket

    warmup = _default_warmup(iterations, 2000) if warmup is None else warmup
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _Child(_child_socket_echo, (b,), timeout):
            b.close()
            sendall, recv = a.sendall, a.recv

            def rt() -> bytes:
                sendall(_MSG)
                m = recv(MSG_SIZE)
                if len(m) < MSG_SIZE:
                    if not m:
                        raise EOFError("socketpair: child closed the socket")
                    m += _recv_exact(a, MSG_SIZE - len(m))
                return m

            samples = _time_round_trips(rt, iterations, duration, warmup)
            if rt() != _MSG:
                raise RuntimeError("socketpair: echo mismatch")
            a.shutdown(socket.SHUT_WR)
    finally:
        a.close()
        b.close()
    return _latency_result("socket.socketpair (AF_UNIX stream)", samples, "blocking sendall/recv")


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


# ---- iceoryx2


class _Iox2Payload(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint8 * MSG_SIZE)]

    @staticmethod
    def type_name() -> str:
        return "CapbusBenchMsg48"


def _iox2_import() -> Any:
    import iceoryx2 as iox2

    with contextlib.suppress(Exception):
        iox2.set_log_level(iox2.LogLevel.Error)
    return iox2


@dataclass
class _Iox2Env:
    """A private iceoryx2 namespace: unique file prefix, private root dir; removed by cleanup."""

    prefix: str = field(default_factory=lambda: f"cbb{os.getpid()}x{uuid.uuid4().hex[:10]}_")
    root: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="capbus-bench-iox2-"))
    service: str = field(default_factory=lambda: f"capbus/bench/{uuid.uuid4().hex}")

    def node(self, iox2: Any) -> Any:
        cfg = iox2.config.default()
        g = cfg.global_cfg
        g.prefix = iox2.FileName.new(self.prefix)
        g.root_path = iox2.Path.new(self.root.rstrip("/") + "/")
        return (
            iox2.NodeBuilder.new()
            .config(cfg)
            .signal_handling_mode(iox2.SignalHandlingMode.Disabled)
            .create(iox2.ServiceType.Ipc)
        )

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        for base in ("/dev/shm", tempfile.gettempdir()):
            for path in glob.glob(os.path.join(base, self.prefix + "*")):
                with contextlib.suppress(OSError):
                    if os.path.isdir(path):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        os.unlink(path)


def _iox2_or_skip(mechanism: str, metric: str) -> tuple[Any, Result | None]:
    try:
        iox2 = _iox2_import()
    except ImportError as exc:
        return None, Result.skip(mechanism, metric, f"iceoryx2 not importable ({exc})")
    return iox2, None


def _child_iox2_server(env: _Iox2Env, ctrl: Any, parent_pid: int, timeout: float) -> None:
    iox2 = _iox2_import()
    node = svc = server = None
    try:
        node = env.node(iox2)
        svc = (
            node.service_builder(iox2.ServiceName.new(env.service))
            .request_response(_Iox2Payload, _Iox2Payload)
            .open_or_create()
        )
        server = svc.server_builder().create()
        ctrl.send("ready")
        receive = server.receive
        string_at, from_buffer_copy = ctypes.string_at, _Iox2Payload.from_buffer_copy
        end = time.monotonic() + timeout
        spins = 0
        while True:
            req = receive()
            if req is None:
                spins += 1
                if spins >= _SPIN_CHECK:
                    spins = 0
                    if time.monotonic() > end or _parent_gone(parent_pid):
                        break
                continue
            data = string_at(req.payload_ptr, MSG_SIZE)
            if data[0] == _STOP_BYTE:
                req.delete()
                break
            req.send_copy(from_buffer_copy(data))
            req.delete()
    except Exception as exc:  # report to the parent instead of dying silently
        with contextlib.suppress(Exception):
            ctrl.send(("error", repr(exc)))
    finally:
        if server is not None:
            server.delete()
        del svc, node
        ctrl.close()


def iceoryx2_round_trip(
    iterations: int | None = None,
    duration: float = DEFAULT_DURATION,
    warmup: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Result:
    """iceoryx2 request-response: client (parent) send_copy, server (child) echoes.

    Both sides busy-poll (``Client``'s PendingResponse.receive / Server.receive);
    no event service or WaitSet is used, so both processes burn a CPU.
    """
    name = "iceoryx2 request-response"
    iox2, skipped = _iox2_or_skip(name, METRIC_ROUND_TRIP)
    if skipped:
        return skipped
    warmup = _default_warmup(iterations, 2000) if warmup is None else warmup
    env = _Iox2Env()
    ctrl, child_ctrl = _CTX.Pipe()
    node = svc = client = None
    try:
        with _Child(_child_iox2_server, (env, child_ctrl, os.getpid(), timeout), timeout) as child:
            child_ctrl.close()
            _expect_ready(ctrl, child)
            node = env.node(iox2)
            svc = (
                node.service_builder(iox2.ServiceName.new(env.service))
                .request_response(_Iox2Payload, _Iox2Payload)
                .open_or_create()
            )
            client = svc.client_builder().create()
            req = _Iox2Payload.from_buffer_copy(_MSG)
            send_copy, string_at, check = client.send_copy, ctypes.string_at, child.check

            def rt() -> bytes:
                pending = send_copy(req)
                spins = 0
                while True:
                    resp = pending.receive()
                    if resp is not None:
                        break
                    spins += 1
                    if spins >= _SPIN_CHECK:
                        spins = 0
                        check()
                data = string_at(resp.payload_ptr, MSG_SIZE)
                resp.delete()
                pending.delete()
                return data

            samples = _time_round_trips(rt, iterations, duration, warmup)
            if rt() != _MSG:
                raise RuntimeError("iceoryx2: echo mismatch")
            stop = send_copy(_Iox2Payload.from_buffer_copy(bytes([_STOP_BYTE]) * MSG_SIZE))
            stop.delete()
    finally:
        if client is not None:
            client.delete()
        del svc, node
        ctrl.close()
        env.cleanup()
    return _latency_result(
        name,
        samples,
        f"iceoryx2 {_dist_version('iceoryx2')}, send_copy, both sides busy-poll receive()",
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


# ---- C anchors


class NativeUnavailable(RuntimeError):
    """The C anchors cannot be built here (no compiler, or the build failed)."""


_NATIVE_FILES = ("bench_common.h", "futex_pingpong.c", "spin_pingpong.c", "spsc_ring.c")
_CFLAGS = ("-O2", "-std=gnu11", "-Wall")
_native_lock = threading.Lock()


def _native_source(name: str) -> str:
    try:
        return (
            importlib.resources.files("capbus._bench")
            .joinpath("native")
            .joinpath(name)
            .read_text(encoding="utf-8")
        )
    except (FileNotFoundError, ModuleNotFoundError, TypeError):
        return (Path(__file__).parent / "native" / name).read_text(encoding="utf-8")


def _find_cc() -> str | None:
    cands = [os.environ.get("CC", ""), "cc", "gcc", "clang"]
    for cand in cands:
        if not cand:
            continue
        path = shutil.which(cand.split()[0])
        if path:
            return path
    return None


def _cache_dir() -> Path:
    env = os.environ.get("CAPBUS_BENCH_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "capbus" / "bench"


def compile_native(name: str) -> Path:
    """Build (or reuse from the cache) the C anchor ``name`` (e.g. ``"futex_pingpong"``).

    Sources ship in ``capbus/_bench/native``; binaries go to
    ``$CAPBUS_BENCH_CACHE`` or ``~/.cache/capbus/bench`` (a temp dir if that is
    not writable), keyed by a hash of sources, compiler and flags.
    Raises :class:`NativeUnavailable` when there is no compiler or the build fails.
    """
    cc = _find_cc()
    if cc is None:
        raise NativeUnavailable("no C compiler (cc/gcc/clang) found")
    sources = {f: _native_source(f) for f in _NATIVE_FILES}
    if f"{name}.c" not in sources:
        raise ValueError(f"unknown native anchor {name!r}")
    h = hashlib.sha256()
    for f in sorted(sources):
        h.update(f.encode() + b"\0" + sources[f].encode() + b"\0")
    h.update(cc.encode() + b"\0" + " ".join(_CFLAGS).encode())
    tag = h.hexdigest()[:16]
    with _native_lock:
        for cache in (_cache_dir(), Path(tempfile.gettempdir()) / f"capbus-bench-{os.getuid()}"):
            binary = cache / f"{name}-{tag}"
            if binary.is_file() and os.access(binary, os.X_OK):
                return binary
            try:
                cache.mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
            with tempfile.TemporaryDirectory(prefix="capbus-bench-build-") as build:
                for f, text in sources.items():
                    Path(build, f).write_text(text, encoding="utf-8")
                out = Path(build, name)
                proc = subprocess.run(
                    [cc, *_CFLAGS, "-o", str(out), str(Path(build, f"{name}.c"))],
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                if proc.returncode != 0:
                    raise NativeUnavailable(f"compiling {name}.c failed: {proc.stderr.strip()[-500:]}")
                tmp = cache / f".{name}-{tag}.{os.getpid()}.tmp"
                try:
                    shutil.copy2(out, tmp)
                    os.replace(tmp, binary)
                except OSError:
                    with contextlib.suppress(OSError):
                        tmp.unlink()
                    continue
            return binary
    raise NativeUnavailable("no writable cache directory for the C anchors")


def _run_native(name: str, args: list[Any], timeout: float) -> dict[str, float]:
    binary = compile_native(name)
    proc = subprocess.run(
        [str(binary), *(str(a) for a in args)],
        capture_output=True,
        text=True,
        timeout=timeout + 5,
    )
    if proc.returncode == -signal.SIGALRM:
        raise TimeoutError(f"{name} did not finish within {timeout:g} s")
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    out: dict[str, float] = {}
    for tok in proc.stdout.split():
        key, sep, value = tok.partition("=")
        if sep:
            out[key] = float(value)
    return out


def _alarm_s(timeout: float) -> int:
    """The C programs' alarm() in whole seconds (alarm(0) would disable it)."""
    return max(1, math.ceil(timeout))


def _cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _native_or_skip(name: str, mechanism: str, metric: str) -> Result | None:
    try:
        compile_native(name)
    except NativeUnavailable as exc:
        return Result.skip(mechanism, metric, str(exc))
    return None


def _native_latency(
    prog: str,
    mechanism: str,
    cpus: tuple[int, int],
    iterations: int | None,
    duration: float,
    warmup: int,
    timeout: float,
    note: str,
) -> Result:
    skipped = _native_or_skip(prog, mechanism, METRIC_ROUND_TRIP)
    if skipped:
        return skipped
    if iterations is not None:
        max_iters, dur_ms = iterations, int(timeout * 1000)
    else:
        max_iters, dur_ms = _MAX_SAMPLES, int(duration * 1000)
    args = [max_iters, dur_ms, warmup, cpus[0], cpus[1], _alarm_s(timeout)]
    out = _run_native(prog, args, timeout)
    return Result(
        mechanism,
        METRIC_ROUND_TRIP,
        median_us=out["median_ns"] / 1000.0,
        p99_us=out["p99_ns"] / 1000.0,
        note=f"{note}; measured in C (CLOCK_MONOTONIC), mean {out['mean_ns'] / 1000:.2f} us",
        samples=int(out["iters"]),
    )


def c_futex_round_trip(
    iterations: int | None = None,
    duration: float = DEFAULT_DURATION,
    warmup: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    same_cpu: bool = False,
) -> Result:
    """C futex ping-pong (FUTEX_WAIT/FUTEX_WAKE on a shared word), pinned.

    ``same_cpu=False``: the two processes on different CPUs; ``True``: both on one CPU.
    """
    warmup = _default_warmup(iterations, 2000) if warmup is None else warmup
    cpus = _cpus()
    where = "same CPU" if same_cpu else "cross-CPU"
    mechanism = f"C futex ping-pong ({where})"
    if same_cpu:
        pin = (cpus[0], cpus[0])
    elif len(cpus) < 2:
        return Result.skip(mechanism, METRIC_ROUND_TRIP, "needs two CPUs")
    else:
        pin = (cpus[0], cpus[1])
    return _native_latency(
        "futex_pingpong",
        mechanism,
        pin,
        iterations,
        duration,
        warmup,
        timeout,
        f"pinned to CPUs {pin[0]},{pin[1]}, no spinning before FUTEX_WAIT",
    )


def c_spin_round_trip(
    iterations: int | None = None,
    duration: float = 1.0,
    warmup: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Result:
    """C spinning cache-line ping-pong, cross-CPU: the machine's floor for a round trip."""
    warmup = _default_warmup(iterations, 20000) if warmup is None else warmup
    cpus = _cpus()
    mechanism = "C spin ping-pong (cross-CPU)"
    if len(cpus) < 2:
        return Result.skip(mechanism, METRIC_ROUND_TRIP, "needs two CPUs")
    return _native_latency(
        "spin_pingpong",
        mechanism,
        (cpus[0], cpus[1]),
        iterations,
        duration,
        warmup,
        timeout,
        f"pinned to CPUs {cpus[0]},{cpus[1]}, seq+message in one cache line per direction",
    )


# =========================================================================== throughput

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


# ---- iceoryx2 publish-subscribe

_IOX2_BUFFER = 256


def _iox2_pubsub(iox2: Any, node: Any, env: _Iox2Env) -> Any:
    return (
        node.service_builder(iox2.ServiceName.new(env.service))
        .publish_subscribe(_Iox2Payload)
        .subscriber_max_buffer_size(_IOX2_BUFFER)
        .enable_safe_overflow(False)
        .open_or_create()
    )


def _child_iox2_publisher(env: _Iox2Env, ctrl: Any) -> None:
    iox2 = _iox2_import()
    node = svc = pub = None
    try:
        node = env.node(iox2)
        svc = _iox2_pubsub(iox2, node, env)
        pub = (
            svc.publisher_builder()
            .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
            .create()
        )
        ctrl.send("ready")
        payload = _Iox2Payload.from_buffer_copy(_MSG)
        send_copy = pub.send_copy
        while True:
            n = ctrl.recv()
            if not n:
                break
            for _ in range(n):
                send_copy(payload)
    except EOFError:
        pass
    except Exception as exc:
        with contextlib.suppress(Exception):
            ctrl.send(("error", repr(exc)))
    finally:
        if pub is not None:
            pub.delete()
        del svc, node
        ctrl.close()


def iceoryx2_throughput(
    iterations: int | None = None,
    duration: float = DEFAULT_DURATION,
    warmup: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Result:
    """iceoryx2 publish-subscribe: publisher (child) send_copy -> subscriber (parent) polls."""
    name = "iceoryx2 publish-subscribe"
    iox2, skipped = _iox2_or_skip(name, METRIC_THROUGHPUT)
    if skipped:
        return skipped
    warmup = _default_warmup(iterations, 5000) if warmup is None else warmup
    env = _Iox2Env()
    ctrl, child_ctrl = _CTX.Pipe()
    node = svc = sub = None
    pc = time.perf_counter_ns
    try:
        node = env.node(iox2)
        svc = _iox2_pubsub(iox2, node, env)
        sub = svc.subscriber_builder().buffer_size(_IOX2_BUFFER).create()
        with _Child(_child_iox2_publisher, (env, child_ctrl), timeout) as child:
            child_ctrl.close()
            _expect_ready(ctrl, child)
            # Let the subscriber pick up the new publisher's connection before anything is
            # sent: with iceoryx2 0.10 a publisher that starts sending before the
            # subscriber's first receive() sometimes stalls for good after the first
            # buffer-full of samples (seen here in about half of the runs).
            first = sub.receive()
            if first is not None:
                raise RuntimeError("iceoryx2: unexpected sample before the first round")
            receive, string_at, check = sub.receive, ctypes.string_at, child.check

            def recv_one() -> bytes:
                spins = 0
                while True:
                    s = receive()
                    if s is not None:
                        break
                    spins += 1
                    if spins >= _SPIN_CHECK:
                        spins = 0
                        check()
                m = string_at(s.payload_ptr, MSG_SIZE)
                s.delete()
                return m

            def recv_round(n: int) -> tuple[int, int]:
                recv_one()
                t0 = pc()
                for _ in range(n - 2):
                    recv_one()
                m = recv_one()
                t1 = pc()
                if m != _MSG:
                    raise RuntimeError("iceoryx2: bad message")
                return t0, t1

            n, elapsed = _run_rounds(ctrl, recv_round, iterations, duration, warmup)
            ctrl.send(0)
    finally:
        if sub is not None:
            sub.delete()
        del svc, node
        ctrl.close()
        env.cleanup()
    return _rate_result(
        name,
        n,
        elapsed,
        f"iceoryx2 {_dist_version('iceoryx2')}, send_copy, subscriber busy-polls, "
        f"buffer {_IOX2_BUFFER}, backpressure RetryUntilDelivered",
    )


# ---- pure-Python SPSC ring

# Layout: head (consumer) at 0, tail (producer) at 64, slots of 64 bytes from 128.
_RING_CAP = 1024
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


# ---- C SPSC ring


def c_ring_throughput(
    iterations: int | None = None,
    duration: float = 1.0,
    warmup: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    batch: int = 1,
) -> Result:
    """C SPSC ring (child produces, parent consumes), pinned cross-CPU when possible.

    ``batch=1``: unbatched; ``batch>1``: indices published once per ``batch`` messages.
    """
    mechanism = "C SPSC ring (" + ("unbatched" if batch <= 1 else f"batched x{batch}") + ")"
    skipped = _native_or_skip("spsc_ring", mechanism, METRIC_THROUGHPUT)
    if skipped:
        return skipped
    warmup = _default_warmup(iterations, 100_000) if warmup is None else warmup
    cpus = _cpus()
    pin = (cpus[0], cpus[1]) if len(cpus) >= 2 else (-1, -1)
    if iterations is not None:
        max_msgs, dur_ms = max(iterations, 2), int(timeout * 1000)
    else:
        max_msgs, dur_ms = 0, int(duration * 1000)
    args = [max_msgs, dur_ms, warmup, batch, pin[0], pin[1], _alarm_s(timeout)]
    out = _run_native("spsc_ring", args, timeout)
    where = f"pinned to CPUs {pin[0]},{pin[1]}" if pin[0] >= 0 else "unpinned (one CPU)"
    return Result(
        mechanism,
        METRIC_THROUGHPUT,
        msgs_per_s=out["msgs_per_s"],
        note=f"{where}, {_RING_CAP} x 64 B slots; measured in C",
        samples=int(out["msgs"]),
    )


# =========================================================================== large messages


def _large_payload(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


def _child_shm_reader(conn: Any) -> None:
    from multiprocessing import shared_memory

    attached: dict[str, Any] = {}
    try:
        while True:
            req = conn.recv()
            if req is None:
                break
            name, size = req
            shm = attached.get(name)
            if shm is None:
                shm = attached[name] = shared_memory.SharedMemory(name=name)
            data = bytes(shm.buf[:size])  # the receiver reads (copies out) the payload
            conn.send_bytes(data[-1:])
    except EOFError:
        pass
    finally:
        for shm in attached.values():
            with contextlib.suppress(Exception):
                shm.close()
        conn.close()


def shm_pipe_large_round_trip(
    size: int = 1 << 20,
    iterations: int | None = None,
    duration: float = 1.0,
    warmup: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Result:
    """multiprocessing.shared_memory + Pipe: write into a SharedMemory block, send (name, size).

    One block is created up front and reused; per round trip the parent
    copies the payload in, sends ``(name, size)`` over a Pipe, the child
    (attached once) copies the payload out and replies with one byte.
    """
    from multiprocessing import shared_memory

    warmup = _default_warmup(iterations, 3) if warmup is None else warmup
    payload = _large_payload(size)
    shm = shared_memory.SharedMemory(create=True, size=size)
    parent, child_end = _CTX.Pipe()
    try:
        with _Child(_child_shm_reader, (child_end,), timeout):
            child_end.close()
            buf, name = shm.buf, shm.name
            send, recv = parent.send, parent.recv_bytes
            last = payload[-1:]

            def rt() -> bytes:
                buf[:size] = payload
                send((name, size))
                return recv()

            samples = _time_round_trips(rt, iterations, duration, warmup)
            if rt() != last:
                raise RuntimeError("shared_memory + Pipe: bad reply")
            send(None)
    finally:
        parent.close()
        shm.close()
        shm.unlink()
    return _latency_result(
        "shared_memory + Pipe",
        samples,
        "one reused block; sender copies in, receiver copies out; 1-byte ack",
        size,
    )


def _child_pickle_reader(conn: Any) -> None:
    try:
        while True:
            data = conn.recv()
            if data is None:
                break
            conn.send_bytes(data[-1:])
    except EOFError:
        pass
    finally:
        conn.close()


def pickle_pipe_large_round_trip(
    size: int = 1 << 20,
    iterations: int | None = None,
    duration: float = 1.0,
    warmup: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Result:
    """Pipe.send(bytes) (pickled) of the payload; the child unpickles it and acks one byte."""
    warmup = _default_warmup(iterations, 3) if warmup is None else warmup
    payload = _large_payload(size)
    parent, child_end = _CTX.Pipe()
    try:
        with _Child(_child_pickle_reader, (child_end,), timeout):
            child_end.close()
            send, recv = parent.send, parent.recv_bytes
            last = payload[-1:]

            def rt() -> bytes:
                send(payload)
                return recv()

            samples = _time_round_trips(rt, iterations, duration, warmup)
            if rt() != last:
                raise RuntimeError("pickle over Pipe: bad reply")
            send(None)
    finally:
        parent.close()
    return _latency_result("pickle over Pipe", samples, "Connection.send(bytes); 1-byte ack", size)


# =========================================================================== registry


def _dist_version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return "?"


@dataclass(frozen=True)
class PeerSpec:
    """One benchmark of a kind: ``fn(**kwargs, iterations=..., duration=...)``."""

    kind: str
    name: str
    fn: Callable[..., Result]
    kwargs: dict[str, Any] = field(default_factory=dict)
    optional: bool = False  # needs an optional dependency (pyzmq, iceoryx2, faster-fifo, cc)

    def run(self, **knobs: Any) -> Result:
        return self.fn(**self.kwargs, **knobs)


def peer_specs(kind: str) -> list[PeerSpec]:
    """The benchmarks run by :func:`run_peers` for ``kind``, in table order."""
    if kind == "call":
        return [
            PeerSpec(kind, "pipe", pipe_round_trip),
            PeerSpec(kind, "socketpair", socketpair_round_trip),
            PeerSpec(kind, "zmq", zmq_round_trip, optional=True),
            PeerSpec(kind, "iceoryx2", iceoryx2_round_trip, optional=True),
            PeerSpec(kind, "py_spin", py_spin_round_trip),
            PeerSpec(kind, "c_futex_cross", c_futex_round_trip, {"same_cpu": False}, True),
            PeerSpec(kind, "c_futex_same", c_futex_round_trip, {"same_cpu": True}, True),
            PeerSpec(kind, "c_spin", c_spin_round_trip, optional=True),
        ]
    if kind == "async":
        return [
            PeerSpec(kind, "zmq", zmq_throughput, optional=True),
            PeerSpec(kind, "mp_queue", mp_queue_throughput),
            PeerSpec(kind, "faster_fifo", faster_fifo_throughput, optional=True),
            PeerSpec(kind, "faster_fifo_many", faster_fifo_throughput, {"batched": True}, True),
            PeerSpec(kind, "iceoryx2", iceoryx2_throughput, optional=True),
            PeerSpec(kind, "py_ring", py_ring_throughput),
            PeerSpec(kind, "c_ring", c_ring_throughput, {"batch": 1}, True),
            PeerSpec(kind, "c_ring_batched", c_ring_throughput, {"batch": 64}, True),
        ]
    if kind == "large":
        specs = []
        for size in LARGE_SIZES:
            label = f"{size >> 20}MiB" if size >= 1 << 20 else f"{size >> 10}KiB"
            specs.append(PeerSpec(kind, f"shm_pipe_{label}", shm_pipe_large_round_trip, {"size": size}))
            specs.append(PeerSpec(kind, f"pickle_{label}", pickle_pipe_large_round_trip, {"size": size}))
        return specs
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def quick_knobs(spec: PeerSpec) -> dict[str, Any]:
    """Tiny iteration counts for tests / smoke runs."""
    if spec.kind == "call":
        return {"iterations": 300, "warmup": 30, "timeout": 30.0}
    if spec.kind == "async":
        return {"iterations": 500, "warmup": 50, "timeout": 30.0}
    size = spec.kwargs.get("size", 0)
    return {"iterations": 3 if size >= 16 << 20 else 20, "warmup": 1, "timeout": 30.0}


def full_knobs(spec: PeerSpec) -> dict[str, Any]:
    """Knobs for a real run: about 1-1.5 s of measurement per mechanism."""
    if spec.kind == "large":
        size = spec.kwargs.get("size", 0)
        if size >= 16 << 20:
            return {"iterations": 15, "warmup": 2}
        return {"duration": 1.0}
    return {}


def run_peers(kind: str, quick: bool = False, given: dict[str, Result] | None = None) -> list[Result]:
    """Run every peer benchmark of ``kind`` ("call", "async" or "large"), one at a time.

    ``quick``: a few hundred iterations each (smoke test); otherwise about 1-2 s
    each.  A mechanism that fails is reported as a skipped Result whose note
    starts with "failed:".  ``given``: rows measured already (by spec name, e.g.
    "c_futex_same"), put in their place instead of running those specs again.
    """
    results = []
    for spec in peer_specs(kind):
        if given and spec.name in given:
            results.append(given[spec.name])
            continue
        knobs = quick_knobs(spec) if quick else full_knobs(spec)
        try:
            results.append(spec.run(**knobs))
        except Exception as exc:
            metric = METRIC_THROUGHPUT if kind == "async" else METRIC_ROUND_TRIP
            size = spec.kwargs.get("size", MSG_SIZE)
            results.append(Result.skip(spec.name, metric, f"failed: {exc!r}", size))
    return results


_TITLES = {
    "call": "Round trip, 48-byte message (two processes)",
    "async": "One-way throughput, 48-byte messages (sender -> receiver)",
    "large": "Large message round trip (two processes)",
}


def main(argv: list[str] | None = None) -> int:
    """``python -m capbus._bench.peers [call|async|large ...] [--quick] [--json FILE]``."""
    import argparse

    from capbus._bench.table import machine_info, to_json

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("kinds", nargs="*", metavar="KIND", help="call, async and/or large (all)")
    ap.add_argument("--quick", action="store_true", help="tiny runs (smoke test)")
    ap.add_argument("--json", metavar="FILE", help="also write all results as JSON")
    args = ap.parse_args(argv)
    for kind in args.kinds:
        if kind not in KINDS:
            ap.error(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    everything: list[Result] = []
    for kind in args.kinds or KINDS:
        results = run_peers(kind, quick=args.quick)
        everything.extend(results)
        print_table(_TITLES[kind], results, machine_line())
        print()
    if args.json:
        Path(args.json).write_text(to_json(everything, machine_info()), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
