"""Hostile control-plane input against a real (embedded) kernel.

Every malformed or out-of-order frame must (a) get the offending connection closed by the
kernel, (b) be logged as a ProtocolError on "capbus.kernel", and (c) leave the kernel serving
everybody else: a well-behaved process connected before the attack keeps registering and looking
up, and new processes can connect. The clients here are raw SOCK_SEQPACKET sockets that speak
(or mis-speak) the frame format of capbus._protocol.frames by hand.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import select
import socket
import tempfile
import threading
import time

import pytest
from _raw import Raw, hello, lookup, raw_frame, register
from conftest import wait_for

import capbus
from capbus._protocol import frames
from capbus._protocol.connection import MAX_IN_FLIGHT
from capbus._protocol.frames import HEADER, KIND_EVENT, KIND_REQUEST, KIND_RESPONSE, MAX_FRAME

pytestmark = pytest.mark.timeout(30)

_names = itertools.count()


# ---- raw frames ---------------------------------------------------------------------------------


@pytest.fixture
def raw(kernel):
    made: list[Raw] = []

    def make() -> Raw:
        r = Raw(kernel.socket_path)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


@pytest.fixture
def bystander(kernel):
    """A well-behaved process, connected (and serving) before any attack."""
    proc = capbus.connect(kernel.socket_path, wait="block")
    proc.register("bystander")
    yield proc
    proc.close()


@pytest.fixture
def klog(caplog):
    caplog.set_level(logging.INFO, logger="capbus.kernel")
    return caplog


def violations(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "capbus.kernel"
        and r.levelno == logging.WARNING
        and r.getMessage().startswith("ProtocolError")
    ]


def assert_kernel_serves(kernel: capbus.Kernel, bystander: capbus.Process) -> None:
    """The old process can still register and look up; a new one can connect and use it."""
    name = f"after-{next(_names)}"
    svc = bystander.register(name)
    assert bystander.lookup("bystander").process_id == bystander.id
    with capbus.connect(kernel.socket_path, wait="block") as newcomer:
        assert newcomer.id != bystander.id
        assert newcomer.lookup(name, timeout=2).process_id == bystander.id
        newcomer.register(name + "-new")
        assert bystander.lookup(name + "-new", timeout=2).process_id == newcomer.id
    svc.close()


def assert_rejected(kernel, bystander, klog, conn: Raw, expect: str) -> None:
    """(a) closed by the kernel, (b) one ProtocolError logged naming `expect`, (c) serving."""
    conn.wait_closed()
    logged = violations(klog)
    assert len(logged) == 1, logged
    assert expect in logged[0], logged[0]
    assert_kernel_serves(kernel, bystander)
    # Nothing of the offender stays in the process table.
    assert [p["id"] for p in kernel.processes()] == [bystander.id]


# ---- malformed frames: each in two positions (as the first frame, and after a valid Hello) ----

# A well-formed body for the type used in each position: Hello first, Lookup after it.
GOOD = {
    "first": (1, {"version": 1, "wait_mode": "block"}),
    "after-hello": (4, {"name": "no-such-service", "timeout_ms": 0}),
}
U64 = {"first": "version", "after-hello": "timeout_ms"}  # a u64 field of each
STR = {"first": "wait_mode", "after-hello": "name"}  # a str field of each


def _good(pos: str, **kw) -> bytes:
    type_code, body = GOOD[pos]
    return raw_frame(KIND_REQUEST, type_code, body, **kw)


def _with(pos: str, key: str, value: object) -> bytes:
    type_code, body = GOOD[pos]
    return raw_frame(KIND_REQUEST, type_code, {**body, key: value})


def _without(pos: str, key: str) -> bytes:
    type_code, body = GOOD[pos]
    return raw_frame(KIND_REQUEST, type_code, {k: v for k, v in body.items() if k != key})


def _body_len(pos: str, delta: int) -> bytes:
    """A good frame whose header misstates the body length."""
    good = _good(pos)
    n = min(len(good) - HEADER.size + delta, 0xFFFFFFFF)
    return good[:12] + n.to_bytes(4, "little") + good[HEADER.size :]


def _body(pos: str, raw: bytes | str) -> bytes:
    return raw_frame(KIND_REQUEST, GOOD[pos][0], raw)


# id -> (frame builder for a position, substring of the logged ProtocolError)
MALFORMED = {
    "empty-datagram": (lambda p: b"", "truncated frame: 0 bytes"),
    "truncated-header-5": (lambda p: _good(p)[:5], "truncated frame: 5 bytes"),
    "truncated-header-15": (lambda p: _good(p)[:15], "truncated frame: 15 bytes"),
    "bad-magic": (lambda p: _good(p, magic=b"XX"), "bad magic"),
    "bad-magic-lowercase": (lambda p: _good(p, magic=b"cb"), "bad magic"),
    "wrong-version-2": (lambda p: _good(p, version=2), "protocol version 2"),
    "wrong-version-0": (lambda p: _good(p, version=0), "protocol version 0"),
    "nonzero-flags": (lambda p: _good(p, flags=1), "flags"),
    "nonzero-flags-high": (lambda p: _good(p, flags=0x8000), "flags"),
    "body-len-plus-1": (lambda p: _body_len(p, +1), "body length"),
    "body-len-minus-1": (lambda p: _body_len(p, -1), "body length"),
    "body-len-huge": (lambda p: _body_len(p, 0xFFFFFFFF), "body length"),
    "unknown-type": (lambda p: raw_frame(KIND_REQUEST, 200, {}), "unknown frame type 200"),
    "type-zero": (lambda p: raw_frame(KIND_REQUEST, 0, {}), "unknown frame type 0"),
    "kind-mismatch": (lambda p: raw_frame(KIND_EVENT, GOOD[p][0], GOOD[p][1]), "unknown frame"),
    "kind-zero": (lambda p: raw_frame(0, GOOD[p][0], GOOD[p][1]), "unknown frame"),
    "response-kind-welcome": (
        lambda p: raw_frame(KIND_RESPONSE, 64, {"process_id": 1, "package": None, "pid": 1}),
        "may only send requests",
    ),
    "response-kind-error": (
        lambda p: raw_frame(KIND_RESPONSE, 66, {"code": 1, "text": "x"}),
        "may only send requests",
    ),
    "event-kind-death": (
        lambda p: raw_frame(KIND_EVENT, 129, {"handle": 1, "process_id": 1}, rid=0),
        "may only send requests",
    ),
    "invalid-json": (lambda p: _body(p, b'{"version": 1,'), "not valid JSON"),
    "invalid-utf8": (lambda p: _body(p, b'{"name": "\xff\xfe"}'), "not valid JSON"),
    "empty-body": (lambda p: _body(p, b""), "not valid JSON"),
    "json-list": (lambda p: _body(p, "[1, 2]"), "fields"),
    "json-number": (lambda p: _body(p, "42"), "fields"),
    "json-string": (lambda p: _body(p, '"hello"'), "fields"),
    "json-null": (lambda p: _body(p, "null"), "fields"),
    "json-true": (lambda p: _body(p, "true"), "fields"),
    "missing-key": (lambda p: _without(p, STR[p]), "fields"),  # a required field
    "extra-key": (lambda p: _with(p, "extra", 1), "fields"),
    "no-keys": (lambda p: _body(p, "{}"), "fields"),
    "str-for-u64": (lambda p: _with(p, U64[p], "1"), "bad value"),
    "negative-u64": (lambda p: _with(p, U64[p], -1), "bad value"),
    "u64-overflow": (lambda p: _with(p, U64[p], 2**64), "bad value"),
    "u64-huge": (lambda p: _with(p, U64[p], 10**300), "bad value"),
    "bool-for-u64": (lambda p: _with(p, U64[p], True), "bad value"),
    "float-for-u64": (lambda p: _with(p, U64[p], 1.0), "bad value"),
    "nan-for-u64": (lambda p: _body(p, _good(p)[16:].decode().replace(
        f'"{U64[p]}": {GOOD[p][1][U64[p]]}', f'"{U64[p]}": NaN')), "bad value"),
    "infinity-for-u64": (lambda p: _body(p, _good(p)[16:].decode().replace(
        f'"{U64[p]}": {GOOD[p][1][U64[p]]}', f'"{U64[p]}": 1e400')), "bad value"),
    "null-for-str": (lambda p: _with(p, STR[p], None), "bad value"),
    "int-for-str": (lambda p: _with(p, STR[p], 7), "bad value"),
    "list-for-str": (lambda p: _with(p, STR[p], ["a"]), "bad value"),
    "oversize-str": (lambda p: _with(p, STR[p], "a" * (frames.MAX_STR + 1)), "bad value"),
    "over-max-frame": (
        lambda p: _with(p, STR[p], "a" * (MAX_FRAME + 100 - len(_good(p))
                                          + len(GOOD[p][1][STR[p]]))),
        "larger than the maximum",
    ),
    "deep-nesting-array": (lambda p: _body(p, "[" * (MAX_FRAME - HEADER.size)), "not valid JSON"),
    "deep-nesting-object": (lambda p: _body(p, '{"a":' * ((MAX_FRAME - HEADER.size) // 5)),
                            "not valid JSON"),
    "deep-nesting-100000": (lambda p: _body(p, "[" * 100_000), "larger than the maximum"),
}


@pytest.mark.parametrize("pos", ["first", "after-hello"])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_frame_closes_only_the_offender(kernel, bystander, raw, klog, case, pos):
    build, expect = MALFORMED[case]
    data = build(pos)
    if case == "over-max-frame":
        assert len(data) == MAX_FRAME + 100
    conn = raw()
    if pos == "after-hello":
        conn.hello()
    conn.send(data)
    assert_rejected(kernel, bystander, klog, conn, expect)


# ---- order and bookkeeping violations ----------------------------------------------------------

ORDER = {
    "register-before-hello": ([register("early", rid=1)], "expected Hello first"),
    "lookup-before-hello": ([lookup("bystander", rid=1)], "expected Hello first"),
    "subscribe-before-hello": ([raw_frame(KIND_REQUEST, 6, {}, 1)], "expected Hello first"),
    "query-before-hello": (
        [raw_frame(KIND_REQUEST, 10, {"what": "processes", "offset": 0, "limit": 10}, 1)],
        "expected Hello first",
    ),
    "hello-twice": ([hello(1), hello(2)], "Hello sent twice"),
    "hello-twice-same-id": ([hello(1), hello(1)], "Hello sent twice"),
    "hello-version-2": ([hello(version=2)], "Hello for protocol version 2"),
    "hello-version-0": ([hello(version=0)], "Hello for protocol version 0"),
    "hello-request-id-0": ([hello(rid=0)], "request id 0"),
    "request-id-0": ([hello(1), lookup("bystander", rid=0)], "request id 0"),
    "duplicate-in-flight-id": (
        [hello(1), lookup("missing", 5000, rid=7), lookup("missing", 5000, rid=7)],
        "request id 7 is already in flight",
    ),
    "duplicate-in-flight-id-other-type": (
        [hello(1), lookup("missing", 5000, rid=7), register("dup", rid=7)],
        "request id 7 is already in flight",
    ),
    "too-many-in-flight": (
        [hello(1)] + [lookup(f"missing-{i}", 5000, rid=10 + i) for i in range(MAX_IN_FLIGHT + 1)],
        f"more than {MAX_IN_FLIGHT} requests in flight",
    ),
}


@pytest.mark.parametrize("case", list(ORDER))
def test_protocol_order_violation(kernel, bystander, raw, klog, case):
    sequence, expect = ORDER[case]
    conn = raw()
    for data in sequence:
        conn.send(data)
    got = conn.wait_closed()
    # Nothing but the Welcome (and no answer to any parked lookup) came before the close.
    assert all(isinstance(m, frames.Welcome) for m in got), got
    logged = violations(klog)
    assert len(logged) == 1 and expect in logged[0], logged
    assert_kernel_serves(kernel, bystander)
    assert [p["id"] for p in kernel.processes()] == [bystander.id]


def test_the_in_flight_limit_itself_is_allowed(kernel, bystander, raw, klog):
    """Exactly MAX_IN_FLIGHT parked lookups are fine, and all are answered on registration."""
    conn = raw()
    me = conn.hello().process_id
    name = f"late-{next(_names)}"
    for i in range(MAX_IN_FLIGHT):
        conn.send(lookup(name, 5000, rid=100 + i))
    assert wait_for(lambda: kernel.process_stats(me)["parked"] == MAX_IN_FLIGHT, 2)
    stats = kernel.process_stats(me)
    assert stats["in_flight"] == MAX_IN_FLIGHT
    conn.assert_open()
    svc = bystander.register(name)
    rids, handles = set(), set()
    for _ in range(MAX_IN_FLIGHT):
        got = conn.recv()
        assert got is not None
        msg, rid = got
        assert isinstance(msg, frames.Granted) and msg.process_id == bystander.id, msg
        rids.add(rid)
        handles.add(msg.handle)
    assert rids == {100 + i for i in range(MAX_IN_FLIGHT)}
    assert len(handles) == 1  # one capability per (holder, service)
    stats = kernel.process_stats(me)
    assert (stats["in_flight"], stats["parked"], stats["caps"]) == (0, 0, 1)
    # Request ids are free again once answered.
    conn.send(lookup(name, 0, rid=100))
    msg, rid = conn.recv()
    assert isinstance(msg, frames.Granted) and rid == 100
    assert violations(klog) == []
    svc.close()


# ---- fds sent to the kernel --------------------------------------------------------------------


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _steady_fd_count(timeout: float = 3.0) -> int:
    """The fd count once the kernel has finished releasing what earlier connections held
    (it does so asynchronously): two readings 0.1 s apart agree."""
    last = _fd_count()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = _fd_count()
        if now == last:
            return now
        last = now
    return last


def _assert_eof(read_fd: int, timeout: float = 2.0) -> None:
    """Every copy of the pipe's write end is closed: the read end sees EOF."""
    r, _, _ = select.select([read_fd], [], [], timeout)
    assert r, "a write end sent to the kernel is still open somewhere"
    assert os.read(read_fd, 1) == b""


