"""The kernel's own life: socket placement and permissions, one kernel per path, the CLI."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys

import pytest

import capbus


def test_default_socket_is_private(sockdir, monkeypatch):
    monkeypatch.delenv("CAPBUS_SOCKET", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", sockdir)
    with capbus.Kernel() as k:
        assert k.socket_path == os.path.join(sockdir, "capbus", "kernel.sock")
        assert stat.S_IMODE(os.stat(os.path.dirname(k.socket_path)).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(k.socket_path).st_mode) == 0o600
        with capbus.connect() as p:
            assert p.id > 0


def test_capbus_socket_env_sets_kernel_path(sockdir, monkeypatch):
    path = os.path.join(sockdir, "env.sock")
    monkeypatch.setenv("CAPBUS_SOCKET", path)
    with capbus.Kernel() as k:
        assert k.socket_path == path


def test_second_kernel_on_live_path_refuses(kernel):
    with pytest.raises(capbus.IpcError, match="already serving"):
        capbus.Kernel(kernel.socket_path)
    with capbus.connect(kernel.socket_path) as p:  # the first is unharmed
        p.register("still-here")


def test_stale_socket_replaced(sockdir):
    path = os.path.join(sockdir, "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(path)
    s.close()  # a socket file nobody listens on
    with capbus.Kernel(path) as k, capbus.connect(k.socket_path) as p:
        assert p.id > 0
    with open(path, "w") as f:
        f.write("junk")
    with capbus.Kernel(path) as k, capbus.connect(k.socket_path) as p:
        assert p.id > 0


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "capbus", *args], capture_output=True,
                          text=True, timeout=30)


def test_ps_and_services(kernel):
    with capbus.connect(kernel.socket_path) as p:
        p.register("kv")
        p.register("cache")
        r = _cli("ps", "--socket", kernel.socket_path)
        assert r.returncode == 0, r.stderr
        header, *lines = r.stdout.splitlines()
        assert header.split()[:4] == ["ID", "PID", "UID", "PACKAGE"]
        mine = [line for line in lines if line.split()[0] == str(p.id)]
        assert mine and "kv,cache" in mine[0]
        rows = json.loads(_cli("ps", "--json", "--socket", kernel.socket_path).stdout)
        assert {r["id"] for r in rows} >= {p.id}
        r = _cli("services", "--socket", kernel.socket_path)
        assert r.returncode == 0 and "kv" in r.stdout and "cache" in r.stdout
        rows = json.loads(_cli("services", "--json", "--socket", kernel.socket_path).stdout)
        assert {(r["name"], r["id"]) for r in rows} == {("kv", p.id), ("cache", p.id)}


def test_ps_pages_large_tables(kernel):
    procs = [capbus.connect(kernel.socket_path) for _ in range(250)]
    try:
        rows = json.loads(_cli("ps", "--json", "--socket", kernel.socket_path).stdout)
        assert {p.id for p in procs} <= {r["id"] for r in rows}
    finally:
        for p in procs:
            p.close()


def test_cli_without_kernel(sockdir):
    r = _cli("ps", "--socket", os.path.join(sockdir, "none.sock"))
    assert r.returncode == 1 and "KernelUnavailable" in r.stderr


def test_spawn_refuses_one_string_for_argv(kernel):
    # A str is a sequence of strings too: "python3 app.py" would launch "p" with "y", "t", ...
    with pytest.raises(TypeError, match="list of strings"):
        kernel.spawn("python3 -c pass")
