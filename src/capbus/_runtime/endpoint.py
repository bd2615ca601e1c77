"""Endpoint: a capability to reach a service (call it, send to it, delegate it, watch it).

Each calling thread gets its own lane (a channel with its own rings, opened on first use), so
calls from several threads run concurrently and every ring keeps a single producer. asyncio
callers take lanes from a small pool, one per call in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .. import _core
from .._errors import InvalidCapability, IpcError, RemoteError, Timeout, error_from_code
from .._protocol import frames
from . import objects
from .control import Control
from .lane import LaneHandle, open_lane
from .limits import Limits, limits_request
from .loan import Loan
from .message import OBJECT_FLAG, TRANSFER_FLAG, USER_FLAGS, Message, bad_flags
from .region import Region
from .wait import readable, timeout_ns

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("capbus")
_REPLY = _core.FLAG_REPLY_EXPECTED
_ERROR = _core.FLAG_ERROR
_IPC_ERROR = _core.FLAG_IPC_ERROR
_MAX_ASYNC_LANES = 16


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
        self._pool_size = 0
        self._death_callbacks: list[Callable[[Endpoint], None]] = []
        self._watching = False
        self._closed = False
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
                   caps: Iterable[Endpoint] = (), regions: Iterable[Region] = (),
                   move: bool = False) -> Message:
        """call(): send a request and wait for the reply.

        Timeout cancels the transaction (a late reply is dropped); PeerDied if the server exits;
        ValueError / MessageTooLarge / RateLimitExceeded before anything is sent if the arguments
        or the capability's limits do not allow it. caps: capabilities to delegate with it (each
        needs the share right); they arrive as req.caps. regions: shared memory regions to pass
        on, arriving as req.regions; move=True transfers them (this side loses them), else
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
                         flags: int = 0, caps: Iterable[Endpoint] = (),
                         regions: Iterable[Region] = (), move: bool = False) -> None:
        """send_async(): queue a one-way message; never blocks: WouldBlock when the receiver's
        ring for this sender is full (back-pressure: nothing is dropped silently)."""
        lane = self._local.__dict__.get("lane") or self._thread_lane()
        if flags & ~USER_FLAGS and flags != OBJECT_FLAG:
            raise bad_flags(flags)
        if not (caps or regions):
            lane.native.send(self.handle, opcode, flags, data, _payload_arg(payload))
            return
        tag = lane.native.last_tag + 1
        flags |= self._delegate(lane, caps, regions, move)
        try:
            lane.native.send(self.handle, opcode, flags, data, _payload_arg(payload))
        except BaseException:
            self._undo_attach(lane, tag)
            raise

    def send_many(self, messages: _core.Batch, flags: int = 0) -> int:
        """Queue several one-way messages, (opcode, data) or (opcode, data, payload) each, with
        one wake-up for the batch; returns how many were accepted (the rest would block)."""
        lane = self._local.__dict__.get("lane") or self._thread_lane()
        if flags & ~USER_FLAGS:
            raise bad_flags(flags)
        return lane.native.send_many(self.handle, flags, messages)

    def loan(self, size: int) -> Loan:
        """A writable buffer of `size` bytes in this thread's channel arena, to fill in place and
        send without a copy: `with ep.loan(n) as loan: loan.buffer[:] = ...; loan.call(op)`.

        The receiver's req.payload is a read-only view of the same memory; it and every view or
        array made from it stay valid (and unchanged by later messages) for as long as they live,
        and the memory goes back when the request is done and its last view is gone. The buffer
        stays valid after the commit too: while any view of it lives, this thread's lane does not
        reuse that memory (a payload that would need it gets WouldBlock). A loan given back
        unsent drops its buffer. WouldBlock while the arena is full (the receiver still holds
        earlier payloads); MessageTooLarge above the arena size. Note that the sender can still
        change a loaned payload while the receiver reads it: to check once and trust, send a
        sealed Region instead."""
        lane = self._local.__dict__.get("lane") or self._thread_lane()
        return Loan(self, lane, lane.native.loan(size), self._remote_error)

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
        """call() for asyncio: waits on an eventfd the event loop watches, no thread blocks."""
        if flags & ~USER_FLAGS:
            raise bad_flags(flags)
        loop = asyncio.get_running_loop()
        lane = self._pooled_lane()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            tag = lane.native.call_start(self.handle, opcode, flags | _REPLY, data, _payload_arg(payload))
            while True:
                r = lane.native.call_poll(tag, True)
                if r is not None:
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    lane.native.cancel(tag)
                    raise Timeout(f"no reply from {self.name!r} within {timeout} s")
                await readable(loop, lane.reply_fd, left)
        except BaseException:
            self._pool_size -= 1  # its state is unknown: drop it (its channel closes with it)
            lane = None  # type: ignore[assignment]
            raise
        finally:
            if lane is not None:
                self._pool.append(lane)
        if r[1] & _ERROR:
            raise self._remote_error(r)
        return r

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
        self._forget_lanes()
        self._session.forget_endpoint(self)
        self._session.request(frames.Revoke(self.handle), via=self._ctl)

    def close(self) -> None:
        """Give the capability back (its lanes close with it)."""
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
            self._pool, self._pool_size = [], 0
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

    def _pooled_lane(self) -> LaneHandle:
        if self._pool:
            return self._pool.pop()
        if self._pool_size >= _MAX_ASYNC_LANES:
            raise InvalidCapability(f"more than {_MAX_ASYNC_LANES} acalls in flight on {self.name!r}")
        self._pool_size += 1
        return self._open_lane()

    def _delegate(self, lane: LaneHandle, caps: Iterable[Endpoint], regions: Iterable[Region],
                  move: bool) -> int:
        """Attach capabilities to the next message on this lane (bound to its tag), in one
        request: over the service's bounds (max_caps, max_regions, max_region_bytes) the kernel
        refuses them all with MessageTooLarge, and nothing is sent."""
        tag = lane.native.last_tag + 1
        caps, regions = list(caps), list(regions)
        for cap in caps:
            if not isinstance(cap, Endpoint) or cap._session is not self._session:
                raise TypeError("caps must be Endpoints held by this Process")
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
        """The exception an error reply stands for: a capbus error where capbus itself refused
        (FLAG_IPC_ERROR), else the service's own RemoteError."""
        text = (r[6] or b"").decode(errors="replace")
        if not r[1] & _IPC_ERROR:
            return RemoteError(r[2], text, service=self.name)
        if r[2] == RemoteError.code:  # its serve() handler raised: "TypeName: message"
            kind, sep, msg = text.partition(": ")
            return RemoteError(None, msg if sep else text, kind if sep else "Exception", self.name)
        return error_from_code(r[2], f"{self.name!r}: {text}")


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


