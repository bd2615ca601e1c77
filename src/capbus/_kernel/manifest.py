"""`capbus run` manifests: TOML naming the processes the kernel launches and how to restart them.

Either one process at the top level (argv, package, name, env, restart, max_restarts, cwd,
grants, lookup) or several [[process]] tables with the same keys. Relative cwd is relative to
the manifest. grants and lookup are checked here, as spawn checks them (see grants.py).
A [sandbox] (or [process.sandbox]) table confines the process: read and write (lists of paths,
relative ones relative to the manifest), network (bool), user and group (name or number); see
capbus.Sandbox.
"""

from __future__ import annotations

import os
import tomllib

from .._errors import SandboxError
from .grants import parse_grants, parse_lookup
from .launcher import LaunchSpec
from .sandbox import Sandbox

_KEYS = {"argv", "package", "name", "env", "restart", "max_restarts", "cwd", "grants", "lookup",
         "sandbox"}
_SANDBOX_KEYS = {"read", "write", "network", "user", "group"}


def load(path: str) -> list[LaunchSpec]:
    with open(path, "rb") as f:
        try:
            doc = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"manifest {path}: {exc}") from None
    entries = doc.pop("process", None)
    if entries is None:
        entries = [doc]
    elif doc:
        raise ValueError(f"manifest {path}: top-level keys {sorted(doc)} beside [[process]] tables")
    base = os.path.dirname(os.path.abspath(path))
    specs = []
    for i, entry in enumerate(entries):
        unknown = set(entry) - _KEYS
        if unknown or "argv" not in entry:
            raise ValueError(f"manifest {path}, process {i}: needs argv; unknown keys {sorted(unknown)}")
        argv = entry["argv"]
        if isinstance(argv, str) or not isinstance(argv, list):
            raise ValueError(f"manifest {path}, process {i}: argv must be a list of strings")
        cwd = os.path.join(base, entry["cwd"]) if "cwd" in entry else base
        where = f"manifest {path}, process {i}"
        grants = parse_grants(entry.get("grants"), f"{where}: grants")
        lookup = parse_lookup(entry.get("lookup"), f"{where}: lookup")
        specs.append(
            LaunchSpec(
                argv=tuple(argv),
                name=entry.get("name"),
                package=entry.get("package"),
                env={str(k): str(v) for k, v in entry.get("env", {}).items()},
                restart=entry.get("restart", "never"),
                max_restarts=int(entry.get("max_restarts", 3)),
                cwd=cwd,
                grants=grants,
                lookup=lookup,
                sandbox=_sandbox(entry.get("sandbox"), base, f"manifest {path}, process {i}"),
            )
        )
    return specs


def _sandbox(table: object, base: str, where: str) -> Sandbox | None:
    if table is None:
        return None
    if not isinstance(table, dict):
        raise ValueError(f"{where}: sandbox must be a table ([process.sandbox])")
    unknown = set(table) - _SANDBOX_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown sandbox keys {sorted(unknown)} "
                         f"(known: {sorted(_SANDBOX_KEYS)})")
    kw = dict(table)
    for key in ("read", "write"):
        paths = kw.get(key, [])
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ValueError(f"{where}: sandbox {key} must be a list of path strings")
        kw[key] = [os.path.join(base, p) for p in paths]
    try:
        return Sandbox(**kw)
    except SandboxError as exc:
        raise SandboxError(f"{where}: {exc}") from None
