"""The kernel: the one trusted party. One thread owns all state and runs an epoll loop over the
listening socket, every process connection, every process's pidfd and a wake-up eventfd.

Other threads (the embedding program, signal handlers) never touch the state: they hand a
closure to the loop (`_call`) and wait for its result.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import errno
import fcntl
import heapq
import itertools
import json
import logging
import os
import queue
import select
import selectors
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .. import _core, _paths, _protect
from .._errors import (
    VALUE_ERROR_CODE,
    InvalidCapability,
    IpcError,
    MessageTooLarge,
    OutOfMemory,
    PeerDied,
    PermissionDenied,
    ProcessNotFound,
    ProtocolError,
    SandboxError,
    ServiceNotFound,
)
from .._fdlimit import raise_fd_limit
from .._protocol import frames
from .._protocol.connection import KernelConnection, State
from .._protocol.names import check_name
from . import audit as _audit
from .allowlist import AccessList
from .captable import Capability, CapTable, Limits, check_rights, next_uid
from .grants import GrantSpec, combine_grants, lookup_allows, parse_grants, parse_lookup
from .launcher import Child, LaunchSpec, default_lookup, launch
from .policy import KernelLimits, Policy, ProcessInfo
from .regions import MAX_REGION, REGION_RIGHTS, Region
from .registry import Registry
from .sandbox import Sandbox
from .shm import ChannelShm, make_doorbell, make_eventfd, make_sleep_eventfd
from .transport import FdBudget, Transport

log = logging.getLogger("capbus.kernel")

NSLOTS = 256  # slots per ring
ARENA_SIZE = 128 << 20  # bytes per direction: virtual, a sparse memfd costs only what is touched
MAX_LANES_PER_CAP = 64  # channels one holder may open on one endpoint (one per calling thread)
MAX_LANES_PER_PROCESS = 1024  # channels one process may hold open in all
MAX_TRANSFERS = 4096  # attached capabilities and regions waiting to be claimed, per service
MAX_PENDING_PER_CLIENT = 1024  # of those, what one client process may have waiting
MAX_ATTACH = 64  # the most caps (and regions) a service may let one message carry
ENDPOINT_RIGHTS = frozenset({"send", "share"})
WAIT_MODES = ("spin", "adaptive", "block")  # what a Hello may name (the runtime's WAIT_CODES)
# Every listing page and every row in it fits one frame, whatever the strings in it: a page is
# filled by encoded size, a row larger than _ROW_ROOM has its lists cut short (and says so).
_PAGE_ROOM = frames.MAX_FRAME - 1024
_ROW_ROOM = 16 * 1024
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS,
                              errno.ETOOMANYREFS})

_FRAMES_PER_WAKEUP = 32  # per connection and loop turn, so one chatty process cannot starve others
# ... and bytes: a request costs O(its size), so 32 big ones (1024-entry Access frames) in one
# turn would hold the loop ~40 ms; past this many bytes the connection waits for the next turn.
_BYTES_PER_WAKEUP = 16 * 1024
_LOG_CHARS = 200  # of anything a peer chose (a reason, an error's text) in one log line
_MAX_REFUSED = 64  # refused connections kept at once until their Hello is answered
_REFUSED_GRACE = 2.0  # seconds a refused connection has to send its Hello
# Services a restricted process (one under a lookup list) lost a capability to by revocation,
# remembered so that it cannot look them up again; past this many it may look nothing up.
MAX_REVOKED_SERVICES = 4096
# What Welcome's grant rows may take of one frame: the rest holds the header and a package
# name (255 bytes of UTF-8, at most 1530 bytes as escaped JSON)
_WELCOME_ROOM = frames.MAX_FRAME - 4096


class _Unset:
    """spawn(lookup=...) not given: the default for the spec (see launcher.default_lookup)."""

    def __repr__(self) -> str:
        return "<default>"


_UNSET: Any = _Unset()


def _brief(text: object) -> str:
    """Text from a process (or about it) as a log or audit line may quote it: bounded, valid
    UTF-8."""
    text = str(text).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= _LOG_CHARS else text[:_LOG_CHARS] + f"... ({len(text)} chars)"


@dataclass(eq=False, order=False)
class _Timer:
    deadline: float
    seq: int
    fn: Callable[[], None] | None  # None: cancelled

    def __lt__(self, other: _Timer) -> bool:
        return (self.deadline, self.seq) < (other.deadline, other.seq)


@dataclass(frozen=True)
class ServiceBounds:
    """What one message to a service may carry, and how many channels one client may hold.

    max_caps / max_regions: capabilities and regions attached to one message; max_region_bytes:
    the total size of those regions (what the receiver maps for it); max_channels_per_process /
    max_channels_per_uid: channels one client process (OS pid) / one uid may hold to it at once;
    attach_ttl: seconds an attachment waits for its message to be claimed."""

    max_caps: int = 16
    max_regions: int = 16
    max_region_bytes: int = 1 << 30
    max_channels_per_process: int = 128
    max_channels_per_uid: int = 1024
    attach_ttl: float = 60.0

    @classmethod
    def from_request(cls, raw: dict[str, int] | None) -> ServiceBounds:
        """From Register(bounds=...): ValueError naming the bound that is out of range."""
        raw = dict(raw or {})
        d = cls()
        out = cls(
            raw.get("max_caps", d.max_caps), raw.get("max_regions", d.max_regions),
            raw.get("max_region_bytes", d.max_region_bytes),
            raw.get("max_channels_per_process", d.max_channels_per_process),
            raw.get("max_channels_per_uid", max(d.max_channels_per_uid,
                                                raw.get("max_channels_per_process", 0))),
            raw["attach_ttl_ms"] / 1000.0 if "attach_ttl_ms" in raw else d.attach_ttl,
        )
        for name, value, lo, hi in (
            ("max_caps", out.max_caps, 0, MAX_ATTACH),
            ("max_regions", out.max_regions, 0, MAX_ATTACH),
            ("max_region_bytes", out.max_region_bytes, 0, MAX_REGION),
            ("max_channels_per_process", out.max_channels_per_process, 1, _core.MAX_CHANNELS - 1),
            ("max_channels_per_uid", out.max_channels_per_uid, out.max_channels_per_process,
             _core.MAX_CHANNELS - 1),
            ("attach_ttl_ms", int(out.attach_ttl * 1000), 1, 3_600_000),
        ):
            if not lo <= value <= hi:
                raise ValueError(f"{name} must be in {lo}..{hi}, got {value}")
        return out


@dataclass(eq=False)
class _Attached:
    """What was attached to one message (a channel's tag), waiting for its claim."""

    children: list[Capability]
    client: int  # the attaching client's key (see _client_key)
    timer: _Timer | None = None

    @property
    def caps(self) -> int:
        return sum(c.kind != "region" for c in self.children)

    @property
    def regions(self) -> int:
        return sum(c.kind == "region" for c in self.children)

    @property
    def region_bytes(self) -> int:
        return sum(c.target.size for c in self.children if c.kind == "region")


@dataclass(eq=False)
class ServiceRecord:
    """A registered service as the kernel keeps it (the runtime's capbus.Service is the other
    end): its owner, access list, bounds, doorbells and the channels its clients hold."""

    name: str
    kind: str  # "name" | "package"
    owner: ProcessRecord
    handle: int = 0
    access: AccessList = field(default_factory=AccessList)
    default_limits: dict[str, int] = field(default_factory=dict)  # for endpoints it hands out
    bounds: ServiceBounds = field(default_factory=ServiceBounds)
    pending: int = 0  # attached capabilities and regions not claimed yet (on its channels)
    pending_by: dict[int, int] = field(default_factory=dict)  # client key -> its share of them
    chans_by_client: dict[int, int] = field(default_factory=dict)  # client key -> channels held
    chans_by_uid: dict[int, int] = field(default_factory=dict)
    # Live channels indexed by who sent them, so that a deny entry finds the channels it takes
    # away without a scan of every channel (ProcessId, uid, package -> channels)
    chans_of_id: dict[int, set[Channel]] = field(default_factory=dict)
    chans_of_uid: dict[int, set[Channel]] = field(default_factory=dict)
    chans_of_package: dict[str, set[Channel]] = field(default_factory=dict)
    # generation -> a closed channel the server still drains, with attachments of messages it
    # queued before closing (claimable only by a claim naming that generation)
    draining: dict[int, Channel] = field(default_factory=dict)
    alive: bool = True
    doorbell_fd: int = -1
    bell_event_fd: int = -1
    bell_sleep_fd: int = -1
    channels: dict[int, Channel] = field(default_factory=dict)
    free_indices: list[int] = field(default_factory=list)
    next_index: int = 0

    def alloc_index(self) -> int:
        if self.free_indices:
            return self.free_indices.pop()
        if self.next_index >= _core.MAX_CHANNELS:
            raise OutOfMemory(f"service {self.name!r} has {_core.MAX_CHANNELS} channels open")
        self.next_index += 1
        return self.next_index - 1


@dataclass(eq=False)
class Channel:
    """One lane between a client and a service: the kernel's bookkeeping and mappings."""

    index: int
    service: ServiceRecord
    client: ProcessRecord
    cap: Capability
    shm: ChannelShm
    generation: int = 0  # unique per kernel: names this instance of the index
    # message tag -> what was attached to it; discarded with the channel, so a later channel at
    # the same index never sees a former client's attachments
    transfers: dict[int, _Attached] = field(default_factory=dict)


@dataclass(eq=False)
class _GrantState:
    """One startup grant of one process: its endpoint once resolved (None until the service is
    there, or after the process released it); revoked by its spawner for good."""

    spec: GrantSpec
    uid: int = field(default_factory=next_uid)  # its budget, kept across re-resolutions
    cap: Capability | None = None
    revoked: bool = False


@dataclass(eq=False)
class _UidUsage:
    """What all processes of one uid hold, charged to that uid (per-user accounting, as
    dbus-broker keeps it: each object is charged to the user who caused it, so one user's many
    processes cannot add up to more than the user's quota, and another user is untouched).

    caps: capabilities in their tables; channels: channels they hold open as clients;
    region_bytes: bytes of live regions they created (charged to the creator until the last
    holder, of whatever uid, lets go); holders: their counted connections. Dropped from the
    kernel's table once all of these are zero."""

    uid: int
    caps: int = 0
    channels: int = 0
    region_bytes: int = 0
    holders: int = 0

    def idle(self) -> bool:
        return not (self.caps or self.channels or self.region_bytes or self.holders)


@dataclass(eq=False)
class ProcessRecord:
    process_id: int
    pid: int
    uid: int
    gid: int
    transport: Transport
    pidfd: int | None
    package: str | None = None
    name: str | None = None
    child: Child | None = None
    since: float = field(default_factory=time.time)
    proto: KernelConnection = field(default_factory=KernelConnection)
    caps: CapTable = field(default_factory=CapTable)
    services: list[ServiceRecord] = field(default_factory=list)
    lanes: set[Channel] = field(default_factory=set)  # channels it opened as a client
    watched_by: set[tuple[ProcessRecord, int]] = field(default_factory=set)
    endpoints: dict[int, Capability] = field(default_factory=dict)  # id(ServiceRecord) -> its cap
    budgets: dict[int, int] = field(default_factory=dict)  # id(ServiceRecord) -> its endpoints' uid
    # request id -> (waiting key, its expiry timer)
    parked: dict[int, tuple[tuple[str, str], _Timer]] = field(default_factory=dict)
    subscription: int = 0  # handle of its registration subscription, 0 if none
    notice_pending: bool = False
    notices_sent: int = 0
    wait_mode: str = ""
    alive: bool = True
    refused: str = ""  # not admitted, or over a connection bound: its Hello gets this error
    refused_as: type[IpcError] = OutOfMemory
    counted: bool = False  # in the kernel's per-pid / per-uid connection counts
    grants: dict[str, _GrantState] = field(default_factory=dict)  # set at Hello
    grant_waits: dict[int, str] = field(default_factory=dict)  # parked Grant request -> key
    # (which list, its patterns): a lookup must pass every one; none at all: unrestricted
    lookup_lists: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    revoked_services: set[tuple[str, str]] = field(default_factory=set)  # (kind, name)
    usage: _UidUsage | None = None  # its uid's, while counted
    sandboxed: bool = False  # launched inside a capbus.Sandbox (Landlock + seccomp)

    @property
    def restricted(self) -> bool:
        return bool(self.lookup_lists)

    def __repr__(self) -> str:  # never the whole record (tables, outbox) in a log line
        return f"<process {self.process_id} pid {self.pid} uid {self.uid}>"

    def names_served(self) -> list[str]:
        return [s.name for s in self.services if s.kind == "name" and s.alive]

    def info(self) -> ProcessInfo:
        return ProcessInfo(self.process_id, self.pid, self.uid, self.gid, self.package, self.name)


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
        self._conns_by_pid: dict[int, int] = {}
        self._conns_by_uid: dict[int, int] = {}
        self._refused = 0  # refused connections waiting for their Hello
        self._fd_budgets: dict[tuple[str, int], FdBudget] = {}  # ("pid"|"uid", n): shared
        self._usage: dict[int, _UidUsage] = {}  # uid -> what its processes hold (quotas)
        self._uid = os.getuid()
        self._procs: dict[int, ProcessRecord] = {}
        self._ids = itertools.count(1)  # ProcessIds: never 0, never reused by this kernel
        self._channel_gens = itertools.count(1)  # channel instances: never 0, never reused
        self._names: Registry[ServiceRecord] = Registry("service name")
        self._packages: Registry[ServiceRecord] = Registry("package")
        self._subscribers: set[ProcessRecord] = set()
        # (kind, key) -> the parked lookups waiting for it, oldest first (a dict: O(1) removal)
        self._waiters: dict[tuple[str, str], dict[tuple[ProcessRecord, int], None]] = {}
        # Parked lookups per client (see _client_key) and per uid: KernelLimits.parked_lookups*
        self._parked_by_pid: dict[int, int] = {}
        self._parked_by_uid: dict[int, int] = {}
        self._timers: list[_Timer] = []
        self._cancelled_timers = 0
        self._timer_seq = itertools.count()
        self._calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple, Future]] = queue.SimpleQueue()
        self._children: set[Child] = set()
        # OS pid -> the record of a launched process under a lookup list: a connection from it or
        # from a process it started is under the same lists (see _set_authority)
        self._restricted_pids: dict[int, ProcessRecord] = {}
        self._stopping = False
        self._shut = False
        self._thread: threading.Thread | None = None
        self._sel = selectors.DefaultSelector()
        self._handlers: dict[type, Callable[[ProcessRecord, Any, int], frames.Message | None]] = {
            frames.Hello: self._on_hello,
            frames.Register: self._on_register,
            frames.RegisterPackage: self._on_register_package,
            frames.Lookup: self._on_lookup,
            frames.LookupPackage: self._on_lookup_package,
            frames.Subscribe: self._on_subscribe,
            frames.NotifyAck: self._on_notify_ack,
            frames.Watch: self._on_watch,
            frames.Release: self._on_release,
            frames.Query: self._on_query,
            frames.Grant: self._on_grant,
            frames.OpenChannel: self._on_open_channel,
            frames.CloseChannel: self._on_close_channel,
            frames.ReportBad: self._on_report_bad,
            frames.Access: self._on_access,
            frames.Restrict: self._on_restrict,
            frames.Revoke: self._on_revoke,
            frames.Delegate: self._on_delegate,
            frames.Attach: self._on_attach,
            frames.Detach: self._on_detach,
            frames.Claim: self._on_claim,
            frames.CreateRegion: self._on_create_region,
            frames.MapRegion: self._on_map_region,
            frames.SealRegion: self._on_seal_region,
        }
        self.access = self.policy.access
        raise_fd_limit()
        try:
            self._dirfd, self._lock_fd, self._listener = _bind(self.socket_path, bool(self.access))
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

    # ---- public, thread-safe ------------------------------------------------------------------

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
        grants: Mapping[str, Any] | None = None,
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
        return self._call(self._rows, "channels")

    def caps(self, process_id: int) -> list[dict[str, Any]]:
        """A process's capability table, as `capbus caps` shows it."""
        return self._call(self._rows, "caps", process_id)

    def processes(self) -> list[dict[str, Any]]:
        """The process table, as `capbus ps` shows it."""
        return self._call(self._rows, "processes")

    def services(self) -> list[dict[str, Any]]:
        return self._call(self._rows, "services")

    def process_stats(self, process_id: int) -> dict[str, Any]:
        """What the kernel holds for one process: queue and table sizes (all bounded)."""
        return self._call(self._stats, process_id)

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

    # ---- the loop -----------------------------------------------------------------------------

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._thread is None or threading.current_thread() is self._thread:
            return fn(*args)
        if self._stopping or not self._thread.is_alive():
            raise IpcError(f"the kernel at {self.socket_path} is stopped")
        fut: Future = Future()
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

    def _after(self, delay: float, fn: Callable[[], None]) -> _Timer:
        timer = _Timer(time.monotonic() + min(delay, 1e9), next(self._timer_seq), fn)
        heapq.heappush(self._timers, timer)
        return timer

    def _cancel(self, timer: _Timer) -> None:
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
        if self._shut:
            return
        self._shut = True
        _paths.withdraw_embedded(self.socket_path)
        for rec in list(self._procs.values()):
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

    # ---- connections --------------------------------------------------------------------------

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
            refused = self._not_admitted(sock, pid, uid, gid)
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
                self._after(_REFUSED_GRACE, lambda rec=rec: self._gone(rec, "refused: no Hello"))
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
            if not self._shut:
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
        self._procs[rec.process_id] = rec
        if not refused:
            self._set_authority(rec)
            rec.counted = True
            self._conns_by_pid[_client_key(rec)] = self._conns_by_pid.get(_client_key(rec), 0) + 1
            self._conns_by_uid[uid] = self._conns_by_uid.get(uid, 0) + 1
            lim = self.limits
            budgets = []
            for key, limit, what in (
                (("pid", _client_key(rec)), lim.outbox_fds, f"pid {pid} (outbox_fds)"),
                (("uid", uid), lim.outbox_fds_per_uid, f"uid {uid} (outbox_fds_per_uid)"),
            ):
                budget = self._fd_budgets.get(key)
                if budget is None:
                    budget = self._fd_budgets[key] = FdBudget(limit, what, key)
                budget.users += 1
                budgets.append(budget)
            transport.budgets = tuple(budgets)
            usage = rec.usage = self._usage_of(uid)
            usage.holders += 1
            rec.caps.charge = lambda n, usage=usage: self._charge_caps(usage, n)
        self._audit_event(_audit.PROCESS_START, rec, None, package or name or "",
                          refused or ("connected" if child is None else
                                      "launched sandboxed" if rec.sandboxed else "launched"))
        self._sel.register(transport.sock, selectors.EVENT_READ, ("conn", rec))
        if pidfd is not None:
            self._sel.register(pidfd, selectors.EVENT_READ, ("pidfd", rec))
        return rec

    def _not_admitted(self, sock: socket.socket, pid: int, uid: int, gid: int) -> str:
        """Why a connection from (pid, uid, gid) may not use this kernel at all, or "" if it may:
        the kernel's own user and root may, and whom its Access names (a uid, or a member of a
        group: primary gid from SO_PEERCRED, supplementary groups from SO_PEERGROUPS, both taken
        by the OS at connect(), so neither a later setgroups nor a reused pid can change them)."""
        access = self.access
        if uid in (self._uid, 0) or uid in access.uids:
            return ""
        if access.groups and (gid in access.groups
                              or not access.groups.isdisjoint(_peer_groups(sock, pid, uid))):
            return ""
        return (f"uid {uid} is not one of the users this kernel serves (it runs as uid "
                f"{self._uid}; its owner may admit others with --allow-uid / --allow-group, or "
                "[access] in its policy)")

    def _over_connection_bound(self, pid: int, uid: int) -> str:
        """Why a new connection from (pid, uid) is refused, or "" if it is not."""
        lim = self.limits
        if pid > 0 and self._conns_by_pid.get(pid, 0) >= lim.connections_per_pid:
            return (f"pid {pid} already holds {lim.connections_per_pid} connections to the kernel "
                    "(its connections_per_pid limit): close some, or share one Process")
        if self._conns_by_uid.get(uid, 0) >= lim.connections_per_uid:
            return (f"uid {uid} already holds {lim.connections_per_uid} connections to the kernel "
                    "(its connections_per_uid limit): close some")
        return ""

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
                          f"{msg!r:.{_LOG_CHARS}}", rec.process_id, rec.pid,
                          type(exc).__name__, _LOG_CHARS, exc, exc_info=log.isEnabledFor(
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
                      rec.process_id, _LOG_CHARS, exc)
            fds = ()
            frame = rec.proto.respond(request_id, frames.Error(
                IpcError.code, f"the kernel could not encode its {type(msg).__name__} answer "
                f"({str(exc)[:_LOG_CHARS]}); this is a kernel bug, please report it"))
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
        if self._shut:
            return True
        if rec.alive and rec.proto.state is State.READY:
            try:
                frame = rec.proto.event(msg)
            except ProtocolError as exc:  # dropped, not sent: the receiver would refuse it
                log.error("event %s to process %d does not encode: %.*s", type(msg).__name__,
                          rec.process_id, _LOG_CHARS, exc)
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

    def _violation(self, rec: ProcessRecord, exc: ProtocolError) -> None:
        self._audit_event(_audit.PROTOCOL_ERROR, rec, None, "", str(exc))
        log.warning("ProtocolError from process %d (pid %d): %s; closing its connection",
                    rec.process_id, rec.pid, _brief(exc))
        self._gone(rec, f"protocol error: {_brief(exc)}")

    def _gone(self, rec: ProcessRecord, why: str, restart: bool = True) -> None:
        """A process is over: drop its registrations, tell its watchers, free what it held."""
        if not rec.alive:
            return
        rec.alive = False
        if rec.refused:
            self._refused -= 1
        if rec.counted:
            rec.counted = False
            _count_down(self._conns_by_pid, _client_key(rec))
            _count_down(self._conns_by_uid, rec.uid)
        why = _brief(why)
        log.info("process %d (pid %d) gone: %s", rec.process_id, rec.pid, why)
        self._audit_event(_audit.PROCESS_EXIT, rec, None, rec.package or rec.name or "", why)
        self._procs.pop(rec.process_id, None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(rec.transport.sock)
        rec.transport.close()
        rec.proto.close()
        for budget in rec.transport.budgets:
            budget.users -= 1
            if budget.users <= 0:
                self._fd_budgets.pop(budget.key, None)
        rec.transport.budgets = ()
        if rec.pidfd is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(rec.pidfd)
            os.close(rec.pidfd)
            rec.pidfd = None
        for svc in rec.services:
            self._end_service(svc, _core.STATE_PEER_DEAD)
        rec.services.clear()
        for ch in list(rec.lanes):
            self._close_channel(ch, _core.STATE_PEER_DEAD)
        for request_id in list(rec.parked):
            self._unpark(rec, request_id)
        self._subscribers.discard(rec)
        for cap in rec.caps:
            if cap.kind == "endpoint" and cap.watched:
                cap.target.owner.watched_by.discard((rec, cap.handle))
            elif cap.kind == "region":
                cap.target.release()
        watchers, rec.watched_by = rec.watched_by, set()
        for watcher, handle in watchers:
            self._event(watcher, frames.Death(handle, rec.process_id))
        if self._restricted_pids.get(rec.pid) is rec:
            del self._restricted_pids[rec.pid]
        rec.caps.uncharge()
        if rec.usage is not None:
            rec.usage.holders -= 1
            self._drop_usage(rec.usage)
        if rec.child is not None:
            self._child_exited(rec.child, restart and not self._stopping)

    # ---- per-uid quotas -----------------------------------------------------------------------

    def _usage_of(self, uid: int) -> _UidUsage:
        usage = self._usage.get(uid)
        if usage is None:
            usage = self._usage[uid] = _UidUsage(uid)
        return usage

    def _drop_usage(self, usage: _UidUsage) -> None:
        if usage.idle() and self._usage.get(usage.uid) is usage:
            del self._usage[usage.uid]

    def _charge_caps(self, usage: _UidUsage, n: int) -> None:
        if n > 0 and usage.caps + n > self.limits.caps_per_uid:
            raise OutOfMemory(
                f"uid {usage.uid} already holds {usage.caps} capabilities in all its processes "
                f"(its caps_per_uid limit is {self.limits.caps_per_uid}): release some")
        usage.caps += n
        if n < 0:
            self._drop_usage(usage)

    def _free_region_bytes(self, usage: _UidUsage, size: int) -> None:
        usage.region_bytes -= size
        self._drop_usage(usage)

    def uid_usage(self, uid: int) -> dict[str, int]:
        """What the processes of one uid hold, as the per-uid quotas count it (all 0: nothing)."""
        def row() -> dict[str, int]:
            u = self._usage.get(uid) or _UidUsage(uid)
            return {"connections": self._conns_by_uid.get(uid, 0), "caps": u.caps,
                    "channels": u.channels, "region_bytes": u.region_bytes}
        return self._call(row)

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

    # ---- requests -----------------------------------------------------------------------------

    def _on_hello(self, rec: ProcessRecord, msg: frames.Hello, rid: int) -> frames.Message:
        if rec.refused:
            raise rec.refused_as(f"the kernel refuses this connection: {rec.refused}")
        if msg.wait_mode not in WAIT_MODES:
            raise ValueError(f"wait mode {msg.wait_mode!r:.80} is not one of {', '.join(WAIT_MODES)}")
        rec.wait_mode = msg.wait_mode
        return frames.Welcome(rec.process_id, rec.package, max(rec.pid, 0),
                              self._welcome_grants(rec))

    # ---- startup grants and lookup lists --------------------------------------------------------

    def _set_authority(self, rec: ProcessRecord) -> None:
        """What rec starts with and may look up, set as it appears (before it can say a word):
        its package's rules in the policy and, for a launched process, its spawn's (both
        checked, and bounded, where they entered)."""
        rules = self.policy.package_rules(rec.package)
        spec = rec.child.spec if rec.child is not None else None
        ancestor = self._restricted_ancestor(rec.pid) if spec is None else None
        if ancestor is not None:
            # A restricted launched process (or one it started) that connects again by path
            # gets no grants and stays under its lists: one revoked-services memory for both
            rec.lookup_lists.extend((f"{which} (of launched process {ancestor.process_id}, "
                                     "which this process is or descends from)", patterns)
                                    for which, patterns in ancestor.lookup_lists)
            rec.revoked_services = ancestor.revoked_services
        if rules is not None and rules.lookup is not None:
            rec.lookup_lists.append((f"the policy's lookup list for package {rec.package!r}",
                                     rules.lookup))
        if spec is not None and spec.lookup is not None:
            rec.lookup_lists.append(("the lookup list it was spawned with", spec.lookup))
        grants = combine_grants(("the policy", rules.grants if rules else ()),
                                ("spawn", spec.grants if spec else ()))
        revoked = rec.child._revoked_grants if rec.child is not None else set()
        for key, g in grants.items():
            state = rec.grants[key] = _GrantState(g)
            if key in revoked:
                state.revoked = True
                self._remember_revoked(rec, g.lookup_key)
        if spec is not None and rec.restricted and rec.pid > 0:
            self._restricted_pids[rec.pid] = rec

    def _restricted_ancestor(self, pid: int) -> ProcessRecord | None:
        """The restricted launched process that is `pid` or its parent, grandparent... (read
        from /proc; a process that left its parent's tree, reparented to init, is not found)."""
        for _ in range(32):
            if not self._restricted_pids or pid <= 1 or pid == os.getpid():
                return None
            rec = self._restricted_pids.get(pid)
            if rec is not None and rec.alive:
                return rec
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    stat = f.read()
                pid = int(stat[stat.rindex(b")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                return None
        return None

    def _welcome_grants(self, rec: ProcessRecord) -> list[dict[str, Any]]:
        """One row per grant: resolved where its service is there (and admits rec), else
        pending (handle 0: the process asks with Grant). Rows that would not fit the frame
        (long service names) are sent pending too."""
        rows: list[dict[str, Any]] = []
        for key, state in rec.grants.items():
            if state.revoked:  # by the spawner, before this incarnation said hello
                continue
            row = _pending_grant(key)
            with contextlib.suppress(IpcError):
                row = _grant_row(key, self._resolve_grant(rec, key))
            rows.append(row)
        size = sum(_encoded_size(r) for r in rows)
        for i in sorted(range(len(rows)), key=lambda i: -len(rows[i]["name"])):
            if size <= _WELCOME_ROOM:
                break
            size -= _encoded_size(rows[i])
            rows[i] = _pending_grant(rows[i]["key"])
            size += _encoded_size(rows[i])
        return rows

    def _resolve_grant(self, rec: ProcessRecord, key: str,
                       svc: ServiceRecord | None = None) -> frames.Granted:
        """rec's endpoint for its grant `key`: the one it holds, or a new one if its service is
        there and admits it (the service's allowlist and the policy's lookup rules apply to a
        grant as to a lookup; rec's own lookup lists do not: a grant is what it was handed)."""
        state = rec.grants.get(key)
        if state is None:
            raise InvalidCapability(f"this process was given no grant {key!r:.80} (it has "
                                    f"{sorted(rec.grants)[:20]})")
        if state.revoked:
            raise InvalidCapability(f"grant {key!r} was revoked by the process's spawner")
        spec = state.spec
        registry = self._names if spec.kind == "name" else self._packages
        svc = svc or registry.get(spec.target)
        cap = state.cap
        if cap is not None and not cap.revoked and (svc is None or cap.target is svc):
            return _granted(cap)
        if svc is None:
            raise ServiceNotFound(f"grant {key!r}: no live process serves the {registry.what} "
                                  f"{spec.target!r} yet")
        self.policy.may_lookup(rec.info(), svc.name)
        self._check_access(rec, svc)
        if cap is not None and not cap.revoked:  # to a service that is gone: make room for it
            with contextlib.suppress(IpcError):
                if rec.caps.get(cap.handle) is cap:
                    self._drop_cap(rec, rec.caps.remove(cap.handle))
        cap = Capability("endpoint", svc, spec.rights,
                         spec.limits(Limits.from_request(svc.default_limits)), owner=rec,
                         uid=state.uid)
        cap.extra["grant"] = key
        rec.caps.insert(cap)
        state.cap = cap
        self._audit_event(_audit.GRANT, rec, cap, svc.name, f"startup grant {key}")
        return _granted(cap)

    def _on_grant(self, rec: ProcessRecord, msg: frames.Grant, rid: int) -> frames.Message | None:
        key = msg.key
        state = rec.grants.get(key)
        if state is None or state.revoked or msg.timeout_ms == 0:
            return self._resolve_grant(rec, key)
        spec = state.spec
        if (self._names if spec.kind == "name" else self._packages).get(spec.target) is not None:
            return self._resolve_grant(rec, key)
        # Not registered yet: parked like a lookup, answered when it registers (or times out)
        reply = self._lookup(rec, spec.kind, spec.target, msg.timeout_ms, rid, check=False)
        if reply is None:  # parked (a refusal to park must leave nothing behind)
            rec.grant_waits[rid] = key
        return reply

    def _remember_revoked(self, rec: ProcessRecord, service: tuple[str, str]) -> None:
        if rec.restricted and len(rec.revoked_services) < MAX_REVOKED_SERVICES:
            rec.revoked_services.add(service)
        elif rec.restricted:
            rec.revoked_services.add(("*", "*"))  # full: it may look nothing up any more

    def _check_lookup(self, rec: ProcessRecord, kind: str, key: str) -> None:
        """rec's own lookup lists, and what it lost by revocation (a restricted process)."""
        what = key if kind == "name" else f"package:{key}"
        for which, patterns in rec.lookup_lists:
            if not lookup_allows(patterns, kind, key):
                raise PermissionDenied(
                    f"process {rec.process_id} may not look up {what!r:.300}: it is not on "
                    f"{which} ({list(patterns[:20])}); use what it was granted")
        if (kind, key) in rec.revoked_services or ("*", "*") in rec.revoked_services:
            raise PermissionDenied(
                f"process {rec.process_id} may not look up {what!r:.300} again: a capability "
                "to it that this process held was revoked")

    def _revoke_grant(self, child: Child, key: str) -> None:
        rec = self._procs.get(child.process_id)
        known = {g.key for g in child.spec.grants} | (set(rec.grants) if rec else set())
        if key not in known:
            raise KeyError(f"{child!r} was given no grant {key!r}")
        child._revoked_grants.add(key)
        state = rec.grants.get(key) if rec is not None else None
        if rec is None or state is None:
            return  # not connected yet (or gone): its Hello finds the grant revoked
        state.revoked = True
        if state.cap is not None and not state.cap.revoked:
            self._revoke(state.cap, None)
        state.cap = None
        self._remember_revoked(rec, state.spec.lookup_key)
        self._audit_event(_audit.REVOKE, rec, None, state.spec.target, f"startup grant {key}")
        self._event(rec, frames.GrantRevoked(key))

    def _register(self, rec: ProcessRecord, key: str, kind: str, allow: list[str] | None,
                  rid: int, limits: dict[str, int] | None = None,
                  bounds: dict[str, int] | None = None) -> None:
        self.policy.may_register(rec.info(), key)
        registry = self._names if kind == "name" else self._packages
        # Checked here, not at each lookup: defaults a client could not be sent must be refused
        # to the service that asks for them, never relayed to everyone who looks it up.
        Limits.from_request(limits)
        svc = ServiceRecord(key, kind, rec,
                            access=AccessList.from_entries(allow, self.limits.access_entries),
                            default_limits=dict(limits or {}),
                            bounds=ServiceBounds.from_request(bounds))
        registry.claim(key, svc)
        try:
            svc.handle = rec.caps.insert(Capability("service", svc, frozenset({"receive"}), owner=rec))
            svc.doorbell_fd = make_doorbell()
            svc.bell_event_fd = make_eventfd()
            svc.bell_sleep_fd = make_sleep_eventfd()
        except (IpcError, OSError) as exc:
            registry.release(key, svc)
            if svc.handle:
                rec.caps.remove(svc.handle)
            for fd in (svc.doorbell_fd, svc.bell_event_fd, svc.bell_sleep_fd):
                if fd >= 0:
                    os.close(fd)
            raise exc if isinstance(exc, IpcError) else OutOfMemory(f"no doorbell: {exc}") from None
        rec.services.append(svc)
        self._audit_event(_audit.REGISTER, rec, None, key, kind)
        try:
            self._respond(rec, rid, frames.Registered(svc.handle, key),
                          (svc.doorbell_fd, svc.bell_event_fd, svc.bell_sleep_fd))
        except IpcError:  # the service never learnt of it: as if never registered
            self._drop_cap(rec, rec.caps.remove(svc.handle))
            raise
        self._grant_waiters((kind, key), svc)
        self._notify_registration()
        return None

    def _on_register(self, rec: ProcessRecord, msg: frames.Register, rid: int) -> None:
        return self._register(rec, check_name(msg.name), "name", msg.allow, rid, msg.limits,
                              msg.bounds)

    def _on_register_package(self, rec: ProcessRecord, msg: frames.RegisterPackage,
                             rid: int) -> None:
        if rec.package is None:
            raise PermissionDenied(
                "this process has no verified package: launch it with kernel.spawn(package=...) "
                "or capbus run, or map its uid to a package in the kernel's policy"
            )
        return self._register(rec, rec.package, "package", msg.allow, rid, msg.limits, msg.bounds)

    def _lookup(self, rec: ProcessRecord, kind: str, key: str, timeout_ms: int,
                rid: int, check: bool = True) -> frames.Message | None:
        """A lookup (or, check=False, a Grant request parked until its service registers)."""
        if check:
            self._check_lookup(rec, kind, key)
        registry = self._names if kind == "name" else self._packages
        svc = registry.get(key)
        if svc is not None:
            return self._grant(rec, svc)
        if timeout_ms == 0:
            raise ServiceNotFound(f"no live process serves the {registry.what} {key!r}")
        self._may_park(rec, registry.what, key)

        def expire() -> None:
            rec.grant_waits.pop(rid, None)
            if not self._unpark(rec, rid, fired=True):
                return
            err = ServiceNotFound(f"no process registered the {registry.what} {key!r} "
                                  f"within {timeout_ms} ms")
            self._respond(rec, rid, frames.Error(err.code, str(err)))

        rec.parked[rid] = ((kind, key), self._after(timeout_ms / 1000.0, expire))
        self._waiters.setdefault((kind, key), {})[(rec, rid)] = None
        client = _client_key(rec)
        self._parked_by_pid[client] = self._parked_by_pid.get(client, 0) + 1
        self._parked_by_uid[rec.uid] = self._parked_by_uid.get(rec.uid, 0) + 1
        return None

    def _may_park(self, rec: ProcessRecord, what: str, key: str) -> None:
        """Refuse to park one more lookup of this process or uid past KernelLimits (the asker
        gets OutOfMemory naming the limit; nobody else's lookups are touched)."""
        lim = self.limits
        if self._parked_by_pid.get(_client_key(rec), 0) >= lim.parked_lookups:
            who = f"pid {rec.pid}" if rec.pid > 0 else "this connection (its pid is unknown)"
            raise OutOfMemory(
                f"{who} already has {lim.parked_lookups} lookups waiting for a name "
                f"(its parked_lookups limit): cannot wait for the {what} {key!r:.80}; wait for "
                "fewer names at once, or look up without a timeout")
        if self._parked_by_uid.get(rec.uid, 0) >= lim.parked_lookups_per_uid:
            raise OutOfMemory(
                f"uid {rec.uid} already has {lim.parked_lookups_per_uid} lookups waiting for a "
                f"name (its parked_lookups_per_uid limit): cannot wait for the {what} "
                f"{key!r:.80}; wait for fewer names at once")

    def _unpark(self, rec: ProcessRecord, rid: int, fired: bool = False) -> bool:
        """Take a parked lookup off every table and counter (False if it was not parked). Every
        way out goes through here: granted, expired (fired: its timer is the one running),
        its connection gone."""
        parked = rec.parked.pop(rid, None)
        if parked is None:
            return False
        key, timer = parked
        if not fired:
            self._cancel(timer)
        waiters = self._waiters.get(key)
        if waiters is not None:
            waiters.pop((rec, rid), None)
            if not waiters:
                del self._waiters[key]
        _count_down(self._parked_by_pid, _client_key(rec))
        _count_down(self._parked_by_uid, rec.uid)
        return True

    def _grant_waiters(self, key: tuple[str, str], svc: ServiceRecord) -> None:
        for rec, rid in list(self._waiters.pop(key, {})):
            grant_key = rec.grant_waits.pop(rid, None)
            if not self._unpark(rec, rid) or not rec.alive:
                continue
            try:
                reply: frames.Message
                if grant_key is not None:
                    reply = self._resolve_grant(rec, grant_key, svc)
                else:
                    self._check_lookup(rec, *key)  # it may have lost the service meanwhile
                    reply = self._grant(rec, svc)
            except IpcError as exc:
                reply = frames.Error(exc.code, str(exc))
            self._respond(rec, rid, reply)

    def _verified_names(self, rec: ProcessRecord) -> list[str]:
        """The names rec serves that the policy reserves: only those meet an allowlist's
        "name:N" (a name anyone may register says nothing about who registered it first)."""
        return [n for n in rec.names_served() if self.policy.reserves(n)]

    def _check_access(self, rec: ProcessRecord, svc: ServiceRecord) -> None:
        if not svc.access.permits(rec.process_id, rec.uid, rec.package,
                                  names=rec.names_served(),
                                  allow_names=self._verified_names(rec)):
            raise PermissionDenied(
                f"service {svc.name!r} does not accept process {rec.process_id} "
                "(not on its allowlist, or denied)"
            )

    def _serving(self, name: str) -> int | None:
        svc = self._names.get(name)
        return svc.owner.process_id if svc is not None else None

    def _grant(self, rec: ProcessRecord, svc: ServiceRecord) -> frames.Message:
        self.policy.may_lookup(rec.info(), svc.name)
        self._check_access(rec, svc)
        # One endpoint capability per (holder, service): looking a service up again returns the
        # same handle, so repeated lookups cannot grow the holder's table.
        cap = rec.endpoints.get(id(svc))
        if cap is None or cap.target is not svc or cap.revoked:
            # Its budget (the receiver's token buckets, named by uid) is the holder's for this
            # service for good: releasing the endpoint and looking the service up again must not
            # buy a fresh burst.
            uid = rec.budgets.setdefault(id(svc), next_uid())
            cap = Capability("endpoint", svc, ENDPOINT_RIGHTS,
                             Limits.from_request(svc.default_limits), owner=rec, uid=uid)
            rec.caps.insert(cap)
            rec.endpoints[id(svc)] = cap
            self._audit_event(_audit.GRANT, rec, cap, svc.name)
        return _granted(cap)

    def _on_lookup(self, rec: ProcessRecord, msg: frames.Lookup, rid: int) -> frames.Message | None:
        return self._lookup(rec, "name", check_name(msg.name), msg.timeout_ms, rid)

    def _on_lookup_package(self, rec: ProcessRecord, msg: frames.LookupPackage,
                           rid: int) -> frames.Message | None:
        return self._lookup(rec, "package", check_name(msg.package, "package name"),
                            msg.timeout_ms, rid)

    def _on_subscribe(self, rec: ProcessRecord, msg: frames.Subscribe, rid: int) -> frames.Message:
        if not rec.subscription:
            rec.subscription = rec.caps.insert(Capability("subscription", None, owner=rec))
            self._subscribers.add(rec)
        return frames.Subscribed(rec.subscription)

    def _notify_registration(self) -> None:
        # Coalesced: a subscriber has at most one notice outstanding until it acknowledges, so
        # a registration storm costs each subscriber one frame, and non-subscribers nothing.
        for sub in list(self._subscribers):
            if not sub.notice_pending:
                sub.notice_pending = True
                sub.notices_sent += 1
                self._event(sub, frames.RegistrationNotice(sub.subscription))

    def _on_notify_ack(self, rec: ProcessRecord, msg: frames.NotifyAck, rid: int) -> frames.Message:
        rec.caps.get(msg.handle, "subscription")
        rec.notice_pending = False
        return frames.Ok()

    def _on_watch(self, rec: ProcessRecord, msg: frames.Watch, rid: int) -> frames.Message:
        cap = rec.caps.get(msg.handle, "endpoint")
        if not cap.watched:
            cap.watched = True
            if cap.target.alive:
                cap.target.owner.watched_by.add((rec, cap.handle))
            else:
                self._event(rec, frames.Death(cap.handle, cap.target.owner.process_id))
        return frames.Ok()

    def _on_release(self, rec: ProcessRecord, msg: frames.Release, rid: int) -> frames.Message:
        cap = rec.caps.remove(msg.handle)
        self._drop_cap(rec, cap)
        return frames.Ok()

    def _drop_cap(self, rec: ProcessRecord, cap: Capability) -> None:
        """A capability left rec's table (released, moved away): undo what it held."""
        if cap.kind == "service":
            svc: ServiceRecord = cap.target
            self._end_service(svc, _core.STATE_CLOSED)
            rec.services.remove(svc)
        elif cap.kind == "endpoint":
            if rec.endpoints.get(id(cap.target)) is cap:  # not a grant's or a derived one
                del rec.endpoints[id(cap.target)]
            grant = rec.grants.get(cap.extra.get("grant", ""))
            if grant is not None and grant.cap is cap:
                grant.cap = None  # released: asking for the grant again resolves it anew
            for ch in list(cap.extra.get("lanes", ())):
                self._close_channel(ch, _core.STATE_CLOSED)
            if cap.watched:
                cap.target.owner.watched_by.discard((rec, cap.handle))
        elif cap.kind == "subscription":
            rec.subscription = 0
            rec.notice_pending = False
            self._subscribers.discard(rec)
        elif cap.kind == "region":
            cap.target.release()

    # ---- channels -----------------------------------------------------------------------------

    def _on_open_channel(self, rec: ProcessRecord, msg: frames.OpenChannel, rid: int) -> None:
        cap = rec.caps.get(msg.handle, "endpoint")
        svc: ServiceRecord = cap.target
        if not svc.alive:
            raise PeerDied(f"the process serving {svc.name!r} has exited: look it up again")
        self._check_access(rec, svc)
        if "send" not in cap.rights:
            raise PermissionDenied(f"handle {cap.handle:#x} lacks the send right")
        if len(rec.lanes) >= MAX_LANES_PER_PROCESS:
            raise OutOfMemory(f"this process already holds {MAX_LANES_PER_PROCESS} channels")
        lanes: set[Channel] = cap.extra.setdefault("lanes", set())
        if len(lanes) >= MAX_LANES_PER_CAP:
            raise OutOfMemory(f"{MAX_LANES_PER_CAP} threads already call {svc.name!r} from here")
        # Per client process and per uid, so that no client can take every channel of a service.
        # Counted by OS process: connecting again from the same process gains it nothing.
        client, b = _client_key(rec), svc.bounds
        if svc.chans_by_client.get(client, 0) >= b.max_channels_per_process:
            raise OutOfMemory(
                f"service {svc.name!r} allows {b.max_channels_per_process} channels per client "
                f"process (its max_channels_per_process) and pid {rec.pid} holds them all: close "
                "lanes it does not use (each calling thread and each acall in flight holds one)")
        if svc.chans_by_uid.get(rec.uid, 0) >= b.max_channels_per_uid:
            raise OutOfMemory(
                f"service {svc.name!r} allows {b.max_channels_per_uid} channels per uid (its "
                f"max_channels_per_uid) and uid {rec.uid} holds them all: close some lanes")
        usage = rec.usage
        if usage is not None and usage.channels >= self.limits.channels_per_uid:
            raise OutOfMemory(
                f"uid {rec.uid} already holds {usage.channels} channels in all its processes (the "
                f"kernel's channels_per_uid limit): close lanes it does not use")
        index = svc.alloc_index()
        try:
            shm = ChannelShm(NSLOTS, ARENA_SIZE, rec.process_id)
        except OSError as exc:
            svc.free_indices.append(index)
            raise OutOfMemory(f"cannot create a channel: {exc}") from None
        try:
            shm.set_limits(cap.rights, cap.limits, cap.bucket_chain())
        except BaseException:
            shm.close()
            svc.free_indices.append(index)
            raise
        ch = Channel(index, svc, rec, cap, shm, next(self._channel_gens))
        svc.channels[index] = ch
        svc.chans_by_client[client] = svc.chans_by_client.get(client, 0) + 1
        svc.chans_by_uid[rec.uid] = svc.chans_by_uid.get(rec.uid, 0) + 1
        if usage is not None:
            usage.channels += 1
        rec.lanes.add(ch)
        lanes.add(ch)
        for index_, k in _sender_keys(svc, rec):
            index_.setdefault(k, set()).add(ch)
        # The server learns of the channel before the client can use it (one ordered socket
        # each, but the server maps it on its own time: a request that arrives first waits in
        # the ring, and the doorbell bit tells the server once it has mapped it).
        told = self._event(svc.owner, frames.ChannelOpened(
            svc.handle, index, rec.process_id, NSLOTS, ARENA_SIZE, ch.generation, max(rec.pid, 0)),
            (shm.chan_fd, shm.ctrl_fd, shm.reply_event_fd, shm.reply_pipe[1],
             shm.reply_pipe_spare[0]))
        if svc.channels.get(index) is not ch:
            # The server lost its connection over that event (it does not read its socket) and
            # the channel went with it: its fds are closed, the client hears why (not EBADF).
            raise PeerDied(f"the process serving {svc.name!r} was disconnected: look it up again")
        if not told:
            # The server could not be told of it: the channel would never be served.
            self._close_channel(ch, _core.STATE_CLOSED, tell_server=False)
            raise OutOfMemory(f"cannot pass a new channel to the server of {svc.name!r} now "
                              "(out of fds): try again later")
        try:
            self._respond(rec, rid, frames.ChannelGranted(index, NSLOTS, ARENA_SIZE,
                                                          max(svc.owner.pid, 0)),
                          (shm.chan_fd, shm.ctrl_fd, svc.doorbell_fd, svc.bell_event_fd,
                           shm.reply_event_fd, svc.bell_sleep_fd, shm.reply_pipe[0]))
        except IpcError:  # the client never got it: the server hears it closed
            self._close_channel(ch, _core.STATE_CLOSED)
            raise
        shm.drop_fds()

    def _close_channel(self, ch: Channel, state: int, tell_server: bool = True) -> None:
        svc = ch.service
        if svc.channels.get(ch.index) is not ch:
            return
        if not self._shut:
            # A stopping kernel leaves the page OPEN: both ends live, and the channel needs no
            # kernel (they watch each other's pidfds; a restarted kernel meets their reconnect).
            ch.shm.set_state(state)
        del svc.channels[ch.index]
        svc.free_indices.append(ch.index)
        _count_down(svc.chans_by_client, _client_key(ch.client))
        _count_down(svc.chans_by_uid, ch.client.uid)
        if ch.client.usage is not None:
            ch.client.usage.channels -= 1
            self._drop_usage(ch.client.usage)
        for index_, k in _sender_keys(svc, ch.client):
            chans = index_.get(k)
            if chans is not None:
                chans.discard(ch)
                if not chans:
                    del index_[k]
        # Attachments never reach a later channel at this index (a claim names the instance).
        # They stay with this instance only while the server drains what its client had queued
        # (a sender may send a region and exit at once); until claimed or expired.
        if ch.transfers and tell_server and svc.alive and state != _core.STATE_REVOKED:
            svc.draining[ch.generation] = ch
        else:
            for tag in list(ch.transfers):
                self._discard_attached(ch, tag)
        ch.client.lanes.discard(ch)
        ch.cap.extra.get("lanes", set()).discard(ch)
        if tell_server and svc.alive:
            self._event(svc.owner, frames.ChannelClosed(svc.handle, ch.index))
        ch.shm.close()

    def _end_service(self, svc: ServiceRecord, state: int) -> None:
        """Unregistered or its process gone: every channel to it ends, its clients are woken."""
        svc.alive = False
        (self._names if svc.kind == "name" else self._packages).release(svc.name, svc)
        self._audit_event(_audit.UNREGISTER, svc.owner, None, svc.name,
                          "released" if state == _core.STATE_CLOSED else "process gone")
        for ch in list(svc.channels.values()):
            self._close_channel(ch, state, tell_server=False)
        for ch in list(svc.draining.values()):
            for tag in list(ch.transfers):
                self._discard_attached(ch, tag)
        for fd in (svc.doorbell_fd, svc.bell_event_fd, svc.bell_sleep_fd):
            if fd >= 0:
                os.close(fd)
        svc.doorbell_fd = svc.bell_event_fd = svc.bell_sleep_fd = -1

    # ---- capabilities -------------------------------------------------------------------------

    def _on_restrict(self, rec: ProcessRecord, msg: frames.Restrict, rid: int) -> frames.Message:
        cap = rec.caps.get(msg.handle, "endpoint")
        rights = cap.rights if msg.rights is None else check_rights(msg.rights)
        asked = Limits.from_request(msg.limits)
        limits = cap.limits.tightened(asked.rate, asked.bandwidth, asked.max_message_size,
                                      asked.expires_at)
        child = cap.derive(rights, limits)
        child.owner = rec
        try:
            rec.caps.insert(child)
        except IpcError:
            child.detach()
            raise
        self._audit_event(_audit.RESTRICT, rec, child, cap.target.name,
                          f"from {cap.handle:#x}: rights {sorted(rights)} limits {limits.wire()}")
        return _granted(child)

    def _on_revoke(self, rec: ProcessRecord, msg: frames.Revoke, rid: int) -> frames.Message:
        cap = rec.caps.get(msg.handle)
        self._revoke(cap, rec)
        return frames.Ok()

    def _revoke(self, cap: Capability, by: ProcessRecord | None) -> None:
        """The capability and its whole subtree leave every table; their channels stop at once.
        A restricted holder (under a lookup list) that someone else took one from may not look
        its service up again."""
        subtree = cap.subtree()
        for c in subtree:
            c.revoked = True
            owner: ProcessRecord | None = c.owner
            if owner is None:
                _drop_pending(c)  # not claimed yet
            else:
                if c.kind == "endpoint" and owner is not by:
                    self._remember_revoked(owner, (c.target.kind, c.target.name))
                try:
                    if owner.caps.get(c.handle) is c:
                        owner.caps.remove(c.handle)
                        if c.kind == "region":
                            c.target.release()
                except IpcError:
                    pass
                if owner.endpoints.get(id(c.target)) is c:
                    del owner.endpoints[id(c.target)]
                if c.kind == "endpoint" and c.watched:
                    c.target.owner.watched_by.discard((owner, c.handle))
            for ch in list(c.extra.get("lanes", ())):
                self._close_channel(ch, _core.STATE_REVOKED)
        cap.detach()
        self._audit_event(_audit.REVOKE, by, cap, getattr(cap.target, "name", ""),
                          f"{len(subtree)} capabilities")

    def _on_delegate(self, rec: ProcessRecord, msg: frames.Delegate, rid: int) -> frames.Message:
        """One capability or region at a time (Attach does a whole message at once)."""
        cap = rec.caps.get(msg.handle)
        if msg.move and cap.kind != "region":
            raise ValueError("only regions can be moved; other capabilities are delegated")
        caps, regions = ([], [msg.handle]) if cap.kind == "region" else ([msg.handle], [])
        return self._attach(rec, msg.via, msg.index, msg.tag, caps, regions, msg.move)

    def _on_attach(self, rec: ProcessRecord, msg: frames.Attach, rid: int) -> frames.Message:
        return self._attach(rec, msg.via, msg.index, msg.tag, msg.caps, msg.regions, msg.move)

    def _attach(self, rec: ProcessRecord, via_handle: int, index: int, tag: int,
                cap_handles: list[int], region_handles: list[int], move: bool) -> frames.Message:
        """Attach children of these capabilities to (channel, tag): every check first, so a
        refusal leaves nothing attached; the sender hears why before its message goes. move:
        the regions are moved (the capabilities are always delegated)."""
        via = rec.caps.get(via_handle, "endpoint")
        svc: ServiceRecord = via.target
        if not svc.alive:
            raise PeerDied(f"the process serving {svc.name!r} has exited")
        ch = svc.channels.get(index)
        if ch is None or ch.client is not rec:
            raise InvalidCapability(f"channel {index} is not one of this process's lanes")
        if len(set(region_handles)) != len(region_handles):
            raise ValueError("a region is attached twice to one message")
        caps = [rec.caps.get(h, "endpoint") for h in cap_handles]
        regions = [rec.caps.get(h, "region") for h in region_handles]
        for cap in caps + ([] if move else regions):
            if "share" not in cap.rights:
                self._audit_event(_audit.DENIED, rec, cap, getattr(cap.target, "name", ""),
                                  "no share right")
                raise PermissionDenied(
                    f"handle {cap.handle:#x} lacks the share right: it cannot be passed on")
        b, att = svc.bounds, ch.transfers.get(tag)
        ncaps = len(caps) + (att.caps if att else 0)
        nregions = len(regions) + (att.regions if att else 0)
        nbytes = sum(r.target.size for r in regions) + (att.region_bytes if att else 0)
        if ncaps > b.max_caps:
            raise MessageTooLarge(
                f"a message to {svc.name!r} may carry at most {b.max_caps} capabilities (its "
                f"max_caps); this one would carry {ncaps}: send them over several messages")
        if nregions > b.max_regions:
            raise MessageTooLarge(
                f"a message to {svc.name!r} may carry at most {b.max_regions} regions (its "
                f"max_regions); this one would carry {nregions}: send them over several messages")
        if nbytes > b.max_region_bytes:
            raise MessageTooLarge(
                f"a message to {svc.name!r} may carry at most {b.max_region_bytes} bytes of "
                f"regions (its max_region_bytes); this one would carry {nbytes}")
        n, client = len(caps) + len(regions), _client_key(rec)
        if svc.pending + n > MAX_TRANSFERS:
            raise OutOfMemory(f"{MAX_TRANSFERS} attachments already wait for {svc.name!r} to "
                              "claim them: try again once it has received its messages")
        if svc.pending_by.get(client, 0) + n > MAX_PENDING_PER_CLIENT:
            raise OutOfMemory(f"this process already has {MAX_PENDING_PER_CLIENT} attachments "
                              f"waiting for {svc.name!r} to claim them: send the messages they "
                              "belong to, or wait for them to expire")
        if att is None:
            att = ch.transfers[tag] = _Attached([], client)
            att.timer = self._after(b.attach_ttl, lambda: self._expire_attached(ch, tag, att))
        for cap in caps + regions:
            child = cap.derive()
            if cap.kind == "region":
                cap.target.refs += 1  # the pending attachment keeps the region alive
            att.children.append(child)
        svc.pending += n
        svc.pending_by[client] = svc.pending_by.get(client, 0) + n
        for cap in regions if move else ():  # the sender gives its own capability up
            self._drop_cap(rec, rec.caps.remove(cap.handle))
        for cap in caps + regions:
            self._audit_event(_audit.DELEGATE, rec, cap, getattr(cap.target, "name", ""),
                              f"to process {svc.owner.process_id} via {svc.name!r}")
        return frames.Ok()

    def _on_detach(self, rec: ProcessRecord, msg: frames.Detach, rid: int) -> frames.Message:
        svc: ServiceRecord = rec.caps.get(msg.via, "endpoint").target
        ch = svc.channels.get(msg.index)
        if ch is None or ch.client is not rec:
            raise InvalidCapability(f"channel {msg.index} is not one of this process's lanes")
        self._discard_attached(ch, msg.tag)
        return frames.Ok()

    def _take_attached(self, ch: Channel, tag: int) -> _Attached | None:
        """Unhook (channel, tag)'s attachments from the channel, its timer and the counts."""
        att = ch.transfers.pop(tag, None)
        if att is None:
            return None
        if att.timer is not None:
            self._cancel(att.timer)
            att.timer = None
        svc = ch.service
        svc.pending -= len(att.children)
        _count_down(svc.pending_by, att.client, len(att.children))
        if not ch.transfers:
            svc.draining.pop(ch.generation, None)
        return att

    def _discard_attached(self, ch: Channel, tag: int) -> None:
        att = self._take_attached(ch, tag)
        for child in att.children if att else ():
            _drop_pending(child)

    def _expire_attached(self, ch: Channel, tag: int, att: _Attached) -> None:
        if ch.transfers.get(tag) is att:
            att.timer = None  # fired: nothing to cancel
            self._discard_attached(ch, tag)

    def _on_claim(self, rec: ProcessRecord, msg: frames.Claim, rid: int) -> frames.Message:
        svc: ServiceRecord = rec.caps.get(msg.handle, "service").target
        ch = svc.channels.get(msg.index)
        if ch is None or ch.generation != msg.generation:
            ch = svc.draining.get(msg.generation)
            if ch is None or ch.index != msg.index:  # that channel instance is gone
                return frames.Rows([], 0)
        att = self._take_attached(ch, msg.tag)
        if att is None:
            return frames.Rows([], 0)
        rows: list[dict[str, Any]] = []
        # At most the service's per-message bounds (checked at attach), and never more than one
        # frame holds (a service name may encode to 1.5 KB of JSON). Whatever cannot be taken
        # (revoked, expired, a full table, no room in the answer) is released here.
        room = frames.MAX_FRAME - 1024
        for child in att.children:
            row = _claim_row(child)
            size = len(json.dumps(row, ensure_ascii=False).encode()) + 1
            if child.revoked or child.limits.expired() or size > room:
                _drop_pending(child)
                continue
            try:
                rec.caps.insert(child)
            except IpcError:
                _drop_pending(child)
                continue
            child.owner = rec
            room -= size
            row["handle"] = child.handle
            rows.append(row)
            self._audit_event("accept", rec, child, getattr(child.target, "name", ""),
                              f"derived from {child.parent.handle:#x}" if child.parent else "")
        return frames.Rows(rows, len(att.children))

    # ---- regions ------------------------------------------------------------------------------

    def _on_create_region(self, rec: ProcessRecord, msg: frames.CreateRegion, rid: int) -> None:
        usage, limit = rec.usage, self.limits.region_bytes_per_uid
        if usage is not None and usage.region_bytes + msg.size > limit:
            raise OutOfMemory(
                f"uid {rec.uid} already has {usage.region_bytes} bytes of regions alive (its "
                f"region_bytes_per_uid limit is {limit}); a region of {msg.size} bytes more does "
                "not fit: release regions (every holder must let go) or ask for less")
        region = Region.create(msg.size)
        if usage is not None:
            usage.region_bytes += region.size
            region.on_free = lambda: self._free_region_bytes(usage, region.size)
        cap = Capability("region", region, REGION_RIGHTS, owner=rec)
        region.refs = 1
        try:
            rec.caps.insert(cap)
        except IpcError:
            region.release()
            raise
        try:
            self._send_region(rec, rid, cap)
        except BaseException:  # the asker never learns the handle: take the region back
            rec.caps.remove(cap.handle)
            region.release()
            raise

    def _on_map_region(self, rec: ProcessRecord, msg: frames.MapRegion, rid: int) -> None:
        cap = rec.caps.get(msg.handle, "region")
        if "map" not in cap.rights:
            raise PermissionDenied(f"handle {cap.handle:#x} lacks the map right")
        self._send_region(rec, rid, cap)

    def _send_region(self, rec: ProcessRecord, rid: int, cap: Capability) -> None:
        fd = cap.target.fd_for(cap.rights)
        try:
            self._respond(rec, rid, frames.RegionGranted(cap.handle, cap.target.size,
                                                         sorted(cap.rights)), (fd,))
        finally:
            os.close(fd)

    def _on_seal_region(self, rec: ProcessRecord, msg: frames.SealRegion, rid: int) -> frames.Message:
        cap = rec.caps.get(msg.handle, "region")
        if "write" not in cap.rights:
            raise PermissionDenied(f"handle {cap.handle:#x} lacks the write right: it cannot seal")
        cap.target.seal()
        return frames.Ok()

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

    def _on_access(self, rec: ProcessRecord, msg: frames.Access, rid: int) -> frames.Message:
        svc: ServiceRecord = rec.caps.get(msg.handle, "service").target
        denied = svc.access.change(msg.allow or (), msg.deny or (), self.limits.access_entries)
        self._audit_event(_audit.RESTRICT, rec, None, svc.name,
                          f"allow {_few(msg.allow)} deny {_few(msg.deny)}")
        # Applies to live channels at once: a sender that is no longer accepted loses them. Only
        # a deny entry can take a channel away, and the index names the channels each one can:
        # O(entries changed + channels affected), never a scan of every channel per entry.
        affected: set[Channel] = set()
        for e in denied:
            kind, _, value = e.partition(":")
            if e.isdigit():
                affected |= svc.chans_of_id.get(int(e), set())
            elif kind == "uid":
                affected |= svc.chans_of_uid.get(int(value), set())
            elif kind == "package":
                affected |= svc.chans_of_package.get(value, set())
            elif kind == "name":
                serving = self._serving(value)
                if serving is not None:
                    affected |= svc.chans_of_id.get(serving, set())
        for ch in affected:
            client = ch.client
            if not svc.access.permits(client.process_id, client.uid, client.package,
                                      names=client.names_served(),
                                      allow_names=self._verified_names(client)):
                self._close_channel(ch, _core.STATE_REVOKED)
        return frames.Ok()

    def _on_close_channel(self, rec: ProcessRecord, msg: frames.CloseChannel,
                          rid: int) -> frames.Message:
        cap = rec.caps.get(msg.handle, "endpoint")
        ch = cap.target.channels.get(msg.index)
        if ch is None or ch.client is not rec or ch.cap is not cap:
            raise InvalidCapability(f"channel {msg.index} is not one of this endpoint's")
        self._close_channel(ch, _core.STATE_CLOSED)
        return frames.Ok()

    def _on_report_bad(self, rec: ProcessRecord, msg: frames.ReportBad, rid: int) -> frames.Message:
        cap = rec.caps.get(msg.handle, "service")
        ch = cap.target.channels.get(msg.index)
        reason = _brief(msg.reason)
        if ch is not None:
            self._audit_event(_audit.BAD_MESSAGE, rec, None, cap.target.name,
                              f"from process {ch.client.process_id}: {reason}")
            log.warning("service %r (process %d) reports garbage from process %d on channel %d: "
                        "%s; channel closed", cap.target.name, rec.process_id,
                        ch.client.process_id, msg.index, reason)
            self._close_channel(ch, _core.STATE_CLOSED, tell_server=False)
        return frames.Ok()

    def _on_query(self, rec: ProcessRecord, msg: frames.Query, rid: int) -> frames.Message:
        if rec.uid not in (self._uid, 0):
            raise PermissionDenied("only the kernel's own user (or root) may list its tables")
        if rec.restricted or rec.sandboxed:  # the tables name every service: not for one
            raise PermissionDenied("a sandboxed process, or one under a lookup list, may not "
                                   "list the kernel's tables")
        if msg.what not in ("processes", "services", "caps", "channels"):
            raise ValueError(f"unknown query {msg.what!r}: processes, services, caps or channels")
        rows = self._rows(msg.what, msg.process_id)
        return frames.Rows(_page(rows, msg.offset, msg.limit), len(rows))

    # ---- introspection ------------------------------------------------------------------------

    def _rows(self, what: str, process_id: int = 0) -> list[dict[str, Any]]:
        if what == "channels":
            # The counters both ends keep in the channel's header page, read through the
            # kernel's own mapping: watching costs the watched processes nothing.
            return [
                {"service": svc.name, "server": svc.owner.process_id,
                 "client": ch.client.process_id, "index": ch.index,
                 **_core.channel_stats(ch.shm.header)}
                for registry in (self._names, self._packages)
                for _, svc in registry.items()
                for ch in list(svc.channels.values())
            ]
        if what == "caps":
            target = self._procs.get(process_id)
            if target is None:
                raise ProcessNotFound(f"no live process {process_id}")
            return [_cap_row(c) for c in target.caps]
        if what == "processes":
            return [
                {
                    "id": r.process_id, "pid": r.pid, "uid": r.uid, "package": r.package,
                    "name": r.name, "services": [s.name for s in r.services],
                    "since": r.since, "wait": r.wait_mode, "sandboxed": r.sandboxed,
                }
                for r in self._procs.values()
                if r.proto.state is State.READY
            ]
        return [
            {
                "name": svc.name, "kind": svc.kind, "id": svc.owner.process_id,
                "clients": len(svc.channels), "attachments": svc.pending,
                **svc.access.describe(),
                "pid": svc.owner.pid, "uid": svc.owner.uid, "package": svc.owner.package,
                "since": svc.owner.since,
            }
            for registry in (self._names, self._packages)
            for _, svc in registry.items()
        ]

    def _stats(self, process_id: int) -> dict[str, Any]:
        rec = self._procs.get(process_id)
        if rec is None:
            raise InvalidCapability(f"no live process {process_id}")
        return {
            "outbox": len(rec.transport.outbox),
            "in_flight": len(rec.proto.in_flight),
            "parked": len(rec.parked),
            "parked_by_pid": self._parked_by_pid.get(_client_key(rec), 0),
            "parked_by_uid": self._parked_by_uid.get(rec.uid, 0),
            "caps": len(rec.caps),
            "lanes": len(rec.lanes),
            "services": len(rec.services),
            "attachments": sum(svc.pending for svc in rec.services),
            "watchers": len(rec.watched_by),
            "notice_pending": rec.notice_pending,
            "notices_sent": rec.notices_sent,
        }


def _request_failed(exc: Exception) -> IpcError:
    """The error a request that failed unexpectedly answers with (what and what to do)."""
    if isinstance(exc, OSError):
        if exc.errno in _RESOURCE_ERRNOS or exc.errno == errno.ENOSPC:
            return OutOfMemory(f"the kernel is out of resources ({exc.strerror}): try again later, "
                               "or release capabilities, regions and channels this process holds")
        return IpcError(f"the kernel could not do this: {exc.strerror or exc}")
    return IpcError(f"the kernel failed on this request ({type(exc).__name__}: "
                    f"{str(exc)[:_LOG_CHARS]}); it is logged, please report it")


def _encoded_size(row: dict[str, Any]) -> int:
    return len(json.dumps(row, separators=(",", ":"), ensure_ascii=False).encode()) + 1


def _fit_row(row: dict[str, Any], room: int = _ROW_ROOM) -> dict[str, Any]:
    """The row, or a copy whose list fields are cut short to fit `room` bytes, each ending with
    a "... N more" entry (a service's allowlist can be thousands of names long)."""
    if _encoded_size(row) <= room:
        return row
    row = dict(row)
    lists = [k for k, v in row.items() if isinstance(v, list)]
    share = room // (2 * max(1, len(lists)))
    for key in lists:
        items, kept, used = row[key], [], 0
        for item in items:
            size = len(json.dumps(item, ensure_ascii=False).encode()) + 1
            if used + size > share:
                break
            kept.append(item)
            used += size
        if len(kept) < len(items):
            kept.append(f"... {len(items) - len(kept)} more")
        row[key] = kept
    return row


def _page(rows: list[dict[str, Any]], offset: int, limit: int) -> list[dict[str, Any]]:
    """rows[offset:offset + limit], stopped early where the next row would not fit the frame:
    the asker follows the pages by offset until it has `total` rows (at least one per page)."""
    page: list[dict[str, Any]] = []
    room = _PAGE_ROOM
    for row in rows[offset : offset + min(limit, frames.MAX_LIST)]:
        row = _fit_row(row)
        size = _encoded_size(row)
        if page and size > room:
            break
        page.append(row)
        room -= size
    return page


def _client_key(rec: ProcessRecord) -> int:
    """Whom a client's channels and attachments count against: its OS process (several
    connections from one process are one client), or its connection when the pid is unknown."""
    return rec.pid if rec.pid > 0 else -rec.process_id


def _few(entries: list[str] | None, n: int = 20) -> str:
    """A list for an audit row: its first n entries and how many more (never all of them)."""
    entries = entries or []
    more = f" and {len(entries) - n} more" if len(entries) > n else ""
    return f"{entries[:n]}{more}"


def _sender_keys(svc: ServiceRecord, rec: ProcessRecord) -> list[tuple[dict, Any]]:
    """The (index, key) pairs of svc's by-sender channel indexes that rec's channels are in."""
    keys: list[tuple[dict, Any]] = [(svc.chans_of_id, rec.process_id), (svc.chans_of_uid, rec.uid)]
    if rec.package is not None:
        keys.append((svc.chans_of_package, rec.package))
    return keys


def _count_down(counts: dict[int, int], key: int, n: int = 1) -> None:
    left = counts.get(key, 0) - n
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def _drop_pending(child: Capability) -> None:
    """A delegated capability nobody will claim: unhook it (and the region it kept alive)."""
    child.detach()
    if child.kind == "region" and child.owner is None and not child.extra.get("dropped"):
        child.extra["dropped"] = True
        child.target.release()


def _claim_row(child: Capability) -> dict[str, Any]:
    """A claimed capability as the claim's answer lists it (its handle filled in on insert; the
    largest handle stands in for it until then, so the row's size is known)."""
    if child.kind == "region":
        return {"kind": "region", "handle": frames.U64_MAX, "size": child.target.size,
                "rights": sorted(child.rights)}
    svc: ServiceRecord = child.target
    return {"kind": "endpoint", "handle": frames.U64_MAX, "process_id": svc.owner.process_id,
            "name": svc.name, "rights": sorted(child.rights), "limits": child.limits.wire()}


def _pending_grant(key: str) -> dict[str, Any]:
    return {"key": key, "handle": 0, "process_id": 0, "name": "", "rights": [], "limits": {}}


def _grant_row(key: str, g: frames.Granted) -> dict[str, Any]:
    return {"key": key, "handle": g.handle, "process_id": g.process_id, "name": g.name,
            "rights": list(g.rights or ()), "limits": dict(g.limits or {})}


def _granted(cap: Capability) -> frames.Granted:
    svc: ServiceRecord = cap.target
    return frames.Granted(cap.handle, svc.owner.process_id, svc.name, sorted(cap.rights),
                          cap.limits.wire())


def _cap_row(cap: Capability) -> dict[str, Any]:
    target = cap.target
    parent = cap.parent
    return {
        "handle": f"{cap.handle:#x}", "kind": cap.kind,
        "target": getattr(target, "name", "") if target is not None else "",
        "serving_process": target.owner.process_id if isinstance(target, ServiceRecord) else None,
        "rights": sorted(cap.rights), "limits": cap.limits.wire(),
        "derives_from": (f"{parent.handle:#x} of process {parent.owner.process_id}"
                         if parent is not None and parent.owner is not None else None),
        "children": len(cap.children), "dead": isinstance(target, ServiceRecord) and not target.alive,
        "grant": cap.extra.get("grant"),  # the startup grant's key, if it is one
    }


def _bind(path: str, shared: bool) -> tuple[int, int, socket.socket]:
    """Check the directory, lock, then bind the socket: a live kernel on the path refuses; a stale
    file is replaced. Returns (the directory's O_PATH fd, the lock's fd, the listening socket).

    The directory is created (mode 0700, or 0711 when shared) only when it does not exist; an
    existing one is used as it is, never chmod-ed (CAPBUS_SOCKET=/srv/k.sock must not touch /srv),
    once it passed _paths.open_dir's checks. Everything in it is reached through that fd, never
    by name again (see _paths). The socket is born 0600, or 0666 when shared: a set of uids and
    groups cannot be written as mode bits, so the socket lets anyone who can reach it connect and
    the kernel admits or refuses each connection by its SO_PEERCRED (_not_admitted); 0711 lets others
    through the directory to the socket without listing (or writing) it."""
    directory = os.path.dirname(path) or "."
    name = os.path.basename(path)
    if shared and _paths.is_default_dir(directory):
        raise ValueError(f"a kernel open to other users needs a socket path of its own (--socket, "
                         f"say /run/capbus/kernel.sock), not this user's private {directory}")
    dirfd = _paths.open_dir(directory, frozenset({os.getuid(), 0}),
                            create=0o711 if shared else 0o700, who="the kernel's user")
    try:
        if shared and not os.fstat(dirfd).st_mode & 0o011:
            log.warning("%s lets only its owner through (mode %04o): the users this kernel allows "
                        "cannot reach its socket", directory,
                        stat.S_IMODE(os.fstat(dirfd).st_mode))
        lock_fd = _paths.open_private(dirfd, name + ".lock", path + ".lock")
        assert lock_fd is not None
    except BaseException:
        os.close(dirfd)
        raise
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(lock_fd)
        os.close(dirfd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise IpcError(
                f"another capbus kernel is already serving {path}: stop it, or give this one "
                "another socket path"
            ) from None
        raise
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dirfd)  # stale: its kernel is gone, since we hold the lock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        # Born with its final mode: no window where others may connect to a private kernel.
        old_umask = os.umask(0o111 if shared else 0o177)
        try:
            sock.bind(_paths.via_fd(dirfd, name))
        finally:
            os.umask(old_umask)
    except BaseException:
        os.close(lock_fd)
        os.close(dirfd)
        raise
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # inherited by accepted sockets
    sock.listen(1024)
    sock.setblocking(False)
    return dirfd, lock_fd, sock


_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13


def _peer_groups(sock: socket.socket, pid: int, uid: int) -> set[int]:
    """The supplementary groups of the process that connected `sock`: SO_PEERGROUPS (taken at
    connect()); where that fails (an old kernel, or more than 256 groups: Python reads at most
    1 KiB), /proc/<pid>/status Groups:, trusted only if that pid still runs as `uid` and has not
    exited by the time it was read (a pidfd opened first tells)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 1024)
        return set(array.array("I", raw[: len(raw) // 4 * 4]))
    except OSError:
        pass
    if pid <= 0:
        return set()
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return set()
    try:
        groups: set[int] = set()
        owner = -1
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    owner = int(line.split()[2])  # effective uid, as SO_PEERCRED has it
                elif line.startswith(b"Groups:"):
                    groups = {int(g) for g in line.split()[1:]}
        exited = bool(select.select([pidfd], [], [], 0)[0])
        return groups if owner == uid and not exited else set()
    except (OSError, ValueError):
        return set()
    finally:
        os.close(pidfd)
