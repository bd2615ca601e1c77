"""Loans: fill a buffer in the channel's arena and send it without a copy; receive a view."""

from __future__ import annotations

import threading

import pytest

import capbus


def _server(svc: capbus.Service, n: int, box: dict, hold: bool = False) -> threading.Thread:
    def run():
        for i in range(n):
            req = svc.recv(timeout=10)
            box[i] = req
            box[f"head{i}"] = bytes(req.payload[:8])
            box[f"view{i}"] = req.payload
            if not hold:
                req.reply(0)

    t = threading.Thread(target=run)
    t.start()
    return t


def test_loan_arrives_as_a_view_that_outlives_the_reply(kernel):
    with capbus.connect(kernel.socket_path) as a, capbus.connect(kernel.socket_path) as b:
        svc = b.register("z")
        ep = a.lookup("z")
        box: dict = {}
        t = _server(svc, 1, box)
        with ep.loan(1 << 20) as loan:
            loan.buffer[:8] = b"loanedAB"
            loan.buffer[-1:] = b"Z"
            assert loan.call(3, data=(1,), timeout=5).opcode == 0
        t.join(10)
        req = box[0]
        assert box["head0"] == b"loanedAB" and req.opcode == 3
        # Replied: the request lets go of its .payload, but the view taken before stays valid
        # (its chunk goes back when that view goes).
        with pytest.raises(ValueError):
            bytes(req.payload[:1])
        view = box.pop("view0")
        assert bytes(view[:8]) == b"loanedAB" and bytes(view[-1:]) == b"Z"


def test_unsent_loan_is_given_back(kernel):
    with capbus.connect(kernel.socket_path) as a, capbus.connect(kernel.socket_path) as b:
        b.register("z")
        ep = a.lookup("z")
        for _ in range(300):  # more than the arena holds, if cancelled loans leaked
            with ep.loan(1 << 20) as loan:
                loan.buffer[:1] = b"x"
        with ep.loan(1 << 20) as loan, pytest.raises(capbus.IpcError):
            loan.send_async(1)
            loan.send_async(1)  # a loan is sent once


def test_a_receiver_that_holds_payloads_exhausts_only_its_own_channel(kernel):
    with capbus.connect(kernel.socket_path) as a, capbus.connect(kernel.socket_path) as b, \
            capbus.connect(kernel.socket_path) as c:
        svc = b.register("z")
        greedy, other = a.lookup("z"), c.lookup("z")
        held = []
        sent = 0
        with pytest.raises(capbus.WouldBlock, match="arena"):
            while True:
                with greedy.loan(16 << 20) as loan:
                    loan.send_async(1)
                sent += 1
                held.extend(svc.recv_many(16, timeout=1))  # received, never released
        assert sent >= 7  # 128 MiB of arena, 16 MiB each
        other.send_async(2, payload=b"y" * 100_000)  # another channel is unaffected
        reqs = svc.recv_many(16, timeout=2)
        assert [r.opcode for r in reqs] == [2]
        for r in held:
            r.release()
        with greedy.loan(16 << 20) as loan:  # released: room again
            loan.send_async(1)


def test_objects_travel_through_a_loan_without_a_copy_on_receipt(kernel):
    np = pytest.importorskip("numpy")
    with capbus.connect(kernel.socket_path) as a, capbus.connect(kernel.socket_path) as b:
        svc = b.register("z")
        a.lookup("z").send_object({"x": np.arange(1 << 20, dtype=np.int64)})
        req = svc.recv(timeout=5)
        assert isinstance(req.payload, memoryview) and req.payload.readonly
        arr = req.object()["x"]
        assert arr[-1] == (1 << 20) - 1
        assert np.shares_memory(arr, np.frombuffer(req.payload, np.uint8))
        req.release()


def test_a_loaned_call_answered_with_an_error_raises_it(kernel):
    with capbus.connect(kernel.socket_path) as a, capbus.connect(kernel.socket_path) as b:
        svc = b.register("z")
        ep = a.lookup("z")

        def run():
            svc.recv(timeout=10).reply_error(7, "no such key")
            svc.recv(timeout=10).reply_error(8, "again")

        t = threading.Thread(target=run)
        t.start()
        with ep.loan(4096) as loan, pytest.raises(capbus.RemoteError) as err:
            loan.call(1, timeout=5)
        assert err.value.code == 7 and err.value.text == "no such key" and "'z'" in str(err.value)
        with pytest.raises(capbus.RemoteError) as plain:  # as a call without a loan says it
            ep.call(1, timeout=5)
        assert (plain.value.code, plain.value.text) == (8, "again")
        t.join(10)
        assert not t.is_alive()
