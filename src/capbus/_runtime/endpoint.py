"""Endpoint: a capability to reach a service (call it, send to it, delegate it, watch it).

Each calling thread gets its own lane (a channel with its own rings, opened on first use), so
calls from several threads run concurrently and every ring keeps a single producer. asyncio
callers take lanes from a small pool, one per call in flight; past the pool's cap, acalls wait
their turn for a lane in FIFO order (never fail for being many).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from .. import _core
from .._errors import InvalidCapability, IpcError, Timeout, WouldBlock
from .._protocol import frames
from . import interface, objects
from .control import Control
from .lane import LaneHandle, open_lane
from .limits import Limits, limits_request
from .loan import Loan
from .message import OBJECT_FLAG, TRANSFER_FLAG, USER_FLAGS, Message, bad_flags, error_reply
from .region import Region
from .room import until_room, until_room_async
from .topic import TopicCapability
from .wait import readable, timeout_ns

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("capbus")
_REPLY = _core.FLAG_REPLY_EXPECTED
_ERROR = _core.FLAG_ERROR
_MAX_ASYNC_LANES = 16  # pooled lanes per endpoint for acall; more acalls wait their turn
_I = TypeVar("_I", bound=interface.Interface)


class Endpoint(_core.EndpointBase):
    """A capability to reach a service.

    call() and send_async() are native (_core.EndpointBase): the plain case runs there with no
    Python frame; flags, delegated capabilities and regions come back to _call_slow and
    _send_async_slow below (handed to the base in __init__), which are the reference behaviour.
    """

    def __init__(self, session: Session, granted: frames.Granted) -> None:
        # What the native call()/send_async() call up to (plain functions, called with the
        # endpoint first): this thread's lane, the reference paths, the error an error reply is.
        super().__init__(open_lane=Endpoint._lane_for_thread, slow_call=Endpoint._call_slow,
                         slow_send=Endpoint._send_async_slow, remote_error=Endpoint._remote_error)
        self._session = session
        self._ctl = session.control  # the kernel connection its handle belongs to
        self.handle = granted.handle
        self.process_id = granted.process_id  # the serving process
        self.name = granted.name
        self.rights: frozenset[str] = frozenset(granted.rights or ())
        self.limits = Limits.from_wire(granted.limits)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._pool: list[LaneHandle] = []  # idle lanes for asyncio calls
        self._pool_size = 0  # pooled lanes that exist (idle or in use), <= _MAX_ASYNC_LANES
        # acalls waiting for a pooled lane, oldest first: each gets a lane, or None ("open one:
        # a pool place is yours"). Under _lock (acalls may run in several threads' loops).
        self._lane_waiters: deque[asyncio.Future[LaneHandle | None]] = deque()
        self._death_callbacks: list[Callable[[Endpoint], None]] = []
        self._watching = False
        self._closed = False
        self._released = False  # close() was called
        # Set for a capability received with a message (received_endpoint()): it goes
        # back to the kernel when this object is garbage-collected, unless keep() was called.
        self._finalizer: Any = None
        self.dead = False
        # How it was obtained, so that a reconnect can look it up again (None: it cannot be).
        self._origin: tuple[str, str] | None = None
        self._grant_key: str | None = None  # a startup grant's key (Process.grants)
        self._server_pid = 0
        self._lanes: weakref.WeakSet[LaneHandle] = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"<capbus.Endpoint {self.name!r} of process {self.process_id} handle={self.handle:#x}>"

    # ---- synchronous calls --------------------------------------------------------------------

    def _call_slow(self, opcode: int, data: _core.Data = (), payload: _core.Payload = b"",
                   timeout: float | None = None, flags: int = 0,
                   caps: Iterable[Endpoint | TopicCapability] = (), regions: Iterable[Region] = (),
                   move: bool = False) -> Message:
        """call(): send a request and wait for the reply.

        Timeout cancels the transaction (a late reply is dropped); PeerDied if the server exits;
        ValueError / MessageTooLarge / RateLimitExceeded before anything is sent if the arguments
        or the capability's limits do not allow it. caps: capabilities to delegate with it (each
        needs the share right); they arrive as req.caps (TopicCapabilities as req.topics).
        regions: shared memory regions to pass on, arriving as req.regions; move=True transfers
        them (this side loses them), else
        they are shared (needs the share right).
        """
        lane = self._local.__dict__.get("lane") or self._thread_lane()
        if flags & ~USER_FLAGS and flags != OBJECT_FLAG:
            raise bad_flags(flags)
        if not (caps or regions):
            r = lane.native.call(self.handle, opcode, flags | _REPLY, data, _payload_arg(payload),
                               -1 if timeout is None else timeout_ns(timeout))
        else:
            tag = lane.native.last_tag + 1
            flags |= self._delegate(lane, caps, regions, move)
            try:
                r = lane.native.call(self.handle, opcode, flags | _REPLY, data, _payload_arg(payload),
                                   -1 if timeout is None else timeout_ns(timeout))
            except BaseException:
                self._undo_attach(lane, tag)
                raise
        if r[1] & _ERROR:
            raise self._remote_error(r)
        return r

    # ---- asynchronous messages ----------------------------------------------------------------

    def _send_async_slow(self, opcode: int, data: _core.Data = (), payload: _core.Payload = b"",
                         flags: int = 0, caps: Iterable[Endpoint | TopicCapability] = (),
                         regions: Iterable[Region] = (), move: bool = False,
                         timeout: float | None = 0) -> None:
        """send_async(): queue a one-way message. timeout=0 (the default) never blocks:
        WouldBlock when the receiver's ring for this sender is full (back-pressure: nothing is
        dropped silently). A timeout in seconds (None: no limit) waits for room that long (the
        thread sleeps; the server's draining wakes it), then raises WouldBlock."""
        lane = self._local.__dict__.get("lane") or self._thread_lane()
        attempt, undo = self._one_way(lane, opcode, data, payload, flags, caps, regions, move)
        try:
            until_room(lane, attempt, timeout, f"send_async to {self.name!r}")
        except BaseException:
            undo()
            raise

    def _one_way(self, lane: LaneHandle, opcode: int, data: _core.Data, payload: _core.Payload,
                 flags: int, caps: Iterable[Endpoint | TopicCapability], regions: Iterable[Region],
                 move: bool) -> tuple[Callable[[], None], Callable[[], None]]:
        """A one-way message on `lane` as (attempt, undo): attempt() writes it (WouldBlock while
        full: it may be tried again), undo() drops the capabilities and regions attached for it
        (once, in the kernel) if it was never written."""
        if flags & ~USER_FLAGS and flags != OBJECT_FLAG:
            raise bad_flags(flags)
        native, handle, pl = lane.native, self.handle, _payload_arg(payload)

        def attempt() -> None:
            native.send(handle, opcode, flags, data, pl)

        if not (caps or regions):
            return attempt, _nothing
        tag = native.last_tag + 1
        flags |= self._delegate(lane, caps, regions, move)
        return attempt, lambda: self._undo_attach(lane, tag)

    async def asend(self, opcode: int, data: _core.Data = (), payload: _core.Payload = b"",
                    flags: int = 0, caps: Iterable[Endpoint] = (), regions: Iterable[Region] = (),
                    move: bool = False, timeout: float | None = None) -> None:
        """send_async() for asyncio that waits for room: when the receiver's ring or arena for
        this sender is full, the task waits (on the lane's eventfd, in the event loop) until the
        server frees some, up to `timeout` seconds (None: no limit; 0: WouldBlock at once);
        WouldBlock when the time is up (nothing was sent). Messages of one thread's tasks go
        out in the order their asends were awaited."""
        if timeout is not None and not timeout >= 0:
            raise ValueError("timeout must be >= 0 or None")
        if not (caps or regions):
            # Nobody of this thread waits for room before us: the native send, at once.
            gate = self._local.__dict__.get("room_gate")
            if gate is None or not gate[2].locked():
                try:
                    return self.send_async(opcode, data, payload, flags)
                except WouldBlock:
                    if timeout == 0:
                        raise
        lane = self._local.__dict__.get("lane") or self._thread_lane()
        attempt, undo = self._one_way(lane, opcode, data, payload, flags, caps, regions, move)
        try:
            async with self._room_gate(lane):
                await until_room_async(lane, attempt, timeout, f"asend to {self.name!r}")
        except BaseException:
            undo()
            raise

    async def asend_many(self, messages: _core.Batch, flags: int = 0,
                         timeout: float | None = None) -> int:
        """send_many() for asyncio that waits for room: sends every message, (opcode, data) or
        (opcode, data, payload) each, in order, waiting for room as asend does. Returns how many
        were sent: all of them, or fewer only when `timeout` (seconds for the whole batch;
        None: no limit) ran out first; the rest were not sent."""
        lane = self._local.__dict__.get("lane") or self._thread_lane()
        if flags & ~USER_FLAGS:
            raise bad_flags(flags)
        batch = list(messages)
        deadline = None if timeout is None else time.monotonic() + timeout
        sent = 0

        def attempt() -> None:
            nonlocal sent
            while sent < len(batch):
                n = lane.native.send_many(self.handle, flags, batch[sent:])
                if not n:
                    raise WouldBlock("request ring or arena is full")
                sent += n

        async with self._room_gate(lane):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            with contextlib.suppress(WouldBlock):  # the time ran out: `sent` says how far
                await until_room_async(lane, attempt, left, f"asend_many to {self.name!r}")
        return sent

    def _room_gate(self, lane: LaneHandle) -> asyncio.Lock:
        """The lock that lets one task of this thread's loop at a time wait for room on `lane`
        (one reader per eventfd; FIFO, so messages keep the order of their asends)."""
        loop = asyncio.get_running_loop()
        gate = self._local.__dict__.get("room_gate")
        if gate is None or gate[0] is not loop or gate[1] is not lane:
            gate = (loop, lane, asyncio.Lock())
            self._local.room_gate = gate
        return gate[2]

    def send_many(self, messages: _core.Batch, flags: int = 0) -> int:
        """Queue several one-way messages, (opcode, data) or (opcode, data, payload) each, with
        one wake-up for the batch; returns how many were accepted (the rest would block)."""
        lane = self._local.__dict__.get("lane") or self._thread_lane()
        if flags & ~USER_FLAGS:
            raise bad_flags(flags)
        return lane.native.send_many(self.handle, flags, messages)

    def loan(self, size: int, timeout: float | None = 0) -> Loan:
        """A writable buffer of `size` bytes in this thread's channel arena, to fill in place and
        send without a copy: `with ep.loan(n) as loan: loan.buffer[:] = ...; loan.call(op)`.

        The receiver's req.payload is a read-only view of the same memory; it and every view or
        array made from it stay valid (and unchanged by later messages) for as long as they live,
        and the memory goes back when the request is done and its last view is gone. The buffer
        stays valid after the commit too: while any view of it lives, this thread's lane does not
        reuse that memory (a payload that would need it gets WouldBlock). A loan given back
        unsent drops its buffer. WouldBlock while the arena is full (the receiver still holds
        earlier payloads); timeout (seconds, None: no limit) waits that long for the receiver to
        free room first, then WouldBlock. MessageTooLarge above the arena size. Note that the
        sender can still change a loaned payload while the receiver reads it: to check once and
        trust, send a sealed Region instead."""
        lane = self._local.__dict__.get("lane") or self._thread_lane()
        if timeout == 0:  # the default: no waiting (and no closure: see _loan_waiting)
            native = lane.native
            return Loan(self, native, native.loan(size))
        return self._loan_waiting(lane, size, timeout)

    def _loan_waiting(self, lane: LaneHandle, size: int, timeout: float | None) -> Loan:
        """loan() with a timeout: until_room's wait. A method of its own because a lambda in
        loan() itself would make its variables cells, made and freed on every loan."""
        native = lane.native
        buf = until_room(lane, lambda: native.loan(size), timeout, f"loan from {self.name!r}")
        return Loan(self, native, buf)

    def call_object(self, obj: Any, opcode: int = 0, timeout: float | None = None,
                    pickle: bool = False) -> Message:
        """Send a Python object and wait for the reply; the server reads it with req.object() and
        may answer with req.reply_object(). The object goes as data-only msgpack (plain data,
        tuples, sets, datetimes, numpy arrays: see capbus._runtime.objects; TypeError for what it
        cannot carry), large buffers out of band: written straight into an arena loan, one copy,
        none on receipt. pickle=True sends pickle instead, which only a server that trusts this
        process decodes (req.object(trusted=True))."""
        size, parts = objects.dumps(obj, pickle)
        if size < _core.ZC_THRESHOLD:
            return self.call(opcode, (), objects.join(size, parts), timeout, OBJECT_FLAG)
        with self.loan(size) as loan:
            objects.pack_into(loan.buffer, parts)
            return loan.call(opcode, timeout=timeout, flags=OBJECT_FLAG)

    def send_object(self, obj: Any, opcode: int = 0, pickle: bool = False) -> None:
        """send_async() of a Python object (see call_object)."""
        size, parts = objects.dumps(obj, pickle)
        if size < _core.ZC_THRESHOLD:
            self.send_async(opcode, (), objects.join(size, parts), OBJECT_FLAG)
            return
        with self.loan(size) as loan:
            objects.pack_into(loan.buffer, parts)
            loan.send_async(opcode, flags=OBJECT_FLAG)

    async def acall(self, opcode: int, data: _core.Data = (), payload: _core.Payload = b"",
                    timeout: float | None = None, flags: int = 0) -> Message:
        """call() for asyncio: waits on an eventfd the event loop watches, no thread blocks.

        Any number may run at once: each takes a pooled lane (up to 16 per endpoint), the rest
        wait their turn for one, oldest first. The timeout counts from the await, queueing
        included. Cancelling the task cancels the call: the server skips it if it has not taken
        it yet, a reply that comes anyway is dropped, and the lane goes back to the pool."""
        if flags & ~USER_FLAGS and flags != OBJECT_FLAG:
            raise bad_flags(flags)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        if deadline is None:
            lane = await self._take_lane(loop)
        else:
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    lane = await self._take_lane(loop)
            except TimeoutError:
                raise Timeout(f"no lane free for a call to {self.name!r} within {timeout} s "
                              "(every pooled lane is busy)") from None
        try:
            tag = lane.native.call_start(self.handle, opcode, flags | _REPLY, data,
                                         _payload_arg(payload))
        except BaseException:
            self._drop_lane()  # nothing was sent; its place goes to the next acall
            raise
        return await PendingCall(self, lane, tag).result(deadline, timeout)

    # ---- typed interfaces ---------------------------------------------------------------------

    # Typed as a Callable returning the interface, not type[_I]: mypy refuses abstract classes
    # (interfaces with @abstractmethod declarations) where a type[...] is expected.
    def proxy(self, iface: Callable[..., _I], *, timeout: float | None = None,
              check_timeout: float = 10.0) -> _I:
        """A proxy calling the typed service behind this endpoint: `kv = ep.proxy(KV)`, then
        `kv.get("a")` with Python arguments, results and exceptions (capbus.Interface). Asks the
        service for its interface first (within check_timeout): InterfaceMismatch, naming the
        methods that differ, if it serves another version (or no interface). timeout: of each
        call (Timeout), None to wait for ever."""
        return interface.make_proxy(self, iface, timeout, check_timeout)  # type: ignore[arg-type]

    def aproxy(self, iface: Callable[..., interface.Interface], *, timeout: float | None = None,
               check_timeout: float = 10.0) -> Any:
        """proxy() for asyncio: its methods are coroutines (`await akv.get("a")`), calls go
        through acall(); the interface check runs with the first call."""
        return interface.make_aproxy(self, iface, timeout, check_timeout)  # type: ignore[arg-type]

    async def acall_object(self, obj: Any, opcode: int = 0, timeout: float | None = None,
                           pickle: bool = False) -> Message:
        """call_object() for asyncio (see there and acall); the server reads it with
        req.object(). A large object is copied once more than call_object does (into a bytes,
        then into the arena): the pooled lanes take no loans."""
        size, parts = objects.dumps(obj, pickle)
        return await self.acall(opcode, (), objects.join(size, parts), timeout, OBJECT_FLAG)

    async def _take_lane(self, loop: asyncio.AbstractEventLoop) -> LaneHandle:
        """A pooled lane for one acall: an idle one, a new one while the pool is under its cap,
        else the task waits its turn (FIFO) for one that another acall gives back."""
        with self._lock:
            if self._pool:
                return self._pool.pop()
            opening = self._pool_size < _MAX_ASYNC_LANES and not self._lane_waiters
            if opening:
                self._pool_size += 1
            else:
                fut: asyncio.Future[LaneHandle | None] = loop.create_future()
                self._lane_waiters.append(fut)
        if not opening:
            try:
                lane = await fut
            except asyncio.CancelledError:
                with self._lock:
                    if not fut.done() or fut.cancelled():
                        with contextlib.suppress(ValueError):
                            self._lane_waiters.remove(fut)
                        raise
                handed = fut.result()  # handed over as we were cancelled: pass it on
                if handed is None:
                    self._drop_lane()
                else:
                    self._give_lane(handed)
                raise
            if lane is not None:
                return lane
        try:  # a place in the pool is ours: open its lane (a request to the kernel)
            return self._open_lane()
        except BaseException:
            self._drop_lane()
            raise

    def _give_lane(self, lane: LaneHandle) -> None:
        """A pooled lane is free again: to the oldest waiting acall, else back to the pool."""
        with self._lock:
            if lane._ctl is not self._ctl:  # of a kernel since lost (see _rebind)
                waiter = None
            else:
                waiter = self._next_waiter()
                if waiter is None:
                    self._pool.append(lane)
                    return
        if waiter is None:
            self._drop_lane()
        else:
            self._hand(waiter, lane)

    def _drop_lane(self) -> None:
        """A pooled lane went (dropped, or never opened): its place goes to the oldest waiting
        acall (which opens a lane of its own), else the pool shrinks."""
        with self._lock:
            waiter = self._next_waiter()
            if waiter is None:
                self._pool_size = max(0, self._pool_size - 1)
                return
        self._hand(waiter, None)

    def _hand(self, fut: asyncio.Future[LaneHandle | None], lane: LaneHandle | None) -> None:
        """Give a waiting acall its lane (or None: "open one"), in the thread of its own loop
        (acalls of other threads' loops may wait on the same endpoint)."""
        def hand() -> None:
            if not fut.done():
                fut.set_result(lane)
            elif lane is None:  # cancelled meanwhile: on to the next waiter
                self._drop_lane()
            else:
                self._give_lane(lane)

        loop = fut.get_loop()
        try:
            mine = asyncio.get_running_loop() is loop
        except RuntimeError:
            mine = False
        if mine:
            hand()
            return
        try:
            loop.call_soon_threadsafe(hand)
        except RuntimeError:  # that loop is closed, and its acall with it
            fut.cancel()
            hand()

    def _next_waiter(self) -> asyncio.Future[LaneHandle | None] | None:
        while self._lane_waiters:  # (_lock held)
            fut = self._lane_waiters.popleft()
            if not fut.done():
                return fut
        return None

    # ---- context managers ---------------------------------------------------------------------

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Endpoint:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # ---- capabilities -------------------------------------------------------------------------

    def restrict(self, rights: Iterable[str] | None = None, *, rate_limit: int | None = None,
                 bandwidth: int | None = None, max_message_size: int | None = None,
                 expires_in: float | None = None,
                 max_priority: int | None = None) -> Endpoint:
        """A new capability to the same service with fewer rights and/or tighter limits
        (PermissionDenied on any attempt to widen). It derives from this one: revoking this
        revokes it too. max_priority: the highest priority its calls may have the server run
        them at (-nice, or 20 + a real-time priority; see Service.set_priority): the server
        clamps every call to it, whatever the caller stamps."""
        reply = self._session.request(frames.Restrict(
            self.handle, None if rights is None else sorted(rights),
            limits_request(rate_limit, bandwidth, max_message_size, expires_in, max_priority)),
            via=self._ctl)
        return endpoint_for(self._session, reply)

    def keep(self) -> Endpoint:
        """Hold a capability received with a message (req.caps) for good, like a looked-up one:
        until close() or revoke(). Without keep() it is released back to the kernel once the
        Request is gone and nothing refers to it any more (so `db = req.caps[0]` works for as
        long as `db` does). A no-op for any other endpoint; returns self."""
        fin, self._finalizer = self._finalizer, None
        if fin is not None and fin.detach() is not None:
            self._session.adopt_endpoint(self)
        return self

    def _unfinalize(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def revoke(self) -> None:
        """Invalidate this capability and everything derived from it, everywhere, at once:
        their calls fail with InvalidCapability and their receivers accept nothing more."""
        self._unfinalize()
        self._closed = True
        self._released = True  # gone: a close() after it (`with ep:`) has nothing to give back
        self._forget_lanes()
        self._session.forget_endpoint(self)
        self._session.request(frames.Revoke(self.handle), via=self._ctl)

    def close(self) -> None:
        """Give the capability back (its lanes close with it). A second close does nothing."""
        with self._lock:
            if self._released:
                return
            self._released = True
        self._unfinalize()
        self._closed = True
        self._forget_lanes()
        self._session.forget_endpoint(self)
        if self._ctl.closed is None:
            self._session.request(frames.Release(self.handle), via=self._ctl)

    # ---- death --------------------------------------------------------------------------------

    def on_death(self, callback: Callable[[Endpoint], None]) -> None:
        """Call `callback(endpoint)` once the serving process has exited (at once if it has).

        Callbacks run on the runtime's control thread: keep them short, never block in them.
        A received capability is kept (see keep()): its callbacks must not vanish with it.
        """
        self.keep()
        with self._lock:
            self._death_callbacks.append(callback)
            first = not self._watching
            self._watching = True
            dead = self.dead
        if dead:
            self._run_callback(callback)
        elif first:
            self._session.request(frames.Watch(self.handle), via=self._ctl)

    def _died(self) -> None:
        with self._lock:
            if self.dead:
                return
            self.dead = True
            callbacks = list(self._death_callbacks)
        for cb in callbacks:
            self._run_callback(cb)

    def _run_callback(self, cb: Callable[[Endpoint], None]) -> None:
        try:
            cb(self)
        except Exception:
            log.exception("on_death callback %r raised", cb)

    # ---- lanes --------------------------------------------------------------------------------

    def _open_lane(self) -> LaneHandle:
        if self._closed:
            lost = getattr(self, "_lost", None)
            raise InvalidCapability(lost or f"endpoint {self.name!r} (handle {self.handle:#x}) is closed")
        with self._lock:  # one kernel's pair: a reconnect changes both (see _rebind)
            ctl, handle = self._ctl, self.handle
        lane = open_lane(self._session, ctl, handle, self._is_closed)
        self._server_pid = lane.pid
        self._lanes.add(lane)
        self._session.lane_endpoints.add(self)
        return lane

    def _is_closed(self) -> bool:
        return self._closed

    def _mark_lanes(self, state: int, pid: int | None = None) -> None:
        """The runtime's own verdict on every lane of this endpoint (see Lane.mark), or on those
        served by OS process `pid` (after a reconnect, lanes of the old kernel may be served by
        another process than the new ones)."""
        for lane in list(self._lanes):
            if pid is None or lane.pid == pid:
                lane.native.mark(state)

    def _served_by(self, pid: int) -> bool:
        return any(lane.pid == pid for lane in list(self._lanes))

    def _rebind(self, granted: frames.Granted) -> None:
        """After a reconnect: the same service through the new kernel. The next call of each
        thread opens a lane through the new kernel; a call still waiting on a lane of the old
        one gets its answer there (a server that reconnects serves its old channels too), or
        PeerDied if that server dies (the lanes stay in _lanes until dropped, for the watch)."""
        with self._lock:  # _open_lane takes the (connection, handle) pair under it
            # In this order: a thread between two calls finds no lane in the new local, or an
            # old lane its _ctl check refuses, and the native cache forgets what it chose then.
            self._local = threading.local()
            self._ctl = self._session.control
            self.handle = granted.handle  # also drops the native one-entry lane cache
            self.process_id = granted.process_id
            self.rights = frozenset(granted.rights or ())
            self.limits = Limits.from_wire(granted.limits)
            # Idle lanes of the old kernel go; those in use are dropped as their acalls end
            # (_give_lane), and count until then.
            self._pool_size -= len(self._pool)
            self._pool = []
            self.dead = False
            watching, self._watching = self._watching, False
        if watching:
            with contextlib.suppress(IpcError):
                self._watching = True
                self._session.request(frames.Watch(self.handle), via=self._ctl)

    def _lose(self, why: str, state: int = _core.STATE_CLOSED, keep_lanes: bool = False) -> None:
        """After a reconnect that could not bring it back (or a revoked grant): its handle means
        nothing any more; calls fail with InvalidCapability saying why. keep_lanes: lanes already
        open go on working while their server lives (the channel needs no kernel); only new lanes
        (a new thread, an acall) fail with `why`."""
        self._closed = True
        self._lost = why
        if not keep_lanes:
            self._mark_lanes(state)
            self._forget_lanes()

    def _lane_for_thread(self) -> Any:
        """This thread's native Lane: open_lane of the native base, which caches it per thread
        (and fork generation) for call/send_async."""
        self._session.check()  # a forked child must connect on its own
        lane = self._local.__dict__.get("lane")
        if lane is None or lane._ctl is not self._ctl:  # none yet, or of a kernel since lost
            lane = self._thread_lane()
        return lane.native

    def _thread_lane(self) -> LaneHandle:
        lane = self._open_lane()
        self._local.lane = lane
        return lane

    def _delegate(self, lane: LaneHandle, caps: Iterable[Endpoint | TopicCapability],
                  regions: Iterable[Region], move: bool) -> int:
        """Attach capabilities to the next message on this lane (bound to its tag), in one
        request: over the service's bounds (max_caps, max_regions, max_region_bytes) the kernel
        refuses them all with MessageTooLarge, and nothing is sent."""
        tag = lane.native.last_tag + 1
        caps, regions = list(caps), list(regions)
        for cap in caps:
            if not isinstance(cap, (Endpoint, TopicCapability)) or cap._session is not self._session:
                raise TypeError("caps must be Endpoints or TopicCapabilities held by this Process")
        for region in regions:
            if not isinstance(region, Region) or not region.held_by(self._session):
                raise TypeError("regions must be Regions held by this Process")
            region.buffer  # noqa: B018 - raises if it was moved or closed already
        self._session.request(frames.Attach(self.handle, lane.index, tag, [c.handle for c in caps],
                                          [r.handle for r in regions], move), via=lane._ctl)
        if move:
            for region in regions:
                region._moved()
        return TRANSFER_FLAG

    def _undo_attach(self, lane: LaneHandle, tag: int) -> None:
        """The message the attachments were for was not written (WouldBlock, a limit, a timeout
        waiting for ring space): drop them, or they would ride on this lane's next message.
        Moved regions are gone with them."""
        if lane.native.last_tag < tag:
            lane._ctl.request_nowait(frames.Detach(lane._handle, lane.index, tag))

    def _remote_error(self, r: Message) -> Exception:
        """The exception an error reply stands for (message.error_reply)."""
        return error_reply(r, self.name)


class PendingCall:
    """A call started on one of an endpoint's pooled lanes (acall's) and not answered yet.

    Its owner waits for the reply a little on its own thread (wait: the lane's wait, without
    the GIL), then, if it has not come, in an event loop (result: the lane's eventfd, no thread
    blocks), or gives up (cancel). Whichever ends the call gives the lane back to the pool
    (dropped instead when its state is unknown), once."""

    __slots__ = ("endpoint", "_lane", "_tag", "_open")

    def __init__(self, endpoint: Endpoint, lane: LaneHandle, tag: int) -> None:
        self.endpoint = endpoint
        self._lane = lane
        self._tag = tag
        self._open = True

    def wait(self, timeout: float) -> Message | None:
        """The reply, if it comes within `timeout` seconds (the call is over: an error reply is
        raised, as call() raises it), else None: the call is still pending."""
        if not self._open:
            raise RuntimeError("this call is over")
        try:
            r = self._lane.native.call_wait(self._tag, max(0, int(timeout * 1e9)))
        except BaseException:
            self._end(drop=True)  # the server's death, a broken lane, a signal: state unknown
            raise
        if r is None:
            return None
        self._end()
        if r[1] & _ERROR:
            raise self.endpoint._remote_error(r)
        return r

    async def result(self, deadline: float | None, timeout: float | None = None) -> Message:
        """The reply, awaited in the running event loop until `deadline` (time.monotonic(), or
        None: no end): then Timeout, and the call is cancelled. Cancelling the task cancels the
        call: the server skips it if it has not taken it yet, a late reply is dropped."""
        if not self._open:
            raise RuntimeError("this call is over")
        loop = asyncio.get_running_loop()
        lane, tag, ep = self._lane, self._tag, self.endpoint
        try:
            while True:
                r = lane.native.call_poll(tag, True)
                if r is not None:
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise Timeout(f"no reply from {ep.name!r} within "
                                  f"{timeout if timeout is not None else 0} s")
                await readable(loop, lane.reply_fd, left)
        except (asyncio.CancelledError, Timeout):
            self.cancel()
            raise
        except BaseException:
            self._end(drop=True)  # its state is unknown: drop it (its channel closes with it)
            raise
        self._end()
        if r[1] & _ERROR:
            raise ep._remote_error(r)
        return r

    def cancel(self) -> None:
        """Stop waiting: the call is cancelled (cancel_below tells the server; a late reply is
        dropped by its tag), and the lane is fit for the next call. Never raises (a lane that
        cannot be told is dropped)."""
        if not self._open:
            return
        try:
            ok = not self._lane.native.closed
            if ok:
                self._lane.native.cancel(self._tag)
        except Exception:
            ok = False
        self._end(drop=not ok)

    def _end(self, drop: bool = False) -> None:
        if self._open:
            self._open = False
            if drop:
                self.endpoint._drop_lane()
            else:
                self.endpoint._give_lane(self._lane)


def start_call(ep: Endpoint, opcode: int, data: _core.Data = (), payload: _core.Payload = b"",
               flags: int = 0) -> PendingCall | None:
    """Start a call on an idle pooled lane of `ep` (those of acall) without blocking on
    anything: the request is written and the server's doorbell rung. None when no pooled lane
    is idle (all busy, or none opened yet: acall opens them); errors as call_start raises them
    (WouldBlock: the ring is full). For a thread that must never wait long, a gateway's network
    thread: it waits a little (PendingCall.wait), then hands the call to its event loop."""
    if flags & ~USER_FLAGS and flags != OBJECT_FLAG:
        raise bad_flags(flags)
    with ep._lock:
        if not ep._pool:
            return None
        lane = ep._pool.pop()
    try:
        tag = lane.native.call_start(ep.handle, opcode, flags | _REPLY, data,
                                     _payload_arg(payload))
    except BaseException:
        ep._drop_lane()
        raise
    return PendingCall(ep, lane, tag)


def endpoint_for(session: Session, reply: frames.Frame,
                 origin: tuple[str, str] | None = None) -> Endpoint:
    """The Endpoint of a Granted reply: one object per capability handle (held in the session's
    table until closed). origin: how it was looked up, so that a reconnect can look it up again."""
    assert isinstance(reply, frames.Granted)
    with session.lock:
        ep = session.endpoints.get(reply.handle)
        if ep is None:
            ep = Endpoint(session, reply)
            session.endpoints[reply.handle] = ep
        if origin is not None and ep._origin is None:
            ep._origin = origin
    return ep


def received_endpoint(session: Session, granted: frames.Granted) -> Endpoint:
    """A capability that came with a message: it lives as long as the application refers to it
    (or until Endpoint.keep()); when the last reference goes, it goes back to the kernel, so
    capabilities a sender pushes unasked can never fill this process's table."""
    ep = Endpoint(session, granted)
    ep._finalizer = weakref.finalize(ep, _release_received, session, ep._ctl, granted.handle)
    ep._finalizer.atexit = False
    return ep


def _release_received(session: Session, ctl: Control, handle: int) -> None:
    if session.live(ctl):
        ctl.request_nowait(frames.Release(handle))


def _nothing() -> None:
    pass


def _payload_arg(payload: Any) -> Any:
    """None for no payload: None, or any bytes-like object of no bytes. Judged by its length,
    never by truthiness (a numpy array is its bytes; np.zeros(8) is not "ambiguous"); anything
    that is not bytes-like goes on to the core, which says what it needs."""
    if payload is None or type(payload) is bytes:
        return payload or None
    try:
        n = memoryview(payload).nbytes
    except TypeError:
        return payload
    return payload if n else None


