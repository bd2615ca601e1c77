"""Topics: one publisher, many subscribers, samples written once into memory the publisher owns.

The kernel only sets topics up and tears them down; no sample passes through it. Publishing a
topic claims its name (a registry beside service names: one publisher per name) and hands the
publisher a sample pool (a memfd sized here); once the publisher has mapped it writable it asks
SealTopic, and the kernel seals the pool (F_SEAL_FUTURE_WRITE: no new writable mapping, ever)
before any subscriber gets it. Each subscription gets a control page only the kernel writes
(state, the publisher's verified ProcessId, the geometry) and a ring both ends write; the
publisher hears SubscriberJoined (with the ring) and SubscriberLeft; a subscriber hears
TopicClosed. Everything is bounded: topics and subscriptions per process, subscribers per topic,
depth and held samples per subscriber, and the pool's bytes against the uid's region bytes.

Capabilities: the publisher holds a "topic" capability (publish, subscribe); each subscription
is a "subscriber" capability (subscribe) derived from it, so revoking the publisher's revokes
every subscription, and releasing or revoking one ends just that subscription.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any

from .. import _topic_layout as _tl
from .._errors import NameTaken, OutOfMemory, PermissionDenied, ServiceNotFound
from .._mapping import Mapping
from .._protocol import frames
from .._protocol.names import check_name
from . import audit as _audit
from .allowlist import AccessList
from .captable import Capability
from .shm import (
    STATE_CLOSED,
    STATE_PEER_DEAD,
    STATE_REVOKED,
    TopicSubShm,
    make_topic_pool,
    seal_topic_pool,
)
from .state import Handler, KernelState, Outbox, ProcessRecord, UidUsage, brief

TOPIC_RIGHTS = frozenset({"publish", "subscribe", "share"})
OVERFLOW = ("drop-oldest", "block")
MAX_SUBSCRIBERS = 64  # per topic
MAX_DEPTH = 4096  # delivery entries per subscription
MAX_HELD = 1024  # samples one subscriber may hold past its ring
MAX_HISTORY = 4096
MAX_SAMPLE = 1 << 30
# The kernel's own user (as naming.py's: a gateway may publish NAME@HOST topics as it)
_KERNEL_UID = os.geteuid()
LOANS = 4  # samples the publisher may have loaned out (written, not yet published) at once


@dataclass(eq=False)
class SubRecord:
    topic: TopicRecord
    index: int
    rec: ProcessRecord
    cap: Capability
    shm: TopicSubShm
    depth: int


@dataclass(eq=False)
class TopicRecord:
    name: str
    owner: ProcessRecord
    access: AccessList
    max_size: int
    slot_size: int
    slots: int
    history: int
    overflow: str
    max_subscribers: int
    max_depth: int
    max_held: int
    pool_fd: int
    pool_bytes: int
    usage: UidUsage | None
    handle: int = 0
    cap: Capability | None = None
    sealed: bool = False
    header: Mapping | None = None
    subs: dict[int, SubRecord] = field(default_factory=dict)
    free_indices: list[int] = field(default_factory=list)
    next_index: int = 0
    joined: int = 0  # subscriptions ever made (stats)

    def published(self) -> int:
        if self.header is None:
            return 0
        return int(struct.unpack_from("<Q", self.header.buf, _tl.POOL_PUBLISHED_OFF)[0])


def slots_for(history: int, max_subscribers: int, max_depth: int, max_held: int) -> int:
    """Every reference that can be alive at once has a slot, plus one to write the next sample
    into: the history, the loans, and each subscriber's ring and held samples."""
    return history + LOANS + max_subscribers * (max_depth + max_held) + 1


