"""Service: the capability to serve a registered name, and the receiving end of its channels.

All of a service's channels share one doorbell; the native ServerSet waits on it and serves the
channels round robin. Garbage found on a channel closes that channel only, and is reported to
the kernel. For asyncio the doorbell has an eventfd the event loop watches.

After a reconnect (connect(reconnect=True)) the new kernel gives the service a new doorbell and
ServerSet; the channels of the lost kernel stay in their old ServerSet (a _Retired), served
beside the new ones until their clients die, so a caller that did not reconnect keeps its
answers. Their indices mean nothing to the new kernel: nothing about them is ever reported to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Collection, Iterator
from typing import TYPE_CHECKING, Any

from .. import _core
from .._errors import IpcError, KernelUnavailable, RemoteError, Timeout
from .._fdlimit import raise_fd_limit
from .._protocol import frames
from .endpoint import Endpoint, received_endpoint
from .interface import Dispatcher, Interface
from .limits import DEFAULT_PRIORITY_RANGE
from .message import TRANSFER_FLAG, Message, Request
from .region import Region, region_from
from .topic import TopicCapability
from .wait import ADAPTIVE_SPIN_NS, EVENT_POLL, WAIT_CODES, readable, readable_any, timeout_ns

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("capbus")


class Service(_core.ServiceBase):
    """The capability to serve a registered name. recv() is native (_core.ServiceBase); a closed
    service or a corrupt channel comes back to _recv_slow below (handed to the base as
    slow_recv), the reference behaviour."""

    def __init__(self, session: Session, handle: int, name: str, doorbell_fd: int,
                 event_fd: int, sleep_fd: int) -> None:
        # What the native recv() calls up to: the reference recv for what it does not handle,
        # and the claim of a message's attachments.
        super().__init__(slow_recv=Service._recv_slow, claim=Service._claim)
        raise_fd_limit()  # a few fds per client channel
        self._session = session
        self._ctl = session.control  # the kernel connection its handle belongs to
        self._frame: frames.Frame | None = None  # how it was registered (for a reconnect)
        self._access: list[tuple[list[str] | None, list[str] | None]] = []  # allow/deny, in order
        # Set when the kernel is gone for good for this service: what recv() raises once its
        # channels are gone.
        self._lost: KernelUnavailable | None = None
        self._chans: dict[int, tuple[int, int]] = {}  # channel index -> (client pid, generation)
        self.handle = handle
        self.name = name
        self.corrupt_channels = 0  # channels dropped for garbage (reported to the kernel)
        # attachments a message came with but that did not reach its Request (expired, revoked,
        # a full table, a region that cannot be mapped): counted and logged, never raised
        self.dropped_attachments = 0
        self._event_fd = event_fd
        self._senders: dict[int, int] = {}  # channel index -> sender ProcessId
        self._retired: list[_Retired] = []  # channels of former kernels, still served
        self._retired_lock = threading.Lock()  # the reader and the peer watch change the list
        self._turn = 0  # which ServerSet _poll_all asks first (round robin across them)
        self._priority = DEFAULT_PRIORITY_RANGE  # set_priority(): kept across a reconnect
        session.on_user_close.append(self._stop_serving)
        self._warn = _RateLimitedLog(log)
        try:
            self._set = _core.ServerSet(doorbell_fd, WAIT_CODES[session.wait_mode],
                                        ADAPTIVE_SPIN_NS, event_fd=event_fd, sleep_fd=sleep_fd)
        finally:
            os.close(doorbell_fd)
            os.close(sleep_fd)  # the ServerSet keeps its own duplicate
        self._closed = False
        # Event-loop receivers waiting on our eventfds right now (arecv): close() wakes them
        # and leaves the closing of those fds to the last of them, so that no loop ever watches
        # or reads a closed fd (EBADF), or one whose number open() has since given to another.
        self._async_lock = threading.Lock()
        self._async_waiters = 0
        self._fds_to_close: list[int] = []

    def __repr__(self) -> str:
        return f"<capbus.Service {self.name!r} of process {self._session.process_id}>"

    def fileno(self) -> int:
        """An fd that becomes readable when messages may be waiting (for event loops)."""
        return self._event_fd

    # ---- receiving ----------------------------------------------------------------------------

    def _recv_slow(self, timeout: float | None = None,
                   corrupt: _core.CorruptChannel | None = None) -> Request:
        """recv(): the next message from any client (round robin across them); Timeout if none.
        `corrupt`: what the native recv met first (reported here, then we go on)."""
        if corrupt is not None:
            self._corrupt(corrupt.index, corrupt.reason)
        if self._closed:
            raise self._closed_error()
        if timeout is None:
            deadline, ns = 0.0, -1
        else:
            deadline, ns = time.monotonic() + timeout, timeout_ns(timeout)
        while True:
            if self._retired:
                req = self._recv_all(None if timeout is None else deadline)
                if req is not None:
                    return req
                if self._closed:
                    raise self._closed_error()
                if timeout is not None:  # the last retired channel went: on with the time left
                    ns = timeout_ns(max(0.0, deadline - time.monotonic()))
                continue
            try:
                req = self._set.recv(ns)
                if req.flags & TRANSFER_FLAG:
                    self._claim(req)
                return req
            except _core.CorruptChannel as exc:
                self._corrupt(exc.index, exc.reason)
            if self._closed:
                raise self._closed_error()
            if timeout is not None:  # garbage does not extend the caller's timeout
                ns = timeout_ns(max(0.0, deadline - time.monotonic()))

    def poll(self) -> Request | None:
        """A waiting message, or None at once."""
        if self._retired:
            return self._poll_all(False)
        while True:
            try:
                req = self._set.poll()
            except _core.CorruptChannel as exc:
                self._corrupt(exc.index, exc.reason)
                continue
            if req is not None and req.flags & TRANSFER_FLAG:
                self._claim(req)
            return req

    def recv_many(self, n: int, timeout: float | None = None) -> list[Request]:
        """Up to n messages, fair across senders; waits up to timeout for the first ([] then)."""
        if self._retired:
            try:
                reqs = [self._recv_slow(timeout)]
            except Timeout:
                return []
            while len(reqs) < n and (req := self._poll_all(False)) is not None:
                reqs.append(req)
            return reqs
        while True:
            try:
                reqs = self._set.recv_many(n, -1 if timeout is None else timeout_ns(timeout))
                break
            except _core.CorruptChannel as exc:
                self._corrupt(exc.index, exc.reason)
        for req in reqs:
            if req.flags & TRANSFER_FLAG:
                self._claim(req)
        return reqs

    async def arecv(self, timeout: float | None = None) -> Request:
        """recv() for asyncio: the event loop watches the doorbell's eventfd; no thread waits.
        Once the service is closed (close(), its Process closed, the kernel gone for good),
        from this task, another task or another thread, it raises the IpcError recv() raises
        (a waiting arecv is woken for it at once)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._closed:
                raise self._closed_error()
            if self._retired:
                req = self._poll_all(True)
            else:
                try:
                    req = self._set.poll_armed()
                except _core.CorruptChannel as exc:
                    self._corrupt(exc.index, exc.reason)
                    continue
                except ValueError:  # its ServerSet closed meanwhile
                    if self._closed:
                        raise self._closed_error() from None
                    raise
                if req is not None and req.flags & TRANSFER_FLAG:
                    self._claim(req)
            if req is not None:
                return req
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise Timeout(f"no message for {self.name!r} within {timeout} s")
            with self._async_lock:
                if self._closed:
                    raise self._closed_error()
                self._async_waiters += 1
                fds = self._event_fds() if self._retired else [self._event_fd]
            try:
                if len(fds) > 1:
                    await readable_any(loop, fds, left)
                else:
                    await readable(loop, fds[0], left)
            finally:
                self._async_waiter_done()

    def _async_waiter_done(self) -> None:
        with self._async_lock:
            self._async_waiters -= 1
            if self._async_waiters:
                return
            fds, self._fds_to_close = self._fds_to_close, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _close_fd(self, fd: int) -> None:
        """Close one of our eventfds now, or once the last arecv waiting on it has woken."""
        with self._async_lock:
            if self._async_waiters:
                self._fds_to_close.append(fd)
                return
        with contextlib.suppress(OSError):
            os.close(fd)

    def __aiter__(self) -> Service:
        return self

    async def __anext__(self) -> Request:
        """The next message; the loop ends (StopAsyncIteration) once the service is closed,
        also while this waits (close() from another task or thread)."""
        if self._closed:
            raise StopAsyncIteration
        try:
            return await self.arecv()
        except IpcError:
            if self._closed:
                raise StopAsyncIteration from None
            raise

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Service:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def refused(self, sender: int) -> int:
        """How many messages `sender` (a ProcessId) saw refused with WouldBlock (Tock's
        "exceeded" flag, as a counter the sender's library keeps: informational)."""
        return sum(self._set.refused(i) for i, s in list(self._senders.items()) if s == sender)

    def drops(self, sender: int) -> dict[str, int]:
        """Messages from `sender` this side refused under its capability's limits, by reason."""
        out: dict[str, int] = {}
        for i, s in list(self._senders.items()):
            if s == sender:
                for k, v in self._set.drops(i).items():
                    out[k] = out.get(k, 0) + v
        return out

    def _requests(self, poll: float | None) -> Iterator[Request]:
        """What serve() and serve_interface() answer, one request at a time, until the service
        (or its Process) is closed; KernelUnavailable once the kernel went with every channel."""
        while not self._closed and not self._session.user_closed:
            try:
                yield self.recv(poll)
            except Timeout:
                continue
            except IpcError:
                if self._lost is not None:  # the kernel went, and with it every channel
                    raise self._lost from None
                if self._closed or self._session.user_closed:
                    return
                raise

    def serve(self, handler: Callable[[Request], Any], *, poll: float | None = None) -> None:
        """Receive and answer until the service (or its Process) is closed.

        handler(req) returns None (reply opcode 0), an opcode, (opcode, data),
        (opcode, data, payload) or a Message, or replies itself. A handler that raises, or
        returns anything else, answers its caller with an error (an IpcError it raised arrives
        as that class, any other exception as RemoteError naming its type), is logged at
        WARNING, and the loop goes on. A caller that died, or does not read its replies, just
        loses its reply (Request.reply returns False): no client can stop this loop.

        Each handler runs at its caller's priority (see set_priority), the loop's own in
        between. The loop waits untimed (the fastest wait): close() and Process.close() wake it,
        and a signal (KeyboardInterrupt) interrupts it as any recv(). poll (seconds) makes each
        wait a timed one instead: as fast since timed waits sleep as untimed ones do (kept for
        callers that passed it).
        """
        for req in self._requests(poll):
            try:
                self._answer(req, handler)
            finally:
                _core.restore_priority()  # the caller's priority ends with its handler
            # Not held while waiting for the next one: a request the handler dropped unanswered
            # fails its caller now (NoReply), and what it brought (req.caps, regions) goes back
            # at once unless the handler kept a reference.
            del req

    def serve_interface(self, impl: Interface, interface: type[Interface] | None = None, *,
                        poll: float | None = None) -> None:
        """serve() an implementation of a typed interface (capbus.Interface) until the service
        is closed: each request is decoded against the method's annotations, the method called,
        its result encoded; a declared error (Interface.errors) travels as itself, any other
        exception as RemoteError, arguments of the wrong type fail their caller with
        InvalidArgument, garbage with ProtocolError; the loop goes on. `async def` methods run
        to completion one at a time on a private event loop (aserve_interface runs them
        concurrently). interface: which one impl serves (default: the nearest interface among its
        classes, i.e. a class whose methods are all `...`)."""
        handle = self._dispatcher(impl, interface).handle
        loop: asyncio.AbstractEventLoop | None = None
        try:  # serve()'s loop, without its per-request handler frames (the hot path of a proxy)
            for req in self._requests(poll):
                try:
                    coro = handle(req)
                    if coro is not None:
                        if loop is None:
                            loop = asyncio.new_event_loop()
                        loop.run_until_complete(coro)
                except Exception as exc:  # not the method's (handle answers those): still answered
                    self._warn.log("service %r: %s: %s", self.name, type(exc).__name__, exc, exc=exc)
                    if req.expects_reply and not req.replied:
                        reply_failure(req, exc)
                finally:
                    _core.restore_priority()  # as serve(): the caller's priority ends here
                del req  # a request dropped unanswered fails its caller now (NoReply)
        finally:
            if loop is not None:
                loop.close()

    async def aserve_interface(self, impl: Interface, interface: type[Interface] | None = None,
                               *, concurrency: int = 64) -> None:
        """serve_interface() for asyncio: `async def` methods run as tasks, at most `concurrency`
        at a time (then receiving waits: a caller cannot make this service hold more); plain
        methods run inline, on the event loop. Returns once the service is closed and its tasks
        are done."""
        d = self._dispatcher(impl, interface)
        slots = asyncio.Semaphore(concurrency)
        tasks: set[asyncio.Task[None]] = set()

        async def run(coro: Any) -> None:
            try:
                await coro
            finally:
                slots.release()

        try:
            while not self._closed and not self._session.user_closed:
                try:
                    req = await self.arecv(0.5)
                except Timeout:
                    continue
                except IpcError:
                    if self._lost is not None:
                        raise self._lost from None
                    if self._closed or self._session.user_closed:
                        return
                    raise
                coro = d.handle(req)
                del req
                if coro is not None:
                    await slots.acquire()
                    task = asyncio.get_running_loop().create_task(run(coro))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        finally:
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    def _dispatcher(self, impl: Interface, interface: type[Interface] | None) -> Dispatcher:
        return Dispatcher(impl, interface, reply_failure, self._warn.log, self.name)

    def _answer(self, req: Request, handler: Callable[[Request], Any]) -> None:
        try:
            result = handler(req)
            if req.expects_reply and not req.replied:
                _reply_with(req, result)
        except Exception as exc:  # the caller hears of it; the service goes on
            self._warn.log("service %r: handler failed on %r: %s: %s", self.name, req,
                           type(exc).__name__, exc, exc=exc)
            if req.expects_reply and not req.replied:
                reply_failure(req, exc)

    # ---- priority -----------------------------------------------------------------------------

    @property
    def priority(self) -> tuple[int, int] | None:
        """The range (lo, hi) of caller priorities this service serves at (see set_priority);
        None: it serves every call at the receiving thread's own priority."""
        return self._priority

    def set_priority(self, lo: int, hi: int) -> None:
        """Serve each call at its caller's priority, clamped to [lo, hi] (and to what the
        caller's capability allows: Endpoint.restrict(max_priority=)).

        A priority is -nice (-19 = nice 19 ... 20 = nice -20) or 20 + a SCHED_FIFO/SCHED_RR
        priority (21 ... 119). recv() runs the receiving thread at the request's priority until
        reply() or the next recv() (serve(): until the handler returns or raises), then at its
        own again. A service that never calls this adopts nothing. Mind a range below the
        serving thread's own priority (lo < -nice): with ONE serving thread, a handler run at a
        background caller's nice 19 delays the urgent call queued behind it (priority
        inversion; Binder avoids it with a pool of threads). A priority this process may not
        set (RLIMIT_NICE, RLIMIT_RTPRIO, no CAP_SYS_NICE) becomes the most urgent one it may;
        a thread that could not go back to its own priority afterwards adopts none. asyncio
        servers (arecv), recv_many and poll never change the thread's priority: req.priority
        tells the handler what the caller asked for."""
        if type(lo) is not int or type(hi) is not int:
            raise TypeError(f"priority range must be two ints, got ({lo!r}, {hi!r})")
        self._set.set_priority(lo, hi)  # ValueError on a range outside PRIO_MIN..PRIO_MAX
        self._priority = (lo, hi)

    # ---- access -------------------------------------------------------------------------------

    def allow(self, *who: int | str) -> None:
        """Accept these senders (ProcessIds, "uid:N", "package:P", "name:N") from now on."""
        self._session.request(frames.Access(self.handle, [str(w) for w in who], None),
                              via=self._ctl)
        self._access.append(([str(w) for w in who], None))

    def deny(self, *who: int | str) -> None:
        """Refuse these senders from now on; their open channels close at once."""
        self._session.request(frames.Access(self.handle, None, [str(w) for w in who]),
                              via=self._ctl)
        self._access.append((None, [str(w) for w in who]))

    def close(self) -> None:
        """Unregister: the name is free again, and every channel to this service closes. A
        recv or arecv waiting in any thread or task ends (IpcError; `async for` just stops).
        A second close() does nothing."""
        with self._async_lock:
            if self._closed and self._event_fd < 0:
                return
            self._closed = True
        self._set.interrupt()
        with contextlib.suppress(ValueError):
            self._session.on_user_close.remove(self._stop_serving)
        self._session.forget_service(self.handle)
        if self._ctl.closed is None:
            with contextlib.suppress(KernelUnavailable):  # gone meanwhile: nothing to release
                self._session.request(frames.Release(self.handle), via=self._ctl)
        with self._retired_lock:
            retired, self._retired = self._retired, []
        # Wake every event-loop receiver now (an fd write works from any thread), not at its
        # next re-poll; the last of them closes the fds (_close_fd).
        with contextlib.suppress(OSError):
            os.eventfd_write(self._event_fd, 1)
        for r in retired:
            with contextlib.suppress(OSError):
                os.eventfd_write(r.event_fd, 1)
            r.close(self._close_fd)
        fd, self._event_fd = self._event_fd, -1
        self._close_fd(fd)

    def __del__(self) -> None:
        # Dropped without close() (its kernel went, or it was never closed): nothing can wait on
        # its eventfds once the Service is unreachable, so they go with it.
        fd = getattr(self, "_event_fd", -1)
        if fd >= 0:
            self._event_fd = -1
            with contextlib.suppress(OSError):
                os.close(fd)
        for r in getattr(self, "_retired", ()):
            r.close()

    # ---- channels of former kernels -----------------------------------------------------------

    def _event_fds(self) -> list[int]:
        return [self._event_fd, *(r.event_fd for r in self._retired)]

    def _poll_all(self, arm: bool) -> Request | None:
        """One message from the current ServerSet or a retired one, taking turns; None if none
        (arm: and every eventfd armed, as ServerSet.poll_armed)."""
        sets: list[_Retired | None] = [None, *self._retired]
        start = self._turn % len(sets)
        self._turn += 1
        for r in sets[start:] + sets[:start]:
            ss = self._set if r is None else r.set
            try:
                req = ss.poll_armed() if arm else ss.poll()
            except _core.CorruptChannel as exc:
                if r is None:
                    self._corrupt(exc.index, exc.reason)
                else:
                    self._retired_corrupt(r, exc.index, exc.reason)
                continue
            except ValueError:  # closed meanwhile (the service, or a retired set just emptied)
                continue
            if req is None:
                continue
            if req.flags & TRANSFER_FLAG:
                if r is None:
                    self._claim(req)
                else:  # attached under the lost kernel: nothing can claim them now
                    self.dropped_attachments += 1
            return req
        return None

    def _recv_all(self, deadline: float | None) -> Request | None:
        """recv() while channels of a former kernel are served too: poll every ServerSet, then
        sleep on all their eventfds (as arecv does: a client can swallow a wake-up on a shared
        eventfd, so the wait is capped at EVENT_POLL). None once no retired set is left (or
        the service closed); Timeout at the deadline."""
        while self._retired and not self._closed:
            self._prune_retired()  # drained channels of clients that died
            req = self._poll_all(False) or self._poll_all(True)
            if req is not None:
                return req
            left = EVENT_POLL if deadline is None else min(EVENT_POLL, deadline - time.monotonic())
            if left <= 0:
                raise Timeout(f"no message for {self.name!r} within the timeout")
            p = select.poll()
            for fd in self._event_fds():
                p.register(fd, select.POLLIN)
            with contextlib.suppress(InterruptedError):
                p.poll(left * 1000)
        return None

    def _retire(self, old: _core.ServerSet, event_fd: int) -> None:
        """Keep the lost kernel's channels served (reader thread of the new connection)."""
        r = _Retired(old, event_fd, dict(self._chans))
        with self._retired_lock:  # a client's exit is either seen here or dropped after
            for index, (pid, _) in list(r.chans.items()):
                if self._session.peers.gone(pid):
                    r.drop(index)
            if r.live():
                self._retired = [*self._retired, r]
                self._slow = True
                return
        r.close(self._close_fd)  # an arecv may be waiting on its eventfd

    def _retired_peer_exited(self, pid: int) -> None:
        with self._retired_lock:
            for r in self._retired:
                for index, (p, _) in list(r.chans.items()):
                    if p == pid:
                        r.drop(index)
        self._prune_retired()

    def _retired_corrupt(self, r: _Retired, index: int, reason: str) -> None:
        r.drop(index)  # nobody to report to: its kernel is gone
        self.corrupt_channels += 1
        self._warn.log("service %r: garbage on a channel of the lost kernel (%s): channel dropped",
                       self.name, reason)
        self._prune_retired()

    def _prune_retired(self) -> None:
        """Retired sets without channels go; with none left, recv() is native again."""
        with self._retired_lock:
            keep = [r for r in self._retired if r.live()]
            gone = [r for r in self._retired if r not in keep]
            if not gone:
                return
            self._retired = keep
            if not keep and not self._closed:
                self._slow = False
        for r in gone:
            r.close(self._close_fd)  # an arecv may be waiting on its eventfd

    # ---- losing the kernel --------------------------------------------------------------------

    def _closed_error(self) -> IpcError:
        return self._lost if self._lost is not None else IpcError(f"service {self.name!r} is closed")

    def _kernel_lost(self, dead: Collection[int], reconnect: bool) -> None:
        """The kernel is gone: channels whose client died before the kernel could tell us go now;
        the others are served while their clients live."""
        for index, (pid, _) in list(self._chans.items()):
            if pid in dead:
                self._channel_closed(index, drain=True)
        for pid in dead:
            self._retired_peer_exited(pid)
        if not reconnect:
            self._maybe_give_up()

    def _peer_exited(self, pid: int, kernel_lost: bool) -> None:
        self._retired_peer_exited(pid)  # no kernel will ever tell us about those
        if not kernel_lost:
            return  # the kernel closes its channels (ChannelClosed), in order with new ones
        for index, (p, _) in list(self._chans.items()):
            if p == pid:
                self._channel_closed(index, drain=True)
        if not self._session.reconnect:
            self._maybe_give_up()

    def _maybe_give_up(self) -> None:
        """No kernel and no channel left: nothing can ever reach this service again, so a
        waiting recv() raises KernelUnavailable instead of sleeping for ever."""
        if len(self._set) == 0 and not self._retired and not self._closed:
            self._lost = self._session.kernel_lost or KernelUnavailable(
                f"service {self.name!r}: the kernel is gone")
            self._closed = True
            self._set.interrupt()

    def _stop_serving(self) -> None:
        """Process.close(): a serve() loop waiting in recv wakes (Cancelled) and returns."""
        with contextlib.suppress(ValueError):  # the set is closed already
            self._set.interrupt()

    def _lose(self, why: str) -> None:
        self._lost = KernelUnavailable(why)
        self._closed = True
        self._set.interrupt()

    def _rebind(self, handle: int, doorbell_fd: int, event_fd: int, sleep_fd: int) -> None:
        """Reader thread of the new kernel connection, before its first ChannelOpened: the same
        Service, registered again. The old kernel's channels stay in their ServerSet, served
        beside the new one until their clients die (their indices would collide with the new
        kernel's); clients that reconnect open new channels through the new kernel."""
        try:
            new = _core.ServerSet(doorbell_fd, WAIT_CODES[self._session.wait_mode],
                                  ADAPTIVE_SPIN_NS, event_fd=event_fd, sleep_fd=sleep_fd)
        finally:
            os.close(doorbell_fd)
            os.close(sleep_fd)
        old, old_event = self._set, self._event_fd
        self._retire(old, old_event)  # before the swap: a receiver woken below must see it
        self._ctl, self.handle = self._session.control, handle
        self._senders, self._chans = {}, {}
        self._event_fd = event_fd
        if self._priority is not None:
            new.set_priority(*self._priority)
        self._set = new
        self._lost = None
        old.interrupt()  # a recv asleep on it goes on with the new one (and the retired)

    def _replay_access(self) -> None:
        for allow, deny in self._access:
            allow = None if allow is None else [a for a in allow if not a.isdigit()]
            self._session.request(frames.Access(self.handle, allow, deny), via=self._ctl)

    # ---- called by the runtime ----------------------------------------------------------------

    def _claim(self, req: Request) -> None:
        """Take what was attached to this message into req.caps and req.regions. Never raises:
        whatever cannot be taken is dropped (and counted in dropped_attachments).

        The claim names the channel instance (req.generation), so a message never gets the
        attachments of a former client at the same channel index. Received capabilities are
        released back to the kernel when the application stops referring to them (see
        Endpoint.keep), regions when their Region is closed or garbage-collected: what a sender
        pushes unasked cannot fill this process's capability table."""
        try:
            reply = self._session.request(frames.Claim(self.handle, req.index, req.tag,
                                                       req.generation), via=self._ctl)
        except Exception as exc:  # a closed process, a dead kernel: recv() goes on without them
            self._warn.log("service %r: cannot claim the attachments of a message: %s", self.name,
                           exc)
            return
        assert isinstance(reply, frames.Rows)
        self.dropped_attachments += max(0, reply.total - len(reply.rows))
        caps: list[Endpoint] = []
        topics: list[TopicCapability] = []
        regions: list[Region] = []
        for row in reply.rows:
            kind = row.pop("kind")
            if kind == "region":
                region = self._map_claimed(row["handle"])
                if region is not None:
                    regions.append(region)
            elif kind == "topic":
                topics.append(TopicCapability(self._session, frames.Granted(**row),
                                              received=True))
            else:
                caps.append(received_endpoint(self._session, frames.Granted(**row)))
        req.caps, req.regions, req.topics = tuple(caps), tuple(regions), tuple(topics)

    def _map_claimed(self, handle: int) -> Region | None:
        """A claimed region, mapped as its seals allow; None (and the capability given back) if
        it cannot be mapped at all."""
        try:
            return region_from(self._session,
                               self._session.request_fds(frames.MapRegion(handle), via=self._ctl))
        except Exception as exc:
            self.dropped_attachments += 1
            self._warn.log("service %r: dropped a region that came with a message: %s", self.name,
                           exc)
            self._ctl.request_nowait(frames.Release(handle))
            return None

    def _channel_opened(self, msg: frames.ChannelOpened, fds: list[int], alive: bool = True) -> None:
        try:
            self._set.add(msg.index, fds[0], fds[1], msg.nslots, msg.arena_size, msg.sender,
                          reply_event_fd=fds[2], reply_sleep_fd=fds[3], reply_sleep_keep_fd=fds[4],
                          generation=msg.generation)
            self._senders[msg.index] = msg.sender
            self._chans[msg.index] = (msg.pid, msg.generation)
        except Exception as exc:  # could not map it: the kernel closes it for its client
            self._warn.log("service %r cannot map channel %d: %s", self.name, msg.index, exc)
            self._ctl.request_nowait(frames.ReportBad(self.handle, msg.index, str(exc)))

    def _channel_closed(self, index: int, drain: bool = False) -> None:
        self._senders.pop(index, None)
        self._chans.pop(index, None)
        try:
            self._set.remove(index, drain)
        except KeyError:  # never mapped, or already dropped as corrupt
            pass

    def _corrupt(self, index: int, reason: str) -> None:
        # Free the index here first: once the kernel hears of it, it may reuse the index.
        self._channel_closed(index)
        self.corrupt_channels += 1
        self._warn.log("service %r: garbage on channel %d (%s): channel dropped", self.name, index,
                       reason)
        self._ctl.request_nowait(frames.ReportBad(self.handle, index, reason))


