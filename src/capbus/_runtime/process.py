"""The runtime's entry point: capbus.connect() and the Process it returns.

A Process is one connection to the kernel with its own ProcessId. It belongs to the OS process
that opened it: after fork() the child's copy refuses to act (it must connect on its own).
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import threading
import weakref
from typing import Any

from .. import _paths
from .._errors import KernelUnavailable
from .._protocol import frames
from .._protocol.names import check_name
from .control import Control
from .endpoint import Endpoint, limits_request
from .region import Region
from .service import Service
from .subscription import Subscription

log = logging.getLogger("capbus")
WAIT_MODES = ("adaptive", "spin", "block")
_live: weakref.WeakSet[Process] = weakref.WeakSet()


class Process:
    """This process's identity and capabilities, as the kernel knows them."""

    def __init__(self, sock: socket.socket, wait: str) -> None:
        if wait not in WAIT_MODES:
            raise ValueError(f"wait must be one of {WAIT_MODES}, not {wait!r}")
        self.wait_mode = wait
        self._pid = os.getpid()
        self._lock = threading.Lock()
        # Held until released (Endpoint.close/revoke) like the capability it stands for: a dropped
        # reference must not close its lanes behind the caller's back (the kernel bounds these).
        self._endpoints: dict[int, Endpoint] = {}
        self._services: dict[int, Service] = {}
        self._regions: weakref.WeakValueDictionary[int, Region] = weakref.WeakValueDictionary()
        self._subscriptions: weakref.WeakValueDictionary[int, Subscription] = (
            weakref.WeakValueDictionary()
        )
        self._control = Control(sock, self._on_event, self._on_response)
        try:
            welcome = self._control.hello(wait)
        except BaseException:
            sock.close()
            raise
        self.id: int = welcome.process_id
        self.package: str | None = welcome.package
        _live.add(self)

    def __repr__(self) -> str:
        return f"<capbus.Process id={self.id} package={self.package}>"

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End this connection: the kernel drops its registrations and tells its watchers."""
        if os.getpid() == self._pid:
            self._control.close()

    @property
    def closed(self) -> bool:
        return self._control.closed is not None

    # ---- registries ---------------------------------------------------------------------------

    def register(self, name: str, *, allow: list[str | int] | None = None,
                 limits: dict[str, Any] | None = None, max_caps: int | None = None,
                 max_regions: int | None = None, max_region_bytes: int | None = None,
                 max_channels_per_process: int | None = None,
                 max_channels_per_uid: int | None = None,
                 attach_ttl: float | None = None) -> Service:
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
        """
        check_name(name)
        bounds = _bounds(max_caps, max_regions, max_region_bytes, max_channels_per_process,
                         max_channels_per_uid, attach_ttl)
        return self._service(self._request_fds(
            frames.Register(name, _allow(allow), limits_request(**(limits or {})), bounds)))

    def register_package(self, *, allow: list[str | int] | None = None,
                         limits: dict[str, Any] | None = None,
                         **bounds: int | float | None) -> Service:
        """Serve under this process's verified package name (bounds: as for register())."""
        return self._service(self._request_fds(
            frames.RegisterPackage(_allow(allow), limits_request(**(limits or {})),
                                   _bounds(**bounds))))

    def lookup(self, name: str, timeout: float = 0) -> Endpoint:
        """An endpoint capability for a registered name: ServiceNotFound unless it appears
        within `timeout` seconds (the kernel answers when it registers; no polling)."""
        reply = self._request(frames.Lookup(check_name(name), _ms(timeout)), timeout)
        return self._endpoint(reply)

    def lookup_package(self, package: str, timeout: float = 0) -> Endpoint:
        check_name(package, "package name")
        reply = self._request(frames.LookupPackage(package, _ms(timeout)), timeout)
        return self._endpoint(reply)

    def create_region(self, size: int) -> Region:
        """A new shared memory region of `size` bytes (a memfd the kernel creates), mapped."""
        return self._region(self._request_fds(frames.CreateRegion(size)))

    def subscribe_registrations(self) -> Subscription:
        """Opt in to registration notices (coalesced, carrying no identity)."""
        reply = self._request(frames.Subscribe())
        assert isinstance(reply, frames.Subscribed)
        with self._lock:
            sub = self._subscriptions.get(reply.handle)
            if sub is None:
                sub = self._subscriptions[reply.handle] = Subscription(self, reply.handle)
        return sub

    # ---- internals ----------------------------------------------------------------------------

    def _check(self) -> None:
        if os.getpid() != self._pid:
            raise KernelUnavailable(
                f"this capbus Process belongs to pid {self._pid}; a forked child must call "
                "capbus.connect() for its own connection"
            )

    def _request(self, msg: frames.Message, timeout: float | None = None) -> frames.Message:
        reply, fds = self._request_fds(msg, timeout)
        for fd in fds:
            os.close(fd)
        return reply

    def _request_fds(self, msg: frames.Message,
                     timeout: float | None = None) -> tuple[frames.Message, list[int]]:
        """A request whose answer carries fds: the caller owns (and closes) them."""
        self._check()
        return self._control.request(msg, timeout)

    def _service(self, answer: tuple[frames.Message, list[int]]) -> Service:
        reply, _ = answer
        assert isinstance(reply, frames.Registered)
        return self._services[reply.handle]

    def _on_response(self, msg: frames.Message, fds: list[int]) -> list[int]:
        """Reader thread: a new service exists before its first ChannelOpened is read."""
        if isinstance(msg, frames.Registered):
            self._services[msg.handle] = Service(self, msg.handle, msg.name, *fds)
            return []
        return fds

    def _received_endpoint(self, granted: frames.Granted) -> Endpoint:
        """A capability that came with a message: it lives as long as the application refers
        to it (or until Endpoint.keep()); when the last reference goes, it goes back to the
        kernel, so capabilities a sender pushes unasked can never fill this process's table."""
        ep = Endpoint(self, granted)
        ep._finalizer = weakref.finalize(ep, _release_received, self, granted.handle)
        ep._finalizer.atexit = False
        return ep

    def _endpoint(self, reply: frames.Message) -> Endpoint:
        assert isinstance(reply, frames.Granted)
        with self._lock:  # one Endpoint object per capability handle
            ep = self._endpoints.get(reply.handle)
            if ep is None:
                ep = Endpoint(self, reply)
                self._endpoints[reply.handle] = ep
        return ep

    def _region(self, answer: tuple[frames.Message, list[int]]) -> Region:
        reply, fds = answer
        assert isinstance(reply, frames.RegionGranted)
        try:
            region = Region(self, reply, fds[0])
        except BaseException:
            os.close(fds[0])
            raise
        self._regions[reply.handle] = region
        return region

    def _forget(self, ep: Endpoint) -> None:
        self._endpoints.pop(ep.handle, None)

    def _on_event(self, msg: frames.Message, fds: list[int]) -> None:
        """Called on the control reader thread."""
        if isinstance(msg, frames.ChannelOpened):
            svc = self._services.get(msg.handle)
            if svc is not None:
                svc._channel_opened(msg, fds)
        elif isinstance(msg, frames.ChannelClosed):
            svc = self._services.get(msg.handle)
            if svc is not None:  # its client left: deliver what it already sent, then drop it
                svc._channel_closed(msg.index, drain=True)
        for fd in fds:
            os.close(fd)
        if isinstance(msg, frames.Death):
            ep = self._endpoints.get(msg.handle)
            if ep is not None:
                ep._died()
        elif isinstance(msg, frames.RegistrationNotice):
            sub = self._subscriptions.get(msg.handle)
            if sub is not None:
                sub._notify()

    def _after_fork_in_child(self) -> None:
        self._control.forget_after_fork(
            KernelUnavailable(
                f"this capbus Process belongs to pid {self._pid}; a forked child must call "
                "capbus.connect() for its own connection"
            )
        )


