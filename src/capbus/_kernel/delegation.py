"""Delegation: restricting and revoking capabilities, passing them (and regions) along with a
message (attach, detach, claim), watching a service's process, releasing a handle.

An attachment is a derived child of the sender's capability, held by the kernel under (channel,
tag) until the receiving service claims it or it expires; every check is made before anything is
attached, and both the service and each client have a bound on what may wait.
"""

from __future__ import annotations

import json
from typing import Any

from .._errors import InvalidCapability, IpcError, MessageTooLarge, OutOfMemory, PeerDied, PermissionDenied
from .._protocol import frames
from . import audit as _audit
from . import channels, naming, topics
from .captable import Capability, CapLimits, check_rights
from .launcher import Child
from .shm import STATE_REVOKED
from .state import (
    Attached,
    Channel,
    Handler,
    KernelState,
    Outbox,
    ProcessRecord,
    ServiceRecord,
    client_key,
    drop_pending,
    granted,
)

MAX_TRANSFERS = 4096  # attached capabilities and regions waiting to be claimed, per service
MAX_PENDING_PER_CLIENT = 1024  # of those, what one client process may have waiting


def on_restrict(st: KernelState, out: Outbox, rec: ProcessRecord, msg: frames.Restrict,
                rid: int) -> frames.Frame:
    cap = rec.caps.get(msg.handle)
    if cap.kind not in ("endpoint", "topic"):
        raise InvalidCapability(f"handle {msg.handle:#x} is a {cap.kind}: only endpoints and "
                                "topics can be restricted")
    rights = cap.rights if msg.rights is None else check_rights(msg.rights)
    if cap.kind == "topic":  # a topic capability to hand on (share, subscribe; never publish)
        if "publish" in rights:
            raise PermissionDenied("a topic has one publisher: a restricted topic capability "
                                   "may carry subscribe and share, not publish")
        child = topics.restrict(st, rec, cap, frozenset(rights))
        out.audit(_audit.RESTRICT, rec, child, cap.target.name,
                  f"from {cap.handle:#x}: rights {sorted(rights)}")
        return topics.granted(child)
    asked = CapLimits.from_request(msg.limits)
    limits = cap.limits.tightened(asked.rate, asked.bandwidth, asked.max_message_size,
                                  asked.expires_at, asked.max_priority)
    child = rec.caps.adopt(cap.derive(rights, limits), rec)
    out.audit(_audit.RESTRICT, rec, child, cap.target.name,
              f"from {cap.handle:#x}: rights {sorted(rights)} limits {limits.wire()}")
    return granted(child)


def on_revoke(st: KernelState, out: Outbox, rec: ProcessRecord, msg: frames.Revoke,
              rid: int) -> frames.Frame:
    cap = rec.caps.get(msg.handle)
    revoke(st, out, cap, rec)
    return frames.Ok()


def revoke(st: KernelState, out: Outbox, cap: Capability, by: ProcessRecord | None) -> None:
    """The capability and its whole subtree leave every table; their channels stop at once.
    A restricted holder (under a lookup list) that someone else took one from may not look
    its service up again."""
    subtree = cap.subtree()
    for c in subtree:
        c.revoked = True
        owner: ProcessRecord | None = c.owner
        if owner is None:
            drop_pending(c)  # not claimed yet
        else:
            if c.kind == "endpoint" and owner is not by:
                naming.remember_revoked(st, owner, (c.target.kind, c.target.name))
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
            if c.kind in ("topic", "subscriber"):
                topics.drop_cap(st, out, owner, c, revoked=True)
        for ch in list(c.extra.get("channels", ())):
            channels.close_channel(st, out, ch, STATE_REVOKED)
    cap.detach()
    out.audit(_audit.REVOKE, by, cap, getattr(cap.target, "name", ""),
              f"{len(subtree)} capabilities")


