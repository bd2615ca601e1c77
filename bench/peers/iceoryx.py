"""iceoryx2 (optional): request-response round trips and publish-subscribe throughput."""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from bench.results import (
    METRIC_ROUND_TRIP,
    METRIC_THROUGHPUT,
    Result,
)

from .harness import (
    _CTX,
    _MSG,
    _SPIN_CHECK,
    _STOP_BYTE,
    DEFAULT_DURATION,
    DEFAULT_TIMEOUT,
    MSG_SIZE,
    _Child,
    _default_warmup,
    _dist_version,
    _expect_ready,
    _latency_result,
    _parent_gone,
    _rate_result,
    _run_rounds,
    _time_round_trips,
)

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
