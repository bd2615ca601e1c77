"""Limits: what a capability allows (as the kernel granted it), and the wire form of the limits a
process asks for (Endpoint.restrict, Process.register(limits=...))."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """What a capability allows: rate (messages/s), bandwidth (payload bytes/s),
    max_message_size (payload bytes), expires_at (time.monotonic() seconds). None: no limit."""

    rate: int | None = None
    bandwidth: int | None = None
    max_message_size: int | None = None
    expires_at: float | None = None

    @classmethod
    def from_wire(cls, raw: dict[str, int] | None) -> Limits:
        raw = raw or {}
        exp = raw.get("expires_at_ns")
        return cls(raw.get("rate"), raw.get("bandwidth"), raw.get("max_message_size"),
                   exp / 1e9 if exp else None)


def limits_request(rate_limit: int | None = None, bandwidth: int | None = None,
                   max_message_size: int | None = None,
                   expires_in: float | None = None) -> dict[str, int]:
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
    return out
