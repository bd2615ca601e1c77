"""The runtime's entry point: capbus.connect() and the Process it returns.

A Process is one connection to the kernel with its own ProcessId. It belongs to the OS process
that opened it: after fork() the child's copy refuses to act (it must connect on its own).

The Process is the face: connect, register, lookup, create_region, subscribe, query, grants,
and the reconnect. The plumbing its objects share (the control connection, the fork check,
requests, the tables by handle) is its Session (session.py): Endpoint, Service, Region and
Subscription are handed that, never the Process. The Process builds them, and routes the
control thread's events to them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypedDict, Unpack

from .. import _core, _paths, _protect
from .._errors import IpcError, KernelUnavailable, PermissionDenied, ServiceNotFound
from .._protocol import frames
from .._protocol.names import check_grant_key, check_name
from .control import Control
from .endpoint import Endpoint, endpoint_for
from .limits import PRIO_MAX, PRIO_MIN, limits_request
from .peers import PeerWatch
from .region import Region, region_from
from .service import Service
from .session import Session
from .subscription import Subscription
from .topic import Publisher, Subscriber, TopicCapability

log = logging.getLogger("capbus")
WAIT_MODES = ("adaptive", "spin", "block")
_live: weakref.WeakSet[Process] = weakref.WeakSet()


class Process:
    """This process's identity and capabilities, as the kernel knows them."""

    def __init__(self, sock: socket.socket, wait: str, *, path: str | None = None,
                 reconnect: bool = False,
                 on_reconnect: Callable[[Process], None] | None = None) -> None:
        if wait not in WAIT_MODES:
            raise ValueError(f"wait must be one of {WAIT_MODES}, not {wait!r}")
        if reconnect and path is None:
            raise ValueError("reconnect=True needs a kernel path (not an inherited socket)")
        # The plumbing every object this Process hands out shares (they never see the Process).
        self._session = Session(wait, reconnect, PeerWatch(self._peer_exited))
        self._lock = self._session.lock  # also guards _grants
        self._path = path
        self._kernel_uid: int | None = None  # also trusted to run the kernel (see connect)
        self._reconnect_callbacks: list[Callable[[Process], None]] = (
            [on_reconnect] if on_reconnect is not None else [])
        self._rebinding: Service | None = None
        self._session.control = Control(sock, self._on_event, self._on_response, self._on_lost)
        try:
            welcome = self._session.control.hello(wait)
        except BaseException:
            sock.close()
            raise
        self._session.process_id = welcome.process_id
        self.package: str | None = welcome.package
        # Startup grants: key -> its Endpoint, or None while its service has not registered
        # (resolved on first use, see grant()). A key the spawner revokes leaves the dict.
        self._grants: dict[str, Endpoint | None] = {}
        self._take_grants(welcome)
        _live.add(self)

    def __repr__(self) -> str:
        return f"<capbus.Process id={self.id} package={self.package}>"

    @property
    def id(self) -> int:
        """This connection's ProcessId, as the kernel knows it (a reconnect gives a new one)."""
        return self._session.process_id

    @property
    def wait_mode(self) -> str:
        """How calls and receives wait: "adaptive", "spin" or "block" (see connect)."""
        return self._session.wait_mode

    @property
    def kernel_lost(self) -> KernelUnavailable | None:
        """Set while no kernel serves this Process (None: connected): what requests fail with."""
        return self._session.kernel_lost

    # The connection's plumbing lives in the Session; these names stay for tools and tests.
    @property
    def _control(self) -> Control:
        return self._session.control

    @property
    def _pid(self) -> int:
        return self._session.pid

    @property
    def _endpoints(self) -> dict[int, Endpoint]:
        return self._session.endpoints

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Process:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End this connection: the kernel drops its registrations and tells its watchers. Its
        services close here too: a recv/arecv waiting on one (in any thread or task) ends, and
        `async for` over one stops."""
        if os.getpid() == self._session.pid:
            self._session.user_closed = True
            self._session.control.close()
            self._session.peers.close()
            for hook in list(self._session.on_user_close):
                hook()  # a serve() loop asleep in an untimed recv wakes to see user_closed
            for svc in list(self._session.services.values()):
                svc.close()

    def on_reconnect(self, callback: Callable[[Process], None]) -> None:
        """Call `callback(process)` (on a runtime thread) each time this Process, connected with
        reconnect=True, has reconnected to a new kernel and re-registered its services and
        re-opened its endpoints."""
        self._reconnect_callbacks.append(callback)

    @property
    def closed(self) -> bool:
        return self._session.control.closed is not None

    # ---- startup grants -----------------------------------------------------------------------

    @property
    def grants(self) -> Mapping[str, Endpoint]:
        """The capabilities this process was handed at start (Kernel.spawn(grants=...), a
        manifest's grants, its package's grants in the policy), by key: a read-only mapping.
        Reading a key whose service had not registered when this process connected asks the
        kernel for it then (ServiceNotFound if it is still not there; grant(key, timeout)
        waits). Empty for a process given none."""
        return _Grants(self)

    def grant(self, key: str, timeout: float = 0) -> Endpoint:
        """The startup grant `key` as an Endpoint, waiting up to `timeout` seconds for its
        service to register (ServiceNotFound after that; KeyError if this process was given no
        such grant, or it was revoked)."""
        check_grant_key(key)
        with self._lock:
            if key not in self._grants:
                raise KeyError(f"this process holds no grant {key!r} (its grants: "
                               f"{sorted(self._grants)})")
            ep = self._grants[key]
        if ep is not None and not ep._closed:
            return ep
        reply = self._request(frames.Grant(key, _ms(timeout)), timeout)
        ep = self._endpoint(reply)
        with self._lock:
            if key in self._grants:
                self._grants[key] = ep
                ep._grant_key = key
        return ep

    def _take_grants(self, welcome: frames.Welcome) -> None:
        """The grants a Welcome lists (after a reconnect: the new kernel's, replacing ours)."""
        old = self._grants
        grants: dict[str, Endpoint | None] = {}
        for row in welcome.grants:
            key = row["key"]
            ep = old.get(key)
            if not row["handle"]:
                grants[key] = None
                if ep is not None:
                    ep._lose(f"grant {key!r} was not resolved again after a reconnect: ask "
                             "for it with grant()")
                continue
            granted = frames.Granted(row["handle"], row["process_id"], row["name"],
                                     row["rights"], row["limits"])
            if ep is not None and not ep._closed:
                ep._rebind(granted)
                with self._lock:
                    self._session.endpoints[granted.handle] = ep
            else:
                ep = self._endpoint(granted)
                ep._grant_key = key
            grants[key] = ep
        for key, ep in old.items():
            if key not in grants and ep is not None:
                ep._lose(f"this process holds no grant {key!r} since its reconnect")
        with self._lock:
            self._grants = grants

    def _grant_revoked(self, key: str) -> None:
        """The control thread: the spawner revoked grant `key`."""
        with self._lock:
            ep = self._grants.pop(key, None)
        if ep is not None:
            self._forget(ep)
            ep._lose(f"grant {key!r} was revoked by this process's spawner",
                     _core.STATE_REVOKED)

    # ---- registries ---------------------------------------------------------------------------

    def register(self, name: str, *, allow: list[str | int] | None = None,
                 limits: dict[str, Any] | None = None, max_caps: int | None = None,
                 max_regions: int | None = None, max_region_bytes: int | None = None,
                 max_channels_per_process: int | None = None,
                 max_channels_per_uid: int | None = None,
                 attach_ttl: float | None = None,
                 priority: tuple[int, int] | None = None, gateway: bool = False) -> Service:
        """Serve under a string name (first come, first served): NameTaken, PermissionDenied.

        allow: who may reach it (ProcessIds, "uid:N", "package:P", "name:N"; None: everyone).
        limits: defaults for every endpoint it hands out, as keywords of Endpoint.restrict
        (rate_limit, bandwidth, max_message_size, expires_in).

        Bounds the kernel enforces for this service (None: the default in brackets):
        max_caps [16] and max_regions [16] (each at most 64): capabilities and regions one
        message may carry; max_region_bytes [1 GiB]: their total size. A sender over a bound
        gets MessageTooLarge before its message is sent. max_channels_per_process [128] and
        max_channels_per_uid [1024] (below 4096, the service's total): channels one client
        process (every connection of one OS process together) and one uid may hold to it; past
        that, opening one more (a new calling thread, an acall) raises OutOfMemory.
        attach_ttl [60 s]: how long an attachment waits for its message to be received.

        priority: (lo, hi), the range of caller priorities its handlers run at (see
        Service.set_priority; None: every handler runs at the serving thread's own).
        gateway: serve a NAME@HOST name (a remote service) as a gateway; the kernel refuses
        such names to anyone else (capbus.Gateway sets it; docs/POLICY.md [gateways]).
        """
        check_name(name)
        bounds = _bounds(max_caps, max_regions, max_region_bytes, max_channels_per_process,
                         max_channels_per_uid, attach_ttl)
        if priority is not None:
            lo, hi = priority  # checked before the name is taken
            if not (type(lo) is int and type(hi) is int and PRIO_MIN <= lo <= hi <= PRIO_MAX):
                raise ValueError(f"priority must be (lo, hi) with {PRIO_MIN} <= lo <= hi <= "
                                 f"{PRIO_MAX}, got {priority!r}")
        frame = frames.Register(name, _allow(allow), limits_request(**(limits or {})), bounds,
                                bool(gateway))
        svc = self._service(self._request_fds(frame), frame)
        if priority is not None:
            svc.set_priority(*priority)
        return svc

    def register_package(self, *, allow: list[str | int] | None = None,
                         limits: dict[str, Any] | None = None,
                         **bounds: Unpack[_Bounds]) -> Service:
        """Serve under this process's verified package name (bounds: as for register())."""
        frame = frames.RegisterPackage(_allow(allow), limits_request(**(limits or {})),
                                       _bounds(**bounds))
        return self._service(self._request_fds(frame), frame)

    def lookup(self, name: str, timeout: float = 0) -> Endpoint:
        """An endpoint capability for a registered name: ServiceNotFound unless it appears
        within `timeout` seconds (the kernel answers when it registers; no polling)."""
        reply = self._request(frames.Lookup(check_name(name), _ms(timeout)), timeout)
        return self._endpoint(reply, ("name", name))

    def lookup_package(self, package: str, timeout: float = 0) -> Endpoint:
        check_name(package, "package name")
        reply = self._request(frames.LookupPackage(package, _ms(timeout)), timeout)
        return self._endpoint(reply, ("package", package))

    def create_region(self, size: int) -> Region:
        """A new shared memory region of `size` bytes (a memfd the kernel creates), mapped."""
        return self._region(self._request_fds(frames.CreateRegion(size)))

    def subscribe_registrations(self) -> Subscription:
        """Opt in to registration notices (coalesced, carrying no identity)."""
        reply = self._request(frames.Subscribe())
        assert isinstance(reply, frames.Subscribed)
        with self._lock:
            sub = self._session.subscriptions.get(reply.handle)
            if sub is None:
                sub = Subscription(self._session, reply.handle)
                self._session.subscriptions[reply.handle] = sub
        return sub

    # ---- topics -------------------------------------------------------------------------------

    def publish(self, name: str, *, max_size: int = 4096, history: int = 0,
                overflow: str = "drop-oldest", allow: list[str | int] | None = None,
                max_subscribers: int = 8, max_depth: int = 16, max_held: int = 8,
                gateway: bool = False) -> Publisher:
        """Publish the topic `name` (one publisher per name: NameTaken): samples of at most
        max_size bytes, written once into memory this process owns and read in place by every
        subscriber. history: the last N samples a late subscriber gets first. overflow:
        "drop-oldest" (a subscriber more than its depth behind loses its oldest samples,
        counted; nobody waits) or "block" (publish waits for room, or WouldBlock).
        allow: who may subscribe (as for register). max_subscribers, max_depth (the deepest
        ring a subscriber may ask for) and max_held (samples one subscriber may hold besides
        its ring) size the pool: max_size x (history + 4 + max_subscribers x (max_depth +
        max_held) + 1) bytes, counted against this uid's region bytes.
        gateway: publish a NAME@HOST topic (a remote one re-published here) as a gateway; the
        kernel refuses such names to anyone else (capbus.Gateway sets it)."""
        check_name(name, "topic name")
        frame = frames.PublishTopic(name, max_size, history, overflow, _allow(allow),
                                    max_subscribers, max_depth, max_held, bool(gateway))
        reply, fds = self._request_fds(frame)
        assert isinstance(reply, frames.TopicCreated)
        ctl = self._session.control
        try:
            pub = Publisher(self._session, reply.handle, name, fds[0], reply.nslots,
                            reply.slot_size, max_size, history, overflow, max_held)
        except BaseException:
            self._session.request_nowait(frames.Release(reply.handle), via=ctl)
            raise
        finally:
            for fd in fds:
                os.close(fd)
        pub._frame = frame
        with self._lock:
            self._session.publishers[reply.handle] = pub
        try:
            self._request(frames.SealTopic(reply.handle), via=ctl)
        except BaseException:
            pub.close()
            raise
        return pub

    def subscribe(self, name: str | TopicCapability, depth: int = 0,
                  timeout: float = 0) -> Subscriber:
        """Subscribe to the topic `name`: ServiceNotFound unless it is published within
        `timeout` seconds. depth: how many samples may wait for this subscriber before it
        loses the oldest (0: the topic's max_depth, also the most it may ask for).
        name may be a TopicCapability this process holds (handed on by the publisher or
        someone it shared it with): the capability is the authority, not the allowlist."""
        handle = 0
        if isinstance(name, TopicCapability):
            handle, name = name.handle, name.name
        check_name(name, "topic name")
        deadline = time.monotonic() + timeout
        pause = 0.002
        while True:
            try:
                reply, fds = self._request_fds(frames.SubscribeTopic(name, depth, handle))
                break
            except ServiceNotFound:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                time.sleep(min(pause, left))
                pause = min(pause * 2, 0.05)
        assert isinstance(reply, frames.TopicSubscribed)
        try:
            sub = Subscriber(self._session, reply, name, fds)
        except BaseException:
            self._session.request_nowait(frames.Release(reply.handle))
            raise
        with self._lock:
            self._session.subscribers[reply.handle] = sub
        return sub

    # ---- introspection ------------------------------------------------------------------------

    def query(self, what: str, process_id: int = 0, *,
              timeout: float | None = None) -> list[dict[str, Any]]:
        """The kernel's tables, for tools (the `capbus` command, metrics): every row of
        "processes", "services", "channels" (with their counters), "topics" (one row per
        subscription, with its counters), or "caps" (of process_id),
        as dicts; the kernel answers in pages, this follows them all.

        Only the kernel's own user (or root) may ask, and not from a sandboxed process or one
        under a lookup list: the tables name every process and service (PermissionDenied).
        An unknown `what` is a ValueError from the kernel. timeout: seconds per page."""
        rows: list[dict[str, Any]] = []
        while True:
            reply = self._request(frames.Query(what, len(rows), 200, process_id), timeout)
            assert isinstance(reply, frames.Rows)
            rows.extend(reply.rows)
            if not reply.rows or len(rows) >= reply.total:
                return rows

    # ---- internals ----------------------------------------------------------------------------

    def _check(self) -> None:
        self._session.check()

    def _request(self, msg: frames.Frame, timeout: float | None = None,
                 via: Control | None = None) -> frames.Frame:
        return self._session.request(msg, timeout, via)

    def _request_fds(self, msg: frames.Frame, timeout: float | None = None,
                     via: Control | None = None) -> tuple[frames.Frame, list[int]]:
        """A request whose answer carries fds: the caller owns (and closes) them."""
        return self._session.request_fds(msg, timeout, via)

    def _service(self, answer: tuple[frames.Frame, list[int]],
                 frame: frames.Frame | None = None) -> Service:
        reply, _ = answer
        assert isinstance(reply, frames.Registered)
        svc = self._session.services[reply.handle]
        svc._frame = frame
        return svc

    def _on_response(self, msg: frames.Frame, fds: list[int]) -> list[int]:
        """Reader thread: a new service exists before its first ChannelOpened is read."""
        if isinstance(msg, frames.Registered):
            svc = self._rebinding
            if svc is not None:  # a reconnect re-registers an existing Service
                self._rebinding = None
                svc._rebind(msg.handle, *fds)
                self._session.services[msg.handle] = svc
            else:
                self._session.services[msg.handle] = Service(self._session, msg.handle, msg.name,
                                                             *fds)
            return []
        return fds

    def _endpoint(self, reply: frames.Frame, origin: tuple[str, str] | None = None) -> Endpoint:
        return endpoint_for(self._session, reply, origin)

    def _region(self, answer: tuple[frames.Frame, list[int]]) -> Region:
        return region_from(self._session, answer)

    def _forget(self, ep: Endpoint) -> None:
        self._session.forget_endpoint(ep)

    def _on_event(self, msg: frames.Frame, fds: list[int]) -> None:
        """Called on the control reader thread."""
        if isinstance(msg, frames.SubscriberJoined):
            pub = self._session.publishers.get(msg.handle)
            if pub is not None:
                pub._joined(msg, fds)
                return
        elif isinstance(msg, frames.SubscriberLeft):
            pub = self._session.publishers.get(msg.handle)
            if pub is not None:
                pub._left(msg.index)
        elif isinstance(msg, frames.TopicClosed):
            tsub = self._session.subscribers.get(msg.handle)
            if tsub is not None:
                tsub._ended(msg.reason)
        if isinstance(msg, frames.ChannelOpened):
            svc = self._session.services.get(msg.handle)
            if svc is not None:
                svc._channel_opened(msg, fds, self._session.peers.watch(msg.pid))
        elif isinstance(msg, frames.ChannelClosed):
            svc = self._session.services.get(msg.handle)
            if svc is not None:  # its client left: deliver what it already sent, then drop it
                svc._channel_closed(msg.index, drain=True)
        for fd in fds:
            os.close(fd)
        if isinstance(msg, frames.GrantRevoked):
            self._grant_revoked(msg.key)
        elif isinstance(msg, frames.Death):
            ep = self._session.endpoints.get(msg.handle)
            if ep is not None:
                ep._died()
        elif isinstance(msg, frames.RegistrationNotice):
            sub = self._session.subscriptions.get(msg.handle)
            if sub is not None:
                sub._notify()

    # ---- losing the kernel ---------------------------------------------------------------------

    def _peer_exited(self, pid: int) -> None:
        """The peer watch's thread: the OS process `pid` at the other end of some channels exited.
        Its lanes fail with PeerDied at once (the kernel, if alive, says the same on the control
        pages); with the kernel gone, services also drop its channels and watchers hear of it."""
        eps = [ep for ep in list(self._session.lane_endpoints) if ep._served_by(pid)]
        for ep in eps:
            ep._mark_lanes(_core.STATE_PEER_DEAD, pid)
            if ep._server_pid == pid and ep._ctl.closed is not None:  # no kernel will say it
                ep._died()
        lost = self._session.kernel_lost is not None
        for svc in list(self._session.services.values()):
            svc._peer_exited(pid, lost)  # channels of a lost kernel go in any case
        # A caller between its last state check and its futex sleep missed that wake-up: the
        # window is a few instructions, so two more wakes a little later close it. On timers,
        # never in the watch's thread: it must keep closing the pidfds of peers that exit (a
        # server with many short-lived clients held hundreds of them while this thread slept).
        for pause in (0.005, 0.055) if eps else ():
            t = threading.Timer(pause, _mark_dead, (eps, pid))
            t.daemon = True
            t.start()

    def _on_lost(self, reason: KernelUnavailable) -> None:
        """The control reader thread, as the kernel goes: channels stay (both peers may live);
        what the kernel would have told us about them we now see ourselves."""
        if self._session.user_closed:
            return
        what = "reconnecting" if self._session.reconnect else "connect again once a kernel is back"
        self._session.kernel_lost = KernelUnavailable(f"{reason} ({what})")
        self._session.control._closed = self._session.kernel_lost
        log.warning("capbus: lost the kernel (%s): %s", reason, what)
        dead = set(self._session.peers.dead)  # one copy (made in C, under the GIL): the watch
        for svc in list(self._session.services.values()):  # thread may add to it meanwhile
            svc._kernel_lost(dead, self._session.reconnect)
        for pub in list(self._session.publishers.values()):
            pub._kernel_lost()
        for tsub in list(self._session.subscribers.values()):
            tsub._kernel_lost()
        if self._session.reconnect:
            threading.Thread(target=self._reconnect_loop, name="capbus-reconnect", daemon=True).start()

    def _reconnect_loop(self) -> None:
        """Connect to the same path again, with backoff (50 ms doubling to 2 s: one attempt costs
        a failed connect(2)), then bring back what can be brought back."""
        delay = 0.05
        while not self._session.user_closed:
            try:
                sock = _open_socket(self._path or "", self._kernel_uid)
                control = Control(sock, self._on_event, self._on_response, self._on_lost)
                try:
                    welcome = control.hello(self._session.wait_mode)
                except BaseException:
                    sock.close()
                    raise
                break
            # PermissionDenied first: it is an OSError (a PermissionError) too.
            except PermissionDenied as exc:  # a squatter took the path: keep waiting for ours
                log.warning("capbus: reconnect to %s refused: %s", self._path, exc)
            except (KernelUnavailable, OSError) as exc:
                log.debug("capbus: reconnect to %s failed: %s", self._path, exc)
            time.sleep(delay)
            delay = min(2.0, delay * 2)
        else:
            return
        try:
            self._rebind_all(control, welcome)
        except Exception:
            log.exception("capbus: restoring state after a reconnect failed")
        for cb in list(self._reconnect_callbacks):
            try:
                cb(self)
            except Exception:
                log.exception("on_reconnect callback %r raised", cb)

    def _rebind_all(self, control: Control, welcome: frames.Welcome) -> None:
        old_services = list(self._session.services.values())
        old_endpoints = list(self._session.endpoints.values())
        old_publishers = list(self._session.publishers.values())
        with self._lock:
            self._session.control = control
            self._session.services = {}
            self._session.endpoints = {}
            self._session.publishers = {}
            self._session.subscribers = {}  # the lost kernel's: they raise KernelUnavailable
            self._session.process_id, self.package = welcome.process_id, welcome.package
            self._session.kernel_lost = None
            self._session.peers.dead.clear()
        self._take_grants(welcome)
        log.warning("capbus: reconnected to %s as process %d", self._path, self.id)
        for svc in old_services:
            if svc._closed and svc._lost is None:
                continue
            frame = _rebind_frame(svc._frame)
            if frame is None:
                svc._lose("it was not registered by this Process")
                continue
            self._rebinding = svc
            try:
                control.request(frame)
                svc._replay_access()
            except IpcError as exc:
                self._rebinding = None
                log.warning("capbus: cannot re-register %r after a reconnect: %s", svc.name, exc)
                svc._lose(f"service {svc.name!r} could not be re-registered after a reconnect: {exc}")

        for pub in old_publishers:
            self._republish(control, pub)

        def relookup(ep: Endpoint) -> None:
            kind, name = ep._origin or ("", "")
            try:
                msg: frames.Frame = (frames.Lookup(name, _ms(_RELOOKUP)) if kind == "name"
                                       else frames.LookupPackage(name, _ms(_RELOOKUP)))
                reply, _ = control.request(msg, _RELOOKUP)
                assert isinstance(reply, frames.Granted)
            except IpcError as exc:
                log.warning("capbus: cannot look %r up again after a reconnect: %s", name, exc)
                alive = bool(ep._lanes) and not self._session.peers.gone(ep._server_pid)
                ep._lose(f"endpoint {name!r} was lost with the kernel and not found again: {exc}"
                         + (" (lanes open before work while its server lives)" if alive else ""),
                         keep_lanes=alive)
                return
            ep._rebind(reply)
            with self._lock:
                self._session.endpoints[reply.handle] = ep

        threads = []
        for ep in old_endpoints:
            if ep._closed or ep._grant_key is not None:  # grants: done by _take_grants
                continue
            if ep._origin is None:  # restricted or received: the new kernel never granted it
                ep._lose(f"endpoint {ep.name!r} was derived or delegated under the lost kernel: "
                         "look the service up again")
                continue
            t = threading.Thread(target=relookup, args=(ep,), name="capbus-relookup", daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join(_RELOOKUP + 35)
        self._session.regions.clear()
        self._session.subscriptions.clear()

    def _republish(self, control: Control, pub: Publisher) -> None:
        """A reconnect: publish the topic's name again in the new kernel, with what made it
        (a new pool; subscribers subscribe anew). If the name is taken meanwhile, or the new
        kernel refuses it, the Publisher is closed with that error."""
        if pub._closed is not None or pub._frame is None:
            return
        try:
            reply, fds = control.request(pub._frame)
            assert isinstance(reply, frames.TopicCreated)
            try:
                with self._lock:
                    self._session.publishers[reply.handle] = pub
                pub._republish(reply.handle, control, fds[0], reply.nslots, reply.slot_size)
            finally:
                for fd in fds:
                    os.close(fd)
            control.request(frames.SealTopic(reply.handle))
        except (IpcError, OSError, ValueError) as exc:
            log.warning("capbus: cannot publish topic %r again after a reconnect: %s", pub.name,
                        exc)
            pub._lost(KernelUnavailable(f"topic {pub.name!r} could not be published again after "
                                        f"a reconnect: {exc}"))

    def _after_fork_in_child(self) -> None:
        self._session.control.forget_after_fork(
            KernelUnavailable(
                f"this capbus Process belongs to pid {self._session.pid}; a forked child must call "
                "capbus.connect() for its own connection"
            )
        )


class _Grants(Mapping[str, "Endpoint"]):
    """Process.grants: a read-only view; a pending grant is asked for when it is read."""

    def __init__(self, proc: Process) -> None:
        self._proc = proc

    def __getitem__(self, key: str) -> Endpoint:
        if key not in self._proc._grants:
            raise KeyError(key)
        return self._proc.grant(key)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._proc._grants))

    def __len__(self) -> int:
        return len(self._proc._grants)

    def __contains__(self, key: object) -> bool:
        return key in self._proc._grants

    def __repr__(self) -> str:
        return f"<capbus grants {sorted(self._proc._grants)}>"


