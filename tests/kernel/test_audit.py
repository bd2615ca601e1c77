"""The audit trail on its own (no kernel): the SQLite file, its bounds, its failures, and the
`capbus audit` command body."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sqlite3
import stat
import time

import pytest

from capbus._cli import audit as _audit_cli
from capbus._kernel import audit
from capbus._kernel.audit import AuditLog, query


def _args(**kw) -> argparse.Namespace:
    base = dict(socket=None, db=None, since=None, process=None, event=None, json=False, limit=1000)
    base.update(kw)
    return argparse.Namespace(**base)


def _count(path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT count(*) FROM events").fetchone()[0]


def test_record_flush_query_round_trip(tmp_path):
    path = str(tmp_path / "private" / "audit.db")
    with AuditLog(path) as log:
        assert log.enabled
        log.record(audit.PROCESS_START, process_id=1, pid=100, uid=1000, target="pkg.a")
        log.record(audit.REGISTER, process_id=1, pid=100, uid=1000, handle=(7 << 32) | 3,
                   target="calc")
        log.record(audit.GRANT, process_id=2, pid=200, uid=1001, handle=0x5_0000_0001,
                   target="calc")
        log.record(audit.DENIED, process_id=3, pid=300, uid=1002, target="calc",
                   detail="not on its allowlist")
        assert log.pending == 4
        assert query(path) == []  # nothing is written before a flush
        assert log.flush() == 4
        assert log.pending == 0
        assert log.flush() == 0
    rows = query(path)
    assert [r["event"] for r in rows] == ["process-start", "register", "grant", "denied"]
    assert set(rows[0]) == set(audit.COLUMNS)
    assert rows[1]["handle"] == "0x700000003"
    assert rows[2]["handle"] == "0x500000001"
    assert rows[0]["handle"] == ""
    assert rows[3] | {"id": 0, "time": 0} == {
        "id": 0, "time": 0, "event": "denied", "process_id": 3, "pid": 300, "uid": 1002,
        "handle": "", "target": "calc", "detail": "not on its allowlist",
    }
    assert all(abs(r["time"] - time.time()) < 60 for r in rows)
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    # filters, and the newest `limit` rows, oldest first
    assert [r["event"] for r in query(path, process_id=1)] == ["process-start", "register"]
    assert [r["event"] for r in query(path, event="grant")] == ["grant"]
    assert [r["event"] for r in query(path, limit=2)] == ["grant", "denied"]
    assert query(path, since=time.time() + 60) == []
    assert len(query(path, since=time.time() - 60)) == 4
    assert len(query(path, limit=0)) == 4


def test_file_is_private_wal_and_versioned(tmp_path):
    directory = tmp_path / "new-dir"
    path = str(directory / "audit.db")
    log = AuditLog(path)
    log.record("x")
    log.flush()
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    for extra in ("-wal", "-shm"):
        if os.path.exists(path + extra):
            assert stat.S_IMODE(os.stat(path + extra).st_mode) == 0o600
    log.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == audit.SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        indexed = {r[0] for r in conn.execute("SELECT tbl_name || '.' || sql FROM sqlite_master "
                                              "WHERE type = 'index'")}
        assert any("(time)" in s for s in indexed) and any("(process_id)" in s for s in indexed)
    # an existing file with a loose mode is tightened
    os.chmod(path, 0o644)
    AuditLog(path).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_default_path_is_beside_the_socket(tmp_path):
    sock = str(tmp_path / "run" / "kernel.sock")
    assert audit.default_path(sock) == str(tmp_path / "run" / "audit.db")
    assert audit.default_path("rel.sock") == os.path.join(os.getcwd(), "audit.db")


def test_survives_restart(tmp_path):
    path = str(tmp_path / "audit.db")
    log = AuditLog(path)
    log.record(audit.KERNEL_START, detail="first life")
    log.record(audit.GRANT, process_id=1)
    log.close()
    log.record("after-close")  # ignored, not an error
    log.close()  # idempotent
    log = AuditLog(path)
    log.record(audit.KERNEL_START, detail="second life")
    log.record(audit.GRANT, process_id=1)
    log.close()
    rows = query(path)
    assert [r["detail"] for r in rows if r["event"] == "kernel-start"] == ["first life", "second life"]
    assert len(rows) == 4
    assert [r["id"] for r in rows] == list(range(rows[0]["id"], rows[0]["id"] + 4))


def test_bounded_rows_keeps_the_newest(tmp_path):
    path = str(tmp_path / "audit.db")
    with AuditLog(path, max_rows=1000) as log:
        for i in range(5000):
            log.record(audit.GRANT, process_id=i % 7, detail=str(i))
            if i % 100 == 99:
                log.flush()
                assert _count(path) <= 1010
        for i in range(5000, 8000):  # one big flush trims as well
            log.record(audit.GRANT, detail=str(i))
        log.flush()
    n = _count(path)
    assert 1000 <= n <= 1010
    rows = query(path, limit=0)
    assert rows[-1]["detail"] == "7999"
    assert [int(r["detail"]) for r in rows] == list(range(8000 - n, 8000))
    # reopened with a smaller bound: trimmed at once
    AuditLog(path, max_rows=10).close()
    assert [r["detail"] for r in query(path)] == [str(i) for i in range(7990, 8000)]
    with pytest.raises(ValueError):
        AuditLog(path, max_rows=0)


def test_buffer_overflow_is_counted(tmp_path):
    path = str(tmp_path / "audit.db")
    extra = 7
    with AuditLog(path) as log:
        for i in range(audit.MAX_PENDING + extra):
            log.record(audit.GRANT, process_id=1, detail=str(i))
        assert log.pending == audit.MAX_PENDING
        assert log.dropped == extra
        assert log.due()  # far more than FLUSH_BATCH wait
        written = log.flush()  # one batch: the backlog drains over several calls
        assert written == audit.MAX_BATCH + 1
        assert log.dropped == 0
        while log.due():
            assert log.flush() > 0
        assert log.pending == 0
    rows = query(path, limit=0)
    assert len(rows) == audit.MAX_PENDING + 1
    assert rows[0]["event"] == audit.AUDIT_DROPPED
    assert rows[0]["detail"].startswith(f"{extra} events dropped")
    assert [r for r in rows if r["event"] == audit.AUDIT_DROPPED] == rows[:1]
    assert rows[1]["detail"] == str(extra)  # the oldest were the ones dropped
    assert rows[-1]["detail"] == str(audit.MAX_PENDING + extra - 1)
    assert rows[0]["time"] <= rows[1]["time"]


def test_long_fields_are_cut(tmp_path):
    path = str(tmp_path / "audit.db")
    with AuditLog(path) as log:
        log.record(audit.BAD_MESSAGE, target="t" * 10_000, detail="d" * 100_000)
    (row,) = query(path)
    assert len(row["target"]) == audit.MAX_TARGET
    assert len(row["detail"]) == audit.MAX_DETAIL


def test_disabled_log(tmp_path):
    log = AuditLog(None)
    assert not log.enabled
    for _ in range(10):
        log.record(audit.GRANT, process_id=1)
    assert log.pending == 0
    assert not log.due()
    assert log.due_in() is None
    assert log.flush() == 0
    log.close()
    assert os.listdir(tmp_path) == []


def test_due_and_due_in(tmp_path):
    log = AuditLog(str(tmp_path / "audit.db"))
    assert not log.due() and log.due_in() is None
    log.flush()  # just flushed: the next is not due for FLUSH_INTERVAL
    log.record("x")
    assert 0.0 <= log.due_in() <= audit.FLUSH_INTERVAL
    deadline = time.monotonic() + 5
    while not log.due():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert log.due_in() == 0.0
    log.flush()
    for _ in range(audit.FLUSH_BATCH + 1):
        log.record("x")
    assert log.due() and log.due_in() == 0.0  # a large batch does not wait for the interval
    log.close()


def test_refuses_files_that_are_not_its_own(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("this is not a database, " * 100)
    with pytest.raises(ValueError, match="not a capbus audit log"):
        AuditLog(str(text))
    with pytest.raises(ValueError, match="not a capbus audit log"):
        query(str(text))
    assert text.read_text().startswith("this is not a database")

    other = str(tmp_path / "other.db")
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, name TEXT)")
    with pytest.raises(ValueError, match="schema version"):
        AuditLog(other)

    future = str(tmp_path / "future.db")
    AuditLog(future).close()
    with sqlite3.connect(future) as conn:
        conn.execute("PRAGMA user_version = 2")
    with pytest.raises(ValueError, match="schema version 2"):
        AuditLog(future)
    with pytest.raises(ValueError, match="schema version 2"):
        query(future)

    with pytest.raises(FileNotFoundError):
        query(str(tmp_path / "missing.db"))
    assert not os.path.exists(tmp_path / "missing.db")  # a read does not create the file


def test_read_only_query_beside_a_writer(tmp_path, caplog):
    path = str(tmp_path / "audit.db")
    log = AuditLog(path)
    log.record(audit.REGISTER, process_id=1, target="svc")
    log.flush()
    # another connection holds the write lock with an uncommitted row
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO events (time, event) VALUES (?, 'uncommitted')", (time.time(),))
    # readers are not blocked and see only what is committed
    assert [r["event"] for r in query(path)] == ["register"]
    # the writer cannot write now: no exception, a warning, the rows kept, a back-off
    log.record(audit.GRANT, process_id=2, target="svc")
    with caplog.at_level(logging.WARNING, logger="capbus.kernel"):
        assert log.flush() == 0
    assert any("cannot write" in r.getMessage() for r in caplog.records)
    assert all(r.name == "capbus.kernel" for r in caplog.records)
    assert log.pending == 1
    assert not log.due() and log.due_in() > 0  # backing off, not retrying every loop turn
    other.execute("ROLLBACK")
    other.close()
    assert log.flush() == 1
    assert [r["event"] for r in query(path)] == ["register", "grant"]
    # and a read-only reader holding a snapshot does not stop the writer
    reader = sqlite3.connect("file:" + path + "?mode=ro", uri=True, isolation_level=None)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM events").fetchone()[0] == 2
    log.record(audit.REVOKE, process_id=2)
    assert log.flush() == 1
    assert reader.execute("SELECT count(*) FROM events").fetchone()[0] == 2  # its snapshot
    reader.execute("COMMIT")
    assert reader.execute("SELECT count(*) FROM events").fetchone()[0] == 3
    reader.close()
    log.close()


def test_flush_of_ten_thousand_rows(tmp_path):
    path = str(tmp_path / "audit.db")
    with AuditLog(path) as log:
        for i in range(10_000):
            log.record(audit.GRANT, process_id=i % 100, pid=4000 + i, uid=1000, handle=i + 1,
                       target="service.name", detail="granted an endpoint")
        assert log.flush() == 10_000
    assert _count(path) == 10_000


# ---- capbus audit ---------------------------------------------------------------------------------


@pytest.fixture
def trail(tmp_path):
    """A socket path and its audit log: an old event (3 h ago) and recent ones of processes 1, 2."""
    sock = str(tmp_path / "kernel.sock")
    path = audit.default_path(sock)
    with AuditLog(path) as log:
        log.record(audit.PROCESS_START, process_id=1, pid=111, uid=1000, detail="old")
        log.record(audit.REGISTER, process_id=1, pid=111, uid=1000, handle=0xABC, target="calc")
        log.record(audit.GRANT, process_id=2, pid=222, uid=1001, handle=0x1_0000_0002,
                   target="calc")
        log.record(audit.BAD_MESSAGE, process_id=1, pid=111, uid=1000, target="calc",
                   detail="from process 2: " + "x" * 200 + "\x1b[31m")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE events SET time = time - 3 * 3600 WHERE detail = 'old'")
    return sock, path


def test_cli_table(trail, capsys):
    sock, _ = trail
    assert _audit_cli.run(_args(socket=sock)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["TIME", "EVENT", "PROCESS", "PID", "UID", "HANDLE", "TARGET",
                                "DETAIL"]
    assert len(lines) == 5
    assert "process-start" in lines[1] and "register" in lines[2] and "0xabc" in lines[2]
    assert lines[3].split()[-7:] == ["grant", "2", "222", "1001", "0x100000002", "calc", "-"]
    bad = lines[4]
    assert "\x1b" not in bad  # control characters from a process never reach the terminal
    detail = bad.split("calc", 1)[1].strip()
    assert len(detail) == 60 and detail.endswith("...")
    # the stamp: local HH:MM:SS.mmm (after MM-DD when the rows span other days than today)
    tokens = lines[2].split()
    stamp = tokens[tokens.index("register") - 1]
    assert datetime.datetime.strptime(stamp, "%H:%M:%S.%f")


def test_cli_table_fits_the_terminal(trail):
    rows = query(trail[1])
    for width in (100, 160):
        lines = _audit_cli.format_table(rows, width).splitlines()
        assert max(len(line) for line in lines) <= width
    assert "\\x1b[31m" in _audit_cli.format_table(rows[-1:], 1000)


def test_cli_since_and_process(trail, capsys):
    sock, _ = trail
    assert _audit_cli.run(_args(socket=sock, since="1h", json=True)) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["event"] for r in rows] == ["register", "grant", "bad-message"]
    assert _audit_cli.run(_args(socket=sock, since="4h", json=True)) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4
    iso = datetime.datetime.fromtimestamp(time.time() - 2 * 3600).isoformat(timespec="seconds")
    assert _audit_cli.run(_args(socket=sock, since=iso, json=True)) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3
    assert _audit_cli.run(_args(socket=sock, process=2, json=True)) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["event"] == "grant" and row["pid"] == 222 and row["handle"] == "0x100000002"
    assert _audit_cli.run(_args(socket=sock, process=1, since="1h", json=True)) == 0
    assert [r["event"] for r in json.loads(capsys.readouterr().out)] == ["register", "bad-message"]
    assert _audit_cli.run(_args(socket=sock, event="grant", json=True)) == 0
    assert len(json.loads(capsys.readouterr().out)) == 1
    assert _audit_cli.run(_args(socket=sock, limit=1, json=True)) == 0
    assert [r["event"] for r in json.loads(capsys.readouterr().out)] == ["bad-message"]
    assert _audit_cli.run(_args(socket=sock, process=99)) == 0
    out = capsys.readouterr()
    assert out.out == "" and "no matching" in out.err
    assert _audit_cli.run(_args(socket=sock, since="yesterday-ish")) == 1
    assert "cannot read --since" in capsys.readouterr().err


def test_cli_parse_since():
    now = 1_700_000_000.0
    assert _audit_cli.parse_since("30s", now) == now - 30
    assert _audit_cli.parse_since("10m", now) == now - 600
    assert _audit_cli.parse_since("2h", now) == now - 7200
    assert _audit_cli.parse_since("1d", now) == now - 86400
    assert _audit_cli.parse_since("1h30m", now) == now - 5400
    assert _audit_cli.parse_since("90", now) == now - 90
    assert _audit_cli.parse_since("2023-11-14T22:13:20+00:00", now) == now
    assert _audit_cli.parse_since("2023-11-14T22:13:20Z", now) == now
    local = datetime.datetime(2024, 5, 1, 14, 30)
    assert _audit_cli.parse_since("2024-05-01 14:30", now) == local.timestamp()
    today = datetime.datetime.combine(datetime.date.fromtimestamp(now), datetime.time(9, 5))
    assert _audit_cli.parse_since("09:05", now) == today.timestamp()
    for bad in ("", "-5m", "10x", "nan", "inf", "soon"):
        with pytest.raises(ValueError):
            _audit_cli.parse_since(bad, now)


def test_cli_db_option_and_default_socket(trail, capsys, monkeypatch):
    sock, path = trail
    assert _audit_cli.run(_args(db=path, json=True)) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4
    monkeypatch.setenv("CAPBUS_SOCKET", sock)
    assert _audit_cli.run(_args(json=True)) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4


def test_cli_missing_log(tmp_path, capsys):
    sock = str(tmp_path / "nowhere" / "kernel.sock")
    assert _audit_cli.run(_args(socket=sock)) == 1
    err = capsys.readouterr().err
    assert f"no audit log at {tmp_path / 'nowhere' / 'audit.db'}" in err
    assert "has a kernel run with this socket?" in err
    assert not os.path.exists(tmp_path / "nowhere")
    bad = tmp_path / "bad.db"
    bad.write_text("garbage " * 100)
    assert _audit_cli.run(_args(db=str(bad))) == 1
    assert "not a capbus audit log" in capsys.readouterr().err
