"""The asyncio API, complete: unbounded acalls (queued for a bounded pool of lanes), acall_object,
asend/asend_many and send_async/loan with a timeout that wait for room (woken by the server as it
drains, no busy loop), cancellation of an acall, `with`/`async with` everywhere, and closing a
service or process under `async for`/`arecv` from a task or a thread. Every asyncio test runs
under the default event loop and under uvloop."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time

import pytest
from conftest import readline, wait_for

import capbus

uvloop = pytest.importorskip("uvloop", reason="uvloop is in the test extra: pip install .[test]")


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    """run(coro_fn, *args): run a coroutine to completion on a fresh loop of the kind under test
    (with an overall timeout, so that no test can hang)."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def go(fn, *args, timeout: float = 60.0):
        async def bounded():
            return await asyncio.wait_for(fn(*args), timeout)

        with asyncio.Runner(loop_factory=factory) as runner:
            if request.param == "uvloop":
                assert isinstance(runner.get_loop(), uvloop.Loop)
            return runner.run(bounded())

    go.kind = request.param
    return go


# A server in its own process: op 1 replies data[0] + 1 (op 3 after data[1] ms), op 2 receives
# one-way messages and prints how many it has, in order, when it has `n` (slowly: a sleep of
# data[1] ms before each), op 4 replies with the received object's repr.
SERVER = """
import capbus, sys, time
p = capbus.connect()
svc = p.register(sys.argv[1])
print("ready", flush=True)
expect = 0
while True:
    req = svc.recv(timeout=60)
    if req.opcode == 1:
        req.reply(data=(req.data[0] + 1,))
    elif req.opcode == 3:
        time.sleep(req.data[1] / 1000)
        req.reply(data=(req.data[0],))
    elif req.opcode == 2:
        time.sleep(req.data[1] / 1000)
        assert req.data[0] == expect, (req.data[0], expect)
        expect += 1
        if expect == req.data[2]:
            print("got", expect, flush=True)
    elif req.opcode == 4:
        req.reply(payload=repr(req.object()).encode())
    elif req.opcode == 5:
        print("saw", req.data[0], flush=True)
        req.reply(data=(req.data[0],))
"""


def _server(children, name: str):
    s = children.start(SERVER, name)
    assert readline(s) == "ready"
    return s


# ---- acall: no limit, a bounded pool -------------------------------------------------------------


def test_10000_concurrent_acalls_all_complete_with_bounded_lanes(kernel, children, run):
    _server(children, "echo")

    async def main():
        async with capbus.connect(kernel.socket_path) as me:
            async with me.lookup("echo", timeout=10) as ep:
                replies = await asyncio.gather(*(ep.acall(1, (i,)) for i in range(10_000)))
                assert [r.data[0] for r in replies] == [i + 1 for i in range(10_000)]
                # The lanes stayed bounded: at most the pool's cap were ever opened.
                assert 1 <= ep._pool_size <= 16
                assert len(ep._pool) == ep._pool_size and not ep._lane_waiters

    run(main)


def test_acalls_wait_their_turn_in_fifo_order(kernel, children, run):
    """More acalls than lanes, each slow: they complete, and the ones queued for a lane get one
    in the order they asked (the first 16 start at once, then one per lane freed)."""
    _server(children, "slow")

    async def main():
        async with capbus.connect(kernel.socket_path) as me:
            ep = me.lookup("slow", timeout=10)
            done: list[int] = []

            async def one(i: int) -> None:
                r = await ep.acall(3, (i, 20))
                assert r.data[0] == i
                done.append(i)

            await asyncio.gather(*(one(i) for i in range(48)))
            assert sorted(done) == list(range(48))
            # Lanes are handed out oldest first: no call of the third wave finishes before
            # every call of the first one has.
            assert max(done[:16]) < 32 and min(done[32:]) >= 16
            assert ep._pool_size <= 16

    run(main)


def test_acall_object(kernel, children, run):
    _server(children, "obj")

    async def main():
        async with capbus.connect(kernel.socket_path) as me:
            ep = me.lookup("obj", timeout=10)
            r = await ep.acall_object({"a": [1, 2, 3], "b": (4, 5)}, opcode=4, timeout=10)
            assert r.payload == repr({"a": [1, 2, 3], "b": (4, 5)}).encode()
            big = bytes(range(256)) * 1024  # over ZC_THRESHOLD
            r = await ep.acall_object(big, opcode=4, timeout=10)
            assert r.payload == repr(big).encode()

    run(main)


