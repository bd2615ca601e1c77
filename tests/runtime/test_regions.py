"""Shared memory regions (VeridianOS create/map/transfer, Tock memory sharing)."""

from __future__ import annotations

import mmap
import os
import subprocess
import threading

import pytest
from conftest import readline, region_fds, wait_for

import capbus


def _receive(svc: capbus.Service, box: dict) -> threading.Thread:
    def run():
        req = svc.recv(timeout=10)
        box["req"] = req
        box["regions"] = req.regions
        req.reply(0)

    t = threading.Thread(target=run)
    t.start()
    return t


def test_create_map_and_ndarray(kernel):
    np = pytest.importorskip("numpy")
    with capbus.connect(kernel.socket_path) as p:
        r = p.create_region(1 << 20)
        assert r.size == 1 << 20 and not r.sealed and r.writable
        r.buffer[:5] = b"hello"
        assert bytes(r.buffer[:5]) == b"hello"
        a = r.ndarray(np.float64, (1024, 128))
        a[3, 4] = 2.5
        assert r.ndarray(np.float64)[3 * 128 + 4] == 2.5
        r.close()
        with pytest.raises(capbus.IpcError, match="closed"):
            r.buffer  # noqa: B018
        with pytest.raises(ValueError):
            p.create_region(0)


def test_transfer_moves_access(kernel):
    with capbus.connect(kernel.socket_path) as a, capbus.connect(kernel.socket_path) as b:
        svc = b.register("sink")
        r = a.create_region(4096)
        r.buffer[:4] = b"data"
        stale_view = r.buffer
        box: dict = {}
        t = _receive(svc, box)
        a.lookup("sink").call(1, regions=[r], move=True, timeout=5)
        t.join(10)
        (got,) = box["regions"]
        assert bytes(got.buffer[:4]) == b"data" and got.writable
        with pytest.raises(capbus.IpcError, match="moved"):
            r.buffer  # noqa: B018
        assert bytes(stale_view[:4]) == b"\0\0\0\0"  # a view kept from before: detached, zeros
        got.buffer[:4] = b"mine"  # the receiver owns it now


def test_share_needs_share_right_and_is_shared(kernel):
    with capbus.connect(kernel.socket_path) as a, capbus.connect(kernel.socket_path) as b:
        svc = b.register("sink")
        r = a.create_region(4096)
        box: dict = {}
        t = _receive(svc, box)
        a.lookup("sink").call(1, regions=[r], move=False, timeout=5)
        t.join(10)
        (got,) = box["regions"]
        r.buffer[100:103] = b"abc"  # the same memory on both sides
        assert bytes(got.buffer[100:103]) == b"abc"


def test_sealed_region_is_read_only_everywhere(kernel):
    with capbus.connect(kernel.socket_path) as a, capbus.connect(kernel.socket_path) as b:
        svc = b.register("sink")
        r = a.create_region(8192)
        r.buffer[:6] = b"sealed"
        r.seal_readonly()
        assert r.sealed and not r.writable
        with pytest.raises(TypeError):
            r.buffer[0] = 1
        box: dict = {}
        t = _receive(svc, box)
        a.lookup("sink").call(1, regions=[r], timeout=5)
        t.join(10)
        (got,) = box["regions"]
        assert got.sealed and bytes(got.buffer[:6]) == b"sealed"  # check once, trust it
        # Not even a fresh open through /proc gives a writable mapping.
        given = got._fresh_fd()  # the runtime keeps none: it closes the memfd once mapped
        fd = os.open(f"/proc/self/fd/{given}", os.O_RDWR)
        os.close(given)
        try:
            with pytest.raises(PermissionError):
                mmap.mmap(fd, 8192, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            with pytest.raises(PermissionError):
                os.pwrite(fd, b"x", 0)
        finally:
            os.close(fd)


def test_seal_refused_while_mapped_writable_elsewhere(kernel):
    with capbus.connect(kernel.socket_path) as a, capbus.connect(kernel.socket_path) as b:
        svc = b.register("sink")
        r = a.create_region(4096)
        box: dict = {}
        t = _receive(svc, box)
        a.lookup("sink").call(1, regions=[r], timeout=5)
        t.join(10)
        assert box["regions"][0].writable  # B maps it writable
        with pytest.raises(capbus.PermissionDenied, match="mapped writable"):
            r.seal_readonly()
        assert r.writable  # and A keeps its mapping


CYCLER = """
import capbus, os, sys
n = int(sys.argv[1])
done = 0
for i in range(n):
    pid = os.fork()
    if pid == 0:
        p = capbus.connect()
        r = p.create_region(1 << 16)
        r.buffer[:8] = i.to_bytes(8, "little")
        p.lookup("sink").send_async(1, data=(i,), regions=[r], move=True)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    done += status == 0
print("done", done, flush=True)
"""


def _fd_kinds() -> dict[str, int]:
    """What this process's fds are, counted by kind (for a failure message)."""
    kinds: dict[str, int] = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            kind = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


@pytest.mark.timeout(240)
def test_1000_create_transfer_exit_cycles_leave_nothing(kernel, children):
    shm_before = set(os.listdir("/dev/shm"))

    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    with capbus.connect(kernel.socket_path) as me:
        svc = me.register("sink")
        got = 0
        warm = threading.Event()

        def drain():
            nonlocal got
            while got < 1000:
                for req in svc.recv_many(64, timeout=1):
                    (r,) = req.regions
                    assert int.from_bytes(r.buffer[:8], "little") == req.data[0]
                    r.close()
                    got += 1
                    if got == 20:
                        warm.set()

        t = threading.Thread(target=drain, daemon=True)
        t.start()
        rss_before = rss_mb()  # the embedded kernel lives in this process
        p = children.start(CYCLER, "1000", stdin=subprocess.DEVNULL)
        # The baseline once what the first messages start for good is there (the child's pipes,
        # the runtime's peer watch: its epoll and eventfd).
        assert warm.wait(60)
        base_fds = len(os.listdir("/proc/self/fd"))
        assert readline(p, 200) == "done 1000"
        t.join(60)
        assert got == 1000
        # Nothing left: no region memfd held here (the embedded kernel is this process),
        # no fd growth, nothing in /dev/shm.
        assert wait_for(lambda: region_fds() == 0, 5), region_fds()
        assert wait_for(lambda: len(os.listdir("/proc/self/fd")) <= base_fds + 2, 15, 0.05), (
            base_fds, len(os.listdir("/proc/self/fd")),
            sorted(_fd_kinds().items(), key=lambda kv: -kv[1])[:12])
        # 1000 regions of 64 KiB went through here: 62 MiB if any were kept.
        assert rss_mb() - rss_before < 30, (rss_before, rss_mb())
    assert set(os.listdir("/dev/shm")) == shm_before
