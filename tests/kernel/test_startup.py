"""Start-up touches only what it creates, leftovers of a killed kernel never stop the next one, and
the defaults just work: connect() finds this process's own kernel, the CLI answers --version."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import connects, wait_for

import capbus


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_an_existing_socket_directory_is_never_chmodded(sockdir, monkeypatch):
    shared = os.path.join(sockdir, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o755)
    path = os.path.join(shared, "k.sock")
    monkeypatch.setenv("CAPBUS_SOCKET", path)  # the case that used to chmod the directory
    with capbus.Kernel(path):
        assert _mode(shared) == 0o755
        assert _mode(path) == 0o600  # the socket itself is private whatever the directory
    assert _mode(shared) == 0o755
    with capbus.Kernel(audit=None):  # the default path from CAPBUS_SOCKET: the same
        assert _mode(shared) == 0o755


def test_a_missing_socket_directory_is_created_private(sockdir):
    path = os.path.join(sockdir, "a", "b", "k.sock")
    with capbus.Kernel(path):
        assert _mode(os.path.dirname(path)) == 0o700


def test_leftovers_of_a_killed_daemon_never_stop_the_next(sockdir):
    path = os.path.join(sockdir, "k.sock")
    env = dict(os.environ)
    env.pop("CAPBUS_FD", None)
    for _ in range(2):
        daemon = subprocess.Popen([sys.executable, "-m", "capbus", "kernel", "--socket", path],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            assert wait_for(lambda: connects(path), 20), daemon.stderr
            with capbus.connect(path) as p:
                p.register("x")
                for _ in range(50):  # audit rows still buffered or mid-write at the kill
                    p.lookup("x").close()
            daemon.send_signal(signal.SIGKILL)
            daemon.wait(10)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait(10)
        # socket, lock and audit log (with its write-ahead log) are all left behind
        audit = os.path.join(sockdir, "audit.db")
        assert os.path.exists(path) and os.path.exists(path + ".lock")
        assert os.path.exists(audit) and os.path.exists(audit + "-wal")
    with capbus.Kernel(path) as k:
        assert k.audit_path == audit
        with capbus.connect(k.socket_path) as p:
            p.register("x")  # the name is free: the dead kernel's registry went with it
    # the next kernel appended to the dead ones' trail: both starts are still in it
    import sqlite3

    conn = sqlite3.connect(f"file:{audit}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    finally:
        conn.close()
    assert rows >= 3


def test_connect_finds_this_processs_own_kernel_first(sockdir, monkeypatch):
    with tempfile.TemporaryDirectory(prefix="cb-") as other:
        monkeypatch.setenv("CAPBUS_SOCKET", os.path.join(other, "nobody-here.sock"))
        with capbus.Kernel(os.path.join(sockdir, "k.sock")) as k:
            with capbus.connect() as p:
                svc = p.register("mine")
                assert capbus.connect(k.socket_path).lookup("mine").process_id == p.id
                svc.close()
            with capbus.Kernel(os.path.join(sockdir, "k2.sock")) as k2:
                with capbus.connect() as p:  # the newest of this process's kernels
                    p.register("second")
                    with capbus.connect(k2.socket_path) as q:
                        assert q.lookup("second").process_id == p.id
            with capbus.connect() as p:  # k2 stopped: back to k
                p.register("again")
        with pytest.raises(capbus.KernelUnavailable, match="nobody-here"):
            capbus.connect()  # none embedded any more: $CAPBUS_SOCKET


def test_a_forked_child_does_not_take_its_parents_kernel_for_its_own(kernel, sockdir):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the kernel's thread is not here
        os.close(r)
        os.environ["CAPBUS_SOCKET"] = os.path.join(sockdir, "absent.sock")
        try:
            capbus.connect()
            os.write(w, b"connected")
        except capbus.KernelUnavailable:
            os.write(w, b"unavailable")
        os._exit(0)
    os.close(w)
    deadline = time.monotonic() + 20
    _, status = os.waitpid(pid, 0)
    assert time.monotonic() < deadline and status == 0
    assert os.read(r, 100) == b"unavailable"
    os.close(r)


def test_cli_version():
    out = subprocess.run([sys.executable, "-m", "capbus", "--version"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"capbus {capbus.__version__}"
