"""How the runtime waits: the wait modes of lanes and ServerSets, timeouts in the native core's
unit, and the eventfd waits of asyncio callers (Endpoint.acall, Service.arecv)."""

from __future__ import annotations

import asyncio
import contextlib
import os

from .. import _core

WAIT_CODES = {"spin": _core.WAIT_SPIN, "adaptive": _core.WAIT_ADAPTIVE, "block": _core.WAIT_BLOCK}
ADAPTIVE_SPIN_NS = 50_000


def timeout_ns(timeout: float | None) -> int:
    """Seconds -> ns for the native core; -1 for no deadline (None, or beyond ~292 years), as
    the native call()/recv() read it."""
    if timeout is None:
        return -1
    if not timeout >= 0:  # negative or NaN
        raise ValueError("timeout must be >= 0 or None")
    ns = timeout * 1e9
    return int(ns) if ns < 9.2e18 else -1


# An eventfd wake-up can be swallowed by a peer that shares the eventfd (any client of a service
# can read the service's), and a peer's death is published on the control page, not the eventfd:
# every wait re-polls at least this often.
EVENT_POLL = _core.SLEEP_CAP_NS / 1e9


async def readable_any(loop: asyncio.AbstractEventLoop, fds: list[int],
                        timeout: float | None) -> None:
    """Wait until one of some eventfds is readable (at most EVENT_POLL, or the timeout)."""
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    for fd in fds:
        loop.add_reader(fd, ready)
    wait = EVENT_POLL if timeout is None else min(timeout, EVENT_POLL)
    try:
        await asyncio.wait_for(fut, wait)
    except TimeoutError:
        pass
    finally:
        for fd in fds:
            loop.remove_reader(fd)


async def readable(loop: asyncio.AbstractEventLoop, fd: int, timeout: float | None) -> None:
    """Wait until an eventfd is readable (at most EVENT_POLL, or the timeout), then drain it."""
    try:
        await readable_any(loop, [fd], timeout)
    finally:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(fd)
