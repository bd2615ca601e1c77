"""Capabilities: what a process may do, one entry per handle in its capability table.

A handle is (generation << 32 | slot): lookup is O(1), a freed slot gets a new generation so a
stale handle fails with InvalidCapability, and generations start at a random value per table so a
handle number copied into another process names nothing there.

Every capability has rights and limits and sits in a derivation tree: restrict() and delegation
make children that can only have fewer rights and tighter limits; revocation takes a capability
and its whole subtree out of every table at once. Rate and bandwidth budgets belong to a
capability and are shared with everything derived from it (see Capability.bucket_chain).
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .._errors import InvalidCapability, OutOfMemory, PermissionDenied
from .shm import CTRL_CHAIN_MAX, PRIO_CTRL_BIAS, PRIO_MAX, PRIO_MIN

MAX_CAPS = 4096
_GEN_MASK = 0xFFFFFFFF
RIGHTS = ("send", "receive", "share", "map", "read", "write", "publish", "subscribe")
LIMIT_KEYS = ("rate", "bandwidth", "max_message_size")
# Kernel-unique capability ids (never reused while the kernel runs): they name the receivers'
# token buckets, so a reused id would hand one capability another's budget.
next_uid = itertools.count(1).__next__
MAX_BUCKETS = 1 + CTRL_CHAIN_MAX  # a capability's own bucket and its limited ancestors'
# What the kernel accepts as limits: every value it later sends (Granted, claim rows, listings) and
# writes into a control page (u64) must stay in range; an expiry beyond a century is refused, so
# expires_at_ns (monotonic time plus it) always fits the u64 a peer's decoder accepts.
MAX_LIMIT = (1 << 63) - 1
MAX_EXPIRES_MS = 100 * 365 * 24 * 3600 * 1000


@dataclass(frozen=True)
class CapLimits:
    """rate: messages/s; bandwidth: payload bytes/s; max_message_size: payload bytes;
    expires_at: time.monotonic() seconds. 0 means no limit. max_priority: the highest priority
    (-nice, or 20 + a real-time priority) a call may ask its server for, written into the
    control page (CTRL_MAX_PRIORITY_OFF) where the server clamps with it; None: no limit."""

    rate: int = 0
    bandwidth: int = 0
    max_message_size: int = 0
    expires_at: float = 0.0
    max_priority: int | None = None

    @property
    def any(self) -> bool:
        return bool(self.rate or self.bandwidth or self.max_message_size or self.expires_at)

    def tightened(self, rate: int = 0, bandwidth: int = 0, max_message_size: int = 0,
                  expires_at: float = 0.0, max_priority: int | None = None) -> CapLimits:
        """These limits narrowed by the given ones; PermissionDenied if one would widen.

        0 asks for "no change". A child can never lift a limit its parent has."""
        def narrow(name: str, parent: float, child: float) -> float:
            if not child:
                return parent
            if parent and child > parent:
                raise PermissionDenied(f"restrict cannot raise {name} from {parent} to {child}")
            return child

        return CapLimits(
            int(narrow("rate", self.rate, rate)),
            int(narrow("bandwidth", self.bandwidth, bandwidth)),
            int(narrow("max_message_size", self.max_message_size, max_message_size)),
            narrow("expiry", self.expires_at, expires_at),
            _narrow_priority(self.max_priority, max_priority),
        )

    def within(self, parent: CapLimits) -> bool:
        """True if these limits are at least as tight as the parent's."""
        for mine, theirs in ((self.rate, parent.rate), (self.bandwidth, parent.bandwidth),
                             (self.max_message_size, parent.max_message_size),
                             (self.expires_at, parent.expires_at)):
            if theirs and (not mine or mine > theirs):
                return False
        return parent.max_priority is None or (
            self.max_priority is not None and self.max_priority <= parent.max_priority)

    def expired(self, now: float | None = None) -> bool:
        return bool(self.expires_at) and (now if now is not None else time.monotonic()) >= self.expires_at

    def wire(self) -> dict[str, int]:
        """As sent to a process: absolute CLOCK_MONOTONIC nanoseconds for the expiry."""
        out = {k: getattr(self, k) for k in LIMIT_KEYS if getattr(self, k)}
        if self.expires_at:
            out["expires_at_ns"] = int(self.expires_at * 1e9)
        if self.max_priority is not None:
            out["max_priority"] = self.max_priority + PRIO_CTRL_BIAS
        return out

    @classmethod
    def from_request(cls, raw: dict[str, int] | None, now: float | None = None) -> CapLimits:
        """From a process's request: expires_in_ms is relative to now. ValueError (to the
        sender) on a key or value the kernel could not pass on to the capability's holders."""
        raw = raw or {}
        if "expires_at_ns" in raw:
            raise ValueError("limits: expires_at_ns is what the kernel tells; ask with expires_in_ms")
        for key in LIMIT_KEYS:
            if not 0 <= raw.get(key, 0) <= MAX_LIMIT:
                raise ValueError(f"limits: {key} must be in 0..{MAX_LIMIT}, got {raw[key]}")
        expires = raw.get("expires_in_ms", 0)
        if not 0 <= expires <= MAX_EXPIRES_MS:
            raise ValueError(f"limits: expires_in_ms must be in 0..{MAX_EXPIRES_MS} (a century), "
                             f"got {expires}: leave it out for no expiry")
        prio = raw.get("max_priority")
        if prio is not None and not (PRIO_MIN <= prio - PRIO_CTRL_BIAS
                                     <= PRIO_MAX):
            raise ValueError(f"limits: max_priority must be in {PRIO_MIN}.."
                             f"{PRIO_MAX} (+{PRIO_CTRL_BIAS} on the wire), "
                             f"got {prio - PRIO_CTRL_BIAS}")
        now = time.monotonic() if now is None else now
        return cls(raw.get("rate", 0), raw.get("bandwidth", 0), raw.get("max_message_size", 0),
                   now + expires / 1000.0 if expires else 0.0,
                   None if prio is None else prio - PRIO_CTRL_BIAS)


