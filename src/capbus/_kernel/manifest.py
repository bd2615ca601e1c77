"""`capbus run` manifests: TOML naming the processes the kernel launches and how to restart them.

Either one process at the top level (argv, package, name, env, restart, max_restarts, cwd,
grants, lookup) or several [[process]] tables with the same keys. Relative cwd is relative to
the manifest. grants and lookup are checked here, as spawn checks them (see grants.py).
"""

from __future__ import annotations

import os
import tomllib

from .grants import parse_grants, parse_lookup
from .launcher import LaunchSpec

_KEYS = {"argv", "package", "name", "env", "restart", "max_restarts", "cwd", "grants", "lookup"}


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
            )
        )
    return specs
