"""Priority propagation: a call carries its caller thread's priority, the server runs the handler
at it (clamped to the capability's and the service's range, and to what the server process may
set), then goes back to its own. And the timed wait paths: timeouts on time in every wait mode,
a dead peer waking a timed waiter. Real processes, a real kernel."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import threading
import time

import pytest
from _users import become, fresh_uid, need_root, open_to_other_uids
from conftest import Children, readline

import capbus
from capbus import _core


# The server: replies with the priority its handler thread runs at (read from the OS) and the
# one the request carried (req.priority), each + 1000 (data words are u64), and its nice value.
# opcode 2 raises after looking; opcode 3 prints, 0.2 s later (the serve thread waits in recv by
# then), the serving thread's nice value as another thread reads it from /proc.
def _server_code(uid: int | None) -> str:
    return become(uid) + """
import resource, threading
from capbus import _core
rlimit, lo_hi, wait = sys.argv[1], sys.argv[2], sys.argv[3]
p = capbus.connect(wait=wait)
prio = None if lo_hi == "default" else tuple(int(x) for x in lo_hi.split(","))
svc = p.register("prio", priority=prio)
print("ready", p.id, flush=True)

def nice_of(tid):
    with open(f"/proc/self/task/{tid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])

def handler(req):
    mine = _core.thread_priority()
    asked = req.priority
    if req.opcode == 2:
        raise ValueError(f"raised at {mine}")
    if req.opcode == 3:
        tid = threading.get_native_id()
        def later():
            time.sleep(0.2)
            print("idle-nice", nice_of(tid), flush=True)
        threading.Thread(target=later).start()
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    return (0, (mine + 1000, 0 if asked is None else asked + 1000, nice + 1000, 0))

svc.serve(handler)
"""


def start_server(children, kernel, prio="default", rlimit=None, uid=None, wait="adaptive"):
    code = _server_code(uid)
    if rlimit is not None and rlimit > resource.getrlimit(resource.RLIMIT_NICE)[1]:
        soft, hard = resource.getrlimit(resource.RLIMIT_NICE)
        try:  # can this (root) process raise the hard limit at all? (put back at once)
            resource.setrlimit(resource.RLIMIT_NICE, (soft, rlimit))
            resource.setrlimit(resource.RLIMIT_NICE, (soft, hard))
        except (ValueError, OSError):
            pytest.skip(f"cannot raise RLIMIT_NICE above its hard limit {hard} here (no "
                        "CAP_SYS_RESOURCE): the clamp to a non-root server's RLIMIT_NICE is "
                        "not testable")
    if rlimit is not None:  # set while still root, before dropping the uid
        code = f"import resource\nresource.setrlimit(resource.RLIMIT_NICE, ({rlimit}, {rlimit}))\n" + code
    p = children.start(code, str(rlimit), prio, wait, stdin=subprocess.DEVNULL)
    line = readline(p, 20)
    assert line.startswith("ready"), line
    return p


def call_at(ep, nice=None, policy=None, opcode=1):
    """ep.call from a fresh thread at this nice value (or SCHED_FIFO priority `policy`):
    (handler thread's priority, req.priority or None, its nice from os.getpriority)."""
    out: dict = {}

    def run():
        try:
            if nice is not None:
                os.setpriority(os.PRIO_PROCESS, 0, nice)
            if policy is not None:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(policy))
            _core.refresh_priority()
            out["r"] = ep.call(opcode, timeout=10)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            out["e"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join(20)
    assert not t.is_alive(), "the call did not return"
    if "e" in out:
        raise out["e"]
    d = out["r"].data
    return d[0] - 1000, (None if d[1] == 0 else d[1] - 1000), d[2] - 1000


def test_stamp_reads_the_calling_thread():
    assert _core.thread_priority() == -os.getpriority(os.PRIO_PROCESS, 0)
    seen = []

    def run():
        os.setpriority(os.PRIO_PROCESS, 0, 7)  # this thread only
        seen.append(_core.thread_priority())

    t = threading.Thread(target=run)
    t.start()
    t.join(5)
    assert seen == [-7]
    assert _core.thread_priority() == -os.getpriority(os.PRIO_PROCESS, 0)


def test_handler_runs_at_the_callers_nice(kernel, children):
    need_root()
    start_server(children, kernel, prio="-19,0")
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("prio", timeout=10)
        assert call_at(ep, nice=10) == (-10, -10, 10)
        assert call_at(ep, nice=19) == (-19, -19, 19)
        assert call_at(ep, nice=0) == (0, 0, 0)
        # Above the range: clamped to nice 0.
        assert call_at(ep, nice=-5) == (0, 0, 0)
        assert call_at(ep, policy=10) == (0, 0, 0)


def test_no_range_declared_adopts_nothing(kernel, children):
    need_root()
    start_server(children, kernel)
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("prio", timeout=10)
        assert call_at(ep, nice=10) == (0, -10, 0)  # req.priority says it; the thread stays
        assert call_at(ep, nice=-5) == (0, 5, 0)


def test_service_range_clamps(kernel, children):
    need_root()
    start_server(children, kernel, prio="-5,10")
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("prio", timeout=10)
        assert call_at(ep, nice=-8) == (8, 8, -8)
        assert call_at(ep, nice=-15) == (10, 10, -10)
        assert call_at(ep, nice=19) == (-5, -5, 5)


def test_real_time_caller(kernel, children):
    need_root()
    start_server(children, kernel, prio="-19,119")
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("prio", timeout=10)
        try:
            mine, asked, _ = call_at(ep, policy=5)
        except PermissionError:
            pytest.skip("SCHED_FIFO is not permitted here (a container without CAP_SYS_NICE)")
        assert (mine, asked) == (25, 25)
        assert call_at(ep, nice=3) == (-3, -3, 3)  # and back to a nice value afterwards


def test_capability_range_clamps_and_cannot_widen(kernel, children):
    need_root()
    start_server(children, kernel, prio="-19,20")
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("prio", timeout=10)
        assert call_at(ep, nice=-8) == (8, 8, -8)
        low = ep.restrict(max_priority=-3)
        assert low.limits.max_priority == -3
        assert call_at(low, nice=-8) == (-3, -3, 3)
        assert call_at(low, nice=10) == (-10, -10, 10)  # below the cap: as asked
        with pytest.raises(capbus.PermissionDenied):
            low.restrict(max_priority=5)
        assert low.restrict(max_priority=-4).limits.max_priority == -4
        with pytest.raises(ValueError):
            ep.restrict(max_priority=500)


def test_restored_after_the_handler_even_when_it_raises(kernel, children):
    need_root()
    p = start_server(children, kernel, prio="-19,20")
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("prio", timeout=10)
        with pytest.raises(capbus.RemoteError):
            call_at(ep, nice=12, opcode=2)  # the handler ran at nice 12, then raised
        # A one-way message: no reply to restore at; serve() restores after the handler.
        out: dict = {}

        def run():
            os.setpriority(os.PRIO_PROCESS, 0, 15)
            _core.refresh_priority()
            ep.send_async(3)
            out["ok"] = True

        t = threading.Thread(target=run)
        t.start()
        t.join(10)
        assert out == {"ok": True}
        line = readline(p, 10)
        assert line == "idle-nice 0", line  # back at its own nice 0 while it waits


def test_non_root_server_is_clamped_by_rlimit_nice(user_kernel):
    kernel, children, uid = user_kernel
    # RLIMIT_NICE 25: nice values down to -5 only. A caller at nice -15 gets nice -5.
    start_server(children, kernel, prio="-19,20", rlimit=25, uid=uid)
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("prio", timeout=10)
        mine, asked, nice = call_at(ep, nice=-15)
        assert asked == 15  # what it asked for, within the service's range
        assert (mine, nice) == (5, -5)  # what the server process may set
        assert call_at(ep, nice=7) == (-7, -7, 7)  # and it could go back to 0 in between


@pytest.fixture
def user_kernel(sockdir):
    """A kernel that serves a fresh uid too, and children for it."""
    need_root()
    uid = fresh_uid()
    k = capbus.Kernel(os.path.join(sockdir, "k.sock"), capbus.Policy(access={"uids": [uid]}),
                      audit=None)
    open_to_other_uids(k.socket_path)
    c = Children(k.socket_path)
    yield k, c, uid
    c.cleanup()
    k.stop()


def test_non_root_server_that_could_not_go_back_adopts_nothing(user_kernel):
    kernel, children, uid = user_kernel
    # RLIMIT_NICE 0: a thread at nice 0 could lower itself but never return to 0.
    start_server(children, kernel, prio="-19,20", rlimit=0, uid=uid)
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("prio", timeout=10)
        assert call_at(ep, nice=10) == (0, -10, 0)
        assert call_at(ep, nice=-10) == (0, 10, 0)


HOSTILE = """
import mmap, os, struct, sys, time
import capbus
from capbus import _core
from capbus._protocol import frames

p = capbus.connect()
ep = p.lookup("prio", timeout=10).restrict(max_priority=int(sys.argv[1]))
reply, fds = p._request_fds(frames.OpenChannel(ep.handle))  # a raw channel: our own slots
chan_fd = fds[0]
size = _core.channel_size(reply.nslots, reply.arena_size)
chan = mmap.mmap(os.open(f"/proc/self/fd/{chan_fd}", os.O_RDWR), size)
req, resp = _core.REQ_RING_OFF, _core.resp_ring_off(reply.nslots)
flags = (_core.FLAG_REPLY_EXPECTED | _core.FLAG_PRIO | _core.FLAG_PRIO_RR
         | _core.FLAG_PRIO_MASK)                  # the top value a slot can carry, SCHED_RR
slot = struct.pack("<QII4QQII", ep.handle, 1, flags, 0, 0, 0, 0, 1, 0, 0)
chan[req + _core.RING_SLOTS_OFF:req + _core.RING_SLOTS_OFF + 64] = slot
struct.pack_into("<Q", chan, req + _core.RING_TAIL_OFF, 1)
deadline = time.monotonic() + 10        # the server finds it at its next scan (kicks, ~50 ms)
while struct.unpack_from("<Q", chan, resp + _core.RING_TAIL_OFF)[0] == 0:
    if time.monotonic() > deadline:
        print("no reply", flush=True)
        sys.exit(1)
    time.sleep(0.005)
words = struct.unpack_from("<4Q", chan, resp + _core.RING_SLOTS_OFF + 16)
print("got", words[0] - 1000, words[1] - 1000, flush=True)
"""


@pytest.mark.parametrize("cap", [-3, 30])
def test_hostile_slot_value_gets_at_most_its_capability(kernel, children, cap):
    need_root()
    start_server(children, kernel, prio="-19,119", wait="block")
    h = children.start(HOSTILE, str(cap), stdin=subprocess.DEVNULL)
    line = readline(h, 20)
    kind, mine, asked = line.split()
    assert kind == "got" and int(asked) == cap, line  # clamped to the capability's maximum
    # ... and the thread ran at it (a real-time one only where the server may set it: else the
    # most urgent nice value, 20)
    assert int(mine) == cap or (cap > 20 and int(mine) == 20), line


# ---- the timed wait paths ----------------------------------------------------------------------

SLEEPER = """
import capbus, sys, time
p = capbus.connect(wait=sys.argv[1])
svc = p.register("slow")
print("ready", flush=True)
def handler(req):
    time.sleep(req.data[0] / 1000)
    return 0
svc.serve(handler)
"""


@pytest.mark.parametrize("wait", ["spin", "adaptive", "block"])
def test_timeouts_fire_on_time_in_every_mode(kernel, children, wait):
    p = children.start(SLEEPER, wait, stdin=subprocess.DEVNULL)
    assert readline(p, 20) == "ready"
    with capbus.connect(kernel.socket_path, wait=wait) as me:
        ep = me.lookup("slow", timeout=10)
        ep.call(0, (0,), timeout=10)
        # A near deadline (a timed futex sleep) and a far one (the untimed sleep under the
        # watchdog's kicks, then the last stretch timed).
        for timeout in (0.03, 0.25, 0.6):
            t0 = time.monotonic()
            with pytest.raises(capbus.Timeout):
                ep.call(0, (3000,), timeout=timeout)
            took = time.monotonic() - t0
            assert timeout <= took < timeout + 0.15, (wait, timeout, took)
        svc = me.register(f"idle-{wait}")
        for timeout in (0.0, 0.03, 0.25, 0.6):
            t0 = time.monotonic()
            with pytest.raises(capbus.Timeout):
                svc.recv(timeout)
            took = time.monotonic() - t0
            assert timeout <= took < timeout + 0.15, (wait, timeout, took)


@pytest.mark.parametrize("wait", ["adaptive", "block"])
def test_a_dead_server_wakes_a_timed_caller(kernel, children, wait):
    p = children.start(SLEEPER, wait, stdin=subprocess.DEVNULL)
    assert readline(p, 20) == "ready"
    with capbus.connect(kernel.socket_path, wait=wait) as me:
        ep = me.lookup("slow", timeout=10)
        ep.call(0, (0,), timeout=10)
        threading.Timer(0.3, p.kill).start()
        t0 = time.monotonic()
        with pytest.raises(capbus.PeerDied):
            ep.call(0, (20_000,), timeout=30)  # a far deadline: the untimed sleep
        assert time.monotonic() - t0 < 3


@pytest.mark.parametrize("wait", ["adaptive", "block"])
def test_a_far_timed_recv_gets_its_message_at_once(kernel, children, wait):
    """A receive with a far deadline sleeps as an untimed one does: a message still wakes it."""
    with capbus.connect(kernel.socket_path, wait=wait) as me:
        svc = me.register("far")
        got: list = []

        def serve_one():
            req = svc.recv(30)
            got.append(time.monotonic())
            req.reply(0)

        t = threading.Thread(target=serve_one)
        t.start()
        time.sleep(0.3)  # asleep by now
        with capbus.connect(kernel.socket_path, wait=wait) as other:
            ep = other.lookup("far", timeout=10)
            t0 = time.monotonic()
            ep.call(0, timeout=10)
            took = time.monotonic() - t0
        t.join(10)
        assert got and took < 0.02, took


NICE_CALLER = """
import os, sys, capbus
os.setpriority(os.PRIO_PROCESS, 0, int(sys.argv[1]))
p = capbus.connect()
ep = p.lookup("plain", timeout=10)
for _ in range(2):
    ep.call(1, timeout=10)
print("done", flush=True)
"""


def test_plain_recv_runs_at_the_callers_priority_until_reply(kernel, children):
    need_root()
    seen: list = []
    with capbus.connect(kernel.socket_path) as me:
        svc = me.register("plain", priority=(-19, 0))

        def server() -> None:
            for _ in range(2):
                req = svc.recv(10)
                during = _core.thread_priority()
                req.reply(0)
                seen.append((req.priority, during, _core.thread_priority()))

        t = threading.Thread(target=server)
        t.start()
        c = children.start(NICE_CALLER, "9", stdin=subprocess.DEVNULL)
        assert readline(c, 20) == "done"
        t.join(10)
    assert seen == [(-9, -9, 0), (-9, -9, 0)]


def test_serve_waits_untimed_yet_stops_on_close(kernel):
    """serve() sleeps without a timer; Process.close() and Service.close() still end it."""
    for how in ("process", "service"):
        me = capbus.connect(kernel.socket_path, wait="block")
        svc = me.register(f"stop-{how}")
        t = threading.Thread(target=svc.serve, args=(lambda req: 0,))
        t.start()
        time.sleep(0.3)  # asleep in recv by now
        t0 = time.monotonic()
        if how == "process":
            me.close()
        else:
            svc.close()
        t.join(5)
        assert not t.is_alive(), how
        assert time.monotonic() - t0 < 1.0, how
        me.close()


SERVE_FOREVER = """
import capbus
p = capbus.connect(wait="block")
svc = p.register("sigint")
print("ready", flush=True)
try:
    svc.serve(lambda req: 0)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_serve_is_interrupted_by_a_signal(kernel, children):
    p = children.start(SERVE_FOREVER, stdin=subprocess.DEVNULL)
    assert readline(p, 20) == "ready"
    time.sleep(0.3)
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    assert readline(p, 10) == "interrupted"
    assert time.monotonic() - t0 < 1.0
