"""The audit trail's retained window is shared fairly: when it is full, rows go from whoever
holds the most (water-filling across uids, then across the processes of a uid), each losing its
own oldest rows; so a flood, however long, pushes out only the flooder's rows.

First the AuditLog on its own (exact counts, reopen, old files, failed writes), then a real
kernel with a small window and a real flooding process (of the same uid and of another one).
"""

from __future__ import annotations

import collections
import os
import random
import sqlite3
import subprocess
import textwrap
import time

import pytest
from _users import become, fresh_uid, need_root, open_to_other_uids
from conftest import Children, readline, wait_for

import capbus
from capbus._kernel import audit
from capbus._kernel.audit import AuditLog, _Tally, query

pytestmark = pytest.mark.timeout(120)


def owners_in_file(path: str) -> dict[tuple[int, int], int]:
    with sqlite3.connect(path) as conn:
        return {(uid, pid): n for uid, pid, n in
                conn.execute("SELECT uid, pid, count(*) FROM events GROUP BY uid, pid")}


def rows_of(path: str, uid: int, pid: int) -> list[int]:
    """The details (ints) of an owner's rows, oldest first."""
    with sqlite3.connect(path) as conn:
        return [int(d) for (d,) in conn.execute(
            "SELECT detail FROM events WHERE uid = ? AND pid = ? ORDER BY id", (uid, pid))]


def write(log: AuditLog, uid: int, pid: int, n: int, first: int = 0) -> None:
    for i in range(first, first + n):
        log.record(audit.DENIED, process_id=pid, pid=pid, uid=uid, detail=str(i))


# ---- the water-filling itself -------------------------------------------------------------------


def greedy_levels(counts: dict[int, int], excess: int) -> list[int]:
    """What is left, sorted, when one row at a time goes from a current largest key."""
    left = dict(counts)
    for _ in range(excess):
        key = max(left, key=lambda k: left[k])
        left[key] -= 1
    return sorted(left.values())


def test_cuts_are_water_filling():
    rng = random.Random(7)
    for _ in range(400):
        tally = _Tally()
        counts = {k: rng.choice([1, 1, 2, 3, 5, 8, 40, 41, 300]) for k in range(rng.randint(1, 30))}
        for k, n in counts.items():
            tally.add(k, n)
        excess = rng.randint(0, tally.total + 3)
        cuts = dict(tally.cuts(excess))
        assert sum(cuts.values()) == min(excess, tally.total)
        assert all(0 < n <= counts[k] for k, n in cuts.items())
        left = {k: counts[k] - cuts.get(k, 0) for k in counts}
        assert sorted(left.values()) == greedy_levels(counts, min(excess, tally.total))
        # a key loses rows only down to the common level (within one of the highest left):
        # nobody below it loses any, nobody ends above it
        if cuts:
            assert min(left[k] for k in cuts) >= max(left.values()) - 1


def test_tally_forgets_keys_at_zero():
    tally = _Tally()
    for k in range(1000):
        tally.add(k, 3)
    for k in range(1000):
        tally.add(k, -3)
    assert tally.total == 0 and tally.counts == {} and tally.by_count == {}


# ---- AuditLog ---------------------------------------------------------------------------------


def test_a_flooder_pushes_out_only_its_own_rows(tmp_path):
    path = str(tmp_path / "audit.db")
    with AuditLog(path, max_rows=1000) as log:
        write(log, 1000, 11, 30)  # the quiet one, first and oldest
        log.flush()
        for round_ in range(50):  # the flood: 50,000 rows, the window cycles 50 times
            write(log, 1001, 22, 1000, round_ * 1000)
            if round_ % 10 == 0:
                write(log, 1000, 11, 1, 1000 + round_)  # the quiet one, now and then
            log.flush()
            assert log._count() == 1000
        assert log.owners() == owners_in_file(path)
    assert rows_of(path, 1000, 11) == list(range(30)) + [1000 + r for r in range(0, 50, 10)]
    flood = rows_of(path, 1001, 22)
    assert flood == list(range(50_000 - len(flood), 50_000))  # its newest
    assert len(flood) + 35 == 1000


def test_water_filling_exact_counts(tmp_path):
    """uids A {p1: 50, p2: 30}, B {p3: 10}, C {p4: 5}: 95 rows into a window of 60. A (80) is
    cut to 45; within A, p1 and p2 are levelled at 23 and the one that held more gives one more:
    p1 22, p2 23. B and C keep all theirs."""
    path = str(tmp_path / "audit.db")
    with AuditLog(path, max_rows=60) as log:
        write(log, 100, 1, 50)
        write(log, 100, 2, 30)
        write(log, 200, 3, 10)
        write(log, 300, 4, 5)
        assert log.flush() == 95
        assert log.owners() == {(100, 1): 22, (100, 2): 23, (200, 3): 10, (300, 4): 5}
    assert owners_in_file(path) == {(100, 1): 22, (100, 2): 23, (200, 3): 10, (300, 4): 5}
    assert rows_of(path, 100, 1) == list(range(28, 50))  # each lost its oldest
    assert rows_of(path, 100, 2) == list(range(7, 30))
    assert rows_of(path, 200, 3) == list(range(10))
    # query() still sees them in id order
    ids = [r["id"] for r in query(path, limit=0)]
    assert ids == sorted(ids) and len(ids) == 60


