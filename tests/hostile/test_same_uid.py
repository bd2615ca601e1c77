"""Inside one uid, capbus processes are out of each other's reach: every capbus process (the
daemon, a program embedding capbus.Kernel, every process that connects, a forked child that
connects) is non-dumpable, so another process of the same uid can neither read its memory
(/proc/<pid>/mem), nor open its fds (/proc/<pid>/fd/N), nor take them (pidfd_getfd), nor ptrace
it. debuggable=True / CAPBUS_DEBUGGABLE=1 leave a process open to them (a debugger, py-spy):
the same attacks then work, which shows that the setting is what stops them. And the runtime
keeps no memfd open once it is mapped: N channels and regions cost no memfd at all."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import threading

import pytest
from _users import fresh_uid, need_root

import capbus
from capbus import _core

SECRET = b"capbus-secret-42"
PTRACE_ATTACH, PTRACE_DETACH = 16, 17
WALL = 0x40000000  # waitpid's __WALL: a tracee that is not our child
SYS_PIDFD_GETFD = 438  # x86_64 and aarch64 alike
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]


# ---- what runs in the forked processes ---------------------------------------------------------

def _run_daemon(link, path: str) -> None:
    """`capbus kernel --socket PATH`, the daemon's own code, in this process."""
    from capbus._cli import main as _cli

    def report() -> None:
        while not os.path.exists(path):
            threading.Event().wait(0.01)
        link.send({"pid": os.getpid(), "dumpable": _core.dumpable()})

    threading.Thread(target=report, daemon=True).start()
    _cli.main(["kernel", "--socket", path])  # the main thread: it handles SIGTERM


def _run_victim(link, path: str, debuggable: bool | None) -> None:
    """Serves a service, calls it (both ends of a channel here) and holds a region. Reports the
    fds it opened (not those the fork inherited from pytest, which earlier tests may have left)."""
    inherited = _fds()
    p = capbus.connect(path, debuggable=debuggable)
    svc = p.register("secret")
    threading.Thread(target=svc.serve, args=(lambda req: (0, (7,)),), daemon=True).start()
    assert p.lookup("secret").call(1, timeout=10).data[0] == 7
    region = p.create_region(4096)
    region.buffer[:len(SECRET)] = SECRET
    addr = ctypes.addressof(ctypes.c_char.from_buffer(region.buffer))
    fds = {fd: what for fd, what in _fds().items() if inherited.get(fd) != what}
    link.send({"pid": os.getpid(), "addr": addr, "fds": fds, "dumpable": _core.dumpable()})
    link.recv(120)


def _fds() -> dict[str, str]:
    """This process's fds and what each is (a number alone may be reused)."""
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return fds


def _errno(fn) -> str:
    try:
        fn()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def _attack(link) -> None:
    """For each target it is sent, every way in; what each one got."""
    while True:
        link.send(_try_all(link.recv(120)))


def _try_all(target: dict) -> dict:
    pid, out = target["pid"], {}

    def read_mem() -> None:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        try:
            if target.get("addr"):
                out["mem_bytes"] = os.pread(fd, len(SECRET), target["addr"]).decode("latin-1")
        finally:
            os.close(fd)

    def open_fd(fd: str) -> None:
        os.close(os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY))

    def getfd() -> None:
        pidfd = os.pidfd_open(pid)
        try:
            got = _libc.syscall(SYS_PIDFD_GETFD, pidfd, target["getfd"], 0)
            if got < 0:
                raise OSError(ctypes.get_errno(), "pidfd_getfd")
            out["getfd_link"] = os.readlink(f"/proc/self/fd/{got}")
            os.close(got)
        finally:
            os.close(pidfd)

    def attach() -> None:
        if _libc.ptrace(PTRACE_ATTACH, pid, None, None) != 0:
            raise OSError(ctypes.get_errno(), "ptrace")
        os.waitpid(pid, WALL)  # it stops for us; then let it go
        _libc.ptrace(PTRACE_DETACH, pid, None, None)

    out["mem"] = _errno(read_mem)
    # Its own fds (it told us which), and the low numbers blindly, as an attacker would.
    out["fd_open"] = {fd: _errno(lambda fd=fd: open_fd(fd))
                      for fd in [*target.get("fds", {}), *map(str, range(3, 40))]}
    out["getfd"] = _errno(getfd)
    out["ptrace"] = _errno(attach)
    return out


# ---- the tests ---------------------------------------------------------------------------------

@pytest.fixture
def uid_kernel(sockdir, as_user):
    """A daemon running as a fresh uid, in a directory of that uid; (uid, path, its AsUser)."""
    need_root()
    uid = fresh_uid()
    os.chown(sockdir, uid, uid)
    path = os.path.join(sockdir, "k.sock")
    daemon = as_user(uid, _run_daemon, path)
    info = daemon.recv()
    assert info["dumpable"] is False, "the daemon did not make itself non-dumpable"
    yield uid, path, daemon, info["pid"]
    daemon.stop()
    shutil.rmtree(sockdir, ignore_errors=True)


def _getfd_target(fds: dict[str, str]) -> int:
    """One of the victim's capbus fds: its kernel socket (any would do: all or none are open)."""
    return int(next(fd for fd, what in sorted(fds.items()) if what.startswith("socket:")))