# ---- cancellation --------------------------------------------------------------------------------


def test_cancelled_acall_then_the_next_call_gets_its_own_reply(kernel, children, run):
    _server(children, "late")

    async def main():
        async with capbus.connect(kernel.socket_path) as me:
            ep = me.lookup("late", timeout=10)
            task = asyncio.ensure_future(ep.acall(3, (7, 300)))  # replied after 0.3 s
            await asyncio.sleep(0.1)  # the server has taken it and sleeps
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert ep._pool_size == 1 and len(ep._pool) == 1  # the lane went back, not dropped
            # The same lane: the late reply to 7 arrives during this call and is dropped.
            r = await ep.acall(3, (8, 400), timeout=10)
            assert r.data[0] == 8
            assert ep._pool_size == 1
            for i in range(20):  # and the lane goes on answering in step
                assert (await ep.acall(1, (i,), timeout=10)).data[0] == i + 1

    run(main)


def test_cancelled_acall_not_yet_taken_is_skipped_by_the_server(kernel, children, run):
    """The server is busy with another caller's request while ours waits in its ring: once
    cancelled, the server never runs it (the lane's cancel_below says so)."""
    s = _server(children, "skip")

    async def main():
        async with capbus.connect(kernel.socket_path) as me:
            ep = me.lookup("skip", timeout=10)
            busy = threading.Thread(target=lambda: ep.call(3, (0, 500), timeout=10))
            busy.start()  # the server sleeps 0.5 s in this call (a thread's own lane)
            await asyncio.sleep(0.1)
            task = asyncio.ensure_future(ep.acall(5, (99,)))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            r = await ep.acall(5, (100,), timeout=10)  # the same pooled lane
            assert r.data[0] == 100
            busy.join(10)

    run(main)
    assert readline(s, 10) == "saw 100"  # never "saw 99"


def test_acall_cancelled_while_queued_for_a_lane(kernel, children, run):
    """A task cancelled while waiting its turn for a lane leaves the queue; the others go on."""
    _server(children, "queue")

    async def main():
        async with capbus.connect(kernel.socket_path) as me:
            ep = me.lookup("queue", timeout=10)
            tasks = [asyncio.ensure_future(ep.acall(3, (i, 100))) for i in range(40)]
            await asyncio.sleep(0.02)
            assert len(ep._lane_waiters) == 24
            for t in tasks[20:30]:
                t.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for i, r in enumerate(results):
                if 20 <= i < 30:
                    assert isinstance(r, asyncio.CancelledError)
                else:
                    assert r.data[0] == i
            assert ep._pool_size <= 16 and not ep._lane_waiters

    run(main)


def test_acall_timeout_while_queued_is_a_timeout(kernel, children, run):
    _server(children, "busy")

    async def main():
        async with capbus.connect(kernel.socket_path) as me:
            ep = me.lookup("busy", timeout=10)
            slow = [asyncio.ensure_future(ep.acall(3, (i, 500))) for i in range(16)]
            await asyncio.sleep(0.05)
            with pytest.raises(capbus.Timeout):
                await ep.acall(1, (0,), timeout=0.1)  # every lane is busy for 0.5 s
            await asyncio.gather(*slow)
            assert (await ep.acall(1, (1,), timeout=10)).data[0] == 2

    run(main)


# ---- waiting for room ----------------------------------------------------------------------------


def test_asend_waits_for_a_slow_server_then_completes(kernel, children, run):
    s = _server(children, "sink")
    n = 1500  # several rings' worth (256 slots)

    async def main():
        async with capbus.connect(kernel.socket_path) as me:
            ep = me.lookup("sink", timeout=10)
            cpu0 = time.process_time()
            t0 = time.monotonic()
            for i in range(n):
                await ep.asend(2, (i, 1, n))  # the server sleeps 1 ms per message
            waited = time.monotonic() - t0
            # It waited for room (1500 messages at ~1 ms each), asleep, not spinning.
            assert waited > 0.5
            assert time.process_time() - cpu0 < 0.5 * waited

    run(main)
    assert readline(s, 30) == f"got {n}"


