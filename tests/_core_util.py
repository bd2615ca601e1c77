"""Helpers for the capbus._core tests: memfds made the way the kernel makes them, and children."""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import struct
import subprocess
import sys
from dataclasses import dataclass, field

from capbus import _core

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ring_stress_child.py")


def channel_layout(nslots: int = _core.DEFAULT_NSLOTS,
                   arena_size: int = _core.DEFAULT_ARENA_SIZE) -> dict[str, int]:
    """Absolute offsets in a channel, from the layout constants the native core exports
    (_native/layout.h is their one definition); ValueError for a geometry it refuses."""
    c = _core
    size = c.channel_size(nslots, arena_size)
    ring = c.RING_SLOTS_OFF + nslots * c.SLOT_SIZE
    rq, rs = c.REQ_RING_OFF, c.resp_ring_off(nslots)
    req_arena = -(-(rq + 2 * ring) // 4096) * 4096
    return {
        "size": size, "nslots": nslots, "arena_size": arena_size, "ring_size": ring,
        "cancel_below": c.CHAN_CANCEL_BELOW_OFF, "refused": c.CHAN_REFUSED_OFF,
        "resp_consumer_event": rs + c.RING_CONSUMER_EVENT_OFF, "req_ring": rq,
        "req_tail": rq + c.RING_TAIL_OFF, "req_head": rq + c.RING_HEAD_OFF,
        "req_arena_released": rq + c.RING_ARENA_RELEASED_OFF, "req_slots": rq + c.RING_SLOTS_OFF,
        "resp_ring": rs, "resp_tail": rs + c.RING_TAIL_OFF, "resp_head": rs + c.RING_HEAD_OFF,
        "resp_consumer_sleeping": rs + c.RING_CONSUMER_SLEEPING_OFF,
        "resp_arena_released": rs + c.RING_ARENA_RELEASED_OFF, "resp_slots": rs + c.RING_SLOTS_OFF,
        "req_arena": req_arena, "resp_arena": req_arena + arena_size,
        "cstats": c.CHAN_CSTATS_OFF, "sstats": c.CHAN_SSTATS_OFF,
    }


def _sealed_memfd(name: str, size: int, seals: int) -> int:
    fd = os.memfd_create(f"capbus-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | seals)
    return fd


@dataclass
class Chan:
    """One channel as the kernel makes it (see capbus._kernel.shm.ChannelShm: a sealed channel
    memfd with its header written, a control page the kernel writes), but holding no mapping of
    the channel: the tests count the mappings the two ends make."""

    index: int
    nslots: int
    arena: int
    chan: int
    ctrl: int
    ctrl_map: mmap.mmap
    maps: list = field(default_factory=list)

    def set_state(self, state: int) -> None:
        # As the kernel does (ChannelShm.set_state): store the state, then wake whoever waits for
        # a reply, on the response ring's tail word.
        _core.atomic_store_u32(self.ctrl_map, _core.CTRL_STATE_OFF, state)
        tail = _core.resp_ring_off(self.nslots) + _core.RING_TAIL_OFF
        with mmap.mmap(self.chan, -(-(tail + 8) // mmap.PAGESIZE) * mmap.PAGESIZE) as m:
            _core.futex_wake(m, tail)

    def map(self) -> mmap.mmap:
        """A fresh RW mapping of the whole channel (for poking at it like a hostile peer)."""
        m = mmap.mmap(self.chan, _core.channel_size(self.nslots, self.arena))
        self.maps.append(m)
        return m

    def layout(self) -> dict:
        return channel_layout(self.nslots, self.arena)

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
    """A channel made as the kernel makes one: the channel memfd sealed (F_SEAL_SEAL too: no end
    may add seals) with its informational header, the control page with its sender and state."""
    chan = _sealed_memfd("channel", _core.channel_size(nslots, arena), fcntl.F_SEAL_SEAL)
    os.pwrite(chan, struct.pack("<QIIQ", _core.CHAN_MAGIC, _core.CHAN_VERSION, nslots, arena),
              _core.CHAN_MAGIC_OFF)
    ctrl = _sealed_memfd("ctrl", _core.CTRL_SIZE, 0)
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


class RawClient:
    """A client that bypasses Lane entirely: it writes request slots (and arena chunks) straight
    into the ring memory, rings the doorbell bit, and parses the response ring itself -- what a
    hostile process with the channel mapped can do. No wrap-around: enough for short tests."""

    def __init__(self, ch: Chan, db: int) -> None:
        self.ch = ch
        self.m = ch.map()
        self.lay = ch.layout()
        self.db = mmap.mmap(db, _core.DOORBELL_SIZE)
        self.tail = 0
        self.arena_cursor = 0
        self.resp_head = 0
        self.resp_released = 0

    def close(self) -> None:
        self.db.close()

    def write(self, opcode: int, data=(), payload: bytes | None = None, *, call: bool = False,
              capability: int = 0, tag: int | None = None, publish: bool = True,
              extra_flags: int = 0) -> int:
        """Write one request at the tail; returns its tag. extra_flags go into the slot and the
        chunk header as they are (e.g. FLAG_LOANED, or bits a Lane would never set)."""
        import struct

        tag = self.tail + 1 if tag is None else tag
        flags = (_core.FLAG_REPLY_EXPECTED if call else 0) | extra_flags
        d = tuple(data) + (0,) * (4 - len(data))
        plen = off = 0
        if payload is not None:
            n = len(payload)
            if n > _core.LM_INLINE_SIZE:
                flags |= _core.FLAG_LARGE
            chunk = _core.LARGE_MSG_SIZE + (-(-n // 64) * 64 if n > _core.LM_INLINE_SIZE else 0)
            off = self.arena_cursor
            assert off + chunk <= self.ch.arena, "RawClient does not wrap the arena"
            base = self.lay["req_arena"] + off
            hdr = struct.pack("<QIIQII", capability, opcode, flags, n, 0, 0)
            if n > _core.LM_INLINE_SIZE:
                region = struct.pack("<QQII", off + _core.LARGE_MSG_SIZE, n, _core.REGION_PERM_READ, 0)
                self.m[base + _core.LARGE_MSG_SIZE:base + _core.LARGE_MSG_SIZE + n] = payload
                inline = bytes(64)
            else:
                region = bytes(24)
                inline = payload + bytes(64 - n)
            self.m[base:base + _core.LARGE_MSG_SIZE] = hdr + region + inline + bytes(8)
            self.arena_cursor += chunk
            plen = chunk
        slot = self.lay["req_slots"] + _core.SLOT_SIZE * (self.tail % self.ch.nslots)
        self.m[slot:slot + 64] = struct.pack("<QII4QQII", capability, opcode, flags, *d, tag, plen,
                                             off)
        self.tail += 1
        if publish:
            self.publish()
        return tag

    def publish(self) -> None:
        _core.atomic_store_u64(self.m, self.lay["req_tail"], self.tail)
        idx = self.ch.index
        word = _core.DB_BITMAP_OFF + (idx // 64) * 8
        _core.atomic_store_u64(self.db, word, _core.atomic_load_u64(self.db, word) | 1 << idx % 64)
        _core.atomic_add_u64(self.db, _core.DB_SEQ_OFF, 1)
        _core.futex_wake(self.db, _core.DB_SEQ_OFF)

    def consumed(self) -> int:
        """How far the server has read the request ring (its head)."""
        return _core.atomic_load_u64(self.m, self.lay["req_head"])

    def read_reply(self):
        """The next reply as (tag, opcode, flags, data, payload or None), or None."""
        import struct

        tail = _core.atomic_load_u64(self.m, self.lay["resp_tail"])
        if tail == self.resp_head:
            return None
        slot = self.lay["resp_slots"] + _core.SLOT_SIZE * (self.resp_head % self.ch.nslots)
        _cap, op, flags, d0, d1, d2, d3, tag, plen, off = struct.unpack_from("<QII4QQII", self.m,
                                                                            slot)
        payload = None
        if plen:
            base = self.lay["resp_arena"] + off
            n = struct.unpack_from("<Q", self.m, base + _core.LM_TOTAL_SIZE_OFF)[0]
            start = base + (_core.LARGE_MSG_SIZE if n > _core.LM_INLINE_SIZE else _core.LM_INLINE_OFF)
            payload = bytes(self.m[start:start + n])
            rel, a = self.resp_released, self.ch.arena
            if off != rel % a:  # a wrap or the producer's fresh-lap jump: the next lap, offset 0
                assert off == 0
                rel += a - rel % a
            self.resp_released = rel + plen
            _core.atomic_store_u64(self.m, self.lay["resp_arena_released"], self.resp_released)
        self.resp_head += 1
        _core.atomic_store_u64(self.m, self.lay["resp_head"], self.resp_head)
        return tag, op, flags, (d0, d1, d2, d3), payload


def set_limits(ch: Chan, *, rights: int = _core.RIGHT_SEND, expiry: int = 0, max_size: int = 0,
               rate: int = 0, bandwidth: int = 0, enforce: bool = True) -> None:
    """As the kernel does: the limit fields first, CTRL_FLAGS_OFF last."""
    m = ch.ctrl_map
    _core.atomic_store_u32(m, _core.CTRL_RIGHTS_OFF, rights)
    _core.atomic_store_u64(m, _core.CTRL_EXPIRY_OFF, expiry)
    _core.atomic_store_u64(m, _core.CTRL_MAX_MESSAGE_SIZE_OFF, max_size)
    _core.atomic_store_u64(m, _core.CTRL_RATE_LIMIT_OFF, rate)
    _core.atomic_store_u64(m, _core.CTRL_BANDWIDTH_OFF, bandwidth)
    _core.atomic_store_u32(m, _core.CTRL_FLAGS_OFF, _core.CTRL_F_ENFORCE if enforce else 0)
