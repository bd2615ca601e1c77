"""bench.plot: charts of benchmark results (hand-made results; no benchmark is run)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench import plot as bench_plot
from bench.results import METRIC_ROUND_TRIP, METRIC_THROUGHPUT, Result, from_json, to_json

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RT, TP = METRIC_ROUND_TRIP, METRIC_THROUGHPUT
MACHINE = {"cpu": "AMD EPYC 7B13", "cores": 2, "usable_cpus": 2, "kernel": "6.1.0-test",
           "python": "3.11.7", "implementation": "CPython", "arch": "x86_64"}


def sample_results() -> list[Result]:
    """A realistic mixture: capbus rows, peers, C anchors, skipped rows, throughput, 3 large sizes."""
    rows = [
        Result("capbus spin", RT, 1.12, 3.4, note="ep.call, cross-CPU, pinned", samples=200_000),
        Result("capbus adaptive", RT, 1.31, 6.9, note="ep.call, cross-CPU, pinned", samples=200_000),
        Result("capbus block", RT, 38.5, 95.0, note="ep.call, cross-CPU, pinned", samples=50_000),
        Result("capbus block", RT, 9.8, 21.0, note="ep.call, same CPU, pinned", samples=50_000),
        Result("multiprocessing.Pipe", RT, 52.0, 120.0, note="duplex Pipe, send_bytes/recv_bytes"),
        Result("socket.socketpair (AF_UNIX stream)", RT, 41.0, 88.0, note="blocking sendall/recv"),
        Result.skip("pyzmq REQ/REP ipc://", RT, "pyzmq not importable (No module named 'zmq')"),
        Result.skip("iceoryx2 request-response", RT, "iceoryx2 not importable (No module named 'iceoryx2')"),
        Result("Python shm spin ping-pong", RT, 2.9, 11.5, note="pure Python, mmap + memoryview"),
        Result("C futex ping-pong (cross-CPU)", RT, 33.0, 70.0, note="gcc -O2, pinned"),
        Result("C futex ping-pong (same CPU)", RT, 8.1, 14.0, note="gcc -O2, pinned"),
        Result("C spin ping-pong (cross-CPU)", RT, 0.21, 0.48, note="gcc -O2, pinned"),
        Result("capbus async", TP, msgs_per_s=4.1e6, note="send_many", samples=4_000_000),
        Result("pyzmq PUSH/PULL ipc://", TP, msgs_per_s=3.2e5, note="default HWM"),
        Result("multiprocessing.Queue", TP, msgs_per_s=9.4e4, note="put/get, pickled bytes"),
        Result.skip("faster-fifo Queue", TP, "faster-fifo not importable (No module named 'faster_fifo')"),
        Result("Python shm SPSC ring (unbatched)", TP, msgs_per_s=6.5e5),
        Result("C SPSC ring (unbatched)", TP, msgs_per_s=2.3e7),
        Result("C SPSC ring (batched x64)", TP, msgs_per_s=1.4e8),
    ]
    for size, (cap, shm, pk) in {64 << 10: (9.0, 31.0, 60.0), 1 << 20: (60.0, 410.0, 900.0),
                                 64 << 20: (3_900.0, 27_000.0, 61_000.0)}.items():
        rows.append(Result("capbus large", RT, cap, cap * 1.6, note="zero copy", size_bytes=size))
        rows.append(Result("shared_memory + Pipe", RT, shm, shm * 1.4, note="copy in/out", size_bytes=size))
        rows.append(Result("pickle over Pipe", RT, pk, pk * 1.3, note="send(bytes)", size_bytes=size))
    return rows


def assert_png(path, min_size: int = 20_000) -> None:
    assert os.path.exists(path)
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_MAGIC
    assert min_size < len(data) < 5_000_000
    # IHDR: width and height, big endian, right after the magic and the chunk header.
    width = int.from_bytes(data[16:20], "big")
    height = int.from_bytes(data[20:24], "big")
    assert 1200 <= width <= 2400 and 700 <= height <= 1400


def test_plot_full_mixture(tmp_path):
    out = tmp_path / "bench.png"
    bench_plot.plot(sample_results(), MACHINE, str(out))
    assert_png(out)


def test_plot_from_json_round_trip(tmp_path):
    results = from_json(to_json(sample_results(), MACHINE))
    assert len(results) == len(sample_results())
    out = tmp_path / "roundtrip.png"
    bench_plot.plot(results, MACHINE, str(out), date="2025-01-01")
    assert_png(out)


@pytest.mark.parametrize("keep", ["latency", "throughput", "large", "skipped"])
def test_plot_partial_data(tmp_path, keep):
    rows = sample_results()
    pick = {
        "latency": lambda r: r.metric == RT and r.size_bytes == 48,
        "throughput": lambda r: r.metric == TP,
        "large": lambda r: r.size_bytes > 48,
        "skipped": lambda r: r.skipped,
    }[keep]
    out = tmp_path / f"{keep}.png"
    bench_plot.plot([r for r in rows if pick(r)], None, str(out))
    assert_png(out, min_size=5_000)


def test_split_groups_sizes_and_drops_skipped():
    bars, series, tp, skipped = bench_plot._split(sample_results())
    assert sorted(series) == ["capbus large", "pickle over Pipe", "shared_memory + Pipe"]
    assert all(len(v) == 3 for v in series.values())
    assert not any(r.skipped for r in bars + tp)
    assert len(skipped) == 3
    assert [r.median_us for r in bars] == sorted(r.median_us for r in bars)
    labels = bench_plot._labels(bars, with_size=True)
    assert "capbus block (cross-CPU)" in labels and "capbus block (same CPU)" in labels


def test_cli_module_entry(tmp_path):
    src = tmp_path / "results.json"
    src.write_text(to_json(sample_results(), MACHINE))
    out = tmp_path / "cli.png"
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(bench_plot.__file__)))
    env["PYTHONPATH"] = pkg_root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "bench.plot", str(src), str(out)],
                          capture_output=True, text=True, env=env, timeout=100)
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout
    assert_png(out)


def test_cli_module_entry_missing_file(tmp_path):
    assert bench_plot.main([str(tmp_path / "nope.json"), str(tmp_path / "x.png")]) == 1


def test_bench_command_plot_option(tmp_path, monkeypatch):
    """`capbus bench --only call --plot F` plots what the sections returned (sections faked)."""
    from bench import main as bench_main
    from capbus._cli import main as _cli

    rows = [r for r in sample_results() if r.metric == RT and r.size_bytes == 48]
    monkeypatch.setattr(bench_main, "call_section", lambda quick: rows)
    out = tmp_path / "cmd.png"
    assert _cli.main(["bench", "--only", "call", "--plot", str(out)]) == 0
    assert_png(out)


def test_size_panel_value_labels_do_not_overlap():
    """Close medians at one payload size (1.34 vs 1.56 us) get labels pushed apart."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = []
    for size, vals in {64 << 10: (1.34, 1.56, 35.0, 49.0), 1 << 20: (1.35, 20.4, 115.0, 2450.0),
                       64 << 20: (1.37, 3470.0, 31000.0, 124000.0)}.items():
        for mech, v in zip(("capbus loan", "capbus bytes", "pickle over Pipe", "shared_memory + Pipe"), vals,
                           strict=True):
            rows.append(Result(mech, RT, v, v * 1.3, size_bytes=size))
    _bars, series, _tp, _skipped = bench_plot._split(rows)
    fig = Figure(figsize=(8, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    values = bench_plot._size_panel(fig, ax, series)
    bench_plot._spread_values(fig, ax, values)
    fig.canvas.draw()
    boxes = [t.get_window_extent() for _x, _y, t in values]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)