def test_asend_many_sends_everything_in_order(kernel, children, run):
    s = _server(children, "many")
    n = 2000

    async def main():
        async with capbus.connect(kernel.socket_path) as me:
            ep = me.lookup("many", timeout=10)
            sent = await ep.asend_many([(2, (i, 0, n)) for i in range(n)])
            assert sent == n

    run(main)
    assert readline(s, 30) == f"got {n}"


def test_asend_from_many_tasks_keeps_their_order(kernel, children, run):
    s = _server(children, "order")
    n = 1200

    async def main():
        async with capbus.connect(kernel.socket_path) as me:
            ep = me.lookup("order", timeout=10)
            await asyncio.gather(*(ep.asend(2, (i, 0, n)) for i in range(n)))

    run(main)
    assert readline(s, 30) == f"got {n}"


def _fill(ep) -> int:
    n = 0
    while True:
        try:
            ep.send_async(9, (n,))
        except capbus.WouldBlock:
            return n
        n += 1


def test_send_async_timeout(kernel):
    with capbus.connect(kernel.socket_path) as rx, capbus.connect(kernel.socket_path) as tx:
        svc = rx.register("full")
        ep = tx.lookup("full")
        n = _fill(ep)
        assert n == 256
        with pytest.raises(capbus.WouldBlock):
            ep.send_async(9, (n,), timeout=0)  # 0: at once, as the default
        t0 = time.monotonic()
        with pytest.raises(capbus.WouldBlock, match="no room after waiting 0.3 s"):
            ep.send_async(9, (n,), timeout=0.3)
        assert time.monotonic() - t0 >= 0.29  # it did wait

        def drain_later() -> None:
            time.sleep(0.3)
            svc.recv(timeout=5)

        th = threading.Thread(target=drain_later)
        th.start()
        try:
            ep.send_async(9, (n,), timeout=None)  # waits until the receiver takes one
        finally:
            th.join(10)
        got = [r.data[0] for r in svc.recv_many(1000, timeout=1)]
        assert got == list(range(1, n + 1))  # nothing lost, nothing doubled, in order


def test_send_async_timeout_with_a_capability_attached(kernel):
    """A message with delegated capabilities that times out waiting gives them back."""
    with capbus.connect(kernel.socket_path) as rx, capbus.connect(kernel.socket_path) as tx:
        svc = rx.register("full")
        rx.register("other")
        ep, other = tx.lookup("full"), tx.lookup("other")
        _fill(ep)
        with pytest.raises(capbus.WouldBlock):
            ep.send_async(9, (0,), caps=[other], timeout=0.1)
        svc.recv(timeout=5)
        ep.send_async(10, (1,), caps=[other], timeout=5)
        reqs = svc.recv_many(1000, timeout=1)
        assert [len(r.caps) for r in reqs if r.opcode == 10] == [1]
        assert all(not r.caps for r in reqs if r.opcode == 9)


def test_loan_timeout(kernel):
    with capbus.connect(kernel.socket_path) as rx, capbus.connect(kernel.socket_path) as tx:
        svc = rx.register("arena")
        ep = tx.lookup("arena")
        size = tx.lookup("arena").limits.max_message_size or (100 << 20)
        size = min(size, 100 << 20)
        with ep.loan(size) as loan:
            loan.buffer[:8] = b"12345678"
            loan.send_async(1)
        del loan  # its view would keep that memory from this lane (see Endpoint.loan)
        with pytest.raises(capbus.WouldBlock):
            ep.loan(size)  # the receiver has not taken the first one yet
        t0 = time.monotonic()
        with pytest.raises(capbus.WouldBlock, match="no room after waiting 0.2 s"):
            ep.loan(size, timeout=0.2)
        assert time.monotonic() - t0 >= 0.19
        got = []

        def take_later() -> None:
            time.sleep(0.2)
            req = svc.recv(timeout=5)
            got.append(bytes(req.payload[:8]))
            req.release()  # the arena chunk goes back

        th = threading.Thread(target=take_later)
        th.start()
        try:
            with ep.loan(size, timeout=10) as loan:
                loan.buffer[:8] = b"abcdefgh"
                loan.send_async(1)
        finally:
            th.join(10)
        assert got == [b"12345678"]
        assert bytes(svc.recv(timeout=5).payload[:8]) == b"abcdefgh"


