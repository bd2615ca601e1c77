"""The Tock IPC scenarios: a ring of three services, and a server restarting under a new id."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import readline

import capbus

RING_MEMBER = """
import capbus, sys
i = int(sys.argv[1])
p = capbus.connect(wait="block")
svc = p.register(f"ring-{i}")
nxt = p.lookup(f"ring-{(i + 1) % 3}", timeout=10)
done = p.lookup("ring-result", timeout=10)
print("ready", flush=True)
while True:
    req = svc.recv(timeout=30)
    value, hops = req.data[0], req.data[1]
    req.reply(0)                               # ack first: then forwarding cannot deadlock
    if hops == 0:
        done.call(1, data=(value, i), timeout=5)
    else:
        nxt.call(1, data=(value + 1, hops - 1, i), timeout=5)
"""


def test_ring_of_three_services_thirty_hops(kernel, children):
    with capbus.connect(kernel.socket_path) as me:
        result = me.register("ring-result")
        members = [children.start(RING_MEMBER, str(i), stdin=subprocess.DEVNULL) for i in range(3)]
        for m in members:
            assert readline(m, 20) == "ready"
        me.lookup("ring-0").call(1, data=(0, 30), timeout=5)  # S0 -> S1 -> S2 -> S0 ...
        final = result.recv(timeout=20)
        final.reply(0)
        value, last = final.data[0], final.data[1]
        assert value == 30  # incremented on each of the thirty hops
        assert last == 30 % 3  # and it ended where thirty hops from S0 end


SERVER = """
import capbus
p = capbus.connect()
svc = p.register("flaky")
def handler(req):
    if req.opcode == 13:
        raise SystemExit(1)                    # crash: the kernel restarts us (on-failure)
    return (0, (p.id, 0, 0, 0))
svc.serve(handler)
"""


def test_server_restart_under_new_id(kernel):
    child = kernel.spawn([sys.executable, "-c", SERVER], restart="on-failure", max_restarts=2)
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("flaky", timeout=20)
        first_id = ep.call(1, timeout=5).data[0]
        assert first_id == ep.process_id == child.process_id
        # The crash unwinds the handler's frame first: the request it held is dropped unanswered
        # (NoReply) just before the process exits (PeerDied); the caller hears one of them at once.
        with pytest.raises((capbus.PeerDied, capbus.NoReply)):
            ep.call(13, timeout=5)
        # The client rediscovers the restarted server and goes on.
        ep2 = me.lookup("flaky", timeout=20)
        while ep2.process_id == first_id:  # the old registration may still be visible briefly
            ep2 = me.lookup("flaky", timeout=20)
        assert ep2.call(1, timeout=5).data[0] == ep2.process_id != first_id
        with pytest.raises(capbus.PeerDied):
            ep.call(1, timeout=5)  # the old endpoint stays dead
    child.kill()
    child.wait(10)
