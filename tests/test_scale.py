"""A small run of the scale benchmark (capbus._bench.scale): it completes, leaves no process
behind, and returns well-formed rows."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

import capbus
from capbus._bench import scale

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
        [sys.executable, "-m", "capbus._bench.scale", "--n", "4"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "capbus scale: 4 processes" in out.stdout
    assert "lookups/s" in out.stdout