def test_asend_timeout_and_zero(kernel, run):
    async def main():
        async with capbus.connect(kernel.socket_path) as rx, \
                capbus.connect(kernel.socket_path) as tx:
            svc = rx.register("afull")
            ep = tx.lookup("afull")
            n = _fill(ep)
            with pytest.raises(capbus.WouldBlock):
                await ep.asend(9, (n,), timeout=0)
            t0 = time.monotonic()
            with pytest.raises(capbus.WouldBlock):
                await ep.asend(9, (n,), timeout=0.2)
            assert time.monotonic() - t0 >= 0.19
            assert await ep.asend_many([(9, (n,))], timeout=0.1) == 0
            # A receiver in another thread frees room: the waiting task wakes and sends.
            threading.Timer(0.2, lambda: svc.recv(timeout=5)).start()
            await ep.asend(9, (n,), timeout=10)
            got = [r.data[0] for r in svc.recv_many(1000, timeout=1)]
            assert got == list(range(1, n + 1))

    run(main)


# ---- hostile: a server that never drains ---------------------------------------------------------


NEVER_DRAINS = """
import capbus, time
p = capbus.connect()
svc = p.register("stuck")
print("ready", flush=True)
time.sleep(120)                                   # registered, never receives
"""


def test_never_draining_server_cannot_hang_nor_spin_a_waiting_producer(kernel, children, run):
    s = children.start(NEVER_DRAINS)
    assert readline(s) == "ready"
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("stuck", timeout=10)
        _fill(ep)
        # A thread waiting in send_async: it gives up at its timeout, having slept.
        t0, cpu0 = time.monotonic(), time.thread_time()
        with pytest.raises(capbus.WouldBlock):
            ep.send_async(9, (0,), timeout=1.0)
        assert 0.99 <= time.monotonic() - t0 < 5
        assert time.thread_time() - cpu0 < 0.2
        # Someone floods the lane's eventfd (the server holds it): spurious wake-ups cost
        # little, and the deadline holds.
        lane = ep._local.lane
        stop = threading.Event()

        def flood() -> None:
            while not stop.is_set():
                os.eventfd_write(lane.reply_fd, 1)
                time.sleep(0.0001)

        th = threading.Thread(target=flood, daemon=True)
        th.start()
        try:
            t0, cpu0 = time.monotonic(), time.thread_time()
            with pytest.raises(capbus.WouldBlock):
                ep.send_async(9, (0,), timeout=1.0)
            assert 0.99 <= time.monotonic() - t0 < 5
            assert time.thread_time() - cpu0 < 0.5
        finally:
            stop.set()
            th.join(5)

        async def waiter():
            t0, cpu0 = time.monotonic(), time.process_time()
            with pytest.raises(capbus.WouldBlock):
                await ep.asend(9, (0,), timeout=1.0)
            assert 0.99 <= time.monotonic() - t0 < 5
            assert time.process_time() - cpu0 < 0.3

        run(waiter)


# ---- closing under async for / arecv ----------------------------------------------------------


def _sender(kernel, name: str, stop: threading.Event) -> threading.Thread:
    def go() -> None:
        with capbus.connect(kernel.socket_path) as tx:
            ep = tx.lookup(name, timeout=10)
            i = 0
            while not stop.is_set() and i < 5:
                ep.send_async(1, (i,), timeout=5)
                i += 1
                time.sleep(0.01)

    th = threading.Thread(target=go)
    th.start()
    return th


@pytest.mark.parametrize("closer", ["task", "thread", "process"])
def test_close_under_async_for_ends_the_loop(kernel, run, closer):
    async def main():
        me = capbus.connect(kernel.socket_path)
        svc = me.register("loop")
        stop = threading.Event()
        th = _sender(kernel, "loop", stop)
        got: list[int] = []

        async def consume() -> str:
            async for req in svc:
                got.append(req.data[0])
            return "ended"

        consumer = asyncio.ensure_future(consume())
        while len(got) < 5:
            await asyncio.sleep(0.01)
        assert not consumer.done()  # waiting in arecv now
        if closer == "task":
            svc.close()
        elif closer == "thread":
            threading.Thread(target=svc.close).start()
        else:
            threading.Thread(target=me.close).start()
        assert await asyncio.wait_for(consumer, 5) == "ended"
        stop.set()
        th.join(10)
        with pytest.raises(capbus.IpcError):
            await svc.arecv(timeout=1)
        me.close()

    run(main)