@pytest.mark.parametrize(
    "frame_kind, nfds",
    [("register", 1), ("register", 3), ("register", 20), ("hello", 2), ("lookup", 8)],
)
def test_fds_sent_to_the_kernel_are_closed(kernel, bystander, raw, klog, frame_kind, nfds):
    """No request carries fds: the frame is rejected and the kernel closes what it received
    (also beyond what fits its ancillary buffer), so its fd table does not grow."""
    assert_kernel_serves(kernel, bystander)  # warm up whatever it opens lazily
    baseline = _steady_fd_count()
    for round_ in range(10):
        conn = raw()
        if frame_kind != "hello":
            conn.hello()
        data = {"register": register(f"fd-{round_}"), "hello": hello(),
                "lookup": lookup("bystander")}[frame_kind]
        pipes = [os.pipe() for _ in range(nfds)]
        conn.send(data, tuple(w for _, w in pipes))
        for _, w in pipes:
            os.close(w)
        conn.wait_closed()
        for r, _ in pipes:
            try:
                _assert_eof(r)
            finally:
                os.close(r)
        conn.close()
    assert len(violations(klog)) == 10
    assert all("fds" in m or "ancillary" in m for m in violations(klog)), violations(klog)
    assert wait_for(lambda: _fd_count() <= baseline, 5), (_fd_count(), baseline)
    assert_kernel_serves(kernel, bystander)


