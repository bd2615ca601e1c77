"""Hostile attachments and channel hoarding against a real kernel, real client processes.

An attacker attaches whatever it can to its messages (regions it sealed itself, huge regions,
hundreds of capabilities, thousands of unsolicited ones over many messages), leaves attachments
behind on a channel index another client gets next, lets delegations wait forever, and opens
channels until refused. In every case the attacker gets a capbus error and the server keeps
serving an honest client, without an exception out of recv()/serve().
"""

from __future__ import annotations

import fcntl
import gc
import json
import subprocess
import threading

import pytest
from conftest import readline, region_fds, wait_for

import capbus
from capbus._protocol import frames

pytestmark = pytest.mark.timeout(120)

F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)


class Server:
    """A service served from a thread of this process (its own connection): records what each
    request carried and remembers any exception serve() let out."""

    def __init__(self, kernel: capbus.Kernel, name: str = "target", **bounds) -> None:
        self.proc = capbus.connect(kernel.socket_path)
        self.svc = self.proc.register(name, **bounds)
        self.seen: list[tuple[int, int, list[tuple[bool, bytes]]]] = []
        self.kept: list[capbus.Endpoint] = []
        self.kept_handles: list[int] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.svc.serve(self._handle, poll=0.1)
        except BaseException as exc:  # noqa: BLE001 - what the test asserts never happens
            self.error = exc

    def _handle(self, req):
        regions = [(r.writable, bytes(r.buffer[:8])) for r in req.regions]
        self.seen.append((req.opcode, len(req.caps), regions))
        if req.opcode == 7:  # "keep the first capability" (a normal user's `db = req.caps[0]`)
            self.kept.append(req.caps[0])
        elif req.opcode == 8:  # keep it explicitly, and drop every reference to it
            self.kept_handles.append(req.caps[0].keep().handle)
        return (0, (len(req.caps), len(req.regions)))

    def alive(self) -> bool:
        return self.error is None and self.thread.is_alive()

    def close(self) -> None:
        self.proc.close()
        self.thread.join(10)


@pytest.fixture
def server(kernel):
    servers: list[Server] = []

    def make(name: str = "target", **bounds) -> Server:
        s = Server(kernel, name, **bounds)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def honest_check(kernel: capbus.Kernel, srv: Server, name: str = "target") -> None:
    """A client that did nothing wrong is served, and the server never raised."""
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup(name)
        r = me.create_region(4096)
        r.buffer[:8] = b"honest!!"
        assert ep.call(1, timeout=10).data[:2] == (0, 0)
        assert ep.call(2, regions=[r], timeout=10).data[:2] == (0, 1)
    assert srv.alive(), srv.error


def finish(p: subprocess.Popen) -> None:
    if p.stdin:
        p.stdin.close()
    p.wait(30)
    assert p.returncode == 0, p.stderr.read()


# ---- regions sealed by their creator ---------------------------------------------------------

SEALER = """
import capbus, fcntl, os, sys
seals = int(sys.argv[1])
p = capbus.connect()
ep = p.lookup("target")
r = p.create_region(4096)
r.buffer[:8] = b"sealed!!"
fd = r._fresh_fd()  # a writable fd of its own (the runtime keeps none once mapped)
fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)     # the creator may add any seal
os.close(fd)
print("reply", ep.call(1, regions=[r], timeout=10).data[:2], flush=True)
if seals & fcntl.F_SEAL_SEAL:
    try:
        r.seal_readonly()
        print("seal ok", flush=True)
    except capbus.IpcError as exc:
        print("seal", type(exc).__name__, flush=True)
print("reply", ep.call(1, timeout=10).data[:2], flush=True)
"""


@pytest.mark.parametrize("seals", [F_SEAL_FUTURE_WRITE, F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL,
                                   fcntl.F_SEAL_SEAL])
def test_self_sealed_region_arrives_mapped_as_its_seals_allow(kernel, children, server, seals):
    srv = server()
    p = children.start(SEALER, str(seals), stdin=subprocess.DEVNULL)
    assert readline(p, 30) == "reply (0, 1)"
    opcode, ncaps, regions = srv.seen[0]
    # Mapped read-only when it can no longer be mapped writable, and readable either way.
    assert regions == [(not seals & F_SEAL_FUTURE_WRITE, b"sealed!!")]
    if seals & fcntl.F_SEAL_SEAL:  # the kernel refuses the seal it can no longer add
        assert readline(p, 30) == "seal PermissionDenied"
    assert readline(p, 30) == "reply (0, 0)"
    finish(p)
    honest_check(kernel, srv)


