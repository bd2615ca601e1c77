"""A small run of the scale benchmark (bench.scale): it completes, leaves no process
behind, and returns well-formed rows."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

import capbus
from bench import scale

pytestmark = pytest.mark.timeout(120)


def _children() -> set[int]:
    out: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            out |= {int(p) for p in f.read().split()}
    return out


def test_scale_rows_are_well_formed():
    before = _children()
    rows = scale.run(n=20)
    assert _children() <= before, "the benchmark left child processes behind"

    assert rows and all(tuple(r) == scale.ROW_KEYS for r in rows), rows
    for r in rows:
        assert isinstance(r["metric"], str) and r["metric"]
        assert isinstance(r["value"], float) and math.isfinite(r["value"]), r
        assert isinstance(r["unit"], str) and r["unit"]
        assert isinstance(r["n"], int) and r["n"] >= 0
        assert r["seconds"] is None or (isinstance(r["seconds"], float) and r["seconds"] >= 0)
        assert isinstance(r["note"], str)
    by_metric = {r["metric"]: r for r in rows}
    assert "failed processes" not in by_metric, by_metric["failed processes"]["note"]
    for phase in scale.PHASES:
        r = by_metric[phase]
        assert r["n"] == 20 and r["seconds"] > 0 and r["value"] > 0, r
        assert r["unit"].endswith("/s")
    idle_fds = by_metric["kernel fds, idle"]["value"]
    assert by_metric["kernel fds, 20 connected"]["value"] >= idle_fds + 20
    assert by_metric["kernel RSS, idle"]["value"] > 0

    out = scale.format_table(rows, 20)
    assert out.startswith("capbus scale: 20 processes")
    for r in rows:
        assert r["metric"] in out


def test_scale_command_line(tmp_path):
    src = os.path.dirname(os.path.dirname(os.path.abspath(capbus.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    out = subprocess.run(
        [sys.executable, "-m", "bench.scale", "--n", "4"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "capbus scale: 4 processes" in out.stdout
    assert "lookups/s" in out.stdout


def _check_mesh(rows: list[dict], n: int, channels: int, fresh: int) -> None:
    by_metric = {r["metric"]: r for r in rows}
    assert "failed processes" not in by_metric, by_metric["failed processes"]["note"]
    # Every child reports each phase, so a count of n means everyone connected, looked up its
    # services and had a real, checked reply on every one of its channels.
    for phase in ("connect", "register", "lookup", "exit"):
        assert by_metric[phase]["n"] == n, by_metric[phase]
    assert by_metric["open"]["n"] == channels, by_metric["open"]
    assert by_metric["fresh first call p50"]["n"] == fresh
    assert by_metric["bystander lookup p50"]["value"] > 0
    idle = by_metric["kernel fds, idle"]["value"]
    assert by_metric[f"kernel fds, {n} connected"]["value"] >= idle + 2 * n
    assert by_metric["kernel fds, after all exit"]["value"] == idle, by_metric
    # The kernel holds no fd per channel: only its services' doorbells.
    assert by_metric["kernel fds per channel"]["value"] < 0.1


@pytest.mark.timeout(240)
def test_mesh_200_processes_2000_channels():
    """200 real processes (20 serving), 2,000 live channels each answering a real call, a
    bystander and 20 fresh processes while they live; then the kernel is back to its idle fds
    and no process is left."""
    before = _children()
    rows = scale.run_mesh(n=200, channels=2000, services=20, fresh=20, lookups=200)
    assert _children() <= before, "the benchmark left child processes behind"
    _check_mesh(rows, 200, 2000, 20)
    assert scale.mesh_title(200, 2000, 20) in scale.format_table(
        rows, 200, None, scale.mesh_title(200, 2000, 20))


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_mesh_soak_1000_processes_10000_channels():
    """The full scale run (`pytest -m soak`; skipped by default)."""
    before = _children()
    rows = scale.run_mesh(n=1000, channels=10_000, services=100, fresh=100)
    assert _children() <= before, "the benchmark left child processes behind"
    _check_mesh(rows, 1000, 10_000, 100)


def test_mesh_refuses_impossible_shapes():
    with pytest.raises(ValueError, match="services"):
        scale.run_mesh(n=10, channels=100, services=10)
    with pytest.raises(ValueError):
        scale.run_mesh(n=1, channels=1, services=1)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("when", [0.0, 0.3])
def test_mesh_clients_killed_while_opening_channels(when):
    """180 clients SIGKILLed at once while they open their channels and call (the worst moment:
    requests in flight, channels half handed out): the 20 services and the kernel go on (a
    bystander and fresh processes get real replies from every service) and the kernel's fds come
    back to idle."""
    before = _children()
    rows = scale.run_mesh(n=200, channels=2000, services=20, fresh=20, lookups=200,
                          kill_clients=when)
    assert _children() <= before, "the benchmark left child processes behind"
    by_metric = {r["metric"]: r for r in rows}
    assert by_metric["killed clients"]["value"] == 180
    assert "failed processes" not in by_metric, by_metric["failed processes"]["note"]
    assert by_metric["fresh first call p50"]["n"] == 20
    idle = by_metric["kernel fds, idle"]["value"]
    assert by_metric["kernel fds, after all exit"]["value"] == idle, by_metric


def test_quantiles_are_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert scale._pick(values, 0.5) == 50.0
    assert scale._pick(values, 0.99) == 99.0  # of 100 values, not the largest
    assert scale._pick(values, 1.0) == 100.0
    assert scale._pick([3.0], 0.99) == 3.0
    assert math.isnan(scale._pick([], 0.5))
