"""Channels: opening one between a client and a service, closing it, the end of a service, and
what a capability held when it leaves a table (its service, its channels).

A channel is the shared-memory lane a client calls a service over (shm.ChannelShm); the kernel
keeps one Channel record per live one, counted per client process, per uid and per service.
Its attachments (capabilities and regions a message carries, see delegation) live and die with it.
"""

from __future__ import annotations

import logging
import os

from .._errors import InvalidCapability, IpcError, OutOfMemory, PeerDied, PermissionDenied
from .._protocol import frames
from . import audit as _audit
from . import topics
from .captable import Capability
from .shm import STATE_CLOSED, STATE_REVOKED, ChannelShm
from .state import (
    Attached,
    Channel,
    Handler,
    KernelState,
    Outbox,
    ProcessRecord,
    ServiceRecord,
    brief,
    client_key,
    count_down,
    drop_pending,
    sender_keys,
)

log = logging.getLogger("capbus.kernel")

NSLOTS = 256  # slots per ring
ARENA_SIZE = 128 << 20  # bytes per direction: virtual, a sparse memfd costs only what is touched
MAX_CHANNELS_PER_CAP = 64  # channels one holder may open on one endpoint (one per calling thread)
MAX_CHANNELS_PER_PROCESS = 1024  # channels one process may hold open in all


def on_open_channel(st: KernelState, out: Outbox, rec: ProcessRecord, msg: frames.OpenChannel,
                    rid: int) -> None:
    cap = rec.caps.get(msg.handle, "endpoint")
    svc: ServiceRecord = cap.target
    if not svc.alive:
        raise PeerDied(f"the process serving {svc.name!r} has exited: look it up again")
    st.check_access(rec, svc)
    if "send" not in cap.rights:
        raise PermissionDenied(f"handle {cap.handle:#x} lacks the send right")
    if len(rec.channels) >= MAX_CHANNELS_PER_PROCESS:
        raise OutOfMemory(f"this process already holds {MAX_CHANNELS_PER_PROCESS} channels")
    held: set[Channel] = cap.extra.setdefault("channels", set())
    if len(held) >= MAX_CHANNELS_PER_CAP:
        raise OutOfMemory(f"{MAX_CHANNELS_PER_CAP} threads already call {svc.name!r} from here")
    # Per client process and per uid, so that no client can take every channel of a service.
    # Counted by OS process: connecting again from the same process gains it nothing.
    client, b = client_key(rec), svc.bounds
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
    if usage is not None and usage.channels >= st.limits.channels_per_uid:
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
    ch = Channel(index, svc, rec, cap, shm, next(st.channel_gens))
    svc.channels[index] = ch
    svc.chans_by_client[client] = svc.chans_by_client.get(client, 0) + 1
    svc.chans_by_uid[rec.uid] = svc.chans_by_uid.get(rec.uid, 0) + 1
    if usage is not None:
        usage.channels += 1
    rec.channels.add(ch)
    held.add(ch)
    for index_, k in sender_keys(svc, rec):
        index_.setdefault(k, set()).add(ch)
    # The server learns of the channel before the client can use it (one ordered socket
    # each, but the server maps it on its own time: a request that arrives first waits in
    # the ring, and the doorbell bit tells the server once it has mapped it).
    told = out.event(svc.owner, frames.ChannelOpened(
        svc.handle, index, rec.process_id, NSLOTS, ARENA_SIZE, ch.generation, max(rec.pid, 0)),
        (shm.chan_fd, shm.ctrl_fd, shm.reply_event_fd, shm.reply_pipe[1],
         shm.reply_pipe_spare[0]))
    if svc.channels.get(index) is not ch:
        # The server lost its connection over that event (it does not read its socket) and
        # the channel went with it: its fds are closed, the client hears why (not EBADF).
        raise PeerDied(f"the process serving {svc.name!r} was disconnected: look it up again")
    if not told:
        # The server could not be told of it: the channel would never be served.
        close_channel(st, out, ch, STATE_CLOSED, tell_server=False)
        raise OutOfMemory(f"cannot pass a new channel to the server of {svc.name!r} now "
                          "(out of fds): try again later")
    try:
        out.respond(rec, rid, frames.ChannelGranted(index, NSLOTS, ARENA_SIZE,
                                                    max(svc.owner.pid, 0)),
                    (shm.chan_fd, shm.ctrl_fd, svc.doorbell_fd, svc.bell_event_fd,
                     shm.reply_event_fd, svc.bell_sleep_fd, shm.reply_pipe[0]))
    except IpcError:  # the client never got it: the server hears it closed
        close_channel(st, out, ch, STATE_CLOSED)
        raise
    shm.drop_fds()


