"""Remote topics: a topic exported on host-b, subscribed on host-a as NAME@host-b. One network
copy per host (the exporter's puts are counted), samples in order and intact, only exports
visible, only a gateway may publish NAME@HOST, a revoked token stops the flow, the publisher's
death and the gateway's loss reach the subscribers as PeerDied, garbage on the samples' key
reaches nobody. The gateways run in this process (the test reads their counters and revokes)."""

from __future__ import annotations

import json
import os
import time

import pytest
from _gwutil import HERE, Child, free_port

import capbus

zenoh = pytest.importorskip("zenoh")

from capbus._gateway import wire  # noqa: E402

MIB = 1 << 20


@pytest.fixture
def world(sockdir):
    ka = capbus.Kernel(os.path.join(sockdir, "a.sock"), audit=False)
    kb = capbus.Kernel(os.path.join(sockdir, "b.sock"), audit=False)
    pb = capbus.connect(os.path.join(sockdir, "b.sock"))
    port, port_a = free_port(), free_port()
    gb = capbus.Gateway(os.path.join(sockdir, "b.sock"), name="host-b",
                        listen=[f"tcp/127.0.0.1:{port}"], export=["camera/*"], lease=1.0).start()
    ga = capbus.Gateway(os.path.join(sockdir, "a.sock"), name="host-a",
                        listen=[f"tcp/127.0.0.1:{port_a}"], connect=[f"tcp/127.0.0.1:{port}"],
                        lease=1.0).start()
    pa = capbus.connect(os.path.join(sockdir, "a.sock"))
    w = {"port": port, "port_a": port_a, "ga": ga, "gb": gb, "pa": pa, "pb": pb, "dir": sockdir,
         "children": []}
    yield w
    for c in w["children"]:
        c.close()
    for x in (pa, ga, gb, pb):
        x.close() if hasattr(x, "close") else x.stop()
    ka.stop()
    kb.stop()


def _flowing(pub: capbus.Publisher, subs: list[capbus.Subscriber]) -> None:
    """Publish probes (opcode 0) until every subscriber has one: the flow is up end to end."""
    deadline = time.monotonic() + 20
    waiting = list(subs)
    while waiting:
        assert time.monotonic() < deadline, "the remote topic never flowed"
        pub.publish(0, (), b"probe")
        for s in list(waiting):
            try:
                with s.recv(timeout=0.3) as got:
                    if got.opcode == 0:
                        waiting.remove(s)
            except capbus.Timeout:
                pass
    time.sleep(0.3)
    for s in subs:  # drain the probes still coming
        while (got := s.poll()) is not None:
            got.release()