@pytest.mark.parametrize("mode", ["default", "debuggable", "env"])
def test_a_process_of_the_same_uid_cannot_reach_into_a_capbus_process(uid_kernel, as_user, mode):
    uid, path, _, kernel_pid = uid_kernel
    victim = as_user(uid, _run_victim, path, True if mode == "debuggable" else None,
                     env={"CAPBUS_DEBUGGABLE": "1"} if mode == "env" else None)
    v = victim.recv()
    attacker = as_user(uid, _attack)
    open_ = mode != "default"
    assert v["dumpable"] is open_
    # Its channel and its region, mapped: no memfd left open to be taken.
    assert not [w for w in v["fds"].values() if w.startswith("/memfd:")], v["fds"]

    attacker.send({"pid": v["pid"], "addr": v["addr"], "fds": v["fds"],
                   "getfd": _getfd_target(v["fds"])})
    got = attacker.recv()
    refused = {"EACCES", "EPERM"}
    if not open_:
        assert got["mem"] in refused, got
        assert set(got["fd_open"].values()) <= refused, got["fd_open"]
        assert got["getfd"] in refused, got
        assert got["ptrace"] in refused, got
    else:  # the very same attacks, on a process that asked to stay debuggable
        assert got["mem"] == "ok" and got["mem_bytes"].encode("latin-1") == SECRET, got
        assert got["getfd"] == "ok" and got["getfd_link"].startswith("socket:"), got
        assert "ok" in got["fd_open"].values(), got["fd_open"]
        assert got["ptrace"] == "ok", got

    # The kernel (the daemon's code, same uid) holds every channel's memfds: always closed.
    attacker.send({"pid": kernel_pid, "getfd": 3})
    got = attacker.recv()
    assert got["mem"] in refused and got["getfd"] in refused and got["ptrace"] in refused, got
    assert set(got["fd_open"].values()) <= refused, got["fd_open"]


def _report_dumpable(link, what: str, path: str) -> None:
    before = _core.dumpable()
    if what == "kernel":
        k = capbus.Kernel(path)
    elif what == "kernel-debuggable":
        k = capbus.Kernel(path, debuggable=True)
    else:
        k = capbus.Kernel(path, debuggable=True)  # stays dumpable: the connect is the subject
        if what == "forked-connect":
            pid = os.fork()  # dumpable survives fork; connect() in the child sets it
            if pid == 0:
                try:
                    c = _core.dumpable()
                    capbus.connect(path).close()
                    link.send([c, _core.dumpable()])
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
            k.stop()
            return
        capbus.connect(path, debuggable=what == "connect-debuggable").close()
    link.send([before, _core.dumpable()])
    k.stop()


@pytest.mark.parametrize("what, after", [
    ("kernel", False), ("kernel-debuggable", True), ("connect", False),
    ("connect-debuggable", True), ("forked-connect", False)])
def test_capbus_processes_make_themselves_non_dumpable(sockdir, as_user, what, after):
    p = as_user(None, _report_dumpable, what, os.path.join(sockdir, "k.sock"))
    assert p.recv() == [True, after]


def test_channels_and_regions_keep_no_memfd_open(kernel, children):
    """The fds a connected process holds per channel and per region: eventfds and pipes it waits
    on, never the memfds it has mapped (channel, region)."""
    code = """
        import os, sys, threading, capbus
        def fds():
            out = {}
            for fd in os.listdir("/proc/self/fd"):
                try:
                    kind = os.readlink(f"/proc/self/fd/{fd}").split(":")[0]
                except OSError:
                    continue
                out[kind] = out.get(kind, 0) + 1
            return out
        p = capbus.connect(sys.argv[1])
        svc = p.register("sink")
        threading.Thread(target=svc.serve, args=(lambda req: 0,), daemon=True).start()
        ep = p.lookup("sink")
        ep.call(1, timeout=10)
        before = fds()
        n = 20
        done, go = threading.Barrier(n + 1), threading.Event()
        def lane():  # a thread holds its lane (and the service its channel) while it lives
            ep.call(1, timeout=10)
            done.wait(10)
            go.wait(10)
        threads = [threading.Thread(target=lane) for _ in range(n)]
        for t in threads:
            t.start()
        done.wait(10)
        lanes = fds()
        regions = [p.create_region(1 << 16) for _ in range(n)]
        for r in regions:
            r.buffer[0] = 1
        after = fds()
        for counts in (before, lanes, after):
            print(counts, flush=True)
        print(sum(lanes.values()) - sum(before.values()), sum(after.values()) - sum(lanes.values()),
              flush=True)
        go.set()
    """
    from conftest import readline

    c = children.start(code, kernel.socket_path)
    before, lanes, after, grown = (readline(c, 20) for _ in range(4))
    assert "memfd" not in lanes and "memfd" not in after, (lanes, after)
    by_channels, by_regions = map(int, grown.split())
    # 20 channels, both ends in this process: the client's duplicates of the service's doorbell
    # and sleep eventfds, its reply eventfd (twice: the core's and the asyncio wait's) and the
    # read end of its reply-sleep pipe; the server's reply eventfd and both ends of that pipe
    # (it writes one, holds the other so a write never raises SIGPIPE). No memfd: 8 a channel.
    assert by_channels <= 20 * 8, (before, lanes)
    assert by_regions == 0, (lanes, after)  # 20 mapped regions: not one fd
