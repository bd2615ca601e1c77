"""The shape of the source tree: no import circles in src/capbus, and no new reach into another
part's private names.

Read from the source with `ast` (nothing is imported), so a circle that Python happens to
tolerate at run time (a function-level import, a late `from . import x`) still counts: every
arrow of the house runs one way. A private name (`_x`) is a module's or a class's own business;
a module using one of another part's is listed below with its reason, so that a new one cannot
appear unnoticed.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # tests/tools/ -> the repository
SRC = ROOT / "src"

# (module, name it takes from a module of another package): why it is allowed. A package is one
# folder of capbus (capbus itself, capbus._kernel, capbus._runtime, capbus._protocol, capbus._cli).
CROSS_PACKAGE_PRIVATE_IMPORTS: dict[tuple[str, str], str] = {
}



def _known(module: str, names: str, why: str) -> dict[tuple[str, str], str]:
    return {(module, name): why for name in names.split()}


_RUNTIME_DOWN = ("known, to be removed: Process drives its objects' private hooks (events, loss, "
                 "rebinding after a reconnect); with the Session they become hooks registered "
                 "with it")
_KERNEL_CHILD = ("known: the kernel and its launcher share a launched child's life (the Child's "
                 "popen and exit state, the kernel's revoke and call): one trusted part in two "
                 "files; the kernel step may give it a small interface")

# (module, private member of a class of another module, reached through an object other than
# self/cls): why it is allowed.
KNOWN_OBJECT_PRIVATES: dict[tuple[str, str], str] = {
    **_known("capbus._runtime.endpoint", "_moved", "known, to be removed: sending a Region marks "
             "it moved (Region could say so through a method of its own)"),
    **_known("capbus._runtime.process", "_channel_closed _channel_opened _closed _ctl _died "
             "_frame _grant_key _kernel_lost _lanes _lose _lost _mark_lanes _notify "
             "_origin _rebind _replay_access _served_by _server_pid", _RUNTIME_DOWN),
    **_known("capbus._runtime.process", "_ended _joined _left",
             _RUNTIME_DOWN + " (topics: the control thread's SubscriberJoined, SubscriberLeft "
             "and TopicClosed reach their Publisher and Subscriber as ChannelOpened reaches a "
             "Service)"),
    **_known("capbus._kernel.kernel", "_abandon _exited _kernel _popen _started",
             _KERNEL_CHILD),
    **_known("capbus._kernel.launcher", "_call _revoke_grant", _KERNEL_CHILD),
}


# ---- reading the tree ----------------------------------------------------------------------------


class Tree:
    """The modules of a source folder (src/capbus by default), parsed, by dotted name."""

    def __init__(self, src: Path = SRC, top: str = "capbus") -> None:
        self.modules: dict[str, Path] = {}
        for path in sorted((src / top).rglob("*.py")):
            parts = list(path.relative_to(src).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            self.modules[".".join(parts)] = path
        self.trees = {name: ast.parse(path.read_text(encoding="utf-8"), str(path))
                      for name, path in self.modules.items()}
        # The compiled modules, as setup.py names its Extensions (capbus._core and _layout from _native/,
        # capbus._sandbox from _sandbox.c): leaves of the graph here, and truly so: the native
        # core imports no capbus module (the runtime hands it the error classes and the object
        # codec, _core.register).
        setup_py = src.parent / "setup.py"
        if setup_py.exists():
            setup = ast.parse(setup_py.read_text(encoding="utf-8"))
            self.native = {node.args[0].value for node in ast.walk(setup)
                           if isinstance(node, ast.Call)
                           and getattr(node.func, "id", "") == "Extension"
                           and node.args and isinstance(node.args[0], ast.Constant)}
        else:  # a tree a test made: its .c files are its modules
            self.native = {f"{top}.{p.stem}" for p in (src / top).glob("*.c")}

    def package(self, module: str) -> str:
        """The package a module belongs to (a package belongs to itself)."""
        if self.modules[module].name == "__init__.py":
            return module
        return module.rpartition(".")[0]

    def base(self, module: str, node: ast.ImportFrom) -> str:
        """The module a `from ... import` names, resolved against `module` when relative."""
        if not node.level:
            return node.module or ""
        parts = self.package(module).split(".")
        if node.level > 1:
            parts = parts[: len(parts) - (node.level - 1)]
        return ".".join(parts + ([node.module] if node.module else []))

    def imports(self, module: str) -> Iterator[tuple[str, str | None, int]]:
        """(imported module, name taken from it or None, line) for every import of a module of
        the tree, at module level or inside a function."""
        for node in _walk(self.trees[module]):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in self.modules:
                        yield alias.name, None, node.lineno
            elif isinstance(node, ast.ImportFrom):
                base = self.base(module, node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in self.modules:  # `from . import x`: the module x itself
                        yield sub, None, node.lineno
                    elif sub in self.native:
                        continue
                    elif base in self.modules:
                        yield base, alias.name, node.lineno
            elif (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                  and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets)):
                # A package's names loaded on first use (PEP 562): {name: ".module"}.
                for value in node.value.values:
                    if isinstance(value, ast.Constant) and str(value.value).startswith("."):
                        target = module + str(value.value)
                        if target in self.modules:
                            yield target, None, node.lineno

    def import_graph(self) -> dict[str, set[str]]:
        graph: dict[str, set[str]] = {m: set() for m in self.modules}
        for m in self.modules:
            for target, _, _ in self.imports(m):
                if target != m:
                    graph[m].add(target)
        return graph

    def cross_package_private_imports(self) -> dict[tuple[str, str], str]:
        """(module, name) -> where, for each private name a module takes from a module of
        another package: `from m import _x`, or `m._x` on a module `m` it imported."""
        found: dict[tuple[str, str], str] = {}
        for m in self.modules:
            aliases: dict[str, str] = {}  # local name -> module of the tree it is bound to
            for node in ast.walk(self.trees[m]):
                if isinstance(node, ast.ImportFrom):
                    base = self.base(m, node)
                    for alias in node.names:
                        sub = f"{base}.{alias.name}"
                        if sub in self.modules:
                            aliases[alias.asname or alias.name] = sub
                        elif sub in self.native:
                            continue
                        elif (base in self.modules and _private(alias.name)
                              and self.package(base) != self.package(m)):
                            found.setdefault((m, alias.name),
                                             f"{self.modules[m].name}:{node.lineno} from {base}")
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        if alias.name in self.modules and alias.asname:
                            aliases[alias.asname] = alias.name
            for node in ast.walk(self.trees[m]):
                if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                        and node.value.id in aliases and _private(node.attr)):
                    target = aliases[node.value.id]
                    if (f"{target}.{node.attr}" not in self.modules
                            and self.package(target) != self.package(m)):
                        found.setdefault((m, node.attr),
                                         f"{self.modules[m].name}:{node.lineno} on {target}")
        return found

    def object_privates(self) -> dict[tuple[str, str], str]:
        """(module, name) -> where, for each `obj._x` (obj not self or cls) in a module whose
        classes do not define _x themselves while a class of another module does: one object
        reaching into another's privates."""
        own = {m: _own_privates(self.trees[m]) for m in self.modules}
        found: dict[tuple[str, str], str] = {}
        for m in self.modules:
            for node in ast.walk(self.trees[m]):
                if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                    continue
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    continue
                if node.attr in own[m]:
                    continue
                owners = sorted(o for o in self.modules if o != m and node.attr in own[o])
                if owners:
                    found.setdefault((m, node.attr), f"{self.modules[m].name}:{node.lineno} "
                                     f"(defined in {', '.join(owners)})")
        return found