# ---- bounds on one message -------------------------------------------------------------------

HOARDER = """
import capbus
p = capbus.connect()
ep = p.lookup("target")

def attempt(what, **kw):
    try:
        print(what, ep.call(1, timeout=10, **kw).data[:2], flush=True)
    except capbus.IpcError as exc:
        print(what, type(exc).__name__, str(exc)[:200].replace("\\n", " "), flush=True)

huge = [p.create_region(1 << 40) for _ in range(60)]   # sparse: 60 TiB of address space
attempt("huge60", regions=huge)
attempt("huge60b", regions=huge)              # with the first, more than the address space
attempt("huge1", regions=huge[:1])
del huge
small = [p.create_region(4096) for _ in range(17)]
attempt("regions17", regions=small)
attempt("regions16", regions=small[:16])
attempt("caps700", caps=[ep] * 700)
attempt("caps17", caps=[ep] * 17)
attempt("caps16", caps=[ep] * 16)
attempt("plain")
"""


def test_attachments_over_the_bounds_are_refused_to_the_sender(kernel, children, server):
    srv = server()
    p = children.start(HOARDER, stdin=subprocess.DEVNULL)
    got = dict(readline(p, 60).split(" ", 1) for _ in range(9))
    for what, bound in (("huge60", "max_regions"), ("huge60b", "max_regions"),
                        ("huge1", "max_region_bytes"),
                        ("regions17", "max_regions"), ("caps700", "max_caps"),
                        ("caps17", "max_caps")):
        assert got[what].startswith("MessageTooLarge"), (what, got[what])
        assert bound in got[what], got[what]
    assert got["regions16"] == "(0, 16)"
    assert got["caps16"] == "(16, 0)"
    assert got["plain"] == "(0, 0)"
    finish(p)
    # Only the accepted messages reached the server, and nothing of the refused ones waits.
    assert sorted((n, len(r)) for _, n, r in srv.seen) == [(0, 0), (0, 16), (16, 0)]
    assert kernel.services()[0]["attachments"] == 0
    honest_check(kernel, srv)


# ---- unsolicited capabilities ----------------------------------------------------------------

FLOODER = """
import capbus, sys
n = int(sys.argv[1])
p = capbus.connect()
ep = p.lookup("target")
for i in range(n):
    ep.call(1, caps=[ep] * 16, timeout=10)
print("sent", n * 16, flush=True)
"""


def test_unsolicited_caps_never_fill_the_servers_table(kernel, children, server):
    srv = server()
    db = server("db")
    # A normal user: a capability that came with a message and is still referred to works.
    with capbus.connect(kernel.socket_path) as friend:
        friend.lookup("target").call(7, caps=[friend.lookup("db")], timeout=10)
    p = children.start(FLOODER, "320", stdin=subprocess.DEVNULL)  # 5120 > the table's 4096
    assert readline(p, 100) == "sent 5120"
    finish(p)
    assert srv.alive(), srv.error
    assert sum(n for _, n, _ in srv.seen) == 5121
    # What the handler did not keep went back to the kernel (the releases trail the replies).
    assert wait_for(lambda: kernel.process_stats(srv.proc.id)["caps"] < 64, 10), \
        kernel.process_stats(srv.proc.id)
    gc.collect()
    (kept,) = srv.kept
    assert kept.call(3, timeout=10).data[:2] == (0, 0)
    assert db.seen[-1][0] == 3
    honest_check(kernel, srv)


def test_a_claim_takes_what_fits_and_releases_the_rest(kernel, children, server):
    srv = server()
    # Fill the server's table to a few handles short of its 4096.
    own = srv.proc.lookup("target")
    held = [own.restrict() for _ in range(4096 - kernel.process_stats(srv.proc.id)["caps"] - 3)]
    p = children.start(FLOODER, "2", stdin=subprocess.DEVNULL)
    assert readline(p, 60) == "sent 32"
    finish(p)
    assert srv.alive(), srv.error
    assert [n for _, n, _ in srv.seen] == [3, 3] or sum(n for _, n, _ in srv.seen) <= 6
    assert srv.svc.dropped_attachments >= 26
    # Nothing of the dropped children is left hanging in the kernel.
    assert kernel.services()[0]["attachments"] == 0
    for h in held:
        h.close()
    honest_check(kernel, srv)


