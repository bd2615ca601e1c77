"""The kernel's policy: who may register which names, which uids map to which package, and
what each package's processes start with (grants) and may look up at all (lookup lists).

Embedded kernels take a Policy (or a plain callable, used as the registration filter); the
daemon reads the same from TOML (see docs/POLICY.md for the file format).
"""

from __future__ import annotations

import fnmatch
import grp
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .._errors import PermissionDenied
from .._protocol.names import check_name
from .grants import GrantSpec, parse_grants, parse_lookup


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


@dataclass(frozen=True)
class Access:
    """Who besides the kernel's own user and root may connect: uids, and members of groups (by
    gid or name; primary or supplementary). Empty (the default): nobody else, and the socket stays
    0600 in a 0700 directory."""

    uids: frozenset[int] = frozenset()
    groups: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "uids", frozenset(_id(u, "uid", "access") for u in self.uids))
        object.__setattr__(self, "groups",
                           frozenset(_id(g, "gid", "access") for g in self.groups))

    @classmethod
    def coerce(cls, value: object, where: str = "access") -> Access:
        if value is None:
            return cls()
        if isinstance(value, Access):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"{where} takes an Access or a dict with 'uids' and 'groups'")
        unknown = set(value) - {"uids", "groups"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: groups, uids")
        return cls(frozenset(_id(u, "uid", where) for u in _listed(value.get("uids", []), where)),
                   frozenset(group_id(g, where) for g in _listed(value.get("groups", []), where)))

    def __bool__(self) -> bool:
        return bool(self.uids or self.groups)


def _listed(raw: object, where: str) -> list[object]:
    if isinstance(raw, str | bytes) or not isinstance(raw, list | tuple):
        raise ValueError(f"{where}: uids and groups are lists, got {raw!r:.80}")
    return list(raw)


def _id(raw: object, what: str, where: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw < 2**32 - 1:
        raise ValueError(f"{where}: {what} {raw!r:.80} is not a {what} (0..{2**32 - 2})")
    return raw


def group_id(raw: object, where: str = "access") -> int:
    """A gid from a number, a numeric string or a group name (looked up once, here)."""
    if isinstance(raw, str):
        if raw.isdigit():
            return _id(int(raw), "gid", where)
        try:
            return grp.getgrnam(raw).gr_gid
        except KeyError:
            raise ValueError(f"{where}: no group named {raw!r:.80}") from None
    return _id(raw, "gid", where)


@dataclass(frozen=True)
class KernelLimits:
    """What the kernel holds for one process or uid at most (docs/ARCHITECTURE.md "Bounded
    state" says what happens at each bound).

    connections_per_pid / connections_per_uid: connections open at once from one OS process /
    one uid; outbox_fds: fds queued for one connection, and for all connections of one OS
    process, that they have not read yet; outbox_fds_per_uid: the same for one uid; access_entries:
    entries of one service's allowlist plus denylist; audit_rows_per_second: audit rows one OS
    process may cause per second (beyond: one summary row per event kind and second);
    audit_rows_per_uid_second: the same for all processes of one uid; audit_rows: rows the audit
    trail keeps (past that, rows go from whoever holds the most, oldest first: a flooder only
    pushes out its own); parked_lookups: lookups with a timeout waiting for a name not yet
    registered, for all connections of one OS process together; parked_lookups_per_uid: the
    same for all processes of one uid (past either, the lookup is refused with OutOfMemory);
    caps_per_uid: capabilities in the tables of all processes of one uid; channels_per_uid:
    channels the processes of one uid hold open as clients; region_bytes_per_uid: bytes of the
    shared regions one uid created that are still alive (charged to the creator until the last
    holder lets go); topics_per_process: topics one process publishes at once;
    subscriptions_per_process / subscriptions_per_uid: topic subscriptions (each a ring the
    kernel made) one process / all processes of one uid hold at once."""

    connections_per_pid: int = 256
    connections_per_uid: int = 4096
    caps_per_uid: int = 65536
    channels_per_uid: int = 16384
    region_bytes_per_uid: int = 1 << 50  # nominal (sparse) sizes: 1024 regions of the largest
    outbox_fds: int = 4096
    outbox_fds_per_uid: int = 8192
    access_entries: int = 4096
    audit_rows_per_second: int = 200
    audit_rows_per_uid_second: int = 1000
    audit_rows: int = 1_000_000
    parked_lookups: int = 64
    parked_lookups_per_uid: int = 1024
    topics_per_process: int = 64
    subscriptions_per_process: int = 256
    subscriptions_per_uid: int = 4096

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"limit {f.name} must be a positive integer, got {value!r}")
        if self.connections_per_uid < self.connections_per_pid:
            raise ValueError("limit connections_per_uid must be at least connections_per_pid")
        if self.parked_lookups_per_uid < self.parked_lookups:
            raise ValueError("limit parked_lookups_per_uid must be at least parked_lookups")
        if self.subscriptions_per_uid < self.subscriptions_per_process:
            raise ValueError("limit subscriptions_per_uid must be at least "
                             "subscriptions_per_process")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, object], where: str = "limits") -> KernelLimits:
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{where}: unknown limits {sorted(unknown)}; known: {sorted(known)}")
        return cls(**raw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class PackageRules:
    """What every process of one verified package starts with and may look up (the policy's
    [package."P"] table): grants, key -> GrantSpec; lookup, its lookup list (None: no list)."""

    grants: tuple[GrantSpec, ...] = ()
    lookup: tuple[str, ...] | None = None

    @classmethod
    def from_mapping(cls, raw: object, where: str) -> PackageRules:
        if not isinstance(raw, Mapping) or set(raw) - {"grants", "lookup"}:
            raise ValueError(f"{where}: a table of grants and lookup")
        return cls(parse_grants(raw.get("grants"), f"{where} grants"),
                   parse_lookup(raw.get("lookup"), f"{where} lookup"))


@dataclass(frozen=True)
class Gateways:
    """Who may serve names with an '@' (NAME@HOST: a remote service a gateway stands in for), on
    top of the kernel's own user and root: uids, and verified packages (fnmatch globs). A
    process must also ask to (Register's gateway flag, `Process.register(..., gateway=True)`):
    an ordinary registration of such a name is refused whoever makes it."""

    uids: frozenset[int] = frozenset()
    packages: tuple[str, ...] = ()

    @classmethod
    def coerce(cls, value: object, where: str = "gateways") -> Gateways:
        if value is None:
            return cls()
        if isinstance(value, Gateways):
            return value
        if not isinstance(value, Mapping) or set(value) - {"uids", "packages"}:
            raise ValueError(f"{where}: a table of uids and packages")
        packages = value.get("packages", [])
        if not isinstance(packages, list | tuple) or not all(isinstance(p, str) for p in packages):
            raise ValueError(f"{where}: packages is a list of package globs")
        return cls(frozenset(_id(u, "uid", where) for u in _listed(value.get("uids", []), where)),
                   tuple(packages))

    def allows(self, who: ProcessInfo, kernel_uid: int) -> bool:
        if who.uid in (0, kernel_uid) or who.uid in self.uids:
            return True
        return who.package is not None and any(fnmatch.fnmatchcase(who.package, p)
                                               for p in self.packages)


@dataclass
class Policy:
    """register(who, name) -> bool: may `who` register `name`; lookup(who, name) -> bool: may
    `who` look up (and so reach) the service `name`; uid_packages: uid -> package; limits: the
    kernel's per-process and per-uid bounds (a KernelLimits, or a dict of its fields);
    packages: package -> {"grants": {...}, "lookup": [...]} (or a PackageRules), applied to
    every process whose verified package it is (launched with it, or mapped by uid); access:
    which other users may connect at all (an Access, or a dict of uids and groups); gateways:
    who besides the kernel's own user and root may serve NAME@HOST names (a Gateways, or a
    dict of uids and packages).

    Policy.from_mapping() takes the TOML form as a dict (rules included)."""

    register: RegisterFilter | None = None
    uid_packages: Mapping[int, str] = field(default_factory=dict)
    lookup: RegisterFilter | None = None
    limits: KernelLimits = field(default_factory=KernelLimits)
    packages: Mapping[str, PackageRules] = field(default_factory=dict)
    access: Access = field(default_factory=Access)
    gateways: Gateways = field(default_factory=Gateways)

    def __post_init__(self) -> None:
        self.access = Access.coerce(self.access, "Policy(access=...)")
        self.gateways = Gateways.coerce(self.gateways, "Policy(gateways=...)")
        if isinstance(self.limits, Mapping):
            self.limits = KernelLimits.from_mapping(self.limits)
        elif not isinstance(self.limits, KernelLimits):
            raise TypeError("Policy(limits=...) takes a KernelLimits or a dict of its fields")
        rules = {}
        for pkg, raw in dict(self.packages).items():
            where = f"policy package {pkg!r:.80}"
            check_name(pkg, f"{where}: package name")
            rules[pkg] = raw if isinstance(raw, PackageRules) else PackageRules.from_mapping(
                raw, where)
        self.packages = rules

    def package_rules(self, package: str | None) -> PackageRules | None:
        return self.packages.get(package) if package is not None else None

    def reserves(self, name: str) -> bool:
        """Does the policy say who may register `name` (a register rule matches it)? Only then
        is "whoever serves `name`" an identity: an allowlist entry "name:N" admits the server
        of N only if the policy reserves N; otherwise anyone could have registered it first."""
        return isinstance(self.register, _RuleFilter) and self.register.rule_for(name) is not None

    @classmethod
    def coerce(cls, value: object) -> Policy:
        if value is None:
            return cls()
        if isinstance(value, Policy):
            return value
        if isinstance(value, str):
            return cls.from_toml(value)
        if callable(value):
            return cls(register=value)
        raise TypeError("policy must be a Policy, a callable registration filter or a TOML path")

    @classmethod
    def from_toml(cls, path: str) -> Policy:
        with open(path, "rb") as f:
            try:
                doc = tomllib.load(f)
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"policy file {path}: {exc}") from None
        return cls.from_mapping(doc, path)

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any], path: str = "<dict>") -> Policy:
        """The TOML form (docs/POLICY.md) as a dict: ValueError on anything it does not know."""
        unknown = set(doc) - {"packages", "register", "default_register", "lookup",
                              "default_lookup", "limits", "package", "access", "gateways"}
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
        limits = KernelLimits.from_mapping(doc.get("limits", {}), f"policy file {path} [limits]")
        packages = doc.get("package", {})
        if not isinstance(packages, Mapping):
            raise ValueError(f"policy file {path}: [package.\"P\"] tables, one per package")
        package_rules = {pkg: PackageRules.from_mapping(raw, f"policy file {path} [package.{pkg!r}]")
                         for pkg, raw in packages.items()}
        access = Access.coerce(doc.get("access", {}), f"policy file {path} [access]")
        gateways = Gateways.coerce(doc.get("gateways", {}), f"policy file {path} [gateways]")
        return cls(register=filters[0], uid_packages=uid_packages, lookup=filters[1],
                   limits=limits, packages=package_rules, access=access, gateways=gateways)

    def may_register(self, who: ProcessInfo, name: str) -> None:
        if self.register is not None and not self.register(who, name):
            raise PermissionDenied(
                f"the kernel's policy refuses process {who.process_id} the name {name!r}"
            )

    def may_serve_remote(self, who: ProcessInfo, name: str, gateway: bool, kernel_uid: int) -> None:
        """A name with an '@' stands for a remote service (NAME@HOST): only a gateway serves
        one. PermissionDenied unless the process asked as a gateway and is one the policy
        admits (the kernel's own user, root, or [gateways])."""
        if "@" not in name:
            return
        if not gateway:
            raise PermissionDenied(
                f"the name {name!r:.300} has an '@': NAME@HOST names stand for remote services and "
                "only a gateway (capbus.Gateway) may serve them; choose a name without '@'")
        if not self.gateways.allows(who, kernel_uid):
            raise PermissionDenied(
                f"process {who.process_id} (uid {who.uid}) may not act as a gateway: the kernel's "
                "policy admits its own user, root and [gateways] uids/packages only")

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
    def parse(cls, path: str, raw: dict[str, Any]) -> _Rule:
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

    def rule_for(self, name: str) -> _Rule | None:
        for rule in self.rules:
            if fnmatch.fnmatchcase(name, rule.name):
                return rule
        return None

    def __call__(self, who: ProcessInfo, name: str) -> bool:
        rule = self.rule_for(name)
        return rule.allows(who) if rule is not None else self.default