def close_channel(st: KernelState, out: Outbox, ch: Channel, state: int, tell_server: bool = True) -> None:
    svc = ch.service
    if svc.channels.get(ch.index) is not ch:
        return
    if not st.shut:
        # A stopping kernel leaves the page OPEN: both ends live, and the channel needs no
        # kernel (they watch each other's pidfds; a restarted kernel meets their reconnect).
        ch.shm.set_state(state)
    del svc.channels[ch.index]
    svc.free_indices.append(ch.index)
    count_down(svc.chans_by_client, client_key(ch.client))
    count_down(svc.chans_by_uid, ch.client.uid)
    if ch.client.usage is not None:
        ch.client.usage.channels -= 1
        st.drop_usage(ch.client.usage)
    for index_, k in sender_keys(svc, ch.client):
        chans = index_.get(k)
        if chans is not None:
            chans.discard(ch)
            if not chans:
                del index_[k]
    # Attachments never reach a later channel at this index (a claim names the instance).
    # They stay with this instance only while the server drains what its client had queued
    # (a sender may send a region and exit at once); until claimed or expired.
    if ch.transfers and tell_server and svc.alive and state != STATE_REVOKED:
        svc.draining[ch.generation] = ch
    else:
        for tag in list(ch.transfers):
            discard_attached(st, out, ch, tag)
    ch.client.channels.discard(ch)
    ch.cap.extra.get("channels", set()).discard(ch)
    if tell_server and svc.alive:
        out.event(svc.owner, frames.ChannelClosed(svc.handle, ch.index))
    ch.shm.close()


def end_service(st: KernelState, out: Outbox, svc: ServiceRecord, state: int) -> None:
    """Unregistered or its process gone: every channel to it ends, its clients are woken."""
    svc.alive = False
    (st.names if svc.kind == "name" else st.packages).release(svc.name, svc)
    out.audit(_audit.UNREGISTER, svc.owner, None, svc.name,
              "released" if state == STATE_CLOSED else "process gone")
    for ch in list(svc.channels.values()):
        close_channel(st, out, ch, state, tell_server=False)
    for ch in list(svc.draining.values()):
        for tag in list(ch.transfers):
            discard_attached(st, out, ch, tag)
    for fd in (svc.doorbell_fd, svc.bell_event_fd, svc.bell_sleep_fd):
        if fd >= 0:
            os.close(fd)
    svc.doorbell_fd = svc.bell_event_fd = svc.bell_sleep_fd = -1


def on_close_channel(st: KernelState, out: Outbox, rec: ProcessRecord, msg: frames.CloseChannel,
                     rid: int) -> frames.Frame:
    cap = rec.caps.get(msg.handle, "endpoint")
    ch = cap.target.channels.get(msg.index)
    if ch is None or ch.client is not rec or ch.cap is not cap:
        raise InvalidCapability(f"channel {msg.index} is not one of this endpoint's")
    close_channel(st, out, ch, STATE_CLOSED)
    return frames.Ok()


def on_report_bad(st: KernelState, out: Outbox, rec: ProcessRecord, msg: frames.ReportBad,
                  rid: int) -> frames.Frame:
    cap = rec.caps.get(msg.handle, "service")
    ch = cap.target.channels.get(msg.index)
    reason = brief(msg.reason)
    if ch is not None:
        out.audit(_audit.BAD_MESSAGE, rec, None, cap.target.name,
                  f"from process {ch.client.process_id}: {reason}")
        log.warning("service %r (process %d) reports garbage from process %d on channel %d: "
                    "%s; channel closed", cap.target.name, rec.process_id,
                    ch.client.process_id, msg.index, reason)
        close_channel(st, out, ch, STATE_CLOSED, tell_server=False)
    return frames.Ok()


def drop_cap(st: KernelState, out: Outbox, rec: ProcessRecord, cap: Capability) -> None:
    """A capability left rec's table (released, moved away): undo what it held."""
    if cap.kind == "service":
        svc: ServiceRecord = cap.target
        end_service(st, out, svc, STATE_CLOSED)
        rec.services.remove(svc)
    elif cap.kind == "endpoint":
        if rec.endpoints.get(id(cap.target)) is cap:  # not a grant's or a derived one
            del rec.endpoints[id(cap.target)]
        grant = rec.grants.get(cap.extra.get("grant", ""))
        if grant is not None and grant.cap is cap:
            grant.cap = None  # released: asking for the grant again resolves it anew
        for ch in list(cap.extra.get("channels", ())):
            close_channel(st, out, ch, STATE_CLOSED)
        if cap.watched:
            cap.target.owner.watched_by.discard((rec, cap.handle))
    elif cap.kind == "subscription":
        rec.subscription = 0
        rec.notice_pending = False
        st.subscribers.discard(rec)
    elif cap.kind == "region":
        cap.target.release()
    elif cap.kind in ("topic", "subscriber"):
        topics.drop_cap(st, out, rec, cap)


def take_attached(st: KernelState, out: Outbox, ch: Channel, tag: int) -> Attached | None:
    """Unhook (channel, tag)'s attachments from the channel, its timer and the counts."""
    att = ch.transfers.pop(tag, None)
    if att is None:
        return None
    if att.timer is not None:
        out.cancel(att.timer)
        att.timer = None
    svc = ch.service
    svc.pending -= len(att.children)
    count_down(svc.pending_by, att.client, len(att.children))
    if not ch.transfers:
        svc.draining.pop(ch.generation, None)
    return att


def discard_attached(st: KernelState, out: Outbox, ch: Channel, tag: int) -> None:
    att = take_attached(st, out, ch, tag)
    for child in att.children if att else ():
        drop_pending(child)


# What this module answers (see state.Handler).
HANDLERS: dict[type[frames.Frame], Handler] = {
    frames.OpenChannel: on_open_channel,
    frames.CloseChannel: on_close_channel,
    frames.ReportBad: on_report_bad,
}
