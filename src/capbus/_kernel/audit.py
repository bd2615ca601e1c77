"""The audit trail: what the kernel granted, refused and saw, kept in a SQLite file beside its
socket so that it survives a kernel restart and can be read by `capbus audit` while the kernel
runs.

The kernel is one thread on an epoll loop and must never wait on the disk in the middle of
serving a request, so record() only appends to an in-memory buffer (O(1), no I/O). The loop
asks due() (or due_in(), for its epoll timeout) and calls flush(), which writes what is
pending in one transaction (up to MAX_BATCH rows, so that no single flush stalls the loop):
at most every ~100 ms, or sooner when more than FLUSH_BATCH rows wait.
The file is in WAL mode with synchronous=NORMAL: a commit appends to the write-ahead log
without an fsync, readers never block the writer, and the writer never blocks them.

Bounded everywhere:
  * the buffer holds at most MAX_PENDING rows; beyond that the oldest pending rows are dropped
    and counted, and the next successful flush writes one "audit-dropped" event with the count;
  * target and detail are cut to MAX_TARGET / MAX_DETAIL characters when recorded (a detail
    may come from a hostile process: a bad-message reason, say);
  * the table keeps at most max_rows rows: a flush that takes it over deletes the excess in the
    same transaction (so a flush deletes about as many rows as it writes: no periodic spike),
    from whoever holds the most, not from the oldest (see "Fair trimming" below); freed pages
    are reused, so the file stops growing;
  * the write-ahead log is truncated back to JOURNAL_SIZE_LIMIT bytes after a checkpoint.

A write that fails (disk full, the file locked by someone else, an I/O error) does not raise:
a warning goes to the "capbus.kernel" logger (once, then at most once a minute while it keeps
failing), the rows stay buffered (bounded as above) and due() backs off before the next try.

Fair trimming: a row's owner is its (uid, pid) (the kernel's own rows are uid -1 / its pid, an
owner like any other). The retained window is shared by water-filling, first across uids, then
within each uid across its processes: the excess is taken from the largest owners down to a
common level, each losing its own oldest rows. So a quiet process keeps every row it has, while a
flooder (one within the rate limits below would replace a 1,000,000-row trail in ~17 minutes if
the oldest rows went first) only ever pushes out its own.
The rows per owner are counted in memory: one GROUP BY over the covering index
events_owner(uid, pid, id) at open, then O(rows written) per flush, no scan. There is an entry
per distinct (uid, pid) in the table, so at most max_rows plus one batch of them, and an entry is
removed when its count reaches 0. The owners are also grouped by count, so a trim looks only at
the distinct counts (k of them need 1 + 2 + ... + k rows: at most ~1,414 for 1,000,000 rows) and
at the owners it cuts, and deletes with one indexed statement per owner cut.
The index is created IF NOT EXISTS, so a file of an older capbus gets it at its first open and
keeps schema version 1 (the table is unchanged; an older capbus ignores the index).

Reading: query() opens the file read-only (SQLite URI mode=ro) and can run beside a live kernel.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import logging
import os
import sqlite3
import time
import urllib.parse
from typing import Any

from .. import _paths
from .._errors import PermissionDenied

log = logging.getLogger("capbus.kernel")

SCHEMA_VERSION = 1  # PRAGMA user_version of a capbus audit log
MAX_PENDING = 100_000  # rows buffered in memory before the oldest are dropped (and counted)
MAX_TARGET = 256  # characters kept of a row's target
MAX_DETAIL = 512  # characters kept of a row's detail
FLUSH_INTERVAL = 0.1  # seconds: due() is true this long after the last flush, if rows wait
FLUSH_BATCH = 1000  # more rows than this pending: due() at once (unless backing off)
MAX_BATCH = 10_000  # rows one flush() writes by default (~25 ms); close() writes them all
BUSY_TIMEOUT_MS = 20  # the loop waits at most this long for a lock held by another connection
JOURNAL_SIZE_LIMIT = 8 << 20  # bytes the -wal file is truncated to after a checkpoint
_RETRY_MIN, _RETRY_MAX = 0.5, 10.0  # seconds of back-off after a failed flush (doubling)
_WARN_EVERY = 60.0  # seconds between warnings while writes keep failing

# The events the kernel records (record() takes any string; these are the conventional names).
REGISTER = "register"  # a process registered a service name or package: target = the name
UNREGISTER = "unregister"  # a service ended (released, or its process gone): target = the name
GRANT = "grant"  # a lookup granted an endpoint capability: handle, target = the service name
RESTRICT = "restrict"  # a service changed its allow/deny list: target = name, detail = entries
DELEGATE = "delegate"  # a capability handed to another process: detail names the receiver
REVOKE = "revoke"  # a capability or channel withdrawn: handle, target, detail = why
DENIED = "denied"  # PermissionDenied answered to the process: detail = the message
BAD_MESSAGE = "bad-message"  # a service reported garbage: target = service, detail = sender + reason
PROTOCOL_ERROR = "protocol-error"  # the kernel dropped a connection for a protocol violation
PROCESS_START = "process-start"  # a process connected or was launched: target = package/name
PROCESS_EXIT = "process-exit"  # a process is gone: detail = why
KERNEL_START = "kernel-start"
KERNEL_STOP = "kernel-stop"
AUDIT_DROPPED = "audit-dropped"  # written by flush(): detail starts with the number lost

COLUMNS = ("id", "time", "event", "process_id", "pid", "uid", "handle", "target", "detail")

_SCHEMA = """
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    event TEXT NOT NULL,
    process_id INTEGER NOT NULL DEFAULT 0,
    pid INTEGER NOT NULL DEFAULT 0,
    uid INTEGER NOT NULL DEFAULT -1,
    handle TEXT NOT NULL DEFAULT '',
    target TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX events_time ON events(time);
