"""Python objects over capbus: data-only msgpack with buffers out of band; pickle only between
peers that trust each other (the hostile corpus is tests/test_objects_hostile.py)."""

from __future__ import annotations

import os
import threading

import pytest

import capbus
from capbus._runtime import objects


def test_round_trip_with_numpy_out_of_band(kernel):
    np = pytest.importorskip("numpy")
    with capbus.connect(kernel.socket_path) as a, capbus.connect(kernel.socket_path) as b:
        svc = b.register("objects")
        seen: dict = {}

        def serve():
            req = svc.recv(timeout=10)
            obj = req.object()
            arr = obj["x"]
            seen["no_copy"] = np.shares_memory(arr, np.frombuffer(req.payload, np.uint8))
            seen["readonly"] = not arr.flags.writeable
            req.reply_object({"sum": float(arr.sum()), "tag": obj["tag"], "raw": obj["raw"]})

        t = threading.Thread(target=serve)
        t.start()
        x = np.arange(1 << 18, dtype=np.float64).reshape(512, 512)
        reply = a.lookup("objects").call_object({"x": x, "tag": ("t", 1), "raw": b"\0" * 100_000},
                                                timeout=10)
        t.join(10)
        got = reply.object()
        assert got["sum"] == float(x.sum()) and got["tag"] == ("t", 1)
        assert got["raw"] == b"\0" * 100_000
        assert seen == {"no_copy": True, "readonly": True}  # a view of the payload, not a copy


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_untrusted_payload_cannot_run_code():
    with pytest.raises(TypeError, match="pickle=True"):
        objects.pack(Evil())  # not plain data: the sender must opt in to pickle
    payload = objects.pack(Evil(), pickle=True)
    with pytest.raises(capbus.ProtocolError, match="trusted=True"):
        objects.loads(payload)
    assert objects.loads(objects.pack({"a": [1, 2.5, "x"], "b": {3}})) == {"a": [1, 2.5, "x"], "b": {3}}


@pytest.mark.parametrize("garbage", [b"", b"CBP5", b"XXXX" + bytes(20), objects.pack(list(range(50)))[:30]])
def test_garbage_payloads_are_protocol_errors(garbage):
    with pytest.raises(capbus.ProtocolError):
        objects.loads(garbage)


def test_send_object_async(kernel):
    with capbus.connect(kernel.socket_path) as a, capbus.connect(kernel.socket_path) as b:
        svc = b.register("objects")
        a.lookup("objects").send_object({"k": list(range(10))}, opcode=3)
        req = svc.recv(timeout=5)
        assert req.opcode == 3 and req.object() == {"k": list(range(10))}