PARKER = """
import capbus
from capbus._protocol import frames
p = capbus.connect()
ep = p.lookup("target")
ep.call(1, timeout=10)
lane = ep._local.lane
n = 0
try:
    for tag in range(1000, 1000 + 5000):       # attachments to messages it never sends
        p._request(frames.Delegate(ep.handle, ep.handle, lane.index, tag, False))
        n += 1
except capbus.IpcError as exc:
    print("refused", n, type(exc).__name__, flush=True)
print("reply", ep.call(1, timeout=10).data[:2], flush=True)
input()
"""


def test_pending_attachments_are_bounded_per_client(kernel, children, server):
    srv = server()
    p = children.start(PARKER, stdin=subprocess.PIPE)
    refused = readline(p, 60).split()
    assert refused[0] == "refused" and refused[2] == "OutOfMemory", refused
    assert int(refused[1]) < 4096  # its share, never the whole service's
    assert readline(p, 30) == "reply (0, 0)"
    # Another client can still attach.
    honest_check(kernel, srv)
    p.stdin.write("\n")
    finish(p)


# ---- attachments bound to the channel instance ------------------------------------------------

LEAVER = """
import capbus
from capbus._protocol import frames
p = capbus.connect()
ep = p.lookup("target")
ep.call(1, timeout=10)
lane = ep._local.lane
regions = [p.create_region(4096) for _ in range(8)]
for r in regions:
    r.buffer[:8] = b"leftover"
for tag in range(1, 9):                         # the next client's first tags on this index
    p._request(frames.Delegate(regions[tag - 1].handle, ep.handle, lane.index, tag, False))
print("index", lane.index, flush=True)
ep.close()                                      # its channel closes, the index is free again
print("closed", flush=True)
input()
"""


def test_a_new_client_never_sees_a_former_clients_attachments(kernel, children, server):
    srv = server()
    p = children.start(LEAVER, stdin=subprocess.PIPE)
    index = int(readline(p, 30).split()[1])
    assert readline(p, 30) == "closed"
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("target")
        for _ in range(4):
            r = me.create_region(4096)
            r.buffer[:8] = b"mine!!!!"
            assert ep.call(1, regions=[r], timeout=10).data[:2] == (0, 1)
        assert ep._local.lane.index == index  # it did get the former client's index
    assert [r for _, _, r in srv.seen[-4:]] == [[(True, b"mine!!!!")]] * 4
    p.stdin.write("\n")
    finish(p)
    honest_check(kernel, srv)


# ---- expiry ------------------------------------------------------------------------------------

LINGERER = """
import capbus, os, sys
from capbus._protocol import frames
p = capbus.connect()
ep = p.lookup("target")
ep.call(1, timeout=10)
lane = ep._local.lane
r = p.create_region(1 << 20)
for tag in range(100, 110):
    p._request(frames.Delegate(r.handle, ep.handle, lane.index, tag, False))
r.close()                                       # only the pending attachments hold it now
if sys.argv[1] == "close":
    ep.close()                                  # its channel closes with them pending
print("parked", flush=True)
if sys.argv[1] == "die":
    os._exit(0)                                 # dies with them pending
input()
"""


@pytest.mark.parametrize("then", ["stay", "close", "die"])
def test_pending_delegations_expire_on_time(kernel, children, server, then):
    srv = server(attach_ttl=0.5)
    before = region_fds()  # the embedded kernel's region fds live in this process
    p = children.start(LINGERER, then, stdin=subprocess.PIPE)
    assert readline(p, 30) == "parked"
    if then != "die":
        assert kernel.services()[0]["attachments"] == 10
        assert region_fds() == before + 1
    # Nobody delegates anything more: the kernel's timer alone lets them go.
    assert wait_for(lambda: kernel.services()[0]["attachments"] == 0, 5)
    assert wait_for(lambda: region_fds() == before, 5)
    if then != "die":
        p.stdin.write("\n")
    finish(p)
    honest_check(kernel, srv)


# ---- channels per client ---------------------------------------------------------------------