def _narrow_priority(parent: int | None, child: int | None) -> int | None:
    """A restricted capability's max_priority: None asks for no change; never above the
    parent's (PermissionDenied)."""
    if child is None:
        return parent
    if parent is not None and child > parent:
        raise PermissionDenied(f"restrict cannot raise max_priority from {parent} to {child}")
    return child


def check_rights(rights: Any) -> frozenset[str]:
    checked: frozenset[str] = frozenset(rights)
    unknown = checked - set(RIGHTS)
    if unknown:
        raise ValueError(f"unknown rights {sorted(unknown)}: rights are {', '.join(RIGHTS)}")
    return checked


@dataclass(eq=False)
class Capability:
    kind: str  # "endpoint" | "service" | "subscription" | "region" | "topic" | "subscriber"
    target: Any  # the kernel object it names (a Service for endpoints and services)
    rights: frozenset[str] = frozenset()
    limits: CapLimits = field(default_factory=CapLimits)
    parent: Capability | None = None
    children: list[Capability] = field(default_factory=list)
    owner: Any = None  # the ProcessRecord whose table holds it
    handle: int = 0
    revoked: bool = False
    watched: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    uid: int = field(default_factory=next_uid)

    def derive(self, rights: frozenset[str] | None = None, limits: CapLimits | None = None,
               kind: str | None = None) -> Capability:
        """A child with at most our rights and at least our limits (PermissionDenied if not)."""
        rights = self.rights if rights is None else rights
        if not rights <= self.rights:
            raise PermissionDenied(
                f"cannot widen rights: {sorted(rights - self.rights)} not held by handle "
                f"{self.handle:#x} (it has {sorted(self.rights)})"
            )
        limits = self.limits if limits is None else limits
        if not limits.within(self.limits):
            raise PermissionDenied("cannot loosen the limits of the capability it derives from")
        child = Capability(kind or self.kind, self.target, rights, limits, parent=self)
        if len(child.bucket_chain()) > MAX_BUCKETS:
            raise PermissionDenied(
                f"cannot tighten the rate or bandwidth of handle {self.handle:#x} again: a "
                f"capability has at most {MAX_BUCKETS} distinct (rate, bandwidth) limits on its "
                "way up the derivation tree; restrict an ancestor instead, or keep these limits"
            )
        self.children.append(child)
        return child

    def bucket_chain(self) -> list[tuple[int, int, int]]:
        """(id, rate, bandwidth) of the token buckets a message through this capability is
        charged to: its own first, then each limited ancestor's, nearest first.

        CapLimits only tighten down the tree, so an ancestor with the same (rate, bandwidth) as the
        one below it bounds everything that one does: the run shares the topmost one's bucket
        (a delegated copy adds no bucket of its own). [] if there is no rate or bandwidth."""
        chain: list[tuple[int, int, int]] = []
        node: Capability | None = self
        while node is not None:
            lim = node.limits
            if lim.rate or lim.bandwidth:
                if chain and chain[-1][1:] == (lim.rate, lim.bandwidth):
                    chain[-1] = (node.uid, lim.rate, lim.bandwidth)
                else:
                    chain.append((node.uid, lim.rate, lim.bandwidth))
            node = node.parent
        return chain

    def subtree(self) -> list[Capability]:
        out, stack = [], [self]
        while stack:
            cap = stack.pop()
            out.append(cap)
            stack.extend(cap.children)
        return out

    def detach(self) -> None:
        if self.parent is not None:
            try:
                self.parent.children.remove(self)
            except ValueError:
                pass


