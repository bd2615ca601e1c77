"""`python -m bench --only topics`: one publisher -> 4 subscribers, each its own process.

Fan-out throughput: the publisher sends N 48-byte samples as fast as its transport lets it
(never losing one: capbus overflow="block", iceoryx2 RetryUntilDelivered, pyzmq with no
high-water mark), every subscriber counts what it receives between its first and last sample;
the table shows delivered samples/s per subscriber (the median subscriber, and the slowest).
Latency: one sample at a time (paced), stamped with CLOCK_MONOTONIC just before it is
published, the subscribers note when it arrived: 48-byte copies and 4 MiB loans (written in
place, then published: the subscribers read the same memory).

Peers are optional (the `bench` extra): a row says why one was skipped. Subscribers wait as
each mechanism lets them without a busy thread where it can: capbus "block" (a futex), pyzmq
a blocking recv; iceoryx2's Python API has no blocking receive without an event service, so its
subscribers poll and yield the CPU (sched_yield) between empty polls.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

from .results import METRIC_ROUND_TRIP, METRIC_THROUGHPUT, Result, machine_line, print_table

_CTX = multiprocessing.get_context("spawn")
SUBSCRIBERS = 4
MSG = 48
BIG = 4 << 20
_DEPTH = 4096  # samples that may wait for a subscriber (pyzmq: no high-water mark)
_HELD = 512  # capbus: samples a subscriber may hold at once (recv_many's largest batch)
_PUB_BATCH = 64  # capbus publish_many: samples per call
_TIMEOUT = 60.0


def _stats(rates: list[float]) -> tuple[float, float]:
    return statistics.median(rates), min(rates)


def _median_round(rows: list[Result]) -> Result:
    """The round with the median figure (its note says how many rounds there were)."""
    good = sorted((r for r in rows if r.msgs_per_s), key=lambda r: r.msgs_per_s or 0)
    if not good:
        return rows[0]
    pick = good[(len(good) - 1) // 2]
    if len(rows) > 1:
        pick.note += f"; median of {len(good)} alternating rounds " + \
            "/".join(f"{(r.msgs_per_s or 0) / 1e3:.0f}k" for r in good)
    return pick


def _fanout(name: str, note: str, pub: Callable[..., None], sub: Callable[..., None],
            cfg: dict[str, Any], n: int) -> Result:
    """One pub(cfg, n, go, ready) process and SUBSCRIBERS sub(cfg, n, ready, results) ones;
    each says ready, then the publisher goes."""
    ready, results, go = _CTX.Queue(), _CTX.Queue(), _CTX.Event()
    procs = [_CTX.Process(target=pub, args=(cfg, n, go, ready), daemon=True)]
    procs += [_CTX.Process(target=sub, args=(cfg, n, ready, results), daemon=True)
              for _ in range(SUBSCRIBERS)]
    for p in procs:
        p.start()
    try:
        for _ in range(SUBSCRIBERS + 1):
            ready.get(timeout=_TIMEOUT)
        go.set()
        got = [results.get(timeout=_TIMEOUT) for _ in range(SUBSCRIBERS)]
    except Exception as exc:  # a peer that stalls is a row saying so, not a dead bench
        return Result.skip(name, METRIC_THROUGHPUT, f"failed: {exc!r:.120}")
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
    errors = [g for g in got if isinstance(g, str)]
    if errors:
        return Result.skip(name, METRIC_THROUGHPUT, f"failed: {errors[0]:.120}")
    rates = [count * 1e9 / max(ns, 1) for count, ns in got]
    med, low = _stats(rates)
    counts = sorted(c for c, _ in got)
    return Result(name, METRIC_THROUGHPUT, msgs_per_s=med,
                  note=f"{note}; slowest subscriber {low / 1e6:.2f} M/s; received "
                       f"{counts[0]}..{counts[-1]} of {n}", samples=n)


# ---- capbus ------------------------------------------------------------------------------------


def _capbus_sub(cfg: dict[str, Any], n: int, ready: Any, results: Any) -> None:
    import capbus

    try:
        proc = capbus.connect(cfg["path"], wait=cfg["wait"])
        sub = proc.subscribe(cfg["topic"], depth=cfg["depth"], timeout=30)
        ready.put(1)
        if cfg["recv_batch"]:
            results.put(_capbus_count_many(sub, cfg["recv_batch"]))
            return
        recv = sub.recv
        s = recv(_TIMEOUT)
        t0 = time.perf_counter_ns()
        count = 1
        last = s.opcode
        s.release()
        while not last:
            s = recv(_TIMEOUT)
            last = s.opcode
            s.release()
            count += 1
        results.put((count, time.perf_counter_ns() - t0))
    except Exception as exc:
        results.put(f"capbus subscriber: {exc!r}")


def _capbus_count_many(sub: Any, batch: int) -> tuple[int, int]:
    """recv_many: every sample is still looked at (its opcode); the batch is dropped whole
    before the next receive, which gives its slots back in one pass."""
    recv_many = sub.recv_many
    got = recv_many(batch, _TIMEOUT)
    t0 = time.perf_counter_ns()
    count = 0
    last = 0
    while True:
        for s in got:
            last = s.opcode
        count += len(got)
        if last:
            return count, time.perf_counter_ns() - t0
        del got, s  # else the old batch is still held while the next is taken (max_held)
        got = recv_many(batch, _TIMEOUT)


def _capbus_pub(cfg: dict[str, Any], n: int, go: Any, ready: Any) -> None:
    import capbus

    proc = capbus.connect(cfg["path"], wait=cfg["wait"])
    pub = cfg["publisher"](proc)
    while pub.subscribers < SUBSCRIBERS:
        time.sleep(0.001)
    ready.put(1)
    go.wait(_TIMEOUT)
    payload = b"x" * MSG
    batch = cfg["pub_batch"]
    if batch:
        publish_many = pub.publish_many
        items = [(0, (), payload)] * batch
        for _ in range((n - 1) // batch):
            publish_many(items, timeout=None)
        rest = (n - 1) % batch
        publish_many(items[:rest] + [(1, (), payload)], timeout=None)
    else:
        publish = pub.publish
        for _ in range(n - 1):
            publish(payload=payload, timeout=None)
        publish(opcode=1, payload=payload, timeout=None)
    time.sleep(0.5)
    pub.close()


def _publisher_48(proc: Any) -> Any:
    return proc.publish("bench-topics", max_size=MSG, overflow="block", max_depth=_DEPTH,
                        max_held=_HELD, max_subscribers=SUBSCRIBERS)


def capbus_fanout(path: str, n: int, wait: str, batch: int = 0) -> Result:
    """batch 0: publish() and recv() per sample; else publish_many(batch samples) and
    recv_many(up to _HELD // 2)."""
    cfg = {"path": path, "topic": "bench-topics", "wait": wait, "depth": _DEPTH,
           "publisher": _publisher_48, "pub_batch": batch, "recv_batch": _HELD // 2 if batch else 0}
    if batch:
        return _fanout(f"capbus topic batch ({wait})",
                       f"overflow=block, depth {_DEPTH}, publish_many({batch}) + "
                       f"recv_many({_HELD // 2}), each sample's opcode read",
                       _capbus_pub, _capbus_sub, cfg, n)
    return _fanout(f"capbus topic ({wait})", f"overflow=block, depth {_DEPTH}, publish(copy) + "
                   "recv() + release() per sample", _capbus_pub, _capbus_sub, cfg, n)


# ---- pyzmq PUB/SUB -------------------------------------------------------------------------------


def _zmq_sub(cfg: dict[str, Any], n: int, ready: Any, results: Any) -> None:
    try:
        import zmq

        ctx = zmq.Context()
        s = ctx.socket(zmq.SUB)
        s.setsockopt(zmq.RCVHWM, 0)
        s.setsockopt(zmq.SUBSCRIBE, b"")
        s.setsockopt(zmq.RCVTIMEO, int(_TIMEOUT * 1000))
        s.connect(cfg["endpoint"])
        ready.put(1)
        recv = s.recv
        while recv()[:1] == b"h":  # the publisher's hellos: it knows we are connected
            pass
        t0 = time.perf_counter_ns()
        count = 1
        while True:
            m = recv()
            count += 1
            if m[:1] == b"e":
                break
        results.put((count, time.perf_counter_ns() - t0))
        s.close(0)
        ctx.term()
    except Exception as exc:
        results.put(f"pyzmq subscriber: {exc!r}")


def _zmq_pub(cfg: dict[str, Any], n: int, go: Any, ready: Any) -> None:
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.PUB)
    s.setsockopt(zmq.SNDHWM, 0)
    s.setsockopt(zmq.LINGER, 2000)
    s.bind(cfg["endpoint"])
    ready.put(1)
    go.wait(_TIMEOUT)
    # Slow joiners: a SUB socket gets nothing until its subscription has reached the PUB.
    for _ in range(200):
        s.send(b"h" * MSG)
        time.sleep(0.002)
    send = s.send
    payload = b"x" * MSG
    for _ in range(n - 1):
        send(payload)
    send(b"e" * MSG)
    s.close()
    ctx.term()


def zmq_fanout(n: int) -> Result:
    name = "pyzmq PUB/SUB ipc://"
    try:
        import zmq
    except ImportError as exc:
        return Result.skip(name, METRIC_THROUGHPUT, f"pyzmq not importable ({exc})")
    tmp = tempfile.mkdtemp(prefix="capbus-bench-zmq-")
    try:
        return _fanout(name, f"pyzmq {zmq.pyzmq_version()}, no high-water mark, blocking recv",
                       _zmq_pub, _zmq_sub, {"endpoint": f"ipc://{tmp}/ps.sock"}, n)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- iceoryx2 publish-subscribe ------------------------------------------------------------------


class _Msg48(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint8 * MSG)]

    @staticmethod
    def type_name() -> str:
        return "CapbusBenchTopic48"