class _Bounds(TypedDict, total=False):
    """register_package()'s bounds: the keywords register() takes for them."""

    max_caps: int | None
    max_regions: int | None
    max_region_bytes: int | None
    max_channels_per_process: int | None
    max_channels_per_uid: int | None
    attach_ttl: float | None


def _bounds(max_caps: int | None = None, max_regions: int | None = None,
            max_region_bytes: int | None = None, max_channels_per_process: int | None = None,
            max_channels_per_uid: int | None = None,
            attach_ttl: float | None = None) -> dict[str, int] | None:
    """The wire form of a service's bounds (the kernel checks the ranges)."""
    out: dict[str, int] = {}
    for key, value in (("max_caps", max_caps), ("max_regions", max_regions),
                       ("max_region_bytes", max_region_bytes),
                       ("max_channels_per_process", max_channels_per_process),
                       ("max_channels_per_uid", max_channels_per_uid)):
        if value is not None:
            if type(value) is not int or value < 0:
                raise ValueError(f"{key} must be an int >= 0, got {value!r}")
            out[key] = value
    if attach_ttl is not None:
        if not attach_ttl > 0:
            raise ValueError(f"attach_ttl must be > 0 seconds, got {attach_ttl!r}")
        out["attach_ttl_ms"] = max(1, int(attach_ttl * 1000))
    return out or None


