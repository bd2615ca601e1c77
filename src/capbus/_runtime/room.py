"""Waiting for room in a lane's request ring or arena: send_async(timeout=), loan(timeout=) in
threads, Endpoint.asend/asend_many in an event loop.

A full ring or arena raises WouldBlock at once (the native send never waits). To wait, the
producer says so in the request ring (Lane.want_room: flag + full fence), tries again, and if
it is still full waits on its lane's reply eventfd, which the server writes whenever it frees a
slot or arena bytes while the flag is up (ch_room_freed in the native core). No busy loop: the
waiter sleeps in poll(2) (a thread, the GIL released) or in the event loop (add_reader). The
server's look at the flag is unfenced and the flag is peer-visible (a hostile server need never
wake us), so every wait is also capped at EVENT_POLL: a missed wake-up costs that much latency,
never a hang, and a deadline is always honoured. Whoever can write that eventfd (the server
holds it) can wake us for nothing: after FRUITLESS wake-ups in a row each wait starts with a
short sleep, so a flood costs the waiter a few hundred tries a second, not a core.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, TypeVar

from .._errors import WouldBlock
from .wait import EVENT_POLL, readable

if TYPE_CHECKING:
    from .lane import LaneHandle

T = TypeVar("T")

FRUITLESS = 8  # wake-ups in a row that found no room, before each wait starts with BACKOFF
BACKOFF = 0.002


def _deadline(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if not timeout >= 0:  # negative or NaN
        raise ValueError("timeout must be >= 0 or None")
    return time.monotonic() + timeout


def _no_room(what: str, timeout: float | None) -> WouldBlock:
    return WouldBlock(f"{what}: still no room after waiting {timeout} s (the receiver is not "
                      "draining its ring; nothing was sent)")


def _stop_waiting(lane: LaneHandle) -> None:
    # A lane closed meanwhile (its endpoint closed from another thread) has no flag to clear.
    with contextlib.suppress(Exception):
        lane.native.want_room(False)


def _tries(lane: LaneHandle, attempt: Callable[[], T], timeout: float | None,
           what: str) -> Generator[tuple[float, float | None], bool, T]:
    """What both waits share: attempt() once, then, with the producer-waiting flag up, again after
    each wait, until it goes through (the generator returns its result) or the time is up
    (WouldBlock). Before each wait it yields (pause, left): sleep `pause` seconds first (after
    FRUITLESS fruitless wake-ups), then wait for the reply eventfd at most EVENT_POLL or `left`
    (None: no limit); it is sent back whether that wait was woken (a wake-up that found no room
    counts as fruitless)."""
    deadline = _deadline(timeout)  # a bad timeout is refused even when there is room
    try:
        return attempt()
    except WouldBlock:
        if timeout == 0:
            raise
    native = lane.native
    fruitless = 0
    try:
        while True:
            native.want_room(True)
            try:
                return attempt()
            except WouldBlock:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise _no_room(what, timeout) from None
            pause = 0.0
            if fruitless >= FRUITLESS:
                pause = BACKOFF if left is None else min(left, BACKOFF)
            fruitless += (yield pause, left)
    finally:
        _stop_waiting(lane)


def until_room(lane: LaneHandle, attempt: Callable[[], T], timeout: float | None, what: str) -> T:
    """attempt() (something that raises WouldBlock while the ring or arena is full) until it
    goes through, waiting for room up to `timeout` seconds (None: no limit; 0: not at all, the
    first WouldBlock is raised). WouldBlock when the time is up."""
    tries = _tries(lane, attempt, timeout, what)
    try:
        pause, left = next(tries)
        poller = select.poll()
        poller.register(lane.reply_fd, select.POLLIN)
        while True:
            if pause:
                time.sleep(pause)
            wait = EVENT_POLL if left is None else min(left, EVENT_POLL)
            woken = bool(poller.poll(max(1, int(wait * 1000))))  # without the GIL
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(lane.reply_fd)
            pause, left = tries.send(woken)
    except StopIteration as done:
        result: T = done.value
        return result
    finally:
        tries.close()


async def until_room_async(lane: LaneHandle, attempt: Callable[[], T], timeout: float | None,
                           what: str) -> T:
    """until_room for an event loop: the wait is on the reply eventfd in the loop, no thread
    blocks. The caller makes sure one task at a time waits on a lane (one reader per fd)."""
    tries = _tries(lane, attempt, timeout, what)
    loop = asyncio.get_running_loop()
    try:
        pause, left = next(tries)
        while True:
            if pause:
                await asyncio.sleep(pause)
            t0 = time.monotonic()
            await readable(loop, lane.reply_fd, left)  # at most EVENT_POLL, then drained
            # woken (not timed out): under half of EVENT_POLL
            pause, left = tries.send(time.monotonic() - t0 < EVENT_POLL / 2)
    except StopIteration as done:
        result: T = done.value
        return result
    finally:
        tries.close()