def on_delegate(st: KernelState, out: Outbox, rec: ProcessRecord, msg: frames.Delegate,
                rid: int) -> frames.Frame:
    """One capability or region at a time (Attach does a whole message at once)."""
    cap = rec.caps.get(msg.handle)
    if msg.move and cap.kind != "region":
        raise ValueError("only regions can be moved; other capabilities are delegated")
    caps, regions = ([], [msg.handle]) if cap.kind == "region" else ([msg.handle], [])
    return _attach(st, out, rec, msg.via, msg.index, msg.tag, caps, regions, msg.move)


def on_attach(st: KernelState, out: Outbox, rec: ProcessRecord, msg: frames.Attach,
              rid: int) -> frames.Frame:
    return _attach(st, out, rec, msg.via, msg.index, msg.tag, msg.caps, msg.regions, msg.move)


def _attach(st: KernelState, out: Outbox, rec: ProcessRecord, via_handle: int, index: int, tag: int,
            cap_handles: list[int], region_handles: list[int], move: bool) -> frames.Frame:
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
    caps = [rec.caps.get(h) for h in cap_handles]
    for cap in caps:
        if cap.kind not in ("endpoint", "topic") or (cap.kind == "topic" and "publish" in cap.rights):
            raise InvalidCapability(
                f"handle {cap.handle:#x} ({cap.kind}) cannot be passed on: endpoints, and topic "
                "capabilities made with restrict (a publisher's own cannot), can")
    regions = [rec.caps.get(h, "region") for h in region_handles]
    for cap in caps + ([] if move else regions):
        if "share" not in cap.rights:
            out.audit(_audit.DENIED, rec, cap, getattr(cap.target, "name", ""),
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
    n, client = len(caps) + len(regions), client_key(rec)
    if svc.pending + n > MAX_TRANSFERS:
        raise OutOfMemory(f"{MAX_TRANSFERS} attachments already wait for {svc.name!r} to "
                          "claim them: try again once it has received its messages")
    if svc.pending_by.get(client, 0) + n > MAX_PENDING_PER_CLIENT:
        raise OutOfMemory(f"this process already has {MAX_PENDING_PER_CLIENT} attachments "
                          f"waiting for {svc.name!r} to claim them: send the messages they "
                          "belong to, or wait for them to expire")
    if att is None:
        att = ch.transfers[tag] = Attached([], client)
        att.timer = out.after(b.attach_ttl, lambda: _expire_attached(st, out, ch, tag, att))
    for cap in caps + regions:
        child = cap.derive()
        if cap.kind == "region":
            cap.target.refs += 1  # the pending attachment keeps the region alive
        att.children.append(child)
    svc.pending += n
    svc.pending_by[client] = svc.pending_by.get(client, 0) + n
    for cap in regions if move else ():  # the sender gives its own capability up
        channels.drop_cap(st, out, rec, rec.caps.remove(cap.handle))
    for cap in caps + regions:
        out.audit(_audit.DELEGATE, rec, cap, getattr(cap.target, "name", ""),
                  f"to process {svc.owner.process_id} via {svc.name!r}")
    return frames.Ok()


def on_detach(st: KernelState, out: Outbox, rec: ProcessRecord, msg: frames.Detach,
              rid: int) -> frames.Frame:
    svc: ServiceRecord = rec.caps.get(msg.via, "endpoint").target
    ch = svc.channels.get(msg.index)
    if ch is None or ch.client is not rec:
        raise InvalidCapability(f"channel {msg.index} is not one of this process's lanes")
    channels.discard_attached(st, out, ch, msg.tag)
    return frames.Ok()


def _expire_attached(st: KernelState, out: Outbox, ch: Channel, tag: int, att: Attached) -> None:
    if ch.transfers.get(tag) is att:
        att.timer = None  # fired: nothing to cancel
        channels.discard_attached(st, out, ch, tag)


def on_claim(st: KernelState, out: Outbox, rec: ProcessRecord, msg: frames.Claim, rid: int) -> frames.Frame:
    svc: ServiceRecord = rec.caps.get(msg.handle, "service").target
    ch = svc.channels.get(msg.index)
    if ch is None or ch.generation != msg.generation:
        ch = svc.draining.get(msg.generation)
        if ch is None or ch.index != msg.index:  # that channel instance is gone
            return frames.Rows([], 0)
    att = channels.take_attached(st, out, ch, msg.tag)
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
            drop_pending(child)
            continue
        try:
            rec.caps.insert(child)
        except IpcError:
            drop_pending(child)
            continue
        child.owner = rec
        room -= size
        row["handle"] = child.handle
        rows.append(row)
        out.audit("accept", rec, child, getattr(child.target, "name", ""),
                  f"derived from {child.parent.handle:#x}" if child.parent else "")
    return frames.Rows(rows, len(att.children))


def on_watch(st: KernelState, out: Outbox, rec: ProcessRecord, msg: frames.Watch, rid: int) -> frames.Frame:
    cap = rec.caps.get(msg.handle, "endpoint")
    if not cap.watched:
        cap.watched = True
        if cap.target.alive:
            cap.target.owner.watched_by.add((rec, cap.handle))
        else:
            out.event(rec, frames.Death(cap.handle, cap.target.owner.process_id))
    return frames.Ok()


def on_release(st: KernelState, out: Outbox, rec: ProcessRecord, msg: frames.Release,
               rid: int) -> frames.Frame:
    cap = rec.caps.remove(msg.handle)
    channels.drop_cap(st, out, rec, cap)
    return frames.Ok()


def revoke_grant(st: KernelState, out: Outbox, child: Child, key: str) -> None:
    """Child.revoke_grant: its spawner takes a startup grant back, for good (across restarts);
    the endpoint and all derived from it are revoked, the process hears GrantRevoked."""
    rec = st.procs.get(child.process_id)
    known = {g.key for g in child.spec.grants} | (set(rec.grants) if rec else set())
    if key not in known:
        raise KeyError(f"{child!r} was given no grant {key!r}")
    child.revoked_grants.add(key)
    state = rec.grants.get(key) if rec is not None else None
    if rec is None or state is None:
        return  # not connected yet (or gone): its Hello finds the grant revoked
    state.revoked = True
    if state.cap is not None and not state.cap.revoked:
        revoke(st, out, state.cap, None)
    state.cap = None
    naming.remember_revoked(st, rec, state.spec.lookup_key)
    out.audit(_audit.REVOKE, rec, None, state.spec.target, f"startup grant {key}")
    out.event(rec, frames.GrantRevoked(key))


def _claim_row(child: Capability) -> dict[str, Any]:
    """A claimed capability as the claim's answer lists it (its handle filled in on insert; the
    largest handle stands in for it until then, so the row's size is known)."""
    if child.kind == "region":
        return {"kind": "region", "handle": frames.U64_MAX, "size": child.target.size,
                "rights": sorted(child.rights)}
    if child.kind == "topic":
        return {"kind": "topic", "handle": frames.U64_MAX,
                "process_id": child.target.owner.process_id, "name": child.target.name,
                "rights": sorted(child.rights), "limits": {}}
    svc: ServiceRecord = child.target
    return {"kind": "endpoint", "handle": frames.U64_MAX, "process_id": svc.owner.process_id,
            "name": svc.name, "rights": sorted(child.rights), "limits": child.limits.wire()}


# What this module answers (see state.Handler).
HANDLERS: dict[type[frames.Frame], Handler] = {
    frames.Restrict: on_restrict,
    frames.Revoke: on_revoke,
    frames.Delegate: on_delegate,
    frames.Attach: on_attach,
    frames.Detach: on_detach,
    frames.Claim: on_claim,
    frames.Watch: on_watch,
    frames.Release: on_release,
}
