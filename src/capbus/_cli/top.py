"""Live metrics views of a running system: `capbus stats` (one snapshot) and `capbus top`.

Every figure comes from the kernel's control-plane queries ("processes", "services" and
"channels"): the kernel reads the counters both ends of a channel keep in the channel's header
page, so watching costs the watched processes nothing and they are never asked anything.

Counters live with their channel: when a channel closes its counts leave the totals (the views
show live channels only). Rates in `capbus top` come from the difference between successive
snapshots, per channel, so a closing channel does not show as a negative rate; a single
snapshot (`capbus stats`) shows the kernel's messages-in-the-last-second counters instead.

Latency percentiles are estimates: each channel keeps a log2 histogram of call round trips
(bucket i counts [100 ns * 2^i, 100 ns * 2^(i+1)); bucket 0 also what is below 100 ns, the last
bucket everything above). A percentile is the geometric middle of the bucket it falls in
(100 ns * 2^i * sqrt 2, i.e. within a factor sqrt 2 of the truth), capped at the largest round
trip observed.

The aggregation (`build`, `aggregate`, `process_aggregate`, `percentile_ns`, `rates`, the row
builders) is pure: it works on plain rows and is unit-tested without a kernel.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ._errors import IpcError

HIST_BUCKETS = 28
HIST_BASE_NS = 100
SENDER_REFUSALS = ("refused_wouldblock", "refused_rate", "refused_size", "refused_perm")
RECEIVER_DROPS = ("drops_rate", "drops_bandwidth", "drops_size", "drops_expired", "drops_rights")
COUNTERS = (
    "sent", "bytes_sent", "calls", "timeouts", *SENDER_REFUSALS, "latency_sum_ns", "latency_count",
    "sent_last_second", "received", "bytes_received", "replies", "reply_failed", *RECEIVER_DROPS,
    "cancelled", "received_last_second",
)
SORTS = ("rate", "latency", "refused", "name")
SORT_KEYS = {"r": "rate", "l": "latency", "f": "refused", "n": "name"}
LATENCY_NOTE = ("latency p50/p99: estimated from log2 histograms (geometric middle of the bucket, "
                "capped at the max)")


# ---- histograms ---------------------------------------------------------------------------------


def bucket_bounds_ns(i: int) -> tuple[float, float]:
    """The round trips bucket i counts: [low, high) in ns (bucket 0 from 0, the last to inf)."""
    low = 0.0 if i == 0 else float(HIST_BASE_NS << i)
    high = math.inf if i >= HIST_BUCKETS - 1 else float(HIST_BASE_NS << (i + 1))
    return low, high


def bucket_mid_ns(i: int) -> float:
    """The geometric middle of bucket i's nominal range [100 ns * 2^i, 100 ns * 2^(i+1))."""
    return HIST_BASE_NS * (1 << i) * math.sqrt(2)


def merge_hist(hists: Iterable[Sequence[int] | None]) -> list[int]:
    out = [0] * HIST_BUCKETS
    for h in hists:
        for i, n in enumerate(h or ()):
            if i >= len(out):
                out.extend([0] * (i + 1 - len(out)))
            out[i] += int(n)
    return out


def percentile_ns(hist: Sequence[int], q: float, max_ns: float | None = None) -> float | None:
    """The q-quantile (0 < q <= 1) of a latency histogram, in ns; None when it is empty."""
    total = sum(hist)
    if total <= 0:
        return None
    rank = max(1, math.ceil(q * total))
    cum = 0
    est = bucket_mid_ns(len(hist) - 1)
    for i, n in enumerate(hist):
        cum += n
        if cum >= rank:
            est = bucket_mid_ns(i)
            break
    if max_ns:
        est = min(est, float(max_ns))
    return est


# ---- aggregation (pure) -------------------------------------------------------------------------


def _n(row: dict[str, Any], key: str) -> int:
    v = row.get(key)
    return int(v) if isinstance(v, (int, float)) else 0


def _derive(out: dict[str, Any]) -> dict[str, Any]:
    """Add the figures the views show to a row of summed (or one channel's) counters."""
    out["refused_sender"] = sum(_n(out, k) for k in SENDER_REFUSALS)
    out["dropped"] = sum(_n(out, k) for k in RECEIVER_DROPS)
    out["refused"] = out["refused_sender"] + out["dropped"]
    out["refused_by"] = {k.removeprefix("refused_"): _n(out, k) for k in SENDER_REFUSALS}
    out["refused_by"].update({k: _n(out, k) for k in RECEIVER_DROPS})
    hist = list(out.get("hist") or [])
    max_ns = _n(out, "latency_max_ns") or None
    out["latency_p50_ns"] = percentile_ns(hist, 0.50, max_ns)
    out["latency_p99_ns"] = percentile_ns(hist, 0.99, max_ns)
    count = _n(out, "latency_count")
    out["latency_mean_ns"] = _n(out, "latency_sum_ns") / count if count else None
    out["sent_per_s"] = _n(out, "sent_last_second")
    out["received_per_s"] = _n(out, "received_last_second")
    return out