def test_remote_topic_reaches_two_subscribers_with_one_network_copy(world):
    pub = world["pb"].publish("camera/front", max_size=MIB + 64)
    subs = [world["pa"].subscribe("camera/front@host-b", timeout=15) for _ in range(2)]
    _flowing(pub, subs)
    assert world["ga"].topic_imports() == ["camera/front@host-b"]
    puts = world["gb"].stats()["topic_puts"]
    for i in range(1, 13):
        body = os.urandom(64) * (MIB // 64) + i.to_bytes(8, "little")
        pub.publish(7, (i, i * 3), body)
        for s in subs:  # in order and intact, at each of them
            with s.recv(timeout=10) as got:
                assert (got.opcode, got.data[:2]) == (7, (i, i * 3))
                assert got.payload == body
    # twelve samples, two subscribers on host-a: twelve puts on host-b (one per host)
    assert world["gb"].stats()["topic_puts"] - puts == 12
    st = world["ga"].stats()
    assert (st["topic_imports"], st["topic_bad"]) == (1, 0)


def test_only_exported_topics_are_visible_and_only_gateways_publish_remote_names(world):
    world["pb"].publish("secret/plans")
    world["pb"].publish("camera/rear")
    world["pa"].subscribe("camera/rear@host-b", timeout=15).close()
    with pytest.raises(capbus.ServiceNotFound):
        world["pa"].subscribe("secret/plans@host-b", timeout=1.5)
    with pytest.raises(capbus.ServiceNotFound):
        world["pa"].subscribe("camera/none@host-b", timeout=0.5)
    # nobody but a gateway may stand in for a remote topic
    with pytest.raises(capbus.PermissionDenied):
        world["pa"].publish("camera/fake@host-c")
    with pytest.raises(capbus.PermissionDenied):
        world["pa"].publish("camera/fake@host-c", gateway=False)
    assert world["gb"].topic_exports() == ["camera/rear"]


def test_a_revoked_token_stops_the_flow(world):
    pub = world["pb"].publish("camera/front")
    sub = world["pa"].subscribe("camera/front@host-b", timeout=15)
    _flowing(pub, [sub])
    ids = [t["id"] for t in world["gb"].tokens() if t["holder"] == "host-a"]
    assert ids
    for i in ids:
        world["gb"].revoke(i)
    puts = world["gb"].stats()["topic_puts"]
    for _ in range(5):
        pub.publish(1, (), b"after")
    with pytest.raises((capbus.Timeout, capbus.PeerDied)):
        sub.recv(timeout=1.5)
    assert world["gb"].stats()["topic_puts"] == puts


def test_publisher_death_and_gateway_loss_reach_the_subscribers(world):
    child = Child([str(HERE / "_pub_child.py"), os.path.join(world["dir"], "b.sock"),
                   "camera/front", "1000"], graceful=False)
    world["children"].append(child)
    assert child.line().startswith("ready")
    subs = [world["pa"].subscribe("camera/front@host-b", timeout=15) for _ in range(2)]
    deadline = time.monotonic() + 20
    while True:  # until the flow is up
        assert child.p.stdin is not None
        child.p.stdin.write("10\n")
        child.p.stdin.flush()
        child.line()
        try:
            subs[0].recv(timeout=0.3).release()
            break
        except capbus.Timeout:
            assert time.monotonic() < deadline, "the remote topic never flowed"
    died = []
    for s in subs:
        s.on_death(died.append)
    child.kill()
    t0 = time.monotonic()
    for s in subs:
        with pytest.raises(capbus.PeerDied):
            while True:
                s.recv(timeout=10).release()
    assert time.monotonic() - t0 < 10
    # a new publisher there, then the exporting gateway lost: PeerDied again
    pub = world["pb"].publish("camera/front")
    sub = world["pa"].subscribe("camera/front@host-b", timeout=15)
    _flowing(pub, [sub])
    world["gb"].stop()
    with pytest.raises(capbus.PeerDied):
        while True:
            sub.recv(timeout=10).release()


def test_garbage_on_the_samples_key_reaches_nobody(world):
    pub = world["pb"].publish("camera/front", max_size=100)
    sub = world["pa"].subscribe("camera/front@host-b", timeout=15)
    _flowing(pub, [sub])
    c = zenoh.Config()  # a peer of both gateways (host-b's own samples reach host-a directly)
    c.insert_json5("mode", '"peer"')
    c.insert_json5("scouting/multicast/enabled", "false")
    c.insert_json5("connect/endpoints", json.dumps([f"tcp/127.0.0.1:{world['port']}",
                                                    f"tcp/127.0.0.1:{world['port_a']}"]))
    s = zenoh.open(c)
    try:
        lives = [str(r.ok.key_expr).rsplit("/", 1)[1]
                 for r in s.liveliness().get("capbus/gw/host-b/svc/*", timeout=5)
                 if r.ok is not None]
        assert lives
        rnd = os.urandom
        for live in lives:
            k = f"capbus/gw/host-b/t/host-a/{live}"
            s.put(k, rnd(50))  # no header
            s.put(k, rnd(50), attachment=rnd(7))  # a short one
            s.put(k, rnd(50), attachment=wire.SAMPLE.pack(1, 9, 0, 0, 0, 0))  # a replay
            s.put(k, rnd(500), attachment=wire.SAMPLE.pack(1 << 60, 9, 0, 0, 0, 0))  # too big
        time.sleep(0.5)
    finally:
        s.close()
    assert sub.poll() is None, "garbage reached a subscriber"
    assert world["ga"].stats()["topic_bad"] == 4 * len(lives)
    pub.publish(5, (), b"still")
    with sub.recv(timeout=10) as got:
        assert (got.opcode, bytes(got.payload)) == (5, b"still")
