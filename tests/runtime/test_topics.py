"""Topics (publish/subscribe): ordering, completeness, drop counts, block mode, big samples,
views past release, deaths on both sides, allowlists, history, asyncio, names, counters.
Real processes and a real embedded kernel throughout."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import zlib

import pytest
from conftest import readline, wait_for

import capbus
from capbus._protocol import frames


def test_order_and_completeness_per_subscriber(kernel, children):
    pub_proc = capbus.connect(kernel.socket_path)
    pub = pub_proc.publish("ticks", max_size=64, max_subscribers=4, max_depth=512)
    code = """
        import capbus
        proc = capbus.connect()
        sub = proc.subscribe("ticks", timeout=10)
        print("ready", flush=True)
        last = 0
        for _ in range(300):
            s = sub.recv(10)
            assert s.seq == last + 1, (s.seq, last)
            assert bytes(s.payload) == s.seq.to_bytes(8, "little") * 2, s.seq
            assert s.opcode == s.seq % 7 and s.data == (s.seq, 0, 0, 0) and s.dropped == 0
            assert s.publisher == int(__import__("sys").argv[1])
            last = s.seq
            s.release()
        print("ok", last, sub.dropped, flush=True)
    """
    kids = [children.start(code, str(pub_proc.id)) for _ in range(3)]
    for k in kids:
        assert readline(k) == "ready"
    assert wait_for(lambda: pub.subscribers == 3)
    for i in range(1, 301):
        assert pub.publish(opcode=i % 7, data=(i,), payload=i.to_bytes(8, "little") * 2) == i
    for k in kids:
        assert readline(k, 20) == "ok 300 0"
    pub.close()


def test_drop_oldest_counts_exactly_and_nobody_waits(kernel):
    a = capbus.connect(kernel.socket_path)
    b = capbus.connect(kernel.socket_path)
    pub = a.publish("d", max_size=16, max_depth=32)
    slow = b.subscribe("d", depth=4)
    fast = b.subscribe("d", depth=32)
    assert wait_for(lambda: pub.subscribers == 2)  # the publisher hears of them a little later
    for i in range(1, 21):  # the slow one reads nothing: the publisher never waits
        pub.publish(payload=bytes([i]))
    first = slow.recv(1)
    assert (first.seq, first.dropped, bytes(first.payload)) == (17, 16, bytes([17]))
    rest = [slow.recv(1) for _ in range(3)]
    assert [s.seq for s in rest] == [18, 19, 20] and all(s.dropped == 0 for s in rest)
    assert slow.dropped == 16 and slow.poll() is None
    got = []
    for _ in range(20):  # the other lost nothing
        with fast.recv(1) as s:
            got.append(s.seq)
    assert got == list(range(1, 21)) and fast.dropped == 0
    for s in [first, *rest]:
        s.release()
    # Lapped again while holding nothing: counted again
    for _ in range(10):
        pub.publish(payload=b"x")
    s = slow.recv(1)
    assert (s.seq, s.dropped) == (27, 6) and slow.dropped == 22
    s.release()
    rows = [r for r in a.query("topics") if r["topic"] == "d"]
    assert {r["subscriber"] for r in rows} == {b.id}
    assert max(r["dropped"] for r in rows) == 22
    assert rows[0]["published"] == 30
    pub.close()


def test_a_subscriber_holds_at_most_max_held(kernel):
    a = capbus.connect(kernel.socket_path)
    b = capbus.connect(kernel.socket_path)
    pub = a.publish("held", max_size=8, max_depth=16, max_held=8)
    sub = b.subscribe("held")
    assert wait_for(lambda: pub.subscribers == 1)
    for i in range(12):
        pub.publish(payload=bytes([i]))
    held = [sub.recv(1) for _ in range(8)]
    with pytest.raises(capbus.OutOfMemory, match="max_held"):
        sub.recv(1)
    held.pop(0).release()
    assert sub.recv(1).seq == 9
    pub.close()


def test_block_mode_wouldblock_and_wait_for_room(kernel):
    a = capbus.connect(kernel.socket_path)
    b = capbus.connect(kernel.socket_path)
    pub = a.publish("blk", max_size=8, overflow="block", max_depth=2)
    sub = b.subscribe("blk")
    assert wait_for(lambda: pub.subscribers == 1)
    pub.publish(payload=b"1")
    pub.publish(payload=b"2")
    with pytest.raises(capbus.WouldBlock):
        pub.publish(payload=b"3")
    t0 = time.monotonic()
    with pytest.raises(capbus.WouldBlock):
        pub.publish(payload=b"3", timeout=0.2)
    assert time.monotonic() - t0 >= 0.19

    def reader() -> None:
        time.sleep(0.2)
        sub.recv(1).release()

    t = threading.Thread(target=reader)
    t.start()
    assert pub.publish(payload=b"3", timeout=5) == 3
    t.join(5)
    got = [bytes(sub.recv(1).payload) for _ in range(2)]
    assert got == [b"2", b"3"] and sub.dropped == 0
    pub.close()


def test_4mib_loaned_samples_at_several_subscribers(kernel, children):
    a = capbus.connect(kernel.socket_path)
    size = 4 << 20
    pub = a.publish("big", max_size=size, max_subscribers=3, max_depth=2, max_held=1,
                    overflow="block")
    code = """
        import capbus, zlib
        proc = capbus.connect()
        sub = proc.subscribe("big", timeout=10)
        print("ready", flush=True)
        for _ in range(6):
            with sub.recv(20) as s:
                assert len(s.payload) == 4 << 20
                assert s.payload.readonly
                assert zlib.crc32(s.payload) == s.data[0], s.seq
        print("ok", flush=True)
    """
    kids = [children.start(code) for _ in range(3)]
    for k in kids:
        assert readline(k) == "ready"
    assert wait_for(lambda: pub.subscribers == 3)
    for i in range(6):
        with pub.loan(size) as loan:
            chunk = os.urandom(4096)
            loan.buffer[:] = chunk * (size // 4096)
            loan.buffer[i] = i  # every sample differs
            crc = zlib.crc32(loan.buffer)
            loan.publish(data=(crc,), timeout=20)
    for k in kids:
        assert readline(k, 30) == "ok"
    pub.close()


def test_views_outlive_release_and_pin_their_slot(kernel):
    a = capbus.connect(kernel.socket_path)
    b = capbus.connect(kernel.socket_path)
    pub = a.publish("v", max_size=32, max_subscribers=1, max_depth=1, max_held=2)
    sub = b.subscribe("v")
    assert wait_for(lambda: pub.subscribers == 1)
    pub.publish(payload=b"A" * 32)
    s = sub.recv(1)
    view = s.payload[4:12]
    s.release()
    with pytest.raises(capbus.InvalidCapability):
        s.payload  # noqa: B018 - the sample itself is released
    for i in range(40):  # many times round the small pool: the viewed slot is never reused
        pub.publish(payload=bytes([i]) * 32)
        with sub.recv(1) as t:
            assert bytes(t.payload) == bytes([i]) * 32
    assert bytes(view) == b"A" * 8
    with pytest.raises(TypeError):
        view[0] = 1  # read-only: subscribers cannot write the publisher's memory
    del view
    pub.close()


def test_publisher_death_reaches_subscribers(kernel, children):
    b = capbus.connect(kernel.socket_path)
    shm_before = set(os.listdir("/dev/shm"))
    p = children.start("""
        import capbus, os, sys, time
        proc = capbus.connect()
        pub = proc.publish("dying", max_size=8, history=3)
        for i in range(3):
            pub.publish(payload=bytes([i]))
        print("ready", flush=True)
        sys.stdin.readline()
        while pub.subscribers < 1:  # it has put its history into the subscriber's ring
            time.sleep(0.001)
        os._exit(0)
    """, stdin=__import__("subprocess").PIPE)
    assert readline(p) == "ready"
    sub = b.subscribe("dying", timeout=5)
    died = threading.Event()
    sub.on_death(lambda s: died.set())
    p.stdin.write("go\n")
    p.stdin.flush()
    assert died.wait(5)
    got = [bytes(sub.recv(1).payload) for _ in range(3)]  # what it published stays readable
    assert got == [b"\x00", b"\x01", b"\x02"]
    with pytest.raises(capbus.PeerDied):
        sub.recv(1)
    late = threading.Event()
    sub.on_death(lambda s: late.set())
    assert late.is_set()
    with pytest.raises(capbus.ServiceNotFound):
        b.subscribe("dying")
    assert set(os.listdir("/dev/shm")) == shm_before


def test_subscriber_death_frees_its_slots(kernel, children):
    a = capbus.connect(kernel.socket_path)
    pub = a.publish("s", max_size=8, max_depth=4, max_held=4)
    p = children.start("""
        import capbus, time
        proc = capbus.connect()
        sub = proc.subscribe("s", timeout=10)
        print("ready", flush=True)
        held = [sub.recv(10) for _ in range(3)]
        print("holding", flush=True)
        time.sleep(60)
    """)
    assert readline(p) == "ready"
    assert wait_for(lambda: pub.subscribers == 1)
    for i in range(3):
        pub.publish(payload=bytes([i]))
    assert readline(p) == "holding"
    p.kill()
    p.wait(5)
    assert wait_for(lambda: pub.subscribers == 0)
    with pub._lock:
        assert pub._core.refs() == 0  # every slot is free again
    pub.close()


def test_allowlist_and_names(kernel):
    a = capbus.connect(kernel.socket_path)
    b = capbus.connect(kernel.socket_path)
    c = capbus.connect(kernel.socket_path)
    pub = a.publish("only-b", max_size=8, allow=[b.id])
    b.subscribe("only-b").close()
    with pytest.raises(capbus.PermissionDenied):
        c.subscribe("only-b")
    with pytest.raises(capbus.NameTaken):
        c.publish("only-b", max_size=8)
    with pytest.raises(capbus.ServiceNotFound):
        c.subscribe("nobody")
    with pytest.raises(ValueError):
        b.subscribe("only-b", depth=10_000)  # deeper than the topic allows
    # timeout>0 waits for the name to be published
    threading.Timer(0.2, lambda: a.publish("later", max_size=8)).start()
    sub = c.subscribe("later", timeout=5)
    assert sub.publisher == a.id
    pub.close()


def test_history_for_late_subscribers(kernel):
    a = capbus.connect(kernel.socket_path)
    b = capbus.connect(kernel.socket_path)
    pub = a.publish("h", max_size=8, history=3)
    for i in range(10):
        pub.publish(payload=bytes([i]))
    sub = b.subscribe("h")
    got = []
    while len(got) < 3:
        s = sub.recv(2)
        got.append((s.seq, bytes(s.payload)))
        s.release()
    assert got == [(8, b"\x07"), (9, b"\x08"), (10, b"\x09")]
    pub.close()


def test_asyncio_arecv_and_async_for(kernel):
    a = capbus.connect(kernel.socket_path)
    b = capbus.connect(kernel.socket_path, wait="block")
    pub = a.publish("aio", max_size=8)
    sub = b.subscribe("aio")
    assert wait_for(lambda: pub.subscribers == 1)

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, lambda: [pub.publish(payload=bytes([i])) for i in range(5)])
        loop.call_later(0.3, pub.close)
        seen = [(await sub.arecv(5)).seq]
        async for s in sub:
            seen.append(s.seq)
            s.release()
        return seen

    assert asyncio.run(asyncio.wait_for(main(), 10)) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("wait", ["spin", "adaptive", "block"])
def test_wait_modes_wake_on_publish(kernel, wait):
    a = capbus.connect(kernel.socket_path)
    b = capbus.connect(kernel.socket_path, wait=wait)
    pub = a.publish("w", max_size=8)
    sub = b.subscribe("w")
    assert wait_for(lambda: pub.subscribers == 1)
    threading.Timer(0.1, lambda: pub.publish(payload=b"x")).start()
    assert bytes(sub.recv(5).payload) == b"x"
    with pytest.raises(capbus.Timeout):
        sub.recv(0.05)
    pub.close()


def test_revoking_the_topic_ends_every_subscription(kernel):
    a = capbus.connect(kernel.socket_path)
    b = capbus.connect(kernel.socket_path)
    pub = a.publish("r", max_size=8)
    sub = b.subscribe("r")
    caps = {r["kind"] for r in a.query("caps", b.id)}
    assert "subscriber" in caps
    a._request(frames.Revoke(pub.handle))
    with pytest.raises(capbus.InvalidCapability, match="revoked"):
        sub.recv(2)
    assert not [r for r in a.query("topics") if r["topic"] == "r"]


def test_counters_reach_stats_top_and_prometheus(kernel):
    from capbus._cli import metrics, query, top

    a = capbus.connect(kernel.socket_path)
    b = capbus.connect(kernel.socket_path)
    pub = a.publish("temps", max_size=16, max_depth=4)
    sub = b.subscribe("temps")
    assert wait_for(lambda: pub.subscribers == 1)
    for _ in range(10):
        pub.publish(payload=b"x")
    sub.recv(1).release()
    snap = query.snapshot(kernel.socket_path)
    text = top.format_stats(snap)
    assert "TOPICS" in text
    line = next(li for li in text.splitlines() if li.startswith("temps"))
    assert line.split()[:7] == ["temps", str(a.id), str(b.id), "10", "10", "1", "6"]
    fams = {f.name: f for f in metrics.families(snap)}
    dropped = fams["capbus_topic_dropped"].samples
    assert [(s.labels["subscriber"], s.value) for s in dropped] == [(str(b.id), 6)]
    pub.close()


def test_a_forked_child_cannot_use_or_disturb_the_parents_topics(kernel, children):
    a = capbus.connect(kernel.socket_path)
    pub = a.publish("forked", max_size=8, max_depth=8)
    p = children.start(r"""
        import capbus, os, signal, sys, time
        proc = capbus.connect()
        sub = proc.subscribe("forked", timeout=10)
        print("ready", flush=True)
        held = [sub.recv(10) for _ in range(3)]
        pid = os.fork()
        if pid == 0:
            signal.alarm(20)
            for s in held:
                s.release()  # the child's copies: nothing may reach the parent's ring
            del held[:]
            try:
                sub.poll()
                os._exit(3)
            except capbus.KernelUnavailable:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status), flush=True)
        for s in held:
            s.release()
        got = [sub.recv(10).seq for _ in range(2)]
        print("parent", got, flush=True)
    """)
    assert readline(p) == "ready"
    assert wait_for(lambda: pub.subscribers == 1)
    for i in range(3):
        pub.publish(payload=bytes([i]))
    assert readline(p) == "child 0"
    pub.publish(payload=b"a")
    pub.publish(payload=b"b")
    assert readline(p) == "parent [4, 5]"
    assert pub.cut_off == 0
    pub.close()


def test_topic_capabilities_restrict_delegate_and_revoke(kernel):
    a = capbus.connect(kernel.socket_path)
    c = capbus.connect(kernel.socket_path)
    pub = a.publish("secret", max_size=8, allow=[])  # nobody may subscribe by name
    with pytest.raises(capbus.PermissionDenied):
        c.subscribe("secret")
    with pytest.raises(capbus.PermissionDenied):
        pub.restrict(["publish"])  # one publisher per topic
    # a hands a subscribe ticket to c through a message to c's service
    svc = c.register("inbox")
    ep = a.lookup("inbox")
    ticket = pub.restrict()  # subscribe and share: share is what lets it be passed on
    assert ticket.rights == {"subscribe", "share"}
    got: list = []

    def serve() -> None:
        req = svc.recv(5)
        assert req.caps == ()
        got.extend(req.topics)
        req.reply()

    t = threading.Thread(target=serve)
    t.start()
    ep.call(1, caps=[ticket], timeout=5)
    t.join(5)
    [received] = got
    assert isinstance(received, capbus.TopicCapability) and received.name == "secret"
    assert received.publisher == a.id
    sub = c.subscribe(received)
    assert wait_for(lambda: pub.subscribers == 1)
    pub.publish(payload=b"hi")
    with sub.recv(2) as s:
        assert bytes(s.payload) == b"hi"
    with pytest.raises(TypeError):
        ep.call(1, caps=[sub], timeout=1)  # not a capability one can pass
    # without the share right, c cannot hand it on
    narrow = received.restrict(["subscribe"])
    with pytest.raises(capbus.PermissionDenied):
        c.lookup("inbox").call(1, caps=[narrow], timeout=1)
    # revoking the ticket ends the subscription made through it, and only that
    other = a.subscribe(pub.restrict(["subscribe"]))  # a ticket of its own
    assert wait_for(lambda: pub.subscribers == 2)
    ticket.revoke()
    with pytest.raises(capbus.InvalidCapability, match="revoked"):
        sub.recv(2)
    assert wait_for(lambda: pub.subscribers == 1)
    pub.publish(payload=b"on")
    with other.recv(2) as s:
        assert bytes(s.payload) == b"on"
    audit = [r for r in a.query("caps", c.id) if r["kind"] == "topic"]
    assert audit == []
    pub.close()


def test_batches_publish_many_and_recv_many_in_order(kernel, children):
    pub_proc = capbus.connect(kernel.socket_path)
    pub = pub_proc.publish("batch", max_size=16, max_subscribers=4, max_depth=64,
                           overflow="block", max_held=32)
    code = """
        import capbus
        proc = capbus.connect()
        sub = proc.subscribe("batch", timeout=10)
        print("ready", flush=True)
        last, batches = 0, 0
        while last < 1000:
            got = sub.recv_many(48, timeout=10)
            assert 1 <= len(got) <= 32, len(got)  # never more than max_held
            batches += 1
            for s in got:
                assert s.seq == last + 1 and bytes(s.payload) == s.seq.to_bytes(4, "little")
                assert s.opcode == s.seq % 5 and s.data == (s.seq, 0, 0, 0), s
                last = s.seq
            del got  # dropped: the slots go back in one pass at the next receive
        print("ok", last, sub.dropped, sub.poll_many(8), flush=True)
    """
    kids = [children.start(code) for _ in range(3)]
    for k in kids:
        assert readline(k) == "ready"
    assert wait_for(lambda: pub.subscribers == 3)
    items = [(i % 5, (i,), i.to_bytes(4, "little")) for i in range(1, 1001)]
    for at in range(0, 1000, 100):  # more than a ring's depth per batch: it waits for room
        assert pub.publish_many(items[at:at + 100], timeout=20) == at + 100
    for k in kids:
        assert readline(k, 20) == "ok 1000 0 []"
    assert pub.publish_many([]) == 1000
    pub.close()


def test_publish_many_checks_each_item_and_says_how_far_it_got(kernel):
    a = capbus.connect(kernel.socket_path)
    b = capbus.connect(kernel.socket_path)
    pub = a.publish("pm", max_size=8, overflow="block", max_depth=4)
    sub = b.subscribe("pm")
    assert wait_for(lambda: pub.subscribers == 1)
    with pytest.raises(ValueError, match="item 1: a payload of 9 bytes exceeds .* max_size 8"):
        pub.publish_many([(0, (), b"1"), (0, (), b"x" * 9), (0, (), b"3")])
    with pytest.raises(ValueError, match="data words are u64"):
        pub.publish_many([(0, (-1,), b"")])
    with pytest.raises(TypeError, match="item 0 is not an"):
        pub.publish_many([b"not a tuple"])  # type: ignore[list-item]
    with pytest.raises(capbus.WouldBlock, match=r"\(3 of 5 samples published\)"):
        pub.publish_many([(0, (), b"%d" % i) for i in range(2, 7)], timeout=0.1)
    assert pub.published == 4
    got = sub.recv_many(10, timeout=1)
    assert [bytes(s.payload) for s in got] == [b"1", b"2", b"3", b"4"]
    assert sub.poll_many() == []
    for s in got:
        s.release()
    batch: list = []

    class Emptier:  # data whose iteration empties the very list being published
        def __iter__(self):
            batch.clear()
            return iter(())

    batch += [(0, Emptier(), b"0"), (0, (), b"never")]
    assert pub.publish_many(batch) == 5 and batch == []  # item 0 went out; then nothing left
    assert [bytes(s.payload) for s in sub.recv_many(4, timeout=1)] == [b"0"]
    pub.close()
    with pytest.raises(capbus.PeerDied):
        sub.recv_many(4, timeout=5)