def _type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(tree: ast.AST) -> Iterator[ast.AST]:
    """ast.walk, leaving out `if TYPE_CHECKING:` blocks: an import only a type checker runs makes
    no circle (who reaches into whose objects shows in object_privates instead)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if _type_checking(node):
            todo.extend(node.orelse)  # type: ignore[attr-defined]
        else:
            todo.extend(ast.iter_child_nodes(node))


def _private(name: str | None) -> bool:
    return bool(name) and name.startswith("_") and not name.startswith("__") and name != "_"


def _own_privates(tree: ast.AST) -> set[str]:
    """The private members the classes of a module define: methods, class attributes, and what
    their methods assign to self._x."""
    names: set[str] = set()
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        for node in ast.walk(cls):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _private(node.name):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name) and _private(t.id):
                        names.add(t.id)
                    elif (isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                          and t.value.id in ("self", "cls") and _private(t.attr)):
                        names.add(t.attr)
    return names


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (a -> ... -> a) through each strongly connected part of more than one module
    (Tarjan's algorithm, then a path found inside the part)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    parts: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                parts.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for part in parts:
        inside = set(part)
        start = part[0]
        # the shortest way back to start, inside the part (breadth first)
        prev: dict[str, str] = {}
        frontier = [start]
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & inside):
                    if w == start:
                        found = v
                        break
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path = [start]
        v = found
        while v is not None and v != start:
            path.insert(1, v)
            v = prev.get(v)
        out.append(path + [start])
    return out


# ---- the tests -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree() -> Tree:
    return Tree()


def _write(root: Path, files: dict[str, str]) -> Tree:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return Tree(root, "pkg")


def test_the_tree_is_read(tree):
    """The reader sees the parts it checks, and resolves relative imports as Python does."""
    assert tree.native == {"capbus._core", "capbus._layout", "capbus._sandbox"}
    assert {"capbus", "capbus._kernel.kernel", "capbus._runtime.process", "capbus._cli.main",
            "capbus._protocol.frames"} <= set(tree.modules)
    graph = tree.import_graph()
    assert "capbus._protocol.frames" in graph["capbus._runtime.process"]
    assert "capbus._kernel.kernel" in graph["capbus"]  # _LAZY: {"Kernel": "._kernel.kernel"}
    # A function-level import counts: main imports each verb's module only when it runs.
    assert {"capbus._cli.admin", "capbus._cli.top"} <= graph["capbus._cli.main"]


def test_the_checks_catch_what_they_are_for(tmp_path):
    """A circle through a function-level `from . import x`, a private name taken from another
    package (imported, or read off an imported module), and an object's private reached from
    another module are all found; a TYPE_CHECKING import, self._x and a module-level private
    used in its own package are not."""
    t = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/_a/__init__.py": "",
        "pkg/_a/one.py": """
            from typing import TYPE_CHECKING
            from .two import _helper
            if TYPE_CHECKING:
                from ..b import Thing
            class One:
                def _mine(self):
                    self._state = 1
                    return self._state
            """,
        "pkg/_a/two.py": """
            def _helper():
                from . import three
            """,
        "pkg/_a/three.py": "from .one import One\n",
        "pkg/b.py": """
            from ._a.two import _helper
            from ._a import two
            class Thing:
                def go(self, one):
                    two._helper()
                    return one._mine()
            """,
    })
    graph = t.import_graph()
    assert graph["pkg._a.one"] == {"pkg._a.two"}  # not pkg.b: only a type checker imports it
    assert cycles(graph) == [["pkg._a.one", "pkg._a.two", "pkg._a.three", "pkg._a.one"]]
    assert set(t.cross_package_private_imports()) == {("pkg.b", "_helper")}
    assert set(t.object_privates()) == {("pkg.b", "_mine")}


def test_the_cycle_finder(tmp_path):
    """It reports a circle of three, ignores a diamond, and finds the CLI's old circle."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e", "f"}, "e": {"g"}, "f": {"g"}, "g": set()}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    t = _write(tmp_path, {  # the shape of src/capbus before the _cli package
        "pkg/__init__.py": "",
        "pkg/_cli.py": "def main():\n    from . import _top\n",
        "pkg/_top.py": "def format_stats():\n    from ._cli import _table\n",
    })
    assert cycles(t.import_graph()) == [["pkg._cli", "pkg._top", "pkg._cli"]]


