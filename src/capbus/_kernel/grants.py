"""Startup grants and lookup lists: what a process is handed, and what else it may ask for.

A grant names a service (or a package's service) under a key the process chooses nothing about:
`{"db": "kv"}`, or `{"db": {"service": "kv", "rights": ["send"], "rate_limit": 100}}`, or
`{"log": {"package": "org.example.log"}}`. The kernel puts the endpoint into the process's table
when it says Hello (or, for a service that registers later, when the process asks for it).

A lookup list bounds lookups: fnmatch patterns over service names, and "package:P" patterns
over lookup_package; None is unrestricted, [] is nothing. A process may be under several lists
(its spawn's, its package's in the policy): a lookup must pass every one of them.

Everything here is checked where it enters (spawn, manifest, policy load): a bad grant is a
ValueError naming it, and no process ever holds more than MAX_GRANTS.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .._protocol.frames import GRANT_RIGHTS, MAX_GRANTS
from .._protocol.names import check_grant_key, check_name
from .captable import MAX_LIMIT, CapLimits

MAX_LOOKUP_PATTERNS = 256  # patterns in one lookup list
_GRANT_FIELDS = {"service", "package", "rights", "rate_limit", "bandwidth", "max_message_size"}


@dataclass(frozen=True)
class GrantSpec:
    """One startup grant: the service it names ("name" or "package" kind), the rights and the
    limits its endpoint gets (never more than the service's defaults allow)."""

    key: str
    kind: str  # "name" | "package"
    target: str
    rights: frozenset[str] = GRANT_RIGHTS
    rate: int = 0
    bandwidth: int = 0
    max_message_size: int = 0

    @property
    def lookup_key(self) -> tuple[str, str]:
        return (self.kind, self.target)

    def describe(self) -> str:
        what = self.target if self.kind == "name" else f"package:{self.target}"
        return f"{self.key}={what}"

    def as_table(self) -> dict[str, object]:
        """The table form parse_grant reads (so a GrantSpec handed on is checked again)."""
        out: dict[str, object] = {"service" if self.kind == "name" else "package": self.target,
                                  "rights": sorted(self.rights)}
        for name, value in (("rate_limit", self.rate), ("bandwidth", self.bandwidth),
                            ("max_message_size", self.max_message_size)):
            if value:
                out[name] = value
        return out

    def limits(self, service_defaults: CapLimits) -> CapLimits:
        """The service's default limits, each narrowed to this grant's where it sets one."""
        def tight(mine: int, theirs: int) -> int:
            return min(mine, theirs) if mine and theirs else (mine or theirs)

        return CapLimits(tight(self.rate, service_defaults.rate),
                      tight(self.bandwidth, service_defaults.bandwidth),
                      tight(self.max_message_size, service_defaults.max_message_size),
                      service_defaults.expires_at, service_defaults.max_priority)


def parse_grant(key: object, value: object, where: str = "grants") -> GrantSpec:
    """One grant from its key and its value (a service name, or a table): ValueError saying
    what is wrong with it."""
    try:
        key = check_grant_key(key)
    except TypeError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if isinstance(value, GrantSpec):  # a manifest's, passed on to spawn: checked again
        value = value.as_table()
    if isinstance(value, str):
        value = {"service": value}
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}[{key!r}]: a service name, or a table with service (or "
                         "package), rights, rate_limit, bandwidth, max_message_size")
    unknown = set(value) - _GRANT_FIELDS
    if unknown:
        raise ValueError(f"{where}[{key!r}]: unknown keys {sorted(map(str, unknown))}; known: "
                         f"{sorted(_GRANT_FIELDS)}")
    if ("service" in value) == ("package" in value):
        raise ValueError(f"{where}[{key!r}]: name either a service or a package")
    kind = "name" if "service" in value else "package"
    try:
        target = check_name(value["service" if kind == "name" else "package"],
                            "service name" if kind == "name" else "package name")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}[{key!r}]: {exc}") from None
    rights = value.get("rights", sorted(GRANT_RIGHTS))
    if isinstance(rights, str) or not isinstance(rights, Sequence | set | frozenset) or (
            not rights or not all(isinstance(r, str) for r in rights)
            or not set(rights) <= GRANT_RIGHTS):
        raise ValueError(f"{where}[{key!r}]: rights must be a non-empty list of "
                         f"{sorted(GRANT_RIGHTS)}, got {rights!r:.80}")
    nums = {}
    for name in ("rate_limit", "bandwidth", "max_message_size"):
        n = value.get(name, 0)
        if type(n) is not int or not 0 <= n <= MAX_LIMIT or (name in value and n == 0):
            raise ValueError(f"{where}[{key!r}]: {name} must be a positive int, got {n!r:.80}")
        nums[name] = n
    return GrantSpec(key, kind, target, frozenset(rights), nums["rate_limit"], nums["bandwidth"],
                     nums["max_message_size"])


def parse_grants(raw: object, where: str = "grants") -> tuple[GrantSpec, ...]:
    """A grants mapping (key -> service name or table): at most MAX_GRANTS of them."""
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} must be a mapping of key -> service name, got "
                         f"{type(raw).__name__}")
    if len(raw) > MAX_GRANTS:
        raise ValueError(f"{where}: {len(raw)} grants; a process may start with at most "
                         f"{MAX_GRANTS}")
    return tuple(parse_grant(k, v, where) for k, v in raw.items())


def parse_lookup(raw: object, where: str = "lookup") -> tuple[str, ...] | None:
    """A lookup list: None (unrestricted) or at most MAX_LOOKUP_PATTERNS patterns, each a
    service name glob or "package:" and a package glob."""
    if raw is None:
        return None
    if isinstance(raw, str) or not isinstance(raw, Sequence | set | frozenset):
        raise ValueError(f"{where} must be a list of name patterns (or None), got "
                         f"{type(raw).__name__}")
    out = []
    for p in raw:
        if not isinstance(p, str):
            raise ValueError(f"{where}: patterns are strings, got {type(p).__name__}")
        try:
            check_name(p.removeprefix("package:"), f"{where} pattern")
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        out.append(p)
    if len(out) > MAX_LOOKUP_PATTERNS:
        raise ValueError(f"{where}: {len(out)} patterns; at most {MAX_LOOKUP_PATTERNS}")
    return tuple(out)


def lookup_allows(patterns: Sequence[str], kind: str, key: str) -> bool:
    """Does this lookup list let a process look up `key` (a service name, or a package)?"""
    subject = key if kind == "name" else f"package:{key}"
    return any(fnmatch.fnmatchcase(subject, p) for p in patterns)


def combine_grants(*sources: tuple[str, Sequence[GrantSpec]]) -> dict[str, GrantSpec]:
    """The union of several sources' grants, earlier sources winning a key they share (the
    policy goes first: a spawner cannot point an administrator's key elsewhere); ValueError
    past MAX_GRANTS in all."""
    out: dict[str, GrantSpec] = {}
    for _, grants in sources:
        for g in grants:
            out.setdefault(g.key, g)
    if len(out) > MAX_GRANTS:
        raise ValueError(f"{' and '.join(s for s, _ in sources)} give this process {len(out)} "
                         f"grants; a process may start with at most {MAX_GRANTS}")
    return out
