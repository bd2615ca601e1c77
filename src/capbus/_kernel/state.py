"""The kernel's state: the records every domain shares, and how a domain answers.

One thread (the kernel's loop) owns all of it. The domain modules (naming, channels,
delegation, region_requests, introspect) are functions over a `KernelState` and an `Outbox`:
they read and change the tables here and answer through the Outbox, which the Kernel
implements (sending on a process's connection, the audit log, timers). They never import
kernel.py; kernel.py imports them.

Helpers that several domains use live here: the access check, the per-uid usage (quotas),
the client key, and the small bookkeeping functions on records.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .._errors import IpcError, OutOfMemory, PermissionDenied
from .._protocol import frames
from .._protocol.connection import KernelConnection
from .allowlist import AccessList
from .captable import Capability, CapTable, next_uid
from .grants import GrantSpec
from .launcher import Child
from .policy import KernelLimits, Policy, ProcessInfo
from .regions import MAX_REGION
from .registry import Registry
from .shm import MAX_CHANNELS, ChannelShm
from .transport import Transport

MAX_ATTACH = 64  # the most caps (and regions) a service may let one message carry
LOG_CHARS = 200  # of anything a peer chose (a reason, an error's text) in one log line


def brief(text: object) -> str:
    """Text from a process (or about it) as a log or audit line may quote it: bounded, valid
    UTF-8."""
    text = str(text).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= LOG_CHARS else text[:LOG_CHARS] + f"... ({len(text)} chars)"


@dataclass(eq=False, order=False)
class Timer:
    """fn, due on the loop at `deadline` (time.monotonic); seq keeps the order of equal ones."""

    deadline: float
    seq: int
    fn: Callable[[], None] | None  # None: cancelled

    def __lt__(self, other: Timer) -> bool:
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
            ("max_channels_per_process", out.max_channels_per_process, 1, MAX_CHANNELS - 1),
            ("max_channels_per_uid", out.max_channels_per_uid, out.max_channels_per_process,
             MAX_CHANNELS - 1),
            ("attach_ttl_ms", int(out.attach_ttl * 1000), 1, 3_600_000),
        ):
            if not lo <= value <= hi:
                raise ValueError(f"{name} must be in {lo}..{hi}, got {value}")
        return out


@dataclass(eq=False)
class Attached:
    """What was attached to one message (a channel's tag), waiting for its claim."""

    children: list[Capability]
    client: int  # the attaching client's key (see client_key)
    timer: Timer | None = None

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
        if self.next_index >= MAX_CHANNELS:
            raise OutOfMemory(f"service {self.name!r} has {MAX_CHANNELS} channels open")
        self.next_index += 1
        return self.next_index - 1


@dataclass(eq=False)
class Channel:
    """One channel between a client (its lane) and a service: the kernel's bookkeeping and mappings."""

    index: int
    service: ServiceRecord
    client: ProcessRecord
    cap: Capability
    shm: ChannelShm
    generation: int = 0  # unique per kernel: names this instance of the index
    # message tag -> what was attached to it; discarded with the channel, so a later channel at
    # the same index never sees a former client's attachments
    transfers: dict[int, Attached] = field(default_factory=dict)


@dataclass(eq=False)
class GrantState:
    """One startup grant of one process: its endpoint once resolved (None until the service is
    there, or after the process released it); revoked by its spawner for good."""

    spec: GrantSpec
    uid: int = field(default_factory=next_uid)  # its budget, kept across re-resolutions
    cap: Capability | None = None
    revoked: bool = False


@dataclass(eq=False)
class UidUsage:
    """What all processes of one uid hold, charged to that uid (per-user accounting, as
    dbus-broker keeps it: each object is charged to the user who caused it, so one user's many
    processes cannot add up to more than the user's quota, and another user is untouched).

    caps: capabilities in their tables; channels: channels they hold open as clients;
    subscriptions: topic subscriptions they hold (a ring each);
    region_bytes: bytes of live regions they created (charged to the creator until the last
    holder, of whatever uid, lets go); holders: their counted connections. Dropped from the
    kernel's table once all of these are zero."""

    uid: int
    caps: int = 0
    channels: int = 0
    region_bytes: int = 0
    holders: int = 0
    subscriptions: int = 0

    def idle(self) -> bool:
        return not (self.caps or self.channels or self.region_bytes or self.holders
                    or self.subscriptions)


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
    channels: set[Channel] = field(default_factory=set)  # channels it opened as a client (its lanes)
    watched_by: set[tuple[ProcessRecord, int]] = field(default_factory=set)
    endpoints: dict[int, Capability] = field(default_factory=dict)  # id(ServiceRecord) -> its cap
    budgets: dict[int, int] = field(default_factory=dict)  # id(ServiceRecord) -> its endpoints' uid
    # request id -> (waiting key, its expiry timer)
    parked: dict[int, tuple[tuple[str, str], Timer]] = field(default_factory=dict)
    subscription: int = 0  # handle of its registration subscription, 0 if none
    notice_pending: bool = False
    notices_sent: int = 0
    wait_mode: str = ""
    alive: bool = True
    refused: str = ""  # not admitted, or over a connection bound: its Hello gets this error
    refused_as: type[IpcError] = OutOfMemory
    counted: bool = False  # in the kernel's per-pid / per-uid connection counts
    grants: dict[str, GrantState] = field(default_factory=dict)  # set at Hello
    grant_waits: dict[int, str] = field(default_factory=dict)  # parked Grant request -> key
    # (which list, its patterns): a lookup must pass every one; none at all: unrestricted
    lookup_lists: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    revoked_services: set[tuple[str, str]] = field(default_factory=set)  # (kind, name)
    usage: UidUsage | None = None  # its uid's, while counted
    sandboxed: bool = False  # launched inside a capbus.Sandbox (Landlock + seccomp)
    topics: list[Any] = field(default_factory=list)  # topics.TopicRecord it publishes
    topic_subs: set[Any] = field(default_factory=set)  # topics.SubRecord it holds

    @property
    def restricted(self) -> bool:
        return bool(self.lookup_lists)

    def __repr__(self) -> str:  # never the whole record (tables, outbox) in a log line
        return f"<process {self.process_id} pid {self.pid} uid {self.uid}>"

    def names_served(self) -> list[str]:
        return [s.name for s in self.services if s.kind == "name" and s.alive]

    def info(self) -> ProcessInfo:
        return ProcessInfo(self.process_id, self.pid, self.uid, self.gid, self.package, self.name)


class Outbox(Protocol):
    """How a domain answers and schedules: the Kernel implements it over its connections, its
    audit log and its timer heap. A handler that returns a frame is answered by the loop; one
    that answers itself (with fds, or later: a parked lookup) calls respond and returns None."""

    def respond(self, rec: ProcessRecord, request_id: int, msg: frames.Frame,
                fds: tuple[int, ...] = ()) -> None:
        """Answer rec's request; raises IpcError (the request is still open) if its fds cannot
        be passed now, so the handler can undo what it did."""

    def event(self, rec: ProcessRecord, msg: frames.Frame, fds: tuple[int, ...] = ()) -> bool:
        """Send an event; False if it could not go, so the caller can undo what it announces."""

    def audit(self, event: str, rec: ProcessRecord | None, cap: Capability | None = None,
              target: str = "", detail: str = "") -> None:
        """One audit row (rate-limited per process and uid)."""

    def after(self, delay: float, fn: Callable[[], None]) -> Timer:
        """Run fn on the loop in `delay` seconds."""

    def cancel(self, timer: Timer) -> None:
        """Drop a timer (and what its closure holds)."""


# A request handler: (st, out, rec, msg, request_id) -> the answer, or None if it answered
# itself (out.respond, with fds) or will answer later (a parked lookup). Each domain module
# lists its handlers in HANDLERS (frame type -> handler); the Kernel dispatches on them.
Handler = Callable[["KernelState", Outbox, "ProcessRecord", Any, int], "frames.Frame | None"]


class KernelState:
    """The tables of one kernel: processes, the two registries, parked lookups, subscribers,
    per-uid usage and connection counts. Only the loop's thread touches them."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.limits: KernelLimits = policy.limits
        self.uid = os.getuid()  # the kernel's own user
        self.shut = False  # the kernel stopped: channels stay OPEN, no more events go out
        self.procs: dict[int, ProcessRecord] = {}
        self.channel_gens = itertools.count(1)  # channel instances: never 0, never reused
        self.names: Registry[ServiceRecord] = Registry("service name")
        self.packages: Registry[ServiceRecord] = Registry("package")
        self.subscribers: set[ProcessRecord] = set()
        self.topics: Registry[Any] = Registry("topic")  # name -> topics.TopicRecord
        # (kind, key) -> the parked lookups waiting for it, oldest first (a dict: O(1) removal)
        self.waiters: dict[tuple[str, str], dict[tuple[ProcessRecord, int], None]] = {}
        # Parked lookups per client (see client_key) and per uid: KernelLimits.parked_lookups*
        self.parked_by_pid: dict[int, int] = {}
        self.parked_by_uid: dict[int, int] = {}
        self.conns_by_pid: dict[int, int] = {}
        self.conns_by_uid: dict[int, int] = {}
        self.usage: dict[int, UidUsage] = {}  # uid -> what its processes hold (quotas)
        # OS pid -> the record of a launched process under a lookup list: a connection from it or
        # from a process it started is under the same lists (see naming.set_authority)
        self.restricted_pids: dict[int, ProcessRecord] = {}

    def verified_names(self, rec: ProcessRecord) -> list[str]:
        """The names rec serves that the policy reserves: only those meet an allowlist's
        "name:N" (a name anyone may register says nothing about who registered it first)."""
        return [n for n in rec.names_served() if self.policy.reserves(n)]

    def check_access(self, rec: ProcessRecord, svc: ServiceRecord) -> None:
        if not svc.access.permits(rec.process_id, rec.uid, rec.package,
                                  names=rec.names_served(),
                                  allow_names=self.verified_names(rec)):
            raise PermissionDenied(
                f"service {svc.name!r} does not accept process {rec.process_id} "
                "(not on its allowlist, or denied)"
            )

    def serving(self, name: str) -> int | None:
        svc = self.names.get(name)
        return svc.owner.process_id if svc is not None else None

    def usage_of(self, uid: int) -> UidUsage:
        usage = self.usage.get(uid)
        if usage is None:
            usage = self.usage[uid] = UidUsage(uid)
        return usage

    def drop_usage(self, usage: UidUsage) -> None:
        if usage.idle() and self.usage.get(usage.uid) is usage:
            del self.usage[usage.uid]

    def charge_caps(self, usage: UidUsage, n: int) -> None:
        if n > 0 and usage.caps + n > self.limits.caps_per_uid:
            raise OutOfMemory(
                f"uid {usage.uid} already holds {usage.caps} capabilities in all its processes "
                f"(its caps_per_uid limit is {self.limits.caps_per_uid}): release some")
        usage.caps += n
        if n < 0:
            self.drop_usage(usage)

    def free_region_bytes(self, usage: UidUsage, size: int) -> None:
        usage.region_bytes -= size
        self.drop_usage(usage)


def client_key(rec: ProcessRecord) -> int:
    """Whom a client's channels and attachments count against: its OS process (several
    connections from one process are one client), or its connection when the pid is unknown."""
    return rec.pid if rec.pid > 0 else -rec.process_id


def count_down(counts: dict[int, int], key: int, n: int = 1) -> None:
    left = counts.get(key, 0) - n
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def sender_keys(svc: ServiceRecord, rec: ProcessRecord) -> list[tuple[dict[Any, Any], Any]]:
    """The (index, key) pairs of svc's by-sender channel indexes that rec's channels are in."""
    keys: list[tuple[dict[Any, Any], Any]] = [(svc.chans_of_id, rec.process_id), (svc.chans_of_uid, rec.uid)]
    if rec.package is not None:
        keys.append((svc.chans_of_package, rec.package))
    return keys


def drop_pending(child: Capability) -> None:
    """A delegated capability nobody will claim: unhook it (and the region it kept alive)."""
    child.detach()
    if child.kind == "region" and child.owner is None and not child.extra.get("dropped"):
        child.extra["dropped"] = True
        child.target.release()


def granted(cap: Capability) -> frames.Granted:
    svc: ServiceRecord = cap.target
    return frames.Granted(cap.handle, svc.owner.process_id, svc.name, sorted(cap.rights),
                          cap.limits.wire())


def encoded_size(row: dict[str, Any]) -> int:
    return len(json.dumps(row, separators=(",", ":"), ensure_ascii=False).encode()) + 1
