"""The kernel: the one trusted party. One thread owns all state and runs an epoll loop over the
listening socket, every process connection, every process's pidfd and a wake-up eventfd.

Other threads (the embedding program, signal handlers) never touch the state: they hand a
closure to the loop (`_call`) and wait for its result.

This module is the driver: lifecycle, the thread-safe API, the loop, timers, launched children,
and dispatch: reading requests, framing and sending answers and events (the Outbox this module
implements, _KernelOutbox) and the audit glue. A connection's admission, accounting and end are
in connections.py (Connections); what each request does is in the domain modules (naming,
channels, delegation, region_requests, introspect), functions over the shared state
(state.KernelState) that answer through the Outbox.
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
from . import channels, connections, delegation, introspect, naming, region_requests, topics
from .captable import Capability
from .connections import Connections
from .grants import GrantSpec, combine_grants, parse_grants, parse_lookup
from .launcher import Child, LaunchSpec, default_lookup, launch
from .listener import bind
from .policy import KernelLimits, Policy, ProcessInfo
from .sandbox import Sandbox
from .state import LOG_CHARS, KernelState, Outbox, ProcessRecord, Timer
from .transport import Transport

_T = TypeVar("_T")

log = logging.getLogger("capbus.kernel")

_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS,
                              errno.ETOOMANYREFS})

_FRAMES_PER_WAKEUP = 32  # per connection and loop turn, so one chatty process cannot starve others
# ... and bytes: a request costs O(its size), so 32 big ones (1024-entry Access frames) in one
# turn would hold the loop ~40 ms; past this many bytes the connection waits for the next turn.
_BYTES_PER_WAKEUP = 16 * 1024


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
        # this kernel's state and outbox (Hello is the connections' own: it admits or refuses).
        self._handlers: dict[type, Callable[[ProcessRecord, Any, int], frames.Frame | None]] = {}
        for domain in (connections, naming, channels, delegation, region_requests, introspect,
                       topics):
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
        # Admission, records and their accounting, each connection's end (a launched child's
        # end comes back here: it may restart, unless the kernel is stopping).
        self._conns = Connections(self._st, self._out, self._sel, self._listener, self.access,
                                  lambda child, restart: self._child_exited(
                                      child, restart and not self._stopping))
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
        if isinstance(argv, (str, bytes)):  # a str is a sequence of 1-character arguments
            raise TypeError(f"argv must be a list of strings, not one string: {argv!r:.80} "
                            "(say [sys.executable, 'app.py'], or shlex.split() a command line)")
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
                            self._conns.gone(rec, "kernel error")
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
            self._conns.gone(rec, "exited")
        elif what == "listen":
            self._conns.accept()
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
            self._conns.gone(rec, "kernel stopping", restart=False)
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
        self._conns.close()
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

    # ---- launched children -----------------------------------------------------------------------

    def _launch_child(self, child: Child) -> int:
        popen, sock = launch(child.spec, self.socket_path)
        pidfd = os.pidfd_open(popen.pid)
        sandbox = child.spec.sandbox
        # The identity it runs as: a sandbox's user= is what "uid:N" allowlists must see.
        uid, gid = (sandbox and sandbox.identity()) or (os.getuid(), os.getgid())
        rec = self._conns.add(
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
                self._conns.violation(rec, exc)
                return
            except OSError as exc:
                self._conns.gone(rec, f"connection error: {exc}")
                return
            if got is None:
                self._conns.gone(rec, "closed its connection")
                return
            data, sender_pid, nfds = got
            budget -= len(data)
            if rec.pid > 0 and sender_pid != rec.pid:
                self._conns.violation(rec, ProtocolError(
                    f"frame sent by pid {sender_pid} on the connection of pid {rec.pid} "
                    "(a forked child must open its own connection)"
                ))
                return
            try:
                msg, request_id = rec.proto.receive(data, nfds)
            except ProtocolError as exc:
                self._conns.violation(rec, exc)
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

    def _respond(self, rec: ProcessRecord, request_id: int, msg: frames.Frame,
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
            self._conns.gone(rec, "refused at Hello")

    def _event(self, rec: ProcessRecord, msg: frames.Frame, fds: tuple[int, ...] = ()) -> bool:
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
            self._conns.violation(rec, exc)
        except OSError as exc:
            if fds and exc.errno in _RESOURCE_ERRNOS:
                log.warning("no room to pass %d fds to process %d: %s", len(fds), rec.process_id, exc)
                return exc
            self._conns.gone(rec, f"connection error: {exc}")
        return None

    def _flush(self, rec: ProcessRecord) -> None:
        try:
            pending = rec.transport.flush()
        except OSError as exc:
            self._conns.gone(rec, f"connection error: {exc}")
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
