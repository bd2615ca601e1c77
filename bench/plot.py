"""Charts of `capbus bench` results: one PNG with up to three panels.

* round-trip latency per mechanism: horizontal bars of the median on a log axis, the p99 as a
  whisker, the values written at the bar ends;
* latency against payload size (log-log, one line per mechanism) for mechanisms measured at
  several sizes (the large-message rows);
* one-way throughput in messages per second (horizontal bars, log axis).

Only panels that have data are drawn.  capbus rows are drawn in one colour, the C anchors in
grey and the other peers in a third colour.  Skipped rows are not drawn; a footnote names them.

matplotlib is optional (``pip install matplotlib`` or ``capbus[top]``) and is imported only
when a chart is drawn; this module draws on a bare :class:`matplotlib.figure.Figure` with the
Agg canvas and never touches pyplot's global state.  Command line, to re-plot a saved run::

    python -m bench.plot RESULTS.json OUT.png
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import textwrap
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .results import METRIC_ROUND_TRIP, METRIC_THROUGHPUT, Result

__all__ = ["PlotUnavailable", "main", "plot", "require_matplotlib"]

INSTALL_HINT = "pip install matplotlib (or capbus[top])"

#: Colours of the three kinds of rows.
COLOURS = {"capbus": "#e8590c", "peer": "#3b6ea8", "anchor": "#9a9a9a"}
KIND_LABELS = {"capbus": "capbus", "peer": "peers", "anchor": "C anchors"}
#: Line colours of the non-capbus mechanisms in the size panel.
_SERIES = ["#3b6ea8", "#2a9d8f", "#8e6cc0", "#c2417a", "#6b8e23", "#4a4a8a", "#0b7285"]
#: Line colours of the capbus mechanisms in the size panel (warm, like the capbus bars).
_CAPBUS_SHADES = ["#e8590c", "#f59f00", "#a61e4d", "#c92a2a", "#d9480f"]

FIGSIZE = (16.0, 9.0)
DPI = 100


class PlotUnavailable(ImportError):
    """matplotlib is not installed."""


def require_matplotlib() -> Any:
    """Import and return matplotlib, or raise :class:`PlotUnavailable` with the install hint."""
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotUnavailable(f"charts need matplotlib: {INSTALL_HINT}") from exc
    return matplotlib


# --------------------------------------------------------------------------- formatting


def _kind(mechanism: str) -> str:
    m = mechanism.strip()
    if m.lower().startswith("capbus"):
        return "capbus"
    if m.startswith("C ") or m.startswith("C-"):
        return "anchor"
    return "peer"


def _fmt_time(us: float) -> str:
    if us >= 1e6:
        return f"{us / 1e6:.2f} s"
    if us >= 1e4:
        return f"{us / 1e3:.1f} ms"
    if us >= 1e3:
        return f"{us / 1e3:.2f} ms"
    if us >= 100:
        return f"{us:.0f} µs"
    if us >= 10:
        return f"{us:.1f} µs"
    return f"{us:.2f} µs"


def _fmt_rate(v: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= scale:
            x = v / scale
            return f"{x:.3g}{suffix}/s" if x < 100 else f"{x:.0f}{suffix}/s"
    return f"{v:.3g}/s"


def _fmt_size(n: float) -> str:
    n = int(n)
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            x = n / scale
            return f"{x:.0f} {unit}" if x == int(x) else f"{x:.3g} {unit}"
    return f"{n} B"


def machine_text(machine: dict[str, Any] | None) -> str:
    """One line naming the machine (CPU, cores, arch, kernel, Python) from a machine_info() dict."""
    if not machine:
        return "unknown machine"
    parts = []
    if machine.get("cpu"):
        parts.append(str(machine["cpu"]))
    if machine.get("cores"):
        cores = f"{machine['cores']} cores"
        usable = machine.get("usable_cpus")
        if usable and usable != machine["cores"]:
            cores += f" ({usable} usable)"
        parts.append(cores)
    if machine.get("arch"):
        parts.append(str(machine["arch"]))
    if machine.get("kernel"):
        parts.append(f"Linux {machine['kernel']}")
    if machine.get("python"):
        parts.append(f"{machine.get('implementation', 'Python')} {machine['python']}".strip())
    return " | ".join(parts) or "unknown machine"


def _labels(rows: Sequence[Result], with_size: bool) -> list[str]:
    """Bar labels: the mechanism, plus whatever part of the note tells equal mechanisms apart."""
    counts = Counter(r.mechanism for r in rows)
    common_size = Counter(r.size_bytes for r in rows).most_common(1)[0][0] if rows else 0
    labels = []
    for r in rows:
        label = r.mechanism
        if counts[r.mechanism] > 1:
            twins = [t for t in rows if t.mechanism == r.mechanism]
            own = [p.strip() for p in r.note.split(",") if p.strip()]
            distinct = [p for p in own if not all(p in t.note for t in twins)]
            if distinct:
                label += f" ({', '.join(distinct)})"
        if with_size and r.size_bytes != common_size:
            label += f" · {_fmt_size(r.size_bytes)}" if r.size_bytes > 0 else " · no payload"
        labels.append(label)
    return labels


# --------------------------------------------------------------------------- selection


_Split = tuple[list[Result], dict[str, list[Result]], list[Result], list[Result]]


def _split(results: Sequence[Result]) -> _Split:
    """(latency bar rows, {mechanism: rows by size}, throughput rows, skipped rows)."""
    skipped = [r for r in results if r.skipped]
    live = [r for r in results if not r.skipped]
    rt = [r for r in live if r.metric == METRIC_ROUND_TRIP and r.median_us and r.median_us > 0]
    tp = [r for r in live if r.metric == METRIC_THROUGHPUT and r.msgs_per_s and r.msgs_per_s > 0]
    sizes: dict[str, set[int]] = {}
    for r in rt:
        sizes.setdefault(r.mechanism, set()).add(r.size_bytes)
    multi = {m for m, s in sizes.items() if len(s) > 1}
    bars = [r for r in rt if r.mechanism not in multi]
    series: dict[str, list[Result]] = {}
    for r in rt:
        if r.mechanism in multi:
            series.setdefault(r.mechanism, []).append(r)
    for rows in series.values():
        rows.sort(key=lambda r: r.size_bytes)
    bars.sort(key=lambda r: r.median_us or 0.0)
    tp.sort(key=lambda r: -(r.msgs_per_s or 0.0))
    return bars, series, tp, skipped


# --------------------------------------------------------------------------- drawing


def _fit_labels(fig: Any, ax: Any, texts: list[Any], lo: float, hi: float) -> None:
    """Widen the log x axis to the right until every text at a bar end fits inside the axes."""
    if not texts:
        return
    for _ in range(3):
        fig.canvas.draw()
        bbox = ax.get_window_extent()
        width = bbox.width
        if width <= 0:
            return
        l_log, r_log = math.log10(lo), math.log10(hi)
        need = r_log
        for t in texts:
            x = t.get_position()[0]
            tw = t.get_window_extent().width + 8
            frac = (0.985 * width - tw) / width
            if frac <= 0.05:
                frac = 0.05
            need = max(need, l_log + (math.log10(x) - l_log) / frac)
        if need <= r_log + 1e-3:
            return
        hi = 10 ** need
        ax.set_xlim(lo, hi)


def _nice_floor(v: float) -> float:
    """The largest of 1, 2, 5 times a power of ten that is at most ``v`` (a labelled left edge)."""
    decade = 10 ** math.floor(math.log10(v))
    return max(m * decade for m in (1, 2, 5) if m * decade <= v * (1 + 1e-9))


def _bar_panel(fig: Any, ax: Any, rows: list[Result], values: list[float], whiskers: list[float | None],
               texts: list[str], title: str, xlabel: str, formatter: Any) -> tuple[list[Any], float, float]:
    from matplotlib.ticker import FuncFormatter, LogLocator

    labels = _labels(rows, with_size=True)
    y = list(range(len(rows)))
    tops = [max(v, w or 0.0) for v, w in zip(values, whiskers, strict=True)]
    lo = _nice_floor(min(values) / 2.5)
    hi = 10 ** (math.log10(max(tops)) + 0.15)
    colours = [COLOURS[_kind(r.mechanism)] for r in rows]
    n = len(rows)
    height = 0.72 if n > 2 else 0.5
    ax.barh(y, [v - lo for v in values], left=lo, color=colours, height=height, zorder=2,
            edgecolor=["#7a2f05" if _kind(r.mechanism) == "capbus" else "none" for r in rows],
            linewidth=1.0)
    for yi, v, w in zip(y, values, whiskers, strict=True):
        if w is not None and w > v:
            ax.plot([v, w], [yi, yi], color="#222222", linewidth=1.1, zorder=3)
            ax.plot([w], [yi], marker="|", markersize=9, markeredgewidth=1.6, color="#222222", zorder=3)
    fs = 9 if n <= 14 else 8
    placed = []
    for yi, top, text in zip(y, tops, texts, strict=True):
        t = ax.text(top * 1.12, yi, text, va="center", ha="left", fontsize=fs, zorder=4)
        t.set_in_layout(False)  # _fit_labels makes room inside the axes instead
        placed.append(t)
    ax.set_yticks(y, labels, fontsize=fs + 1)
    for tick, r in zip(ax.get_yticklabels(), rows, strict=True):
        if _kind(r.mechanism) == "capbus":
            tick.set_fontweight("bold")
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.xaxis.set_major_locator(LogLocator(base=10))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: formatter(v)))
    ax.tick_params(axis="x", labelsize=9)
    ax.grid(axis="x", which="major", color="#dddddd", linewidth=0.8, zorder=0)
    ax.grid(axis="x", which="minor", color="#f0f0f0", linewidth=0.5, zorder=0)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_title(title, loc="left", fontsize=12, fontweight="bold")
    ax.set_xlabel(xlabel, fontsize=10)
    return placed, lo, hi  # fitted by _fit_labels once the layout is final


def _latency_panel(fig: Any, ax: Any, rows: list[Result]) -> tuple[list[Any], float, float]:
    values = [float(r.median_us or 0.0) for r in rows]
    whiskers = [float(r.p99_us) if r.p99_us else None for r in rows]
    texts = [_fmt_time(v) + (f"  (p99 {_fmt_time(w)})" if w else "") for v, w in zip(values, whiskers,
                                                                                     strict=True)]
    sizes = Counter(r.size_bytes for r in rows).most_common(1)[0][0]
    return _bar_panel(fig, ax, rows, values, whiskers, texts,
               f"Round trip latency, {_fmt_size(sizes)} message (median; whisker: p99)",
               "microseconds per round trip (log scale; shorter is better)", _fmt_axis_time)


def _throughput_panel(fig: Any, ax: Any, rows: list[Result]) -> tuple[list[Any], float, float]:
    values = [float(r.msgs_per_s or 0.0) for r in rows]
    sizes = Counter(r.size_bytes for r in rows).most_common(1)[0][0]
    return _bar_panel(fig, ax, rows, values, [None] * len(rows), [_fmt_rate(v) for v in values],
               f"One-way throughput, {_fmt_size(sizes)} messages",
               "messages per second (log scale; longer is better)", _fmt_axis_rate)


def _fmt_axis_time(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:g} s"
    if v >= 1e3:
        return f"{v / 1e3:g} ms"
    return f"{v:g} µs"


def _fmt_axis_rate(v: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:g}{suffix}"
    return f"{v:g}"


def _series_styles(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Line style per mechanism: capbus in warm shades (thick), peers in cool colours, C anchors grey."""
    markers = ["o", "s", "D", "^", "v", "P", "X"]
    count = Counter()
    styles = {}
    for name in names:
        kind = _kind(name)
        i = count[kind]
        count[kind] += 1
        if kind == "capbus":
            colour, width, dash = _CAPBUS_SHADES[i % len(_CAPBUS_SHADES)], 2.6, "-"
        elif kind == "anchor":
            colour, width, dash = COLOURS["anchor"], 1.6, "--"
        else:
            colour, width, dash = _SERIES[i % len(_SERIES)], 1.6, "-"
        styles[name] = {"color": colour, "linewidth": width, "linestyle": dash,
                        "marker": markers[i % len(markers)], "markersize": 6 if kind == "capbus" else 5}
    return styles


