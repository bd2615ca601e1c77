"""Naming: registering services, looking them up (and parking a lookup until its name appears),
startup grants and lookup lists, registration notices, and a service's access list.

A lookup that succeeds hands the asker an endpoint capability (one per holder and service). A
restricted process (launched under a lookup list) may look up only what its lists allow, and
never again a service it lost a capability to by revocation.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from .._errors import InvalidCapability, IpcError, OutOfMemory, PermissionDenied, ServiceNotFound
from .._protocol import frames
from .._protocol.names import check_name
from . import audit as _audit
from . import channels
from .allowlist import AccessList
from .captable import Capability, CapLimits, next_uid
from .grants import combine_grants, lookup_allows
from .shm import STATE_REVOKED, make_doorbell, make_eventfd, make_sleep_eventfd
from .state import (
    Channel,
    GrantState,
    Handler,
    KernelState,
    Outbox,
    ProcessRecord,
    ServiceBounds,
    ServiceRecord,
    client_key,
    count_down,
    encoded_size,
    granted,
)

ENDPOINT_RIGHTS = frozenset({"send", "share"})
# Services a restricted process (one under a lookup list) lost a capability to by revocation,
# remembered so that it cannot look them up again; past this many it may look nothing up.
MAX_REVOKED_SERVICES = 4096
# The kernel's own user: besides root, the one user a gateway (NAME@HOST names) may run as
# unless the policy's [gateways] admits more.
_KERNEL_UID = os.geteuid()
# What Welcome's grant rows may take of one frame: the rest holds the header and a package
# name (255 bytes of UTF-8, at most 1530 bytes as escaped JSON)
_WELCOME_ROOM = frames.MAX_FRAME - 4096


def set_authority(st: KernelState, rec: ProcessRecord) -> None:
    """What rec starts with and may look up, set as it appears (before it can say a word):
    its package's rules in the policy and, for a launched process, its spawn's (both
    checked, and bounded, where they entered)."""
    rules = st.policy.package_rules(rec.package)
    spec = rec.child.spec if rec.child is not None else None
    ancestor = _restricted_ancestor(st, rec.pid) if spec is None else None
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
    revoked = rec.child.revoked_grants if rec.child is not None else set()
    for key, g in grants.items():
        state = rec.grants[key] = GrantState(g)
        if key in revoked:
            state.revoked = True
            remember_revoked(st, rec, g.lookup_key)
    if spec is not None and rec.restricted and rec.pid > 0:
        st.restricted_pids[rec.pid] = rec


def _restricted_ancestor(st: KernelState, pid: int) -> ProcessRecord | None:
    """The restricted launched process that is `pid` or its parent, grandparent... (read
    from /proc; a process that left its parent's tree, reparented to init, is not found)."""
    for _ in range(32):
        if not st.restricted_pids or pid <= 1 or pid == os.getpid():
            return None
        rec = st.restricted_pids.get(pid)
        if rec is not None and rec.alive:
            return rec
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            pid = int(stat[stat.rindex(b")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            return None
    return None


def welcome_grants(st: KernelState, out: Outbox, rec: ProcessRecord) -> list[dict[str, Any]]:
    """One row per grant: resolved where its service is there (and admits rec), else
    pending (handle 0: the process asks with Grant). Rows that would not fit the frame
    (long service names) are sent pending too."""
    rows: list[dict[str, Any]] = []
    for key, state in rec.grants.items():
        if state.revoked:  # by the spawner, before this incarnation said hello
            continue
        row = _pending_grant(key)
        with contextlib.suppress(IpcError):
            row = _grant_row(key, _resolve_grant(st, out, rec, key))
        rows.append(row)
    size = sum(encoded_size(r) for r in rows)
    for i in sorted(range(len(rows)), key=lambda i: -len(rows[i]["name"])):
        if size <= _WELCOME_ROOM:
            break
        size -= encoded_size(rows[i])
        rows[i] = _pending_grant(rows[i]["key"])
        size += encoded_size(rows[i])
    return rows


def _resolve_grant(st: KernelState, out: Outbox, rec: ProcessRecord, key: str,
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
    registry = st.names if spec.kind == "name" else st.packages
    svc = svc or registry.get(spec.target)
    cap = state.cap
    if cap is not None and not cap.revoked and (svc is None or cap.target is svc):
        return granted(cap)
    if svc is None:
        raise ServiceNotFound(f"grant {key!r}: no live process serves the {registry.what} "
                              f"{spec.target!r} yet")
    st.policy.may_lookup(rec.info(), svc.name)
    st.check_access(rec, svc)
    if cap is not None and not cap.revoked:  # to a service that is gone: make room for it
        with contextlib.suppress(IpcError):
            if rec.caps.get(cap.handle) is cap:
                channels.drop_cap(st, out, rec, rec.caps.remove(cap.handle))
    cap = Capability("endpoint", svc, spec.rights,
                     spec.limits(CapLimits.from_request(svc.default_limits)), owner=rec,
                     uid=state.uid)
    cap.extra["grant"] = key
    rec.caps.insert(cap)
    state.cap = cap
    out.audit(_audit.GRANT, rec, cap, svc.name, f"startup grant {key}")
    return granted(cap)


def on_grant(st: KernelState, out: Outbox, rec: ProcessRecord, msg: frames.Grant,
             rid: int) -> frames.Frame | None:
    key = msg.key
    state = rec.grants.get(key)
    if state is None or state.revoked or msg.timeout_ms == 0:
        return _resolve_grant(st, out, rec, key)
    spec = state.spec
    if (st.names if spec.kind == "name" else st.packages).get(spec.target) is not None:
        return _resolve_grant(st, out, rec, key)
    # Not registered yet: parked like a lookup, answered when it registers (or times out)
    reply = _lookup(st, out, rec, spec.kind, spec.target, msg.timeout_ms, rid, check=False)
    if reply is None:  # parked (a refusal to park must leave nothing behind)
        rec.grant_waits[rid] = key
    return reply


def remember_revoked(st: KernelState, rec: ProcessRecord, service: tuple[str, str]) -> None:
    if rec.restricted and len(rec.revoked_services) < MAX_REVOKED_SERVICES:
        rec.revoked_services.add(service)
    elif rec.restricted:
        rec.revoked_services.add(("*", "*"))  # full: it may look nothing up any more


def _check_lookup(st: KernelState, rec: ProcessRecord, kind: str, key: str) -> None:
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


def _register(st: KernelState, out: Outbox, rec: ProcessRecord, key: str, kind: str, allow: list[str] | None,
              rid: int, limits: dict[str, int] | None = None,
              bounds: dict[str, int] | None = None, gateway: bool = False) -> None:
    if kind == "name":  # NAME@HOST: only a gateway the policy admits (a package never has one)
        st.policy.may_serve_remote(rec.info(), key, gateway, _KERNEL_UID)
    st.policy.may_register(rec.info(), key)
    registry = st.names if kind == "name" else st.packages
    # Checked here, not at each lookup: defaults a client could not be sent must be refused
    # to the service that asks for them, never relayed to everyone who looks it up.
    CapLimits.from_request(limits)
    svc = ServiceRecord(key, kind, rec,
                        access=AccessList.from_entries(allow, st.limits.access_entries),
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
    out.audit(_audit.REGISTER, rec, None, key, kind)
    try:
        out.respond(rec, rid, frames.Registered(svc.handle, key),
                    (svc.doorbell_fd, svc.bell_event_fd, svc.bell_sleep_fd))
    except IpcError:  # the service never learnt of it: as if never registered
        channels.drop_cap(st, out, rec, rec.caps.remove(svc.handle))
        raise
    _grant_waiters(st, out, (kind, key), svc)
    _notify_registration(st, out)
    return None


def on_register(st: KernelState, out: Outbox, rec: ProcessRecord, msg: frames.Register, rid: int) -> None:
    return _register(st, out, rec, check_name(msg.name), "name", msg.allow, rid, msg.limits,
                     msg.bounds, msg.gateway)


def on_register_package(st: KernelState, out: Outbox, rec: ProcessRecord, msg: frames.RegisterPackage,
                        rid: int) -> None:
    if rec.package is None:
        raise PermissionDenied(
            "this process has no verified package: launch it with kernel.spawn(package=...) "
            "or capbus run, or map its uid to a package in the kernel's policy"
        )
    return _register(st, out, rec, rec.package, "package", msg.allow, rid, msg.limits, msg.bounds)


def _lookup(st: KernelState, out: Outbox, rec: ProcessRecord, kind: str, key: str, timeout_ms: int,
            rid: int, check: bool = True) -> frames.Frame | None:
    """A lookup (or, check=False, a Grant request parked until its service registers)."""
    if check:
        _check_lookup(st, rec, kind, key)
    registry = st.names if kind == "name" else st.packages
    svc = registry.get(key)
    if svc is not None:
        return _grant(st, out, rec, svc)
    if timeout_ms == 0:
        raise ServiceNotFound(f"no live process serves the {registry.what} {key!r}")
    _may_park(st, rec, registry.what, key)

    def expire() -> None:
        rec.grant_waits.pop(rid, None)
        if not unpark(st, out, rec, rid, fired=True):
            return
        err = ServiceNotFound(f"no process registered the {registry.what} {key!r} "
                              f"within {timeout_ms} ms")
        out.respond(rec, rid, frames.Error(err.code, str(err)))

    rec.parked[rid] = ((kind, key), out.after(timeout_ms / 1000.0, expire))
    st.waiters.setdefault((kind, key), {})[(rec, rid)] = None
    client = client_key(rec)
    st.parked_by_pid[client] = st.parked_by_pid.get(client, 0) + 1
    st.parked_by_uid[rec.uid] = st.parked_by_uid.get(rec.uid, 0) + 1
    return None


def _may_park(st: KernelState, rec: ProcessRecord, what: str, key: str) -> None:
    """Refuse to park one more lookup of this process or uid past KernelLimits (the asker
    gets OutOfMemory naming the limit; nobody else's lookups are touched)."""
    lim = st.limits
    if st.parked_by_pid.get(client_key(rec), 0) >= lim.parked_lookups:
        who = f"pid {rec.pid}" if rec.pid > 0 else "this connection (its pid is unknown)"
        raise OutOfMemory(
            f"{who} already has {lim.parked_lookups} lookups waiting for a name "
            f"(its parked_lookups limit): cannot wait for the {what} {key!r:.80}; wait for "
            "fewer names at once, or look up without a timeout")
    if st.parked_by_uid.get(rec.uid, 0) >= lim.parked_lookups_per_uid:
        raise OutOfMemory(
            f"uid {rec.uid} already has {lim.parked_lookups_per_uid} lookups waiting for a "
            f"name (its parked_lookups_per_uid limit): cannot wait for the {what} "
            f"{key!r:.80}; wait for fewer names at once")


def unpark(st: KernelState, out: Outbox, rec: ProcessRecord, rid: int, fired: bool = False) -> bool:
    """Take a parked lookup off every table and counter (False if it was not parked). Every
    way out goes through here: granted, expired (fired: its timer is the one running),
    its connection gone."""
    parked = rec.parked.pop(rid, None)
    if parked is None:
        return False
    key, timer = parked
    if not fired:
        out.cancel(timer)
    waiters = st.waiters.get(key)
    if waiters is not None:
        waiters.pop((rec, rid), None)
        if not waiters:
            del st.waiters[key]
    count_down(st.parked_by_pid, client_key(rec))
    count_down(st.parked_by_uid, rec.uid)
    return True


def _grant_waiters(st: KernelState, out: Outbox, key: tuple[str, str], svc: ServiceRecord) -> None:
    for rec, rid in list(st.waiters.pop(key, {})):
        grant_key = rec.grant_waits.pop(rid, None)
        if not unpark(st, out, rec, rid) or not rec.alive:
            continue
        try:
            reply: frames.Frame
            if grant_key is not None:
                reply = _resolve_grant(st, out, rec, grant_key, svc)
            else:
                _check_lookup(st, rec, *key)  # it may have lost the service meanwhile
                reply = _grant(st, out, rec, svc)
        except IpcError as exc:
            reply = frames.Error(exc.code, str(exc))
        out.respond(rec, rid, reply)


def _grant(st: KernelState, out: Outbox, rec: ProcessRecord, svc: ServiceRecord) -> frames.Frame:
    st.policy.may_lookup(rec.info(), svc.name)
    st.check_access(rec, svc)
    # One endpoint capability per (holder, service): looking a service up again returns the
    # same handle, so repeated lookups cannot grow the holder's table.
    cap = rec.endpoints.get(id(svc))
    if cap is None or cap.target is not svc or cap.revoked:
        # Its budget (the receiver's token buckets, named by uid) is the holder's for this
        # service for good: releasing the endpoint and looking the service up again must not
        # buy a fresh burst.
        uid = rec.budgets.setdefault(id(svc), next_uid())
        cap = Capability("endpoint", svc, ENDPOINT_RIGHTS,
                         CapLimits.from_request(svc.default_limits), owner=rec, uid=uid)
        rec.caps.insert(cap)
        rec.endpoints[id(svc)] = cap
        out.audit(_audit.GRANT, rec, cap, svc.name)
    return granted(cap)


def on_lookup(st: KernelState, out: Outbox, rec: ProcessRecord, msg: frames.Lookup,
              rid: int) -> frames.Frame | None:
    return _lookup(st, out, rec, "name", check_name(msg.name), msg.timeout_ms, rid)


def on_lookup_package(st: KernelState, out: Outbox, rec: ProcessRecord, msg: frames.LookupPackage,
                      rid: int) -> frames.Frame | None:
    return _lookup(st, out, rec, "package", check_name(msg.package, "package name"),
                   msg.timeout_ms, rid)


def on_subscribe(st: KernelState, out: Outbox, rec: ProcessRecord, msg: frames.Subscribe,
                 rid: int) -> frames.Frame:
    if not rec.subscription:
        rec.subscription = rec.caps.insert(Capability("subscription", None, owner=rec))
        st.subscribers.add(rec)
    return frames.Subscribed(rec.subscription)


def _notify_registration(st: KernelState, out: Outbox) -> None:
    # Coalesced: a subscriber has at most one notice outstanding until it acknowledges, so
    # a registration storm costs each subscriber one frame, and non-subscribers nothing.
    for sub in list(st.subscribers):
        if not sub.notice_pending:
            sub.notice_pending = True
            sub.notices_sent += 1
            out.event(sub, frames.RegistrationNotice(sub.subscription))


def on_notify_ack(st: KernelState, out: Outbox, rec: ProcessRecord, msg: frames.NotifyAck,
                  rid: int) -> frames.Frame:
    rec.caps.get(msg.handle, "subscription")
    rec.notice_pending = False
    return frames.Ok()


def on_access(st: KernelState, out: Outbox, rec: ProcessRecord, msg: frames.Access,
              rid: int) -> frames.Frame:
    svc: ServiceRecord = rec.caps.get(msg.handle, "service").target
    denied = svc.access.change(msg.allow or (), msg.deny or (), st.limits.access_entries)
    out.audit(_audit.RESTRICT, rec, None, svc.name,
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
            serving = st.serving(value)
            if serving is not None:
                affected |= svc.chans_of_id.get(serving, set())
    for ch in affected:
        client = ch.client
        if not svc.access.permits(client.process_id, client.uid, client.package,
                                  names=client.names_served(),
                                  allow_names=st.verified_names(client)):
            channels.close_channel(st, out, ch, STATE_REVOKED)
    return frames.Ok()


def _few(entries: list[str] | None, n: int = 20) -> str:
    """A list for an audit row: its first n entries and how many more (never all of them)."""
    entries = entries or []
    more = f" and {len(entries) - n} more" if len(entries) > n else ""
    return f"{entries[:n]}{more}"


def _pending_grant(key: str) -> dict[str, Any]:
    return {"key": key, "handle": 0, "process_id": 0, "name": "", "rights": [], "limits": {}}


def _grant_row(key: str, g: frames.Granted) -> dict[str, Any]:
    return {"key": key, "handle": g.handle, "process_id": g.process_id, "name": g.name,
            "rights": list(g.rights or ()), "limits": dict(g.limits or {})}


# What this module answers (see state.Handler).
HANDLERS: dict[type[frames.Frame], Handler] = {
    frames.Grant: on_grant,
    frames.Register: on_register,
    frames.RegisterPackage: on_register_package,
    frames.Lookup: on_lookup,
    frames.LookupPackage: on_lookup_package,
    frames.Subscribe: on_subscribe,
    frames.NotifyAck: on_notify_ack,
    frames.Access: on_access,
}
