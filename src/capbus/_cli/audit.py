"""`capbus audit`: read the kernel's audit trail (read-only; works beside a live kernel)."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import shutil
import sys
import time
from typing import Any

from .. import _paths
from .._kernel import audit
from .fmt import render_text, rich_table

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_AGO = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([smhdw])")
_COLUMNS = ("time", "event", "process", "pid", "uid", "handle", "target", "detail")
_DETAIL_WIDTH = 60  # when stdout is not a terminal
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def parse_since(text: str, now: float | None = None) -> float:
    """Unix seconds from --since: an age ("30s", "10m", "2h", "1d", "1w", combined as "1h30m";
    a bare number is seconds), an ISO date or datetime ("2024-05-01", "2024-05-01T14:30",
    "2024-05-01 14:30:00+02:00"; without a zone: local time), or a time of day today
    ("14:30", "14:30:05")."""
    now = time.time() if now is None else now
    s = text.strip()
    if not s:
        raise ValueError("--since is empty: give an age such as 10m or 2h, or an ISO datetime")
    try:
        seconds: float | None = float(s)
    except ValueError:
        seconds = None
    if seconds is not None:
        return now - seconds if math.isfinite(seconds) and seconds >= 0 else _bad(text)
    compact = s.replace(" ", "").lower()
    if re.fullmatch(rf"(?:{_AGO.pattern})+", compact):
        return now - sum(float(n) * _UNITS[u] for n, u in _AGO.findall(compact))
    try:
        when = _dt.datetime.fromisoformat(s)
    except ValueError:
        try:
            clock = _dt.time.fromisoformat(s)
        except ValueError:
            return _bad(text)
        when = _dt.datetime.combine(_dt.datetime.fromtimestamp(now).date(), clock)
    return when.timestamp()  # naive: local time


def _bad(text: str) -> float:
    raise ValueError(f"cannot read --since {text!r}: give an age (30s, 10m, 2h, 1d, 1h30m) or an "
                     "ISO datetime (2024-05-01T14:30, or 14:30 for today)")


def _clean(value: str) -> str:
    """Control characters shown escaped: a target or detail may come from a hostile process and
    must not drive the terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", value)


def _cells(row: dict[str, Any], with_date: bool) -> list[str]:
    t = row["time"]
    stamp = time.strftime("%m-%d %H:%M:%S" if with_date else "%H:%M:%S", time.localtime(t))
    stamp += f".{int(t * 1000) % 1000:03d}"
    return [
        stamp,
        _clean(row["event"]),
        str(row["process_id"]) if row["process_id"] else "-",
        str(row["pid"]) if row["pid"] else "-",
        str(row["uid"]) if row["uid"] >= 0 else "-",
        row["handle"] or "-",
        _clean(row["target"]) or "-",
        _clean(row["detail"]) or "-",
    ]


def format_table(rows: list[dict[str, Any]], width: int | None = None) -> str:
    """The rows as a table; the detail column cut to fit `width` characters (None: to 60)."""
    today = _dt.date.today()
    with_date = any(_dt.date.fromtimestamp(r["time"]) != today for r in rows)
    cells = [_cells(r, with_date) for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(_COLUMNS)]
    fixed = sum(widths[:-1]) + 2 * (len(_COLUMNS) - 1)
    room = max(20, width - fixed) if width is not None else _DETAIL_WIDTH
    for r in cells:
        if len(r[-1]) > room:
            r[-1] = r[-1][: room - 3] + "..."
    return render_text(rich_table([dict(zip(_COLUMNS, r, strict=True)) for r in cells], _COLUMNS))


def run(args: Any) -> int:
    """The body of `capbus audit`. args (an argparse.Namespace): .socket, .db, .since, .process,
    .event, .json, .limit; a missing attribute counts as not given. Returns the exit status."""
    socket_path = getattr(args, "socket", None)
    path = getattr(args, "db", None) or audit.default_path(socket_path or _paths.default_socket())
    since_text = getattr(args, "since", None)
    try:
        since = parse_since(since_text) if since_text is not None else None
    except ValueError as exc:
        print(f"capbus audit: {exc}", file=sys.stderr)
        return 1
    if not os.path.exists(path):
        print(f"capbus audit: no audit log at {path}: has a kernel run with this socket?",
              file=sys.stderr)
        return 1
    limit = getattr(args, "limit", None)
    try:
        rows = audit.query(path, since=since, process_id=getattr(args, "process", None),
                           event=getattr(args, "event", None),
                           limit=1000 if limit is None else limit)
    except (ValueError, OSError) as exc:
        print(f"capbus audit: {exc}", file=sys.stderr)
        return 1
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2))
    elif rows:
        width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
        print(format_table(rows, width))
    else:
        print("no matching audit events", file=sys.stderr)
    return 0
