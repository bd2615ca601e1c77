"""Metrics views: the channel counters as the kernel reports them, `capbus stats`, `capbus top`
(in a pseudo-terminal) and `capbus metrics --serve` (scraped and parsed), against a real kernel
and real processes; plus the pure aggregation."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
import urllib.request

import pytest
from conftest import readline, wait_for

import capbus
from capbus._cli import main as cli
from capbus._cli import metrics as _metrics
from capbus._cli import query, top
from capbus._cli import stats as _top

# Where the capbus under test is imported from (the installed package in CI, src/ in a checkout
# with an in-place build): children must import the same one.
SRC = os.path.dirname(os.path.dirname(os.path.abspath(capbus.__file__)))

# Serves "m-echo" (opcode 99 sleeps data[0] ms first) and registers "m-sink", which it never reads.
SERVER = """
import capbus, time
p = capbus.connect()
echo = p.register("m-echo")
sink = p.register("m-sink")
print("ready", p.id, flush=True)
def handler(req):
    if req.opcode == 99:
        time.sleep(req.data[0] / 1000)
    return (req.opcode, req.data, req.payload)
echo.serve(handler)
"""

# Serves argv[1] and calls argv[2] in a loop.
PEER = """
import capbus, sys, threading, time
p = capbus.connect()
svc = p.register(sys.argv[1])
threading.Thread(target=svc.serve, args=(lambda req: (req.opcode, req.data),), daemon=True).start()
print("ready", p.id, flush=True)
ep = p.lookup(sys.argv[2], timeout=10)
while True:
    ep.call(1, (1,), timeout=5)
    time.sleep(0.005)