class _Retired:
    """A ServerSet of a lost kernel and what we know of its channels (index -> client pid,
    generation); it goes once its last channel does."""

    __slots__ = ("set", "event_fd", "chans")

    def __init__(self, ss: _core.ServerSet, event_fd: int, chans: dict[int, tuple[int, int]]) -> None:
        self.set, self.event_fd, self.chans = ss, event_fd, chans

    def live(self) -> bool:
        return len(self.set) > 0 or self.set.draining > 0

    def drop(self, index: int) -> None:
        self.chans.pop(index, None)
        with contextlib.suppress(KeyError, ValueError):
            self.set.remove(index, True)  # what the client sent before it died is delivered

    def close(self, close_fd: Callable[[int], None] | None = None) -> None:
        if close_fd is not None:
            close_fd(self.event_fd)
            return
        with contextlib.suppress(OSError):
            os.close(self.event_fd)
        # The set itself goes with its last reference (a Request may still hold one to reply).


def reply_failure(req: Request, exc: Exception) -> None:
    """Tell the caller its request failed: a capbus error as its class, an application's
    RemoteError as it came, anything else as RemoteError with the exception's type name."""
    if isinstance(exc, RemoteError) and exc.code is not None:
        req.reply_error(exc.code, exc.text)
    elif isinstance(exc, IpcError) and not isinstance(exc, RemoteError):
        req._reply_ipc_error(type(exc).code, str(exc))
    else:
        req._reply_ipc_error(RemoteError.code, f"{type(exc).__name__}: {exc}")


