"""Introspection: the kernel's tables as rows (processes, services, capabilities, channels) for
Query and the Kernel's own listing methods, in pages that each fit one frame; one process's
queue and table sizes; one uid's usage as the quotas count it.
"""

from __future__ import annotations

import json
from typing import Any

from .._errors import InvalidCapability, PermissionDenied, ProcessNotFound
from .._protocol import frames
from .._protocol.connection import State
from . import topics
from .captable import Capability
from .state import (
    Handler,
    KernelState,
    Outbox,
    ProcessRecord,
    ServiceRecord,
    UidUsage,
    client_key,
    encoded_size,
)

# Every listing page and every row in it fits one frame, whatever the strings in it: a page is
# filled by encoded size, a row larger than _ROW_ROOM has its lists cut short (and says so).
_PAGE_ROOM = frames.MAX_FRAME - 1024
_ROW_ROOM = 16 * 1024


def on_query(st: KernelState, out: Outbox, rec: ProcessRecord, msg: frames.Query, rid: int) -> frames.Frame:
    if rec.uid not in (st.uid, 0):
        raise PermissionDenied("only the kernel's own user (or root) may list its tables")
    if rec.restricted or rec.sandboxed:  # the tables name every service: not for one
        raise PermissionDenied("a sandboxed process, or one under a lookup list, may not "
                               "list the kernel's tables")
    if msg.what not in ("processes", "services", "caps", "channels", "topics"):
        raise ValueError(f"unknown query {msg.what!r}: processes, services, caps, channels "
                         "or topics")
    table = rows(st, msg.what, msg.process_id)
    return frames.Rows(_page(table, msg.offset, msg.limit), len(table))


def rows(st: KernelState, what: str, process_id: int = 0) -> list[dict[str, Any]]:
    if what == "topics":
        # One row per subscription: published (the publisher's pool header), delivered,
        # taken and dropped (the ring's counters), read through the kernel's own mappings.
        return topics.rows(st)
    if what == "channels":
        # The counters both ends keep in the channel's header page, read through the
        # kernel's own mapping: watching costs the watched processes nothing.
        return [
            {"service": svc.name, "server": svc.owner.process_id,
             "client": ch.client.process_id, "index": ch.index,
             **ch.shm.stats()}
            for registry in (st.names, st.packages)
            for _, svc in registry.items()
            for ch in list(svc.channels.values())
        ]
    if what == "caps":
        target = st.procs.get(process_id)
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
            for r in st.procs.values()
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
        for registry in (st.names, st.packages)
        for _, svc in registry.items()
    ]


def process_stats(st: KernelState, process_id: int) -> dict[str, Any]:
    rec = st.procs.get(process_id)
    if rec is None:
        raise InvalidCapability(f"no live process {process_id}")
    return {
        "outbox": len(rec.transport.outbox),
        "in_flight": len(rec.proto.in_flight),
        "parked": len(rec.parked),
        "parked_by_pid": st.parked_by_pid.get(client_key(rec), 0),
        "parked_by_uid": st.parked_by_uid.get(rec.uid, 0),
        "caps": len(rec.caps),
        "lanes": len(rec.channels),
        "services": len(rec.services),
        "attachments": sum(svc.pending for svc in rec.services),
        "watchers": len(rec.watched_by),
        "notice_pending": rec.notice_pending,
        "notices_sent": rec.notices_sent,
    }


def _fit_row(row: dict[str, Any], room: int = _ROW_ROOM) -> dict[str, Any]:
    """The row, or a copy whose list fields are cut short to fit `room` bytes, each ending with
    a "... N more" entry (a service's allowlist can be thousands of names long)."""
    if encoded_size(row) <= room:
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
        size = encoded_size(row)
        if page and size > room:
            break
        page.append(row)
        room -= size
    return page


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


def uid_usage(st: KernelState, uid: int) -> dict[str, int]:
    """What the processes of one uid hold, as the per-uid quotas count it (all 0: nothing)."""
    u = st.usage.get(uid) or UidUsage(uid)
    return {"connections": st.conns_by_uid.get(uid, 0), "caps": u.caps,
            "channels": u.channels, "region_bytes": u.region_bytes,
            "subscriptions": u.subscriptions}


# What this module answers (see state.Handler).
HANDLERS: dict[type[frames.Frame], Handler] = {
    frames.Query: on_query,
}