"""

COUNTERS = [k for k in _top.COUNTERS if not k.endswith("_last_second")]


def _env(socket_path: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ, CAPBUS_SOCKET=socket_path, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("CAPBUS_FD", None)
    env.update(extra)
    return env


def _cli(socket_path: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "capbus", *args, "--socket", socket_path],
                          env=_env(socket_path), capture_output=True, text=True, timeout=timeout)


def _start_server(children) -> int:
    p = children.start(SERVER, stdin=subprocess.DEVNULL)
    line = readline(p, 20)
    assert line.startswith("ready"), line
    return int(line.split()[1])


def _mine(kernel, client: int, service: str) -> list[dict]:
    return [c for c in kernel.channels() if c["client"] == client and c["service"] == service]


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
    p.wait(10)


# ---- (a) the counters match the traffic -------------------------------------------------------


def test_counters_match_traffic(kernel, children):
    server_id = _start_server(children)
    n_calls, n_async = 20, 15
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("m-echo")
        call_bytes = async_bytes = 0
        for i in range(n_calls):
            payload = b"c" * (i * 37)
            call_bytes += len(payload)
            reply = ep.call(1, (i,), payload=payload, timeout=5)
            assert reply.payload == payload
        for i in range(n_async):
            payload = b"a" * (i * 11 + 1)
            async_bytes += len(payload)
            ep.send_async(2, (i,), payload=payload)
        assert wait_for(lambda: sum(c["received"] for c in _mine(kernel, me.id, "m-echo"))
                        == n_calls + n_async, 10)
        # One timeout: the server takes the call and sleeps 300 ms; the late reply is dropped.
        with pytest.raises(capbus.Timeout):
            ep.call(99, (300,), timeout=0.05)

        # WouldBlock: nobody reads m-sink, its ring for us fills.
        sink = me.lookup("m-sink")
        accepted = wouldblock = 0
        while wouldblock < 3:
            try:
                sink.send_async(3, (accepted,))
                accepted += 1
            except capbus.WouldBlock:
                wouldblock += 1
            assert accepted < 1_000_000
        assert accepted > 0

        # Rate limit: 5 messages/s on a derived capability (its own channel).
        limited = ep.restrict(rate_limit=5)
        rate_ok = rate_refused = 0
        for i in range(12):
            try:
                limited.send_async(4, (i,))
                rate_ok += 1
            except capbus.RateLimitExceeded:
                rate_refused += 1
        assert rate_refused > 0 and rate_ok > 0

        # The server takes the timed-out call at once (it is idle); were it too slow (a loaded
        # machine), it would skip it as cancelled instead.
        def settled() -> bool:
            chans = _mine(kernel, me.id, "m-echo")
            cancelled = sum(c["cancelled"] for c in chans)
            return (sum(c["received"] for c in chans) + cancelled == n_calls + n_async + 1 + rate_ok
                    and sum(c["replies"] for c in chans) == n_calls + 1 - cancelled)

        assert wait_for(settled, 10)
        late = 1 - sum(c["cancelled"] for c in _mine(kernel, me.id, "m-echo"))  # 1: taken, replied
        echo_total = n_calls + n_async + late + rate_ok

        rows = {("sink" if c["service"] == "m-sink" else "echo" if c["calls"] else "limited"): c
                for c in kernel.channels() if c["client"] == me.id}
        assert set(rows) == {"echo", "limited", "sink"}
        echo, lim, snk = rows["echo"], rows["limited"], rows["sink"]
        assert all(c["server"] == server_id for c in rows.values())
        assert len(echo["hist"]) == _top.HIST_BUCKETS

        assert echo["sent"] == n_calls + n_async + 1
        assert echo["calls"] == n_calls + 1
        assert echo["bytes_sent"] == call_bytes + async_bytes
        assert echo["timeouts"] == 1
        assert echo["received"] == n_calls + n_async + late
        assert echo["cancelled"] == 1 - late
        assert echo["bytes_received"] == call_bytes + async_bytes
        assert echo["replies"] == n_calls + late  # the late reply is written (then dropped by us)
        assert echo["latency_count"] == sum(echo["hist"]) == n_calls
        assert 0 < echo["latency_max_ns"] < 5e9
        assert echo["latency_sum_ns"] <= echo["latency_max_ns"] * n_calls
        for k in _top.SENDER_REFUSALS + _top.RECEIVER_DROPS:
            assert echo[k] == 0, k

        assert lim["sent"] == lim["received"] == rate_ok
        assert lim["refused_rate"] == rate_refused
        assert lim["calls"] == lim["refused_wouldblock"] == lim["drops_rate"] == 0

        assert snk["sent"] == accepted and snk["received"] == 0
        assert snk["refused_wouldblock"] == wouldblock
        assert snk["refused_rate"] == snk["calls"] == 0

        # The aggregates.
        snap = query.snapshot(kernel.socket_path)
        svc = {s["name"]: s["stats"] for s in snap["services"]}
        assert svc["m-echo"]["sent"] == n_calls + n_async + 1 + rate_ok
        assert svc["m-echo"]["received"] == echo_total
        assert svc["m-echo"]["refused"] == rate_refused and svc["m-echo"]["timeouts"] == 1
        assert svc["m-echo"]["refused_by"]["rate"] == rate_refused
        assert svc["m-echo"]["calls"] == n_calls + 1 and svc["m-echo"]["channels"] == 2
        assert svc["m-sink"]["refused_by"]["wouldblock"] == wouldblock
        assert svc["m-sink"]["sent"] == accepted
        procs = {p["id"]: p["stats"] for p in snap["processes"]}
        mine = procs[me.id]
        sent_total = n_calls + n_async + 1 + rate_ok + accepted
        assert mine["sent"] == sent_total
        assert mine["bytes_sent"] == call_bytes + async_bytes
        assert mine["refused"] == rate_refused + wouldblock and mine["timeouts"] == 1
        assert mine["received"] == 0 and mine["channels_out"] == 3
        assert procs[server_id]["received"] == echo_total
        assert procs[server_id]["replies"] == n_calls + late
        assert procs[server_id]["channels_in"] == 3
        p50, p99 = mine["latency_p50_ns"], mine["latency_p99_ns"]
        assert 0 < p50 <= p99 <= mine["latency_max_ns"]
        assert snap["viewer"] in procs and snap["totals"]["channels"] == 3

        # `capbus stats --json` in another process sees the same counters.
        out = _cli(kernel.socket_path, "stats", "--json")
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout)
        by_key = {_top.channel_key(c): c for c in data["channels"]}
        for c in rows.values():
            seen = by_key[_top.channel_key(c)]
            assert {k: seen[k] for k in COUNTERS} == {k: c[k] for k in COUNTERS}
            assert seen["hist"] == c["hist"]
        svc = {s["name"]: s["stats"] for s in data["services"]}
        assert svc["m-echo"]["received"] == echo_total and svc["m-echo"]["refused"] == rate_refused
        assert svc["m-sink"]["refused"] == wouldblock
        assert {p["id"]: p["stats"]["sent"] for p in data["processes"]}[me.id] == sent_total

        # And as tables.
        out = _cli(kernel.socket_path, "stats", "--channels")
        assert out.returncode == 0, out.stderr
        print(out.stdout)
        for text in ("SERVICES", "PROCESSES", "CHANNELS", "m-echo", "m-sink", f"rate={rate_refused}",
                     f"wouldblock={wouldblock}"):
            assert text in out.stdout, text


# ---- (b) capbus top in a pseudo-terminal -------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"
                   r"|\x1b[()][0-9A-Za-z]|\x1b[=>78]")


def _read_pty(fd: int, seconds: float, buf: bytearray, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], min(left, 0.1))
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not chunk:
                return
            buf += chunk
        elif proc.poll() is not None:
            return


def test_top_in_a_terminal(kernel, children):
    peers = {}
    for me, other in (("t-alpha", "t-beta"), ("t-beta", "t-alpha")):
        p = children.start(PEER, me, other, stdin=subprocess.DEVNULL)
        peers[me] = p
    ids = {}
    for name, p in peers.items():
        line = readline(p, 20)
        assert line.startswith("ready"), line
        ids[name] = int(line.split()[1])
    assert wait_for(lambda: len(kernel.channels()) >= 2, 10)

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen(
        [sys.executable, "-m", "capbus", "top", "--socket", kernel.socket_path, "--interval", "0.5"],
        stdin=slave, stdout=slave, stderr=slave, env=_env(kernel.socket_path, TERM="xterm-256color"),
        start_new_session=True, close_fds=True)
    buf = bytearray()
    try:
        _read_pty(master, 3.0, buf, proc)
        assert proc.poll() is None, buf.decode(errors="replace")
        os.write(master, b"n")  # sort by name: still running
        _read_pty(master, 0.7, buf, proc)
        assert proc.poll() is None
        os.write(master, b"q")
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < 5:
            _read_pty(master, 0.2, buf, proc)
        assert proc.wait(5) == 0
        _read_pty(master, 0.3, buf, proc)
        assert termios.tcgetattr(slave)[3] == before[3]  # echo and canonical mode are back
    finally:
        _stop(proc)
        os.close(master)
        os.close(slave)
    screen = _ANSI.sub("", buf.decode(errors="replace"))
    assert "Traceback" not in screen, screen
    for text in ("capbus top", "PROCESSES", "SERVICES", "CHANNELS", "t-alpha", "t-beta",
                 kernel.socket_path, "sort: name"):
        assert text in screen, (text, screen[-3000:])
    for pid in ids.values():
        assert re.search(rf"(?<![\d.]){pid}(?![\d.])", screen), (pid, screen[-3000:])


# ---- (c) capbus metrics --serve -----------------------------------------------------------------


def test_metrics_serve(kernel, children):
    from prometheus_client.parser import text_string_to_metric_families

    server_id = _start_server(children)
    n_calls, size = 9, 100
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("m-echo")
        for i in range(n_calls):
            ep.call(1, (i,), payload=b"p" * size, timeout=5)
        limited = ep.restrict(rate_limit=5)
        refused = 0
        for i in range(10):
            try:
                limited.send_async(4, (i,))
            except capbus.RateLimitExceeded:
                refused += 1
        assert refused > 0
        proc = subprocess.Popen(
            [sys.executable, "-m", "capbus", "metrics", "--serve", "0", "--socket", kernel.socket_path],
            env=_env(kernel.socket_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            ready, _, _ = select.select([proc.stdout], [], [], 20)
            assert ready, "capbus metrics printed nothing"
            line = proc.stdout.readline()
            m = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", line)
            assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
            with urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/metrics", timeout=10) as r:
                assert r.status == 200
                text = r.read().decode()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(5) == 0
        finally:
            _stop(proc)
            for f in (proc.stdout, proc.stderr):
                f.close()

    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in (("capbus_messages_sent", "counter"), ("capbus_messages_received", "counter"),
                       ("capbus_bytes_sent", "counter"), ("capbus_bytes_received", "counter"),
                       ("capbus_refused", "counter"), ("capbus_timeouts", "counter"),
                       ("capbus_calls", "counter"), ("capbus_call_latency_seconds", "histogram"),
                       ("capbus_processes", "gauge"), ("capbus_services", "gauge"),
                       ("capbus_channels", "gauge"), ("capbus_up", "gauge")):
        assert name in fams and fams[name].type == kind, name

    def value(sample: str, **labels: str) -> float:
        hits = [s.value for f in fams.values() for s in f.samples
                if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]
        assert len(hits) == 1, (sample, labels, hits)
        return hits[0]

    mine = {"service": "m-echo", "client": str(me.id), "server": str(server_id)}
    assert value("capbus_up") == 1
    assert value("capbus_services") == 2
    assert value("capbus_processes") == 3  # the server, this test, the exporter
    assert value("capbus_channels") == 2  # the echo lane and the rate-limited one
    sent = value("capbus_messages_sent_total", **mine)
    assert sent == n_calls + 10 - refused
    assert value("capbus_calls_total", **mine) == n_calls
    assert value("capbus_bytes_sent_total", **mine) == n_calls * size
    assert value("capbus_bytes_received_total", **mine) == n_calls * size
    assert value("capbus_timeouts_total", **mine) == 0
    assert value("capbus_refused_total", side="sender", reason="rate", **mine) == refused
    assert value("capbus_refused_total", side="sender", reason="wouldblock", **mine) == 0
    assert value("capbus_call_latency_seconds_count", **mine) == n_calls
    assert value("capbus_call_latency_seconds_bucket", le="+Inf", **mine) == n_calls
    assert 0 < value("capbus_call_latency_seconds_sum", **mine) < 5 * n_calls
    buckets = sorted((float(s.labels["le"]), s.value) for s in fams["capbus_call_latency_seconds"].samples
                     if s.name.endswith("_bucket"))
    assert len(buckets) == _top.HIST_BUCKETS
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    assert buckets[0][0] == pytest.approx(200e-9)


def test_metrics_refuses_a_remote_host(capsys):
    assert cli.main(["metrics", "--serve", "0", "--host", "0.0.0.0"]) == 1
    assert "--allow-remote" in capsys.readouterr().err
    _metrics.check_host("127.0.0.1", False)
    _metrics.check_host("::1", False)
    _metrics.check_host("10.1.2.3", True)


# ---- the pure parts ------------------------------------------------------------------------------


def _chan(service="s", server=1, client=2, index=0, **counters) -> dict:
    row = {"service": service, "server": server, "client": client, "index": index,
           "hist": [0] * _top.HIST_BUCKETS}
    row.update({k: 0 for k in _top.COUNTERS})
    row["latency_max_ns"] = 0
    row.update(counters)
    return row


def test_percentiles_from_the_histogram():
    hist = [0] * _top.HIST_BUCKETS
    assert _top.percentile_ns(hist, 0.5) is None
    hist[3] = 90  # [800, 1600) ns
    hist[10] = 10  # [102.4, 204.8) us
    mid3, mid10 = 800 * math.sqrt(2), 102400 * math.sqrt(2)
    assert _top.percentile_ns(hist, 0.5) == pytest.approx(mid3)
    assert _top.percentile_ns(hist, 0.9) == pytest.approx(mid3)
    assert _top.percentile_ns(hist, 0.91) == pytest.approx(mid10)
    assert _top.percentile_ns(hist, 0.99) == pytest.approx(mid10)
    assert _top.percentile_ns(hist, 0.99, max_ns=120_000) == 120_000  # never above the max
    assert _top.bucket_bounds_ns(0) == (0.0, 200.0)
    assert _top.bucket_bounds_ns(_top.HIST_BUCKETS - 1)[1] == math.inf
    assert _top.merge_hist([[1, 2], [3], None]) == [4, 2] + [0] * (_top.HIST_BUCKETS - 2)


def test_aggregates_per_service_and_process():
    h1, h2 = [0] * _top.HIST_BUCKETS, [0] * _top.HIST_BUCKETS
    h1[2], h2[5] = 4, 1
    chans = [
        _chan("a", 1, 2, 0, sent=10, bytes_sent=100, calls=5, received=9, bytes_received=90,
              replies=5, timeouts=1, refused_wouldblock=2, drops_rate=1, hist=h1,
              latency_count=4, latency_sum_ns=2000, latency_max_ns=700, sent_last_second=3),
        _chan("a", 1, 3, 1, sent=4, calls=1, received=4, replies=1, refused_rate=5, hist=h2,
              latency_count=1, latency_sum_ns=4000, latency_max_ns=4000, received_last_second=2),
        _chan("b", 2, 1, 0, sent=7, received=7, refused_perm=1, drops_expired=2),
    ]
    procs = [{"id": i, "pid": 100 + i, "name": None, "services": []} for i in (1, 2, 3)]
    services = [{"name": "a", "kind": "name", "id": 1}, {"name": "b", "kind": "name", "id": 2}]
    snap = _top.build(procs, services, chans, socket="/x", now=0.0, viewer=3)
    a = next(s["stats"] for s in snap["services"] if s["name"] == "a")
    assert (a["sent"], a["received"], a["calls"], a["timeouts"], a["channels"]) == (14, 13, 6, 1, 2)
    assert a["refused"] == 2 + 1 + 5 and a["refused_by"]["wouldblock"] == 2
    assert a["refused_by"]["rate"] == 5 and a["refused_by"]["drops_rate"] == 1
    assert a["latency_max_ns"] == 4000 and a["latency_mean_ns"] == 1200
    assert a["latency_p50_ns"] == pytest.approx(400 * math.sqrt(2))
    assert a["latency_p99_ns"] == 4000  # bucket 5's middle (4525 ns) capped at the max
    assert a["sent_per_s"] == 3 and a["received_per_s"] == 2
    p = {r["id"]: r["stats"] for r in snap["processes"]}
    assert p[2]["sent"] == 10 + 0 and p[2]["received"] == 7 and p[2]["refused"] == 3
    assert p[2]["channels_out"] == 1 and p[2]["channels_in"] == 1
    assert p[1]["sent"] == 7 and p[1]["received"] == 13 and p[1]["replies"] == 6
    assert p[1]["refused"] == 3 and p[1]["dropped_in"] == 1
    assert p[3]["sent"] == 4 and p[3]["refused"] == 5
    assert snap["totals"]["sent"] == 21 and snap["totals"]["refused"] == 11
    assert snap["totals"]["channels"] == 3 and snap["totals"]["processes"] == 3
    text = top.format_stats(snap, channels=True)
    assert "rate=5" in text and "(this view)" in text
    json.dumps(snap)  # --json


def test_rates_between_snapshots():
    prev = {"monotonic": 10.0, "channels": [_top.channel_view(_chan(index=0, sent=100, bytes_sent=1000)),
                                            _top.channel_view(_chan(index=1, sent=50))]}
    cur = {"monotonic": 12.0, "channels": [_top.channel_view(_chan(index=0, sent=140, bytes_sent=3000)),
                                           _top.channel_view(_chan(index=1, sent=6)),  # reused index
                                           _top.channel_view(_chan(index=2, sent=8, received=8))]}
    r = _top.rates(prev, cur)
    assert r[("s", 1, 2, 0)]["sent"] == 20 and r[("s", 1, 2, 0)]["bytes_sent"] == 1000
    assert r[("s", 1, 2, 1)]["sent"] == 3
    assert r[("s", 1, 2, 2)]["received"] == 4
    total = _top.sum_rates(r.values())
    assert total["sent"] == 27
    first = _top.rates(None, {"channels": [_top.channel_view(_chan(sent_last_second=5))]})
    assert first[("s", 1, 2, 0)]["sent"] == 5 and first[("s", 1, 2, 0)]["bytes_sent"] is None
    assert _top.sum_rates(first.values())["bytes_sent"] is None


def test_sorting_and_rendering():
    chans = [_chan("slow", 1, 2, 0, sent=1, latency_max_ns=9_000_000, latency_count=1,
                   hist=[0] * 16 + [1] + [0] * 11),
             _chan("busy", 1, 2, 1, sent=500, sent_last_second=400),
             _chan("bad", 1, 2, 2, sent=3, refused_wouldblock=9)]
    services = [{"name": n, "kind": "name", "id": 1} for n in ("slow", "busy", "bad")]
    snap = _top.build([{"id": 1}, {"id": 2}], services, chans, socket="/k")
    order = {by: [r["name"] for r in _top.view_rows(snap, None, by)["services"]] for by in _top.SORTS}
    assert order == {"rate": ["busy", "bad", "slow"], "latency": ["slow", "busy", "bad"],
                     "refused": ["bad", "slow", "busy"], "name": ["bad", "busy", "slow"]}
    from rich.console import Console

    console = Console(width=200, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    with contextlib.closing(console.file):
        console.print(top.render_top(snap, _top.rates(None, snap), "latency", "/k"))
    screen = console.export_text()
    assert "slow" in screen and "SERVICES" in screen and "9ms" in screen


def test_prometheus_families_of_a_snapshot():
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    hist = [0] * _top.HIST_BUCKETS
    hist[0], hist[4], hist[-1] = 1, 2, 1
    chans = [_chan("a", 1, 2, 0, sent=3, calls=4, hist=hist, latency_sum_ns=20_000_000_000),
             _chan("a", 1, 2, 1, sent=2, drops_size=1)]
    snap = _top.build([{"id": 1}, {"id": 2}], [{"name": "a", "kind": "name", "id": 1}], chans)

    class Fixed:
        def collect(self):
            return _metrics.families(snap)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    sent = [s for s in fams["capbus_messages_sent"].samples if s.name == "capbus_messages_sent_total"]
    assert [(s.labels, s.value) for s in sent] == [({"service": "a", "server": "1", "client": "2"}, 5)]
    buckets = [s for s in fams["capbus_call_latency_seconds"].samples if s.name.endswith("_bucket")]
    assert buckets[0].value == 1 and buckets[4].value == 3 and buckets[-2].value == 3
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 4
    dropped = [s.value for s in fams["capbus_refused"].samples
               if s.labels["side"] == "receiver" and s.labels["reason"] == "size"]
    assert dropped == [1]
    assert fams["capbus_channels"].samples[0].value == 2
