"""The rule for service and package names, checked by the runtime before sending and by the
kernel again on receipt (it trusts nothing a process sends)."""

from __future__ import annotations


def check_name(name: object, what: str = "service name") -> str:
    """Names are UTF-8, 1..255 bytes and not all NUL; anything else is a ValueError."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, not {type(name).__name__}")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} {name!r} is not valid UTF-8") from None
    if not 1 <= len(raw) <= 255:
        raise ValueError(f"{what} must be 1..255 bytes of UTF-8, got {len(raw)} bytes")
    if raw.strip(b"\0") == b"":
        raise ValueError(f"{what} must not be all NUL bytes")
    return name
