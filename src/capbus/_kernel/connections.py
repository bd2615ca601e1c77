"""Connections: who comes in at the listening socket, what each connection is charged (its
ProcessRecord, the connection counts, its fd budgets, its uid's usage), the Hello that admits or
refuses it, and its end, when everything it held is given back.

A small class rather than functions over KernelState, as the other domains are: it owns OS
resources the loop shares with it (the listening socket's reserve fd, registrations in the
loop's selector) and counters nothing else reads (refused connections, fd budgets, the
ProcessId counter); the tables it charges are KernelState's. The end of a launched child is
the kernel's (it may restart it): handed in as on_child_exit.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import selectors
import socket
from collections.abc import Callable

from .._errors import IpcError, OutOfMemory, PermissionDenied, ProtocolError
from .._protocol import frames
from . import audit as _audit
from . import channels, naming, topics
from .launcher import Child
from .listener import not_admitted
from .policy import Access
from .shm import STATE_PEER_DEAD
from .state import Handler, KernelState, Outbox, ProcessRecord, brief, client_key, count_down
from .transport import FdBudget, Transport

log = logging.getLogger("capbus.kernel")

WAIT_MODES = ("spin", "adaptive", "block")  # what a Hello may name (the runtime's WAIT_CODES)
_MAX_REFUSED = 64  # refused connections kept at once until their Hello is answered
_REFUSED_GRACE = 2.0  # seconds a refused connection has to send its Hello


class Connections:
    """The kernel's connections, from accept to their end (see the module docstring)."""

    def __init__(self, st: KernelState, out: Outbox, sel: selectors.BaseSelector,
                 listener: socket.socket, access: Access,
                 on_child_exit: Callable[[Child, bool], None]) -> None:
        self._st = st
        self._out = out
        self._sel = sel
        self._listener = listener
        self._access = access  # who may come in (Policy.access)
        self._on_child_exit = on_child_exit
        self._refused = 0  # refused connections waiting for their Hello
        self._fd_budgets: dict[tuple[str, int], FdBudget] = {}  # ("pid"|"uid", n): shared
        self._ids = itertools.count(1)  # ProcessIds: never 0, never reused by this kernel
        # Kept in reserve so that an accept failing for lack of fds can still shed the connection.
        self._reserve_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        """The kernel stops: give back the reserve fd (the listener is the kernel's to close)."""
        if self._reserve_fd >= 0:
            os.close(self._reserve_fd)

    def accept(self) -> None:
        """The listener is readable: take up to 64 newcomers, each admitted or kept refused."""
        for _ in range(64):
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                self._accept_failed(exc)
                return
            transport = Transport(sock, self._st.limits.outbox_fds)
            pid, uid, gid = transport.peer_creds()
            refused_as: type[IpcError] = PermissionDenied
            refused = not_admitted(self._access, self._st.uid, sock, pid, uid, gid)
            if not refused:
                refused_as, refused = OutOfMemory, self._over_connection_bound(pid, uid)
            if refused:
                # Answered with a clear error at its Hello, but it holds no pidfd and counts in
                # no table; past _MAX_REFUSED of those the newcomer is just closed.
                if self._refused >= _MAX_REFUSED:
                    transport.close()
                    continue
                rec = self.add(transport, pid, uid, gid, None, None, None, None, refused=refused)
                rec.refused_as = refused_as
                self._refused += 1
                self._out.after(_REFUSED_GRACE, functools.partial(self.gone, rec, "refused: no Hello"))
                continue
            pidfd = None
            if pid > 0:
                try:
                    pidfd = os.pidfd_open(pid)
                except OSError:  # already gone (or not visible from here): the socket tells
                    pidfd = None
            package = self._st.policy.uid_packages.get(uid)
            self.add(transport, pid, uid, gid, pidfd, package, None, None)

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

        self._out.after(0.5, resume)

    def add(
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
        """A new connection's record, charged to its pid and uid unless refused, and watched by
        the loop (its socket, and its pidfd when there is one)."""
        rec = ProcessRecord(next(self._ids), pid, uid, gid, transport, pidfd, package, name, child)
        rec.refused = refused
        rec.sandboxed = child is not None and child.spec.sandbox is not None
        self._st.procs[rec.process_id] = rec
        if not refused:
            naming.set_authority(self._st, rec)
            rec.counted = True
            self._st.conns_by_pid[client_key(rec)] = self._st.conns_by_pid.get(client_key(rec), 0) + 1
            self._st.conns_by_uid[uid] = self._st.conns_by_uid.get(uid, 0) + 1
            lim = self._st.limits
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
        self._out.audit(_audit.PROCESS_START, rec, None, package or name or "",
                        refused or ("connected" if child is None else
                                    "launched sandboxed" if rec.sandboxed else "launched"))
        self._sel.register(transport.sock, selectors.EVENT_READ, ("conn", rec))
        if pidfd is not None:
            self._sel.register(pidfd, selectors.EVENT_READ, ("pidfd", rec))
        return rec

    def _over_connection_bound(self, pid: int, uid: int) -> str:
        """Why a new connection from (pid, uid) is refused, or "" if it is not."""
        lim = self._st.limits
        if pid > 0 and self._st.conns_by_pid.get(pid, 0) >= lim.connections_per_pid:
            return (f"pid {pid} already holds {lim.connections_per_pid} connections to the kernel "
                    "(its connections_per_pid limit): close some, or share one Process")
        if self._st.conns_by_uid.get(uid, 0) >= lim.connections_per_uid:
            return (f"uid {uid} already holds {lim.connections_per_uid} connections to the kernel "
                    "(its connections_per_uid limit): close some")
        return ""

    def violation(self, rec: ProcessRecord, exc: ProtocolError) -> None:
        """rec broke the protocol: audited, logged, and its connection ends."""
        self._out.audit(_audit.PROTOCOL_ERROR, rec, None, "", str(exc))
        log.warning("ProtocolError from process %d (pid %d): %s; closing its connection",
                    rec.process_id, rec.pid, brief(exc))
        self.gone(rec, f"protocol error: {brief(exc)}")

    def gone(self, rec: ProcessRecord, why: str, restart: bool = True) -> None:
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
        self._out.audit(_audit.PROCESS_EXIT, rec, None, rec.package or rec.name or "", why)
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
        for ch in list(rec.channels):
            channels.close_channel(self._st, self._out, ch, STATE_PEER_DEAD)
        topics.process_gone(self._st, self._out, rec)
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
            self._out.event(watcher, frames.Death(handle, rec.process_id))
        if self._st.restricted_pids.get(rec.pid) is rec:
            del self._st.restricted_pids[rec.pid]
        rec.caps.uncharge()
        if rec.usage is not None:
            rec.usage.holders -= 1
            self._st.drop_usage(rec.usage)
        if rec.child is not None:
            self._on_child_exit(rec.child, restart)


def on_hello(st: KernelState, out: Outbox, rec: ProcessRecord, msg: frames.Hello,
             rid: int) -> frames.Frame:
    if rec.refused:
        raise rec.refused_as(f"the kernel refuses this connection: {rec.refused}")
    if msg.wait_mode not in WAIT_MODES:
        raise ValueError(f"wait mode {msg.wait_mode!r:.80} is not one of {', '.join(WAIT_MODES)}")
    rec.wait_mode = msg.wait_mode
    return frames.Welcome(rec.process_id, rec.package, max(rec.pid, 0),
                          naming.welcome_grants(st, out, rec))


# What this module answers: Hello, which admits a connection (or tells it why not).
HANDLERS: dict[type[frames.Frame], Handler] = {
    frames.Hello: on_hello,
}
