"""Helpers of the gateway tests: free ports, child gateways and services, two hosts."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import capbus

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Child:
    """A Python child whose stdout lines are queued; killed and reaped by close()."""

    def __init__(self, argv: list[str], prefix: list[str] | None = None,
                 graceful: bool = True) -> None:
        self.graceful = graceful
        self.p = subprocess.Popen([*(prefix or []), sys.executable, *argv], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.err: list[str] = []

        def pump() -> None:
            assert self.p.stdout is not None
            for line in self.p.stdout:
                self.lines.put(line.rstrip("\n"))
            self.lines.put(None)

        def pump_err() -> None:
            assert self.p.stderr is not None
            for line in self.p.stderr:
                self.err.append(line)

        threading.Thread(target=pump, daemon=True).start()
        threading.Thread(target=pump_err, daemon=True).start()

    def line(self, timeout: float = 20.0) -> str:
        try:
            got = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"child said nothing in {timeout} s; stderr: "
                                 f"{''.join(self.err)[-2000:]}") from None
        if got is None:
            raise AssertionError(f"child exited ({self.p.wait()}); stderr: "
                                 f"{''.join(self.err)[-2000:]}")
        return got

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.p.kill()
        self.p.wait(timeout=10)

    def close(self) -> None:
        if self.p.poll() is None and not self.graceful:
            self.kill()
        if self.p.poll() is None:
            with contextlib.suppress(OSError):
                assert self.p.stdin is not None
                self.p.stdin.close()
            try:
                self.p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()


class Hosts:
    """Two kernels (host-a, host-b) embedded here; gateways and services as child processes."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="cbgw-")
        self.sock = {h: os.path.join(self.dir, f"{h}.sock") for h in ("host-a", "host-b")}
        self.kernels = {h: capbus.Kernel(p, audit=False) for h, p in self.sock.items()}
        self.children: list[Child] = []
        self.procs: list[capbus.Process] = []
        self.port = free_port()

    def gateway(self, host: str, prefix: list[str] | None = None, sock: str | None = None,
                **kw: object) -> Child:
        kw.setdefault("name", host)
        kw.setdefault("lease", 1.0)
        c = Child([str(HERE / "_gw_child.py"), sock or self.sock[host], json.dumps(kw)], prefix)
        self.children.append(c)
        assert c.line().startswith("ready")
        return c

    def pair(self, export: list[str] | None = None, **kw: object) -> tuple[Child, Child]:
        b = self.gateway("host-b", listen=[f"tcp/127.0.0.1:{self.port}"],
                         export=export or ["kv"], **kw)
        a = self.gateway("host-a", connect=[f"tcp/127.0.0.1:{self.port}"], **kw)
        return a, b

    def service(self, host: str, name: str = "kv") -> Child:
        c = Child([str(HERE / "_svc_child.py"), self.sock[host], name], graceful=False)
        self.children.append(c)
        assert c.line().startswith("ready")
        return c

    def connect(self, host: str) -> capbus.Process:
        p = capbus.connect(self.sock[host])
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.close()
        for c in reversed(self.children):
            c.close()
        for k in self.kernels.values():
            k.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
