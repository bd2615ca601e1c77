"""The shared-memory layout of a topic, as the kernel (which creates and sizes the memfds) and
the runtime (publisher and subscribers, which read and write them) both use it.

Three kinds of memfd per topic, all created by the kernel (_kernel/topics.py):
  * the sample pool, one per topic: a header page (the publisher's counters) and `slots`
    slots of `slot_size` bytes. Only the publisher maps it writable, before the kernel seals it
    with F_SEAL_FUTURE_WRITE: subscribers can only map it read-only, whatever they try.
  * the control page, one per subscription: written by the kernel only (sealed like the pool):
    the subscription's state (open, closed, revoked, publisher dead), the kernel-verified
    publisher id, and the geometry both ends must agree on.
  * the subscription ring, one per subscription, mapped read-write by both ends (sealed against
    shrink and grow): a delivery ring publisher -> subscriber of fixed 64-byte entries, a
    release ring subscriber -> publisher of slot indices, and the wait words. Each side checks
    every value it reads from here: the other side may be hostile.

Offsets are in bytes; every word is naturally aligned and read or written with the native
atomics (capbus._core.atomic_*), never trusted for the reader's own accounting.
"""

from __future__ import annotations

import struct

PAGE = 4096

# ---- the sample pool ----------------------------------------------------------------------
POOL_MAGIC = 0x3143_4950_4F54_4243  # "CBTOPIC1" little-endian-ish: a pool the kernel made
POOL_MAGIC_OFF = 0
POOL_PUBLISHED_OFF = 8  # u64: samples published (the publisher's counter; untrusted)
POOL_HEADER = PAGE  # slots start here
SLOT_ALIGN = 64

# ---- the control page (kernel-written, sealed) ---------------------------------------------
CTRL_SIZE = PAGE
CTRL_MAGIC = 0x3143_5254_4354_4243
CTRL_MAGIC_OFF = 0
CTRL_STATE_OFF = 8  # u32: _layout.STATE_* (open, closed, revoked, peer dead)
CTRL_REASON_OFF = 12  # u32: why it closed (REASON_*)
CTRL_PUBLISHER_OFF = 16  # u64: the publisher's kernel-verified ProcessId
CTRL_SLOTS_OFF = 24  # u32
CTRL_DEPTH_OFF = 28  # u32
CTRL_SLOT_SIZE_OFF = 32  # u64
CTRL_MAX_SIZE_OFF = 40  # u64
CTRL_MAX_HELD_OFF = 48  # u32
CTRL_RELCAP_OFF = 52  # u32

REASON_NONE = 0
REASON_CLOSED = 1  # the publisher closed the topic, or the subscriber its subscription
REASON_PEER_DEAD = 2  # the publisher's process exited
REASON_REVOKED = 3
REASON_CUT_OFF = 4  # the publisher cut this subscriber off: it held or released what it may not
REASON_KERNEL_STOPPED = 5  # the kernel stopped (both ends may live on; a reconnect publishes again)

# ---- the subscription ring (both ends write it) ---------------------------------------------
# Publisher-written words
R_HEAD_OFF = 0  # u64: delivery entries written (ring seq of the next one)
R_WAKE_OFF = 8  # u32: futex word the subscriber sleeps on; the publisher bumps it to wake it
R_PUB_WAITING_OFF = 12  # u32: 1 while the publisher waits for room (block mode)
R_REL_TAIL_OFF = 16  # u64: release entries consumed by the publisher
R_DELIVERED_OFF = 24  # u64: entries delivered (stats)
# Subscriber-written words (own cache line)
R_SLEEPING_OFF = 64  # u32: 1 = asleep on the futex, 2 = asleep in an event loop (eventfd)
R_PUB_WAKE_OFF = 68  # u32: futex word the publisher sleeps on; the subscriber bumps it
R_REL_HEAD_OFF = 72  # u64: release entries written
R_TAKEN_OFF = 80  # u64: delivery entries taken (stats)
R_DROPPED_OFF = 88  # u64: entries lost to drop-oldest (stats)
R_ENTRIES_OFF = 128

ENTRY_SIZE = 64
ENTRY = struct.Struct("<IIII4QQ")  # at entry + 8: slot, length, opcode, flags, data[4], topic seq
# An entry's state word (its first u64): ring seq * 4 + kind
ST_EMPTY = 0
ST_WRITTEN = 1
ST_TAKEN = 2
ST_BUSY = 3  # the publisher is rewriting it


def pool_size(slots: int, slot_size: int) -> int:
    return POOL_HEADER + slots * slot_size


def slot_size_for(max_size: int) -> int:
    return max(SLOT_ALIGN, (max_size + SLOT_ALIGN - 1) // SLOT_ALIGN * SLOT_ALIGN)


def relcap_for(depth: int, max_held: int) -> int:
    """Release ring entries: every reference the subscriber can hold fits at once."""
    n = 1
    while n < depth + max_held:
        n *= 2
    return n


def ring_size(depth: int, relcap: int) -> int:
    n = R_ENTRIES_OFF + depth * ENTRY_SIZE + relcap * 4
    return (n + PAGE - 1) // PAGE * PAGE


def rel_off(depth: int) -> int:
    return R_ENTRIES_OFF + depth * ENTRY_SIZE
