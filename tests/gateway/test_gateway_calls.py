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