def test_fds_queued_behind_a_rejected_frame_are_released(kernel, bystander, raw, klog):
    """Frames the kernel never reads (it closed at the first) do not keep their fds alive."""
    baseline = _steady_fd_count()
    conn = raw()
    conn.send(b"garbage-frame-that-is-not-capbus")
    pipes = [os.pipe() for _ in range(5)]
    for _, w in pipes:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.send(register("x"), (w,))
        os.close(w)
    conn.wait_closed()
    conn.close()
    for r, _ in pipes:
        try:
            _assert_eof(r)
        finally:
            os.close(r)
    assert len(violations(klog)) == 1
    assert wait_for(lambda: _fd_count() <= baseline, 5), (_fd_count(), baseline)
    assert_kernel_serves(kernel, bystander)


# ---- slow and flooding clients -----------------------------------------------------------------


def test_client_that_never_reads_keeps_one_pending_notice(kernel, bystander, raw, klog):
    """A subscriber that stops reading is owed one coalesced notice, never a growing queue:
    it is not disconnected, however many registrations happen."""
    conn = raw()
    me = conn.hello().process_id
    conn.send(raw_frame(KIND_REQUEST, 6, {}, 2))  # Subscribe; from here on it never reads
    assert wait_for(lambda: kernel.process_stats(me)["caps"] == 1, 2)
    for i in range(300):
        svc = bystander.register(f"storm-{i}")
        svc.close()
    with capbus.connect(kernel.socket_path, wait="block") as other:
        for i in range(50):
            other.register(f"storm-other-{i}")
    stats = kernel.process_stats(me)
    assert stats["notice_pending"] is True
    assert stats["notices_sent"] == 1
    assert stats["outbox"] == 0
    assert stats["in_flight"] == 0
    assert me in [p["id"] for p in kernel.processes()]
    conn.assert_open()
    # What it finally reads is exactly: Subscribed, then one notice; nothing more is queued.
    msg, rid = conn.recv()
    assert isinstance(msg, frames.Subscribed) and rid == 2
    notice, rid = conn.recv()
    assert isinstance(notice, frames.RegistrationNotice) and rid == 0
    assert notice.handle == msg.handle
    with pytest.raises(TimeoutError):
        conn.recv(timeout=0.2)
    # After an acknowledgement the next registration sends the next notice.
    conn.send(raw_frame(KIND_REQUEST, 7, {"handle": msg.handle}, 3))
    ack, rid = conn.recv()
    assert isinstance(ack, frames.Ok) and rid == 3
    bystander.register("storm-after-ack")
    notice, rid = conn.recv()
    assert isinstance(notice, frames.RegistrationNotice) and rid == 0
    assert kernel.process_stats(me)["notices_sent"] == 2
    assert violations(klog) == []


