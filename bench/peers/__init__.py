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
and ``timeout``, and returns a :class:`~bench.results.Result`.  A
mechanism whose optional dependency (pyzmq, iceoryx2, faster-fifo, a C
compiler) is missing returns a skipped Result with a note; a mechanism that
fails raises.

Children are started with the *spawn* method, so a script that calls these
functions needs the usual ``if __name__ == "__main__":`` guard (``python -c``,
``python -m bench.peers`` and pytest are fine).  Command line::

    python -m bench.peers [call] [async] [large] [--quick] [--json FILE]

The pure-Python shared-memory anchors rely on the interpreter executing plain
stores in program order, which holds on x86-64 (TSO); they are anchors, not
a correct cross-architecture protocol.
"""


from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.results import (
    METRIC_ROUND_TRIP,
    METRIC_THROUGHPUT,
    Result,
    machine_line,
    print_table,
)

from .harness import KINDS, LARGE_SIZES, MSG_SIZE, _Child  # noqa: F401 (_Child: for the tests)
from .iceoryx import iceoryx2_round_trip, iceoryx2_throughput
from .native import (
    NativeUnavailable,
    _native_source,  # noqa: F401 (for the tests)
    c_clients,
    c_futex_round_trip,
    c_ring_throughput,
    c_spin_round_trip,
    compile_native,
)
from .pipes import (
    pickle_pipe_large_round_trip,
    pipe_round_trip,
    shm_pipe_large_round_trip,
    socketpair_round_trip,
)
from .pyshm import py_ring_throughput, py_spin_round_trip
from .queues import faster_fifo_throughput, mp_queue_throughput
from .zeromq import zmq_round_trip, zmq_throughput

__all__ = [
    "KINDS",
    "LARGE_SIZES",
    "MSG_SIZE",
    "PeerSpec",
    "NativeUnavailable",
    "c_clients",
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
    """``python -m bench.peers [call|async|large ...] [--quick] [--json FILE]``."""
    import argparse

    from bench.results import machine_info, to_json

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
