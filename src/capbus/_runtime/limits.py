"""Limits: what a capability allows (as the kernel granted it), and the wire form of the limits a
process asks for (Endpoint.restrict, Process.register(limits=...))."""

from __future__ import annotations

from dataclasses import dataclass

from .. import _core

# A priority is -nice (PRIO_MIN = nice 19 .. 20 = nice -20) or 20 + a real-time priority (.. 119).
PRIO_MIN, PRIO_MAX = _core.PRIO_MIN, _core.PRIO_MAX
# A service that declares no range (Service.set_priority) adopts no caller's priority: req.priority
# still says what the caller asked for (within its capability).
DEFAULT_PRIORITY_RANGE: tuple[int, int] | None = None


@dataclass(frozen=True)
class Limits:
    """What a capability allows: rate (messages/s), bandwidth (payload bytes/s),
    max_message_size (payload bytes), expires_at (time.monotonic() seconds), max_priority (the
    highest priority a call may ask its server to run at: Service.set_priority). None: no
    limit."""

    rate: int | None = None
    bandwidth: int | None = None
    max_message_size: int | None = None
    expires_at: float | None = None
    max_priority: int | None = None

    @classmethod
    def from_wire(cls, raw: dict[str, int] | None) -> Limits:
        raw = raw or {}
        exp = raw.get("expires_at_ns")
        prio = raw.get("max_priority")
        return cls(raw.get("rate"), raw.get("bandwidth"), raw.get("max_message_size"),
                   exp / 1e9 if exp else None,
                   None if prio is None else prio - _core.PRIO_CTRL_BIAS)


def limits_request(rate_limit: int | None = None, bandwidth: int | None = None,
                   max_message_size: int | None = None,
                   expires_in: float | None = None,
                   max_priority: int | None = None) -> dict[str, int]:
    """The wire form of limits a process asks for (ValueError on nonsense)."""
    out: dict[str, int] = {}
    for key, value in (("rate", rate_limit), ("bandwidth", bandwidth),
                       ("max_message_size", max_message_size)):
        if value is not None:
            if type(value) is not int or value <= 0:
                raise ValueError(f"{key} must be a positive int, got {value!r}")
            out[key] = value
    if expires_in is not None:
        if expires_in <= 0:
            raise ValueError("expires_in must be > 0 seconds")
        out["expires_in_ms"] = max(1, int(expires_in * 1000))
    if max_priority is not None:
        if type(max_priority) is not int or not PRIO_MIN <= max_priority <= PRIO_MAX:
            raise ValueError(f"max_priority must be an int in {PRIO_MIN}..{PRIO_MAX} (-nice, or "
                             f"20 + a real-time priority), got {max_priority!r}")
        out["max_priority"] = max_priority + _core.PRIO_CTRL_BIAS  # the wire form is >= 1
    return out