def _size_panel(fig: Any, ax: Any, series: dict[str, list[Result]]) -> list[tuple[float, float, Any]]:
    """Latency vs payload size; returns (x, median, value text) for :func:`_spread_values`."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    all_sizes = sorted({r.size_bytes for rows in series.values() for r in rows})
    ordered = sorted(series, key=lambda m: ({"capbus": 0, "peer": 1, "anchor": 2}[_kind(m)], m))
    styles = _series_styles(ordered)
    values = []
    for mech in ordered:
        rows, style = series[mech], styles[mech]
        colour = style["color"]
        xs = [r.size_bytes for r in rows]
        med = [float(r.median_us or 0.0) for r in rows]
        ax.plot(xs, med, label=mech, zorder=3, **style)
        for x, m, r in zip(xs, med, rows, strict=True):
            if r.p99_us and r.p99_us > m:
                ax.plot([x, x], [m, r.p99_us], color=colour, linewidth=1.0, alpha=0.6, zorder=2)
                ax.plot([x], [r.p99_us], marker="_", markersize=9, color=colour, alpha=0.7, zorder=2)
            t = ax.annotate(_fmt_time(m), (x, m), textcoords="offset points", xytext=(8, 0),
                            fontsize=8, color=colour, ha="left", va="center", zorder=5,
                            bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none",
                                  "alpha": 0.85})
            t.set_in_layout(False)
            values.append((x, m, t))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(FixedLocator(all_sizes))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _fmt_size(v)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _fmt_axis_time(v)))
    if all_sizes:
        span = math.log2(all_sizes[-1] / all_sizes[0]) if all_sizes[-1] > all_sizes[0] else 4.0
        ax.set_xlim(all_sizes[0] / 2 ** (0.08 * span), all_sizes[-1] * 2 ** (0.3 * span))
    lo = min(min(float(r.median_us or 1.0) for r in rows) for rows in series.values())
    hi = max(max(float(r.p99_us or r.median_us or 1.0) for r in rows) for rows in series.values())
    ax.set_ylim(lo / 2.5, hi * 2.0)
    ax.tick_params(labelsize=9)
    ax.grid(which="major", color="#dddddd", linewidth=0.8, zorder=0)
    ax.grid(axis="y", which="minor", color="#f2f2f2", linewidth=0.5, zorder=0)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_title("Round trip vs payload size (whisker: p99)", loc="left",
                 fontsize=12, fontweight="bold")
    ax.set_xlabel("payload size (log scale); time per round trip (log scale)", fontsize=10)
    return values


def _place_size_legend(fig: Any, ax: Any) -> None:
    """The size panel's legend, left of its y tick labels (the space the throughput labels leave)."""
    from matplotlib.transforms import ScaledTranslation

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ticks = [t.get_window_extent(renderer) for t in ax.get_yticklabels() if t.get_visible() and t.get_text()]
    axes_box = ax.get_window_extent(renderer)
    left = min((b.x0 for b in ticks), default=axes_box.x0) - 10
    dx = (left - axes_box.x0) / fig.dpi
    legend = ax.legend(fontsize=9, loc="upper right", frameon=False, handlelength=2.6,
                       bbox_to_anchor=(0, 1), bbox_transform=ax.transAxes + ScaledTranslation(
                           dx, 0, fig.dpi_scale_trans))
    legend.set_in_layout(True)


