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
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from .. import _core
from .. import _topic_layout as L
from .._errors import (
    InvalidCapability,
    IpcError,
    KernelUnavailable,
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
_SPIN_NS = 50_000  # adaptive: spin this long before sleeping (as lanes do)
_SLICE = 0.5  # a sleeper re-reads its control page at least this often
_DATA_ZERO = (0, 0, 0, 0)
_T = TypeVar("_T")


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


class TopicCapability:
    """A topic capability to hand on (Publisher.restrict, or one that came with a message:
    Request.topics): its holder may subscribe through it (proc.subscribe(cap)) whatever the
    topic's allowlist says, and pass it on if it has the share right. Revoking it (or the
    publisher's topic) ends the subscriptions made through it."""

    def __init__(self, session: Session, granted: frames.Granted, received: bool = False) -> None:
        self._session = session
        self._ctl = session.control
        self.handle = granted.handle
        self.name = granted.name
        self.publisher = granted.process_id  # the topic's publisher, as the kernel says
        self.rights = frozenset(granted.rights or ())
        self._finalizer: weakref.finalize[Any, Any] | None = None
        if received:  # pushed by a sender: back to the kernel once nobody refers to it
            self._finalizer = weakref.finalize(self, _release_handle, session, self._ctl,
                                               self.handle)
            self._finalizer.atexit = False

    def __repr__(self) -> str:
        return f"<capbus.TopicCapability {self.name!r} rights={sorted(self.rights)}>"

    def restrict(self, rights: Sequence[str] = ("subscribe",)) -> TopicCapability:
        """A child with fewer rights (subscribe, share)."""
        reply = self._session.request(frames.Restrict(self.handle, sorted(rights), {}),
                                      via=self._ctl)
        assert isinstance(reply, frames.Granted)
        return TopicCapability(self._session, reply)

    def revoke(self) -> None:
        """This capability and all derived from it (and the subscriptions made through them)
        end, in every process."""
        if self._finalizer is not None:
            self._finalizer.detach()
        self._session.request(frames.Revoke(self.handle), via=self._ctl)

    def close(self) -> None:
        """Give it back (subscriptions made through it live on)."""
        if self._finalizer is not None:
            self._finalizer.detach()
        _release_handle(self._session, self._ctl, self.handle)


def _release_handle(session: Session, ctl: Any, handle: int) -> None:
    if session.live(ctl):
        with contextlib.suppress(IpcError):
            ctl.request_nowait(frames.Release(handle))


class _Port:
    """The publisher's side of one subscription as Python keeps it: the ring's mapping (for
    waiting on it in block mode) and its eventfd. The accounting is the native TopicPub's."""

    __slots__ = ("index", "process_id", "depth", "ring", "event_fd")

    def __init__(self, index: int, process_id: int, depth: int, max_held: int, ring_fd: int,
                 event_fd: int) -> None:
        self.index, self.process_id, self.depth = index, process_id, depth
        size = L.ring_size(depth, L.relcap_for(depth, max_held))
        if os.fstat(ring_fd).st_size != size:
            raise ProtocolError(f"a subscription ring of {os.fstat(ring_fd).st_size} bytes, "
                                f"expected {size}")
        self.ring = mmap.mmap(ring_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.event_fd = event_fd


class Publisher:
    """The one publisher of a topic (proc.publish()). publish() copies a payload into a free
    slot; loan(n) hands a slot to write in place. Every live subscriber gets every sample,
    unless it is more than its depth behind (drop-oldest: it loses its oldest, counted) or,
    with overflow="block", the publisher waits for room (WouldBlock when it may not wait).

    The data path is the native TopicPub (_native/topic_pub.c): slots, the private count of
    what each subscriber holds, delivery and take-back; this class adds the lock, waiting,
    the kernel's events and telling the kernel whom it cut off."""

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
        self._slot_size, self._max_held, self._history = slot_size, max_held, history
        self._pool, self._core = self._map_pool(pool_fd, slots, slot_size)
        self._frame: frames.PublishTopic | None = None  # what made it (Process.publish sets it)
        self._gen = 0  # a reconnect's new pool: loans from before it are void
        self._lock = threading.Lock()
        self._freed: collections.deque[int] = collections.deque()  # loan views gone (any thread)
        self._ports: dict[int, _Port] = {}
        self._loans = 0
        self._closed: IpcError | None = None
        self.cut_off = 0  # subscribers cut off for holding or releasing what they may not

    def _map_pool(self, pool_fd: int, slots: int, slot_size: int) -> tuple[mmap.mmap, Any]:
        size = L.pool_size(slots, slot_size)
        if os.fstat(pool_fd).st_size != size:
            raise ProtocolError("a topic pool whose size is not the one the kernel announced")
        pool = mmap.mmap(pool_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        _store64(pool, L.POOL_MAGIC_OFF, L.POOL_MAGIC)
        return pool, _core.TopicPub(pool, slots, slot_size, self._history, self._max_held,
                                    self._block, self.max_size)

    # ---- public -----------------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"<capbus.Publisher {self.name!r} subscribers={len(self._ports)}>"

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    @property
    def subscribers(self) -> int:
        """Live subscribers right now."""
        return len(self._ports)

    @property
    def published(self) -> int:
        """Samples published so far (the last sequence number)."""
        return int(self._core.seq)

    def publish(self, opcode: int = 0, data: Sequence[int] = (), payload: Any = b"",
                timeout: float | None = 0) -> int:
        """Copy `payload` (bytes-like, at most max_size) into a slot and deliver it to every
        subscriber; returns its sequence number. With overflow="block", a subscriber without
        room makes it wait up to `timeout` seconds (None: forever) and then WouldBlock."""
        with self._lock:  # a forked child: the native publish raises KernelUnavailable
            if self._closed is not None:
                raise self._closed
            if self._freed:
                self._drain_freed()
            # The native publish checks the size (max_size) and, in block mode, the room
            seq = self._core.publish(payload, opcode, data)
            if type(seq) is not int:
                seq = self._publish_slow(seq, opcode, data, payload, timeout)
            if self._core.cuts:
                self._handle_cuts()
            return seq

    def _publish_slow(self, seq: int | bool | None, opcode: int, data: Sequence[int], payload: Any,
                      timeout: float | None) -> int:
        """Lock held: no room (block mode: wait, then again) or no free slot."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while seq is False:
            self._room(deadline)
            seq = self._core.publish(payload, opcode, data)
        if seq is None:
            if self._core.cuts:
                self._handle_cuts()
            raise OutOfMemory(f"topic {self.name!r}: no free slot (loans, or views of them, "
                              "hold them)")
        return int(seq)

    def publish_many(self, items: Sequence[tuple[int, Sequence[int], Any]],
                     timeout: float | None = 0) -> int:
        """publish() for a batch: `items` are (opcode, data, payload) tuples, copied and
        delivered in one native call, with at most one wake-up per subscriber per batch (a
        subscriber that sleeps sees the whole batch at once). Returns the last sequence number.
        With overflow="block", it waits (up to `timeout` in all, None: forever) wherever a
        subscriber has no room, then WouldBlock; the items before that point (and before a bad
        item's ValueError) are published: the error says how many."""
        batch = items if type(items) is list else list(items)
        done = 0
        deadline: float | None = None
        with self._lock:  # a forked child: the native publish_many raises KernelUnavailable
            if self._closed is not None:
                raise self._closed
            while True:
                if self._freed:
                    self._drain_freed()
                count, seq, full = self._core.publish_many(batch, done, self._block,
                                                           self.max_size)
                if self._core.cuts:
                    self._handle_cuts()
                done += count
                if done >= len(batch):
                    return int(seq)
                if not full:
                    raise OutOfMemory(f"topic {self.name!r}: no free slot after {done} of "
                                      f"{len(batch)} samples (loans, or views of them, hold them)")
                if deadline is None and timeout is not None:
                    deadline = time.monotonic() + timeout
                try:
                    self._room(deadline)
                except WouldBlock as exc:
                    raise WouldBlock(f"{exc} ({done} of {len(batch)} samples published)") from None

    def loan(self, n: int) -> TopicLoan:
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
            slot = self._core.alloc()
            if self._core.cuts:
                self._handle_cuts()
            if slot is None:
                raise OutOfMemory(f"topic {self.name!r}: no free slot")
            self._loans += 1
        view = _core.SampleView(self._pool, L.POOL_HEADER + slot * self._slot_size, n, False,
                                self._freed.append, slot)
        return TopicLoan(self, view, slot, n)

    def restrict(self, rights: Sequence[str] = ("subscribe", "share")) -> TopicCapability:
        """A topic capability to hand on (attach it to a message: `ep.call(..., caps=[cap])`):
        whoever holds it may subscribe through it, even when not on the allowlist; with share,
        pass it on. Never publish: a topic has one publisher."""
        reply = self._session.request(frames.Restrict(self.handle, sorted(rights), {}),
                                      via=self._ctl)
        assert isinstance(reply, frames.Granted)
        return TopicCapability(self._session, reply)

    def revoke(self) -> None:
        """End the topic and every capability and subscription derived from it, everywhere."""
        self._session.request(frames.Revoke(self.handle), via=self._ctl)
        self.close()

    def close(self) -> None:
        """Stop publishing: every subscriber sees the topic end; the name is free again."""
        with self._lock:
            if self._closed is not None:
                return
            self._closed = InvalidCapability(f"topic {self.name!r} was closed")
            ports, self._ports = list(self._ports.values()), {}
            for p in ports:
                self._core.remove(p.index)
                self._close_port(p)
        self._session.forget_publisher(self.handle)
        if self._session.live(self._ctl):
            with contextlib.suppress(IpcError):
                self._session.request_nowait(frames.Release(self.handle), via=self._ctl)

    # ---- under the lock -------------------------------------------------------------------------

    def _check(self) -> None:
        if self._closed is not None:
            raise self._closed
        self._session.check()

    def _drain_freed(self) -> None:
        freed = self._freed
        while freed:
            self._core.unref(freed.popleft())
            self._loans -= 1

    def _room(self, deadline: float | None) -> None:
        """Block mode: wait until every subscriber's next entry is free (claimed)."""
        while True:
            index = self._core.full()
            if index < 0:
                return
            full = self._ports[index]
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise WouldBlock(f"topic {self.name!r}: subscriber {full.process_id} has "
                                 f"{full.depth} samples it has not received (overflow='block')")
            ring = full.ring
            w = _load32(ring, L.R_PUB_WAKE_OFF)
            _store32(ring, L.R_PUB_WAITING_OFF, 1)
            if self._core.full() == index:
                self._lock.release()  # subscribers may join or leave meanwhile
                try:
                    _core.futex_wait(ring, L.R_PUB_WAKE_OFF, w,
                                     _SLICE if left is None else min(left, _SLICE))
                finally:
                    self._lock.acquire()
            if self._ports.get(index) is full:  # else it left: its ring is unmapped
                _store32(ring, L.R_PUB_WAITING_OFF, 0)
            self._check()

    def _handle_cuts(self) -> None:
        """Subscribers that broke the rules lose their subscription, and only they."""
        for index, why in self._core.take_cuts():
            self._core.remove(index)
            p = self._ports.pop(index, None)
            self.cut_off += 1
            if p is not None:
                self._close_port(p)
            if self._session.live(self._ctl):
                with contextlib.suppress(IpcError):
                    self._session.request_nowait(
                        frames.DropSubscriber(self.handle, index, why[:200]), via=self._ctl)

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
                self._close_port(old)
            self._ports[msg.index] = p
            self._core.add(msg.index, p.ring, msg.depth, p.event_fd)
            if self._core.cuts:
                self._handle_cuts()

    def _left(self, index: int) -> None:
        with self._lock:
            p = self._ports.pop(index, None)
            if p is not None:
                self._core.remove(index)
                self._close_port(p)

    def _lost(self, why: IpcError) -> None:
        with self._lock:
            if self._closed is None:
                self._closed = why

    # ---- a lost kernel and a reconnect ------------------------------------------------------

    def _kernel_lost(self) -> None:
        """The control thread, as the kernel goes: its subscriptions go with it (the
        subscribers lose that kernel too: they drain what they got, then KernelUnavailable).
        Publishing goes on, to nobody, until a reconnect publishes the name again."""
        with self._lock:
            ports, self._ports = list(self._ports.values()), {}
            for p in ports:
                self._core.remove(p.index)
                self._close_port(p)

    def _republish(self, handle: int, ctl: Any, pool_fd: int, slots: int,
                   slot_size: int) -> None:
        """A reconnect: the new kernel made a new pool for the same name. Subscribers join
        anew (as any late subscriber: the history starts over, so do sequence numbers); loans
        made before are void (their publish() raises KernelUnavailable)."""
        pool, core = self._map_pool(pool_fd, slots, slot_size)
        with self._lock:
            if self._closed is not None:
                return
            ports, self._ports = list(self._ports.values()), {}
            for p in ports:
                self._close_port(p)
            old_pool = self._pool
            self._pool, self._core, self._slot_size = pool, core, slot_size
            self.handle, self._ctl = handle, ctl
            self._freed = collections.deque()  # old loans' views append to the old one
            self._loans = 0
            self._gen += 1
        with contextlib.suppress(BufferError):  # old loans' views keep it until they go
            old_pool.close()


_LOANS = 4  # as the kernel sizes the pool (topics.LOANS)


class TopicLoan:
    """A publisher's slot to write in place (Publisher.loan)."""

    __slots__ = ("_pub", "_view", "_slot", "_n", "buffer", "_done", "opcode", "data", "_gen")

    def __init__(self, pub: Publisher, view: _core.SampleView, slot: int, n: int) -> None:
        self._pub, self._view, self._slot, self._n = pub, view, slot, n
        self._gen = pub._gen
        self.buffer: memoryview | None = memoryview(view)
        self._done = False
        self.opcode = 0
        self.data: Sequence[int] = ()

    def __enter__(self) -> TopicLoan:
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
            if self._gen != pub._gen:
                self._finish()
                raise KernelUnavailable(f"this loan of topic {pub.name!r} was made before the "
                                        "kernel was lost; the topic was published again since: "
                                        "take a new loan")
            if pub._block:
                pub._room(deadline)
                if self._gen != pub._gen:  # a reconnect while it waited
                    self._finish()
                    raise KernelUnavailable(f"this loan of topic {pub.name!r} was made before "
                                            "the kernel was lost: take a new loan")
            seq = int(pub._core.deliver(self._slot, self._n, op, words))
            if pub._core.cuts:
                pub._handle_cuts()
        self._finish()
        return seq

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self.buffer = None
            self._view.done()  # the loan's reference goes when its last view does


# One received sample: the native type (topic_sample.c), public as capbus.Sample.
Sample = _core.Sample


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
        self._core = _core.TopicSub(self._ring, self._pool, self._slots, self.depth,
                                    self._slot_size, self.max_size, self._relcap, self.max_held,
                                    self.publisher)
        self._lock = threading.Lock()
        self._closed: IpcError | None = None
        self._death_callbacks: list[Callable[[Subscriber], None]] = []
        self._dead = False
        self._kernel_gone: IpcError | None = None  # its kernel was lost: drain, then raise
        mode = session.wait_mode
        self._spin_ns = {"spin": -1, "adaptive": _SPIN_NS, "block": 0}[mode]

    def __repr__(self) -> str:
        return f"<capbus.Subscriber {self.name!r} from {self.publisher} depth={self.depth}>"

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Subscriber:
        return self

    async def __aexit__(self, *exc: object) -> None:
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

    @property
    def dropped(self) -> int:
        """Samples this subscriber lost to drop-oldest, in all."""
        return int(self._core.dropped)

    def on_death(self, callback: Callable[[Subscriber], None]) -> None:
        """callback(self) once the publisher's process has exited (at once if it has)."""
        if self._dead:
            callback(self)
        else:
            self._death_callbacks.append(callback)

    def poll(self) -> Sample | None:
        """The next sample, or None; raises once the topic is gone and nothing is left."""
        with self._lock:  # a forked child: the native take raises KernelUnavailable
            if self._closed is None:
                got = self._core.take()
                if type(got) is Sample:  # the hot path
                    return got
            sample = self._take() if self._closed is not None else self._taken(got)
            if sample is None:
                self._raise_if_over()
            return sample

    def recv(self, timeout: float | None = None) -> Sample:
        """The next sample, waiting up to `timeout` seconds (None: forever): Timeout,
        PeerDied (the publisher exited or closed the topic), CorruptChannel (its garbage)."""
        sample = self.poll()
        if sample is not None:  # the hot path: no clock read
            return sample
        return self._wait(self.poll, timeout)

    def poll_many(self, n: int = 256) -> list[Sample]:
        """Up to n samples that are there now (one native call; an empty list if none); raises
        once the topic is gone and nothing is left."""
        with self._lock:  # a forked child: the native take_many raises KernelUnavailable
            if self._closed is None:
                many = self._core.take_many(n)
                if isinstance(many, list):  # the hot path
                    return many
                sample = self._taken(many)
            else:
                sample = self._take()
            if sample is None:
                self._raise_if_over()
                return []
            return [sample]

    def recv_many(self, n: int = 256, timeout: float | None = None) -> list[Sample]:
        """1..n samples, waiting up to `timeout` seconds (None: forever) for the first, as
        recv(): one native call claims all that are there (at most n, and at most what
        max_held leaves room for). Release them as usual; dropping them (the list) gives
        their slots back in one pass at the next receive."""
        got = self.poll_many(n)
        if got:
            return got
        return self._wait(lambda: self.poll_many(n) or None, timeout)

    def _wait(self, poll: Callable[[], _T | None], timeout: float | None) -> _T:
        """Wait as the process's wait mode says until poll() returns something."""
        deadline = None if timeout is None else time.monotonic() + timeout
        spin_until = time.monotonic_ns() + self._spin_ns if self._spin_ns > 0 else 0
        yielded = False
        while True:
            got = poll()
            if got is not None:
                return got
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise Timeout(f"no sample on topic {self.name!r} within {timeout} s")
            if self._spin_ns < 0 or time.monotonic_ns() < spin_until:
                continue
            if not yielded:
                # Once, before a futex sleep: give the CPU to whoever is runnable (on a busy
                # machine, often the publisher), which saves the publisher a wake-up per
                # sample when samples come faster than a wake-up takes.
                yielded = True
                os.sched_yield()
                continue
            yielded = False
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
                if self._core.pending() or self._closed is not None:
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
            if self._core.pending() or self._closed is not None or self._kernel_gone is not None:
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
        if self._kernel_gone is not None:
            self._closed = self._kernel_gone
            raise self._closed
        state = _load32(self._ctrl, L.CTRL_STATE_OFF)
        if state != _core.STATE_OPEN:
            self._closed = self._over_error(state, _load32(self._ctrl, L.CTRL_REASON_OFF))
            raise self._closed

    def _over_error(self, state: int, reason: int) -> IpcError:
        if reason == L.REASON_PEER_DEAD or state == _core.STATE_PEER_DEAD:
            return PeerDied(f"the publisher of topic {self.name!r} (process {self.publisher}) "
                            "exited")
        if reason == L.REASON_KERNEL_STOPPED:
            return KernelUnavailable(f"the kernel that made the subscription to {self.name!r} "
                                     "stopped: subscribe again (after a reconnect, "
                                     "proc.on_reconnect is the place)")
        if reason == L.REASON_REVOKED:
            return InvalidCapability(f"the subscription to {self.name!r} was revoked")
        if reason == L.REASON_CUT_OFF:
            return ProtocolError(f"the publisher of {self.name!r} cut this subscription off: it "
                                 "held more samples than its depth and max_held, or released "
                                 "one it did not hold")
        return PeerDied(f"the publisher closed topic {self.name!r}")

    def _take(self) -> Sample | None:
        """Lock held: claim the next entry (the native TopicSub checks all the publisher
        wrote, gives back released slots first, and makes the Sample)."""
        if self._closed is not None and not isinstance(self._closed, PeerDied):
            return None
        return self._taken(self._core.take())

    def _taken(self, got: Sample | str | bool | None) -> Sample | None:
        """What TopicSub.take() said, other than a Sample on the hot path."""
        if got is None or isinstance(got, Sample):
            return got
        if got is False:
            raise OutOfMemory(f"this subscriber holds {self.max_held} samples of {self.name!r} "
                              "or views of them (max_held): release some before receiving more")
        self._drop_topic(str(got))
        return None  # not reached: _drop_topic raises

    def _drop_topic(self, reason: str) -> None:
        """The publisher's garbage: drop the subscription, tell the kernel, raise."""
        exc = _corrupt(reason)
        self._closed = exc
        if self._session.live(self._ctl):
            with contextlib.suppress(IpcError):
                self._session.request_nowait(frames.Release(self.handle), via=self._ctl)
        raise exc

    # ---- the control thread -----------------------------------------------------------------

    def _kernel_lost(self) -> None:
        """The control thread, as the kernel goes: the subscription was the kernel's (a
        reconnected publisher publishes anew): what is in the ring is still received, then
        KernelUnavailable. Subscribe again (on_reconnect) for the new kernel's."""
        self._kernel_gone = KernelUnavailable(
            f"the kernel that made the subscription to {self.name!r} was lost: subscribe again "
            "(after a reconnect, proc.on_reconnect is the place)")
        self._ended(0)

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