def _release_received(proc: Process, handle: int) -> None:
    if not proc.closed and os.getpid() == proc._pid:
        proc._control.request_nowait(frames.Release(handle))


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
    try:
        fd = int(raw)
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise OSError("not a socket")
    except (ValueError, OSError):
        log.warning("ignoring %s=%r: not an inherited socket", _paths.ENV_FD, raw)
        return None
    os.set_inheritable(fd, False)
    return socket.socket(fileno=fd)


def connect(path: str | None = None, wait: str = "adaptive") -> Process:
    """Connect this process to the kernel at `path`, or, with no path, to the first of: the
    socket inherited from kernel.spawn(), the kernel this process embeds (capbus.Kernel),
    $CAPBUS_SOCKET, the default per-user path.

    wait: how this process waits on the data plane: "adaptive" (spin briefly, then sleep),
    "spin" (lowest latency, burns a core) or "block".
    """
    if wait not in WAIT_MODES:
        raise ValueError(f"wait must be one of {WAIT_MODES}, not {wait!r}")
    sock = _inherited_socket() if path is None else None
    if sock is None:
        path = path or _paths.embedded_socket() or _paths.default_socket()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        from .control import _KERNEL_GRACE  # read at call time: tests shorten it

        sock.settimeout(_KERNEL_GRACE)  # a full backlog (a kernel not accepting) must not hang us
        try:
            sock.connect(path)
        except TimeoutError:
            sock.close()
            raise KernelUnavailable(f"the kernel at {path} does not accept connections") from None
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise KernelUnavailable(
                f"no capbus kernel at {path} ({exc.strerror}): start one with `capbus kernel` "
                "or capbus.Kernel(), or set CAPBUS_SOCKET"
            ) from None
        except OSError:
            sock.close()
            raise
        sock.settimeout(None)
    return Process(sock, wait)