@pytest.mark.timeout(60)
def test_garbage_flood_is_dropped_at_the_first_frame(kernel, bystander, raw, klog):
    """Three clients each try to send 10,000 garbage frames: each is dropped at its first (the
    log names only the first frame's fault), and a well-behaved process keeps working meanwhile."""
    flooders = [raw() for _ in range(3)]
    outcome: dict[int, tuple[int, str]] = {}

    def flood(i: int, conn: Raw) -> None:
        conn.sock.settimeout(5.0)
        sent = 0
        try:
            conn.send(b"X1" + b"\0" * 14)  # first: bad magic
            sent = 1
            for _ in range(9_999):
                conn.send(b"CB")  # the rest: truncated headers
                sent += 1
        except (BrokenPipeError, ConnectionResetError) as exc:
            outcome[i] = (sent, type(exc).__name__)
            return
        except TimeoutError:
            outcome[i] = (sent, "timeout")
            return
        outcome[i] = (sent, "all sent")

    threads = [threading.Thread(target=flood, args=(i, c)) for i, c in enumerate(flooders)]
    for t in threads:
        t.start()
    served = 0
    while any(t.is_alive() for t in threads) or served < 20:
        assert_kernel_serves(kernel, bystander)
        served += 1
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    for i, conn in enumerate(flooders):
        sent, how = outcome[i]
        # The kernel hung up while the flood was under way: sends started to fail.
        assert how in ("BrokenPipeError", "ConnectionResetError"), outcome
        assert sent < 10_000
        conn.wait_closed()
    logged = violations(klog)
    assert len(logged) == 3, logged
    assert all("bad magic" in m for m in logged), logged
    assert [p["id"] for p in kernel.processes()] == [bystander.id]


