"""The shared-memory objects the kernel creates: service doorbells, channels, control pages.

Only the kernel creates memfds. Each is sealed against shrinking and growing (a peer that could
truncate a mapping under the other end would crash it with SIGBUS); a control page is also sealed
with F_SEAL_FUTURE_WRITE after the kernel mapped it, so no process can get a writable mapping of
it, not even by reopening its fd through /proc. Layout constants come from the native core.
"""

from __future__ import annotations

import fcntl
import mmap
import os

from .. import _core

F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)  # Linux 5.1
_BASE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


def _memfd(name: str, size: int) -> int:
    fd = os.memfd_create(f"capbus-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_doorbell() -> int:
    """A service's doorbell: one futex word and a ready bitmap, writable by all its clients."""
    fd = _memfd("doorbell", _core.DOORBELL_SIZE)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _BASE_SEALS | fcntl.F_SEAL_SEAL)
    return fd


class ChannelShm:
    """One channel's memfds as the kernel keeps them: the control page mapped read-write (the
    kernel is its only writer) and the channel's first pages mapped for futex wake-ups."""

    def __init__(self, nslots: int, arena_size: int, sender_id: int) -> None:
        self.nslots, self.arena_size = nslots, arena_size
        self.chan_fd = _memfd("channel", _core.channel_size(nslots, arena_size))
        self.ctrl_fd = -1
        try:
            fcntl.fcntl(self.chan_fd, fcntl.F_ADD_SEALS, _BASE_SEALS | fcntl.F_SEAL_SEAL)
            self._resp_tail = _core.resp_ring_off(nslots) + _core.RING_TAIL_OFF
            self._wake_map = mmap.mmap(self.chan_fd, _page_round(self._resp_tail + 8))
            _core.atomic_store_u64(self._wake_map, _core.CHAN_MAGIC_OFF, _core.CHAN_MAGIC)
            _core.atomic_store_u32(self._wake_map, _core.CHAN_VERSION_OFF, _core.CHAN_VERSION)
            _core.atomic_store_u32(self._wake_map, _core.CHAN_NSLOTS_OFF, nslots)
            _core.atomic_store_u64(self._wake_map, _core.CHAN_ARENA_SIZE_OFF, arena_size)
            self.ctrl_fd = _memfd("control", _core.CTRL_SIZE)
            self.ctrl = mmap.mmap(self.ctrl_fd, _core.CTRL_SIZE)
            _core.atomic_store_u64(self.ctrl, _core.CTRL_SENDER_ID_OFF, sender_id)
            _core.atomic_store_u32(self.ctrl, _core.CTRL_GENERATION_OFF, 1)
            _core.atomic_store_u32(self.ctrl, _core.CTRL_STATE_OFF, _core.STATE_OPEN)
            # From here on no new writable mapping or write() of the control page can be made.
            fcntl.fcntl(self.ctrl_fd, fcntl.F_ADD_SEALS,
                        _BASE_SEALS | F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL)
        except BaseException:
            self.close()
            raise

    def set_state(self, state: int) -> None:
        """Publish a state change and wake whoever waits for a reply on this channel."""
        _core.atomic_store_u32(self.ctrl, _core.CTRL_STATE_OFF, state)
        _core.futex_wake(self._wake_map, self._resp_tail)

    def state(self) -> int:
        return _core.atomic_load_u32(self.ctrl, _core.CTRL_STATE_OFF)

    def drop_fds(self) -> None:
        """Both ends hold the fds now; the kernel keeps only its mappings."""
        for fd in (self.chan_fd, self.ctrl_fd):
            if fd >= 0:
                os.close(fd)
        self.chan_fd = self.ctrl_fd = -1

    def close(self) -> None:
        self.drop_fds()
        for m in (getattr(self, "_wake_map", None), getattr(self, "ctrl", None)):
            if m is not None:
                m.close()


def _page_round(n: int) -> int:
    return (n + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
