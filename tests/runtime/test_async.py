"""The asynchronous mailbox (Tock) over the data plane: bounded, allowlisted, batched, asyncio."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time

import pytest
from conftest import readline, wait_for

import capbus

SENDER = """
import capbus, sys
k, n = int(sys.argv[1]), int(sys.argv[2])
p = capbus.connect()
ep = p.lookup("sink", timeout=10)
print("ready", flush=True)
sys.stdin.readline()                          # go
i = 0
while i < n:
    try:
        ep.send_async(1, data=(k, i))
        i += 1
    except capbus.WouldBlock:
        pass                                  # back-pressure: try again
print("sent", i, flush=True)
"""


def test_four_senders_20000_each_complete_and_in_order(kernel, children):
    n = 20_000
    with capbus.connect(kernel.socket_path) as me:
        svc = me.register("sink")
        senders = [children.start(SENDER, str(k), str(n), stdin=subprocess.PIPE) for k in range(4)]
        for s in senders:
            assert readline(s) == "ready"
        for s in senders:
            s.stdin.write("go\n")
            s.stdin.flush()
        seen = {k: 0 for k in range(4)}
        ids = {}
        deadline = time.monotonic() + 60
        while sum(seen.values()) < 4 * n and time.monotonic() < deadline:
            for req in svc.recv_many(256, timeout=1):
                k, i = req.data[0], req.data[1]
                assert not req.expects_reply
                assert i == seen[k], f"sender {k}: got {i}, expected {seen[k]}"
                seen[k] += 1
                assert ids.setdefault(k, req.sender) == req.sender  # kernel-verified, stable
        assert seen == {k: n for k in range(4)}
        assert len(set(ids.values())) == 4
        for s in senders:
            assert readline(s, 30) == f"sent {n}"


def test_full_ring_drains_to_exactly_what_was_accepted(kernel):
    with capbus.connect(kernel.socket_path) as rx, capbus.connect(kernel.socket_path) as tx:
        svc = rx.register("sink")
        ep = tx.lookup("sink")
        accepted = refused = 0
        while refused < 10:
            try:
                ep.send_async(2, data=(accepted,))
                accepted += 1
            except capbus.WouldBlock:
                refused += 1
        assert accepted > 0
        got = []
        while True:
            batch = svc.recv_many(1000, timeout=0.2)
            if not batch:
                break
            got.extend(r.data[0] for r in batch)
        assert got == list(range(accepted))  # nothing lost, nothing extra, in order
        assert svc.refused(tx.id) >= 10  # the sender's "exceeded" counter, seen by the receiver
        assert svc.poll() is None


def test_send_many_reports_what_was_accepted(kernel):
    with capbus.connect(kernel.socket_path) as rx, capbus.connect(kernel.socket_path) as tx:
        svc = rx.register("sink")
        ep = tx.lookup("sink")
        total = 0
        while True:
            n = ep.send_many([(3, (total + i,)) for i in range(100)])
            total += n
            if n < 100:
                break
        got = []
        while len(got) < total:
            got += [r.data[0] for r in svc.recv_many(512, timeout=2)]
        assert got == list(range(total))


def test_calls_and_async_share_a_service(kernel):
    with capbus.connect(kernel.socket_path) as rx, capbus.connect(kernel.socket_path) as tx:
        svc = rx.register("both")
        ep = tx.lookup("both")
        ep.send_async(1, data=(10,))
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("r", ep.call(2, data=(20,), timeout=5)))
        t.start()
        first = svc.recv(timeout=5)
        second = svc.recv(timeout=5)
        assert (first.opcode, first.expects_reply) == (1, False)
        assert (second.opcode, second.expects_reply) == (2, True)
        with pytest.raises(capbus.IpcError, match="no reply"):
            first.reply(0)
        second.reply(7, (1,))
        t.join(5)
        assert result["r"].opcode == 7


def test_recv_many_is_fair_across_senders(kernel):
    with capbus.connect(kernel.socket_path) as rx:
        svc = rx.register("fair")
        txs = [capbus.connect(kernel.socket_path) for _ in range(3)]
        for tx in txs:
            ep = tx.lookup("fair")
            for i in range(50):
                ep.send_async(1, data=(i,))
        # The server maps each channel on its control thread: wait until it has all three.
        assert wait_for(lambda: len(svc._set) == 3, 5)
        batch = svc.recv_many(30, timeout=2)
        counts = {}
        for r in batch:
            counts[r.sender] = counts.get(r.sender, 0) + 1
        assert sorted(counts.values()) == [10, 10, 10]
        for tx in txs:
            tx.close()


def test_allowlist(sockdir):
    # "name:friend" admits the server of "friend" only because the policy says who may
    # register it (tests/kernel/test_grants.py: a squatter of an unreserved name is not admitted)
    policy = capbus.Policy.from_mapping({"register": [{"name": "friend", "uids": [os.getuid()]}]})
    with capbus.Kernel(os.path.join(sockdir, "k.sock"), policy, audit=False) as kernel, \
            capbus.connect(kernel.socket_path) as rx, capbus.connect(kernel.socket_path) as ok, \
            capbus.connect(kernel.socket_path) as other, capbus.connect(kernel.socket_path) as named:
        named.register("friend")
        svc = rx.register("inbox", allow=[ok.id, "name:friend"])
        ep = ok.lookup("inbox")
        ep.send_async(1)
        named.lookup("inbox").send_async(2)
        with pytest.raises(capbus.PermissionDenied, match="allowlist"):
            other.lookup("inbox")  # refused at lookup: nothing can reach the receiver
        assert sorted(r.opcode for r in svc.recv_many(10, timeout=1)) == [1, 2]
        svc.deny(ok.id)  # applies to the live channel at once
        with pytest.raises(capbus.IpcError):
            ep.send_async(3)
        with pytest.raises(capbus.PermissionDenied):
            ok.lookup("inbox")
        svc.allow(other.id)
        other.lookup("inbox").send_async(4)
        assert [r.opcode for r in svc.recv_many(10, timeout=1)] == [4]
        with pytest.raises(ValueError, match="allowlist entry"):
            rx.register("bad", allow=["someone"])


def test_asyncio_receive_with_timeouts_and_acall(kernel):
    async def main():
        with capbus.connect(kernel.socket_path) as rx, capbus.connect(kernel.socket_path) as tx:
            svc = rx.register("aio")
            ep = tx.lookup("aio")
            with pytest.raises(capbus.Timeout):
                await svc.arecv(timeout=0.05)
            loop = asyncio.get_running_loop()
            loop.call_later(0.05, lambda: ep.send_async(5, data=(1,)))
            req = await svc.arecv(timeout=5)
            assert req.opcode == 5
            for i in range(3):
                ep.send_async(6, data=(i,))
            got = []
            async for req in svc:
                got.append(req.data[0])
                if len(got) == 3:
                    break
            assert got == [0, 1, 2]

            async def serve_one():
                req = await svc.arecv(timeout=5)
                req.reply(req.opcode + 1, req.data)

            server = asyncio.ensure_future(serve_one())
            reply = await tx.lookup("aio").acall(41, data=(9,), timeout=5)
            await server
            assert reply.opcode == 42 and reply.data[0] == 9
            with pytest.raises(capbus.Timeout):
                await ep.acall(1, timeout=0.05)  # nobody answers

    asyncio.run(asyncio.wait_for(main(), 30))


def test_receiver_death_reaches_sender(kernel, children):
    rx = children.start("""
        import capbus, time
        p = capbus.connect()
        p.register("doomed")
        print("ready", flush=True)
        time.sleep(60)
    """, stdin=subprocess.DEVNULL)
    assert readline(rx) == "ready"
    with capbus.connect(kernel.socket_path) as tx:
        ep = tx.lookup("doomed")
        ep.send_async(1)
        rx.kill()
        rx.wait(5)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                ep.send_async(1)
            except capbus.PeerDied:
                break
            except capbus.WouldBlock:
                pass
            time.sleep(0.01)
        else:
            pytest.fail("send_async to a dead receiver did not raise PeerDied")


def test_sender_death_delivers_then_frees_its_channel(kernel, children):
    with capbus.connect(kernel.socket_path) as rx:
        svc = rx.register("sink")
        tx = children.start("""
            import capbus, os
            p = capbus.connect()
            ep = p.lookup("sink")
            for i in range(100):
                ep.send_async(1, data=(i,))
            print("sent", flush=True)
            os._exit(0)
        """, stdin=subprocess.DEVNULL)
        assert readline(tx) == "sent"
        tx.wait(5)
        time.sleep(0.2)  # the kernel has seen it die and closed its channel
        got = []
        while True:
            batch = svc.recv_many(64, timeout=0.3)
            if not batch:
                break
            got += [r.data[0] for r in batch]
        assert got == list(range(100))  # what it sent before dying is not lost
        assert kernel.services()[0]["clients"] == 0  # and its channel is gone
