"""The shared-memory objects the kernel creates: service doorbells, channels, control pages,
topic pools and subscription rings.

Only the kernel creates memfds. Each is sealed against shrinking and growing (a peer that could
truncate a mapping under the other end would crash it with SIGBUS); a control page is also sealed
with F_SEAL_FUTURE_WRITE after the kernel mapped it, so no process can get a writable mapping of
it, not even by reopening its fd through /proc. Layout constants come from the native core.

This is the one module of the kernel that touches the native data plane, and only through
capbus._layout, the small module built from the same C parts as capbus._core with just what the
kernel uses: the layout constants and atomic stores above, futex_wake, channel_size/resp_ring_off,
and channel_stats (read by introspect through ChannelShm.stats). No module of the kernel imports
capbus._core (its rings, Lane, ServerSet: the code that parses what peers write; the package's
__init__ still does, for the public names). The rest of the kernel takes the few names it needs
from here (MAX_CHANNELS, the channel states).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
from typing import TYPE_CHECKING

from .. import _layout
from .. import _topic_layout as _topic
from .._mapping import Mapping

if TYPE_CHECKING:  # annotations only (captable imports this module)
    import ctypes

    from . import captable

MAX_CHANNELS = _layout.MAX_CHANNELS  # channels one service may have open at once
# A channel's state in its control page, as both ends read it.
STATE_OPEN = _layout.STATE_OPEN
STATE_CLOSED = _layout.STATE_CLOSED
STATE_REVOKED = _layout.STATE_REVOKED
STATE_PEER_DEAD = _layout.STATE_PEER_DEAD
CTRL_CHAIN_MAX = _layout.CTRL_CHAIN_MAX  # token buckets a control page holds besides its own
# Priorities (-nice, or 20 + a real-time priority) a capability's max_priority may name, and the
# bias it carries on the wire and in the control page (CTRL_MAX_PRIORITY_OFF: 0 means no limit).
PRIO_MIN, PRIO_MAX, PRIO_CTRL_BIAS = _layout.PRIO_MIN, _layout.PRIO_MAX, _layout.PRIO_CTRL_BIAS

F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)  # Linux 5.1
_BASE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


def _memfd(name: str, size: int) -> int:
    fd = os.memfd_create(f"capbus-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_doorbell() -> int:
    """A service's doorbell: one futex word and a ready bitmap, writable by all its clients."""
    fd = _memfd("doorbell", _layout.DOORBELL_SIZE)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _BASE_SEALS | fcntl.F_SEAL_SEAL)
    return fd


def make_eventfd() -> int:
    """For asyncio: an fd an event loop can watch, written by the peer when asked to."""
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def make_sleep_eventfd() -> int:
    """A service's sleep eventfd: BLOCKING, for the server's read (see _native/sleep.c, "Sleep eventfds
    and kicks"); its clients write it to wake the server."""
    return os.eventfd(0, os.EFD_CLOEXEC)


