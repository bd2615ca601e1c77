"""The kernel as a daemon (`python -m capbus kernel`): no fd or memory growth as processes come
and go (closing, exiting without closing, or being SIGKILLed), and a clean life cycle: SIGTERM
and SIGINT stop it with exit 0 and remove its socket; a second daemon refuses a live path; a
stale socket file is replaced.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import wait_for

import capbus

pytestmark = pytest.mark.timeout(90)

_SRC = os.path.dirname(os.path.dirname(os.path.abspath(capbus.__file__)))


def _env() -> dict[str, str]:
    # The tests read the daemon's /proc/<pid>/fd: without root, only a dumpable one's.
    env = dict(os.environ, PYTHONUNBUFFERED="1", CAPBUS_DEBUGGABLE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_SRC, env.get("PYTHONPATH")) if p)
    env.pop("CAPBUS_FD", None)
    env.pop("CAPBUS_SOCKET", None)
    return env


class Daemon:
    """`python -m capbus kernel --socket PATH`, its output pumped into queues."""

    def __init__(self, path: str, nofile: int | None = None) -> None:
        self.path = path
        argv = [sys.executable, "-m", "capbus", "kernel", "--socket", path]
        if nofile is not None:  # run it under a small fd limit (soft and hard)
            argv[1:3] = ["-c", (
                "import resource, runpy, sys; "
                f"resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile})); "
                "sys.argv = ['capbus'] + sys.argv[1:]; "
                "runpy.run_module('capbus', run_name='__main__', alter_sys=True)"
            )]
        self.proc = subprocess.Popen(
            argv,
            env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        self.out: queue.Queue[str | None] = queue.Queue()
        self.err: list[str] = []
        threading.Thread(target=self._pump_out, daemon=True).start()
        self._err_pump = threading.Thread(target=self._pump_err, daemon=True)
        self._err_pump.start()

    def wait_ready(self) -> None:
        line = self.line(10)
        assert line.startswith("capbus kernel serving"), (line, self.stderr())
        assert f"(pid {self.pid})" in line
        assert wait_for(lambda: os.path.exists(self.path), 5)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump_out(self) -> None:
        for line in self.proc.stdout:
            self.out.put(line.rstrip("\n"))
        self.out.put(None)

    def _pump_err(self) -> None:
        for line in self.proc.stderr:
            self.err.append(line)

    def stderr(self) -> str:
        """What it wrote to stderr so far; all of it once it has exited (the pump may lag)."""
        if self.proc.poll() is not None:
            self._err_pump.join(5)
        return "".join(self.err)

    def line(self, timeout: float = 10) -> str:
        try:
            line = self.out.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the daemon printed nothing in {timeout} s") from None
        assert line is not None, f"daemon exited {self.proc.poll()}: {self.stderr()}"
        return line

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def fd_kinds(self) -> dict[str, int]:
        kinds: collections.Counter[str] = collections.Counter()
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
            except FileNotFoundError:
                continue
            kinds[target if target.startswith("anon_inode:") else target.split(":[")[0]] += 1
        return dict(kinds)

    def shm_maps(self) -> int:
        """Mappings of capbus memfds (channels, control pages, doorbells) in the daemon."""
        with open(f"/proc/{self.pid}/maps") as f:
            return sum("memfd:capbus" in line for line in f)

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kb(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def daemons():
    made: list[Daemon] = []

    def start(path: str, wait: bool = True, nofile: int | None = None) -> Daemon:
        d = Daemon(path, nofile)
        made.append(d)
        if wait:
            d.wait_ready()
        return d

    yield start
    for d in made:
        d.cleanup()


def ps(path: str) -> list[dict]:
    """The process table through the CLI (whose own connection is one of the rows)."""
    out = subprocess.run(
        [sys.executable, "-m", "capbus", "ps", "--json", "--socket", path],
        env=_env(), capture_output=True, text=True, timeout=20,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def steady(fn, timeout: float = 5.0):
    """fn()'s value once two readings 0.2 s apart agree."""
    last = fn()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = fn()
        if now == last:
            return now
        last = now
    return last


