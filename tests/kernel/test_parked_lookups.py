"""Lookups parked in the kernel (a lookup with a timeout, waiting for a name to be registered)
are bounded per OS process (KernelLimits.parked_lookups, over all its connections) and per uid
(parked_lookups_per_uid): past a bound the asker gets OutOfMemory naming the limit, and nobody
else notices. Every way out of the park (granted, expired, connection gone, refused) gives the
count back.

The hogs are real processes of a fresh uid (root only) speaking the frame format by hand over
several connections each; the bystander is a real process of the test's uid.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import threading
import time

import pytest
from _raw import RAW
from _users import become, fresh_uid, need_root, open_to_other_uids
from conftest import Children, readline, wait_for

import capbus

pytestmark = pytest.mark.timeout(120)

# A hog: NCONN connections; on "burst PER TIMEOUT_MS PREFIX WAIT" it parks PER lookups of names
# nobody serves on each connection and reports what was answered within WAIT seconds; on "read
# WAIT" it reports what was answered since. Fds that come with an answer are closed.
_HOG = """
import itertools, json
socks = []
for _ in range(int(sys.argv[1])):
    s = conn()
    assert isinstance(hello(s), frames.Welcome)
    socks.append(s)
rids = itertools.count(2)

def read(wait):
    got = collections.Counter()
    reasons = set()
    deadline = time.monotonic() + wait
    while socks and (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select(socks, [], [], left)
        for s in ready:
            msg = recv(s)
            if isinstance(msg, frames.Error):
                got[f"error {msg.code}"] += 1
                reasons.add(msg.text)
            else:
                got[type(msg).__name__] += 1
    return {"got": dict(got), "reasons": sorted(reasons)}

print("ready", os.getpid(), os.getuid(), flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "burst":
        per, timeout_ms, prefix, wait = int(cmd[1]), int(cmd[2]), cmd[3], float(cmd[4])
        for j, s in enumerate(socks):
            for i in range(per):
                s.send(frames.encode(frames.Lookup(f"{prefix}-{j}-{i}", timeout_ms), next(rids)))
        print(json.dumps(read(wait)), flush=True)
    elif cmd[0] == "read":
        print(json.dumps(read(float(cmd[1]))), flush=True)
"""

_BYSTANDER = """
p = capbus.connect(sys.argv[1])
print("waiting", os.getpid(), flush=True)
t = time.monotonic()
ep = p.lookup("late.svc", timeout=60)
print("granted", ep is not None, round(time.monotonic() - t, 3), flush=True)
sys.stdin.readline()
"""

OOM = capbus.OutOfMemory.code
NOT_FOUND = capbus.ServiceNotFound.code


def ask(p: subprocess.Popen, command: str, timeout: float = 30) -> dict:
    p.stdin.write(command + "\n")
    p.stdin.flush()
    return json.loads(readline(p, timeout))


def counts(k: capbus.Kernel) -> tuple[dict, dict, int]:
    """The kernel's parked-lookup counters (per client, per uid) and the keys waited for."""
    return k._call(lambda: (dict(k._st.parked_by_pid), dict(k._st.parked_by_uid), len(k._st.waiters)))


def test_parked_lookups_are_bounded_per_process_and_per_uid(sockdir):
    need_root()
    hog_uid = fresh_uid()
    k = capbus.Kernel(os.path.join(sockdir, "k.sock"),
                      capbus.Policy(limits={"parked_lookups": 8, "parked_lookups_per_uid": 20},
                                    access={"uids": [hog_uid]}))
    open_to_other_uids(k.socket_path)
    kids = Children(k.socket_path)
    owner = capbus.connect(k.socket_path)
    try:
        def hog() -> tuple[subprocess.Popen, int]:
            p = kids.start(become(hog_uid) + RAW + textwrap.dedent(_HOG), "4", stdin=subprocess.PIPE)
            line = readline(p, 30).split()
            assert line[0] == "ready" and int(line[2]) == hog_uid
            return p, int(line[1])

        # A: 4 connections, 4 lookups each: 8 park (its per-process bound), 8 are refused
        a, a_pid = hog()
        got = ask(a, "burst 4 1500 a 0.5")
        assert got["got"] == {f"error {OOM}": 8}, got
        assert all("parked_lookups limit" in r and f"pid {a_pid}" in r for r in got["reasons"])
        assert counts(k) == ({a_pid: 8}, {hog_uid: 8}, 8)
        # expired: the 8 are answered ServiceNotFound and counted out; A may park 8 again
        got = ask(a, "read 5")
        assert got["got"] == {f"error {NOT_FOUND}": 8}, got
        assert counts(k) == ({}, {}, 0)
        assert ask(a, "burst 4 3600000 a2 0.5")["got"] == {f"error {OOM}": 8}

        # B, another process of the uid: A's bound is not B's
        b, b_pid = hog()
        assert ask(b, "burst 4 3600000 b 0.5")["got"] == {f"error {OOM}": 8}
        # C: the uid's 20 are reached after 4
        c, c_pid = hog()
        got = ask(c, "burst 4 3600000 c 0.5")
        assert got["got"] == {f"error {OOM}": 12}, got
        assert any(f"uid {hog_uid} already has 20" in r and "parked_lookups_per_uid" in r
                   for r in got["reasons"]), got
        assert counts(k) == ({a_pid: 8, b_pid: 8, c_pid: 4}, {hog_uid: 20}, 20)
        assert k.process_stats(owner.id)["parked_by_uid"] == 0

        # a bystander of another uid parks, and is granted when the name appears
        by = kids.start(become() + textwrap.dedent(_BYSTANDER), k.socket_path,
                        stdin=subprocess.PIPE)
        by_pid = int(readline(by, 30).split()[1])
        assert wait_for(lambda: counts(k)[0].get(by_pid) == 1, 10), counts(k)
        got = ask(c, "burst 1 3600000 more 0.5")  # the hog's uid, at its bound, parks no more
        assert got["got"] == {f"error {OOM}": 4}, got
        late = owner.register("late.svc")
        line = readline(by, 30).split()
        assert line[:2] == ["granted", "True"], line
        # granted: B's parked lookups of names that appear are answered and counted out
        named = [owner.register(f"b-{j}-{i}") for j in range(4) for i in range(4)]
        assert ask(b, "read 5")["got"] == {"Granted": 8}
        assert counts(k) == ({a_pid: 8, c_pid: 4}, {hog_uid: 12}, 12)

        # connections gone: every lookup they parked is counted out
        c.kill()
        c.wait(10)
        assert wait_for(lambda: counts(k) == ({a_pid: 8}, {hog_uid: 8}, 8), 10), counts(k)
        a.stdin.close()  # A's loop ends, it exits, its connections close
        a.wait(10)
        assert wait_for(lambda: counts(k) == ({}, {}, 0), 10), counts(k)
        assert k.process_stats(owner.id)["parked"] == 0
        # and no expiry timer is left armed (hour-long ones above)
        assert k._call(lambda: [t for t in k._timers
                                if getattr(t.fn, "__name__", "") == "expire"]) == []
        by.stdin.write("\n")
        by.stdin.flush()
        by.wait(10)
        for svc in [late, *named]:
            svc.close()
    finally:
        kids.cleanup()
        owner.close()
        k.stop()


def test_the_lookup_past_the_bound_raises_out_of_memory(sockdir):
    """Through the runtime: the bound is a clear OutOfMemory, at once, for the one asking."""
    k = capbus.Kernel(os.path.join(sockdir, "k.sock"),
                      capbus.Policy(limits={"parked_lookups": 2, "parked_lookups_per_uid": 2}))
    p = capbus.connect(k.socket_path)
    other = capbus.connect(k.socket_path)
    results: dict[str, object] = {}

    def wait_for_name(name: str) -> None:
        try:
            results[name] = p.lookup(name, timeout=30)
        except capbus.IpcError as exc:
            results[name] = exc

    threads = [threading.Thread(target=wait_for_name, args=(n,)) for n in ("x1", "x2")]
    try:
        for t in threads:
            t.start()
        assert wait_for(lambda: k.process_stats(p.id)["parked"] == 2, 10)
        t0 = time.monotonic()
        with pytest.raises(capbus.OutOfMemory, match="parked_lookups limit"):
            p.lookup("x3", timeout=30)
        with pytest.raises(capbus.OutOfMemory, match="parked_lookups"):
            other.lookup("x3", timeout=30)  # the same pid: its connections share the bound
        assert time.monotonic() - t0 < 10  # refused at once, not after the timeout
        with pytest.raises(capbus.ServiceNotFound):
            p.lookup("x3")  # no timeout: nothing to park, the usual answer
        svcs = [other.register(n) for n in ("x1", "x2")]
        for t in threads:
            t.join(10)
        assert all(isinstance(results[n], capbus.Endpoint) for n in ("x1", "x2")), results
        stats = k.process_stats(p.id)
        assert (stats["parked"], stats["parked_by_pid"], stats["parked_by_uid"]) == (0, 0, 0)
        threading.Timer(0.3, lambda: svcs.append(other.register("x3"))).start()
        assert isinstance(p.lookup("x3", timeout=10), capbus.Endpoint)  # room again
    finally:
        for t in threads:
            t.join(10)
        p.close()
        other.close()
        k.stop()


def test_parked_lookup_limits_from_toml(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("[limits]\nparked_lookups = 5\nparked_lookups_per_uid = 50\naudit_rows = 7\n")
    lim = capbus.Policy.from_toml(str(path)).limits
    assert (lim.parked_lookups, lim.parked_lookups_per_uid, lim.audit_rows) == (5, 50, 7)
    d = capbus.KernelLimits()
    assert (d.parked_lookups, d.parked_lookups_per_uid, d.audit_rows) == (64, 1024, 1_000_000)
    with pytest.raises(ValueError, match="at least parked_lookups"):
        capbus.KernelLimits(parked_lookups=10, parked_lookups_per_uid=5)
    with pytest.raises(ValueError, match="positive integer"):
        capbus.Policy(limits={"parked_lookups": 0})
