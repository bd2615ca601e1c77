"""Helpers for the capbus._core tests: memfds made the way the kernel makes them, and children."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
from dataclasses import dataclass, field

from capbus import _core

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ring_stress_child.py")


@dataclass
class Chan:
    """One channel as the kernel would hold it: memfds plus an RW mapping of the control page."""

    index: int
    nslots: int
    arena: int
    chan: int
    ctrl: int
    ctrl_map: mmap.mmap
    maps: list = field(default_factory=list)

    def set_state(self, state: int) -> None:
        # As the kernel does: store the state, then wake whoever waits for a reply.
        _core.atomic_store_u32(self.ctrl_map, _core.CTRL_STATE_OFF, state)
        _core.wake_lane(self.chan, self.nslots)

    def map(self) -> mmap.mmap:
        """A fresh RW mapping of the whole channel (for poking at it like a hostile peer)."""
        m = mmap.mmap(self.chan, _core.channel_size(self.nslots, self.arena))
        self.maps.append(m)
        return m

    def layout(self) -> dict:
        return _core.channel_layout(self.nslots, self.arena)

    def args(self, db: int, **kw) -> dict:
        d = {"chan": self.chan, "ctrl": self.ctrl, "db": db, "index": self.index,
             "nslots": self.nslots, "arena": self.arena}
        d.update(kw)
        return d

    def close(self) -> None:
        for m in self.maps:
            m.close()
        self.ctrl_map.close()
        os.close(self.chan)
        os.close(self.ctrl)


def make_chan(index: int, nslots: int = 256, arena: int = 1 << 20, sender: int = 0) -> Chan:
    chan = _core.create_channel(nslots, arena)
    ctrl = _core.create_page("ctrl")
    m = mmap.mmap(ctrl, _core.CTRL_SIZE)
    _core.atomic_store_u64(m, _core.CTRL_SENDER_ID_OFF, sender)
    _core.atomic_store_u32(m, _core.CTRL_STATE_OFF, _core.STATE_OPEN)
    return Chan(index, nslots, arena, chan, ctrl, m)


def spawn(role: str, args: dict, fds: list[int]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, CHILD, role, json.dumps(args)], pass_fds=tuple(fds),
                            stdout=subprocess.PIPE, text=True)


def result(p: subprocess.Popen, timeout: float = 60) -> dict:
    """Wait for a child, return its JSON result line; kill it on timeout."""
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise
    assert p.returncode == 0, (p.returncode, out)
    return json.loads(out.strip().splitlines()[-1])


def reap(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        try:
            p.communicate(timeout=10)
        except Exception:
            pass
