"""Tests of the capbus._core primitives: futexes and atomics on a buffer at an offset."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from capbus import _core


@pytest.fixture
def shm():
    """A 4096-byte memfd mapped MAP_SHARED read-write; yields (fd, mmap)."""
    fd = os.memfd_create("capbus-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4096)
    m = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        yield fd, m
    finally:
        m.close()
        os.close(fd)


CHILD_WAITER = textwrap.dedent(
    """
    import mmap, os, sys
    from capbus import _core
    fd = int(sys.argv[1])
    prot = mmap.PROT_READ if sys.argv[2] == "ro" else mmap.PROT_READ | mmap.PROT_WRITE
    m = mmap.mmap(fd, 4096, mmap.MAP_SHARED, prot)
    # Announce through a separate word (written by the parent for ro mappings is impossible, so
    # the child only announces when it can write; the parent otherwise polls futex_wake).
    if sys.argv[2] == "rw":
        _core.atomic_store_u32(m, 64, 1)
    woke = _core.futex_wait(m, 0, 0, 20.0)
    print("woke" if woke else "timeout", _core.atomic_load_u32(m, 0), flush=True)
    """
)


def _spawn_waiter(fd: int, mode: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD_WAITER, str(fd), mode],
        pass_fds=(fd,),
        stdout=subprocess.PIPE,
        text=True,
    )


def _wake_until_woken(m, deadline_s: float = 15.0) -> int:
    """futex_wake until it reports that it woke somebody (i.e. the child was asleep on it)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        n = _core.futex_wake(m, 0, 1)
        if n:
            return n
        time.sleep(0.005)
    return 0


@pytest.mark.parametrize("mode", ["rw", "ro"])
def test_cross_process_wake_without_value_change(shm, mode):
    # The value stays equal to `expected`, so only a real shared-futex wake can end the wait:
    # futex_wake returning 1 proves the child in another process was asleep on the same word.
    fd, m = shm
    child = _spawn_waiter(fd, mode)
    try:
        assert _wake_until_woken(m) == 1
        out, _ = child.communicate(timeout=15)
        assert out.split() == ["woke", "0"]
        assert child.returncode == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_cross_process_value_change_then_wake(shm):
    fd, m = shm
    child = _spawn_waiter(fd, "rw")
    try:
        end = time.monotonic() + 15
        while _core.atomic_load_u32(m, 64) != 1:
            assert time.monotonic() < end
            time.sleep(0.001)
        _core.atomic_store_u32(m, 0, 7)
        _core.futex_wake(m, 0)
        out, _ = child.communicate(timeout=15)
        assert out.split() == ["woke", "7"]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_wake_from_read_only_mapping(shm):
    # The waker only has a PROT_READ view (as both ends have of the control page).
    fd, m = shm
    ro = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ)
    try:
        child = _spawn_waiter(fd, "rw")
        try:
            assert _wake_until_woken(ro) == 1
            out, _ = child.communicate(timeout=15)
            assert out.split()[0] == "woke"
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    finally:
        ro.close()


def test_wait_returns_true_at_once_when_value_differs(shm):
    _, m = shm
    _core.atomic_store_u32(m, 0, 5)
    t = time.monotonic()
    assert _core.futex_wait(m, 0, 4, 5.0) is True
    assert time.monotonic() - t < 1.0


def test_wait_timeout(shm):
    _, m = shm
    t = time.monotonic()
    assert _core.futex_wait(m, 0, 0, 0.1) is False
    dt = time.monotonic() - t
    assert 0.09 <= dt < 2.0
    assert _core.futex_wait(m, 0, 0, 0) is False
    assert _core.futex_wait(m, 0, 0, -1.0) is False


def test_wait_releases_gil_and_thread_wake(shm):
    _, m = shm
    result = []
    th = threading.Thread(target=lambda: result.append(_core.futex_wait(m, 0, 0, 10.0)))
    th.start()
    # If futex_wait held the GIL, this loop could not run while the thread sleeps.
    end = time.monotonic() + 10
    while not _core.futex_wake(m, 0):
        assert time.monotonic() < end
        time.sleep(0.001)
    th.join(10)
    assert result == [True]


def test_wait_signal_handler_runs(shm):
    # EINTR: the wait is retried, but pending Python signal handlers run (and may raise).
    import signal

    _, m = shm

    class Boom(Exception):
        pass

    def handler(signum, frame):
        raise Boom

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        t = time.monotonic()
        with pytest.raises(Boom):
            _core.futex_wait(m, 0, 0, 10.0)
        assert time.monotonic() - t < 5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_wait_eintr_retries_with_remaining_time(shm):
    import signal

    _, m = shm
    hits = []
    old = signal.signal(signal.SIGALRM, lambda s, f: hits.append(s))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.02, 0.02)
        t = time.monotonic()
        assert _core.futex_wait(m, 0, 0, 0.3) is False
        dt = time.monotonic() - t
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert hits
    assert 0.29 <= dt < 2.0