def _iox2_service(cfg: dict[str, Any]) -> tuple[Any, Any, Any]:
    import iceoryx2 as iox2

    with contextlib.suppress(Exception):
        iox2.set_log_level(iox2.LogLevel.Error)
    c = iox2.config.default()
    c.global_cfg.prefix = iox2.FileName.new(cfg["prefix"])
    c.global_cfg.root_path = iox2.Path.new(cfg["root"].rstrip("/") + "/")
    node = (iox2.NodeBuilder.new().config(c)
            .signal_handling_mode(iox2.SignalHandlingMode.Disabled).create(iox2.ServiceType.Ipc))
    svc = (node.service_builder(iox2.ServiceName.new(cfg["service"]))
           .publish_subscribe(_Msg48).max_subscribers(SUBSCRIBERS + 1)
           .subscriber_max_buffer_size(256).enable_safe_overflow(False).open_or_create())
    return iox2, node, svc


def _iox2_sub(cfg: dict[str, Any], n: int, ready: Any, results: Any) -> None:
    try:
        iox2, node, svc = _iox2_service(cfg)
        sub = svc.subscriber_builder().buffer_size(256).create()
        ready.put(1)
        receive, string_at, yield_ = sub.receive, ctypes.string_at, os.sched_yield
        deadline = time.monotonic() + _TIMEOUT
        count = 0
        t0 = 0
        while True:
            s = receive()
            if s is None:
                yield_()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"received {count}")
                continue
            first = string_at(s.payload_ptr, 1)
            s.delete()
            if first == b"h":
                continue
            if not count:
                t0 = time.perf_counter_ns()
            count += 1
            if first == b"e":
                break
        results.put((count, time.perf_counter_ns() - t0))
        sub.delete()
    except Exception as exc:
        results.put(f"iceoryx2 subscriber: {exc!r}")