def _ms(timeout: float) -> int:
    if timeout < 0:
        raise ValueError("timeout must be >= 0")
    return 0 if timeout == 0 else max(1, int(timeout * 1000))


def _allow(allow: list[str | int] | None) -> list[str] | None:
    return None if allow is None else [str(a) for a in allow]


def _after_fork() -> None:
    for proc in list(_live):
        proc._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork)


def _inherited_socket() -> socket.socket | None:
    """The pre-connected socket kernel.spawn() left us, taken once (later connects use the path)."""
    raw = os.environ.pop(_paths.ENV_FD, None)
    if raw is None:
        return None
    if os.environ.get(_paths.ENV_SANDBOXED) == "1":
        # The launcher set dumpable 0 before exec, which resets it: other processes of our uid
        # must not read this sandboxed process's memory, whatever CAPBUS_DEBUGGABLE says.
        # (Skipping this harms only ourselves.)
        _protect.protect(debuggable=False)
    try:
        fd = int(raw)
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise OSError("not a socket")
    except (ValueError, OSError):
        log.warning("ignoring %s=%r: not an inherited socket", _paths.ENV_FD, raw)
        return None
    os.set_inheritable(fd, False)
    return socket.socket(fileno=fd)


def _open_socket(path: str, kernel_uid: int | None = None) -> socket.socket:
    """Connect to the kernel at `path`, once its directory passed the checks (_paths.open_dir:
    the connection goes through the directory's fd, so a squatter cannot swap it in between) and
    the kernel on the other end runs as this user, root or kernel_uid (SO_PEERCRED): else
    PermissionDenied, and nothing was sent to it."""
    trusted = {os.getuid(), 0} | ({kernel_uid} if kernel_uid is not None else set())
    directory = os.path.dirname(os.path.abspath(path))
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    except PermissionError:
        # EPERM from socket() itself: a seccomp filter, like a capbus sandbox's, refuses it.
        raise PermissionDenied(
            f"cannot connect to {path}: new unix sockets are refused here (this process runs in "
            "a sandbox); use the connection it was launched with (capbus.connect() with no path "
            "and reconnect=False, once per process)"
        ) from None
    try:
        dirfd = _paths.open_dir(directory, frozenset(trusted))
    except FileNotFoundError:
        sock.close()
        raise KernelUnavailable(
            f"no capbus kernel at {path} (its directory does not exist): start one with "
            "`capbus kernel` or capbus.Kernel(), or set CAPBUS_SOCKET") from None
    except BaseException:
        sock.close()
        raise
    from .control import _KERNEL_GRACE  # read at call time: tests shorten it

    sock.settimeout(_KERNEL_GRACE)  # a full backlog (a kernel not accepting) must not hang us
    try:
        sock.connect(_paths.via_fd(dirfd, os.path.basename(path)))
    except TimeoutError:
        sock.close()
        raise KernelUnavailable(f"the kernel at {path} does not accept connections") from None
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise KernelUnavailable(
            f"no capbus kernel at {path} ({exc.strerror}): start one with `capbus kernel` "
            "or capbus.Kernel(), or set CAPBUS_SOCKET"
        ) from None
    except PermissionError:
        sock.close()
        raise PermissionDenied(
            f"the kernel at {path} is not open to this user (uid {os.getuid()}): its owner may "
            "admit it with `capbus kernel --allow-uid` / --allow-group") from None
    except OSError:
        sock.close()
        raise
    finally:
        os.close(dirfd)
    uid = _paths.peer_uid(sock)
    if uid not in trusted:
        sock.close()
        raise PermissionDenied(
            f"the kernel at {path} runs as uid {uid}, not as this user (uid {os.getuid()}) or "
            "root: it may be another user's trap, so nothing was sent to it; if you mean to use "
            f"that user's kernel, say so with connect(kernel_uid={uid}) or "
            f"{_paths.ENV_KERNEL_UID}={uid}")
    sock.settimeout(None)
    return sock


