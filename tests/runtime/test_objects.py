"""Python objects over capbus: data-only msgpack with buffers out of band; pickle only between
peers that trust each other (the hostile corpus is tests/hostile/test_objects_hostile.py)."""

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


class Text(str):
    pass


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


def test_plain_data_keeps_its_types():
    import datetime as dt

    np = pytest.importorskip("numpy")
    tz = dt.timezone(dt.timedelta(hours=-3, minutes=-30))
    value = {
        "none": None, "bools": [True, False], "ints": [0, -1, 2**63 - 1, -(2**63), 2**64 - 1],
        "big": [2**64, -(2**63) - 1, 7**300], "float": 2.5, "complex": 1 - 2j, "str": "ü",
        "bytes": b"\0" * 10, "large bytes": b"x" * 100_000, "bytearray": bytearray(b"ab"),
        "tuple": (1, ("nested",), []), "set": {1, "a", (2, 3)}, "frozenset": frozenset({4}),
        (1, "tuple key"): frozenset(), frozenset({1}): "frozenset key", 3: "int key", None: 0,
        "datetime": dt.datetime(2024, 2, 29, 23, 59, 59, 999_999, tzinfo=tz, fold=1),
        "naive": dt.datetime(1, 1, 1), "date": dt.date(9999, 12, 31), "time": dt.time(1, 2, 3, 4, tz),
        "timedelta": dt.timedelta(days=-999_999_999), "np.float32": np.float32(1.5),
        "np.int64": np.int64(-7), "np.bool_": np.bool_(True), "np.str_": np.str_("s"),
        "np.datetime64": np.datetime64("2020-01-01T00:00", "m"),
    }
    got = objects.loads(objects.pack(value))
    assert got == value
    for k, v in value.items():
        assert type(got[k]) is type(v), k
    assert got["datetime"].utcoffset() == tz.utcoffset(None) and got["datetime"].fold == 1
    assert type(got["large bytes"]) is bytes and got["large bytes"] == value["large bytes"]
    view = objects.loads(objects.pack(memoryview(b"view" * 2000)))
    assert isinstance(view, memoryview) and view.readonly and view == b"view" * 2000
    arrays = {"f": np.asfortranarray(np.arange(12.0).reshape(3, 4)), "strided": np.arange(20)[::3],
              "0-d": np.array(5, np.uint16), "empty": np.zeros((0, 7), ">i4"), "bool": np.ones(3, bool),
              "S": np.array([b"ab", b""]), "U": np.array(["x", "yz"]), "M": np.array([1, 2], "M8[ms]")}
    back = objects.loads(objects.pack(arrays))
    for k, a in arrays.items():
        b = back[k]
        assert b.dtype == a.dtype and b.shape == a.shape and (b == a).all(), k
        assert b.flags.c_contiguous and not b.flags.writeable, k


@pytest.mark.parametrize("what", ["instance", "object array", "structured array", "ndarray subclass",
                                  "str subclass", "dict subclass", "void scalar"])
def test_what_msgpack_cannot_carry_is_a_type_error_naming_pickle(what):
    import collections

    np = pytest.importorskip("numpy")
    obj = {"instance": Evil(), "object array": np.array([None, 1], dtype=object),
           "structured array": np.zeros(2, [("a", "f8"), ("b", "i4")]),
           "ndarray subclass": np.ma.masked_array([1, 2], mask=[0, 1]),
           "str subclass": Text("x"),
           "dict subclass": collections.OrderedDict(a=1),
           "void scalar": np.zeros(1, [("a", "f8")])[0]}[what]
    with pytest.raises(TypeError, match="pickle=True"):
        objects.pack([obj])
    assert objects.loads(objects.pack([obj], pickle=True), trusted=True)


def test_pickle_between_processes_needs_both_sides_to_opt_in(kernel):
    import collections

    with capbus.connect(kernel.socket_path) as a, capbus.connect(kernel.socket_path) as b:
        svc = b.register("objects")
        ep = a.lookup("objects")
        got: dict = {}

        def serve() -> None:
            try:
                for _ in range(2):
                    req = svc.recv(timeout=10)
                    with pytest.raises(capbus.ProtocolError, match="trusted=True"):
                        req.object()
                    got.setdefault("objs", []).append(req.object(trusted=True))
                    req.reply_object(collections.deque([1, 2]), pickle=True)
            except BaseException as exc:  # pragma: no cover - reported below
                got["error"] = exc

        t = threading.Thread(target=serve)
        t.start()
        reply = ep.call_object(collections.OrderedDict(x=1), pickle=True, timeout=10)
        with pytest.raises(capbus.ProtocolError, match="trusted=True"):
            reply.object()
        assert reply.object(trusted=True) == collections.deque([1, 2])
        big = collections.OrderedDict(x=b"\0" * 200_000)  # through a loan
        assert ep.call_object(big, pickle=True, timeout=10).object(trusted=True) == collections.deque([1, 2])
        t.join(10)
        assert "error" not in got, got
        assert got["objs"] == [collections.OrderedDict(x=1), big]
        with pytest.raises(TypeError, match="pickle=True"):
            ep.send_object(collections.OrderedDict(x=1))


@pytest.mark.parametrize("obj", [("two", 2), (), ({"k": 1}, [2], 3)])
def test_reply_object_keeps_tuples(kernel, obj):
    with capbus.connect(kernel.socket_path) as a, capbus.connect(kernel.socket_path) as b:
        svc = b.register("objects")
        t = threading.Thread(target=lambda: svc.recv(timeout=10).reply_object(obj))
        t.start()
        reply = a.lookup("objects").call(1, timeout=10)
        t.join(10)
        assert reply.object() == obj and type(reply.object()) is tuple


def test_reply_object_keeps_a_one_tuple(kernel):
    with capbus.connect(kernel.socket_path) as a, capbus.connect(kernel.socket_path) as b:
        svc = b.register("objects")
        t = threading.Thread(target=lambda: svc.recv(timeout=10).reply_object((1,)))
        t.start()
        reply = a.lookup("objects").call(1, timeout=10)
        t.join(10)
        assert reply.object() == (1,)