def _check_range(name: str, value: int, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in {lo}..{hi}, got {value}")
    return value


def on_publish_topic(st: KernelState, out: Outbox, rec: ProcessRecord, msg: frames.PublishTopic,
                     rid: int) -> None:
    name = check_name(msg.name, "topic name")
    if msg.overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {OVERFLOW}, not {msg.overflow!r:.40}")
    _check_range("max_size", msg.max_size, 1, MAX_SAMPLE)
    _check_range("history", msg.history, 0, MAX_HISTORY)
    _check_range("max_subscribers", msg.max_subscribers, 1, MAX_SUBSCRIBERS)
    _check_range("max_depth", msg.max_depth, 1, MAX_DEPTH)
    _check_range("max_held", msg.max_held, 1, MAX_HELD)
    if len(rec.topics) >= st.limits.topics_per_process:
        raise OutOfMemory(f"this process already publishes {st.limits.topics_per_process} topics "
                          "(the kernel's topics_per_process limit): close some")
    # NAME@HOST: a remote topic, re-published here by a gateway only (as NAME@HOST services)
    st.policy.may_serve_remote(rec.info(), name, msg.gateway, _KERNEL_UID)
    st.policy.may_register(rec.info(), name)
    access = AccessList.from_entries(msg.allow, st.limits.access_entries)
    slot_size = _tl.slot_size_for(msg.max_size)
    slots = slots_for(msg.history, msg.max_subscribers, msg.max_depth, msg.max_held)
    size = _tl.pool_size(slots, slot_size)
    usage, limit = rec.usage, st.limits.region_bytes_per_uid
    if usage is not None and usage.region_bytes + size > limit:
        raise OutOfMemory(
            f"uid {rec.uid} already has {usage.region_bytes} bytes of regions and topic pools "
            f"(its region_bytes_per_uid limit is {limit}); a pool of {size} bytes ({slots} "
            f"slots of {slot_size}) does not fit: lower max_size, max_subscribers or max_depth")
    if st.topics.get(name) is not None:
        raise NameTaken(f"topic {name!r} is already published by a live process")
    pool_fd = make_topic_pool(size)
    topic = TopicRecord(name, rec, access, msg.max_size, slot_size, slots, msg.history,
                        msg.overflow, msg.max_subscribers, msg.max_depth, msg.max_held,
                        pool_fd, size, usage)
    cap = Capability("topic", topic, TOPIC_RIGHTS, owner=rec)
    try:
        topic.handle = rec.caps.insert(cap)
    except BaseException:
        os.close(pool_fd)
        raise
    topic.cap = cap
    st.topics.claim(name, topic)
    if usage is not None:
        usage.region_bytes += size
    rec.topics.append(topic)
    try:
        out.respond(rec, rid, frames.TopicCreated(topic.handle, slots, slot_size), (pool_fd,))
    except BaseException:
        rec.caps.remove(topic.handle)
        end_topic(st, out, topic, STATE_CLOSED, _tl.REASON_CLOSED)
        raise
    out.audit(_audit.REGISTER, rec, cap, name, f"topic: {slots} slots of {slot_size} bytes")
    return None


def on_seal_topic(st: KernelState, out: Outbox, rec: ProcessRecord, msg: frames.SealTopic,
                  rid: int) -> frames.Frame:
    topic: TopicRecord = rec.caps.get(msg.handle, "topic").target
    if not topic.sealed:
        topic.header = seal_topic_pool(topic.pool_fd, topic.pool_bytes)
        topic.sealed = True
    return frames.Ok()


def restrict(st: KernelState, rec: ProcessRecord, cap: Capability,
             rights: frozenset[str]) -> Capability:
    """A child of a topic capability with these rights (at most its own), in rec's table."""
    return rec.caps.adopt(cap.derive(rights, kind="topic"), rec)


def granted(cap: Capability) -> frames.Granted:
    topic: TopicRecord = cap.target
    return frames.Granted(cap.handle, topic.owner.process_id, topic.name, sorted(cap.rights), {})


def on_subscribe_topic(st: KernelState, out: Outbox, rec: ProcessRecord,
                       msg: frames.SubscribeTopic, rid: int) -> None:
    via: Capability | None = None
    if msg.handle:
        # Through a capability: it is the authority (the allowlist is for subscribing by name)
        via = rec.caps.get(msg.handle, "topic")
        if "subscribe" not in via.rights:
            raise PermissionDenied(f"handle {msg.handle:#x} lacks the subscribe right")
        topic: TopicRecord | None = via.target
        name = via.target.name
        if topic is None or topic.pool_fd < 0 or not topic.sealed:
            raise ServiceNotFound(f"the topic {name!r} is no longer published")
    else:
        name = check_name(msg.name, "topic name")
        topic = st.topics.get(name)
        if topic is None or not topic.sealed or topic.cap is None:
            raise ServiceNotFound(f"no live process publishes the topic {name!r}")
        if not topic.access.permits(rec.process_id, rec.uid, rec.package,
                                    names=rec.names_served(),
                                    allow_names=st.verified_names(rec)):
            raise PermissionDenied(f"topic {name!r} does not accept process {rec.process_id} "
                                   "(not on its allowlist, or denied)")
    assert topic is not None and topic.cap is not None
    depth = msg.depth or topic.max_depth
    _check_range(f"depth (topic {name!r} allows at most {topic.max_depth})", depth, 1,
                 topic.max_depth)
    if len(topic.subs) >= topic.max_subscribers:
        raise OutOfMemory(f"topic {name!r} has its {topic.max_subscribers} subscribers "
                          "(its max_subscribers)")
    if len(rec.topic_subs) >= st.limits.subscriptions_per_process:
        raise OutOfMemory(f"this process already holds {st.limits.subscriptions_per_process} "
                          "subscriptions (the kernel's subscriptions_per_process limit): close "
                          "some")
    usage = rec.usage
    if usage is not None and usage.subscriptions >= st.limits.subscriptions_per_uid:
        raise OutOfMemory(f"uid {rec.uid} already holds {usage.subscriptions} subscriptions in "
                          "all its processes (the kernel's subscriptions_per_uid limit): close "
                          "some")
    if topic.free_indices:
        index = topic.free_indices.pop()
    else:
        index, topic.next_index = topic.next_index, topic.next_index + 1
    try:
        shm = TopicSubShm(topic.owner.process_id, topic.slots, topic.slot_size, topic.max_size,
                          depth, topic.max_held, index)
    except BaseException:
        topic.free_indices.append(index)
        raise
    # Derived from what it came through: revoking that (a handed-on topic capability, or the
    # publisher's own) ends this subscription too.
    try:
        cap = rec.caps.adopt((via or topic.cap).derive(frozenset({"subscribe"}), kind="subscriber"),
                             rec)
    except BaseException:
        shm.close()
        topic.free_indices.append(index)
        raise
    sub = SubRecord(topic, index, rec, cap, shm, depth)
    cap.extra["sub"] = sub
    topic.subs[index] = sub
    rec.topic_subs.add(sub)
    if usage is not None:  # its ring, charged to its uid until close_sub (as a channel is)
        usage.subscriptions += 1
    try:
        out.respond(rec, rid, frames.TopicSubscribed(
            cap.handle, index, topic.owner.process_id, topic.slots, topic.slot_size,
            topic.max_size, depth, topic.max_held),
            (topic.pool_fd, shm.ctrl_fd, shm.ring_fd, shm.event_fd))
    except BaseException:
        rec.caps.remove(cap.handle)
        close_sub(st, out, sub, STATE_CLOSED, _tl.REASON_CLOSED, tell_publisher=False,
                  tell_subscriber=False)
        raise
    if not out.event(topic.owner, frames.SubscriberJoined(topic.handle, index, rec.process_id,
                                                          depth), (shm.ring_fd, shm.event_fd)):
        close_sub(st, out, sub, STATE_CLOSED, _tl.REASON_CLOSED, tell_publisher=False)
    shm.drop_fds()
    topic.joined += 1
    out.audit(_audit.GRANT, rec, cap, name, f"topic subscription {index}, depth {depth}")
    return None


def on_drop_subscriber(st: KernelState, out: Outbox, rec: ProcessRecord,
                       msg: frames.DropSubscriber, rid: int) -> frames.Frame:
    topic: TopicRecord = rec.caps.get(msg.handle, "topic").target
    sub = topic.subs.get(msg.index)
    if sub is not None:
        out.audit(_audit.REVOKE, rec, sub.cap, topic.name,
                  f"subscriber {sub.rec.process_id} cut off: {brief(msg.reason)}")
        close_sub(st, out, sub, STATE_CLOSED, _tl.REASON_CUT_OFF, tell_publisher=False)
    return frames.Ok()


def close_sub(st: KernelState, out: Outbox, sub: SubRecord, state: int, reason: int, *,
              tell_publisher: bool = True, tell_subscriber: bool = True) -> None:
    """End one subscription (idempotent): its control page says why, both ends hear of it, its
    capability leaves the subscriber's table."""
    topic = sub.topic
    if topic.subs.get(sub.index) is not sub:
        return
    del topic.subs[sub.index]
    topic.free_indices.append(sub.index)
    sub.rec.topic_subs.discard(sub)
    if sub.rec.usage is not None:
        sub.rec.usage.subscriptions -= 1
        st.drop_usage(sub.rec.usage)
    sub.shm.set_state(state, reason)
    handle = sub.cap.handle
    try:
        if sub.rec.caps.get(handle) is sub.cap:
            sub.rec.caps.remove(handle)
    except Exception:  # already gone from its table (released, revoked)
        pass
    parent = sub.cap.parent
    sub.cap.detach()
    if parent is not None and parent.extra.get("released") and not parent.children:
        parent.detach()  # a released topic capability kept only for this subscription
    if tell_subscriber and sub.rec.alive:
        out.event(sub.rec, frames.TopicClosed(handle, reason))
    if tell_publisher and topic.owner.alive:
        out.event(topic.owner, frames.SubscriberLeft(topic.handle, sub.index))
    sub.shm.close()


def end_topic(st: KernelState, out: Outbox, topic: TopicRecord, state: int, reason: int) -> None:
    """The publisher is gone or closed the topic: every subscription ends, the name is free."""
    if topic.pool_fd < 0:
        return
    for sub in list(topic.subs.values()):
        close_sub(st, out, sub, state, reason, tell_publisher=False)
    st.topics.release(topic.name, topic)
    if topic in topic.owner.topics:
        topic.owner.topics.remove(topic)
    os.close(topic.pool_fd)
    topic.pool_fd = -1
    if topic.header is not None:
        topic.header.close()
        topic.header = None
    if topic.usage is not None:
        st.free_region_bytes(topic.usage, topic.pool_bytes)
    if topic.cap is not None:
        topic.cap.detach()


def drop_cap(st: KernelState, out: Outbox, rec: ProcessRecord, cap: Capability,
             revoked: bool = False) -> None:
    """A topic or subscriber capability left rec's table (released or revoked)."""
    state, reason = (STATE_REVOKED, _tl.REASON_REVOKED) if revoked else (STATE_CLOSED,
                                                                           _tl.REASON_CLOSED)
    if cap.kind == "topic" and cap is cap.target.cap:  # the publisher's own: the topic ends
        end_topic(st, out, cap.target, state, reason)
    elif cap.kind == "topic":
        # A handed-on one: subscriptions made through it live on (revocation still reaches
        # them through the tree), so it stays in the tree while they do
        cap.extra["released"] = True
        if not cap.children:
            cap.detach()
    elif cap.kind == "subscriber":
        sub: SubRecord | None = cap.extra.get("sub")
        if sub is not None:
            close_sub(st, out, sub, state, reason, tell_subscriber=revoked)


def process_gone(st: KernelState, out: Outbox, rec: ProcessRecord) -> None:
    """rec exited: the topics it published end (subscribers see PeerDied), its subscriptions
    end (publishers free what it held)."""
    # A stopping kernel lets go of everyone alive: not a death (a reconnect publishes again)
    state, reason = ((STATE_CLOSED, _tl.REASON_KERNEL_STOPPED) if st.shut
                     else (STATE_PEER_DEAD, _tl.REASON_PEER_DEAD))
    for topic in list(rec.topics):
        end_topic(st, out, topic, state, reason)
    for sub in list(rec.topic_subs):
        close_sub(st, out, sub, STATE_CLOSED, _tl.REASON_CLOSED, tell_subscriber=False)
    for cap in rec.caps:
        if cap.kind == "topic" and cap is not cap.target.cap:
            drop_cap(st, out, rec, cap)


def rows(st: KernelState) -> list[dict[str, Any]]:
    """One row per subscription (and one per topic with none): the counters a tool shows."""
    out: list[dict[str, Any]] = []
    for name, topic in st.topics.items():
        if topic is None:
            continue
        base = {"topic": name, "publisher": topic.owner.process_id,
                "published": topic.published(), "subscribers": len(topic.subs),
                "slots": topic.slots, "max_size": topic.max_size}
        if not topic.subs:
            out.append({**base, "subscriber": 0, "delivered": 0, "taken": 0, "dropped": 0})
        for sub in list(topic.subs.values()):
            out.append({**base, "subscriber": sub.rec.process_id, **sub.shm.stats()})
    return out


# What this module answers (see state.Handler).
HANDLERS: dict[type[frames.Frame], Handler] = {
    frames.PublishTopic: on_publish_topic,
    frames.SealTopic: on_seal_topic,
    frames.SubscribeTopic: on_subscribe_topic,
    frames.DropSubscriber: on_drop_subscriber,
}