CREATE INDEX events_process ON events(process_id);
"""
# Also run on every open of an existing file: files written before fair trimming lack it.
_OWNER_INDEX = "CREATE INDEX IF NOT EXISTS events_owner ON events(uid, pid, id)"
_DELETE_OLDEST = ("DELETE FROM events WHERE id IN "
                  "(SELECT id FROM events WHERE uid = ? AND pid = ? ORDER BY id LIMIT ?)")
_INSERT = ("INSERT INTO events (time, event, process_id, pid, uid, handle, target, detail) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?)")

_Row = tuple[float, str, int, int, int, str, str, str]


def default_path(socket_path: str) -> str:
    """Where the kernel serving socket_path keeps its audit log: audit.db in the same directory."""
    return os.path.join(os.path.dirname(os.path.abspath(socket_path)), "audit.db")


class AuditLog:
    """The kernel's audit trail (see the module's doc). path None: disabled, record() does nothing.

    Not thread-safe: one thread at a time (the kernel's loop) may use it; it may be created in
    another thread (the connection is opened with check_same_thread=False).
    Raises ValueError if path is not a capbus audit log of this schema version, OSError if the
    file cannot be created or opened, PermissionDenied if it (or its directory, or SQLite's files
    beside it) is not this user's own (see _open_writer). dirfd: an O_PATH fd on the file's
    directory that the caller checked already (the kernel's socket directory), used instead of
    opening it again by name.
    """

    def __init__(self, path: str | None, max_rows: int = 1_000_000, *,
                 dirfd: int | None = None) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, not {max_rows}")
        self.path = os.path.abspath(path) if path is not None else None
        self.max_rows = max_rows
        self._pending: collections.deque[_Row] = collections.deque(maxlen=MAX_PENDING)
        self._dropped = 0
        self._dropped_first = 0.0
        self._dropped_last = 0.0
        self._last_flush = time.monotonic()
        self._retry_at = 0.0
        self._failures = 0
        self._warned_at = -_WARN_EVERY
        self._uids = _Tally()  # uid -> its rows in the table
        self._pids: dict[int, _Tally] = {}  # uid -> (pid -> its rows in the table)
        self._conn: sqlite3.Connection | None = None
        if self.path is not None:
            self._conn = _open_writer(self.path, dirfd)
            try:
                self._load_counts()
                if self._count() > self.max_rows:  # reopened with a smaller max_rows
                    undo: list[tuple[int, int, int]] = []
                    try:
                        self._conn.execute("BEGIN IMMEDIATE")
                        self._trim(undo)
                        self._conn.execute("COMMIT")
                    except sqlite3.Error as exc:  # locked, say: the next flush trims
                        self._rollback(undo)
                        log.warning("audit log %s: cannot trim it now (%s)", self.path, exc)
            except BaseException:
                self._conn.close()
                raise

    # ---- the kernel's side --------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self._conn is not None

    @property
    def pending(self) -> int:
        """Rows recorded but not yet written."""
        return len(self._pending)

    @property
    def dropped(self) -> int:
        """Rows lost to a full buffer since the last successful flush."""
        return self._dropped

    def record(
        self,
        event: str,
        process_id: int = 0,
        pid: int = 0,
        uid: int = -1,
        handle: int = 0,
        target: str = "",
        detail: str = "",
    ) -> None:
        """Buffer one event (no I/O). handle is a capability handle, kept as hex ('' for 0)."""
        if self._conn is None:
            return
        now = time.time()
        if len(self._pending) == MAX_PENDING:  # the deque drops its oldest row on append
            if not self._dropped:
                self._dropped_first = self._pending[0][0]
            self._dropped += 1
            self._dropped_last = self._pending[0][0]
        self._pending.append((
            now, event, process_id, pid, uid, f"{handle:#x}" if handle else "",
            target[:MAX_TARGET], detail[:MAX_DETAIL],
        ))

    def due(self) -> bool:
        """Whether a flush is worth doing now: rows wait and the last flush was at least
        FLUSH_INTERVAL ago, or more than FLUSH_BATCH rows wait; never while backing off after a
        failed write."""
        if self._conn is None or not (self._pending or self._dropped):
            return False
        now = time.monotonic()
        if now < self._retry_at:
            return False
        return len(self._pending) > FLUSH_BATCH or now - self._last_flush >= FLUSH_INTERVAL

    def due_in(self) -> float | None:
        """Seconds until due() becomes true (0.0: now), None if nothing waits: for the loop's
        epoll timeout."""
        if self._conn is None or not (self._pending or self._dropped):
            return None
        now = time.monotonic()
        at = self._retry_at
        if len(self._pending) <= FLUSH_BATCH:
            at = max(at, self._last_flush + FLUSH_INTERVAL)
        return max(0.0, at - now)

    def flush(self, max_batch: int | None = MAX_BATCH) -> int:
        """Write the pending rows, oldest first, in one transaction, and trim the table back to
        max_rows. At most max_batch rows per call (None: all of them), so that a backlog left
        by a failing disk drains over several loop turns instead of stalling one (due() stays
        true while more than FLUSH_BATCH wait). Returns the rows written; 0 if nothing was
        pending or the write failed (then the rows stay buffered and a warning is logged)."""
        conn = self._conn
        if conn is None:
            return 0
        self._last_flush = time.monotonic()
        if not (self._pending or self._dropped):
            return 0
        n = len(self._pending) if max_batch is None else min(len(self._pending), max(1, max_batch))
        rows = list(itertools.islice(self._pending, n))
        if self._dropped:
            rows.insert(0, (
                self._dropped_last, AUDIT_DROPPED, 0, os.getpid(), os.getuid(), "", "",
                f"{self._dropped} events dropped: the audit buffer was full (oldest lost "
                f"from {_iso(self._dropped_first)} to {_iso(self._dropped_last)})",
            ))
        undo: list[tuple[int, int, int]] = []  # (uid, pid, rows) counted in this transaction
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_INSERT, rows)
            added: collections.Counter[tuple[int, int]] = collections.Counter(
                (row[4], row[3]) for row in rows)
            for (uid, pid), count in added.items():
                self._tally(uid, pid, count, undo)
            if self._count() > self.max_rows:
                self._trim(undo)
            conn.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            self._rollback(undo)
            self._failed(exc)
            return 0
        if n == len(self._pending):
            self._pending.clear()
        else:
            for _ in range(n):
                self._pending.popleft()
        self._dropped = 0
        if self._failures:
            log.warning("audit log %s writable again: wrote %d rows", self.path, len(rows))
        self._failures = 0
        self._retry_at = 0.0
        return len(rows)

    def close(self) -> None:
        """Flush what is pending and close the file (idempotent); record() then does nothing."""
        if self._conn is None:
            return
        self.flush(None)
        if self._pending or self._dropped:
            log.warning("audit log %s: %d events could not be written and are lost", self.path,
                        len(self._pending) + self._dropped)
        conn, self._conn = self._conn, None
        self._pending.clear()
        self._dropped = 0
        with contextlib.suppress(sqlite3.Error):
            conn.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<capbus AuditLog {self.path or 'disabled'} pending={len(self._pending)}>"

    # ---- inside ---------------------------------------------------------------------------------

    def _load_counts(self) -> None:
        """Count the rows per owner (one pass over the events_owner index: at open only)."""
        assert self._conn is not None
        self._uids = _Tally()
        self._pids = {}
        for uid, pid, n in self._conn.execute(
                "SELECT uid, pid, count(*) FROM events GROUP BY uid, pid"):
            self._tally(uid, pid, n)

    def _count(self) -> int:
        return self._uids.total

    def owners(self) -> dict[tuple[int, int], int]:
        """(uid, pid) -> rows in the table, as counted in memory (for tests and diagnostics)."""
        return {(uid, pid): n for uid, t in self._pids.items() for pid, n in t.counts.items()}

    def _tally(self, uid: int, pid: int, n: int,
               undo: list[tuple[int, int, int]] | None = None) -> None:
        """Count n rows (negative: deleted) of owner (uid, pid); an owner at 0 is forgotten."""
        pids = self._pids.get(uid)
        if pids is None:
            pids = self._pids[uid] = _Tally()
        pids.add(pid, n)
        self._uids.add(uid, n)
        if not pids.total:
            del self._pids[uid]
        if undo is not None:
            undo.append((uid, pid, n))

    def _rollback(self, undo: list[tuple[int, int, int]]) -> None:
        """A transaction failed: roll it back and uncount what it counted."""
        assert self._conn is not None
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:  # the rows' fate is unknown: count them again from the file
            with contextlib.suppress(sqlite3.Error):
                self._load_counts()
            return
        for uid, pid, n in reversed(undo):
            self._tally(uid, pid, -n)

    def _trim(self, undo: list[tuple[int, int, int]]) -> None:
        """Delete rows so that at most max_rows remain (inside a transaction), fairly: water-
        filling across uids, then within each uid across its pids, each owner losing its oldest
        rows (see the module's doc). Counts what it deleted (and appends it to undo)."""
        assert self._conn is not None
        for uid, uid_cut in self._uids.cuts(self._count() - self.max_rows):
            for pid, cut in self._pids[uid].cuts(uid_cut):
                deleted = self._conn.execute(_DELETE_OLDEST, (uid, pid, cut)).rowcount
                self._tally(uid, pid, -max(0, deleted), undo)

    def _failed(self, exc: BaseException) -> None:
        self._failures += 1
        now = time.monotonic()
        self._retry_at = now + min(_RETRY_MAX, _RETRY_MIN * 2 ** (self._failures - 1))
        if self._failures == 1 or now - self._warned_at >= _WARN_EVERY:
            self._warned_at = now
            log.warning("audit log %s: cannot write (%s): %d events kept in memory, retrying "
                        "(beyond %d the oldest are dropped)", self.path, exc,
                        len(self._pending), MAX_PENDING)


class _Tally:
    """Rows per key (a uid, or a pid of one uid), the keys also grouped by their count, so that
    cuts() walks the distinct counts (at most ~sqrt(2 * rows) of them), not every key."""

    __slots__ = ("counts", "by_count", "total")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.by_count: dict[int, set[int]] = {}
        self.total = 0

    def add(self, key: int, n: int) -> None:
        old = self.counts.get(key, 0)
        new = old + n
        if old:
            group = self.by_count[old]
            group.discard(key)
            if not group:
                del self.by_count[old]
        if new > 0:
            self.counts[key] = new
            self.by_count.setdefault(new, set()).add(key)
        else:
            self.counts.pop(key, None)
        self.total += new - old if new > 0 else -old

    def cuts(self, excess: int) -> list[tuple[int, int]]:
        """(key, rows it loses) so that `excess` rows go in all, by water-filling: the largest
        keys are cut down to a common level, and the few that must lose one more to make the sum
        exact are those that held the most (then the lowest keys). Keys below the level lose
        nothing. All of everything if excess >= total."""
        if excess <= 0:
            return []
        if excess >= self.total:
            return sorted(self.counts.items())
        levels = sorted(self.by_count, reverse=True)
        removed = above = 0
        level = rem = 0
        top = levels
        for i, count in enumerate(levels):
            above += len(self.by_count[count])
            below = levels[i + 1] if i + 1 < len(levels) else 0
            step = above * (count - below)
            if removed + step >= excess:
                drop, rem = divmod(excess - removed, above)
                level = count - drop  # >= below; and > below when rem > 0
                top = levels[: i + 1]
                break
            removed += step
        keys = [key for count in top for key in self.by_count[count]]
        extra = set(heapq.nsmallest(rem, keys, key=lambda k: (-self.counts[k], k))) if rem else ()
        cuts = ((key, self.counts[key] - level + (key in extra)) for key in keys)
        return sorted((key, n) for key, n in cuts if n > 0)  # 0: at the level, not one of extra


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def _open_writer(path: str, held: int | None = None) -> sqlite3.Connection:
    """The writer's connection. The directory must pass the socket directory's checks
    (_paths.open_dir: not a symlink, writable by its owner only, owned by this user or root); the
    file and SQLite's -wal/-shm beside it must be this user's private regular files (never a
    symlink, never one someone else created first: _paths.open_private), the file itself created
    with O_EXCL when new. SQLite creates -wal/-shm itself, in a directory nobody else may write.
    held: an O_PATH fd on the directory, already checked (the kernel's socket directory)."""
    directory, base = os.path.split(path)
    dirfd = held if held is not None else _paths.open_dir(
        directory, frozenset({os.getuid(), 0}), create=0o700, who="the audit log's user")
    try:
        fd = _paths.open_private(dirfd, base, path)
        assert fd is not None
        try:
            st = os.fstat(fd)
            for extra in ("-wal", "-shm", "-journal"):
                other = _paths.open_private(dirfd, base + extra, path + extra, create=False)
                if other is not None:
                    os.close(other)
        finally:
            os.close(fd)
        try:
            # Through the fd: SQLite resolves the magic link back to a name (it keeps names, to
            # open -wal/-shm beside), so the file it opened is compared with the one checked.
            conn = sqlite3.connect(_paths.via_fd(dirfd, base), isolation_level=None,
                                   check_same_thread=False, timeout=2.0)
        except sqlite3.Error as exc:
            raise OSError(f"cannot open the audit log {path}: {exc}") from None
        try:
            opened = conn.execute("PRAGMA database_list").fetchone()[2]
            now = os.stat(opened)
        except (sqlite3.Error, OSError):
            conn.close()
            raise
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            conn.close()
            raise PermissionDenied(f"{path} was replaced while the kernel opened it: not used")
    finally:
        if held is None:
            os.close(dirfd)
    try:
        _check_version(conn, path, allow_new=True)
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise OSError(f"audit log {path}: cannot use WAL journal mode (got {mode})")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
        conn.execute("BEGIN IMMEDIATE")  # a concurrent opener waits here (timeout above)
        if _check_version(conn, path, allow_new=True) == 0:
            for statement in _SCHEMA.split(";"):  # not executescript(): it would COMMIT first
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute(_OWNER_INDEX)
        conn.execute("COMMIT")
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")  # from now on: in the loop
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise ValueError(f"{path} is not a capbus audit log ({exc})") from None
    except BaseException:
        conn.close()
        raise
    return conn


def _check_version(conn: sqlite3.Connection, path: str, allow_new: bool) -> int:
    """The file's schema version: SCHEMA_VERSION, or 0 for an empty database (when allow_new).
    ValueError for anything else."""
    try:
        version: int = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    except sqlite3.DatabaseError as exc:  # "file is not a database", "malformed", ...
        raise ValueError(f"{path} is not a capbus audit log ({exc})") from None
    if version == 0 and not tables and allow_new:
        return 0
    if version != SCHEMA_VERSION:
        if version:
            what = f"schema version {version}"
        else:
            what = "a database of something else" if tables else "no tables: it is empty"
        raise ValueError(f"{path} is not a capbus audit log of schema version {SCHEMA_VERSION} "
                         f"(it holds {what})")
    columns = tuple(r[1] for r in conn.execute("PRAGMA table_info(events)"))
    if columns != COLUMNS:
        raise ValueError(f"{path} has schema version {SCHEMA_VERSION} but no capbus events table")
    return version


def query(
    path: str,
    since: float | None = None,
    process_id: int | None = None,
    event: str | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """The newest `limit` events (limit <= 0: all) matching the filters, oldest first, as dicts
    with the keys of COLUMNS. since: unix seconds (events at or after it). Opens the file
    read-only: safe beside a live kernel. FileNotFoundError if there is no file, ValueError if
    it is not a capbus audit log."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no audit log at {path}")
    uri = "file:" + urllib.parse.quote(path) + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=2.0)
    except sqlite3.Error as exc:
        raise OSError(f"cannot open the audit log {path}: {exc}") from None
    try:
        _check_version(conn, path, allow_new=False)
        where: list[str] = []
        params: list[float | int | str] = []
        if since is not None:
            where.append("time >= ?")
            params.append(float(since))
        if process_id is not None:
            where.append("process_id = ?")
            params.append(int(process_id))
        if event is not None:
            where.append("event = ?")
            params.append(event)
        sql = f"SELECT {', '.join(COLUMNS)} FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC"
        if limit > 0:
            sql += " LIMIT ?"
            params.append(int(limit))
        try:
            rows = conn.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"cannot read the audit log {path}: {exc}") from None
    finally:
        conn.close()
    rows.reverse()
    return [dict(zip(COLUMNS, row, strict=True)) for row in rows]


class RateLimiter:
    """Audit rows one OS process, and one uid, may cause per second; what is over is counted and
    written as one summary row per (who, event) when its second ends ("denied x 7412 in the last
    second"), so a flood costs the trail a few rows a second (and fair trimming keeps even those
    from pushing out anyone else's rows).

    Windows are per key and start at the key's first row; summary() is cheap when nothing was
    suppressed (the kernel calls it from its loop, and arms a timer at the first suppression)."""

    def __init__(self, per_process: int, per_uid: int) -> None:
        self.per_process = per_process
        self.per_uid = per_uid
        # key -> [window start, rows admitted in it, {event: suppressed}, (process_id, pid, uid)]
        self._windows: dict[tuple[str, int], list[Any]] = {}
        self.suppressed = 0  # rows over the limits since the last summary()
        self._due: list[tuple[str, int, int, int, str]] = []  # summaries of seconds that ended
        self._prune_at = 1024  # windows kept before the ended, quiet ones are forgotten

    def admit(self, event: str, process_id: int, pid: int, uid: int, now: float) -> bool:
        """True: record the row. False: counted for the next summary (the caller arms a timer
        when this returns False and `suppressed` was 0)."""
        if len(self._windows) > self._prune_at:
            self._prune(now)
        keys = [(("pid", pid), self.per_process)] if pid > 0 else []
        keys.append((("uid", uid), self.per_uid))
        windows = []
        for key, limit in keys:
            w = self._windows.get(key)
            if w is None or now - w[0] >= 1.0:
                if w is not None and w[2]:  # a second is over: its summary waits for summary()
                    self._due.extend(self._rows(key, w))
                w = self._windows[key] = [now, 0, {}, (process_id, pid, uid)]
            if w[1] >= limit:
                w[2][event] = w[2].get(event, 0) + 1
                w[3] = (process_id, pid, uid)
                self.suppressed += 1
                return False
            windows.append(w)
        for w in windows:
            w[1] += 1
        return True

    def summary(self, now: float, force: bool = False) -> list[tuple[str, int, int, int, str]]:
        """(event, process_id, pid, uid, detail) rows for every window whose second is over (all
        of them if force); forgets idle windows."""
        out, self._due = self._due, []
        for key, w in list(self._windows.items()):
            if not force and now - w[0] < 1.0:
                continue
            out.extend(self._rows(key, w))
            del self._windows[key]
        self.suppressed = sum(sum(w[2].values()) for w in self._windows.values())
        return out

    def _prune(self, now: float) -> None:
        """Forget windows whose second ended with nothing suppressed (pids long gone, say);
        amortised O(1) per row: the next prune waits until the table has doubled."""
        for key, w in list(self._windows.items()):
            if now - w[0] >= 1.0 and not w[2]:
                del self._windows[key]
        self._prune_at = max(1024, 2 * len(self._windows))

    def _rows(self, key: tuple[str, int], w: list[Any]) -> list[tuple[str, int, int, int, str]]:
        process_id, pid, uid = w[3]
        who, limit = ("process", self.per_process) if key[0] == "pid" else ("uid", self.per_uid)
        return [(event, process_id, pid, uid, f"{event} x {n:,} in the last second (over the "
                 f"{limit} rows a second one {who} may write)") for event, n in w[2].items()]
