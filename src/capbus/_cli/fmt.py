"""The one table formatter of the `capbus` command, and the cell formats its views share.

Every table the command prints (ps, services, caps, stats, audit, the demo) and the live
screen of `capbus top` is a rich Table built by `rich_table`; `table` renders one as plain
text: upper-case headers, columns two spaces apart, no borders, no colour, no trailing spaces,
and never wrapped (a terminal too narrow for a table is the caller's to fit: `fit_columns`).
Cells are plain text, never rich markup: a service name such as "[bold]x" is printed as it is.
`--json` output never goes through here.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

# ---- cells ---------------------------------------------------------------------------------------


def fmt_ns(ns: float | None) -> str:
    if ns is None:
        return "-"
    for unit, div in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if ns >= div:
            v = ns / div
            return f"{v:.3g}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return f"{ns:.0f}ns"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def fmt_rate(r: float | None) -> str:
    if r is None:
        return "-"
    if r >= 10_000:
        return f"{r / 1000:.0f}k"
    return f"{r:.0f}" if r >= 10 or r == int(r) else f"{r:.1f}"


def fmt_refusals(by: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in by.items() if v) or "-"


def fmt_since(value: Any) -> str:
    """A unix time as the local time of day (the "since" column of ps and services)."""
    if isinstance(value, (int, float)):
        return time.strftime("%H:%M:%S", time.localtime(value))
    return str(value)


# The column names that have a format of their own; every other value is str(value), a list
# is joined with commas, and a missing value is "-".
FORMATS: dict[str, Callable[[Any], str]] = {
    "msg/s": fmt_rate, "recv/s": fmt_rate, "out/s": fmt_rate, "in/s": fmt_rate,
    "refused/s": fmt_rate, "bytes/s": fmt_bytes, "bytes": fmt_bytes, "bytes_out": fmt_bytes,
    "bytes_in": fmt_bytes, "p50": fmt_ns, "p99": fmt_ns, "max": fmt_ns, "refused_by": fmt_refusals,
    "since": fmt_since,
}


def fmt_cell(col: str, value: Any) -> str:
    """One value as the text of column `col`."""
    if value is None or value == "":
        return "-"
    f = FORMATS.get(col)
    if f is not None:
        return f(value)
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    return str(value)


def cells(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[dict[str, str]]:
    """The rows' values as text, column by column."""
    return [{c: fmt_cell(c, r.get(c)) for c in columns} for r in rows]


def fit_columns(cols: Sequence[str], cells: list[dict[str, str]], width: int,
                drop: Sequence[str]) -> list[str]:
    """The columns that fit `width` (a space between columns), dropping those in `drop` first."""
    need = {c: max([len(c)] + [len(r[c]) for r in cells]) for c in cols}
    kept = list(cols)
    for c in drop:
        if sum(need[k] for k in kept) + (len(kept) - 1) <= width:
            break
        if c in kept:
            kept.remove(c)
    return kept


# ---- tables --------------------------------------------------------------------------------------


def rich_table(cells: Sequence[Mapping[str, str]], columns: Sequence[str], *,
               right: Collection[str] = (), gap: int = 2, title: str | None = None,
               header_style: str | None = None,
               row_styles: Sequence[str | None] | None = None) -> Any:
    """A borderless rich Table of text cells (see `cells`): headers are the column names in
    upper case, `right` columns are right-justified, `gap` spaces between columns; `row_styles`
    (one per row, or None) and `header_style` only show on a terminal."""
    from rich.table import Table
    from rich.text import Text

    t = Table(box=None, pad_edge=False, show_edge=False, padding=(0, gap, 0, 0), expand=False,
              title=title, title_justify="left", title_style="bold",
              header_style=header_style or "")
    for c in columns:
        t.add_column(Text(c.upper()), justify="right" if c in right else "left", no_wrap=True,
                     overflow="ellipsis")
    for i, row in enumerate(cells):
        style = row_styles[i] if row_styles is not None else None
        t.add_row(*(Text(row[c]) for c in columns), style=style)
    return t


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], *,
          right: Collection[str] = ()) -> str:
    """Rows (dicts; raw values, formatted by `fmt_cell`) as a plain text table."""
    return render_text(rich_table(cells(rows, columns), columns, right=right))


def render_text(renderable: Any) -> str:
    """A rich renderable as plain text, as wide as it needs (never wrapped), lines right-stripped."""
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, width=1 << 16, color_system=None, force_terminal=False,
                      markup=False, highlight=False, emoji=False, soft_wrap=False)
    console.print(renderable)
    return "\n".join(line.rstrip() for line in out.getvalue().rstrip("\n").split("\n"))
