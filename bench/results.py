"""Benchmark result model, plain-text table printer and JSON (de)serialisation.

A :class:`Result` is one measured (or skipped) mechanism.  Latency results
carry ``median_us`` and ``p99_us``; throughput results carry ``msgs_per_s``.
Results are plain data so that a later step can plot them from JSON.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, TextIO

__all__ = [
    "METRIC_ROUND_TRIP",
    "METRIC_THROUGHPUT",
    "Result",
    "format_table",
    "from_json",
    "machine_info",
    "machine_line",
    "percentile",
    "print_table",
    "to_json",
]

#: Round trip (request -> reply) latency of one message, per round trip.
METRIC_ROUND_TRIP = "round_trip"
#: One-way throughput, sender -> receiver, timed at the receiver.
METRIC_THROUGHPUT = "one_way_throughput"


@dataclass
class Result:
    """One row of a benchmark table.

    ``mechanism``: what was measured (e.g. ``"multiprocessing.Pipe"``).
    ``metric``: :data:`METRIC_ROUND_TRIP` or :data:`METRIC_THROUGHPUT`.
    ``median_us`` / ``p99_us``: per-round-trip latency in microseconds (round trips).
    ``msgs_per_s``: messages per second (throughput).
    ``note``: free text (how it was measured, or why it was skipped).
    ``size_bytes``: message size.
    ``samples``: number of measured round trips or messages.
    ``skipped``: true when the mechanism could not run here (see ``note``).
    """

    mechanism: str
    metric: str
    median_us: float | None = None
    p99_us: float | None = None
    msgs_per_s: float | None = None
    note: str = ""
    size_bytes: int = 48
    samples: int = 0
    skipped: bool = False

    @classmethod
    def skip(cls, mechanism: str, metric: str, note: str, size_bytes: int = 48) -> Result:
        """A row for a mechanism that could not be measured here."""
        return cls(mechanism, metric, note=note, size_bytes=size_bytes, skipped=True)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``0 < q <= 1``) of an already sorted, non-empty sequence.

    Same definition as the C anchors use.
    """
    n = len(sorted_values)
    if n == 0:
        raise ValueError("percentile of an empty sequence")
    rank = int(q * n + 0.999999999)
    rank = min(max(rank, 1), n)
    return sorted_values[rank - 1]


# --------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info() -> dict[str, Any]:
    """The machine facts that :func:`machine_line` prints, as a dict."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 0,
        "usable_cpus": usable,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "arch": platform.machine(),
    }


def machine_line() -> str:
    """One line naming the machine: CPU model, cores, kernel release, Python version."""
    m = machine_info()
    cores = f"{m['cores']} cores"
    if m["usable_cpus"] != m["cores"]:
        cores += f" ({m['usable_cpus']} usable)"
    return f"{m['cpu']} | {cores} | {m['arch']} | Linux {m['kernel']} | {m['implementation']} {m['python']}"


# --------------------------------------------------------------------------- table


def _fmt_us(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _fmt_rate(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}"


def _fmt_size(n: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def format_table(title: str, results: Iterable[Result], machine: str | None = None) -> str:
    """The aligned plain-text table that :func:`print_table` prints."""
    results = list(results)
    has_latency = any(r.median_us is not None or r.p99_us is not None for r in results)
    has_rate = any(r.msgs_per_s is not None for r in results)
    if not has_latency and not has_rate:
        has_latency = any(r.metric == METRIC_ROUND_TRIP for r in results)
        has_rate = not has_latency

    headers = ["mechanism", "size"]
    right = {1}
    if has_latency:
        headers += ["median us", "p99 us"]
    if has_rate:
        headers += ["msgs/s"]
    headers += ["n", "note"]
    right |= set(range(2, len(headers) - 1))

    rows: list[list[str]] = []
    for r in results:
        row = [r.mechanism, _fmt_size(r.size_bytes)]
        if has_latency:
            row += [_fmt_us(r.median_us), _fmt_us(r.p99_us)]
        if has_rate:
            row += [_fmt_rate(r.msgs_per_s)]
        row += [f"{r.samples:,}" if r.samples else "-"]
        row += [("SKIPPED: " if r.skipped else "") + r.note]
        rows.append(row)

    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row[:-1]):
            widths[i] = max(widths[i], len(cell))

    def fmt(cells: list[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            if i == len(cells) - 1:
                out.append(cell)
            elif i in right:
                out.append(cell.rjust(widths[i]))
            else:
                out.append(cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [title]
    if machine:
        lines.append(machine)
    header = fmt(headers)
    lines.append(header)
    lines.append("-" * max(len(header), sum(widths[:-1]) + 2 * (len(widths) - 1) + 4))
    lines.extend(fmt(row) for row in rows)
    return "\n".join(lines)


def print_table(
    title: str,
    results: Iterable[Result],
    machine_line: str | None = None,
    file: TextIO | None = None,
) -> None:
    """Print ``results`` as an aligned plain-text table under ``title`` and ``machine_line``."""
    print(format_table(title, results, machine_line), file=file or sys.stdout)


# --------------------------------------------------------------------------- JSON


def to_json(results: Iterable[Result], machine: dict[str, Any] | None = None, **kw: Any) -> str:
    """Serialise results (and optionally :func:`machine_info`) to a JSON document.

    The document is ``{"machine": {...} | null, "results": [{field: value}, ...]}``.
    """
    doc = {"machine": machine, "results": [r.to_dict() for r in results]}
    return json.dumps(doc, **({"indent": 2} | kw))


def from_json(text: str) -> list[Result]:
    """Inverse of :func:`to_json` (also accepts a bare list of result dicts)."""
    doc = json.loads(text)
    items = doc["results"] if isinstance(doc, dict) else doc
    return [Result.from_dict(d) for d in items]