class ChannelShm:
    """One channel's memfds as the kernel keeps them: the control page mapped read-write (the
    kernel is its only writer) and the channel's first pages mapped for futex wake-ups. The
    mappings hold no fds: once both ends have theirs, the kernel keeps no fd for a channel."""

    def __init__(self, nslots: int, arena_size: int, sender_id: int) -> None:
        self.nslots, self.arena_size = nslots, arena_size
        self.ctrl_fd = self.reply_event_fd = -1
        self.reply_pipe = self.reply_pipe_spare = (-1, -1)
        self._wake: Mapping | None = None
        self._ctrl: Mapping | None = None
        self.chan_fd = _memfd("channel", _layout.channel_size(nslots, arena_size))
        try:
            fcntl.fcntl(self.chan_fd, fcntl.F_ADD_SEALS, _BASE_SEALS | fcntl.F_SEAL_SEAL)
            self._resp_tail = _layout.resp_ring_off(nslots) + _layout.RING_TAIL_OFF
            self._wake = Mapping(self.chan_fd, _page_round(self._resp_tail + 8))
            head = self._wake.buf
            _layout.atomic_store_u64(head, _layout.CHAN_MAGIC_OFF, _layout.CHAN_MAGIC)
            _layout.atomic_store_u32(head, _layout.CHAN_VERSION_OFF, _layout.CHAN_VERSION)
            _layout.atomic_store_u32(head, _layout.CHAN_NSLOTS_OFF, nslots)
            _layout.atomic_store_u64(head, _layout.CHAN_ARENA_SIZE_OFF, arena_size)
            self.ctrl_fd = _memfd("control", _layout.CTRL_SIZE)
            self._ctrl = Mapping(self.ctrl_fd, _layout.CTRL_SIZE)
            ctrl = self._ctrl.buf
            _layout.atomic_store_u64(ctrl, _layout.CTRL_SENDER_ID_OFF, sender_id)
            _layout.atomic_store_u32(ctrl, _layout.CTRL_GENERATION_OFF, 1)
            _layout.atomic_store_u32(ctrl, _layout.CTRL_STATE_OFF, _layout.STATE_OPEN)
            # From here on no new writable mapping or write() of the control page can be made.
            fcntl.fcntl(self.ctrl_fd, fcntl.F_ADD_SEALS,
                        _BASE_SEALS | F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL)
            self.reply_event_fd = make_eventfd()
            # The reply-sleep pipe: a blocking client waits in read(2) on its end, the server
            # writes a byte to wake it. Two open file descriptions, one per end: the server's is
            # non-blocking and its own, so no client can ever make its write block.
            self.reply_pipe = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(self.reply_pipe[1], False)
            with contextlib.suppress(OSError):  # one page is plenty (a byte per wake-up)
                fcntl.fcntl(self.reply_pipe[1], fcntl.F_SETPIPE_SZ, mmap.PAGESIZE)
            self.reply_pipe_spare = (_spare_read_end(self.reply_pipe[0]), -1)
        except BaseException:
            self.close()
            raise

    @property
    def ctrl(self) -> ctypes.Array[ctypes.c_char]:
        assert self._ctrl is not None
        return self._ctrl.buf

    @property
    def header(self) -> ctypes.Array[ctypes.c_char]:
        """The channel's header page (where both ends keep their counters)."""
        assert self._wake is not None
        return self._wake.buf

    def stats(self) -> _layout.ChannelStats:
        """The traffic counters both ends keep in the header page, read through the kernel's
        own mapping (watching costs the watched processes nothing)."""
        return _layout.channel_stats(self.header)

    def set_limits(self, rights: frozenset[str], limits: captable.CapLimits,
                   chain: list[tuple[int, int, int]] | None = None) -> None:
        """What the receiving side enforces on this channel (captable.CapLimits, rights by name).

        chain: the capability's token buckets, (id, rate, bandwidth), its own first
        (Capability.bucket_chain); the receiver charges each, so every channel of the capability
        and of its descendants shares them. Written once, before the page is handed out."""
        bits = sum(getattr(_layout, f"RIGHT_{r.upper()}") for r in rights)
        ctrl = self.ctrl
        chain = chain or []
        if len(chain) > 1 + _layout.CTRL_CHAIN_MAX:
            raise ValueError(f"{len(chain)} token buckets do not fit a control page")
        _layout.atomic_store_u64(ctrl, _layout.CTRL_CAP_ID_OFF, chain[0][0] if chain else 0)
        for i, entry in enumerate(chain[1:]):
            off = _layout.CTRL_CHAIN_OFF + i * _layout.CTRL_CHAIN_ENTRY_SIZE
            for j, value in enumerate(entry):
                _layout.atomic_store_u64(ctrl, off + 8 * j, value)
        _layout.atomic_store_u32(ctrl, _layout.CTRL_CHAIN_LEN_OFF, max(0, len(chain) - 1))
        _layout.atomic_store_u32(ctrl, _layout.CTRL_RIGHTS_OFF, bits)
        _layout.atomic_store_u64(ctrl, _layout.CTRL_EXPIRY_OFF, int(limits.expires_at * 1e9))
        _layout.atomic_store_u64(ctrl, _layout.CTRL_MAX_MESSAGE_SIZE_OFF, limits.max_message_size)
        _layout.atomic_store_u64(ctrl, _layout.CTRL_RATE_LIMIT_OFF, limits.rate)
        _layout.atomic_store_u64(ctrl, _layout.CTRL_BANDWIDTH_OFF, limits.bandwidth)
        # The receiver clamps every call's priority with it (0: no limit of the capability's).
        _layout.atomic_store_u32(ctrl, _layout.CTRL_MAX_PRIORITY_OFF,
                                 0 if limits.max_priority is None
                                 else limits.max_priority + _layout.PRIO_CTRL_BIAS)
        # Only channels with something to enforce pay for the checks.
        enforce = limits.any or "send" not in rights
        _layout.atomic_store_u32(ctrl, _layout.CTRL_FLAGS_OFF, _layout.CTRL_F_ENFORCE if enforce else 0)

    def set_state(self, state: int) -> None:
        """Publish a state change and wake whoever waits for a reply on this channel."""
        _layout.atomic_store_u32(self.ctrl, _layout.CTRL_STATE_OFF, state)
        _layout.futex_wake(self.header, self._resp_tail)

    def drop_fds(self) -> None:
        """Both ends hold the fds now; the kernel keeps only its mappings."""
        for fd in (self.chan_fd, self.ctrl_fd, self.reply_event_fd, *self.reply_pipe,
                   *self.reply_pipe_spare):
            if fd >= 0:
                os.close(fd)
        self.chan_fd = self.ctrl_fd = self.reply_event_fd = -1
        self.reply_pipe = self.reply_pipe_spare = (-1, -1)

    def close(self) -> None:
        self.drop_fds()
        for m in (self._wake, self._ctrl):
            if m is not None:
                m.close()
        self._wake = self._ctrl = None


def _spare_read_end(fd: int) -> int:
    """The server's spare read end of a reply-sleep pipe (held, never read: its writes then never
    meet a pipe without a reader, which would raise SIGPIPE). A fresh open file description when
    /proc allows, so that nothing the server does to it touches the client's end; else a dup."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return os.dup(fd)


def _page_round(n: int) -> int:
    return (n + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE


# ---- topics (see capbus._topic_layout and _kernel/topics.py) ----------------------------------

_TOPIC_POOL_SEALS = _BASE_SEALS | F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL


def make_topic_pool(size: int) -> int:
    """A topic's sample pool: unsealed until its publisher has mapped it writable (seal_topic_pool)."""
    return _memfd("topic-pool", size)