def channel_view(row: dict[str, Any]) -> dict[str, Any]:
    """One "channels" row with the derived figures (refusals, percentiles) added."""
    return _derive(dict(row))


def aggregate(channels: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The counters of these channels summed, their histograms merged, and the derived figures."""
    chs = list(channels)
    out: dict[str, Any] = {k: sum(_n(c, k) for c in chs) for k in COUNTERS}
    out["channels"] = len(chs)
    out["latency_max_ns"] = max((_n(c, "latency_max_ns") for c in chs), default=0)
    out["hist"] = merge_hist(c.get("hist") for c in chs)
    return _derive(out)


def process_aggregate(process_id: int, channels: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """A process's figures: what it sent as a client (calls, their latency, its messages refused
    at either end) and what it received as a server (messages, replies it sent, what it dropped)."""
    chs = list(channels)
    out_ = aggregate(c for c in chs if c.get("client") == process_id)
    in_ = aggregate(c for c in chs if c.get("server") == process_id)
    return {
        "channels_out": out_["channels"], "channels_in": in_["channels"],
        "sent": out_["sent"], "bytes_sent": out_["bytes_sent"], "calls": out_["calls"],
        "timeouts": out_["timeouts"], "refused": out_["refused"], "refused_by": out_["refused_by"],
        "latency_p50_ns": out_["latency_p50_ns"], "latency_p99_ns": out_["latency_p99_ns"],
        "latency_max_ns": out_["latency_max_ns"], "latency_mean_ns": out_["latency_mean_ns"],
        "latency_count": out_["latency_count"], "hist": out_["hist"],
        "sent_per_s": out_["sent_per_s"],
        "received": in_["received"], "bytes_received": in_["bytes_received"],
        "replies": in_["replies"], "reply_failed": in_["reply_failed"],
        "dropped_in": in_["dropped"], "received_per_s": in_["received_per_s"],
    }


def build(processes: list[dict[str, Any]], services: list[dict[str, Any]],
          channels: list[dict[str, Any]], *, socket: str | None = None, now: float | None = None,
          viewer: int | None = None, errors: Sequence[str] = ()) -> dict[str, Any]:
    """A snapshot from the three queries' rows: every service and process row gets "stats"."""
    chans = [channel_view(c) for c in channels]
    svcs = []
    for s in services:
        s = dict(s)
        s["stats"] = aggregate(c for c in chans
                               if c.get("service") == s.get("name") and c.get("server") == s.get("id"))
        svcs.append(s)
    procs = []
    for p in processes:
        p = dict(p)
        p["stats"] = process_aggregate(p.get("id"), chans)
        procs.append(p)
    totals = aggregate(chans)
    totals.update(processes=len(procs), services=len(svcs), channels=len(chans))
    return {
        "socket": socket, "time": time.time() if now is None else now,
        "monotonic": time.monotonic(), "viewer": viewer,
        "processes": procs, "services": svcs, "channels": chans, "totals": totals,
        "errors": list(errors),
    }


# ---- reading the kernel -------------------------------------------------------------------------


