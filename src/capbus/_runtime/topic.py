"""Topics in a process: Publisher, Subscriber and Sample (publish/subscribe, zero copy).

A sample is written once into the publisher's pool (a memfd the kernel made and sealed, so
subscribers can only map it read-only) and every subscriber reads the same bytes. Each
subscription has a ring both ends map: the publisher puts one 64-byte entry per sample into it
(slot, length, opcode, data words, sequence number) and the subscriber claims it with a
compare-and-swap of the entry's state word, so the publisher can take back an entry nobody
claimed (drop-oldest) without waiting for anyone; the subscriber gives slots back through a
release ring. See docs/ARCHITECTURE.md, "The life of one sample".

Trust: the publisher keeps its own, private count of the slots each subscriber holds and never
trusts the ring for it: a subscriber that releases what it does not hold, or holds more than
its depth and max_held, is cut off (DropSubscriber), and nobody else notices. A subscriber
checks every entry (slot, length, sequence) and treats garbage as the publisher's fault
(CorruptChannel: it drops the topic). Views follow the export rule of zero-copy payloads: a
slot is reused only once its sample was released AND no view of it is left (SampleView).

Waiting follows the process's wait mode (spin, adaptive, block: a futex in the ring); asyncio
waits on the subscription's eventfd, which the publisher writes only when told the subscriber
sleeps in an event loop. Threads: a Publisher is guarded by one lock (publish from any thread);
a Subscriber by another. The control reader thread adds and removes subscribers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .. import _core
from .. import _topic_layout as L
from .._errors import (
    InvalidCapability,
    IpcError,
    OutOfMemory,
    PeerDied,
    ProtocolError,
    Timeout,
    WouldBlock,
)
from .._protocol import frames
from .wait import readable

if TYPE_CHECKING:
    from .session import Session

_load32 = _core.atomic_load_u32
_load64 = _core.atomic_load_u64
_store32 = _core.atomic_store_u32
_store64 = _core.atomic_store_u64
_cas64 = _core.atomic_cas_u64
_ENTRY = L.ENTRY
_U32 = struct.Struct("<I")
_SPIN_NS = 50_000  # adaptive: spin this long before sleeping (as lanes do)
_SLICE = 0.5  # a sleeper re-reads its control page at least this often
_CORRUPT_SPINS = 200_000  # an entry that stays half-written this long is garbage
_DATA_ZERO = (0, 0, 0, 0)


def _data(data: Sequence[int]) -> tuple[int, int, int, int]:
    if len(data) > 4:
        raise ValueError(f"data holds at most 4 words, got {len(data)}")
    words = tuple(int(d) for d in data) + (0,) * (4 - len(data))
    for w in words:
        if not 0 <= w < 1 << 64:
            raise ValueError(f"data words are u64, got {w}")
    return words  # type: ignore[return-value]


def _corrupt(reason: str) -> _core.CorruptChannel:
    exc = _core.CorruptChannel(f"the topic's publisher wrote garbage: {reason}; the "
                               "subscription is dropped (subscribe again to retry)")
    exc.index = 0
    exc.reason = reason
    return exc


class _Port:
    """The publisher's side of one subscription: the ring, and its PRIVATE accounting."""

    __slots__ = ("index", "process_id", "depth", "ring", "event_fd", "head", "placed", "refs",
                 "nrefs", "relcap", "rel_off", "rel_tail", "bound")

    def __init__(self, index: int, process_id: int, depth: int, max_held: int, ring_fd: int,
                 event_fd: int) -> None:
        self.index, self.process_id, self.depth = index, process_id, depth
        self.relcap = L.relcap_for(depth, max_held)
        self.rel_off = L.rel_off(depth)
        size = L.ring_size(depth, self.relcap)
        if os.fstat(ring_fd).st_size != size:
            raise ProtocolError(f"a subscription ring of {os.fstat(ring_fd).st_size} bytes, "
                                f"expected {size}")
        self.ring = mmap.mmap(ring_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.event_fd = event_fd
        self.head = 0  # entries written (the next ring seq)
        self.placed = [-1] * depth  # slot behind each entry, as WE wrote it
        self.refs: dict[int, int] = {}  # slot -> references this subscriber holds
        self.nrefs = 0
        self.rel_tail = 0
        self.bound = depth + max_held


class Publisher:
    """The one publisher of a topic (proc.publish()). publish() copies a payload into a free
    slot; loan(n) hands a slot to write in place. Every live subscriber gets every sample,
    unless it is more than its depth behind (drop-oldest: it loses its oldest, counted) or,
    with overflow="block", the publisher waits for room (WouldBlock when it may not wait)."""

    def __init__(self, session: Session, handle: int, name: str, pool_fd: int, slots: int,
                 slot_size: int, max_size: int, history: int, overflow: str,
                 max_held: int) -> None:
        self._session = session
        self._ctl = session.control
        self.handle = handle
        self.name = name
        self.max_size = max_size
        self.overflow = overflow
        self._block = overflow == "block"
        self._slots, self._slot_size, self._max_held = slots, slot_size, max_held
        self._history_n = history
        size = L.pool_size(slots, slot_size)
        if os.fstat(pool_fd).st_size != size:
            raise ProtocolError("a topic pool whose size is not the one the kernel announced")
        self._pool = mmap.mmap(pool_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        _store64(self._pool, L.POOL_MAGIC_OFF, L.POOL_MAGIC)
        self._lock = threading.Lock()
        self._refs = [0] * slots  # every reference to each slot (history, loans, subscribers)
        self._free: collections.deque[int] = collections.deque(range(slots))
        self._freed: collections.deque[int] = collections.deque()  # loan views gone (any thread)
        self._history: collections.deque[tuple[int, int, int, tuple[int, int, int, int], int]] = (
            collections.deque())
        self._ports: dict[int, _Port] = {}
        self._port_list: list[_Port] = []
        self._loans = 0
        self._seq = 0  # samples published
        self._closed: IpcError | None = None
        self.published = 0
        self.cut_off = 0  # subscribers cut off for holding or releasing what they may not

    # ---- public -----------------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"<capbus.Publisher {self.name!r} subscribers={len(self._ports)}>"

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def subscribers(self) -> int:
        """Live subscribers right now."""
        return len(self._ports)

    def publish(self, opcode: int = 0, data: Sequence[int] = (), payload: Any = b"",
                timeout: float | None = 0) -> int:
        """Copy `payload` (bytes-like, at most max_size) into a slot and deliver it to every
        subscriber; returns its sequence number. With overflow="block", a subscriber without
        room makes it wait up to `timeout` seconds (None: forever) and then WouldBlock."""
        words = _data(data) if data else _DATA_ZERO
        mv = memoryview(payload).cast("B") if not isinstance(payload, bytes) else payload
        n = len(mv)
        if n > self.max_size:
            raise ValueError(f"a payload of {n} bytes exceeds the topic's max_size "
                             f"{self.max_size}")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._check()
            self._room(deadline)
            slot = self._alloc()
            off = L.POOL_HEADER + slot * self._slot_size
            if n:
                self._pool[off:off + n] = mv
            self._refs[slot] += 1  # ours while delivering
            seq = self._deliver(slot, n, opcode, words)
            self._unref(slot)
            return seq

    def loan(self, n: int) -> Loan:
        """A slot of n bytes to write in place: `with pub.loan(n) as s: s.buffer[:] = ...;
        s.publish()`. Leaving the block without publish() gives the slot back."""
        if not 0 <= n <= self.max_size:
            raise ValueError(f"a loan of {n} bytes: the topic's max_size is {self.max_size}")
        with self._lock:
            self._check()
            self._drain_freed()
            if self._loans >= _LOANS:
                raise WouldBlock(f"{_LOANS} loans of topic {self.name!r} are still out (or views "
                                 "of them alive): publish or drop them first")
            slot = self._alloc()
            self._refs[slot] += 1
            self._loans += 1
        view = _core.SampleView(self._pool, L.POOL_HEADER + slot * self._slot_size, n, False,
                                self._freed.append, slot)
        return Loan(self, view, slot, n)

    def close(self) -> None:
        """Stop publishing: every subscriber sees the topic end; the name is free again."""
        with self._lock:
            if self._closed is not None:
                return
            self._closed = InvalidCapability(f"topic {self.name!r} was closed")
            ports, self._ports, self._port_list = list(self._port_list), {}, []
        for p in ports:
            self._close_port(p)
        self._session.forget_publisher(self.handle)
        if self._session.live(self._ctl):
            with contextlib.suppress(IpcError):
                self._session.request_nowait(frames.Release(self.handle), via=self._ctl)

    # ---- the data path (lock held) ------------------------------------------------------------

    def _check(self) -> None:
        if self._closed is not None:
            raise self._closed
        self._session.check()

    def _unref(self, slot: int) -> None:
        left = self._refs[slot] - 1
        self._refs[slot] = left
        if left == 0:
            self._free.append(slot)

    def _drain_freed(self) -> None:
        freed = self._freed
        while freed:
            self._unref(freed.popleft())
            self._loans -= 1

    def _alloc(self) -> int:
        self._drain_freed()
        for p in self._port_list:
            self._collect(p)
        if not self._free:
            # The pool is sized for every reference that may live at once: only a subscriber
            # over its bounds can be the cause. Cut off whoever holds the most.
            worst = max(self._port_list, key=lambda p: p.nrefs, default=None)
            if worst is None:
                raise OutOfMemory(f"topic {self.name!r}: no free slot (loans or their views "
                                  "still hold them)")
            self._cut(worst, f"holds {worst.nrefs} samples when the pool is full")
            return self._alloc()
        return self._free.popleft()

    def _collect(self, p: _Port) -> None:
        """Take back what subscriber p released (every value checked against our own count)."""
        ring = p.ring
        head = _load64(ring, L.R_REL_HEAD_OFF)
        tail = p.rel_tail
        if head == tail:
            return
        if head - tail > p.relcap or head < tail:
            self._cut(p, f"its release ring says {head} after {tail}")
            return
        refs = p.refs
        while tail != head:
            slot = _U32.unpack_from(ring, p.rel_off + (tail % p.relcap) * 4)[0]
            tail += 1
            held = refs.get(slot, 0)
            if held <= 0:
                p.rel_tail = tail
                self._cut(p, f"released slot {slot}, which it does not hold")
                return
            if held == 1:
                del refs[slot]
            else:
                refs[slot] = held - 1
            p.nrefs -= 1
            self._unref(slot)
        p.rel_tail = tail
        _store64(ring, L.R_REL_TAIL_OFF, tail)

    def _room(self, deadline: float | None) -> None:
        """Block mode: wait until every subscriber's next entry is free (claimed)."""
        if not self._block:
            return
        while True:
            full = None
            for p in self._port_list:
                if p.head >= p.depth:
                    s = p.head - p.depth
                    state = _load64(p.ring, L.R_ENTRIES_OFF + (s % p.depth) * L.ENTRY_SIZE)
                    if state == s * 4 + L.ST_WRITTEN:
                        full = p
                        break
            if full is None:
                return
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise WouldBlock(f"topic {self.name!r}: subscriber {full.process_id} has "
                                 f"{full.depth} samples it has not received (overflow='block')")
            ring = full.ring
            w = _load32(ring, L.R_PUB_WAKE_OFF)
            _store32(ring, L.R_PUB_WAITING_OFF, 1)
            state = _load64(ring, L.R_ENTRIES_OFF + ((full.head - full.depth) % full.depth)
                            * L.ENTRY_SIZE)
            if state == (full.head - full.depth) * 4 + L.ST_WRITTEN:
                self._lock.release()  # subscribers may join or leave meanwhile
                try:
                    _core.futex_wait(ring, L.R_PUB_WAKE_OFF, w,
                                     _SLICE if left is None else min(left, _SLICE))
                finally:
                    self._lock.acquire()
            if self._ports.get(full.index) is full:  # else it left: its ring is unmapped
                _store32(ring, L.R_PUB_WAITING_OFF, 0)
            self._check()

    def _deliver(self, slot: int, n: int, opcode: int, words: tuple[int, int, int, int]) -> int:
        self._seq += 1
        seq = self._seq
        for p in list(self._port_list):
            self._place(p, slot, n, opcode, words, seq)
        if self._history_n:
            self._refs[slot] += 1
            self._history.append((slot, n, opcode, words, seq))
            if len(self._history) > self._history_n:
                self._unref(self._history.popleft()[0])
        self.published = seq
        _store64(self._pool, L.POOL_PUBLISHED_OFF, seq)
        return seq

    def _place(self, p: _Port, slot: int, n: int, opcode: int,
               words: tuple[int, int, int, int], seq: int) -> None:
        ring = p.ring
        s = p.head
        i = s % p.depth
        off = L.R_ENTRIES_OFF + i * L.ENTRY_SIZE
        old_slot = p.placed[i]
        if old_slot >= 0:
            # Never claimed: take the reference back ourselves (the subscriber counts the gap).
            # Claimed (or scribbled on): the subscriber holds it until it releases it.
            if _cas64(ring, off, (s - p.depth) * 4 + L.ST_WRITTEN, s * 4 + L.ST_BUSY):
                held = p.refs.get(old_slot, 0)
                if held <= 0:
                    self._cut(p, f"released slot {old_slot} before it claimed it")
                    return
                if held == 1:
                    del p.refs[old_slot]
                else:
                    p.refs[old_slot] = held - 1
                p.nrefs -= 1
                self._unref(old_slot)
            else:
                _store64(ring, off, s * 4 + L.ST_BUSY)
        if p.nrefs >= p.bound:
            self._cut(p, f"holds {p.nrefs} samples (its depth {p.depth} plus max_held "
                         f"{p.bound - p.depth})")
            return
        _ENTRY.pack_into(ring, off + 8, slot, n, opcode, 0, *words, seq)
        _store64(ring, off, s * 4 + L.ST_WRITTEN)
        p.placed[i] = slot
        p.refs[slot] = p.refs.get(slot, 0) + 1
        p.nrefs += 1
        self._refs[slot] += 1
        p.head = s + 1
        _store64(ring, L.R_HEAD_OFF, s + 1)
        _store64(ring, L.R_DELIVERED_OFF, s + 1)
        sleeping = _load32(ring, L.R_SLEEPING_OFF)
        if sleeping:
            _store32(ring, L.R_WAKE_OFF, (_load32(ring, L.R_WAKE_OFF) + 1) & 0xFFFFFFFF)
            _core.futex_wake(ring, L.R_WAKE_OFF)
            if sleeping == 2:
                with contextlib.suppress(OSError):
                    os.eventfd_write(p.event_fd, 1)

    def _cut(self, p: _Port, why: str) -> None:
        """Subscriber p broke the rules: it loses its subscription, and only it."""
        if self._ports.pop(p.index, None) is None:
            return
        self._port_list = list(self._ports.values())
        self.cut_off += 1
        self._release_port(p)
        if self._session.live(self._ctl):
            with contextlib.suppress(IpcError):
                self._session.request_nowait(
                    frames.DropSubscriber(self.handle, p.index, why[:200]), via=self._ctl)

    def _release_port(self, p: _Port) -> None:
        for slot, held in p.refs.items():
            for _ in range(held):
                self._unref(slot)
        p.refs.clear()
        p.nrefs = 0
        self._close_port(p)

    @staticmethod
    def _close_port(p: _Port) -> None:
        with contextlib.suppress(OSError):
            os.close(p.event_fd)
        p.event_fd = -1
        with contextlib.suppress(BufferError):
            p.ring.close()

    # ---- the control thread -----------------------------------------------------------------

    def _joined(self, msg: frames.SubscriberJoined, fds: list[int]) -> None:
        ring_fd, event_fd = fds
        try:
            p = _Port(msg.index, msg.process_id, msg.depth, self._max_held, ring_fd, event_fd)
        except (OSError, ProtocolError, ValueError):
            os.close(event_fd)
            return
        finally:
            os.close(ring_fd)
        with self._lock:
            if self._closed is not None:
                self._close_port(p)
                return
            old = self._ports.pop(msg.index, None)
            if old is not None:
                self._release_port(old)
            self._ports[msg.index] = p
            self._port_list = list(self._ports.values())
            for slot, n, opcode, words, seq in list(self._history)[-p.depth:]:
                self._place(p, slot, n, opcode, words, seq)

    def _left(self, index: int) -> None:
        with self._lock:
            p = self._ports.pop(index, None)
            if p is not None:
                self._port_list = list(self._ports.values())
                self._release_port(p)

    def _lost(self, why: IpcError) -> None:
        with self._lock:
            if self._closed is None:
                self._closed = why


_LOANS = 4  # as the kernel sizes the pool (topics.LOANS)


class Loan:
    """A publisher's slot to write in place (Publisher.loan)."""

    __slots__ = ("_pub", "_view", "_slot", "_n", "buffer", "_done", "opcode", "data")

    def __init__(self, pub: Publisher, view: _core.SampleView, slot: int, n: int) -> None:
        self._pub, self._view, self._slot, self._n = pub, view, slot, n
        self.buffer: memoryview | None = memoryview(view)
        self._done = False
        self.opcode = 0
        self.data: Sequence[int] = ()

    def __enter__(self) -> Loan:
        return self

    def __exit__(self, *exc: object) -> None:
        self._finish()

    def publish(self, opcode: int | None = None, data: Sequence[int] | None = None,
                timeout: float | None = 0) -> int:
        """Deliver what was written (once); returns its sequence number."""
        if self._done:
            raise InvalidCapability("this loan was published or given back already")
        pub = self._pub
        words = _data(self.data if data is None else data)
        op = self.opcode if opcode is None else opcode
        deadline = None if timeout is None else time.monotonic() + timeout
        with pub._lock:
            pub._check()
            pub._room(deadline)
            seq = pub._deliver(self._slot, self._n, op, words)
        self._finish()
        return seq

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self.buffer = None
            self._view.done()  # the loan's reference goes when its last view does


class Sample:
    """One received sample: .payload (a read-only view of the publisher's memory, no copy),
    .opcode, .data, .publisher (the kernel-verified ProcessId), .seq (the publisher's
    sequence number) and .dropped (samples this subscriber lost just before it). release() (or
    the end of a with block, or garbage collection) gives it back; views of the payload stay
    valid after that, and the slot is reused only once the last of them is gone."""

    __slots__ = ("_view", "_mv", "opcode", "data", "publisher", "seq", "dropped", "_sub")

    def __init__(self, sub: Subscriber, view: _core.SampleView, opcode: int,
                 data: tuple[int, int, int, int], publisher: int, seq: int, dropped: int) -> None:
        self._sub = sub
        self._view: _core.SampleView | None = view
        self._mv: memoryview | None = None
        self.opcode, self.data, self.publisher, self.seq, self.dropped = (
            opcode, data, publisher, seq, dropped)

    def __repr__(self) -> str:
        return (f"<capbus.Sample seq={self.seq} opcode={self.opcode} from {self.publisher} "
                f"dropped={self.dropped}>")

    @property
    def payload(self) -> memoryview:
        if self._mv is None:
            if self._view is None:
                raise InvalidCapability("this sample was released (keep a view of its payload "
                                        "from before, or a copy)")
            self._mv = memoryview(self._view)
        return self._mv

    def release(self) -> None:
        view, self._view = self._view, None
        self._mv = None
        if view is not None:
            view.done()
            self._sub._flush_releases()

    def __enter__(self) -> Sample:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Subscriber:
    """A subscription to a topic (proc.subscribe()): recv(), poll(), arecv(), async for."""

    def __init__(self, session: Session, msg: frames.TopicSubscribed, name: str,
                 fds: list[int]) -> None:
        pool_fd, ctrl_fd, ring_fd, event_fd = fds
        self._session = session
        self._ctl = session.control
        self.handle = msg.handle
        self.name = name
        self._event_fd = event_fd
        try:
            self._ctrl = mmap.mmap(ctrl_fd, L.CTRL_SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
            c = self._ctrl
            if _load64(c, L.CTRL_MAGIC_OFF) != L.CTRL_MAGIC:
                raise ProtocolError("a topic control page without the kernel's magic")
            # The geometry from the kernel's sealed page, not from anything the publisher wrote
            self.publisher = _load64(c, L.CTRL_PUBLISHER_OFF)
            self._slots = _load32(c, L.CTRL_SLOTS_OFF)
            self.depth = _load32(c, L.CTRL_DEPTH_OFF)
            self._slot_size = _load64(c, L.CTRL_SLOT_SIZE_OFF)
            self.max_size = _load64(c, L.CTRL_MAX_SIZE_OFF)
            self.max_held = _load32(c, L.CTRL_MAX_HELD_OFF)
            self._relcap = _load32(c, L.CTRL_RELCAP_OFF)
            self._rel_off = L.rel_off(self.depth)
            pool_size = L.pool_size(self._slots, self._slot_size)
            if os.fstat(pool_fd).st_size != pool_size:
                raise ProtocolError("a topic pool whose size is not the kernel's")
            self._pool = mmap.mmap(pool_fd, pool_size, mmap.MAP_SHARED, mmap.PROT_READ)
            self._ring = mmap.mmap(ring_fd, L.ring_size(self.depth, self._relcap),
                                   mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(event_fd)
            raise
        finally:
            for fd in (pool_fd, ctrl_fd, ring_fd):
                os.close(fd)
        self._lock = threading.Lock()
        self._freed: collections.deque[int] = collections.deque()  # views gone (any thread)
        self._next = 0  # ring seq of the next entry to claim
        self._head_seen = 0
        self._last_seq = 0
        self._held = 0
        self._rel_head = 0
        self._taken = 0
        self.dropped = 0  # samples lost to drop-oldest, in all
        self._gap = 0  # lost since the last sample handed out
        self._closed: IpcError | None = None
        self._death_callbacks: list[Callable[[Subscriber], None]] = []
        self._dead = False
        mode = session.wait_mode
        self._spin_ns = {"spin": -1, "adaptive": _SPIN_NS, "block": 0}[mode]

    def __repr__(self) -> str:
        return f"<capbus.Subscriber {self.name!r} from {self.publisher} depth={self.depth}>"

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Subscriber:
        return self

    def __next__(self) -> Sample:
        try:
            return self.recv()
        except (PeerDied, InvalidCapability):
            raise StopIteration from None

    def __aiter__(self) -> Subscriber:
        return self

    async def __anext__(self) -> Sample:
        try:
            return await self.arecv()
        except (PeerDied, InvalidCapability):
            raise StopAsyncIteration from None

    def on_death(self, callback: Callable[[Subscriber], None]) -> None:
        """callback(self) once the publisher's process has exited (at once if it has)."""
        if self._dead:
            callback(self)
        else:
            self._death_callbacks.append(callback)

    def poll(self) -> Sample | None:
        """The next sample, or None; raises once the topic is gone and nothing is left."""
        with self._lock:
            sample = self._take()
            if sample is None:
                self._raise_if_over()
            return sample

    def recv(self, timeout: float | None = None) -> Sample:
        """The next sample, waiting up to `timeout` seconds (None: forever): Timeout,
        PeerDied (the publisher exited or closed the topic), CorruptChannel (its garbage)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        spin_until = time.monotonic_ns() + self._spin_ns if self._spin_ns > 0 else 0
        while True:
            sample = self.poll()
            if sample is not None:
                return sample
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise Timeout(f"no sample on topic {self.name!r} within {timeout} s")
            if self._spin_ns < 0 or time.monotonic_ns() < spin_until:
                continue
            self._sleep(1, left)

    async def arecv(self, timeout: float | None = None) -> Sample:
        """recv() for asyncio: the event loop watches the subscription's eventfd."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            sample = self.poll()
            if sample is not None:
                return sample
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise Timeout(f"no sample on topic {self.name!r} within {timeout} s")
            ring = self._ring
            _store32(ring, L.R_SLEEPING_OFF, 2)
            try:
                if _load64(ring, L.R_HEAD_OFF) != self._next or self._closed is not None:
                    continue
                await readable(loop, self._event_fd, left)
            finally:
                _store32(ring, L.R_SLEEPING_OFF, 0)

    def close(self) -> None:
        """End the subscription: the publisher frees what it held (views stay valid)."""
        with self._lock:
            if self._closed is not None and isinstance(self._closed, InvalidCapability):
                return
            was_open = self._closed is None
            self._closed = InvalidCapability(f"the subscription to {self.name!r} was closed")
        self._session.forget_subscriber(self.handle)
        if was_open and self._session.live(self._ctl):
            with contextlib.suppress(IpcError):
                self._session.request_nowait(frames.Release(self.handle), via=self._ctl)
        with contextlib.suppress(OSError):
            os.close(self._event_fd)
        self._event_fd = -1

    # ---- internals (lock held where noted) ----------------------------------------------------

    def _sleep(self, mode: int, left: float | None) -> None:
        ring = self._ring
        w = _load32(ring, L.R_WAKE_OFF)
        _store32(ring, L.R_SLEEPING_OFF, mode)
        try:
            # Dekker: the flag is visible before we look again; the publisher stores the head
            # before it looks at the flag. So one of us sees the other.
            if _load64(ring, L.R_HEAD_OFF) != self._next or self._closed is not None:
                return
            if _load32(self._ctrl, L.CTRL_STATE_OFF) != _core.STATE_OPEN:
                return
            _core.futex_wait(ring, L.R_WAKE_OFF, w, _SLICE if left is None else min(left, _SLICE))
        finally:
            _store32(ring, L.R_SLEEPING_OFF, 0)

    def _raise_if_over(self) -> None:
        """Lock held; nothing left to take."""
        if self._closed is not None:
            raise self._closed
        state = _load32(self._ctrl, L.CTRL_STATE_OFF)
        if state != _core.STATE_OPEN:
            self._closed = self._over_error(state, _load32(self._ctrl, L.CTRL_REASON_OFF))
            raise self._closed

    def _over_error(self, state: int, reason: int) -> IpcError:
        if reason == L.REASON_PEER_DEAD or state == _core.STATE_PEER_DEAD:
            return PeerDied(f"the publisher of topic {self.name!r} (process {self.publisher}) "
                            "exited")
        if reason == L.REASON_REVOKED:
            return InvalidCapability(f"the subscription to {self.name!r} was revoked")
        if reason == L.REASON_CUT_OFF:
            return ProtocolError(f"the publisher of {self.name!r} cut this subscription off: it "
                                 "held more samples than its depth and max_held, or released "
                                 "one it did not hold")
        return PeerDied(f"the publisher closed topic {self.name!r}")

    def _take(self) -> Sample | None:
        """Lock held: claim the next entry, checking all the publisher wrote."""
        self._flush_locked()
        if self._closed is not None and not isinstance(self._closed, PeerDied):
            return None
        ring = self._ring
        depth = self.depth
        spins = 0
        while True:
            head = _load64(ring, L.R_HEAD_OFF)
            if head < self._head_seen:
                self._drop_topic(f"the ring's head went back from {self._head_seen} to {head}")
            self._head_seen = head
            nxt = self._next
            if nxt >= head:
                return None
            if head - nxt > depth:  # lapped: the oldest are gone
                lost = head - depth - nxt
                self._gap += lost
                self.dropped += lost
                nxt = self._next = head - depth
            off = L.R_ENTRIES_OFF + (nxt % depth) * L.ENTRY_SIZE
            state = _load64(ring, off)
            if state == nxt * 4 + L.ST_WRITTEN:
                fields = _ENTRY.unpack_from(ring, off + 8)
                if _cas64(ring, off, state, nxt * 4 + L.ST_TAKEN):
                    self._next = nxt + 1
                    return self._sample(fields)
                continue  # the publisher took it back just now: we were lapped
            if state >> 2 < nxt:
                self._drop_topic(f"entry {nxt} is not written though the head is {head}")
            spins += 1  # the publisher is rewriting it (it lapped us): look at the head again
            if spins > _CORRUPT_SPINS:
                self._drop_topic(f"entry {nxt} stayed half-written")

    def _sample(self, fields: tuple[int, ...]) -> Sample:
        slot, n, opcode, _flags, d0, d1, d2, d3, seq = fields
        if slot >= self._slots:
            self._drop_topic(f"slot {slot} of a pool of {self._slots}")
        if n > self.max_size:
            self._drop_topic(f"a sample of {n} bytes, max_size is {self.max_size}")
        if seq <= self._last_seq:
            self._drop_topic(f"sequence {seq} after {self._last_seq}")
        self._last_seq = seq
        if self._held >= self.max_held:
            # Cannot happen: the caller checked. Kept as the bound the publisher also counts.
            raise OutOfMemory("holding max_held samples")
        self._held += 1
        self._taken += 1
        ring = self._ring
        _store64(ring, L.R_TAKEN_OFF, self._taken)
        if self._gap:
            _store64(ring, L.R_DROPPED_OFF, self.dropped)
        if _load32(ring, L.R_PUB_WAITING_OFF):
            _store32(ring, L.R_PUB_WAKE_OFF, (_load32(ring, L.R_PUB_WAKE_OFF) + 1) & 0xFFFFFFFF)
            _core.futex_wake(ring, L.R_PUB_WAKE_OFF)
        view = _core.SampleView(self._pool, L.POOL_HEADER + slot * self._slot_size, n, True,
                                self._freed.append, slot)
        gap, self._gap = self._gap, 0
        return Sample(self, view, opcode, (d0, d1, d2, d3), self.publisher, seq, gap)

    def _drop_topic(self, reason: str) -> None:
        """The publisher's garbage: drop the subscription, tell the kernel, raise."""
        exc = _corrupt(reason)
        self._closed = exc
        if self._session.live(self._ctl):
            with contextlib.suppress(IpcError):
                self._session.request_nowait(frames.Release(self.handle), via=self._ctl)
        raise exc

    def _flush_releases(self) -> None:
        if self._freed:
            with self._lock:
                self._push_releases()

    def _flush_locked(self) -> None:
        """Lock held: hand the slots whose last view went back to the publisher."""
        freed = self._freed
        if not freed:
            if self._held >= self.max_held:
                raise OutOfMemory(f"this subscriber holds {self._held} samples of "
                                  f"{self.name!r} (max_held): release some before receiving more")
            return
        self._push_releases()

    def _push_releases(self) -> None:
        freed = self._freed
        ring = self._ring
        relcap = self._relcap
        head = self._rel_head
        while freed:
            slot = freed.popleft()
            self._held -= 1
            if self._closed is not None and not isinstance(self._closed, PeerDied):
                continue
            tail = _load64(ring, L.R_REL_TAIL_OFF)
            if tail > head or head - tail >= relcap:
                # The publisher has not taken back what we released, which it always does
                # before it delivers: this subscription cannot go on.
                self._drop_topic(f"its release ring is stuck ({tail} of {head})")
            _U32.pack_into(ring, self._rel_off + (head % relcap) * 4, slot)
            head += 1
            _store64(ring, L.R_REL_HEAD_OFF, head)
        self._rel_head = head
        if _load32(ring, L.R_PUB_WAITING_OFF):
            _store32(ring, L.R_PUB_WAKE_OFF, (_load32(ring, L.R_PUB_WAKE_OFF) + 1) & 0xFFFFFFFF)
            _core.futex_wake(ring, L.R_PUB_WAKE_OFF)

    # ---- the control thread -----------------------------------------------------------------

    def _ended(self, reason: int) -> None:
        """The kernel said the subscription is over (TopicClosed)."""
        ring = self._ring
        with contextlib.suppress(ValueError, TypeError):
            _store32(ring, L.R_WAKE_OFF, (_load32(ring, L.R_WAKE_OFF) + 1) & 0xFFFFFFFF)
            _core.futex_wake(ring, L.R_WAKE_OFF)
        if self._event_fd >= 0:
            with contextlib.suppress(OSError):
                os.eventfd_write(self._event_fd, 1)
        if reason == L.REASON_PEER_DEAD and not self._dead:
            self._dead = True
            callbacks, self._death_callbacks = self._death_callbacks, []
            for cb in callbacks:
                try:
                    cb(self)
                except Exception:  # a callback's bug must not stop the control thread
                    import logging

                    logging.getLogger("capbus").exception("topic on_death callback failed")