def test_the_kernels_own_rows_are_an_owner_like_any_other(tmp_path):
    path = str(tmp_path / "audit.db")
    with AuditLog(path, max_rows=100) as log:
        log.record(audit.KERNEL_START, pid=os.getpid(), detail="start")
        log.record(audit.KERNEL_STOP)  # uid -1, pid 0
        write(log, 0, 77, 5000)
        log.flush()
    events = [r["event"] for r in query(path, limit=0)]
    assert events[:2] == [audit.KERNEL_START, audit.KERNEL_STOP]
    assert len(events) == 100


def test_many_short_lived_pids_keep_the_count_table_bounded(tmp_path):
    path = str(tmp_path / "audit.db")
    with AuditLog(path, max_rows=500) as log:
        for pid in range(1, 20_001):  # 20,000 pids, two rows each, a few flushes
            log.record(audit.PROCESS_START, pid=pid, uid=pid % 3)
            log.record(audit.PROCESS_EXIT, pid=pid, uid=pid % 3)
            if pid % 3000 == 0:
                log.flush()
                assert len(log.owners()) <= 500
        log.flush()
        owners = log.owners()
        assert sum(owners.values()) == log._count() == 500
        assert owners == owners_in_file(path)
        # entries that reached 0 are gone, in both levels of the table
        assert all(n > 0 for n in owners.values())
        assert set(log._pids) == {uid for uid, _ in owners}
        assert sum(len(t.counts) for t in log._pids.values()) == len(owners)


def test_reopen_counts_the_rows_again_and_stays_fair(tmp_path):
    path = str(tmp_path / "audit.db")
    with AuditLog(path, max_rows=300) as log:
        write(log, 5, 50, 20)
        write(log, 6, 60, 200)
        log.flush()
    with AuditLog(path, max_rows=300) as log:
        assert log.owners() == {(5, 50): 20, (6, 60): 200} == owners_in_file(path)
        assert log._count() == 220
        write(log, 6, 60, 1000, 200)  # over the window: only uid 6 pays
        log.flush()
        assert log.owners() == {(5, 50): 20, (6, 60): 280}
    # reopened with a smaller window: trimmed at once, fairly
    with AuditLog(path, max_rows=100) as log:
        assert log.owners() == {(5, 50): 20, (6, 60): 80} == owners_in_file(path)
    assert rows_of(path, 5, 50) == list(range(20))
    assert rows_of(path, 6, 60) == list(range(1120, 1200))


def test_a_file_without_the_owner_index_opens_and_gets_it(tmp_path):
    """A file written before fair trimming: same table, same schema version, no events_owner."""
    path = str(tmp_path / "audit.db")
    with sqlite3.connect(path) as conn:
        for statement in audit._SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version={audit.SCHEMA_VERSION}")
        conn.executemany(audit._INSERT, [(time.time(), "grant", 1, 10 + i % 3, 1000, "", "",
                                          str(i)) for i in range(90)])
        conn.execute("DELETE FROM events WHERE id <= 30")  # ids no longer start at 1
    conn.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'events_owner'"
                            ).fetchone()[0] == 0
    conn.close()
    assert len(query(path, limit=0)) == 60  # readable as it is
    with AuditLog(path, max_rows=1000) as log:
        assert log.owners() == {(1000, 10): 20, (1000, 11): 20, (1000, 12): 20}
        assert log._count() == 60
    with sqlite3.connect(path) as conn:
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'events_owner'").fetchone()
        assert sql and "(uid, pid, id)" in sql[0]
        assert conn.execute("PRAGMA user_version").fetchone()[0] == audit.SCHEMA_VERSION
        plan = " ".join(str(r) for r in conn.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM events WHERE uid = 1 AND pid = 2 ORDER BY id "
            "LIMIT 5"))
        assert "events_owner" in plan and "TEMP B-TREE" not in plan, plan


def test_a_failed_write_leaves_the_counts_as_the_file(tmp_path):
    path = str(tmp_path / "audit.db")
    log = AuditLog(path, max_rows=100)
    write(log, 1, 1, 100)
    log.flush()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # holds the write lock: the next flush fails
    write(log, 2, 2, 50)
    assert log.flush() == 0
    assert log.owners() == {(1, 1): 100}
    other.execute("ROLLBACK")
    other.close()
    log._retry_at = 0.0  # no need to wait out the back-off here
    assert log.flush() == 50
    assert log.owners() == {(1, 1): 50, (2, 2): 50} == owners_in_file(path)
    log.close()


