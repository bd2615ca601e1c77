"""The rules for service and package names (and for the keys of a process's startup grants),
checked by the runtime before sending and by the kernel again on receipt (it trusts nothing a
process sends)."""

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


GRANT_KEY_MAX = 64
_GRANT_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def check_grant_key(key: object) -> str:
    """A startup grant's key (what `proc.grants[key]` is looked up by): 1..64 ASCII letters,
    digits, '_', '.' or '-', so that 64 of them always fit one Welcome frame."""
    if not isinstance(key, str):
        raise TypeError(f"a grant key must be a str, not {type(key).__name__}")
    if not 1 <= len(key) <= GRANT_KEY_MAX or not set(key) <= _GRANT_KEY_CHARS:
        raise ValueError(f"grant key {key[:80]!r}: use 1..{GRANT_KEY_MAX} ASCII letters, digits, "
                         "'_', '.' or '-'")
    return key
