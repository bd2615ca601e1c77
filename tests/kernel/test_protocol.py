"""The sans-IO protocol, without processes: codec round trips, validation, state machines."""

from __future__ import annotations

import json
import struct

import pytest

from capbus import ProtocolError
from capbus._protocol import frames
from capbus._protocol.connection import MAX_IN_FLIGHT, KernelConnection, ProcessConnection, State

SAMPLES = [
    frames.Hello(1, "spin"),
    frames.Register("kv", None),
    frames.Register("kv", ["uid:1000", "7"]),
    frames.RegisterPackage(None),
    frames.Lookup("ünïcode", 1500),
    frames.LookupPackage("org.example", 0),
    frames.Subscribe(),
    frames.NotifyAck(1 << 40),
    frames.Watch(5),
    frames.Release((1 << 64) - 1),
    frames.Query("processes", 0, 200),
    frames.Welcome(1, None, 123),
    frames.Ok(),
    frames.Error(4, "no such service"),
    frames.Registered(3, "kv"),
    frames.Granted(3, 9, "kv"),
    frames.Subscribed(8),
    frames.Rows([{"id": 1}], 1),
    frames.RegistrationNotice(8),
    frames.Death(3, 9),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    data = frames.encode(msg, 7 if msg.KIND != frames.KIND_EVENT else 0)
    back, rid = frames.decode(data, msg.FDS)
    assert back == msg and rid == (7 if msg.KIND != frames.KIND_EVENT else 0)


def _frame(body: bytes, *, magic=b"CB", version=1, kind=1, type_=4, flags=0, rid=1, blen=None):
    return frames.HEADER.pack(magic, version, kind, type_, flags, rid,
                              len(body) if blen is None else blen) + body


GOOD = json.dumps({"name": "kv", "timeout_ms": 0}).encode()


@pytest.mark.parametrize(
    "data, why",
    [
        (b"CB\x01", "truncated"),
        (_frame(GOOD, magic=b"XX"), "magic"),
        (_frame(GOOD, version=2), "version"),
        (_frame(GOOD, flags=1), "flags"),
        (_frame(GOOD, blen=3), "body length"),
        (_frame(GOOD, type_=999), "unknown frame type"),
        (_frame(GOOD, kind=2), "unknown frame type"),
        (_frame(b"{not json"), "not valid JSON"),
        (_frame(b"[1]"), "fields"),
        (_frame(json.dumps({"timeout_ms": 0}).encode()), "fields"),  # name is required
        (_frame(json.dumps({"name": "kv", "timeout_ms": 0, "x": 1}).encode()), "fields"),
        (_frame(json.dumps({"name": 5, "timeout_ms": 0}).encode()), "bad value"),
        (_frame(json.dumps({"name": "kv", "timeout_ms": -1}).encode()), "bad value"),
        (_frame(json.dumps({"name": "kv", "timeout_ms": 1 << 64}).encode()), "bad value"),
        (_frame(json.dumps({"name": "kv", "timeout_ms": True}).encode()), "bad value"),
        (_frame(json.dumps({"name": "x" * 5000, "timeout_ms": 0}).encode()), "bad value"),
        (_frame(b"[" * 60_000), "JSON"),
        (_frame(b" " * frames.MAX_FRAME), "exceeds"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_malformed_frames_raise_protocol_error(data, why):
    with pytest.raises(ProtocolError, match=why):
        frames.decode(data)


def test_fd_count_must_match():
    with pytest.raises(ProtocolError, match="fds"):
        frames.decode(frames.encode(frames.Lookup("kv", 0), 1), nfds=1)


def test_encode_refuses_oversize():
    with pytest.raises(ProtocolError, match="exceeds"):
        frames.encode(frames.Rows([{"x": "y" * 4000}] * 20, 20), 1)


def test_header_layout():
    assert frames.HEADER.size == 16
    assert struct.calcsize("<2sBBHHII") == 16


def test_kernel_side_order_and_ids():
    k = KernelConnection()
    with pytest.raises(ProtocolError, match="Hello first"):
        k.receive(frames.encode(frames.Lookup("kv", 0), 1))
    k = KernelConnection()
    msg, rid = k.receive(frames.encode(frames.Hello(1, "block"), 1))
    assert k.state is State.START
    k.respond(rid, frames.Welcome(1, None, 1))
    assert k.state is State.READY
    with pytest.raises(ProtocolError, match="twice"):
        k.receive(frames.encode(frames.Hello(1, "block"), 2))
    k.receive(frames.encode(frames.Lookup("kv", 10), 5))
    with pytest.raises(ProtocolError, match="already in flight"):
        k.receive(frames.encode(frames.Lookup("kv", 10), 5))
    with pytest.raises(ProtocolError, match="reserved"):
        k.receive(frames.encode(frames.Lookup("kv", 10), 0))
    with pytest.raises(ProtocolError, match="only send requests"):
        k.receive(frames.encode(frames.Ok(), 9))


def test_kernel_side_bounds_in_flight():
    k = KernelConnection()
    k.receive(frames.encode(frames.Hello(1, "block"), 1))
    k.respond(1, frames.Welcome(1, None, 1))
    for i in range(MAX_IN_FLIGHT):
        k.receive(frames.encode(frames.Lookup("kv", 10), 100 + i))
    with pytest.raises(ProtocolError, match="in flight"):
        k.receive(frames.encode(frames.Lookup("kv", 10), 99))


def test_wrong_hello_version_refused():
    k = KernelConnection()
    with pytest.raises(ProtocolError, match="version"):
        k.receive(frames.encode(frames.Hello(2, "block"), 1))


def test_process_side_matches_responses():
    p = ProcessConnection()
    with pytest.raises(ProtocolError):
        p.request(frames.Lookup("kv", 0))  # before Hello
    rid, _ = p.request(frames.Hello(1, "spin"))
    msg, _ = p.receive(frames.encode(frames.Welcome(4, None, 1), rid))
    assert p.state is State.READY
    rid, _ = p.request(frames.Lookup("kv", 0))
    with pytest.raises(ProtocolError, match="does not answer"):
        p.receive(frames.encode(frames.Subscribed(1), rid))
    with pytest.raises(ProtocolError, match="unknown request"):
        p.receive(frames.encode(frames.Ok(), 12345))
    rid, _ = p.request(frames.Lookup("kv", 0))
    msg, _ = p.receive(frames.encode(frames.Error(4, "nope"), rid))
    assert isinstance(msg, frames.Error)
    msg, rid = p.receive(frames.encode(frames.Death(1, 2), 0))
    assert isinstance(msg, frames.Death) and rid == 0
