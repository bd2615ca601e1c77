"""A service's allowlist (Tock's asynchronous mailbox): who may reach it at all.

Entries: a ProcessId (an int, or its decimal string), "uid:N", "package:P" (the verified
package) and "name:N" (the process that serves the name N when the check runs). No allowlist
means everyone; a denylist (from Service.deny) always wins. The kernel lets "name:N" on an
allowlist admit only the server of a name its policy reserves (anyone may have registered any
other name first); on a denylist it names whoever serves N. The kernel checks at lookup and when
a channel opens; when the lists change it re-checks only the live channels a new deny entry can
name (its index of channels by sender), so a check is O(1 + names the sender serves) and a change
O(entries changed + channels affected), whatever the lists' sizes (bounded: access_entries).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .._errors import OutOfMemory
from .._protocol.names import check_name

_KINDS = ("uid", "package", "name")


def parse_entry(raw: str) -> str:
    """Normalise one entry, or ValueError naming what is accepted. Checked as it enters the
    kernel: a ProcessId or uid in range, a valid package or service name after its kind, so
    every listing and audit line that later carries it is one its reader accepts."""
    raw = str(raw).strip()
    if raw.isdigit() and int(raw) > 0:
        if len(raw) > 20:
            raise ValueError(f"allowlist entry {raw[:40]!r}...: no ProcessId is that long")
        return str(int(raw))
    kind, sep, value = raw.partition(":")
    if sep and kind in _KINDS and value:
        if kind == "uid":
            if not value.isdigit() or len(value) > 10:
                raise ValueError(f"allowlist entry {raw[:40]!r}: uid must be a number in range")
        else:
            check_name(value, f"allowlist entry {kind}: name")
        return f"{kind}:{value}"
    raise ValueError(f"allowlist entry {raw!r}: use a ProcessId, 'uid:N', 'package:P' or 'name:N'")


@dataclass
class AccessList:
    allow: set[str] | None = None  # None: everyone
    deny: set[str] = field(default_factory=set)

    @classmethod
    def from_entries(cls, entries: Iterable[str] | None, max_entries: int | None = None) -> AccessList:
        out = cls(None if entries is None else {parse_entry(e) for e in entries})
        if max_entries is not None and out.allow is not None and len(out.allow) > max_entries:
            raise OutOfMemory(_too_many(len(out.allow), max_entries))
        return out

    def change(self, allow: Iterable[str], deny: Iterable[str],
               max_entries: int | None = None) -> set[str]:
        """Allow, then deny, these entries (all or nothing); returns the denied ones, normalised
        (the only entries that can take a live channel away)."""
        allowed = {parse_entry(e) for e in allow}
        denied = {parse_entry(e) for e in deny}
        allowed -= denied  # denied last: an entry in both ends up denied
        # The size after the change, from the changed entries alone (no copy of the lists)
        size = len(self.deny) + (len(self.allow) if self.allow is not None else 0)
        for e in allowed:
            size -= e in self.deny
            if self.allow is not None:
                size += e not in self.allow
        for e in denied:
            size += e not in self.deny
            if self.allow is not None:
                size -= e in self.allow
        if max_entries is not None and size > max_entries:
            raise OutOfMemory(_too_many(size, max_entries))
        self.deny -= allowed
        self.deny |= denied
        if self.allow is not None:
            self.allow |= allowed
            self.allow -= denied
        return denied

    def add_allowed(self, entries: Iterable[str]) -> None:
        self.change(entries, ())

    def add_denied(self, entries: Iterable[str]) -> None:
        self.change((), entries)

    def permits(self, process_id: int, uid: int, package: str | None,
                serving: Callable[[str], int | None] | None = None,
                names: Iterable[str] = (), allow_names: Iterable[str] | None = None) -> bool:
        """names: the service names this process serves now (for "name:N" entries);
        allow_names: those of them that may meet an allowlist's "name:N" (None: all of names).
        serving is the older way to say it (called once per "name:" entry: O(list size))."""
        keys = [str(process_id), f"uid:{uid}"]
        if package is not None:
            keys.append(f"package:{package}")
        names = list(names)
        deny_keys = keys + [f"name:{n}" for n in names]
        allow_keys = keys + [f"name:{n}" for n in (names if allow_names is None else allow_names)]

        def matches(entries: set[str], keys: list[str]) -> bool:
            if any(k in entries for k in keys):
                return True
            if serving is not None:
                return any(e.startswith("name:") and serving(e[5:]) == process_id for e in entries)
            return False

        if matches(self.deny, deny_keys):
            return False
        return self.allow is None or matches(self.allow, allow_keys)

    def describe(self) -> dict[str, list[str] | None]:
        return {"allow": None if self.allow is None else sorted(self.allow),
                "deny": sorted(self.deny)}


def _too_many(size: int, limit: int) -> str:
    return (f"a service's allow and deny lists may hold {limit} entries in all (the kernel's "
            f"access_entries limit); this change would make {size}: use uid: or package: entries "
            "instead of many ProcessIds")
