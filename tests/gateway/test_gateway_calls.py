"""Remote calls and their callers' time: a caller that stops waiting (its timeout, its task
cancelled) cancels the call on the exporting host too (the service skips it if it has not
taken it), and slow calls to one service never hold up calls to another (the exporter's calls
are acall tasks, not a few blocked workers). Gateways and services are processes of their own."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from _gwutil import Hosts

import capbus

pytest.importorskip("zenoh")


@pytest.fixture
def hosts():
    h = Hosts()
    yield h
    h.close()


def _busy(ep: capbus.Endpoint, ms: int, timeout: float, out: list[object]) -> threading.Thread:
    def run() -> None:
        try:
            out.append(ep.call(2, (ms,), timeout=timeout).opcode)
        except capbus.IpcError as exc:
            out.append(type(exc))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _gateways_here(hosts: Hosts, export: list[str]) -> tuple[capbus.Gateway, capbus.Gateway]:
    """host-b's gateway exporting `export` and host-a's, in this process (their counters can be
    read), as (exporter, importer)."""
    gb = capbus.Gateway(hosts.sock["host-b"], name="host-b", lease=1.0, export=export,
                        listen=[f"tcp/127.0.0.1:{hosts.port}"]).start()
    ga = capbus.Gateway(hosts.sock["host-a"], name="host-a", lease=1.0,
                        connect=[f"tcp/127.0.0.1:{hosts.port}"]).start()
    return gb, ga


def _settled(gw: capbus.Gateway) -> dict[str, int]:
    """gw.stats() once no call is in flight (a call's task ends just after its reply is sent),
    or after 5 s."""
    deadline = time.monotonic() + 5
    while (st := gw.stats())["calls"] and time.monotonic() < deadline:
        time.sleep(0.01)
    return st


def test_a_callers_timeout_cancels_the_remote_call(hosts):
    hosts.service("host-b", "kv")
    hosts.pair()
    ep = hosts.connect("host-a").lookup("kv@host-b", timeout=10)
    ep2 = hosts.connect("host-a").lookup("kv@host-b", timeout=10)
    out: list[object] = []
    first = _busy(ep, 1500, 10, out)  # holds the (one-threaded) service for 1.5 s
    time.sleep(0.3)
    t0 = time.monotonic()
    with pytest.raises(capbus.Timeout):
        ep2.call(2, (1,), timeout=0.3)  # queued behind it there; its caller gives up
    assert time.monotonic() - t0 < 1.5
    first.join(timeout=10)
    assert out == [3]
    time.sleep(0.5)  # had the cancel not reached host-b, the service would serve it by now
    assert ep.call(8, timeout=10).data[0] == 1, "the cancelled call still reached the service"


def test_a_cancelled_task_cancels_the_remote_call(hosts):
    hosts.service("host-b", "kv")
    hosts.pair()
    ep = hosts.connect("host-a").lookup("kv@host-b", timeout=10)
    out: list[object] = []
    first = _busy(ep, 1500, 10, out)
    time.sleep(0.3)

    async def give_up() -> None:
        task = asyncio.ensure_future(ep.acall(2, (1,), timeout=30))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(give_up())
    first.join(timeout=10)
    time.sleep(0.5)
    assert ep.call(8, timeout=10).data[0] == 1, "the cancelled call still reached the service"


def test_slow_services_do_not_stall_the_others(hosts):
    hosts.service("host-b", "kv")
    hosts.service("host-b", "slow")
    hosts.pair(export=["kv", "slow"])
    pa = hosts.connect("host-a")
    slow = pa.lookup("slow@host-b", timeout=10)
    kv = pa.lookup("kv@host-b", timeout=10)
    out: list[object] = []
    # more slow calls than the exporter has workers (4): each waits on the one-threaded service
    threads = [_busy(slow, 2500, 4.5, out) for _ in range(6)]
    time.sleep(0.5)
    t0 = time.monotonic()
    for _ in range(5):  # four blocked workers would hold these 2 s, past their timeout
        assert kv.call(1, (), b"ab", timeout=1.5).payload == b"ba"
    assert time.monotonic() - t0 < 1.5, "calls to kv waited behind the slow service"
    for t in threads:
        t.join(timeout=10)
    assert out.count(3) >= 1 and set(out) <= {3, capbus.Timeout}
    # the timed-out ones were cancelled there: the service served at most the ones in time
    time.sleep(0.5)
    assert slow.call(8, timeout=10).data[0] <= out.count(3) + 1


def test_the_fast_path_answers_and_a_slow_service_leaves_it(hosts):
    """The exporter answers a quick call on Zenoh's thread (fast_calls); a call whose reply
    takes longer than FAST_WAIT goes on as a task (handed_calls), and that service's calls are
    not waited for there for SLOW_HOLD: with six slow calls in flight, a quick service's calls
    answer at once; afterwards the service's quick calls take the fast path again. The gateways
    run in this process here (their counters are read)."""
    from capbus._gateway import export

    hosts.service("host-b", "kv")
    hosts.service("host-b", "slow")
    gb, ga = _gateways_here(hosts, ["kv", "slow"])
    try:
        pa = hosts.connect("host-a")
        kv = pa.lookup("kv@host-b", timeout=10)
        slow = pa.lookup("slow@host-b", timeout=10)
        for i in range(30):
            assert kv.call(1, (i,), b"ab", timeout=5).payload == b"ba"
            assert slow.call(1, (i,), b"cd", timeout=5).payload == b"dc"
        st = gb.stats()
        # each service's first call opens its endpoint (through the loop); most of the rest
        # find an idle pooled lane (a few may not, while the loop is giving one back), and all
        # but a few answer within FAST_WAIT (a busy machine may preempt one for longer)
        handed = st["handed_calls"]
        assert st["fast_calls"] >= 40 and handed <= 2, st
        # large payloads are not copied on Zenoh's thread: a large call goes to the loop, a
        # large reply of the fast path is sent from the loop; both arrive whole
        big = bytes(range(256)) * 1024
        assert kv.call(1, (), big, timeout=5).payload == big[::-1]
        assert kv.call(9, (300_000,), timeout=5).payload == b"r" * 300_000
        assert gb.stats()["fast_calls"] == st["fast_calls"] + 1
        out: list[object] = []
        t0 = time.monotonic()
        assert slow.call(2, (300,), timeout=5).opcode == 3  # started there, awaited by the loop
        assert time.monotonic() - t0 >= 0.3
        assert gb.stats()["handed_calls"] == handed + 1
        threads = [_busy(slow, 400, 5, out) for _ in range(6)]
        time.sleep(0.2)
        t0 = time.monotonic()
        for _ in range(10):
            assert kv.call(1, (), b"xy", timeout=2).payload == b"yx"
        assert time.monotonic() - t0 < 1.0, "quick calls waited behind the slow service"
        for t in threads:
            t.join(timeout=10)
        assert out == [3] * 6
        st = _settled(gb)
        assert st["calls"] == 0 and st["refused"] == 0, st
        time.sleep(export.SLOW_HOLD)  # then its quick calls are waited for there again
        fast = st["fast_calls"]
        for _ in range(10):
            assert slow.call(1, (), b"ab", timeout=5).payload == b"ba"
        assert gb.stats()["fast_calls"] >= fast + 5
    finally:
        ga.stop()
        gb.stop()


def test_zenohs_thread_stops_waiting_when_waits_fill_its_time():
    """The fast path's guard: while waits for local replies take more than FAST_DUTY of Zenoh's
    thread over a window (queries piling up behind them: many callers, a many-threaded
    service), no call is waited for there for SLOW_HOLD; waits that leave it mostly free do
    not trip it."""
    from types import SimpleNamespace

    from capbus._gateway import export

    ex = SimpleNamespace(_window=(100.0, 0.0), _busy_until=0.0)
    t = 100.0
    for _ in range(40):  # 30 us waits every 250 us: 12% of the time
        export.Exporter._waited(ex, t, t + 30e-6)  # type: ignore[arg-type]
        t += 250e-6
    t += export.FAST_WINDOW
    export.Exporter._waited(ex, t, t + 30e-6)  # type: ignore[arg-type]
    assert ex._busy_until == 0.0
    for _ in range(400):  # 400 us waits every 500 us: 80%
        export.Exporter._waited(ex, t, t + 400e-6)  # type: ignore[arg-type]
        t += 500e-6
    assert t < ex._busy_until <= t + export.SLOW_HOLD


def test_zenoh_threads_keep_their_python_state():
    """keep_state: a Zenoh thread's Python state outlives the callback (pyo3 would make and free
    one per callback): thread-local data set in one callback is there in the next."""
    import json

    from _gwutil import free_port

    from capbus._gateway.threads import keep_state

    zenoh = pytest.importorskip("zenoh")
    port = free_port()
    sessions = []
    for side in ("listen", "connect"):
        c = zenoh.Config()
        c.insert_json5("mode", '"peer"')
        c.insert_json5("scouting/multicast/enabled", "false")
        c.insert_json5("transport/shared_memory/enabled", "false")
        c.insert_json5(f"{side}/endpoints", json.dumps([f"tcp/127.0.0.1:{port}"]))
        sessions.append(zenoh.open(c))
    local = threading.local()
    counts: list[int] = []

    def on_query(q) -> None:
        keep_state()
        local.n = getattr(local, "n", 0) + 1
        counts.append(local.n)
        q.reply(q.key_expr, b"")

    try:
        qa = sessions[0].declare_queryable(
            "t/q", zenoh.handlers.Callback(on_query, indirect=False))
        deadline = time.monotonic() + 10
        while len(counts) < 20 and time.monotonic() < deadline:
            for r in sessions[1].get("t/q", timeout=2.0):
                r.ok  # noqa: B018
        assert len(counts) >= 20
        assert max(counts) > 1, "each callback ran in a fresh Python thread state"
        qa.undeclare()
    finally:
        for s in sessions:
            s.close()


def test_a_late_reply_holds_its_service_off_the_fast_path_briefly_then_longer():
    """_missed: a service that missed FAST_WAIT once is not waited for during SLOW_MIN; each
    miss right after a hold doubles it, up to SLOW_HOLD; a miss long after starts over."""
    from types import SimpleNamespace

    from capbus._gateway import export

    ex = SimpleNamespace(_slow={})
    now = 50.0
    holds = []
    for _ in range(12):  # slow for good: every call after a hold misses again
        export.Exporter._missed(ex, "s", now, ex._slow.get("s"))  # type: ignore[arg-type]
        until, hold = ex._slow["s"]
        assert until == now + hold
        holds.append(hold)
        now = until + 0.001
    assert holds[0] == export.SLOW_MIN and holds[1] == 2 * export.SLOW_MIN
    assert holds[-1] == export.SLOW_HOLD and sorted(holds) == holds
    now += 10 * export.SLOW_HOLD  # a rare late reply much later: a short hold again
    export.Exporter._missed(ex, "s", now, ex._slow.get("s"))  # type: ignore[arg-type]
    assert ex._slow["s"][1] == export.SLOW_MIN


@pytest.mark.parametrize("phase", ["fast wait", "handed"])
def test_a_service_dying_in_the_fast_path_fails_only_its_callers(hosts, phase):
    """The service dies while Zenoh's thread waits for its reply (it exits on the call), or
    after the call was handed to the loop (it sleeps, then is killed): its caller gets an error
    at once, not at its timeout; the gateway serves another service on, on the fast path."""
    victim = hosts.service("host-b", "victim")
    hosts.service("host-b", "kv")
    gb, ga = _gateways_here(hosts, ["victim", "kv"])
    try:
        pa = hosts.connect("host-a")
        v = pa.lookup("victim@host-b", timeout=10)
        kv = pa.lookup("kv@host-b", timeout=10)
        for _ in range(5):
            assert v.call(1, (), b"ab", timeout=5).payload == b"ba"
            assert kv.call(1, (), b"ab", timeout=5).payload == b"ba"
        fast = gb.stats()["fast_calls"]
        assert fast >= 6
        t0 = time.monotonic()
        if phase == "fast wait":
            with pytest.raises(capbus.IpcError) as err:
                v.call(3, timeout=20)  # the service exits on it, without a reply
        else:
            threading.Timer(0.5, victim.kill).start()
            with pytest.raises(capbus.IpcError) as err:
                v.call(2, (60_000,), timeout=20)
            assert gb.stats()["handed_calls"] >= 1
        assert not isinstance(err.value, capbus.Timeout) and time.monotonic() - t0 < 10
        for _ in range(10):
            assert kv.call(1, (), b"xy", timeout=5).payload == b"yx"
        st = _settled(gb)
        assert st["fast_calls"] >= fast + 8 and st["calls"] == 0, st
    finally:
        ga.stop()
        gb.stop()
