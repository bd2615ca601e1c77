"""Lanes: the client end of a channel as the runtime holds it (LaneHandle), and opening one.

A lane is opened through the kernel for one capability on one connection (OpenChannel); the
kernel answers with the channel's fds, which the native Lane maps and duplicates. The handle
keeps the reply eventfd (for asyncio waits) and the serving OS process's pid; dropping its last
reference gives the channel back to the kernel that opened it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import _core
from .._protocol import frames
from .control import Control
from .wait import ADAPTIVE_SPIN_NS, WAIT_CODES

if TYPE_CHECKING:
    from .session import Session


class LaneHandle:
    """The runtime's handle on a lane: the native Lane, and what the runtime keeps beside it
    (its reply eventfd, who serves it, whose it is)."""

    __slots__ = ("native", "index", "reply_fd", "pid", "_session", "_owner_closed", "_ctl",
                 "_handle", "__weakref__")

    def __init__(self, session: Session, native: _core.Lane, index: int, reply_fd: int, pid: int,
                 ctl: Control, handle: int, owner_closed: Callable[[], bool]) -> None:
        self.native, self.index, self.reply_fd = native, index, reply_fd
        self.pid = pid  # the serving OS process, as the kernel vouched when it opened
        # The channel belongs to the kernel (connection) and capability that opened it: after a
        # reconnect its index means nothing to the new kernel.
        self._session, self._ctl, self._handle = session, ctl, handle
        # The endpoint's own verdict: once it is closed its channels went with its release.
        self._owner_closed = owner_closed

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.reply_fd)
        if not self._owner_closed() and self._session.live(self._ctl):
            self._ctl.request_nowait(frames.CloseChannel(self._handle, self.index))


def open_lane(session: Session, ctl: Control, handle: int,
              owner_closed: Callable[[], bool]) -> LaneHandle:
    """Open a channel for capability `handle` of connection `ctl` and map its client end. A
    server already gone (its pidfd says so) gives a lane marked PEER_DEAD: its calls fail at
    once, as the kernel would have told them."""
    reply, fds = session.request_fds(frames.OpenChannel(handle), via=ctl)
    assert isinstance(reply, frames.ChannelGranted)
    # Now, while the kernel vouches for the server's pid: its pidfd outlives the kernel.
    alive = session.peers.watch(reply.pid)
    (chan_fd, ctrl_fd, bell_fd, bell_event_fd, reply_event_fd, bell_sleep_fd,
     reply_sleep_fd) = fds
    try:
        native = _core.Lane(chan_fd, ctrl_fd, bell_fd, reply.index, reply.nslots,
                            reply.arena_size, WAIT_CODES[session.wait_mode], ADAPTIVE_SPIN_NS,
                            bell_event_fd=bell_event_fd, reply_event_fd=reply_event_fd,
                            bell_sleep_fd=bell_sleep_fd, reply_sleep_fd=reply_sleep_fd)
    except BaseException:
        os.close(reply_event_fd)
        raise
    finally:
        for fd in (chan_fd, ctrl_fd, bell_fd, bell_event_fd, bell_sleep_fd, reply_sleep_fd):
            os.close(fd)
    lane = LaneHandle(session, native, reply.index, reply_event_fd, reply.pid, ctl, handle,
                      owner_closed)
    if not alive:
        native.mark(_core.STATE_PEER_DEAD)
    return lane