def _mark_dead(eps: list[Endpoint], pid: int) -> None:
    for ep in eps:
        ep._mark_lanes(_core.STATE_PEER_DEAD, pid)


def connect(path: str | None = None, wait: str = "adaptive", *, reconnect: bool = False,
            on_reconnect: Callable[[Process], None] | None = None,
            kernel_uid: int | None = None, debuggable: bool | None = None) -> Process:
    """Connect this process to the kernel at `path`, or, with no path, to the first of: the
    socket inherited from kernel.spawn(), the kernel this process embeds (capbus.Kernel),
    $CAPBUS_SOCKET, the default per-user path.

    wait: how this process waits on the data plane: "adaptive" (spin briefly, then sleep),
    "spin" (lowest latency, burns a core) or "block".

    reconnect: if the kernel goes, keep connecting to the same path (backoff up to 2 s) and,
    once a kernel is back, re-register this Process's services under the same names, look its
    endpoints up again and call on_reconnect(process) (see also Process.on_reconnect). In
    between, requests fail with KernelUnavailable; channels already open keep working while both
    ends live (a re-registered service serves the old kernel's channels too, until their clients
    die). Not with an inherited socket (a launched process has no path to return to).

    kernel_uid (default $CAPBUS_KERNEL_UID): a uid besides this user's and root's that may run
    the kernel (and own its socket's directory), say a shared daemon's. A kernel of any other uid
    is refused with PermissionDenied before anything is sent to it; so is a socket directory that
    is a symlink, that others may write, or (the default one) that is not this user's own 0700
    directory. An inherited socket is trusted as it is: the launcher made it.

    debuggable: this process becomes non-dumpable (other processes of the same uid cannot ptrace
    it, read its memory or take its fds, and it leaves no core dump) unless this is True, or it
    is None and CAPBUS_DEBUGGABLE=1 is set: for a debugger, a profiler such as py-spy, a core
    dump. True leaves the flag as it is; see capbus._protect.
    """
    if wait not in WAIT_MODES:
        raise ValueError(f"wait must be one of {WAIT_MODES}, not {wait!r}")
    if kernel_uid is None:
        kernel_uid = _paths.kernel_uid_from_env()
    elif isinstance(kernel_uid, bool) or not isinstance(kernel_uid, int) or kernel_uid < 0:
        raise ValueError(f"kernel_uid must be a uid (an integer >= 0), not {kernel_uid!r}")
    _protect.protect(debuggable)  # before the connection exists: nothing to take before that
    sock = _inherited_socket() if path is None and not reconnect else None
    if sock is None:
        path = path or _paths.embedded_socket() or _paths.default_socket()
        sock = _open_socket(path, kernel_uid)
    proc = Process(sock, wait, path=path, reconnect=reconnect, on_reconnect=on_reconnect)
    proc._kernel_uid = kernel_uid
    return proc


# How long a reconnect waits for each endpoint's service to come back (its server reconnects
# on its own schedule).
_RELOOKUP = 30.0


def _rebind_frame(frame: frames.Frame | None) -> frames.Frame | None:
    """The registration to send again: ProcessIds in its allowlist named processes of the lost
    kernel (the new one may give those numbers to anyone), so they are left out."""
    if isinstance(frame, frames.Register | frames.RegisterPackage) and frame.allow is not None:
        return dataclasses.replace(frame, allow=[a for a in frame.allow if not a.isdigit()])
    return frame