def settle_down(fn, target, timeout: float = 5.0):
    """Wait until fn() <= target (the daemon releases things asynchronously); return fn()."""
    wait_for(lambda: fn() <= target, timeout, 0.05)
    return fn()


def settle(fn, target, timeout: float = 5.0):
    """Wait until fn() == target (the daemon releases things asynchronously); return fn()."""
    wait_for(lambda: fn() == target, timeout, 0.05)
    return fn()


# One parent forks `n` short-lived processes, `batch` at a time. In a batch every process
# connects, registers svc-i, then (once all have registered) looks up its partner svc-(i^1) and
# the parent's "anchor", subscribes to registrations and watches both endpoints; then (once all
# are done) half close() and exit, a quarter exit without closing, a quarter SIGKILL themselves.
CHURN = textwrap.dedent(r"""
    import os, signal, sys, threading
    import capbus

    path, n, batch, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
    assert batch % 2 == 0
    signal.alarm(120)
    anchor = capbus.connect(path, wait="block")
    anchor.register("anchor")
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    exit_r, exit_w = os.pipe()

    def report(line):
        os.write(report_w, (line + "\n").encode())

    def child(i):
        signal.alarm(30)
        try:
            p = capbus.connect(path, wait="block")
            svc = p.register(f"svc-{i}")
            if calls:  # serve it: a data-plane channel per caller, created by the kernel
                threading.Thread(target=svc.serve, args=(lambda req: (req.opcode + 1, req.data),),
                                 daemon=True).start()
            report(f"reg {i}")
            assert os.read(go_r, 1) == b"g"
            ep = p.lookup(f"svc-{i ^ 1}", timeout=5)
            if calls:
                reply = ep.call(7, (i, 0, 0, 0), timeout=10)
                assert (reply.opcode, reply.data[0]) == (8, i), reply
            anchor_ep = p.lookup("anchor", timeout=5)
            p.subscribe_registrations()
            ep.on_death(lambda e: None)
            anchor_ep.on_death(lambda e: None)
            report(f"done {i}")
        except BaseException as exc:
            report(f"err {i} {exc!r}")
            os._exit(3)
        assert os.read(exit_r, 1) == b"x"
        how = i % 4
        if how in (0, 1):
            p.close()
            os._exit(0)
        if how == 2:
            os._exit(0)
        os.kill(os.getpid(), signal.SIGKILL)

    buf = b""

    def lines(count, what):
        global buf
        got = []
        while len(got) < count:
            while b"\n" not in buf:
                chunk = os.read(report_r, 65536)
                if not chunk:
                    raise SystemExit("report pipe closed")
                buf += chunk
            line, buf = buf.split(b"\n", 1)
            line = line.decode()
            if line.startswith("err"):
                print("CHILD-ERROR", line, flush=True)
                raise SystemExit(2)
            assert line.startswith(what), line
            got.append(line)
        return got

    statuses = {}
    for start in range(0, n, batch):
        pids = []
        for i in range(start, min(start + batch, n)):
            pid = os.fork()
            if pid == 0:
                child(i)
            pids.append(pid)
        lines(len(pids), "reg")
        os.write(go_w, b"g" * len(pids))
        lines(len(pids), "done")
        os.write(exit_w, b"x" * len(pids))
        for pid in pids:
            code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            statuses[code] = statuses.get(code, 0) + 1
    anchor.close()
    print("OK", n, sorted(statuses.items()), flush=True)
""")