def seal_topic_pool(fd: int, size: int) -> Mapping:
    """Seal a pool so that nobody can ever get a new writable mapping of it (the publisher's,
    made before, stays writable), and check the seals and size took: a subscriber is handed
    only a pool it cannot write. Returns the kernel's read-only view of its header page."""
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _TOPIC_POOL_SEALS)
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    if seals & _TOPIC_POOL_SEALS != _TOPIC_POOL_SEALS or os.fstat(fd).st_size != size:
        raise OSError(f"a topic pool's seals did not take ({seals:#x})")
    return Mapping(fd, _topic.PAGE, writable=False)


class TopicSubShm:
    """One subscription's memfds as the kernel keeps them: the control page (its only writer,
    sealed against everyone else) and the first page of the ring (counters, the wake word)."""

    def __init__(self, publisher: int, slots: int, slot_size: int, max_size: int, depth: int,
                 max_held: int, index: int) -> None:
        self.ctrl_fd = self.ring_fd = self.event_fd = -1
        self._ctrl: Mapping | None = None
        self._ring: Mapping | None = None
        try:
            relcap = _topic.relcap_for(depth, max_held)
            self.ctrl_fd = _memfd("topic-control", _topic.CTRL_SIZE)
            self._ctrl = Mapping(self.ctrl_fd, _topic.CTRL_SIZE)
            c = self._ctrl.buf
            for off, value in ((_topic.CTRL_PUBLISHER_OFF, publisher),
                               (_topic.CTRL_SLOT_SIZE_OFF, slot_size),
                               (_topic.CTRL_MAX_SIZE_OFF, max_size),
                               (_topic.CTRL_MAGIC_OFF, _topic.CTRL_MAGIC)):
                _layout.atomic_store_u64(c, off, value)
            for off, value in ((_topic.CTRL_SLOTS_OFF, slots), (_topic.CTRL_DEPTH_OFF, depth),
                               (_topic.CTRL_MAX_HELD_OFF, max_held),
                               (_topic.CTRL_RELCAP_OFF, relcap),
                               (_topic.CTRL_STATE_OFF, STATE_OPEN)):
                _layout.atomic_store_u32(c, off, value)
            fcntl.fcntl(self.ctrl_fd, fcntl.F_ADD_SEALS,
                        _BASE_SEALS | F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL)
            self.ring_fd = _memfd("topic-ring", _topic.ring_size(depth, relcap))
            fcntl.fcntl(self.ring_fd, fcntl.F_ADD_SEALS, _BASE_SEALS | fcntl.F_SEAL_SEAL)
            self._ring = Mapping(self.ring_fd, _topic.PAGE)
            self.event_fd = make_eventfd()
        except BaseException:
            self.close()
            raise

    @property
    def ring(self) -> ctypes.Array[ctypes.c_char]:
        assert self._ring is not None
        return self._ring.buf

    def set_state(self, state: int, reason: int) -> None:
        """Kernel-written: the subscription is over; wake a subscriber asleep on its ring."""
        if self._ctrl is None or self._ring is None:
            return
        _layout.atomic_store_u32(self._ctrl.buf, _topic.CTRL_REASON_OFF, reason)
        _layout.atomic_store_u32(self._ctrl.buf, _topic.CTRL_STATE_OFF, state)
        ring = self._ring.buf
        # Any change of the wake word wakes it (the publisher bumps it too: a lost increment
        # costs nothing, the subscriber re-reads the control page whenever it wakes).
        woke = struct.unpack_from("<I", ring, _topic.R_WAKE_OFF)[0]
        _layout.atomic_store_u32(ring, _topic.R_WAKE_OFF, (woke + 1) & 0xFFFFFFFF)
        _layout.futex_wake(ring, _topic.R_WAKE_OFF)
        _layout.futex_wake(ring, _topic.R_PUB_WAKE_OFF)

    def stats(self) -> dict[str, int]:
        """The ring's counters (untrusted numbers: both ends write them)."""
        if self._ring is None:
            return {"delivered": 0, "taken": 0, "dropped": 0}
        raw = self._ring.buf

        def u64(off: int) -> int:
            return int(struct.unpack_from("<Q", raw, off)[0])

        return {"delivered": u64(_topic.R_DELIVERED_OFF), "taken": u64(_topic.R_TAKEN_OFF),
                "dropped": u64(_topic.R_DROPPED_OFF)}

    def drop_fds(self) -> None:
        for fd in (self.ctrl_fd, self.ring_fd, self.event_fd):
            if fd >= 0:
                os.close(fd)
        self.ctrl_fd = self.ring_fd = self.event_fd = -1

    def close(self) -> None:
        self.drop_fds()
        for m in (self._ctrl, self._ring):
            if m is not None:
                m.close()
        self._ctrl = self._ring = None
