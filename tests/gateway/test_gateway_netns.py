"""Two gateways in two network namespaces joined by a veth pair (root only): a call crosses, and
cutting the link reaches on_death and the pending call (PeerDied) within the lease. Namespaces
and links are removed whatever happens."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import threading
import time

import pytest
from _gwutil import Hosts

import capbus

pytest.importorskip("zenoh")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def netns():
    if os.geteuid() != 0:
        pytest.skip("needs root: it creates network namespaces and a veth pair")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` to create network namespaces")
    tag = f"{os.getpid() % 10000}{random.randrange(1000)}"
    a, b = f"cbgwa{tag}", f"cbgwb{tag}"
    net = f"10.{random.randrange(200, 250)}.{random.randrange(1, 250)}"
    made: list[str] = []
    try:
        for ns in (a, b):
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}")
        _ip("link", "set", f"va{tag}", "netns", a)
        _ip("link", "set", f"vb{tag}", "netns", b)
        for ns, dev, host in ((a, f"va{tag}", 1), (b, f"vb{tag}", 2)):
            _ip("-n", ns, "addr", "add", f"{net}.{host}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, OSError) as exc:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        pytest.skip(f"cannot create network namespaces here: {exc}")
    yield {"a": a, "b": b, "ip_b": f"{net}.2", "dev_a": f"va{tag}"}
    for ns in made:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def test_call_across_namespaces_and_link_cut(netns):
    hosts = Hosts()
    try:
        hosts.service("host-b", "kv")
        port = hosts.port
        hosts.gateway("host-b", prefix=["ip", "netns", "exec", netns["b"]],
                      listen=[f"tcp/{netns['ip_b']}:{port}"], export=["kv"])
        hosts.gateway("host-a", prefix=["ip", "netns", "exec", netns["a"]],
                      connect=[f"tcp/{netns['ip_b']}:{port}"])
        pa = hosts.connect("host-a")
        ep = pa.lookup("kv@host-b", timeout=15)
        assert ep.call(1, (), b"abc", timeout=10).payload == b"cba"
        died = threading.Event()
        ep.on_death(lambda _e: died.set())
        got: list[object] = []

        def pending() -> None:
            try:
                got.append(ep.call(2, (20_000,), timeout=30))
            except capbus.IpcError as exc:
                got.append(exc)

        t = threading.Thread(target=pending, daemon=True)
        t.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        _ip("-n", netns["a"], "link", "set", netns["dev_a"], "down")
        assert died.wait(15), "cutting the link did not reach on_death"
        t.join(timeout=15)
        assert got and isinstance(got[0], capbus.PeerDied | capbus.InvalidCapability), got
        assert time.monotonic() - t0 < 12  # lease 1 s, with slack for a loaded machine
    finally:
        hosts.close()
