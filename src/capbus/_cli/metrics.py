"""`capbus metrics --serve PORT`: the figures of `capbus stats` in the Prometheus text format.

A custom prometheus_client Collector asks the kernel on every scrape (through the same queries
as `capbus stats`; the watched processes are never asked). Channel counters are summed per
(service, server, client): a client has one channel per calling thread. Counters belong to live
channels, so a series goes down when a channel closes: Prometheus' rate() and increase() treat
that as a counter reset.

The call latency histogram is the channels' log2 histogram as it is: bucket i holds round trips
below 100 ns * 2^(i+1) s, so the `le` bounds are 200 ns, 400 ns, ... 13.4 s and +Inf.

The server binds to 127.0.0.1 unless told otherwise; a non-loopback --host needs
--allow-remote (the figures name every process and service on the machine).
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import socketserver
import sys
import threading
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .._errors import IpcError
from .query import KernelSource, default_socket
from .stats import aggregate, bucket_bounds_ns

LABELS = ("service", "server", "client")
_COUNTERS = (
    ("messages_sent", "sent", "Messages the client put on its channels to the service."),
    ("messages_received", "received", "Messages the service took off those channels."),
    ("bytes_sent", "bytes_sent", "Payload bytes the client sent."),
    ("bytes_received", "bytes_received", "Payload bytes the service received."),
    ("calls", "calls", "Calls (request and reply round trips) the client made."),
    ("replies", "replies", "Replies the service sent."),
    ("timeouts", "timeouts", "Calls that timed out at the client."),
    ("reply_failed", "reply_failed", "Replies the service could not deliver."),
    ("cancelled", "cancelled", "Transactions cancelled (a late reply dropped)."),
)
_SENDER = {"refused_wouldblock": "wouldblock", "refused_rate": "rate", "refused_size": "size",
           "refused_perm": "perm"}
_RECEIVER = {"drops_rate": "rate", "drops_bandwidth": "bandwidth", "drops_size": "size",
             "drops_expired": "expired", "drops_rights": "rights"}


def _group(channels: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Channels summed per (service, server, client) label set."""
    by: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for c in channels:
        key = (str(c.get("service")), str(c.get("server")), str(c.get("client")))
        by.setdefault(key, []).append(c)
    return {k: aggregate(v) for k, v in sorted(by.items())}


def latency_buckets(hist: list[int]) -> list[tuple[str, float]]:
    """Cumulative Prometheus buckets from a log2 histogram (le in seconds, last +Inf)."""
    from prometheus_client.utils import floatToGoString

    out, cum = [], 0
    for i, n in enumerate(hist):
        cum += n
        _, high_ns = bucket_bounds_ns(i)
        if i == len(hist) - 1:
            high_ns = float("inf")
        out.append((floatToGoString(high_ns / 1e9), float(cum)))
        if high_ns == float("inf"):
            break
    return out


