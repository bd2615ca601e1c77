"""The kernel's layout holds: its domains import one way (state <- channels <- naming <-
delegation; none imports the driver), only shm.py touches the native core, and every request
type has exactly one handler. Read from the source with ast: nothing is imported to check it."""

from __future__ import annotations

import ast
import pathlib

import capbus
from capbus._kernel import channels, delegation, introspect, naming, region_requests
from capbus._protocol import frames

KERNEL_DIR = pathlib.Path(capbus.__file__).parent / "_kernel"
DOMAINS = ("channels", "naming", "delegation", "region_requests", "introspect")
# What each domain may import of its siblings (besides the leaf modules of _kernel)
ALLOWED = {
    "channels": set(),
    "naming": {"channels"},
    "delegation": {"channels", "naming"},
    "region_requests": set(),
    "introspect": set(),
}


def _kernel_imports(name: str) -> set[str]:
    """The _kernel modules (and capbus._core) that _kernel/<name>.py imports."""
    tree = ast.parse((KERNEL_DIR / f"{name}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(a.name for a in node.names)
            elif node.level == 2:
                found.update("_core" for a in node.names if a.name == "_core")
        elif isinstance(node, ast.Import):
            found.update("_core" for a in node.names if a.name == "capbus._core")
    return found


def test_domains_import_one_way():
    for name in DOMAINS:
        imported = _kernel_imports(name)
        assert "kernel" not in imported, f"{name}.py imports kernel.py"
        siblings = imported & set(DOMAINS)
        assert siblings <= ALLOWED[name], f"{name}.py imports {sorted(siblings - ALLOWED[name])}"
    assert not _kernel_imports("state") & (set(DOMAINS) | {"kernel"})


def test_only_shm_touches_the_native_core():
    users = sorted(p.stem for p in KERNEL_DIR.glob("*.py") if "_core" in _kernel_imports(p.stem))
    assert users == ["shm"], users


def test_every_request_has_one_handler():
    seen: dict[type, str] = {}
    for module in (channels, naming, delegation, region_requests, introspect):
        for kind in module.HANDLERS:
            assert kind not in seen, f"{kind.__name__} handled by {seen[kind]} and {module.__name__}"
            seen[kind] = module.__name__
    requests = {c for c in frames._REGISTRY.values() if c.KIND == frames.KIND_REQUEST}
    assert requests - {frames.Hello} == set(seen), sorted(c.__name__ for c in requests ^ set(seen))


def test_connections_sit_between_the_driver_and_the_domains():
    # connections.py frees what a process held (channels, naming) and is driven by kernel.py: it
    # never imports the driver, and no request domain reaches up into it.
    imported = _kernel_imports("connections")
    assert "kernel" not in imported
    assert imported & set(DOMAINS) <= {"channels", "naming"}, sorted(imported & set(DOMAINS))
    for name in (*DOMAINS, "state"):
        assert "connections" not in _kernel_imports(name), f"{name}.py imports connections.py"


def test_hello_is_answered_by_connections_alone():
    from capbus._kernel import connections

    assert list(connections.HANDLERS) == [frames.Hello]
    for module in (channels, naming, delegation, region_requests, introspect):
        assert frames.Hello not in module.HANDLERS, module.__name__