def test_atomics_u32(shm):
    _, m = shm
    _core.atomic_store_u32(m, 8, 0xFFFFFFFF)
    assert _core.atomic_load_u32(m, 8) == 0xFFFFFFFF
    assert m[8:12] == b"\xff" * 4
    assert _core.atomic_cas_u32(m, 8, 1, 2) is False
    assert _core.atomic_load_u32(m, 8) == 0xFFFFFFFF
    assert _core.atomic_cas_u32(m, 8, 0xFFFFFFFF, 2) is True
    assert _core.atomic_load_u32(m, 8) == 2
    assert int.from_bytes(m[8:12], "little") == 2


def test_atomics_u64(shm):
    _, m = shm
    _core.atomic_store_u64(m, 16, 2**64 - 1)
    assert _core.atomic_load_u64(m, 16) == 2**64 - 1
    assert _core.atomic_cas_u64(m, 16, 0, 1) is False
    assert _core.atomic_cas_u64(m, 16, 2**64 - 1, 10) is True
    assert _core.atomic_add_u64(m, 16, 5) == 10
    assert _core.atomic_load_u64(m, 16) == 15
    # Wraps modulo 2**64.
    _core.atomic_store_u64(m, 16, 2**64 - 1)
    assert _core.atomic_add_u64(m, 16, 2) == 2**64 - 1
    assert _core.atomic_load_u64(m, 16) == 1


def test_atomics_on_bytearray():
    b = bytearray(64)
    _core.atomic_store_u64(b, 8, 0x0102030405060708)
    assert bytes(b[8:16]) == (0x0102030405060708).to_bytes(8, "little")
    assert _core.atomic_add_u64(b, 8, 1) == 0x0102030405060708


def test_cas_contention_between_threads(shm):
    _, m = shm
    n_threads, n_iter = 4, 2000

    def worker():
        for _ in range(n_iter):
            while True:
                v = _core.atomic_load_u64(m, 24)
                if _core.atomic_cas_u64(m, 24, v, v + 1):
                    break

    ths = [threading.Thread(target=worker) for _ in range(n_threads)]
    for t in ths:
        t.start()
    for t in ths:
        t.join(60)
    assert _core.atomic_load_u64(m, 24) == n_threads * n_iter


@pytest.mark.parametrize(
    "fn,args",
    [
        (_core.atomic_load_u32, (4096,)),
        (_core.atomic_load_u32, (4093,)),
        (_core.atomic_load_u32, (-4,)),
        (_core.atomic_load_u32, (2,)),
        (_core.atomic_load_u64, (4,)),
        (_core.atomic_load_u64, (4092,)),
        (_core.atomic_store_u32, (1, 0)),
        (_core.atomic_store_u64, (4096, 0)),
        (_core.atomic_cas_u32, (6, 0, 1)),
        (_core.atomic_cas_u64, (12, 0, 1)),
        (_core.atomic_add_u64, (4100, 1)),
        (_core.futex_wake, (3,)),
        (_core.futex_wake, (4096,)),
        (_core.futex_wait, (4094, 0, 0.0)),
    ],
)
def test_bad_offsets(shm, fn, args):
    _, m = shm
    with pytest.raises(ValueError):
        fn(m, *args)


def test_misaligned_address_rejected():
    # An aligned offset into a buffer whose base is misaligned still gives a misaligned address.
    b = bytearray(64)
    mv = memoryview(b)[1:]
    with pytest.raises(ValueError):
        _core.atomic_load_u32(mv, 0)


def test_bad_values(shm):
    _, m = shm
    with pytest.raises(ValueError):
        _core.atomic_store_u32(m, 0, 2**32)
    with pytest.raises(ValueError):
        _core.atomic_store_u32(m, 0, -1)
    with pytest.raises(ValueError):
        _core.atomic_store_u64(m, 0, 2**64)
    with pytest.raises(ValueError):
        _core.atomic_cas_u64(m, 0, -1, 0)
    with pytest.raises(ValueError):
        _core.futex_wait(m, 0, 2**32, 0.0)
    with pytest.raises(ValueError):
        _core.futex_wake(m, 0, -1)
    with pytest.raises(TypeError):
        _core.atomic_store_u32(m, 0, 1.5)


def test_read_only_buffer(shm):
    fd, _ = shm
    ro = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ)
    try:
        assert _core.atomic_load_u32(ro, 0) == 0
        assert _core.atomic_load_u64(ro, 8) == 0
        assert _core.futex_wait(ro, 0, 1, 0.0) is True
        assert _core.futex_wait(ro, 0, 0, 0.01) is False
        assert _core.futex_wake(ro, 0) == 0
        with pytest.raises(TypeError):
            _core.atomic_store_u32(ro, 0, 1)
        with pytest.raises(TypeError):
            _core.atomic_cas_u64(ro, 0, 0, 1)
        with pytest.raises(TypeError):
            _core.atomic_store_u32(b"\0" * 8, 0, 1)
    finally:
        ro.close()