class _RateLimitedLog:
    """WARNING lines at most `rate` a second (a burst of `rate`); what it held back is counted in
    the next line it lets through. A hostile client that makes every request fail cannot flood
    the server's log."""

    def __init__(self, logger: logging.Logger, rate: float = 10.0) -> None:
        self._log, self._rate = logger, rate
        self._tokens, self._at, self._held = rate, time.monotonic(), 0

    def log(self, fmt: str, *args: Any, exc: BaseException | None = None) -> None:
        now = time.monotonic()
        self._tokens = min(self._rate, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1:
            self._held += 1
            return
        self._tokens -= 1
        if self._held:
            fmt += " (%d more such lines held back)"
            args = (*args, self._held)
            self._held = 0
        self._log.warning(fmt, *args)
        if exc is not None:
            self._log.debug("the handler's traceback", exc_info=exc)


def _reply_with(req: Request, result: Any) -> None:
    if result is None:
        req.reply(0)
    elif isinstance(result, int) or hasattr(type(result), "__index__"):
        req.reply(result)
    elif isinstance(result, Message):
        req.reply(result.opcode, result.data, result.payload, result.flags)
    elif isinstance(result, tuple):
        req.reply(*result)
    else:
        raise TypeError(f"handler returned {type(result).__name__}: return None, an opcode, "
                        "(opcode, data[, payload]) or a Message")
