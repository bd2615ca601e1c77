"""The sleep watchdog: a ServerSet in wait mode block or adaptive with no deadline (recv() with
timeout_ns=-1) sleeps on its doorbell futex without a timer; one native thread per process wakes
every set that stayed in the same untimed sleep across a whole tick (WD_TICK_NS = SLEEP_CAP_NS / 2),
so a wake-up that a hostile client made go missing costs ~2 ticks of latency, never a hang.

The scenarios run in a child (tests/_ring_stress_child.py, roles lost_wakeup*) holding both the
ServerSet and the Lane: a recv() that never returned, or that blocked with the GIL held, would
hang the process it runs in, and here that fails the test through the child's timeout instead.
A lost wake-up is made the way a hostile client can: once the server sleeps (doorbell flag
server_sleeping = 1, its thread blocked in FUTEX_WAIT), the flag is cleared, then an honest Lane
sends, sees no sleeper and skips the futex wake.
"""

from __future__ import annotations

import platform
import time

import pytest
from _core_util import Chan, reap, result, spawn  # noqa: E402

from capbus import _core  # noqa: E402

pytestmark = pytest.mark.timeout(120)

SEC = 1_000_000_000
MODES = {"block": _core.WAIT_BLOCK, "adaptive": _core.WAIT_ADAPTIVE}
# The watchdog wakes a set asleep for a whole tick: between 1 and 2 ticks after it fell asleep.
TICK = _core.SLEEP_CAP_NS / 2 / SEC
# /proc/<pid>/task/<tid>/syscall tells a doorbell sleep from a lock wait (and an untimed one).
KNOWN_ARCH = platform.machine() in ("x86_64", "aarch64")


def check_trials(trials: list[dict]) -> list[float]:
    lat = []
    for t in trials:
        assert not t["stuck"], f"a lost wake-up was never recovered (recv still asleep after 1 s): {t}"
        assert t["exc"] is None, t
        assert t["req"] == t["want"], t
        assert t["latency"] < 1.0, t
        if KNOWN_ARCH:
            assert t["untimed"], f"recv() with no deadline slept with a timer: {t}"
        lat.append(t["latency"])
    return lat


def run_role(role: str, ch: Chan, db: int, timeout: float = 30, **kw) -> dict:
    p = spawn(role, ch.args(db, **kw), [db, ch.chan, ch.ctrl])
    try:
        return result(p, timeout)
    finally:
        reap(p)


@pytest.mark.parametrize("mode", list(MODES))
def test_lost_wakeup_is_recovered_by_the_watchdog(db, chans, mode):
    res = run_role("lost_wakeup", chans(1), db, mode=MODES[mode], trials=4)
    lat = check_trials(res["trials"])
    # Not an honest wake (that takes microseconds): the message waited for the watchdog. Each
    # trial sends within a moment of the server falling asleep, so it waits most of 1-2 ticks;
    # one trial in four is enough to tell, whatever the scheduling noise.
    assert max(lat) >= 0.010, lat
    # ... and not much more than the 2 ticks it is bounded by (a median, for scheduling noise).
    assert sorted(lat)[len(lat) // 2] < 4 * 2 * TICK, lat
    # One native thread, started by the first untimed sleep, and only one.
    assert res["tasks_after"] == res["tasks_before"] + 1, res
    # Idle with no deadline: the watchdog's wake-ups deliver nothing, and the recv thread leaves
    # the GIL to the others while it sleeps (the main thread kept ticking).
    assert res["idle_alive"], res
    assert res["idle_ticks"] >= 5, res
    idle = res["idle"]
    assert not idle["stuck"] and idle["exc"] is None and idle["req"] == [1, 99], idle
    assert idle["latency"] < 1.0, idle


def test_honest_wakeup_needs_no_watchdog(db, chans):
    """The control: the same scenario without the hostile store is woken by the sender."""
    res = run_role("lost_wakeup", chans(1), db, mode=_core.WAIT_BLOCK, trials=4, hostile=False)
    lat = check_trials(res["trials"])
    # Honest wake-ups take microseconds; allow scheduling noise on a loaded 2-CPU machine, but
    # not the watchdog's 25-50 ms for all of them.
    assert sorted(lat)[1] < 0.010, lat


def test_watchdog_serves_several_sets_after_one_is_closed(db, chans):
    res = run_role("lost_wakeup_many", chans(1), db, mode=_core.WAIT_BLOCK)
    check_trials(res["trials"])
    assert [t["want"][1] for t in res["trials"]] == [20, 21, 10, 11]


@pytest.mark.parametrize("mode", list(MODES))
def test_forked_child_starts_its_own_watchdog(db, chans, mode):
    """The parent's server sleeps untimed (its watchdog thread exists) when it forks; the child
    serves on a ServerSet of its own and gets the same guarantee from a watchdog of its own; the
    parent's sleeping server loses a wake-up during the fork and is rescued too."""
    res = run_role("lost_wakeup_fork", chans(1), db, mode=MODES[mode], trials=3)
    check_trials(res["before"])
    assert res["tasks_parent"] >= 2, res  # the main thread and the watchdog
    across = dict(res["across"], want=[1, 50])
    check_trials([across])
    assert res["child_status"] == 0, res
    child = res["child"]
    assert child is not None and "error" not in child, child
    assert child["tasks_at_fork"] == 1, child  # fork() copies only the forking thread
    check_trials(child["trials"])
    assert child["tasks_after"] == 2, child  # ... so the child started a watchdog of its own
    check_trials(res["after"])  # and the parent's is still working after the fork


@pytest.mark.parametrize("mode", [_core.WAIT_ADAPTIVE, _core.WAIT_BLOCK])
def test_doorbell_scribbler_never_hangs_untimed_server(db, chans, mode):
    """test_core_ring's scribbler scenario against a server whose recv() has no deadline at all
    (random bytes, all bits set, server_sleeping cleared, seq frozen on the doorbell)."""
    good, stopper = chans(1), chans(2)
    srv = spawn("echo_server", {"db": db, "mode": mode, "untimed": True, "max_seconds": 60,
                                "channels": [good.args(db), stopper.args(db)]},
                [db, good.chan, good.ctrl, stopper.chan, stopper.ctrl])
    cl = spawn("timed_caller", good.args(db, seconds=3, mode=mode), [db, good.chan, good.ctrl])
    sc = spawn("scribble_doorbell", {"db": db, "seconds": 3}, [db])
    try:
        res = result(cl, 40)
        result(sc, 30)
        # Stop the server: even this wake-up may be lost to what the scribbler left behind.
        ln = _core.Lane(stopper.chan, stopper.ctrl, db, stopper.index, stopper.nslots,
                        stopper.arena, mode)
        t0 = time.monotonic()
        assert ln.call(7, 2, 0, (), None, 5 * SEC)[0] == 102
        assert time.monotonic() - t0 < 2.0
        served = result(srv, 30)["served"]
    finally:
        reap(cl, sc, srv)
    assert res["n"] > 10 and served >= res["n"], (res, served)
    # A lost wake-up costs at most ~2 watchdog ticks (plus scheduling noise), never a hang.
    assert res["worst"] < 2.0, res