GRABBER = """
import capbus, sys, threading
n_threads = int(sys.argv[1])
conns = [capbus.connect() for _ in range(5)]    # connecting again gains a process nothing
eps = [c.lookup("target") for c in conns]
results = []
start = threading.Barrier(n_threads)
hold = threading.Event()

def caller(i):
    ep = eps[i % len(eps)].restrict()   # a fresh capability: no per-capability lane limit
    start.wait()
    try:
        ep.call(1, timeout=30)
        results.append("ok")
    except capbus.IpcError as exc:
        results.append(type(exc).__name__ + ":" + str(exc))
    hold.wait()                         # keep the lane (it belongs to this thread)

threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(n_threads)]
for t in threads:
    t.start()
while len(results) < n_threads:
    threading.Event().wait(0.05)
ok = results.count("ok")
errors = sorted(set(r for r in results if r != "ok"))
print("ok", ok, flush=True)
print("errors", errors, flush=True)
# Opening lanes in a loop is refused just the same.
try:
    for _ in range(100):
        eps[0]._open_lane()
    print("loop open", flush=True)
except capbus.IpcError as exc:
    print("loop", type(exc).__name__, flush=True)
input()
hold.set()
for t in threads:
    t.join(10)
# Its threads are done and their lanes gone: the count is freed.
import gc, time
gc.collect()
lanes = []
for _ in range(100):            # the closes travel on other connections: allow them to land
    try:
        lanes.append(eps[1].restrict()._open_lane())
    except capbus.OutOfMemory:
        time.sleep(0.1)
    if len(lanes) == 3:
        break
print("after", len(lanes), flush=True)
"""