# ---- a real kernel, a real flooder ---------------------------------------------------------------

_VICTIM = """
p = capbus.connect(sys.argv[1])
p.register("victim.svc")
p.lookup("bystander.svc", timeout=5)
try:
    p.lookup("secret.svc", timeout=5)
except capbus.PermissionDenied:
    pass
print("ready", os.getpid(), os.getuid(), flush=True)
sys.stdin.readline()
"""

_FLOODER = """
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
s.settimeout(10)
s.connect(os.environ["CAPBUS_SOCKET"])
s.send(frames.encode(frames.Hello(frames.VERSION, "block"), 1))
s.recv(frames.MAX_FRAME)
denied = 0
while not select.select([sys.stdin], [], [], 0)[0]:
    for i in range(32):
        s.send(frames.encode(frames.Lookup("secret.svc", 0), 2 + i))
    for i in range(32):
        r = frames.decode(s.recv(frames.MAX_FRAME), 0)[0]
        denied += isinstance(r, frames.Error)
sys.stdin.readline()  # the line that stopped the flood
print("denied", denied, flush=True)
sys.stdin.readline()  # the line that ends the process
"""

WINDOW = 2000


def max_id(path: str) -> int:
    rows = query(path, limit=1)
    return rows[-1]["id"] if rows else 0


@pytest.mark.parametrize("flooder", ["same uid", "another uid"])
def test_a_flood_cycling_the_window_keeps_everyone_elses_rows(sockdir, flooder):
    fuid = os.getuid()
    if flooder == "another uid":
        need_root()
        fuid = fresh_uid()
    k = capbus.Kernel(os.path.join(sockdir, "k.sock"), capbus.Policy(
        access={"uids": [fuid]} if fuid != os.getuid() else None,
        lookup=lambda who, name: name != "secret.svc",
        # the rate limits are lifted: what is tested is the window, and a flood that cycles it
        limits={"audit_rows": WINDOW, "audit_rows_per_second": 1_000_000,
                "audit_rows_per_uid_second": 1_000_000}))
    kids = Children(k.socket_path)
    owner = capbus.connect(k.socket_path)
    try:
        owner.register("bystander.svc")
        owner.register("secret.svc")
        path = k.audit_path
        victim = kids.start(become() + textwrap.dedent(_VICTIM), k.socket_path,
                            stdin=subprocess.PIPE)
        line = readline(victim, 30).split()
        assert line[0] == "ready"
        vpid, vuid = int(line[1]), int(line[2])
        assert wait_for(lambda: len(rows_of_victim(path, vpid)) >= 4, 5)
        before = rows_of_victim(path, vpid)
        mine = [r for r in query(path, limit=0) if r["pid"] == os.getpid()]
        assert [r["event"] for r in mine][:1] == [audit.KERNEL_START]
        assert {r["event"] for r in before} >= {audit.PROCESS_START, audit.REGISTER, audit.GRANT,
                                                audit.DENIED}

        if flooder == "another uid":
            open_to_other_uids(k.socket_path)
        hog = kids.start(become(fuid) + textwrap.dedent(_FLOODER), stdin=subprocess.PIPE)
        start = max_id(path)
        # Long enough to replace the whole window four times over.
        assert wait_for(lambda: max_id(path) - start >= 4 * WINDOW, 60, 0.05), max_id(path)
        hog.stdin.write("\n")
        hog.stdin.flush()
        denied = int(readline(hog, 30).split()[1])
        assert denied >= 4 * WINDOW
        live = k._call(lambda: k._audit.owners())  # the kernel's count table, while it runs
        hog.stdin.write("\n")
        hog.stdin.flush()
        hog.wait(10)
        victim.stdin.write("\n")
        victim.stdin.flush()
        victim.wait(10)
    finally:
        kids.cleanup()
        owner.close()
        k.stop()
    rows = query(path, limit=0)
    print(f"{flooder}: {denied} denials, {len(rows)} rows kept, owners {live}")
    assert len(rows) == WINDOW  # trimmed back to it at every flush
    after = rows_of_victim(path, vpid)
    assert [r["id"] for r in after][:len(before)] == [r["id"] for r in before]  # every one kept
    assert [r for r in rows if r["pid"] == os.getpid()][: len(mine)] == mine
    flood = [r for r in rows if r["pid"] == hog.pid]
    assert flood and all(r["uid"] == fuid for r in flood)
    assert all(r["event"] in (audit.DENIED, audit.PROCESS_EXIT) for r in flood)  # its newest
    assert vuid == os.getuid()
    by_owner = collections.Counter((r["uid"], r["pid"]) for r in rows)
    assert max(by_owner, key=by_owner.get) == (fuid, hog.pid)


def rows_of_victim(path: str, pid: int) -> list[dict]:
    return [r for r in query(path, limit=0) if r["pid"] == pid]