def _iox2_pub(cfg: dict[str, Any], n: int, go: Any, ready: Any) -> None:
    iox2, node, svc = _iox2_service(cfg)
    pub = (svc.publisher_builder()
           .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered).create())
    ready.put(1)
    go.wait(_TIMEOUT)
    hello = _Msg48.from_buffer_copy(b"h" * MSG)
    for _ in range(50):  # let every subscriber's connection settle (see bench/peers/iceoryx.py)
        pub.update_connections()
        pub.send_copy(hello)
        time.sleep(0.002)
    payload = _Msg48.from_buffer_copy(b"x" * MSG)
    send = pub.send_copy
    for _ in range(n - 1):
        send(payload)
    send(_Msg48.from_buffer_copy(b"e" * MSG))
    time.sleep(0.5)
    pub.delete()


def iox2_fanout(n: int) -> Result:
    name = "iceoryx2 publish-subscribe"
    try:
        from importlib.metadata import version

        import iceoryx2  # noqa: F401
    except ImportError as exc:
        return Result.skip(name, METRIC_THROUGHPUT, f"iceoryx2 not importable ({exc})")
    root = tempfile.mkdtemp(prefix="capbus-bench-iox2-")
    prefix = f"cbt{os.getpid()}x{uuid.uuid4().hex[:8]}_"
    cfg = {"root": root, "prefix": prefix, "service": f"capbus/bench/{uuid.uuid4().hex}"}
    try:
        return _fanout(name, f"iceoryx2 {version('iceoryx2')}, send_copy, RetryUntilDelivered, "
                       "subscribers poll + sched_yield", _iox2_pub, _iox2_sub, cfg, n)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        for base in ("/dev/shm", tempfile.gettempdir()):
            for entry in os.listdir(base):
                if entry.startswith(prefix):
                    with contextlib.suppress(OSError):
                        path = os.path.join(base, entry)
                        shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)


