"""Smoke tests of the comparison ("peer") benchmarks: tiny runs, well-formed results.

These never assert a speed: only that every available mechanism runs between
two processes, returns sane numbers, and leaves no process or file behind.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import time

import pytest

from bench import peers
from bench.results import (
    METRIC_ROUND_TRIP,
    METRIC_THROUGHPUT,
    Result,
    format_table,
    from_json,
    machine_info,
    machine_line,
    percentile,
    print_table,
    to_json,
)

ALL_SPECS = [spec for kind in peers.KINDS for spec in peers.peer_specs(kind)]


def _leftover_files() -> set[str]:
    found: set[str] = set()
    for base in ("/dev/shm", "/tmp"):
        for pattern in (f"capbus-bench-{os.getpid()}-*", f"cbb{os.getpid()}x*"):
            found.update(glob.glob(os.path.join(base, pattern)))
    return found


def _no_children_left() -> None:
    deadline = time.monotonic() + 5
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert multiprocessing.active_children() == []


def _assert_well_formed(r: Result, spec: peers.PeerSpec) -> None:
    assert isinstance(r, Result)
    assert not r.skipped
    assert r.mechanism
    assert r.samples > 0
    assert r.size_bytes > 0
    if spec.kind == "async":
        assert r.metric == METRIC_THROUGHPUT
        assert r.msgs_per_s is not None and r.msgs_per_s > 0
        assert r.median_us is None and r.p99_us is None
    else:
        assert r.metric == METRIC_ROUND_TRIP
        assert r.median_us is not None and r.median_us > 0
        assert r.p99_us is not None and r.p99_us >= r.median_us
        assert r.msgs_per_s is None
    if spec.kind == "large":
        assert r.size_bytes == spec.kwargs["size"]
    else:
        assert r.size_bytes == peers.MSG_SIZE


@pytest.mark.timeout(60)
@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: f"{s.kind}-{s.name}")
def test_peer_quick_run_is_well_formed(spec: peers.PeerSpec) -> None:
    before = _leftover_files()
    r = spec.run(**peers.quick_knobs(spec))
    try:
        if r.skipped:
            # Only optional mechanisms (pyzmq, iceoryx2, faster-fifo, C compiler) may skip.
            assert spec.optional, r.note
            assert r.note
            pytest.skip(r.note)
        _assert_well_formed(r, spec)
    finally:
        _no_children_left()
        assert _leftover_files() - before == set()


@pytest.mark.timeout(60)
def test_round_trip_respects_iterations() -> None:
    r = peers.pipe_round_trip(iterations=123, warmup=5, timeout=30)
    assert r.samples == 123
    r = peers.py_spin_round_trip(iterations=77, warmup=5, timeout=30)
    assert r.samples == 77
    _no_children_left()


@pytest.mark.timeout(60)
def test_round_trip_duration_mode() -> None:
    t0 = time.monotonic()
    r = peers.socketpair_round_trip(duration=0.2, warmup=10, timeout=30)
    assert time.monotonic() - t0 < 20
    assert r.samples > 0 and 0 < r.median_us <= r.p99_us
    _no_children_left()


@pytest.mark.timeout(60)
def test_throughput_duration_mode_calibrates() -> None:
    r = peers.mp_queue_throughput(duration=0.2, warmup=100, timeout=30)
    assert r.samples >= 2 and r.msgs_per_s > 0
    _no_children_left()


@pytest.mark.timeout(60)
def test_watchdog_kills_and_reaps_a_hung_child() -> None:
    t0 = time.monotonic()
    with pytest.raises(TimeoutError), peers._Child(time.sleep, (120,), timeout=1.0) as child:
        child.proc.join()  # returns once the watchdog killed it
    assert time.monotonic() - t0 < 30
    assert child.expired
    _no_children_left()


@pytest.mark.timeout(60)
def test_watchdog_unblocks_a_spinning_parent() -> None:
    with pytest.raises(TimeoutError), peers._Child(time.sleep, (120,), timeout=1.0) as child:
        while True:
            child.check()
            time.sleep(0.01)
    _no_children_left()


@pytest.mark.timeout(120)
def test_run_peers_call_quick_covers_every_spec() -> None:
    results = peers.run_peers("call", quick=True)
    specs = peers.peer_specs("call")
    assert len(results) == len(specs)
    for r, spec in zip(results, specs, strict=True):
        assert not r.note.startswith("failed:"), r.note
        if r.skipped:
            assert spec.optional
        else:
            _assert_well_formed(r, spec)
    _no_children_left()


def test_run_peers_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError):
        peers.run_peers("nope", quick=True)


@pytest.mark.timeout(120)
def test_compile_native_is_cached() -> None:
    try:
        first = peers.compile_native("futex_pingpong")
    except peers.NativeUnavailable as exc:
        pytest.skip(str(exc))
    assert first.is_file() and os.access(first, os.X_OK)
    assert peers.compile_native("futex_pingpong") == first


def test_native_sources_ship_with_the_package() -> None:
    for name in ("futex_pingpong.c", "spin_pingpong.c", "spsc_ring.c", "clients_pingpong.c",
                 "bench_common.h"):
        assert "capbus" in peers._native_source(name)


# ---------------------------------------------------------------- table.py


def _sample_results() -> list[Result]:
    return [
        Result("multiprocessing.Pipe", METRIC_ROUND_TRIP, 17.25, 30.5, note="n", samples=100),
        Result("C ring", METRIC_THROUGHPUT, msgs_per_s=1.5e8, note="batched", samples=10**6),
        Result.skip("iceoryx2 request-response", METRIC_ROUND_TRIP, "not importable"),
        Result("pickle", METRIC_ROUND_TRIP, 1500.0, 2500.0, size_bytes=64 << 20, samples=3),
    ]


def test_table_is_aligned_and_mentions_everything(capsys: pytest.CaptureFixture[str]) -> None:
    results = _sample_results()
    print_table("Title", results, machine_line())
    out = capsys.readouterr().out
    lines = out.rstrip("\n").split("\n")
    assert lines[0] == "Title"
    assert lines[1] == machine_line()
    for r in results:
        assert r.mechanism in out
    assert "SKIPPED: not importable" in out
    assert "64 MiB" in out and "48 B" in out
    assert "150,000,000" in out
    header, rows = lines[2], lines[4:]
    # columns are aligned: the "size" column ends at the same offset on every row
    end = header.index("size") + len("size")
    for row in rows:
        assert row[end - 1] != " ", row
        assert row[end : end + 2] == "  ", row
    assert format_table("Title", results, machine_line()) == out.rstrip("\n")


def test_json_round_trip() -> None:
    results = _sample_results()
    text = to_json(results, machine_info())
    assert from_json(text) == results
    assert from_json(to_json([])) == []


def test_machine_line_names_the_machine() -> None:
    line = machine_line()
    info = machine_info()
    assert info["python"] in line
    assert info["kernel"] in line
    assert f"{info['cores']} cores" in line


def test_percentile_nearest_rank() -> None:
    values = list(range(1, 101))
    assert percentile(values, 0.5) == 50
    assert percentile(values, 0.99) == 99
    assert percentile(values, 1.0) == 100
    assert percentile([7], 0.99) == 7
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_block_same_cpu_rounds_alternate_with_the_c_anchor() -> None:
    """The same-CPU block row and its C anchor come from alternating rounds against one echo
    server: two rows, capbus first, each saying how it was measured."""
    from bench import capbus_calls as capbus_bench

    rows = capbus_bench.block_same_cpu_interleaved(rounds=2, n=300, anchor_iterations=300)
    assert [r.mechanism for r in rows] == ["capbus block", "C futex ping-pong (same CPU)"]
    ours, anchor = rows
    assert not ours.skipped and ours.samples == 600 and 0 < ours.median_us <= ours.p99_us
    assert "same CPU" in ours.note and "2 rounds" in ours.note
    if anchor.skipped:  # no C compiler here
        return
    assert 0 < anchor.median_us <= anchor.p99_us and "2 rounds" in anchor.note


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("clients", "spin_ns"), [(1, -1), (3, 50_000), (3, 0)])
def test_c_clients_reference_serves_every_client(clients: int, spin_ns: int) -> None:
    """The C reference of the clients section: every client gets answers (each reply is checked
    in C against its request), the figures add up, and every process is reaped."""
    try:
        out = peers.c_clients(clients, duration=0.3, spin_ns=spin_ns, timeout=30)
    except peers.NativeUnavailable as exc:
        pytest.skip(str(exc))
    assert out["clients"] == clients
    assert 0 < out["min_per_s"] <= out["max_per_s"] <= out["per_s"]
    assert out["min_per_s"] * clients <= out["per_s"] + 1 <= out["max_per_s"] * clients + 2
    assert out["csw_per_call"] >= 0
    if spin_ns < 0:
        assert out["csw_per_call"] < 0.5  # pure spin: no sleeps (a preemption now and then)


def test_clients_target_line_compares_each_series_with_its_own_best() -> None:
    from bench.sched import clients_target

    rows = [Result("capbus, 1 client process", METRIC_THROUGHPUT, msgs_per_s=1000.0),
            Result("C pure spin, 1 client", METRIC_THROUGHPUT, msgs_per_s=10_000.0),
            Result("capbus, 16 client processes", METRIC_THROUGHPUT, msgs_per_s=500.0),
            Result("C spin 50 us, then futex, 16 clients", METRIC_THROUGHPUT, msgs_per_s=2000.0),
            Result("C futex only, 16 clients", METRIC_THROUGHPUT, msgs_per_s=1000.0)]
    line = clients_target(rows)
    assert "capbus 0.50x" in line and "C reference 0.20x" in line
    assert "futex only: 0.10x" in line and "capbus at 16 = 0.50x C futex only" in line
    rows[1] = Result.skip("C pure spin, 1 client", METRIC_THROUGHPUT, "no compiler")
    rows[3:] = []
    assert "C reference n/a" in clients_target(rows)
