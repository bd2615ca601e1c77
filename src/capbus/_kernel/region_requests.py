"""Regions as processes ask for them: create (charged to the creator's uid), map, seal.

The RegionObject itself (a sealed memfd and its reference count) is in regions.py.
"""

from __future__ import annotations

import os

from .._errors import IpcError, OutOfMemory, PermissionDenied
from .._protocol import frames
from .captable import Capability
from .regions import REGION_RIGHTS, RegionObject
from .state import Handler, KernelState, Outbox, ProcessRecord


def on_create_region(st: KernelState, out: Outbox, rec: ProcessRecord, msg: frames.CreateRegion,
                     rid: int) -> None:
    usage, limit = rec.usage, st.limits.region_bytes_per_uid
    if usage is not None and usage.region_bytes + msg.size > limit:
        raise OutOfMemory(
            f"uid {rec.uid} already has {usage.region_bytes} bytes of regions alive (its "
            f"region_bytes_per_uid limit is {limit}); a region of {msg.size} bytes more does "
            "not fit: release regions (every holder must let go) or ask for less")
    region = RegionObject.create(msg.size)
    if usage is not None:
        usage.region_bytes += region.size
        region.on_free = lambda: st.free_region_bytes(usage, region.size)
    cap = Capability("region", region, REGION_RIGHTS, owner=rec)
    region.refs = 1
    try:
        rec.caps.insert(cap)
    except IpcError:
        region.release()
        raise
    try:
        _send_region(st, out, rec, rid, cap)
    except BaseException:  # the asker never learns the handle: take the region back
        rec.caps.remove(cap.handle)
        region.release()
        raise


def on_map_region(st: KernelState, out: Outbox, rec: ProcessRecord, msg: frames.MapRegion, rid: int) -> None:
    cap = rec.caps.get(msg.handle, "region")
    if "map" not in cap.rights:
        raise PermissionDenied(f"handle {cap.handle:#x} lacks the map right")
    _send_region(st, out, rec, rid, cap)


def _send_region(st: KernelState, out: Outbox, rec: ProcessRecord, rid: int, cap: Capability) -> None:
    fd = cap.target.fd_for(cap.rights)
    try:
        out.respond(rec, rid, frames.RegionGranted(cap.handle, cap.target.size,
                                                   sorted(cap.rights)), (fd,))
    finally:
        os.close(fd)


def on_seal_region(st: KernelState, out: Outbox, rec: ProcessRecord, msg: frames.SealRegion,
                   rid: int) -> frames.Frame:
    cap = rec.caps.get(msg.handle, "region")
    if "write" not in cap.rights:
        raise PermissionDenied(f"handle {cap.handle:#x} lacks the write right: it cannot seal")
    cap.target.seal()
    return frames.Ok()


# What this module answers (see state.Handler).
HANDLERS: dict[type[frames.Frame], Handler] = {
    frames.CreateRegion: on_create_region,
    frames.MapRegion: on_map_region,
    frames.SealRegion: on_seal_region,
}