# ---- latency: 48 bytes vs 4 MiB loans ------------------------------------------------------------


def _lat_sub(cfg: dict[str, Any], n: int, ready: Any, results: Any) -> None:
    import capbus

    try:
        proc = capbus.connect(cfg["path"], wait="block")
        sub = proc.subscribe(cfg["topic"], timeout=30)
        ready.put(1)
        lat: list[int] = []
        while True:
            with sub.recv(_TIMEOUT) as s:
                now = time.monotonic_ns()
                if s.opcode:
                    break
                lat.append(now - s.data[0])
        results.put(lat)
    except Exception as exc:
        results.put(f"capbus subscriber: {exc!r}")


def _lat_pub(cfg: dict[str, Any], n: int, go: Any, ready: Any) -> None:
    import capbus

    proc = capbus.connect(cfg["path"])
    size = cfg["size"]
    pub = proc.publish(cfg["topic"], max_size=size, overflow="block", max_depth=4, max_held=2,
                       max_subscribers=SUBSCRIBERS)
    while pub.subscribers < SUBSCRIBERS:
        time.sleep(0.001)
    ready.put(1)
    go.wait(_TIMEOUT)
    chunk = os.urandom(4096)
    for i in range(n + 1):
        with pub.loan(size) as loan:
            if size == BIG:
                loan.buffer[:] = chunk * (size // 4096)  # the one write of the sample
            else:
                loan.buffer[:] = chunk[:size]
            loan.publish(opcode=int(i == n), data=(time.monotonic_ns(),), timeout=_TIMEOUT)
        time.sleep(0.002)  # one at a time: latency, not queueing
    time.sleep(0.5)
    pub.close()


def capbus_latency(path: str, size: int, n: int) -> Result:
    name = f"capbus topic loan, {size if size < 1024 else size >> 20} {'B' if size < 1024 else 'MiB'}"
    ready, results, go = _CTX.Queue(), _CTX.Queue(), _CTX.Event()
    topic = f"bench-lat-{size}"
    cfg = {"path": path, "topic": topic, "size": size}
    procs = [_CTX.Process(target=_lat_sub, args=(cfg, n, ready, results), daemon=True)
             for _ in range(SUBSCRIBERS)]
    pp = _CTX.Process(target=_lat_pub, args=(cfg, n, go, ready), daemon=True)
    pp.start()
    for p in procs:
        p.start()
    procs.append(pp)
    try:
        for _ in range(SUBSCRIBERS + 1):
            ready.get(timeout=_TIMEOUT)
        go.set()
        got = [results.get(timeout=_TIMEOUT * 2) for _ in range(SUBSCRIBERS)]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    errors = [g for g in got if isinstance(g, str)]
    if errors:
        return Result.skip(name, METRIC_ROUND_TRIP, errors[0][:120], size_bytes=size)
    lat = sorted(x / 1000 for g in got for x in g)
    return Result(name, METRIC_ROUND_TRIP, median_us=statistics.median(lat),
                  p99_us=lat[int(len(lat) * 0.99) - 1], size_bytes=size, samples=len(lat),
                  note="one way, publish() to recv() at each of 4 subscribers (block wait); "
                       "the 4 MiB write is before the stamp")


def run(quick: bool) -> list[Result]:
    import capbus

    n = 20_000 if quick else 200_000
    tmp = tempfile.mkdtemp(prefix="cb-bench-topics-")
    path = os.path.join(tmp, "k.sock")
    rows: list[Result] = []
    try:
        with capbus.Kernel(path, audit=None):
            # Every mechanism once per round, the order rotated each round, the median round
            # kept: drift on a shared machine hits all of them alike.
            runs: list[Callable[[], Result]] = [
                lambda: capbus_fanout(path, n, "block"),
                lambda: capbus_fanout(path, n, "adaptive"),
                lambda: capbus_fanout(path, n, "block", _PUB_BATCH),
                lambda: capbus_fanout(path, n, "adaptive", _PUB_BATCH),
                lambda: iox2_fanout(n),
                lambda: zmq_fanout(n),
            ]
            rounds = 1 if quick else 3
            got: list[list[Result]] = [[] for _ in runs]
            for r in range(rounds):
                for k in range(len(runs)):
                    i = (k + r) % len(runs)
                    got[i].append(runs[i]())
            rows = [_median_round(g) for g in got]
            print_table(f"Topics: 1 publisher -> {SUBSCRIBERS} subscribers (5 processes), "
                        f"{MSG}-byte samples, delivered samples/s per subscriber", rows,
                        machine_line())
            lat = [capbus_latency(path, 48, 100 if quick else 1000),
                   capbus_latency(path, BIG, 50 if quick else 300)]
            print_table("Topics: one-way latency of a loaned sample, 48 B vs 4 MiB", lat,
                        machine_line())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ours = max((r for r in rows if r.mechanism.startswith("capbus") and r.msgs_per_s),
               key=lambda r: r.msgs_per_s or 0, default=None)
    single = max((r for r in rows if r.mechanism.startswith("capbus topic (") and r.msgs_per_s),
                 key=lambda r: r.msgs_per_s or 0, default=None)
    iox = next((r for r in rows if r.mechanism.startswith("iceoryx2") and r.msgs_per_s), None)
    zmq = next((r for r in rows if r.mechanism.startswith("pyzmq") and r.msgs_per_s), None)

    def x(a: Result | None, b: Result | None) -> str:
        return f"{(a.msgs_per_s or 0) / b.msgs_per_s:.2f}x" if a and b and b.msgs_per_s else "n/a"

    print()
    print("Targets:")
    best = ours.mechanism if ours else "n/a"
    print(f"  fan-out vs iceoryx2-python: {x(ours, iox)} (target >= 5x; {best})")
    print(f"  fan-out vs pyzmq PUB/SUB:   {x(ours, zmq)} (target >= 3x; {best})")
    print(f"  per-sample API only:        {x(single, iox)} of iceoryx2, {x(single, zmq)} of "
          "pyzmq")
    small, big = lat
    if small.median_us and big.median_us:
        print(f"  4 MiB loan latency: {big.median_us / small.median_us:.2f}x a 48-byte sample's "
              "(target <= 3x)")
    return rows + lat
