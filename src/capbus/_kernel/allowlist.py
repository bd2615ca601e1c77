"""A service's allowlist (Tock's asynchronous mailbox): who may reach it at all.

Entries: a ProcessId (an int, or its decimal string), "uid:N", "package:P" (the verified
package) and "name:N" (whichever process serves the name N when the check runs). No allowlist
means everyone; a denylist (from Service.deny) always wins. The kernel checks at lookup and when
a channel opens, and re-checks every live channel when the lists change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

_KINDS = ("uid", "package", "name")


def parse_entry(raw: str) -> str:
    """Normalise one entry, or ValueError naming what is accepted."""
    raw = str(raw).strip()
    if raw.isdigit() and int(raw) > 0:
        return str(int(raw))
    kind, sep, value = raw.partition(":")
    if sep and kind in _KINDS and value:
        if kind == "uid" and not value.isdigit():
            raise ValueError(f"allowlist entry {raw!r}: uid must be a number")
        return f"{kind}:{value}"
    raise ValueError(f"allowlist entry {raw!r}: use a ProcessId, 'uid:N', 'package:P' or 'name:N'")


@dataclass
class AccessList:
    allow: set[str] | None = None  # None: everyone
    deny: set[str] = field(default_factory=set)

    @classmethod
    def from_entries(cls, entries: Iterable[str] | None) -> AccessList:
        return cls(None if entries is None else {parse_entry(e) for e in entries})

    def add_allowed(self, entries: Iterable[str]) -> None:
        for e in map(parse_entry, entries):
            self.deny.discard(e)
            if self.allow is not None:
                self.allow.add(e)

    def add_denied(self, entries: Iterable[str]) -> None:
        for e in map(parse_entry, entries):
            self.deny.add(e)
            if self.allow is not None:
                self.allow.discard(e)

    def permits(self, process_id: int, uid: int, package: str | None,
                serving: Callable[[str], int | None]) -> bool:
        def matches(entries: set[str]) -> bool:
            for e in entries:
                if e.isdigit():
                    if int(e) == process_id:
                        return True
                    continue
                kind, _, value = e.partition(":")
                if kind == "uid" and int(value) == uid:
                    return True
                if kind == "package" and package is not None and value == package:
                    return True
                if kind == "name" and serving(value) == process_id:
                    return True
            return False

        if matches(self.deny):
            return False
        return self.allow is None or matches(self.allow)

    def describe(self) -> dict[str, list[str] | None]:
        return {"allow": None if self.allow is None else sorted(self.allow),
                "deny": sorted(self.deny)}