class CapTable:
    def __init__(self, limit: int = MAX_CAPS) -> None:
        self._limit = limit
        # charge(n): counts n capabilities more (or fewer) against a quota shared with other
        # tables (the kernel's per-uid one); raises OutOfMemory, before anything changed, at its
        # bound. None: this table counts only against its own limit.
        self.charge: Callable[[int], None] | None = None
        self._slots: list[Capability | None] = []
        self._gens: list[int] = []
        self._free: list[int] = []
        self._salt = secrets.randbits(31) + 1

    def __len__(self) -> int:
        return len(self._slots) - len(self._free)

    def insert(self, cap: Capability) -> int:
        if not self._free and len(self._slots) >= self._limit:
            raise OutOfMemory(f"capability table full ({self._limit} handles): release some")
        if self.charge is not None:
            self.charge(1)
        if self._free:
            slot = self._free.pop()
        else:
            slot = len(self._slots)
            self._slots.append(None)
            self._gens.append(self._salt)
        self._slots[slot] = cap
        cap.handle = (self._gens[slot] << 32) | slot
        return cap.handle

    def adopt(self, child: Capability, owner: Any) -> Capability:
        """A capability just derived for `owner` (the ProcessRecord of this table): owned and
        inserted, or detached from its parent again if the table refuses it (full, or its uid's
        quota), so that a refused child leaves nothing behind."""
        child.owner = owner
        try:
            self.insert(child)
        except BaseException:
            child.detach()
            raise
        return child

    def get(self, handle: int, kind: str | None = None) -> Capability:
        slot, gen = handle & 0xFFFFFFFF, handle >> 32
        cap = self._slots[slot] if slot < len(self._slots) else None
        if cap is None or self._gens[slot] != gen:
            raise InvalidCapability(f"handle {handle:#x} is not a live capability of this process "
                                    "(never granted here, released or revoked)")
        if kind is not None and cap.kind != kind:
            raise InvalidCapability(f"handle {handle:#x} is a {cap.kind}, not a {kind}")
        if cap.limits.expired():
            raise InvalidCapability(f"handle {handle:#x} expired")
        return cap

    def remove(self, handle: int) -> Capability:
        slot, gen = handle & 0xFFFFFFFF, handle >> 32
        cap = self._slots[slot] if slot < len(self._slots) else None
        if cap is None or self._gens[slot] != gen:
            raise InvalidCapability(f"handle {handle:#x} is not a live capability of this process")
        self._slots[slot] = None
        self._gens[slot] = (self._gens[slot] + 1) & _GEN_MASK or 1
        self._free.append(slot)
        if self.charge is not None:
            self.charge(-1)
        return cap

    def uncharge(self) -> None:
        """The table's process is gone: give back what it counted against the shared quota."""
        if self.charge is not None:
            self.charge(-len(self))
            self.charge = None

    def __iter__(self) -> Iterator[Capability]:
        return (c for c in list(self._slots) if c is not None)