def _spread_values(fig: Any, ax: Any, values: list[tuple[float, float, Any]], gap_px: float = 12.0) -> None:
    """Move the value texts of one payload size apart vertically so that none overlaps another."""
    if not values:
        return
    fig.canvas.draw()
    to_px = ax.transData.transform
    box = ax.get_window_extent()
    by_x: dict[float, list[tuple[float, Any]]] = {}
    for x, y, t in values:
        by_x.setdefault(x, []).append((float(to_px((x, y))[1]), t))
    for items in by_x.values():
        items.sort(key=lambda it: it[0])
        # Clusters of labels that would overlap sit at the mean of their wishes, gap_px apart.
        clusters: list[list[tuple[float, Any]]] = []
        for item in items:
            clusters.append([item])
            while len(clusters) > 1:
                a, b = clusters[-2], clusters[-1]
                if _cluster_pos(a, gap_px) + len(a) * gap_px <= _cluster_pos(b, gap_px):
                    break
                clusters[-2:] = [a + b]
        for cl in clusters:
            base = _cluster_pos(cl, gap_px)
            base = min(max(base, box.y0 + 6), box.y1 - 6 - (len(cl) - 1) * gap_px)
            for k, (want, t) in enumerate(cl):
                t.xyann = (t.xyann[0], (base + k * gap_px - want) * 72.0 / fig.dpi)


