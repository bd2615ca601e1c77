"""The figures of `capbus stats`, `capbus top` and `capbus metrics`, from the kernel's rows.

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

Everything here is pure: it works on plain rows (query.py fetches them) and is unit-tested
without a kernel.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

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


def process_aggregate(process_id: int | None, channels: Iterable[dict[str, Any]]) -> dict[str, Any]:
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
          viewer: int | None = None, errors: Sequence[str] = (),
          topics: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """A snapshot from the queries' rows: every service and process row gets "stats"; topics
    are the kernel's rows, one per subscription (published, delivered, taken, dropped)."""
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
    totals.update(processes=len(procs), services=len(svcs), channels=len(chans),
                  topics=len({t.get("topic") for t in topics}))
    return {
        "socket": socket, "time": time.time() if now is None else now,
        "monotonic": time.monotonic(), "viewer": viewer,
        "processes": procs, "services": svcs, "channels": chans, "totals": totals,
        "topics": [dict(t) for t in topics],
        "errors": list(errors),
    }


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


def topic_key(t: dict[str, Any]) -> tuple[Any, ...]:
    return (t.get("topic"), t.get("publisher"), t.get("subscriber"))


def _topic_sort_rows(snap: dict[str, Any], prev: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per subscription; delivered/s from the previous snapshot when there is one."""
    before = {topic_key(t): t for t in (prev or {}).get("topics", ())}
    dt = max(snap["monotonic"] - prev["monotonic"], 1e-6) if prev else None
    rows = []
    for t in snap.get("topics", ()):
        was = before.get(topic_key(t))
        rate = None
        if dt is not None:
            now_, then = _n(t, "delivered"), _n(was, "delivered") if was else 0
            rate = (now_ - then if now_ >= then else now_) / dt
        rows.append({
            "topic": t.get("topic"), "publisher": t.get("publisher"),
            "subscriber": t.get("subscriber") or None, "subscribers": _n(t, "subscribers"),
            "published": _n(t, "published"), "delivered": _n(t, "delivered"),
            "taken": _n(t, "taken"), "dropped": _n(t, "dropped"), "delivered/s": rate,
        })
    return sorted(rows, key=lambda r: (str(r["topic"]), r["subscriber"] or 0))


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
              sort: str = "rate", prev: dict[str, Any] | None = None) -> dict[str, list[dict[str, Any]]]:
    """The tables' rows (raw numbers), sorted: {"processes", "services", "channels",
    "topics"} (topics by name; prev: the snapshot before, for delivered/s)."""
    return {
        "topics": _topic_sort_rows(snap, prev),
        "processes": sort_rows(_process_sort_rows(snap, chan_rates), sort, ("out/s", "in/s"), "name"),
        "services": sort_rows(_service_sort_rows(snap, chan_rates), sort, ("msg/s",), "name"),
        "channels": sort_rows(_channel_sort_rows(snap, chan_rates), sort, ("msg/s",), "service"),
    }
