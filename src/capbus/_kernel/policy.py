"""The kernel's policy: who may register which names, and which uids map to which package.

Embedded kernels take a Policy (or a plain callable, used as the registration filter); the
daemon reads the same from TOML (see docs/POLICY.md for the file format).
"""

from __future__ import annotations

import fnmatch
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .._errors import PermissionDenied


@dataclass(frozen=True)
class ProcessInfo:
    """What the kernel verified about a process; handed to policy callables."""

    process_id: int
    pid: int
    uid: int
    gid: int
    package: str | None
    name: str | None


RegisterFilter = Callable[[ProcessInfo, str], bool]


@dataclass
class Policy:
    """register(who, name) -> bool: may `who` register `name`; lookup(who, name) -> bool: may
    `who` look up (and so reach) the service `name`; uid_packages: uid -> package."""

    register: RegisterFilter | None = None
    uid_packages: Mapping[int, str] = field(default_factory=dict)
    lookup: RegisterFilter | None = None

    @classmethod
    def coerce(cls, value: object) -> Policy:
        if value is None:
            return cls()
        if isinstance(value, Policy):
            return value
        if isinstance(value, str):
            return cls.from_toml(value)
        if callable(value):
            return cls(register=value)  # type: ignore[arg-type]
        raise TypeError("policy must be a Policy, a callable registration filter or a TOML path")

    @classmethod
    def from_toml(cls, path: str) -> Policy:
        with open(path, "rb") as f:
            try:
                doc = tomllib.load(f)
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"policy file {path}: {exc}") from None
        unknown = set(doc) - {"packages", "register", "default_register", "lookup",
                              "default_lookup"}
        if unknown:
            raise ValueError(f"policy file {path}: unknown keys {sorted(unknown)}")
        uid_packages = {int(uid): str(pkg) for uid, pkg in doc.get("packages", {}).items()}
        filters = []
        for what in ("register", "lookup"):
            rules = [_Rule.parse(path, r) for r in doc.get(what, [])]
            default = doc.get(f"default_{what}", "allow")
            if default not in ("allow", "deny"):
                raise ValueError(f"policy file {path}: default_{what} must be 'allow' or 'deny'")
            filters.append(_RuleFilter(rules, default == "allow"))
        return cls(register=filters[0], uid_packages=uid_packages, lookup=filters[1])

    def may_register(self, who: ProcessInfo, name: str) -> None:
        if self.register is not None and not self.register(who, name):
            raise PermissionDenied(
                f"the kernel's policy refuses process {who.process_id} the name {name!r}"
            )


    def may_lookup(self, who: ProcessInfo, name: str) -> None:
        if self.lookup is not None and not self.lookup(who, name):
            raise PermissionDenied(
                f"the kernel's policy does not let process {who.process_id} look up {name!r}"
            )


@dataclass(frozen=True)
class _Rule:
    name: str
    uids: tuple[int, ...] | None
    packages: tuple[str, ...] | None

    @classmethod
    def parse(cls, path: str, raw: dict) -> _Rule:
        if set(raw) - {"name", "uids", "packages"} or "name" not in raw:
            raise ValueError(f"policy file {path}: a rule has name, uids, packages")
        uids = tuple(int(u) for u in raw["uids"]) if "uids" in raw else None
        packages = tuple(str(p) for p in raw["packages"]) if "packages" in raw else None
        return cls(str(raw["name"]), uids, packages)

    def allows(self, who: ProcessInfo) -> bool:
        if self.uids is not None and who.uid in self.uids:
            return True
        return self.packages is not None and who.package is not None and any(
            fnmatch.fnmatchcase(who.package, p) for p in self.packages
        )


@dataclass(frozen=True)
class _RuleFilter:
    """The first rule whose name glob matches decides; no match means the default."""

    rules: list[_Rule]
    default: bool

    def __call__(self, who: ProcessInfo, name: str) -> bool:
        for rule in self.rules:
            if fnmatch.fnmatchcase(name, rule.name):
                return rule.allows(who)
        return self.default
