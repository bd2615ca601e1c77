"""Session: the plumbing of one Process's connection to the kernel, shared by what it hands out.

A Process is the face (connect, register, lookup, create_region, subscribe, query, grants, the
reconnect); its Session is what the objects it hands out need to work: the control connection
(replaced on a reconnect), the fork check, requests (with their fds, or without waiting), and the
tables of what this connection holds, by handle. Endpoint, Service, Region and Subscription take
the Session, never the Process, so the arrows run one way:

    process -> {endpoint, service, region, subscription} -> session -> control -> protocol
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import TYPE_CHECKING

from .._errors import KernelUnavailable
from .._protocol import frames
from .control import Control
from .peers import PeerWatch

if TYPE_CHECKING:
    from collections.abc import Callable

    from .endpoint import Endpoint
    from .region import Region
    from .service import Service
    from .subscription import Subscription
    from .topic import Publisher, Subscriber


class Session:
    """One connection's plumbing (see the module docstring). Its tables are guarded by `lock`."""

    def __init__(self, wait_mode: str, reconnect: bool, peers: PeerWatch) -> None:
        self.pid = os.getpid()  # the OS process it belongs to: a forked child has none
        self.wait_mode = wait_mode  # how lanes and ServerSets wait ("adaptive", "spin", "block")
        self.reconnect = reconnect  # connect(reconnect=True): a lost kernel is waited for
        self.peers = peers  # pidfds of the OS processes at the other end of channels
        self.lock = threading.Lock()
        self.process_id = 0  # the kernel's ProcessId for this connection (new on a reconnect)
        # Set while no kernel serves this connection (None: connected): what requests fail with.
        self.kernel_lost: KernelUnavailable | None = None
        self.user_closed = False  # Process.close() was called
        # Called by Process.close() after user_closed is set: a Service's serve() loop, asleep
        # in an untimed recv, wakes to see it (Service registers its hook; close() removes it).
        self.on_user_close: list[Callable[[], None]] = []
        self._control: Control | None = None
        # Held until released (Endpoint.close/revoke) like the capability it stands for: a dropped
        # reference must not close its lanes behind the caller's back (the kernel bounds these).
        self.endpoints: dict[int, Endpoint] = {}
        self.services: dict[int, Service] = {}
        self.regions: weakref.WeakValueDictionary[int, Region] = weakref.WeakValueDictionary()
        self.subscriptions: weakref.WeakValueDictionary[int, Subscription] = (
            weakref.WeakValueDictionary()
        )
        self.lane_endpoints: weakref.WeakSet[Endpoint] = weakref.WeakSet()  # with lanes open
        # Topics, held until closed like the capabilities they stand for
        self.publishers: dict[int, Publisher] = {}
        self.subscribers: dict[int, Subscriber] = {}

    # ---- the connection -----------------------------------------------------------------------

    @property
    def control(self) -> Control:
        """The current control connection (a reconnect replaces it)."""
        if self._control is None:
            raise KernelUnavailable("this capbus Process has no kernel connection yet")
        return self._control

    @control.setter
    def control(self, control: Control) -> None:
        self._control = control

    def check(self) -> None:
        """KernelUnavailable in a forked child: a connection belongs to the process that made it."""
        if os.getpid() != self.pid:
            raise KernelUnavailable(
                f"this capbus Process belongs to pid {self.pid}; a forked child must call "
                "capbus.connect() for its own connection"
            )

    def live(self, ctl: Control) -> bool:
        """Whether `ctl` (an object's own connection) can still carry a request from here: open,
        and this is the process it belongs to (a finalizer in a forked child sends nothing)."""
        return ctl.closed is None and os.getpid() == self.pid

    def request(self, msg: frames.Frame, timeout: float | None = None,
                via: Control | None = None) -> frames.Frame:
        """Send a request and wait for its answer (fds that came with it are closed)."""
        reply, fds = self.request_fds(msg, timeout, via)
        for fd in fds:
            os.close(fd)
        return reply

    def request_fds(self, msg: frames.Frame, timeout: float | None = None,
                    via: Control | None = None) -> tuple[frames.Frame, list[int]]:
        """A request whose answer carries fds: the caller owns (and closes) them.

        via: the connection a handle in `msg` belongs to (an object's own): after a reconnect a
        stale handle must fail on its dead connection, never name something in the new kernel."""
        self.check()
        return (via or self.control).request(msg, timeout)

    def request_nowait(self, msg: frames.Frame, via: Control | None = None) -> None:
        """Send without waiting for the answer (releases, reports: best effort)."""
        (via or self.control).request_nowait(msg)

    # ---- what this connection holds, by handle ------------------------------------------------

    def adopt_endpoint(self, ep: Endpoint) -> None:
        with self.lock:
            self.endpoints[ep.handle] = ep

    def forget_endpoint(self, ep: Endpoint) -> None:
        with self.lock:
            self.endpoints.pop(ep.handle, None)

    def forget_service(self, handle: int) -> None:
        with self.lock:
            self.services.pop(handle, None)

    def forget_publisher(self, handle: int) -> None:
        with self.lock:
            self.publishers.pop(handle, None)

    def forget_subscriber(self, handle: int) -> None:
        with self.lock:
            self.subscribers.pop(handle, None)

    def forget_region(self, handle: int) -> None:
        self.regions.pop(handle, None)