def test_no_import_cycles(tree):
    found = cycles(tree.import_graph())
    assert not found, "import circles in src/capbus (every arrow must run one way):\n" + "\n".join(
        "  " + " -> ".join(c) for c in found)


def test_no_new_private_imports_across_packages(tree):
    found = tree.cross_package_private_imports()
    new = {k: v for k, v in found.items() if k not in CROSS_PACKAGE_PRIVATE_IMPORTS}
    assert not new, ("private names taken from another package (make them public there, or add "
                     "them to CROSS_PACKAGE_PRIVATE_IMPORTS with a reason):\n"
                     + "\n".join(f"  {m} uses {n}: {w}" for (m, n), w in sorted(new.items())))
    gone = set(CROSS_PACKAGE_PRIVATE_IMPORTS) - set(found)
    assert not gone, f"no longer used, remove from CROSS_PACKAGE_PRIVATE_IMPORTS: {sorted(gone)}"


def test_no_new_reach_into_other_objects_privates(tree):
    found = tree.object_privates()
    new = {k: v for k, v in found.items() if k not in KNOWN_OBJECT_PRIVATES}
    assert not new, ("a module reaching into the private members of another module's objects "
                     "(give them a public way, or add them to KNOWN_OBJECT_PRIVATES with a "
                     "reason):\n" + "\n".join(f"  {m} uses {n}: {w}" for (m, n), w in sorted(new.items())))
    gone = set(KNOWN_OBJECT_PRIVATES) - set(found)
    assert not gone, f"no longer used, remove from KNOWN_OBJECT_PRIVATES: {sorted(gone)}"


# ---- the runtime's objects and the native core: calls go down ---------------------------------

_BELOW_PROCESS = ("endpoint", "service", "region", "subscription", "lane", "loan", "limits", "wait",
                  "session")


def test_runtime_objects_never_see_the_process(tree):
    """Endpoint, Service, Region, Subscription and the lane code are handed the Session: none of
    them imports process.py or names Process, not even for a type checker (whose imports the
    circle check leaves out)."""
    bad = []
    for short in _BELOW_PROCESS:
        name = f"capbus._runtime.{short}"
        for node in ast.walk(tree.trees[name]):
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("process"):
                bad.append(f"{name}:{node.lineno} imports {node.module}")
            elif isinstance(node, ast.Name) and node.id == "Process":
                bad.append(f"{name}:{node.lineno} names Process")
    assert not bad, "an object below Process sees it:\n" + "\n".join(bad)


def test_native_core_imports_nothing_and_calls_no_method_by_name():
    """The C sources import no Python module and look no Python method up by name: what they need
    is handed in (_core.register, the bases' __init__). The one name looked up is a builtin
    memoryview's own release(), at init; attributes are read only from what register() is given
    (its errors module, the classes' .code)."""
    native = SRC / "capbus" / "_native"
    found = []
    for path in sorted(native.iterdir()):
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if "PyImport_" in line or "VectorcallMethod" in line or (
                    "CallMethod" in line and '"release"' not in line):
                found.append(f"{path.name}:{no}: {line.strip()}")
            if "GetAttrString" in line and path.name != "module.c":
                found.append(f"{path.name}:{no}: {line.strip()}")
    assert not found, "the native core reaches up into Python by name:\n" + "\n".join(found)