def test_close_under_bare_arecv_raises_a_capbus_error(kernel, run):
    async def main():
        with capbus.connect(kernel.socket_path) as me:
            svc = me.register("bare")
            waiting = asyncio.ensure_future(svc.arecv())
            await asyncio.sleep(0.05)
            threading.Timer(0.05, svc.close).start()
            with pytest.raises(capbus.IpcError, match="closed"):
                await asyncio.wait_for(waiting, 5)
            # Several receivers waiting at once (two tasks, a second loop thread) all end.
            svc2 = me.register("bare2")
            errors: list[BaseException] = []

            def other_loop() -> None:
                async def wait():
                    await svc2.arecv()

                try:
                    asyncio.run(wait())
                except BaseException as exc:  # noqa: BLE001 - recorded, checked below
                    errors.append(exc)

            th = threading.Thread(target=other_loop)
            th.start()
            mine = asyncio.ensure_future(svc2.arecv())
            await asyncio.sleep(0.1)
            svc2.close()
            with pytest.raises(capbus.IpcError):
                await asyncio.wait_for(mine, 5)
            th.join(5)
            assert len(errors) == 1 and isinstance(errors[0], capbus.IpcError)
            assert not isinstance(errors[0], OSError)

    run(main)


def test_many_open_close_cycles_under_arecv_leak_no_fd(kernel, run):
    async def main():
        with capbus.connect(kernel.socket_path) as me:
            before = len(os.listdir("/proc/self/fd"))
            for i in range(30):
                svc = me.register(f"cyc{i}")
                task = asyncio.ensure_future(svc.arecv())
                await asyncio.sleep(0)
                svc.close()
                with pytest.raises(capbus.IpcError):
                    await asyncio.wait_for(task, 5)
            del svc, task  # its ServerSet's fds go with it
            gc.collect()
            # (the embedded kernel lets its ends go on its own thread: give it a moment)
            assert wait_for(lambda: len(os.listdir("/proc/self/fd")) <= before + 2, 10)

    run(main)


# ---- with / async with everywhere ----------------------------------------------------------------


def test_async_with_and_with_everywhere(kernel, run):
    async def main():
        async with capbus.connect(kernel.socket_path) as me:
            async with me.register("ctx") as svc:
                async with me.lookup("ctx") as ep:
                    await ep.asend(1, (1,))
                    assert (await svc.arecv(timeout=5)).data[0] == 1
                with pytest.raises(capbus.InvalidCapability):
                    ep.send_async(1, (2,))
                async with me.subscribe_registrations() as sub:
                    assert isinstance(sub, capbus.Subscription)
                async with me.publish("ctx/topic") as pub:
                    async with me.subscribe("ctx/topic", timeout=5) as tsub:
                        assert isinstance(tsub, capbus.Subscriber)
                    with pytest.raises(capbus.IpcError):
                        tsub.recv(timeout=0)
                with pytest.raises(capbus.IpcError):
                    pub.publish(1)
            assert svc._closed
            with pytest.raises(capbus.IpcError):
                await svc.arecv(timeout=1)
        assert me.closed

    run(main)
    with capbus.connect(kernel.socket_path) as me:
        with me.register("ctx2") as svc, me.lookup("ctx2") as ep, \
                me.subscribe_registrations() as sub:
            ep.send_async(1, (3,))
            assert svc.recv(timeout=5).data[0] == 3
            assert sub is not None
        with pytest.raises(capbus.ServiceNotFound):
            me.lookup("ctx2")
        ep.close()  # a second close does nothing
        svc.close()
        sub.close()
        me.register("ctx3")
        with me.lookup("ctx3") as ep3:
            ep3.revoke()  # and the close on exit has nothing left to give back
    assert me.closed