class KernelSource:
    """One connection to the kernel for repeated queries; reconnects after the kernel restarts.

    It is a capbus process like any other, so it shows up in the "processes" it lists (as
    `viewer`). Thread-safe (the metrics server scrapes from several threads)."""

    def __init__(self, socket_path: str | None = None) -> None:
        self.socket_path = socket_path
        self._proc: Any = None
        self._lock = threading.Lock()

    def __enter__(self) -> KernelSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def viewer(self) -> int | None:
        return None if self._proc is None else self._proc.id

    def close(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.close()

    def query(self, what: str, process_id: int = 0) -> list[dict[str, Any]]:
        """All rows of a query (paged, like `capbus ps`)."""
        from ._protocol import frames
        from ._runtime.process import connect

        with self._lock:
            if self._proc is not None and self._proc.closed:
                self._proc = None
            if self._proc is None:
                self._proc = connect(self.socket_path)
            proc = self._proc
            rows: list[dict[str, Any]] = []
            try:
                while True:
                    reply = proc._request(frames.Query(what, len(rows), 200, process_id), 10.0)
                    assert isinstance(reply, frames.Rows)
                    rows.extend(reply.rows)
                    if not reply.rows or len(rows) >= reply.total:
                        return rows
            except (OSError, IpcError):
                if proc.closed:  # the kernel went away: start afresh next time
                    self._proc = None
                raise

    def snapshot(self) -> dict[str, Any]:
        processes = self.query("processes")
        services = self.query("services")
        errors: list[str] = []
        try:
            channels = self.query("channels")
        except IpcError as exc:  # a kernel without channel counters: show the rest
            if self._proc is None:
                raise
            channels = []
            errors.append(f"channels query failed: {type(exc).__name__}: {exc}")
        return build(processes, services, channels, socket=self.socket_path or _default_socket(),
                     viewer=self.viewer, errors=errors)


def _default_socket() -> str:
    from . import _paths

    return os.environ.get(_paths.ENV_SOCKET) or _paths.default_socket()


def snapshot(socket_path: str | None = None) -> dict[str, Any]:
    """One snapshot of the kernel at socket_path: processes, services and channels with their
    counters, "stats" aggregates on every service and process row, and "totals"."""
    with KernelSource(socket_path) as source:
        return source.snapshot()


# ---- rates between snapshots (pure) -------------------------------------------------------------

RATE_FIELDS = ("sent", "received", "bytes_sent", "bytes_received", "refused", "timeouts", "calls")


def channel_key(c: dict[str, Any]) -> tuple[Any, ...]:
    return (c.get("service"), c.get("server"), c.get("client"), c.get("index"))


def rates(prev: dict[str, Any] | None, cur: dict[str, Any]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Per channel: each RATE_FIELDS counter per second since `prev`. A channel new since then
    counts from zero; a counter that went down (a reused index) counts as reset. Without a
    previous snapshot: the kernel's last-second message counts, and None for the rest."""
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    if prev is None:
        for c in cur["channels"]:
            r: dict[str, Any] = dict.fromkeys(RATE_FIELDS)
            r["sent"], r["received"] = _n(c, "sent_last_second"), _n(c, "received_last_second")
            out[channel_key(c)] = r
        return out
    dt = max(cur["monotonic"] - prev["monotonic"], 1e-6)
    before = {channel_key(c): c for c in prev["channels"]}
    for c in cur["channels"]:
        p = before.get(channel_key(c))
        r = {}
        for f in RATE_FIELDS:
            now, was = _n(c, f), (_n(p, f) if p is not None else 0)
            r[f] = (now - was if now >= was else now) / dt
        out[channel_key(c)] = r
    return out


def sum_rates(rs: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Rates added up; a field unknown (None) in any of them is unknown in the sum."""
    out: dict[str, Any] = dict.fromkeys(RATE_FIELDS, 0.0)
    for r in rs:
        for f in RATE_FIELDS:
            out[f] = None if out[f] is None or r.get(f) is None else out[f] + r[f]
    return out


# ---- rows for the tables (pure) -----------------------------------------------------------------


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


def _service_sort_rows(snap: dict[str, Any],
                       chan_rates: dict[tuple[Any, ...], dict[str, Any]] | None) -> list[dict[str, Any]]:
    rows = []
    for s in snap["services"]:
        st = s["stats"]
        if chan_rates is None:
            r: dict[str, Any] = dict.fromkeys(RATE_FIELDS)
            r["sent"], r["received"] = st["sent_per_s"], st["received_per_s"]
        else:
            r = sum_rates(v for k, v in chan_rates.items() if k[0] == s.get("name") and k[1] == s.get("id"))
        rows.append({
            "name": s.get("name"), "kind": s.get("kind"), "server": s.get("id"), "pid": s.get("pid"),
            "clients": st["channels"], "msg/s": r["sent"], "recv/s": r["received"],
            "bytes/s": _add(r["bytes_sent"], r["bytes_received"]),
            "sent": st["sent"], "received": st["received"], "bytes": st["bytes_sent"],
            "calls": st["calls"], "timeouts": st["timeouts"], "refused": st["refused"],
            "refused_by": st["refused_by"], "refused/s": r["refused"],
            "p50": st["latency_p50_ns"], "p99": st["latency_p99_ns"], "max": st["latency_max_ns"] or None,
        })
    return rows


def _process_sort_rows(snap: dict[str, Any],
                       chan_rates: dict[tuple[Any, ...], dict[str, Any]] | None) -> list[dict[str, Any]]:
    rows = []
    for p in snap["processes"]:
        st, pid_ = p["stats"], p.get("id")
        if chan_rates is None:
            out_r: dict[str, Any] = dict.fromkeys(RATE_FIELDS)
            in_r: dict[str, Any] = dict.fromkeys(RATE_FIELDS)
            out_r["sent"], in_r["received"] = st["sent_per_s"], st["received_per_s"]
        else:
            out_r = sum_rates(v for k, v in chan_rates.items() if k[2] == pid_)
            in_r = sum_rates(v for k, v in chan_rates.items() if k[1] == pid_)
        name = p.get("name") or ("(this view)" if pid_ == snap.get("viewer") else None)
        rows.append({
            "id": pid_, "pid": p.get("pid"), "name": name, "package": p.get("package"),
            "services": ",".join(p.get("services") or ()) or None,
            "out/s": out_r["sent"], "in/s": in_r["received"],
            "bytes/s": _add(out_r["bytes_sent"], in_r["bytes_received"]),
            "sent": st["sent"], "received": st["received"], "bytes_out": st["bytes_sent"],
            "bytes_in": st["bytes_received"], "calls": st["calls"], "timeouts": st["timeouts"],
            "refused": st["refused"], "refused_by": st["refused_by"], "refused/s": out_r["refused"],
            "p50": st["latency_p50_ns"], "p99": st["latency_p99_ns"], "max": st["latency_max_ns"] or None,
        })
    return rows


def _channel_sort_rows(snap: dict[str, Any],
                       chan_rates: dict[tuple[Any, ...], dict[str, Any]] | None) -> list[dict[str, Any]]:
    rows = []
    for c in snap["channels"]:
        if chan_rates is None:
            r: dict[str, Any] = dict.fromkeys(RATE_FIELDS)
            r["sent"], r["received"] = c["sent_per_s"], c["received_per_s"]
        else:
            r = chan_rates.get(channel_key(c)) or dict.fromkeys(RATE_FIELDS)
        rows.append({
            "service": c.get("service"), "server": c.get("server"), "client": c.get("client"),
            "index": c.get("index"), "msg/s": r["sent"], "recv/s": r["received"],
            "bytes/s": _add(r["bytes_sent"], r["bytes_received"]),
            "sent": _n(c, "sent"), "received": _n(c, "received"), "bytes": _n(c, "bytes_sent"),
            "calls": _n(c, "calls"), "replies": _n(c, "replies"), "timeouts": _n(c, "timeouts"),
            "refused": c["refused_sender"], "dropped": c["dropped"], "refused_by": c["refused_by"],
            "refused/s": r["refused"], "p50": c["latency_p50_ns"], "p99": c["latency_p99_ns"],
            "max": _n(c, "latency_max_ns") or None,
        })
    return rows


def _add(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


def sort_rows(rows: list[dict[str, Any]], by: str, rate_cols: Sequence[str],
              name_col: str) -> list[dict[str, Any]]:
    """rate: busiest first; latency: highest p99 first; refused: most refused first; name: A-Z."""
    def num(v: Any) -> float:
        return float(v) if isinstance(v, (int, float)) else -1.0

    if by == "name":
        return sorted(rows, key=lambda r: (str(r.get(name_col) or ""), str(r.get("id") or "")))
    if by == "latency":
        return sorted(rows, key=lambda r: (-num(r.get("p99")), -num(r.get("max"))))
    if by == "refused":
        return sorted(rows, key=lambda r: (-num(r.get("refused")), -num(r.get("refused/s"))))
    if by == "rate":
        return sorted(rows, key=lambda r: (-sum(max(num(r.get(c)), 0) for c in rate_cols),
                                           -num(r.get("sent")), str(r.get(name_col) or "")))
    raise ValueError(f"sort by one of {', '.join(SORTS)}, not {by!r}")


def view_rows(snap: dict[str, Any], chan_rates: dict[tuple[Any, ...], dict[str, Any]] | None = None,
              sort: str = "rate") -> dict[str, list[dict[str, Any]]]:
    """The three tables' rows (raw numbers), sorted: {"processes", "services", "channels"}."""
    return {
        "processes": sort_rows(_process_sort_rows(snap, chan_rates), sort, ("out/s", "in/s"), "name"),
        "services": sort_rows(_service_sort_rows(snap, chan_rates), sort, ("msg/s",), "name"),
        "channels": sort_rows(_channel_sort_rows(snap, chan_rates), sort, ("msg/s",), "service"),
    }


_FORMATS: dict[str, Callable[[Any], str]] = {
    "msg/s": fmt_rate, "recv/s": fmt_rate, "out/s": fmt_rate, "in/s": fmt_rate,
    "refused/s": fmt_rate, "bytes/s": fmt_bytes, "bytes": fmt_bytes, "bytes_out": fmt_bytes,
    "bytes_in": fmt_bytes, "p50": fmt_ns, "p99": fmt_ns, "max": fmt_ns, "refused_by": fmt_refusals,
}


def fmt_cell(col: str, value: Any) -> str:
    if value is None or value == "":
        return "-"
    f = _FORMATS.get(col)
    return f(value) if f else str(value)


# ---- capbus stats -------------------------------------------------------------------------------

STATS_COLUMNS = {
    "services": ("name", "kind", "server", "pid", "clients", "sent", "received", "bytes", "calls",
                 "timeouts", "refused", "p50", "p99", "max", "msg/s", "refused_by"),
    "processes": ("id", "pid", "name", "services", "sent", "received", "bytes_out", "bytes_in",
                  "calls", "timeouts", "refused", "p50", "p99", "max", "out/s", "in/s"),
    "channels": ("service", "server", "client", "index", "sent", "received", "bytes", "calls",
                 "replies", "timeouts", "refused", "dropped", "p50", "p99", "max", "msg/s",
                 "refused_by"),
}


def format_stats(snap: dict[str, Any], channels: bool = False, sort: str = "name") -> str:
    """A snapshot as plain text tables (what `capbus stats` prints)."""
    from ._cli import _table

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
    sections = ["services", "processes"] + (["channels"] if channels else [])
    for name in sections:
        cols = STATS_COLUMNS[name]
        cells = [{c: fmt_cell(c, r.get(c)) for c in cols} for r in rows[name]]
        out += ["", name.upper(), _table(cells, cols)]
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
}
_TOP_CHANNEL_ROWS = 30


# Columns given up first when the terminal is too narrow for all of them.
_TOP_DROP = {
    "processes": ("refused/s", "max", "pid", "timeouts", "bytes/s", "services", "calls", "p50"),
    "services": ("kind", "refused/s", "max", "timeouts", "recv/s", "bytes/s", "clients", "calls",
                 "p50"),
    "channels": ("index", "dropped", "sent", "recv/s", "timeouts", "bytes/s", "p50", "server"),
}
_NUMERIC = {"msg/s", "recv/s", "out/s", "in/s", "bytes/s", "calls", "p50", "p99", "max", "refused",
            "refused/s", "timeouts", "sent", "dropped", "clients"}


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


def render_top(snap: dict[str, Any] | None, chan_rates: dict[tuple[Any, ...], dict[str, Any]] | None,
               sort: str, socket_path: str, error: str | None = None, interval: float = 1.0,
               width: int = 200) -> Any:
    """The screen of `capbus top` as a rich renderable (for a terminal `width` columns wide)."""
    from rich.console import Group
    from rich.table import Table
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
    rows = view_rows(snap, chan_rates, sort)
    for name in ("processes", "services", "channels"):
        shown = rows[name][:_TOP_CHANNEL_ROWS] if name == "channels" else rows[name]
        title = name.upper() + (f" (top {_TOP_CHANNEL_ROWS} of {len(rows[name])})"
                                if len(rows[name]) > len(shown) else "")
        cells = [{c: fmt_cell(c, r.get(c)) for c in TOP_COLUMNS[name]} for r in shown]
        cols = fit_columns(TOP_COLUMNS[name], cells, width, _TOP_DROP[name])
        table = Table(title=title, title_justify="left", title_style="bold", expand=False,
                      pad_edge=False, box=None, header_style="bold reverse", padding=(0, 1, 0, 0))
        for c in cols:
            table.add_column(c.upper(), justify="right" if c in _NUMERIC else "left",
                             no_wrap=True, overflow="ellipsis")
        for r, cell in zip(shown, cells, strict=True):
            style = "red" if (r.get("refused/s") or 0) > 0 else None
            table.add_row(*(cell[c] for c in cols), style=style)
        parts += [Text(""), table]
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
    shown_socket = socket_path or _default_socket()
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
                if snap is not None:
                    prev = snap
                live.update(render_top(snap, chan_rates, sort, shown_socket, error, interval,
                                       console.width), refresh=True)
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
                                                   interval, console.width), refresh=True)
    except KeyboardInterrupt:
        return 0
    finally:
        source.close()
        signal.signal(signal.SIGTERM, old_term)
