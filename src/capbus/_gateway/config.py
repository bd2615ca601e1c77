"""A gateway's configuration: its name and Zenoh endpoints, what it exports with which rights and
limits, which remote gateways (by name and Ed25519 public key) may have what, TLS, the lease.

From `Gateway(..., config=PATH or dict)` or `capbus gateway --config FILE` (TOML; the form is in
docs/ARCHITECTURE.md, "Gateways"); arguments given to Gateway add to it. Anything unknown is a
ValueError when it loads.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .token import parse_public, rights_of
from .wire import check_host

DEFAULT_LEASE_MS = 10_000  # Zenoh's own default lease: a lost link is noticed within it


@dataclass(frozen=True)
class ExportRule:
    """One export: a service or topic name or fnmatch glob, the rights a remote gateway gets
    ("call", "send" for services, "subscribe" for topics), and the limits of each token issued
    for it (0: none)."""

    pattern: str
    rights: frozenset[str] = frozenset({"call", "send", "subscribe"})
    rate: int = 0
    bandwidth: int = 0
    max_message_size: int = 0


@dataclass(frozen=True)
class Peer:
    """A remote gateway allowed to import: its public key and the export patterns it may have
    (None: every export)."""

    name: str
    key: bytes
    exports: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Tls:
    root_ca: str
    certificate: str | None = None
    private_key: str | None = None
    mtls: bool = False


@dataclass
class GatewayConfig:
    name: str = "host-a"
    listen: list[str] = field(default_factory=list)
    connect: list[str] = field(default_factory=list)
    exports: list[ExportRule] = field(default_factory=list)
    peers: dict[str, Peer] = field(default_factory=dict)
    key: str | None = None  # Ed25519 private key file (None: a fresh key each start)
    tls: Tls | None = None
    lease_ms: int = DEFAULT_LEASE_MS
    call_timeout: float = 30.0
    send_timeout: float = 5.0
    token_ttl: float = 3600.0
    workers: int = 4
    max_origins: int = 32
    imports: tuple[str, ...] | None = None  # gateways to import from (None: every one seen)
    revoked: set[bytes] = field(default_factory=set)
    revoked_peers: set[str] = field(default_factory=set)  # gateways cut off (hellos too)

    @classmethod
    def load(cls, source: str | Mapping[str, Any] | None) -> GatewayConfig:
        if source is None:
            return cls()
        if isinstance(source, str):
            with open(source, "rb") as f:
                try:
                    doc = tomllib.load(f)
                except tomllib.TOMLDecodeError as exc:
                    raise ValueError(f"gateway config {source}: {exc}") from None
            return cls.from_mapping(doc, source)
        return cls.from_mapping(source)

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any], where: str = "<dict>") -> GatewayConfig:
        known = {"name", "listen", "connect", "export", "peers", "key", "tls", "lease_ms",
                 "call_timeout", "send_timeout", "token_ttl", "workers", "max_origins",
                 "import", "revoked", "revoked_peers"}
        unknown = set(doc) - known
        if unknown:
            raise ValueError(f"gateway config {where}: unknown keys {sorted(unknown)}; known: "
                             f"{sorted(known)}")
        c = cls()
        if "name" in doc:
            c.name = check_host(doc["name"])
        c.listen = _strs(doc.get("listen", []), f"{where} listen")
        c.connect = _strs(doc.get("connect", []), f"{where} connect")
        for i, raw in enumerate(doc.get("export", [])):
            c.exports.append(export_rule(raw, f"{where} export[{i}]"))
        for name, raw in dict(doc.get("peers", {})).items():
            w = f"{where} peers.{name}"
            check_host(name, f"{w}: peer name")
            if not isinstance(raw, Mapping) or set(raw) - {"public_key", "exports"} or \
                    "public_key" not in raw:
                raise ValueError(f"{w}: a table with public_key (and exports)")
            exports = tuple(_strs(raw["exports"], w)) if "exports" in raw else None
            c.peers[name] = Peer(name, parse_public(raw["public_key"], w), exports)
        if "key" in doc:
            c.key = str(doc["key"])
        if "tls" in doc:
            t = doc["tls"]
            if not isinstance(t, Mapping) or set(t) - {"root_ca", "certificate", "private_key",
                                                         "mtls"} or "root_ca" not in t:
                raise ValueError(f"{where} tls: root_ca, certificate, private_key, mtls")
            c.tls = Tls(str(t["root_ca"]), t.get("certificate"), t.get("private_key"),
                        bool(t.get("mtls", False)))
            if (c.tls.mtls or c.listen) and not (c.tls.certificate and c.tls.private_key):
                raise ValueError(f"{where} tls: a listening or mTLS gateway needs certificate "
                                 "and private_key")
        for k, lo in (("lease_ms", 100), ("workers", 1), ("max_origins", 1)):
            if k in doc:
                v = doc[k]
                if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                    raise ValueError(f"{where} {k}: an integer >= {lo}")
                setattr(c, k, v)
        for k in ("call_timeout", "send_timeout", "token_ttl"):
            if k in doc:
                v = doc[k]
                if not isinstance(v, int | float) or isinstance(v, bool) or v <= 0:
                    raise ValueError(f"{where} {k}: a positive number of seconds")
                setattr(c, k, float(v))
        if "import" in doc:
            c.imports = tuple(check_host(h) for h in _strs(doc["import"], f"{where} import"))
        for r in _strs(doc.get("revoked", []), f"{where} revoked"):
            try:
                c.revoked.add(bytes.fromhex(r))
            except ValueError:
                raise ValueError(f"{where} revoked: {r!r:.80} is not a token id (hex)") from None
        c.revoked_peers = {check_host(h) for h in _strs(doc.get("revoked_peers", []),
                                                          f"{where} revoked_peers")}
        return c


def export_rule(raw: object, where: str) -> ExportRule:
    if isinstance(raw, str):
        return ExportRule(_pattern(raw, where))
    if not isinstance(raw, Mapping) or "name" not in raw or set(raw) - {
            "name", "rights", "rate_limit", "bandwidth", "max_message_size"}:
        raise ValueError(f"{where}: a name, or a table with name, rights, rate_limit, "
                         "bandwidth, max_message_size")
    lim = {}
    for k in ("rate_limit", "bandwidth", "max_message_size"):
        v = raw.get(k, 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{where} {k}: a non-negative integer (0: no limit)")
        lim[k] = v
    rights = (rights_of(raw["rights"], where) if "rights" in raw
              else frozenset({"call", "send", "subscribe"}))
    return ExportRule(_pattern(raw["name"], where), rights, lim["rate_limit"], lim["bandwidth"],
                      lim["max_message_size"])


def _pattern(p: object, where: str) -> str:
    if not isinstance(p, str) or not p or "@" in p or len(p.encode()) > 255:
        raise ValueError(f"{where}: an export is a service name or glob of 1..255 bytes without "
                         "'@' (a gateway never re-exports what it imports)")
    return p


def _strs(raw: object, where: str) -> list[str]:
    if isinstance(raw, str) or not isinstance(raw, Sequence) or not all(
            isinstance(x, str) for x in raw):
        raise ValueError(f"{where}: a list of strings")
    return list(raw)