def test_one_client_process_cannot_take_every_channel(kernel, children, server):
    srv = server()
    p = children.start(GRABBER, "300", stdin=subprocess.PIPE)
    assert readline(p, 100) == "ok 128"
    errors = readline(p, 30)
    assert "OutOfMemory" in errors and "max_channels_per_process" in errors, errors
    assert readline(p, 30) == "loop OutOfMemory"
    # Everyone else can still open channels: 40 calling threads of another process.
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("target")
        out: list[int] = []
        ts = [threading.Thread(target=lambda: out.append(ep.call(1, timeout=30).opcode))
              for _ in range(40)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert out == [0] * 40
    p.stdin.write("\n")
    p.stdin.flush()
    assert readline(p, 60) == "after 3"
    finish(p)
    honest_check(kernel, srv)


OPENER = """
import capbus
p = capbus.connect()
ep = p.lookup("target")
lanes = []
try:
    while len(lanes) < 100:
        lanes.append(ep.restrict()._open_lane())
except capbus.IpcError as exc:
    print(len(lanes), type(exc).__name__, str(exc), flush=True)
input()
"""


def test_channels_per_uid_are_bounded(kernel, children, server):
    srv = server(max_channels_per_process=4, max_channels_per_uid=6)
    a = children.start(OPENER, stdin=subprocess.PIPE)
    first = readline(a, 30)
    assert first.startswith("4 OutOfMemory") and "max_channels_per_process" in first, first
    b = children.start(OPENER, stdin=subprocess.PIPE)
    second = readline(b, 30)
    assert second.startswith("2 OutOfMemory") and "max_channels_per_uid" in second, second
    a.stdin.write("\n")
    finish(a)  # its channels close with it: the uid's count goes down again
    assert wait_for(lambda: kernel.services()[0]["clients"] == 2, 10)
    honest_check(kernel, srv)
    b.stdin.write("\n")
    finish(b)


def test_bounds_are_checked_at_register(kernel):
    with capbus.connect(kernel.socket_path) as me:
        for bad, named in (({"max_caps": 65}, "max_caps"), ({"max_regions": 1000}, "max_regions"),
                           ({"max_channels_per_process": 4096}, "max_channels_per_process"),
                           ({"max_channels_per_process": 10, "max_channels_per_uid": 5},
                            "max_channels_per_uid"),
                           ({"max_channels_per_process": 0}, "max_channels_per_process")):
            with pytest.raises(ValueError, match=named):
                me.register("bounded", **bad)
        me.register("bounded", max_caps=64, max_channels_per_process=4095)


def test_attachments_of_a_message_never_sent_do_not_ride_on_the_next(kernel, server):
    srv = server()
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("target")
        small = ep.restrict(max_message_size=16)
        with pytest.raises(capbus.MessageTooLarge):  # refused by the lane before it is written
            small.call(1, payload=b"x" * 100, caps=[ep] * 3, timeout=10)
        assert small.call(1, caps=[ep], timeout=10).data[:2] == (1, 0)
        with pytest.raises(capbus.MessageTooLarge):
            small.send_async(1, payload=b"x" * 100, caps=[ep] * 3)
        assert small.call(1, timeout=10).data[:2] == (0, 0)
    assert [n for _, n, _ in srv.seen] == [1, 0]
    assert wait_for(lambda: kernel.services()[0]["attachments"] == 0, 5)


WIDE = """
import capbus
p = capbus.connect()
wide = p.lookup("\\x01" * 255)                   # 255 bytes that JSON spells in 1530
print("reply", p.lookup("target").call(1, caps=[wide] * 64, timeout=10).data[:2], flush=True)
"""


def test_a_claim_answer_always_fits_one_frame(kernel, children, server):
    srv = server(max_caps=64)
    server("\x01" * 255)
    p = children.start(WIDE, stdin=subprocess.DEVNULL)
    reply = readline(p, 30)
    finish(p)
    n = int(reply.strip("reply (").split(",")[0])
    assert 20 < n < 64  # as many as one frame holds; the rest released in the kernel
    assert srv.svc.dropped_attachments == 64 - n
    assert kernel.services()[0]["attachments"] == 0
    honest_check(kernel, srv)


def test_keep_holds_a_received_capability_with_no_reference_left(kernel, server):
    srv = server()
    db = server("db")
    with capbus.connect(kernel.socket_path) as friend:
        friend.lookup("target").call(8, caps=[friend.lookup("db")], timeout=10)
        friend.lookup("target").call(1, caps=[friend.lookup("db")], timeout=10)  # not kept
    gc.collect()
    (handle,) = srv.kept_handles
    assert srv.proc._endpoints[handle].call(5, timeout=10).data[:2] == (0, 0)
    assert db.seen[-1][0] == 5
    handles = {int(c["handle"], 16) for c in kernel.caps(srv.proc.id)}
    assert handle in handles
    # The one not kept went back once its Request was done (the service cap and the kept one).
    assert wait_for(lambda: len(kernel.caps(srv.proc.id)) == 2, 5), kernel.caps(srv.proc.id)


# ---- the frames (no processes) ---------------------------------------------------------------


@pytest.mark.parametrize("msg", [
    frames.Register("kv", None, None, {"max_caps": 4, "attach_ttl_ms": 500}),
    frames.RegisterPackage(None, None, {"max_channels_per_uid": 9}),
    frames.Attach(1, 2, 3, [4, (1 << 64) - 1], [], False),
    frames.Detach(1, 2, 3),
    frames.Claim(1, 2, 3, 4),
    frames.ChannelOpened(1, 2, 3, 256, 1 << 27, 9),
], ids=lambda m: type(m).__name__)
def test_new_frames_round_trip(msg):
    rid = 0 if msg.KIND == frames.KIND_EVENT else 7
    assert frames.decode(frames.encode(msg, rid), msg.FDS) == (msg, rid)


@pytest.mark.parametrize("body", [
    {"name": "kv", "bounds": {"max_cap": 1}},                 # unknown bound
    {"name": "kv", "bounds": {"max_caps": -1}},
    {"name": "kv", "bounds": {"max_caps": True}},
    {"name": "kv", "bounds": [1]},
])
def test_bad_bounds_are_protocol_errors(body):
    raw = json.dumps(body).encode()
    data = frames.HEADER.pack(frames.MAGIC, frames.VERSION, frames.KIND_REQUEST, 2, 0, 1,
                              len(raw)) + raw
    with pytest.raises(capbus.ProtocolError, match="bad value"):
        frames.decode(data)


@pytest.mark.parametrize("caps", [[-1], [True], ["1"], [0] * (frames.MAX_LIST + 1), None])
def test_bad_attach_lists_are_protocol_errors(caps):
    raw = json.dumps({"via": 1, "index": 0, "tag": 1, "caps": caps, "regions": []}).encode()
    data = frames.HEADER.pack(frames.MAGIC, frames.VERSION, frames.KIND_REQUEST, 22, 0, 1,
                              len(raw)) + raw
    with pytest.raises(capbus.ProtocolError, match="bad value"):
        frames.decode(data)