# ---- bounded per-process state -----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_per_process_state_stays_small_after_hostile_bursts(kernel, bystander, raw, klog):
    # A silent subscriber, a busy (but well-formed) prober, and a stream of violators.
    silent = raw()
    silent_id = silent.hello().process_id
    silent.send(raw_frame(KIND_REQUEST, 6, {}, 2))
    prober = raw()
    prober_id = prober.hello().process_id
    rids = itertools.cycle(range(1, 1 << 32))
    next(rids)

    def ask(data_for_rid) -> frames.Frame:
        rid = next(rids)
        prober.send(data_for_rid(rid))
        got = prober.recv()
        assert got is not None
        msg, got_rid = got
        assert got_rid == rid
        return msg

    # 1. many lookups of the same service: one capability, however often it is granted.
    handles = {ask(lambda r: lookup("bystander", 0, r)).handle for _ in range(1000)}
    assert len(handles) == 1
    (handle,) = handles
    # 2. watching it again and again: one watcher entry.
    for _ in range(200):
        assert isinstance(ask(lambda r: raw_frame(KIND_REQUEST, 8, {"handle": handle}, r)),
                          frames.Ok)
    # 3. lookups of missing names and of stale/forged handles: errors, no state.
    for i in range(300):
        assert isinstance(ask(lambda r, i=i: lookup(f"missing-{i}", 0, r)), frames.Error)
        assert isinstance(ask(lambda r, i=i: raw_frame(KIND_REQUEST, 8, {"handle": i}, r)),
                          frames.Error)
        assert isinstance(
            ask(lambda r, i=i: raw_frame(KIND_REQUEST, 9, {"handle": (i << 32) | i}, r)),
            frames.Error,
        )
    # 4. register/release churn and subscribe again and again.
    for i in range(300):
        reg = ask(lambda r, i=i: register(f"churn-{i}", r))
        assert isinstance(reg, frames.Registered)
        assert isinstance(ask(lambda r, h=reg.handle: raw_frame(KIND_REQUEST, 9, {"handle": h}, r)),
                          frames.Ok)
    for _ in range(50):
        assert isinstance(ask(lambda r: raw_frame(KIND_REQUEST, 6, {}, r)), frames.Subscribed)
    # 5. a burst of parked lookups that then expire.
    for i in range(MAX_IN_FLIGHT):
        prober.send(lookup(f"never-{i}", 50, rid=next(rids)))
    for _ in range(MAX_IN_FLIGHT):
        msg, _ = prober.recv()
        assert isinstance(msg, frames.Error)
    # 6. violators coming and going alongside.
    for i in range(30):
        v = raw()
        v.send(b"CB\x01" if i % 2 else hello(0))
        v.wait_closed()
        v.close()

    prober_stats = kernel.process_stats(prober_id)
    assert prober_stats["outbox"] == 0
    assert prober_stats["in_flight"] == 0
    assert prober_stats["parked"] == 0
    assert prober_stats["caps"] <= 2  # the endpoint and the subscription
    silent_stats = kernel.process_stats(silent_id)
    assert silent_stats["outbox"] == 0
    assert silent_stats["notices_sent"] == 1  # 300 registrations, one notice while it is silent
    assert silent_stats["caps"] == 1
    bystander_stats = kernel.process_stats(bystander.id)
    assert bystander_stats["watchers"] == 1
    assert bystander_stats["caps"] <= 2
    assert bystander_stats["outbox"] == 0
    assert len(violations(klog)) == 30
    assert sorted(p["id"] for p in kernel.processes()) == sorted(
        [bystander.id, silent_id, prober_id]
    )
    assert {s["name"] for s in kernel.services()} == {"bystander"}
    assert_kernel_serves(kernel, bystander)