def churn(path: str, n: int, batch: int = 20, calls: bool = False) -> str:
    out = subprocess.run(
        [sys.executable, "-c", CHURN, path, str(n), str(batch), "1" if calls else "0"],
        env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, (out.stdout, out.stderr)
    return out.stdout.strip()


@pytest.mark.parametrize("calls", [False, True], ids=["control-plane", "with-calls"])
def test_processes_coming_and_going_leak_nothing(sockdir, daemons, calls):
    """200 processes; with-calls: each also serves its name and calls its partner once (so the
    kernel creates, and must free, a channel's memfds and mappings per process)."""
    path = os.path.join(sockdir, "k.sock")
    d = daemons(path)
    # Warm up: every path the churn takes, once, so lazy allocations are not counted.
    churn(path, 4, batch=4, calls=calls)
    assert len(ps(path)) == 1
    base_fds = steady(d.fds)
    base_maps = d.shm_maps()
    base_rss = d.rss_kb()

    result = churn(path, 200, batch=20, calls=calls)
    # half close(), a quarter exit without closing, a quarter SIGKILL themselves
    assert result == "OK 200 [(-9, 50), (0, 150)]", result

    deadline = time.monotonic() + 10
    rows = ps(path)
    while len(rows) != 1 and time.monotonic() < deadline:
        time.sleep(0.2)
        rows = ps(path)
    assert len(rows) == 1, f"{len(rows)} processes still in the table: {rows[:3]}"
    assert rows[0]["services"] == []
    services = subprocess.run(
        [sys.executable, "-m", "capbus", "services", "--json", "--socket", path],
        env=_env(), capture_output=True, text=True, timeout=20,
    )
    assert json.loads(services.stdout) == []

    fds = settle_down(d.fds, base_fds, 5)
    assert fds <= base_fds, f"daemon fds {base_fds} -> {fds}: {d.fd_kinds()}"
    assert settle_down(d.shm_maps, base_maps, 5) <= base_maps
    grown_mb = (d.rss_kb() - base_rss) / 1024
    assert grown_mb < 20, f"daemon RSS grew by {grown_mb:.1f} MB"
    assert d.stderr() == "", d.stderr()

    assert d.stop(signal.SIGTERM, 5) == 0
    assert d.line(5) == "capbus kernel stopped"
    assert not os.path.exists(path)


def test_sigint_stops_the_daemon_cleanly(sockdir, daemons):
    path = os.path.join(sockdir, "k.sock")
    d = daemons(path)
    proc = capbus.connect(path, wait="block")
    try:
        proc.register("client")
        assert d.stop(signal.SIGINT, 5) == 0
        assert d.line(5) == "capbus kernel stopped"
        assert "Traceback" not in d.stderr()
        assert not os.path.exists(path)
        # Its processes see it go.
        assert wait_for(lambda: proc.closed, 5)
        with pytest.raises(capbus.KernelUnavailable):
            proc.register("after")
    finally:
        proc.close()
    with pytest.raises(capbus.KernelUnavailable):
        capbus.connect(path)


def test_second_daemon_on_a_live_path_refuses(sockdir, daemons):
    path = os.path.join(sockdir, "k.sock")
    first = daemons(path)
    with capbus.connect(path, wait="block") as proc:
        proc.register("first-kernel")
        second = daemons(path, wait=False)
        assert second.proc.wait(10) != 0
        assert path in second.stderr(), second.stderr()
        assert "already" in second.stderr(), second.stderr()
        assert "Traceback" not in second.stderr()
        # The first is untouched: its socket file is still there and serving.
        assert os.path.exists(path)
        with capbus.connect(path, wait="block") as other:
            assert other.lookup("first-kernel").process_id == proc.id
    assert first.proc.poll() is None
    assert first.stop(signal.SIGTERM, 5) == 0


@pytest.mark.parametrize("stale", ["plain-file", "dead-socket", "killed-daemon"])
def test_stale_socket_file_is_replaced(sockdir, daemons, stale):
    path = os.path.join(sockdir, "k.sock")
    if stale == "plain-file":
        with open(path, "w") as f:
            f.write("not a socket\n")
    elif stale == "dead-socket":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.bind(path)
        s.close()  # the file stays; nobody listens
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with pytest.raises(ConnectionRefusedError):
            probe.connect(path)
        probe.close()
    else:
        old = daemons(path)
        old.proc.kill()
        old.proc.wait(5)
        assert os.path.exists(path)  # SIGKILL: no clean-up
    d = daemons(path)
    with capbus.connect(path, wait="block") as proc:
        proc.register("fresh")
        assert {r["id"] for r in ps(path)} >= {proc.id}
    assert d.stop(signal.SIGTERM, 5) == 0
    assert not os.path.exists(path)


def test_fd_exhaustion_does_not_spin(sockdir, daemons):
    path = os.path.join(sockdir, "k.sock")
    d = daemons(path, nofile=40)
    hogs: list[socket.socket] = []
    try:
        # Each connection costs the kernel two fds (socket, pidfd): 40 run out well before 30.
        for _ in range(30):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            s.connect(path)  # completes in the backlog even when the kernel cannot accept
            hogs.append(s)
        assert wait_for(lambda: "accept failed" in d.stderr(), 5), d.stderr()
        cpu0, lines0 = d.cpu_seconds(), d.stderr().count("accept failed")
        time.sleep(1.0)
        cpu = d.cpu_seconds() - cpu0
        lines = d.stderr().count("accept failed") - lines0
        assert d.proc.poll() is None
        assert lines < 50, f"{lines} 'accept failed' lines in 1 s"
        assert cpu < 0.3, f"the daemon burnt {cpu:.2f} s of CPU in 1 s while out of fds"
    finally:
        for s in hogs:
            s.close()
    # Once the hogs are gone it serves again.
    with capbus.connect(path, wait="block") as proc:
        proc.register("after-exhaustion")


CALLER = textwrap.dedent(r"""
    import sys, threading
    import capbus

    path, lanes = sys.argv[1], int(sys.argv[2])
    p = capbus.connect(path, wait="block")
    ep = p.lookup("lanes", timeout=5)
    barrier = threading.Barrier(lanes + 1)

    def call(i):
        assert ep.call(1, (i, 0, 0, 0), timeout=10).data[0] == i
        barrier.wait(20)  # keep this thread (and its lane) until all have called
        barrier.wait(20)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(lanes)]
    for t in threads:
        t.start()
    barrier.wait(20)
    print("OPEN", flush=True)
    sys.stdin.readline()
    barrier.wait(20)
    for t in threads:
        t.join(10)
    p.close()
    print("DONE", flush=True)
""")


def test_open_channels_cost_the_kernel_no_fds(sockdir, daemons):
    path = os.path.join(sockdir, "k.sock")
    d = daemons(path)
    lanes = 32
    with capbus.connect(path, wait="block") as server:
        svc = server.register("lanes")
        threading.Thread(target=svc.serve, args=(lambda req: (0, req.data),), daemon=True).start()
        base = steady(d.fds)
        caller = subprocess.Popen(
            [sys.executable, "-c", CALLER, path, str(lanes)], env=_env(), text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        try:
            assert caller.stdout.readline().strip() == "OPEN", caller.stderr.read()
            with_lanes, kinds = steady(d.fds), d.fd_kinds()
            caller.stdin.write("\n")
            caller.stdin.flush()
            assert caller.stdout.readline().strip() == "DONE"
            assert caller.wait(10) == 0
        finally:
            if caller.poll() is None:
                caller.kill()
            caller.wait(10)
            caller.stdout.close()
            caller.stderr.close()
            caller.stdin.close()
        assert settle(d.fds, base, 5) == base  # (it frees them when the lanes close)
        grown = with_lanes - base - 2  # the caller's own socket and pidfd
        assert grown <= 2, f"{lanes} open channels cost the kernel {grown} fds: {kinds}"


def _own_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("how", ["process-closed", "kernel-stopped"])
def test_a_service_dropped_without_close_leaves_no_fd(sockdir, how):
    """A Service whose process closed (or whose kernel stopped) without svc.close(), then
    dropped: its eventfd goes with it (each such service once left one eventfd behind, and a
    long-lived test process collected hundreds)."""
    path = os.path.join(sockdir, "k.sock")

    def cycle() -> None:
        with capbus.Kernel(path) as kernel:
            proc = capbus.connect(kernel.socket_path, wait="block")
            proc.register("dropped")  # never closed, never kept
            if how == "process-closed":
                proc.close()
        if how == "kernel-stopped":
            proc.close()

    cycle()
    gc.collect()
    before = _own_fds()
    for _ in range(20):
        cycle()
    gc.collect()
    assert _own_fds() - before < 5, f"{_own_fds() - before} fds left by 20 dropped services"
