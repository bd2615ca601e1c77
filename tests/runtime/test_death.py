"""Death (Tock's state-change handling, Binder's linkToDeath): every way a process can end."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import pytest
from conftest import readline

import capbus

SERVER = """
import capbus, os, sys, time
p = capbus.connect()
p.register("victim")
print("ready", flush=True)
how = sys.argv[1]
time.sleep(0.2)
if how == "close":
    p.close(); time.sleep(30)
elif how == "crash":
    raise RuntimeError("boom")
elif how == "exit":
    os._exit(0)
time.sleep(30)
"""


@pytest.mark.parametrize("how", ["close", "crash", "exit", "sigkill", "sigterm"])
def test_watchers_told_and_registration_removed(kernel, children, how):
    p = children.start(SERVER, how, stdin=subprocess.DEVNULL)
    assert readline(p) == "ready"
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("victim")
        told = threading.Event()
        seen: list[capbus.Endpoint] = []
        ep.on_death(lambda e: (seen.append(e), told.set()))
        del ep  # the runtime keeps a watched endpoint alive until it is told
        if how == "sigkill":
            p.send_signal(signal.SIGKILL)
        elif how == "sigterm":
            p.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert told.wait(5), f"not told of death by {how}"
        assert time.monotonic() - t0 < 1.0
        assert seen[0].name == "victim" and seen[0].dead
        with pytest.raises(capbus.ServiceNotFound):
            me.lookup("victim")


def test_on_death_after_death_fires_at_once(kernel):
    with capbus.connect(kernel.socket_path) as a, capbus.connect(kernel.socket_path) as b:
        a.register("gone")
        ep = b.lookup("gone")
        a.close()
        told = threading.Event()
        time.sleep(0.1)
        ep.on_death(lambda e: told.set())
        assert told.wait(2)


def test_many_watchers_all_told(kernel):
    with capbus.connect(kernel.socket_path) as server:
        server.register("popular")
        watchers = [capbus.connect(kernel.socket_path) for _ in range(20)]
        events = [threading.Event() for _ in watchers]
        for w, ev in zip(watchers, events, strict=True):
            w.lookup("popular").on_death(lambda e, ev=ev: ev.set())
    assert all(ev.wait(2) for ev in events)
    for w in watchers:
        w.close()


def test_kernel_stop_reaches_processes(sockdir):
    import os

    k = capbus.Kernel(os.path.join(sockdir, "k.sock"))
    p = capbus.connect(k.socket_path)
    k.stop()
    with pytest.raises(capbus.KernelUnavailable):
        p.register("x")
    assert not os.path.exists(k.socket_path)


def test_what_close_gives_back_is_free_when_it_returns(kernel):
    """Process.close() returns once the kernel has let go of everything the connection held:
    its name can be registered by another connection at once, every time (the kernel handles
    connections in turn, so without waiting for its end of file the next Register could come
    first and find the name taken)."""
    with capbus.connect(kernel.socket_path) as keeper:
        for i in range(200):
            p = capbus.connect(kernel.socket_path)
            p.register(f"handover-{i % 2}")
            p.close()
            keeper.register(f"handover-{i % 2}").close()