def test_parked_lookup_timers_do_not_outlive_their_process(kernel, bystander, raw):
    from capbus._kernel.state import ProcessRecord

    for round_ in range(20):
        conn = raw()
        conn.hello()
        for i in range(MAX_IN_FLIGHT):
            conn.send(lookup(f"never-{round_}-{i}", 3_600_000, rid=2 + i))
        me = [p["id"] for p in kernel.processes() if p["id"] != bystander.id][0]
        assert wait_for(lambda me=me: kernel.process_stats(me)["parked"] == MAX_IN_FLIGHT, 2)
        conn.close()
        assert wait_for(lambda: len(kernel.processes()) == 1, 2)
    gc.collect()
    dead = [o for o in gc.get_objects() if type(o) is ProcessRecord and not o.alive]
    assert len(dead) == 0, f"{len(dead)} dead process records retained"
    assert len(kernel._timers) <= MAX_IN_FLIGHT, f"{len(kernel._timers)} timers pending"


# ---- schema-valid values the kernel must survive ----------------------------------------------


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("timeout_ms", [2**31, 30 * 86_400_000, frames.U64_MAX])
def test_long_lookup_timeout_does_not_kill_the_kernel(timeout_ms):
    # Own kernel, not the fixture: a dead loop also breaks Kernel.stop() (see the next test).
    d = tempfile.mkdtemp(prefix="cb-")
    k = capbus.Kernel(os.path.join(d, "k.sock"))
    try:
        conn = Raw(k.socket_path)
        try:
            conn.hello()
            conn.send(lookup("never", timeout_ms, rid=2))
            time.sleep(0.3)
            assert k._thread is not None and k._thread.is_alive(), "the kernel loop died"
            with capbus.connect(k.socket_path, wait="block") as p:
                p.register("alive")
                # The parked lookup is answered when the name appears.
                p.register("never")
            msg, rid = conn.recv()
            assert isinstance(msg, frames.Granted) and rid == 2
        finally:
            conn.close()
    finally:
        with contextlib.suppress(Exception):
            k.stop()
        import shutil

        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_stop_after_the_loop_died_is_clean(sockdir):
    k = capbus.Kernel(os.path.join(sockdir, "k.sock"))

    def boom() -> None:
        raise RuntimeError("simulated kernel bug outside the per-connection guard")

    # A timer callback runs outside the per-dispatch try: this is the loop-crash path.
    k._call(k._after, 0.0, boom)
    assert wait_for(lambda: not k._thread.is_alive(), 2)
    assert not os.path.exists(k.socket_path)
    k.stop()  # must not raise


# ---- a kernel that never answers ----------------------------------------------------------------


@pytest.mark.parametrize("accepts", [False, True], ids=["never-accepts", "accepts-never-answers"])
def test_connect_gives_up_on_a_silent_kernel(sockdir, monkeypatch, accepts):
    from capbus._runtime import control

    monkeypatch.setattr(control, "_KERNEL_GRACE", 0.5)
    path = os.path.join(sockdir, "silent.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(8)
    accepted: list[socket.socket] = []
    result: dict[str, object] = {}

    def connect() -> None:
        t0 = time.monotonic()
        try:
            capbus.connect(path, wait="block").close()
            result["outcome"] = "connected"
        except Exception as exc:
            result["outcome"] = exc
        result["seconds"] = time.monotonic() - t0

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    try:
        if accepts:
            listener.settimeout(5)
            accepted.append(listener.accept()[0])
        t.join(2.5)
        assert not t.is_alive(), "capbus.connect() still blocked after 2.5 s (grace 0.5 s)"
        assert isinstance(result["outcome"], capbus.KernelUnavailable), result
    finally:
        for s in accepted:
            s.close()
        listener.close()  # unblocks a connect() stuck in Hello (connection reset)
        t.join(5)
