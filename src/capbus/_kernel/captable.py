"""A process's capability table: every handle it holds is a (slot, generation) entry here.

Lookup is O(1): the slot indexes a list, the generation must match. Freed slots get a new
generation, so a stale handle fails with InvalidCapability; generations start at a random
value per table, so a handle number copied into another process does not name anything there.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from .._errors import InvalidCapability, OutOfMemory

MAX_CAPS = 4096
_GEN_MASK = 0xFFFFFFFF


@dataclass(eq=False)
class Capability:
    kind: str  # "endpoint" | "service" | "subscription"
    target: Any  # the kernel object it names (a Service for endpoints and services)
    handle: int = 0
    dead: bool = False  # the target's process has exited
    watched: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class CapTable:
    def __init__(self, limit: int = MAX_CAPS) -> None:
        self._limit = limit
        self._slots: list[Capability | None] = []
        self._gens: list[int] = []
        self._free: list[int] = []
        self._salt = secrets.randbits(31) + 1

    def __len__(self) -> int:
        return len(self._slots) - len(self._free)

    def insert(self, cap: Capability) -> int:
        if self._free:
            slot = self._free.pop()
        elif len(self._slots) < self._limit:
            slot = len(self._slots)
            self._slots.append(None)
            self._gens.append(self._salt)
        else:
            raise OutOfMemory(f"capability table full ({self._limit} handles): release some")
        self._slots[slot] = cap
        cap.handle = (self._gens[slot] << 32) | slot
        return cap.handle

    def get(self, handle: int, kind: str | None = None) -> Capability:
        slot, gen = handle & 0xFFFFFFFF, handle >> 32
        cap = self._slots[slot] if slot < len(self._slots) else None
        if cap is None or self._gens[slot] != gen:
            raise InvalidCapability(f"handle {handle:#x} is not a live capability of this process")
        if kind is not None and cap.kind != kind:
            raise InvalidCapability(f"handle {handle:#x} is a {cap.kind}, not a {kind}")
        return cap

    def remove(self, handle: int) -> Capability:
        cap = self.get(handle)
        slot = handle & 0xFFFFFFFF
        self._slots[slot] = None
        self._gens[slot] = (self._gens[slot] + 1) & _GEN_MASK or 1
        self._free.append(slot)
        return cap

    def __iter__(self):
        return (c for c in self._slots if c is not None)