def _cluster_pos(cluster: list[tuple[float, Any]], gap_px: float) -> float:
    """Position of the lowest label of a cluster that keeps the labels nearest to their points."""
    return sum(want - k * gap_px for k, (want, _t) in enumerate(cluster)) / len(cluster)


def _footnote(skipped: Sequence[Result], width: int = 230, max_lines: int = 3) -> str:
    if not skipped:
        return ""
    items = []
    for r in skipped:
        note = " ".join(r.note.split())
        if len(note) > 70:
            note = note[:67] + "..."
        items.append(f"{r.mechanism} ({note})" if note else r.mechanism)
    lines = textwrap.wrap(f"Not measured here (skipped): {'; '.join(items)}.", width=width)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: width - 20].rstrip() + f" … ({len(skipped)} skipped in all)"
    return "\n".join(lines)


def plot(results: list[Result], machine: dict[str, Any] | None, path: str, *,
         date: str | None = None) -> None:
    """Draw ``results`` into one PNG at ``path`` (about 1600 x 900 pixels).

    ``machine`` is a :func:`bench.results.machine_info` dict (the title line); ``date``
    defaults to today.  Raises :class:`PlotUnavailable` when matplotlib is not installed.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    bars, series, tp, skipped = _split(list(results))
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    fig.get_layout_engine().set(w_pad=0.12, h_pad=0.12, wspace=0.06, hspace=0.08)

    panels = [(k, d) for k, d in (("lat", bars), ("size", series), ("tp", tp)) if d]
    axes: dict[str, Any] = {}
    if len(panels) == 3:
        n_tp = len(tp)
        gs = fig.add_gridspec(2, 2, width_ratios=[1.15, 1.0],
                              height_ratios=[0.75 * max(n_tp, 3) + 2.5, 12.0])
        axes["lat"] = fig.add_subplot(gs[:, 0])
        axes["tp"] = fig.add_subplot(gs[0, 1])
        axes["size"] = fig.add_subplot(gs[1, 1])
    elif len(panels) == 2:
        gs = fig.add_gridspec(1, 2)
        for i, (k, _) in enumerate(panels):
            axes[k] = fig.add_subplot(gs[0, i])
    elif len(panels) == 1:
        axes[panels[0][0]] = fig.add_subplot(1, 1, 1)

    fits: dict[str, tuple[list[Any], float, float]] = {}
    if "lat" in axes:
        fits["lat"] = _latency_panel(fig, axes["lat"], bars)
    if "tp" in axes:
        fits["tp"] = _throughput_panel(fig, axes["tp"], tp)
    size_values: list[tuple[float, float, Any]] = []
    if "size" in axes:
        size_values = _size_panel(fig, axes["size"], series)
    if not axes:
        ax = fig.add_subplot(1, 1, 1)
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no measured results to plot", ha="center", va="center", fontsize=16,
                color="#666666", transform=ax.transAxes)

    when = date or _dt.date.today().isoformat()
    fig.suptitle(f"capbus bench  ·  {when}\n{machine_text(machine)}", fontsize=14, fontweight="bold",
                 linespacing=1.5)
    kinds_present = [k for k in ("capbus", "peer", "anchor")
                     if any(_kind(r.mechanism) == k for r in bars + tp)]
    if kinds_present:
        handles: list[Any] = [Patch(color=COLOURS[k], label=KIND_LABELS[k]) for k in kinds_present]
        if any(r.p99_us for r in bars):
            handles.append(Line2D([], [], color="#222222", marker="|", markersize=9, linewidth=1.1,
                                  label="p99"))
        # Below the two title lines (a figure legend placed "outside upper center" sits on them).
        fig.legend(handles=handles, loc="upper right", ncols=len(handles), fontsize=10,
                   frameon=False, bbox_to_anchor=(0.99, 0.995))
    note = _footnote(skipped)
    if note:
        fig.supxlabel(note, x=0.01, ha="left", fontsize=8.5, color="#555555")

    # Fit the value texts at the bar ends once the layout has settled.
    fig.canvas.draw()
    if "size" in axes:
        _place_size_legend(fig, axes["size"])
    for key, fit in fits.items():
        _fit_labels(fig, axes[key], *fit)
    if "size" in axes:
        _spread_values(fig, axes["size"], size_values)
    fig.savefig(path, dpi=DPI, format="png")


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plot",
                                     description="Re-plot a `capbus bench --json` file as a PNG chart.")
    parser.add_argument("results", help="JSON written by `capbus bench --json FILE`")
    parser.add_argument("out", help="PNG file to write")
    parser.add_argument("--date", default=None, help="date in the title (default: the JSON file's mtime)")
    args = parser.parse_args(argv)
    from .results import from_json

    try:
        with open(args.results, encoding="utf-8") as f:
            text = f.read()
        results = from_json(text)
        doc = json.loads(text)
        machine = doc.get("machine") if isinstance(doc, dict) else None
        date = args.date or (machine or {}).get("date") or _dt.date.fromtimestamp(
            os.path.getmtime(args.results)).isoformat()
        plot(results, machine, args.out, date=date)
    except (OSError, ValueError, KeyError, TypeError, PlotUnavailable) as exc:
        print(f"capbus plot: {exc}", file=sys.stderr)
        return 1
    print(f"chart written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
