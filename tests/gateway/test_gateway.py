"""Two kernels and two gateways on loopback (each gateway and service a process of its own):
remote calls keep the Endpoint API, only exports are visible, death in every phase reaches
on_death and pending calls within the lease, back-pressure crosses the link, a restarted gateway
is found again."""

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


def test_remote_call_keeps_the_endpoint_api(hosts):
    hosts.service("host-b", "kv")
    hosts.pair()
    pa = hosts.connect("host-a")
    ep = pa.lookup("kv@host-b", timeout=10)
    r = ep.call(1, (1, 2, 3, 4), b"hello", timeout=10)
    assert (r.opcode, r.data, r.payload) == (2, (1, 2, 3, 4), b"olleh")
    big = bytes(range(256)) * 4096  # 1 MiB: an arena view on both sides
    assert ep.call(1, (), big, timeout=10).payload == big[::-1]
    assert ep.call_object({"n": 21}, opcode=100, timeout=10).object() == {"twice": 42}
    with pytest.raises(capbus.RemoteError) as err:
        ep.call(4, (77,), timeout=10)
    assert err.value.code == 77
    ep.send_async(9, (1,))
    assert ep.send_many([(9, (2,)), (9, (3,), b"x")]) == 2

    async def acall():
        return await ep.acall(1, (5,), b"ab", timeout=10)

    assert asyncio.run(acall()).payload == b"ba"
    with ep.loan(200_000) as loan:  # a loaned payload: a view of the arena on the importer's side
        loan.buffer[:3] = b"abc"
        assert bytes(loan.call(1, timeout=10).payload[-3:]) == b"cba"
    deadline = time.monotonic() + 10
    while ep.call(6, timeout=10).data[0] < 3:
        assert time.monotonic() < deadline, "one-way messages did not all arrive"
        time.sleep(0.05)


def test_timeout_then_the_gateway_serves_on(hosts):
    hosts.service("host-b", "kv")
    hosts.pair()
    pa = hosts.connect("host-a")
    ep = pa.lookup("kv@host-b", timeout=10)
    t0 = time.monotonic()
    with pytest.raises(capbus.Timeout):
        ep.call(2, (1500,), timeout=0.3)
    assert time.monotonic() - t0 < 1.5  # the caller's own timeout, not the gateway's
    assert ep.call(1, (), b"ab", timeout=10).payload == b"ba"  # the late reply was dropped


def test_only_exports_are_visible(hosts):
    hosts.service("host-b", "kv")
    hosts.service("host-b", "secret")
    hosts.service("host-b", "camera/front")
    hosts.pair(export=["kv", "camera/*"])
    pa = hosts.connect("host-a")
    assert pa.lookup("camera/front@host-b", timeout=10).call(1, timeout=10).opcode == 2
    pa.lookup("kv@host-b", timeout=10)
    with pytest.raises(capbus.ServiceNotFound):
        pa.lookup("secret@host-b", timeout=1.5)


def test_remote_caller_is_told_apart(hosts):
    hosts.service("host-b", "kv")
    hosts.pair()
    pa1, pa2 = hosts.connect("host-a"), hosts.connect("host-a")
    s1 = pa1.lookup("kv@host-b", timeout=10).call(7, timeout=10).data[0]
    s2 = pa2.lookup("kv@host-b", timeout=10).call(7, timeout=10).data[0]
    assert s1 != s2  # one local stand-in per remote origin
    pb = hosts.connect("host-b")
    o1 = capbus.Gateway.origin(pb, s1, "host-b")
    assert o1 == {"gateway": "host-b", "host": "host-a", "process": pa1.id}
    assert capbus.Gateway.origin(pb, s2, "host-b")["process"] == pa2.id
    with pytest.raises(capbus.ProcessNotFound):
        capbus.Gateway.origin(pb, pb.id, "host-b")


def _pending_call(ep, **kw):
    got: list[BaseException | object] = []

    def run():
        try:
            got.append(ep.call(**kw))
        except BaseException as exc:  # noqa: BLE001 - the test looks at what came
            got.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, got


def test_service_dies_mid_call(hosts):
    svc = hosts.service("host-b", "kv")
    hosts.pair()
    pa = hosts.connect("host-a")
    ep = pa.lookup("kv@host-b", timeout=10)
    died = threading.Event()
    ep.on_death(lambda _e: died.set())
    slow, got = _pending_call(ep, opcode=2, data=(60_000,), timeout=30)
    time.sleep(0.5)
    svc.kill()  # mid-call: the service is inside the call
    slow.join(timeout=10)
    assert got and isinstance(got[0], capbus.PeerDied | capbus.InvalidCapability), got
    assert died.wait(10), "on_death did not come"
    with pytest.raises(capbus.ServiceNotFound):
        pa.lookup("kv@host-b", timeout=0)


def test_gateway_killed_then_restarted(hosts):
    hosts.service("host-b", "kv")
    _a, b = hosts.pair()
    pa = hosts.connect("host-a")
    ep = pa.lookup("kv@host-b", timeout=10)
    died = threading.Event()
    ep.on_death(lambda _e: died.set())
    slow, got = _pending_call(ep, opcode=2, data=(2_000,), timeout=30)  # over before the restart
    time.sleep(0.3)
    t0 = time.monotonic()
    b.kill()
    assert died.wait(10), "on_death did not come after the exporting gateway was killed"
    slow.join(timeout=10)
    assert isinstance(got[0], capbus.PeerDied | capbus.InvalidCapability), got
    # within the lease (1 s here) and some slack for a loaded machine
    assert time.monotonic() - t0 < 8
    hosts.gateway("host-b", listen=[f"tcp/127.0.0.1:{hosts.port}"], export=["kv"])
    ep2 = pa.lookup("kv@host-b", timeout=15)
    assert ep2.call(1, (), b"ab", timeout=10).payload == b"ba"


def test_importing_gateway_stop_ends_its_names(hosts):
    hosts.service("host-b", "kv")
    a, _b = hosts.pair()
    pa = hosts.connect("host-a")
    ep = pa.lookup("kv@host-b", timeout=10)
    died = threading.Event()
    ep.on_death(lambda _e: died.set())
    a.close()
    assert died.wait(10)


def test_back_pressure_crosses_the_link(hosts):
    svc = hosts.service("host-b", "kv")
    hosts.pair(config={"send_timeout": 60})
    pa = hosts.connect("host-a")
    ep = pa.lookup("kv@host-b", timeout=10)
    ep.call(5, timeout=10)  # the service stops reading
    sent = 0
    with pytest.raises(capbus.WouldBlock):
        for _ in range(2_000_000):
            ep.send_async(9, (sent,), b"x" * 512)
            sent += 1
    assert 0 < sent < 2_000_000
    svc.kill()  # nothing was dropped silently: the exporter still held what it accepted
