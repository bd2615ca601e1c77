"""The kernel: the one trusted party. One thread owns all state and runs an epoll loop over the
listening socket, every process connection, every process's pidfd and a wake-up eventfd.

Other threads (the embedding program, signal handlers) never touch the state: they hand a
closure to the loop (`_call`) and wait for its result.

This module is the driver: lifecycle, the thread-safe API, the loop, timers, connections
(admission, framing, sending), a process's death, and dispatch. What each request does is in the domain
modules (naming, channels, delegation, region_requests, introspect), functions over the shared
state (state.KernelState) that answer through the Outbox this module implements (_KernelOutbox).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import heapq
import itertools
import logging
import os
import queue
import selectors
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from .. import _paths, _protect
from .._errors import VALUE_ERROR_CODE, IpcError, OutOfMemory, PermissionDenied, ProtocolError, SandboxError
from .._fdlimit import raise_fd_limit
from .._protocol import frames
from .._protocol.connection import State
from .._protocol.names import check_name
from . import audit as _audit
from . import channels, delegation, introspect, naming, region_requests
from .captable import Capability
from .grants import GrantSpec, combine_grants, parse_grants, parse_lookup
from .launcher import Child, LaunchSpec, default_lookup, launch
from .listener import bind, not_admitted
from .policy import KernelLimits, Policy, ProcessInfo
from .sandbox import Sandbox
from .shm import STATE_PEER_DEAD
from .state import LOG_CHARS, KernelState, Outbox, ProcessRecord, Timer, brief, client_key, count_down
from .transport import FdBudget, Transport

_T = TypeVar("_T")

log = logging.getLogger("capbus.kernel")

WAIT_MODES = ("spin", "adaptive", "block")  # what a Hello may name (the runtime's WAIT_CODES)
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS,
                              errno.ETOOMANYREFS})

_FRAMES_PER_WAKEUP = 32  # per connection and loop turn, so one chatty process cannot starve others
# ... and bytes: a request costs O(its size), so 32 big ones (1024-entry Access frames) in one
# turn would hold the loop ~40 ms; past this many bytes the connection waits for the next turn.
_BYTES_PER_WAKEUP = 16 * 1024
_MAX_REFUSED = 64  # refused connections kept at once until their Hello is answered
_REFUSED_GRACE = 2.0  # seconds a refused connection has to send its Hello


class _Unset:
    """spawn(lookup=...) not given: the default for the spec (see launcher.default_lookup)."""

    def __repr__(self) -> str:
        return "<default>"


_UNSET: Any = _Unset()


class Kernel:
    """The capbus kernel, embedded in a background thread (or run in the foreground by the
    daemon through serve_forever()).

    socket_path: where processes connect (default: a per-user directory, or $CAPBUS_SOCKET).
    policy: a capbus.Policy, a registration filter callable(ProcessInfo, name) -> bool, or the
    path of a TOML policy file.
    audit: the audit log's path; True (the default) for audit.db beside the socket; None or
    False to keep none.
    debuggable: as for capbus.connect(): unless True (or None with CAPBUS_DEBUGGABLE=1), this
    process becomes non-dumpable, out of reach of other processes of its uid (capbus._protect).
    """

    def __init__(
        self,
        socket_path: str | None = None,
        policy: Policy | Callable[[ProcessInfo, str], bool] | str | None = None,
        *,
        audit: str | None | bool = True,
        start: bool = True,
        debuggable: bool | None = None,
    ) -> None:
        _protect.protect(debuggable)  # first: this process will hold every channel's memfds
        self.socket_path = os.path.abspath(socket_path or _paths.default_socket())
        self.policy = Policy.coerce(policy)
        self.limits: KernelLimits = self.policy.limits
        # The tables every domain shares (processes, registries, parked lookups, usage...)
        self._st = KernelState(self.policy)
        self._out: Outbox = _KernelOutbox(self)
        self._refused = 0  # refused connections waiting for their Hello
        self._fd_budgets: dict[tuple[str, int], FdBudget] = {}  # ("pid"|"uid", n): shared
        self._ids = itertools.count(1)  # ProcessIds: never 0, never reused by this kernel
        self._timers: list[Timer] = []
        self._cancelled_timers = 0
        self._timer_seq = itertools.count()
        self._calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Future[Any]]] = (
            queue.SimpleQueue())
        self._children: set[Child] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._sel = selectors.DefaultSelector()
        # frame type -> handler(rec, msg, request_id): each domain module's HANDLERS, bound to
        # this kernel's state and outbox; Hello is the loop's own (it admits or refuses).
        self._handlers: dict[type, Callable[[ProcessRecord, Any, int], frames.Message | None]] = {
            frames.Hello: self._on_hello,
        }
        for domain in (naming, channels, delegation, region_requests, introspect):
            for kind, handler in domain.HANDLERS.items():
                self._handlers[kind] = functools.partial(handler, self._st, self._out)
        self.access = self.policy.access
        raise_fd_limit()
        try:
            self._dirfd, self._lock_fd, self._listener = bind(self.socket_path, bool(self.access))
        except BaseException:
            self._sel.close()  # a kernel refused at the door holds nothing
            raise
        if audit is True:
            audit = _audit.default_path(self.socket_path)
        try:
            beside = audit and _audit.default_path(self.socket_path) == os.path.abspath(audit)
            self._audit = _audit.AuditLog(audit or None, self.limits.audit_rows,
                                          dirfd=self._dirfd if beside else None)
            self._audit_rate = _audit.RateLimiter(self.limits.audit_rows_per_second,
                                                  self.limits.audit_rows_per_uid_second)
        except BaseException:
            self._listener.close()
            with contextlib.suppress(OSError):  # nobody may find a socket nobody serves
                os.unlink(os.path.basename(self.socket_path), dir_fd=self._dirfd)
            os.close(self._lock_fd)
            os.close(self._dirfd)
            self._sel.close()
            raise
        self.audit_path = audit or None
        self._audit.record(_audit.KERNEL_START, pid=os.getpid(), detail=self.socket_path)
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Other threads poke the loop through _wake; the loop closes it when it shuts down. The
        # lock keeps a poke from racing that close (and from writing into a reused fd number).
        self._wake_lock = threading.Lock()
        # Kept in reserve so that an accept failing for lack of fds can still shed the connection.
        self._reserve_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._sel.register(self._listener, selectors.EVENT_READ, ("listen", None))
        self._sel.register(self._wake, selectors.EVENT_READ, ("wake", None))
        _paths.announce_embedded(self.socket_path)  # capbus.connect() in this process finds us
        if start:
            self._thread = threading.Thread(target=self._run, name="capbus-kernel", daemon=True)
            self._thread.start()

    # ---- public, thread-safe ---------------------------------------------------------------------

    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<capbus.Kernel {self.socket_path}>"

    def spawn(
        self,
        argv: Sequence[str],
        *,
        name: str | None = None,
        package: str | None = None,
        env: Mapping[str, str] | None = None,
        restart: str = "never",
        max_restarts: int = 3,
        cwd: str | None = None,
        grants: Mapping[str, str | Mapping[str, object] | GrantSpec] | None = None,
        lookup: Sequence[str] | None = _UNSET,
        sandbox: Sandbox | None = None,
    ) -> Child:
        """Launch a process that holds a pre-connected socket and the given package identity.

        grants: what it starts with, key -> service name (or {"service"|"package": ...,
        "rights": [...], "rate_limit": n, "bandwidth": n, "max_message_size": n}); in the child,
        capbus.connect().grants[key] is the endpoint. At most 64, with its package's grants in
        the policy (which win a key both name). lookup: the names it may look up besides
        (fnmatch patterns, "package:P" for lookup_package): None for any, [] for none; left
        out, None (a sandboxed process: none). Its package's lookup list in the policy applies
        as well: a lookup must pass both. ValueError on a bad grant or pattern.
        sandbox: a capbus.Sandbox confining it (and every restart) from before its first
        instruction; SandboxError, and nothing started, if this Linux cannot enforce it."""
        if package is not None:
            check_name(package, "package name")
        if sandbox is not None:
            sandbox.check()  # here, in the caller's thread: the loop never waits on a bad one
        specs = parse_grants(grants, "spawn grants")
        rules = self.policy.package_rules(package)
        combine_grants(("the policy", rules.grants if rules else ()), ("spawn", specs))
        spec = LaunchSpec(tuple(argv), name, package, dict(env or {}), restart, max_restarts, cwd,
                          specs, sandbox=sandbox)
        spec = dataclasses.replace(spec, lookup=default_lookup(spec) if lookup is _UNSET
                                   else parse_lookup(lookup, "spawn lookup"))
        child = Child(spec)
        child._kernel = self
        self._call(self._launch_child, child)
        return child

    def channels(self) -> list[dict[str, Any]]:
        """Every live channel with its traffic counters, as `capbus stats` shows them."""
        return self._call(introspect.rows, self._st, "channels")

    def caps(self, process_id: int) -> list[dict[str, Any]]:
        """A process's capability table, as `capbus caps` shows it."""
        return self._call(introspect.rows, self._st, "caps", process_id)

    def processes(self) -> list[dict[str, Any]]:
        """The process table, as `capbus ps` shows it."""
        return self._call(introspect.rows, self._st, "processes")

    def services(self) -> list[dict[str, Any]]:
        return self._call(introspect.rows, self._st, "services")

    def process_stats(self, process_id: int) -> dict[str, Any]:
        """What the kernel holds for one process: queue and table sizes (all bounded)."""
        return self._call(introspect.process_stats, self._st, process_id)

    def uid_usage(self, uid: int) -> dict[str, int]:
        """What the processes of one uid hold, as the per-uid quotas count it (all 0: nothing)."""
        return self._call(introspect.uid_usage, self._st, uid)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving: every process sees the kernel go (reconnect=True ones connect again to
        the next kernel on this path); channels between processes that live on keep working;
        launched children are terminated."""
        if self._thread is not None and self._thread.is_alive():
            self._stopping = True
            self._poke()
            self._thread.join(timeout)
        elif not self._stopping:
            self._stopping = True
            self._shutdown()

    def serve_forever(self) -> None:
        """Run the loop in this thread until SIGINT/SIGTERM or stop() (the daemon's way)."""

        def on_signal(signum: int, frame: object) -> None:
            self._stopping = True
            # Not _poke(): a signal handler runs in this (the loop's) thread, which may hold the
            # lock; the fd cannot be closed under us here, since only this thread closes it.
            if self._wake >= 0:
                os.eventfd_write(self._wake, 1)

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._run()
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # ---- the loop and its timers -----------------------------------------------------------------

    def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._thread is None or threading.current_thread() is self._thread:
            return fn(*args)
        if self._stopping or not self._thread.is_alive():
            raise IpcError(f"the kernel at {self.socket_path} is stopped")
        fut: Future[_T] = Future()
        self._calls.put((fn, args, fut))
        if not self._poke():
            raise IpcError(f"the kernel at {self.socket_path} is stopped")
        return fut.result(timeout=30)

    def _poke(self) -> bool:
        """Wake the loop from another thread; False once the loop has shut down."""
        with self._wake_lock:
            if self._wake < 0:
                return False
            os.eventfd_write(self._wake, 1)
            return True

    def _run(self) -> None:
        try:
            while not self._stopping:
                timeout = None
                if self._timers:
                    # Clamped: a parked lookup may wait for days; epoll takes at most ~24 days.
                    timeout = min(max(0.0, self._timers[0].deadline - time.monotonic()), 3600.0)
                due = self._audit.due_in()
                if due is not None:
                    timeout = due if timeout is None else min(timeout, due)
                for key, mask in self._sel.select(timeout):
                    what, rec = key.data
                    try:
                        self._dispatch(what, rec, mask)
                    except Exception:
                        # A kernel bug in serving one process must not stop the others.
                        log.exception("kernel error while serving %s %r", what, rec)
                        if rec is not None:
                            self._gone(rec, "kernel error")
                self._fire_timers()
                if self._audit.due():
                    self._audit.flush()
        except Exception:  # pragma: no cover - a kernel bug must not leave a silent dead kernel
            log.exception("kernel loop crashed")
            raise
        finally:
            self._shutdown()

    def _dispatch(self, what: str, rec: ProcessRecord | None, mask: int) -> None:
        if what == "conn":
            assert rec is not None
            if mask & selectors.EVENT_WRITE:
                self._flush(rec)
            if mask & selectors.EVENT_READ and rec.alive:
                self._on_readable(rec)
        elif what == "pidfd":
            assert rec is not None
            self._gone(rec, "exited")
        elif what == "listen":
            self._accept()
        elif what == "wake":
            self._drain_calls()

    def _drain_calls(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake)
        while True:
            try:
                fn, args, fut = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # handed back to the calling thread
                fut.set_exception(exc)

    def _fire_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0].deadline <= now:
            timer = heapq.heappop(self._timers)
            if timer.fn is None:
                self._cancelled_timers -= 1
            else:
                timer.fn()

    def _after(self, delay: float, fn: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + min(delay, 1e9), next(self._timer_seq), fn)
        heapq.heappush(self._timers, timer)
        return timer

    def _cancel(self, timer: Timer) -> None:
        """Drop a timer (and what its closure holds); the heap is compacted when half is dead,
        so processes that park long lookups and leave cannot grow it."""
        if timer.fn is None:
            return
        timer.fn = None
        self._cancelled_timers += 1
        if self._cancelled_timers > 64 and self._cancelled_timers * 2 > len(self._timers):
            self._timers = [t for t in self._timers if t.fn is not None]
            heapq.heapify(self._timers)
            self._cancelled_timers = 0

    def _shutdown(self) -> None:
        if self._st.shut:
            return
        self._st.shut = True
        _paths.withdraw_embedded(self.socket_path)
        for rec in list(self._st.procs.values()):
            self._gone(rec, "kernel stopping", restart=False)
        for child in list(self._children):
            child.terminate()
        deadline = time.monotonic() + 2.0
        for child in list(self._children):
            with contextlib.suppress(Exception):
                if child._popen is not None:
                    child._popen.wait(max(0.0, deadline - time.monotonic()))
            child.kill()
            if child._popen is not None:
                child._abandon(child._popen.wait())
        self._children.clear()
        for obj in (self._listener, self._wake):
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(obj)
        self._listener.close()
        with self._wake_lock:
            os.close(self._wake)
            self._wake = -1
        if self._reserve_fd >= 0:
            os.close(self._reserve_fd)
        self._audit_summaries(force=True)
        self._audit.record(_audit.KERNEL_STOP, pid=os.getpid())
        self._audit.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.basename(self.socket_path), dir_fd=self._dirfd)
        os.close(self._lock_fd)
        os.close(self._dirfd)
        self._sel.close()
        while not self._calls.empty():
            _, _, fut = self._calls.get_nowait()
            fut.set_exception(IpcError("the kernel stopped"))

    # ---- connections and launched children -------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                self._accept_failed(exc)
                return
            transport = Transport(sock, self.limits.outbox_fds)
            pid, uid, gid = transport.peer_creds()
            refused_as: type[IpcError] = PermissionDenied
            refused = not_admitted(self.access, self._st.uid, sock, pid, uid, gid)
            if not refused:
                refused_as, refused = OutOfMemory, self._over_connection_bound(pid, uid)
            if refused:
                # Answered with a clear error at its Hello, but it holds no pidfd and counts in
                # no table; past _MAX_REFUSED of those the newcomer is just closed.
                if self._refused >= _MAX_REFUSED:
                    transport.close()
                    continue
                rec = self._add_record(transport, pid, uid, gid, None, None, None, None,
                                       refused=refused)
                rec.refused_as = refused_as
                self._refused += 1
                self._after(_REFUSED_GRACE, functools.partial(self._gone, rec, "refused: no Hello"))
                continue
            pidfd = None
            if pid > 0:
                try:
                    pidfd = os.pidfd_open(pid)
                except OSError:  # already gone (or not visible from here): the socket tells
                    pidfd = None
            package = self.policy.uid_packages.get(uid)
            self._add_record(transport, pid, uid, gid, pidfd, package, None, None)

    def _accept_failed(self, exc: OSError) -> None:
        """Out of fds (or memory): the pending connection would keep the listener readable and
        the loop spinning. Shed it with the reserve fd, then stop accepting for a moment."""
        log.warning("accept failed (%s): refusing new connections for 0.5 s", exc)
        if self._reserve_fd >= 0:
            os.close(self._reserve_fd)
            self._reserve_fd = -1
            with contextlib.suppress(OSError):
                self._listener.accept()[0].close()  # the client sees its connection closed
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(self._listener)

        def resume() -> None:
            if self._reserve_fd < 0:
                with contextlib.suppress(OSError):
                    self._reserve_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            if not self._st.shut:
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.register(self._listener, selectors.EVENT_READ, ("listen", None))

        self._after(0.5, resume)

    def _add_record(
        self,
        transport: Transport,
        pid: int,
        uid: int,
        gid: int,
        pidfd: int | None,
        package: str | None,
        name: str | None,
        child: Child | None,
        refused: str = "",
    ) -> ProcessRecord:
        rec = ProcessRecord(next(self._ids), pid, uid, gid, transport, pidfd, package, name, child)
        rec.refused = refused
        rec.sandboxed = child is not None and child.spec.sandbox is not None
        self._st.procs[rec.process_id] = rec
        if not refused:
            naming.set_authority(self._st, rec)
            rec.counted = True
            self._st.conns_by_pid[client_key(rec)] = self._st.conns_by_pid.get(client_key(rec), 0) + 1
            self._st.conns_by_uid[uid] = self._st.conns_by_uid.get(uid, 0) + 1
            lim = self.limits
            budgets = []
            for key, limit, what in (
                (("pid", client_key(rec)), lim.outbox_fds, f"pid {pid} (outbox_fds)"),
                (("uid", uid), lim.outbox_fds_per_uid, f"uid {uid} (outbox_fds_per_uid)"),
            ):
                budget = self._fd_budgets.get(key)
                if budget is None:
                    budget = self._fd_budgets[key] = FdBudget(limit, what, key)
                budget.users += 1
                budgets.append(budget)
            transport.budgets = tuple(budgets)
            usage = rec.usage = self._st.usage_of(uid)
            usage.holders += 1
            rec.caps.charge = lambda n, usage=usage: self._st.charge_caps(usage, n)
        self._audit_event(_audit.PROCESS_START, rec, None, package or name or "",
                          refused or ("connected" if child is None else
                                      "launched sandboxed" if rec.sandboxed else "launched"))
        self._sel.register(transport.sock, selectors.EVENT_READ, ("conn", rec))
        if pidfd is not None:
            self._sel.register(pidfd, selectors.EVENT_READ, ("pidfd", rec))
        return rec

    def _over_connection_bound(self, pid: int, uid: int) -> str:
        """Why a new connection from (pid, uid) is refused, or "" if it is not."""
        lim = self.limits
        if pid > 0 and self._st.conns_by_pid.get(pid, 0) >= lim.connections_per_pid:
            return (f"pid {pid} already holds {lim.connections_per_pid} connections to the kernel "
                    "(its connections_per_pid limit): close some, or share one Process")
        if self._st.conns_by_uid.get(uid, 0) >= lim.connections_per_uid:
            return (f"uid {uid} already holds {lim.connections_per_uid} connections to the kernel "
                    "(its connections_per_uid limit): close some")
        return ""

    def _on_hello(self, rec: ProcessRecord, msg: frames.Hello, rid: int) -> frames.Message:
        if rec.refused:
            raise rec.refused_as(f"the kernel refuses this connection: {rec.refused}")
        if msg.wait_mode not in WAIT_MODES:
            raise ValueError(f"wait mode {msg.wait_mode!r:.80} is not one of {', '.join(WAIT_MODES)}")
        rec.wait_mode = msg.wait_mode
        return frames.Welcome(rec.process_id, rec.package, max(rec.pid, 0),
                              naming.welcome_grants(self._st, self._out, rec))

    def _launch_child(self, child: Child) -> int:
        popen, sock = launch(child.spec, self.socket_path)
        pidfd = os.pidfd_open(popen.pid)
        sandbox = child.spec.sandbox
        # The identity it runs as: a sandbox's user= is what "uid:N" allowlists must see.
        uid, gid = (sandbox and sandbox.identity()) or (os.getuid(), os.getgid())
        rec = self._add_record(
            Transport(sock, self.limits.outbox_fds), popen.pid, uid, gid, pidfd,
            child.spec.package, child.spec.name, child,
        )
        self._children.add(child)
        child._started(popen, rec.process_id)
        log.info("launched %s as process %d (pid %d)", child.spec.argv, rec.process_id, popen.pid)
        return rec.process_id

    def _child_exited(self, child: Child, restart: bool) -> None:
        if child._popen is None or child._popen.poll() is None:
            # The connection went first; the pidfd would have told us of the exit. Wait for it.
            self._after(0.01, lambda: self._child_exited(child, restart))
            return
        if child._exited() and restart:
            try:
                self._launch_child(child)
                return
            except (OSError, SandboxError) as exc:
                log.warning("restart of %s failed: %s", child.spec.argv, exc)
                child._abandon(-1)
        self._children.discard(child)

    def _revoke_grant(self, child: Child, key: str) -> None:
        """Child.revoke_grant, on the loop (see delegation.revoke_grant)."""
        delegation.revoke_grant(self._st, self._out, child, key)

    # ---- requests in, answers and events out (the Outbox the domains use) ------------------------

    def _on_readable(self, rec: ProcessRecord) -> None:
        budget = _BYTES_PER_WAKEUP
        for _ in range(_FRAMES_PER_WAKEUP):
            if budget <= 0:
                return  # level-triggered: the rest is read at the next turn, after the others
            try:
                got = rec.transport.recv()
            except BlockingIOError:
                return
            except ProtocolError as exc:
                self._violation(rec, exc)
                return
            except OSError as exc:
                self._gone(rec, f"connection error: {exc}")
                return
            if got is None:
                self._gone(rec, "closed its connection")
                return
            data, sender_pid, nfds = got
            budget -= len(data)
            if rec.pid > 0 and sender_pid != rec.pid:
                self._violation(rec, ProtocolError(
                    f"frame sent by pid {sender_pid} on the connection of pid {rec.pid} "
                    "(a forked child must open its own connection)"
                ))
                return
            try:
                msg, request_id = rec.proto.receive(data, nfds)
            except ProtocolError as exc:
                self._violation(rec, exc)
                return
            try:
                reply = self._handlers[type(msg)](rec, msg, request_id)
            except IpcError as exc:
                if isinstance(exc, PermissionDenied):
                    self._audit_event(_audit.DENIED, rec, None, type(msg).__name__, str(exc))
                reply = frames.Error(exc.code, str(exc))
            except (ValueError, TypeError) as exc:
                reply = frames.Error(VALUE_ERROR_CODE, str(exc))
            except Exception as exc:
                # Whatever else one request runs into (an OSError from a seal, a memfd or an
                # mmap, a kernel bug) is that request's failure: its asker gets an error, nobody
                # loses a connection. Logged with a bounded summary, never the whole request.
                log.error("request %s of process %d (pid %d) failed: %s: %.*s",
                          f"{msg!r:.{LOG_CHARS}}", rec.process_id, rec.pid,
                          type(exc).__name__, LOG_CHARS, exc, exc_info=log.isEnabledFor(
                              logging.DEBUG))
                err = _request_failed(exc)
                reply = frames.Error(err.code, str(err))
            if reply is not None:  # None: parked, answered later
                self._respond(rec, request_id, reply)
            if not rec.alive:
                return

    def _respond(self, rec: ProcessRecord, request_id: int, msg: frames.Message,
                 fds: tuple[int, ...] = ()) -> None:
        request = rec.proto.in_flight.get(request_id)
        if not rec.alive or request is None:
            return
        try:
            frame = rec.proto.respond(request_id, msg)
        except ProtocolError as exc:
            # The kernel's own answer would be refused by the asker's decoder (a value out of
            # range, too large a frame): it gets an error instead, and keeps its connection.
            log.error("answer %s to process %d does not encode: %.*s", type(msg).__name__,
                      rec.process_id, LOG_CHARS, exc)
            fds = ()
            frame = rec.proto.respond(request_id, frames.Error(
                IpcError.code, f"the kernel could not encode its {type(msg).__name__} answer "
                f"({str(exc)[:LOG_CHARS]}); this is a kernel bug, please report it"))
        failed = self._send(rec, frame, fds)
        if failed is not None and request is not None:
            # No fd to spare for the answer's fds (EMFILE while queueing them, the socket out
            # of buffers): still in flight, so the handler undoes what it did and the asker
            # gets the error (the dispatch answers it), keeping its connection.
            rec.proto.in_flight[request_id] = request
            raise _request_failed(failed)
        if rec.proto.state is State.CLOSED:
            self._gone(rec, "refused at Hello")

    def _event(self, rec: ProcessRecord, msg: frames.Message, fds: tuple[int, ...] = ()) -> bool:
        """Send an event; False if it could not go (no fds to spare for its fds, or it does not
        encode), so the caller can undo what it announces.

        None once the kernel stops: processes are not dying, the kernel is (a Death would fire
        on_death callbacks of a server that lives on; a ChannelClosed would drop live channels);
        each process sees its connection close, as with a crash, and reconnects if it asked to."""
        if self._st.shut:
            return True
        if rec.alive and rec.proto.state is State.READY:
            try:
                frame = rec.proto.event(msg)
            except ProtocolError as exc:  # dropped, not sent: the receiver would refuse it
                log.error("event %s to process %d does not encode: %.*s", type(msg).__name__,
                          rec.process_id, LOG_CHARS, exc)
                return False
            return self._send(rec, frame, fds) is None
        return True

    def _send(self, rec: ProcessRecord, frame: bytes, fds: tuple[int, ...] = ()) -> OSError | None:
        """Send or queue a frame. A frame with fds that fails for lack of resources is not sent
        and its OSError returned (the connection stays); any other failure ends the connection."""
        if not rec.alive:
            return None
        try:
            if rec.transport.send(frame, fds):
                self._sel.modify(rec.transport.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                 ("conn", rec))
        except ProtocolError as exc:
            self._violation(rec, exc)
        except OSError as exc:
            if fds and exc.errno in _RESOURCE_ERRNOS:
                log.warning("no room to pass %d fds to process %d: %s", len(fds), rec.process_id, exc)
                return exc
            self._gone(rec, f"connection error: {exc}")
        return None

    def _flush(self, rec: ProcessRecord) -> None:
        try:
            pending = rec.transport.flush()
        except OSError as exc:
            self._gone(rec, f"connection error: {exc}")
            return
        if not pending:
            self._sel.modify(rec.transport.sock, selectors.EVENT_READ, ("conn", rec))

    def _audit_event(self, event: str, rec: ProcessRecord | None, cap: Capability | None = None,
                     target: str = "", detail: str = "") -> None:
        if rec is not None and self._audit.enabled:
            armed = self._audit_rate.suppressed > 0
            if not self._audit_rate.admit(event, rec.process_id, rec.pid, rec.uid, time.monotonic()):
                if not armed:
                    self._after(1.0, self._audit_summaries)
                return
        self._audit.record(event, rec.process_id if rec else 0, rec.pid if rec else 0,
                           rec.uid if rec else -1, cap.handle if cap else 0, target, detail)

    def _audit_summaries(self, force: bool = False) -> None:
        for event, process_id, pid, uid, detail in self._audit_rate.summary(time.monotonic(), force):
            self._audit.record(event, process_id, pid, uid, 0, "", detail)
        if self._audit_rate.suppressed:
            self._after(1.0, self._audit_summaries)

    # ---- death -----------------------------------------------------------------------------------

    def _violation(self, rec: ProcessRecord, exc: ProtocolError) -> None:
        self._audit_event(_audit.PROTOCOL_ERROR, rec, None, "", str(exc))
        log.warning("ProtocolError from process %d (pid %d): %s; closing its connection",
                    rec.process_id, rec.pid, brief(exc))
        self._gone(rec, f"protocol error: {brief(exc)}")

    def _gone(self, rec: ProcessRecord, why: str, restart: bool = True) -> None:
        """A process is over: drop its registrations, tell its watchers, free what it held."""
        if not rec.alive:
            return
        rec.alive = False
        if rec.refused:
            self._refused -= 1
        if rec.counted:
            rec.counted = False
            count_down(self._st.conns_by_pid, client_key(rec))
            count_down(self._st.conns_by_uid, rec.uid)
        why = brief(why)
        log.info("process %d (pid %d) gone: %s", rec.process_id, rec.pid, why)
        self._audit_event(_audit.PROCESS_EXIT, rec, None, rec.package or rec.name or "", why)
        self._st.procs.pop(rec.process_id, None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(rec.transport.sock)
        rec.transport.close()
        rec.proto.close()
        for budget in rec.transport.budgets:
            budget.users -= 1
            if budget.users <= 0 and budget.key is not None:
                self._fd_budgets.pop(budget.key, None)
        rec.transport.budgets = ()
        if rec.pidfd is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(rec.pidfd)
            os.close(rec.pidfd)
            rec.pidfd = None
        for svc in rec.services:
            channels.end_service(self._st, self._out, svc, STATE_PEER_DEAD)
        rec.services.clear()
        for ch in list(rec.lanes):
            channels.close_channel(self._st, self._out, ch, STATE_PEER_DEAD)
        for request_id in list(rec.parked):
            naming.unpark(self._st, self._out, rec, request_id)
        self._st.subscribers.discard(rec)
        for cap in rec.caps:
            if cap.kind == "endpoint" and cap.watched:
                cap.target.owner.watched_by.discard((rec, cap.handle))
            elif cap.kind == "region":
                cap.target.release()
        watchers, rec.watched_by = rec.watched_by, set()
        for watcher, handle in watchers:
            self._event(watcher, frames.Death(handle, rec.process_id))
        if self._st.restricted_pids.get(rec.pid) is rec:
            del self._st.restricted_pids[rec.pid]
        rec.caps.uncharge()
        if rec.usage is not None:
            rec.usage.holders -= 1
            self._st.drop_usage(rec.usage)
        if rec.child is not None:
            self._child_exited(rec.child, restart and not self._stopping)


class _KernelOutbox:
    """The Outbox the domains answer through: the kernel's own sending, audit and timer methods
    (bound once, so a domain's call costs what the kernel's own does)."""

    def __init__(self, kernel: Kernel) -> None:
        self.respond = kernel._respond
        self.event = kernel._event
        self.audit = kernel._audit_event
        self.after = kernel._after
        self.cancel = kernel._cancel


def _request_failed(exc: Exception) -> IpcError:
    """The error a request that failed unexpectedly answers with (what and what to do)."""
    if isinstance(exc, OSError):
        if exc.errno in _RESOURCE_ERRNOS or exc.errno == errno.ENOSPC:
            return OutOfMemory(f"the kernel is out of resources ({exc.strerror}): try again later, "
                               "or release capabilities, regions and channels this process holds")
        return IpcError(f"the kernel could not do this: {exc.strerror or exc}")
    return IpcError(f"the kernel failed on this request ({type(exc).__name__}: "
                    f"{str(exc)[:LOG_CHARS]}); it is logged, please report it")
