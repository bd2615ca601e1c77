"""`capbus stats` (one snapshot, as text tables) and `capbus top` (a live view, refreshed).

The figures come from stats.py over query.py's snapshots; the tables from fmt.py. `capbus top`
draws with rich on the terminal and reads single key presses to change its sort order.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from typing import Any

from .._errors import IpcError
from .fmt import cells, fit_columns, fmt_bytes, fmt_ns, fmt_rate, render_text, rich_table
from .query import KernelSource, default_socket, snapshot
from .stats import LATENCY_NOTE, RATE_FIELDS, SORT_KEYS, SORTS, rates, sum_rates, view_rows

# ---- capbus stats -------------------------------------------------------------------------------

STATS_COLUMNS = {
    "services": ("name", "kind", "server", "pid", "clients", "sent", "received", "bytes", "calls",
                 "timeouts", "refused", "p50", "p99", "max", "msg/s", "refused_by"),
    "processes": ("id", "pid", "name", "services", "sent", "received", "bytes_out", "bytes_in",
                  "calls", "timeouts", "refused", "p50", "p99", "max", "out/s", "in/s"),
    "channels": ("service", "server", "client", "index", "sent", "received", "bytes", "calls",
                 "replies", "timeouts", "refused", "dropped", "p50", "p99", "max", "msg/s",
                 "refused_by"),
    "topics": ("topic", "publisher", "subscriber", "published", "delivered", "taken", "dropped"),
}


def format_stats(snap: dict[str, Any], channels: bool = False, sort: str = "name") -> str:
    """A snapshot as plain text tables (what `capbus stats` prints)."""
    t = snap["totals"]
    rows = view_rows(snap, None, sort)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap["time"]))
    out = [
        f"capbus stats  kernel {snap['socket']}  {when}",
        f"{t['processes']} processes, {t['services']} services, {t['channels']} channels; "
        f"sent {t['sent']} ({fmt_bytes(t['bytes_sent'])}B), received {t['received']}, "
        f"calls {t['calls']}, timeouts {t['timeouts']}, refused {t['refused']}",
        LATENCY_NOTE + "; msg/s: messages in the last second",
        *(f"warning: {e}" for e in snap.get("errors") or ()),
    ]
    sections = ["services", "processes"] + (["channels"] if channels else []) + (
        ["topics"] if rows["topics"] else [])
    for name in sections:
        cols = STATS_COLUMNS[name]
        out += ["", name.upper(), render_text(rich_table(cells(rows[name], cols), cols))]
    return "\n".join(out)


def run_stats(socket_path: str | None, as_json: bool = False, channels: bool = False,
              sort: str = "name") -> int:
    import json

    snap = snapshot(socket_path)
    if as_json:
        print(json.dumps(snap, indent=2))
    else:
        print(format_stats(snap, channels, sort))
    return 0


# ---- capbus top ---------------------------------------------------------------------------------

TOP_COLUMNS = {
    "processes": ("id", "pid", "name", "services", "out/s", "in/s", "bytes/s", "calls", "p50", "p99",
                  "max", "refused", "refused/s", "timeouts"),
    "services": ("name", "kind", "server", "clients", "msg/s", "recv/s", "bytes/s", "calls", "p50",
                 "p99", "max", "refused", "refused/s", "timeouts"),
    "channels": ("service", "server", "client", "index", "msg/s", "recv/s", "bytes/s", "sent",
                 "p50", "p99", "refused", "dropped", "timeouts"),
    "topics": ("topic", "publisher", "subscriber", "delivered/s", "published", "delivered",
               "taken", "dropped"),
}
_TOP_CHANNEL_ROWS = 30


# Columns given up first when the terminal is too narrow for all of them.
_TOP_DROP = {
    "processes": ("refused/s", "max", "pid", "timeouts", "bytes/s", "services", "calls", "p50"),
    "services": ("kind", "refused/s", "max", "timeouts", "recv/s", "bytes/s", "clients", "calls",
                 "p50"),
    "channels": ("index", "dropped", "sent", "recv/s", "timeouts", "bytes/s", "p50", "server"),
    "topics": ("taken", "published", "publisher"),
}
_NUMERIC = {"msg/s", "recv/s", "out/s", "in/s", "bytes/s", "calls", "p50", "p99", "max", "refused",
            "refused/s", "timeouts", "sent", "dropped", "clients", "delivered/s", "published",
            "delivered", "taken"}


def render_top(snap: dict[str, Any] | None, chan_rates: dict[tuple[Any, ...], dict[str, Any]] | None,
               sort: str, socket_path: str, error: str | None = None, interval: float = 1.0,
               width: int = 200, prev: dict[str, Any] | None = None) -> Any:
    """The screen of `capbus top` as a rich renderable (for a terminal `width` columns wide)."""
    from rich.console import Group
    from rich.text import Text

    head = Text()
    head.append("capbus top", style="bold")
    head.append(f"  {time.strftime('%H:%M:%S')}  kernel {socket_path}  every {interval:g}s")
    parts: list[Any] = [head]
    tail = Text("sort: ")
    tail.append(sort, style="bold cyan")
    tail.append("   keys: r rate  l latency  f refused  n name  q quit", style="dim")
    if error:
        parts += [tail, Text(f"kernel unreachable: {error}", style="bold red")]
        return Group(*parts)
    if snap is None:
        return Group(*parts, tail)
    t = snap["totals"]
    total = sum_rates(chan_rates.values()) if chan_rates else dict.fromkeys(RATE_FIELDS, 0)
    head.append(f"\n{t['processes']} processes  {t['services']} services  {t['channels']} channels  "
                f"msg/s {fmt_rate(total['sent'])}  bytes/s {fmt_bytes(total['bytes_sent'])}  "
                f"calls {t['calls']}  p99 {fmt_ns(t['latency_p99_ns'])}  "
                f"refused {t['refused']}  timeouts {t['timeouts']}")
    parts += [tail, Text("p50/p99 estimated: geometric middle of the log2 bucket, capped at the max",
                         style="dim")]
    for e in snap.get("errors") or ():
        parts.append(Text(f"warning: {e}", style="yellow"))
    rows = view_rows(snap, chan_rates, sort, prev)
    for name in ("processes", "services", "channels", "topics"):
        if name == "topics" and not rows[name]:
            continue
        shown = rows[name][:_TOP_CHANNEL_ROWS] if name in ("channels", "topics") else rows[name]
        title = name.upper() + (f" (top {_TOP_CHANNEL_ROWS} of {len(rows[name])})"
                                if len(rows[name]) > len(shown) else "")
        texts = cells(shown, TOP_COLUMNS[name])
        cols = fit_columns(TOP_COLUMNS[name], texts, width, _TOP_DROP[name])
        styles = ["red" if (r.get("refused/s") or 0) > 0 else None for r in shown]
        parts += [Text(""), rich_table(texts, cols, right=_NUMERIC, gap=1, title=title,
                                       header_style="bold reverse", row_styles=styles)]
    return Group(*parts)


class _Keys:
    """Single key presses from the terminal (cbreak mode: no echo, no line buffering, Ctrl-C
    still interrupts), without blocking; restored on exit. Nothing when stdin is no tty."""

    def __init__(self, stream: Any = None) -> None:
        stream = sys.stdin if stream is None else stream
        self.fd: int | None = None
        self._old: Any = None
        try:
            if stream is not None and stream.isatty():
                self.fd = stream.fileno()
        except (ValueError, OSError):
            self.fd = None

    def __enter__(self) -> _Keys:
        if self.fd is not None:
            import termios
            import tty

            self._old = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd, termios.TCSANOW)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None and self._old is not None:
            import termios

            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._old)

    def read(self, timeout: float) -> str:
        """What was typed within `timeout` seconds (returns at the first key press)."""
        if self.fd is None:
            time.sleep(max(0.0, timeout))
            return ""
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not ready:
            return ""
        data = os.read(self.fd, 64)
        if not data:  # the terminal went away
            self.fd = None
            return "q"
        return data.decode(errors="ignore")


def run_top(socket_path: str | None, interval: float = 1.0, sort: str = "rate",
            max_frames: int | None = None) -> int:
    """`capbus top`: refresh every `interval` s until q, Ctrl-C or SIGTERM (then exit 0)."""
    try:
        from rich.console import Console
        from rich.live import Live
    except ImportError:
        print("capbus top needs rich: pip install rich (or capbus[top])", file=sys.stderr)
        return 1
    if sort not in SORTS:
        raise ValueError(f"--sort must be one of {', '.join(SORTS)}")
    if interval <= 0:
        raise ValueError("--interval must be > 0")
    shown_socket = socket_path or default_socket()
    console = Console()

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    source = KernelSource(socket_path)
    prev: dict[str, Any] | None = None
    frames = 0
    try:
        with _Keys() as keys, Live(console=console, screen=console.is_terminal, auto_refresh=False,
                                   redirect_stdout=False, redirect_stderr=False) as live:
            while True:
                error = None
                try:
                    snap: dict[str, Any] | None = source.snapshot()
                except (IpcError, OSError) as exc:
                    snap, error = None, f"{type(exc).__name__}: {exc}"
                chan_rates = rates(prev, snap) if snap is not None else None
                before = prev
                if snap is not None:
                    prev = snap
                live.update(render_top(snap, chan_rates, sort, shown_socket, error, interval,
                                       console.width, before), refresh=True)
                frames += 1
                if max_frames is not None and frames >= max_frames:
                    return 0
                deadline = time.monotonic() + interval
                while (left := deadline - time.monotonic()) > 0:
                    typed = keys.read(left)
                    for ch in typed:
                        if ch in "qQ":
                            return 0
                        if ch.lower() in SORT_KEYS:
                            sort = SORT_KEYS[ch.lower()]
                            live.update(render_top(snap, chan_rates, sort, shown_socket, error,
                                                   interval, console.width, before),
                                        refresh=True)
    except KeyboardInterrupt:
        return 0
    finally:
        source.close()
        signal.signal(signal.SIGTERM, old_term)