def families(snap: dict[str, Any]) -> Iterator[Any]:
    """The metric families of one snapshot (pure: no kernel needed)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    t = snap["totals"]
    for name, count, text in (("processes", t["processes"], "Processes connected to the kernel "
                                                            "(the exporter is one)."),
                              ("services", t["services"], "Registered services."),
                              ("channels", t["channels"], "Open channels.")):
        yield GaugeMetricFamily(f"capbus_{name}", text, value=count)
    groups = _group(snap["channels"])
    for metric, field, text in _COUNTERS:
        fam = CounterMetricFamily(f"capbus_{metric}", text, labels=LABELS)
        for key, agg in groups.items():
            fam.add_metric(key, agg[field])
        yield fam
    fam = CounterMetricFamily("capbus_refused", "Messages refused: at the sender (side=sender: "
                              "wouldblock, rate, size, perm) or dropped by the receiver under the "
                              "capability's limits (side=receiver: rate, bandwidth, size, expired, "
                              "rights).", labels=(*LABELS, "side", "reason"))
    for key, agg in groups.items():
        for field, reason in _SENDER.items():
            fam.add_metric((*key, "sender", reason), agg[field])
        for field, reason in _RECEIVER.items():
            fam.add_metric((*key, "receiver", reason), agg[field])
    yield fam
    hist = HistogramMetricFamily("capbus_call_latency_seconds", "Call round trips seen by the client "
                                 "(log2 buckets from 200 ns).", labels=LABELS)
    for key, agg in groups.items():
        hist.add_metric(key, latency_buckets(agg["hist"]), agg["latency_sum_ns"] / 1e9)
    yield hist
    gauge = GaugeMetricFamily("capbus_call_latency_max_seconds", "Longest call round trip.",
                              labels=LABELS)
    for key, agg in groups.items():
        gauge.add_metric(key, agg["latency_max_ns"] / 1e9)
    yield gauge
    gauge = GaugeMetricFamily("capbus_messages_last_second", "Messages in the last second, as sent by "
                              "the client or received by the service.", labels=(*LABELS, "direction"))
    for key, agg in groups.items():
        gauge.add_metric((*key, "sent"), agg["sent_last_second"])
        gauge.add_metric((*key, "received"), agg["received_last_second"])
    yield gauge
    yield GaugeMetricFamily("capbus_topics", "Published topics.",
                            value=len({t.get("topic") for t in snap.get("topics", ())}))
    published = CounterMetricFamily("capbus_topic_published", "Samples a topic's publisher "
                                    "published.", labels=("topic", "publisher"))
    seen: set[tuple[str, str]] = set()
    for t in snap.get("topics", ()):
        pair = (str(t.get("topic")), str(t.get("publisher")))
        if pair not in seen:
            seen.add(pair)
            published.add_metric(pair, t.get("published", 0))
    yield published
    for field, text in (("delivered", "Samples put into a subscriber's ring."),
                        ("dropped", "Samples a subscriber lost to drop-oldest (it was more than "
                                    "its depth behind).")):
        fam = CounterMetricFamily(f"capbus_topic_{field}", text,
                                  labels=("topic", "publisher", "subscriber"))
        for t in snap.get("topics", ()):
            if t.get("subscriber"):
                fam.add_metric((str(t.get("topic")), str(t.get("publisher")),
                                str(t.get("subscriber"))), t.get(field, 0))
        yield fam


class Collector:
    """A prometheus_client collector that takes a snapshot from the kernel on each scrape."""

    def __init__(self, socket_path: str | None = None) -> None:
        self.source = KernelSource(socket_path)

    def describe(self) -> list[Any]:
        return []  # nothing to describe ahead: registering must not query the kernel

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            snap = self.source.snapshot()
        except (IpcError, OSError):
            yield GaugeMetricFamily("capbus_up", "1 when the kernel answered this scrape.", value=0)
            return
        yield GaugeMetricFamily("capbus_up", "1 when the kernel answered this scrape.",
                                value=0 if snap["errors"] else 1)
        yield from families(snap)

    def close(self) -> None:
        self.source.close()


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass


def check_host(host: str, allow_remote: bool) -> None:
    if allow_remote or host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"--host {host} is not a loopback address: the metrics name every process "
                         "and service; pass --allow-remote to serve them beyond this machine")


def serve(socket_path: str | None, port: int, host: str = "127.0.0.1",
          allow_remote: bool = False) -> int:
    """Serve /metrics until SIGINT or SIGTERM. Port 0 picks a free port (printed)."""
    try:
        from prometheus_client import CollectorRegistry, make_wsgi_app
    except ImportError:
        print("capbus metrics needs prometheus_client: pip install prometheus-client "
              "(or capbus[top])", file=sys.stderr)
        return 1
    check_host(host, allow_remote)
    registry = CollectorRegistry(auto_describe=False)
    collector = Collector(socket_path)
    registry.register(collector)
    httpd = make_server(host, port, make_wsgi_app(registry), _Server6 if ":" in host else _Server,
                        handler_class=_Quiet)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=httpd.serve_forever, name="capbus-metrics", daemon=True)
    thread.start()
    try:
        print(f"capbus metrics: http://{host}:{httpd.server_port}/metrics "
              f"(kernel {socket_path or default_socket()}); Ctrl-C stops", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
        collector.close()
        for s, h in old.items():
            signal.signal(s, h)
    print("capbus metrics: stopped", flush=True)
    return 0
