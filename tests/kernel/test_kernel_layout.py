"""The kernel's layout holds: its domains import one way (state <- channels <- naming <-
delegation; none imports the driver), only shm.py touches the native core, and every request
type has exactly one handler. Read from the source with ast: nothing is imported to check it.
And a kernel loads only capbus._layout of the native code, never the data plane (capbus._core):
checked in a real kernel process that serves a lookup."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time

from conftest import Children, readline

import capbus
from capbus._kernel import channels, delegation, introspect, naming, region_requests, topics
from capbus._protocol import frames

KERNEL_DIR = pathlib.Path(capbus.__file__).parent / "_kernel"
NATIVE = ("_core", "_layout")  # the compiled modules of capbus the kernel could import
DOMAINS = ("channels", "naming", "delegation", "region_requests", "introspect", "topics")
# What each domain may import of its siblings (besides the leaf modules of _kernel)
ALLOWED = {
    "channels": {"topics"},  # a released topic capability ends its topic (drop_cap)
    "naming": {"channels"},
    "delegation": {"channels", "naming", "topics"},
    "region_requests": set(),
    "introspect": {"topics"},
    "topics": set(),
}


def _kernel_imports(name: str) -> set[str]:
    """The _kernel modules (and the native modules, capbus._core or _layout) that
    _kernel/<name>.py imports."""
    tree = ast.parse((KERNEL_DIR / f"{name}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(a.name for a in node.names)
            elif node.level == 2:
                found.update(a.name for a in node.names if a.name in NATIVE)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("capbus.") for a in node.names
                         if a.name.removeprefix("capbus.") in NATIVE)
    return found


def test_domains_import_one_way():
    for name in DOMAINS:
        imported = _kernel_imports(name)
        assert "kernel" not in imported, f"{name}.py imports kernel.py"
        siblings = imported & set(DOMAINS)
        assert siblings <= ALLOWED[name], f"{name}.py imports {sorted(siblings - ALLOWED[name])}"
    assert not _kernel_imports("state") & (set(DOMAINS) | {"kernel"})


def test_only_shm_touches_the_native_core():
    users = sorted(p.stem for p in KERNEL_DIR.glob("*.py") if set(NATIVE) & _kernel_imports(p.stem))
    assert users == ["shm"], users
    assert _kernel_imports("shm") & set(NATIVE) == {"_layout"}  # and only its kernel part


# The kernel process: `import capbus` loads its public names on first use, so a process that
# runs only the kernel names capbus.Kernel and nothing else; it serves until told, reads the
# channels' counters once (channel_stats), and prints which capbus modules it holds.
KERNEL_PROCESS = """
    import json, sys, time
    import capbus

    Kernel = capbus.Kernel
    kernel = Kernel(sys.argv[1])
    print("ready", flush=True)
    sys.stdin.readline()
    print(json.dumps(kernel.channels()), flush=True)
    sys.stdin.readline()
    deadline = time.monotonic() + 10  # the client has gone: its channel closes (set_state)
    while kernel.channels() and time.monotonic() < deadline:
        time.sleep(0.01)
    left = len(kernel.channels())
    kernel.stop()
    print(json.dumps({"left": left, "modules": sorted(m for m in sys.modules if m.startswith("capbus"))}))
"""

# A client of that kernel (the whole capbus, data plane included): registers a service, looks
# it up from a second connection and sends it one message (the kernel makes the channel: memfds,
# control page, layout), then waits until told to go.
CLIENT = """
    import sys
    import capbus

    with capbus.connect() as a, capbus.connect() as b:
        svc = a.register("layout-kv")
        ep = b.lookup("layout-kv", timeout=10)
        ep.send_async(3, data=(5,))
        req = svc.recv(timeout=10)
        print("looked up", ep.process_id == a.id, req.opcode, flush=True)
        sys.stdin.readline()
"""


def test_a_kernel_process_loads_only_the_layout_of_the_native_core(sockdir):
    path = os.path.join(sockdir, "k.sock")
    procs = Children(path)
    try:
        k = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KERNEL_PROCESS), path],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        procs.procs.append(k)
        _pump(k)
        assert readline(k) == "ready"
        client = procs.start(CLIENT, stdin=subprocess.PIPE)
        assert readline(client) == "looked up True 3"
        k.stdin.write("stats\n")
        k.stdin.flush()
        rows = json.loads(readline(k))
        assert len(rows) == 1 and rows[0]["sent"] == 1, rows  # channel_stats, through _layout
        client.stdin.close()  # the client goes: the kernel closes its channel (and wakes it)
        assert client.wait(timeout=10) == 0, client.stderr.read()
        k.stdin.write("stop\n")
        k.stdin.flush()
        report = json.loads(readline(k))
        assert k.wait(timeout=10) == 0, k.stderr.read()
    finally:
        procs.cleanup()
    assert report["left"] == 0
    modules = set(report["modules"])
    assert {"capbus._kernel.kernel", "capbus._kernel.shm", "capbus._layout"} <= modules
    assert "capbus._core" not in modules, sorted(modules)
    assert not {m for m in modules if m.startswith("capbus._runtime")}, sorted(modules)


def test_the_daemon_maps_no_data_plane(sockdir):
    """`capbus kernel` serving a client that called through it: its memory maps hold the kernel's
    native module (capbus._layout) and never the data plane's (capbus._core)."""
    path = os.path.join(sockdir, "k.sock")
    d = subprocess.Popen([sys.executable, "-m", "capbus", "kernel", "--socket", path],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    procs = Children(path)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(path) and d.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        client = procs.start(CLIENT, stdin=subprocess.PIPE)
        assert readline(client, 30) == "looked up True 3"
        with open(f"/proc/{d.pid}/maps") as f:
            maps = {os.path.basename(line.split()[-1]).split(".")[0]
                    for line in f if line.rstrip().endswith(".so")}
        client.stdin.close()
        assert client.wait(timeout=10) == 0
    finally:
        procs.cleanup()
        d.terminate()
        d.wait(timeout=10)
    assert "_layout" in maps, sorted(maps)
    assert "_core" not in maps, sorted(maps)


def _pump(p: subprocess.Popen) -> None:
    """Give a Popen the line queue conftest.readline reads (as Children.start does)."""
    import queue
    import threading

    p.lines = queue.Queue()  # type: ignore[attr-defined]

    def pump() -> None:
        for line in p.stdout:
            p.lines.put(line.rstrip("\n"))  # type: ignore[attr-defined]
        p.lines.put(None)  # type: ignore[attr-defined]

    threading.Thread(target=pump, daemon=True).start()


def test_every_request_has_one_handler():
    seen: dict[type, str] = {}
    for module in (channels, naming, delegation, region_requests, introspect, topics):
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
    assert imported & set(DOMAINS) <= {"channels", "naming", "topics"}, sorted(imported & set(DOMAINS))
    for name in (*DOMAINS, "state"):
        assert "connections" not in _kernel_imports(name), f"{name}.py imports connections.py"


def test_hello_is_answered_by_connections_alone():
    from capbus._kernel import connections

    assert list(connections.HANDLERS) == [frames.Hello]
    for module in (channels, naming, delegation, region_requests, introspect, topics):
        assert frames.Hello not in module.HANDLERS, module.__name__
