"""Identity across users: a socket directory or kernel another user set up first is refused (by
the directory's owner and mode, never through a symlink, and by the kernel's SO_PEERCRED); a lock
or audit file someone else created is never used; a kernel opened to chosen users and groups
admits them by their credentials and refuses everyone else at Hello; per-uid quotas stop one user
at its bound and leave the others alone.

Other users are real: a forked child of this test takes a fresh uid (setgroups/setgid/setuid, no
account needed). It cannot exec Python (the interpreter lives under a 0700 /root here), so it runs
a function of this module in the forked interpreter, with every module it needs imported first.
Root only: without root these tests are skipped.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable

import pytest

import capbus
from capbus import _paths
from capbus._kernel import policy as _policy

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the test creates other "
                                "users' processes with setuid, and files owned by them")



def _open_fds() -> int:
    """This process's open fds, once garbage left by earlier tests is collected (its fds may
    otherwise close in the middle of a count)."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))

def fresh_ids(n: int) -> list[int]:
    """n distinct uids (also used as gids) no process or file here is likely to have."""
    return random.sample(range(62000, 64000), n)


class AsUser:
    """fn(report, wait) run in a forked child as uid (gid, groups): report(*words) sends one
    line to the test, wait() blocks until the test says go() (or stops it). The child exits when
    fn returns; an exception is reported as "error <type>: <text>"."""

    def __init__(self, uid: int, fn: Callable[..., None], *args: object, gid: int | None = None,
                 groups: tuple[int, ...] = (), env: dict[str, str | None] | None = None) -> None:
        out_r, out_w = os.pipe()
        ctl_r, ctl_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                os.close(out_r)
                os.close(ctl_w)
                for key, value in (env or {}).items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
                os.setgroups(list(groups))
                os.setgid(uid if gid is None else gid)
                os.setuid(uid)

                def report(*words: object) -> None:
                    os.write(out_w, (" ".join(str(w) for w in words) + "\n").encode())

                def wait() -> None:
                    os.read(ctl_r, 1)

                try:
                    fn(report, wait, *args)
                    code = 0
                except BaseException as exc:
                    report(f"error {type(exc).__name__}: {exc}".replace("\n", " | "))
                    traceback.print_exc()
            finally:
                os._exit(code)
        os.close(out_w)
        os.close(ctl_r)
        self.pid, self._out, self._ctl, self._buf = pid, out_r, ctl_w, b""
        self.status: int | None = None

    def line(self, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._out], [], [], left)[0]:
                raise AssertionError(f"child {self.pid} reported nothing in {timeout} s")
            chunk = os.read(self._out, 4096)
            if not chunk:
                raise AssertionError(f"child {self.pid} exited without reporting "
                                     f"(have {self._buf!r})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def go(self) -> None:
        with contextlib.suppress(BrokenPipeError):  # it is done already: nothing to wait for
            os.write(self._ctl, b"g")

    def stop(self, timeout: float = 20.0) -> int:
        if self.status is None:
            with contextlib.suppress(OSError):
                os.close(self._ctl)
            deadline = time.monotonic() + timeout
            while True:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    os.kill(self.pid, signal.SIGKILL)
                    pid, status = os.waitpid(self.pid, 0)
                    break
                time.sleep(0.02)
            self.status = os.waitstatus_to_exitcode(status)
            os.close(self._out)
        return self.status


@pytest.fixture
def users():
    """Start AsUser children; every one is stopped (killed if need be) and reaped at teardown."""
    started: list[AsUser] = []

    def start(*args, **kw) -> AsUser:
        child = AsUser(*args, **kw)
        started.append(child)
        return child

    yield start
    for child in started:
        child.stop()


@pytest.fixture
def base():
    """A root-owned directory others may pass through (0711) but not list or write."""
    d = tempfile.mkdtemp(prefix="cbu-")
    os.chmod(d, 0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


NO_ENV = {"XDG_RUNTIME_DIR": None, "CAPBUS_SOCKET": None, "CAPBUS_KERNEL_UID": None,
          "CAPBUS_FD": None}


# ---- what the children do -----------------------------------------------------------------------


def squatter(report, wait, target: str, kernel_dir: str, victim: int) -> None:
    """Take the victim's default directory first (a directory of ours, or a symlink to one),
    with our own kernel in it that would admit the victim."""
    os.mkdir(kernel_dir, 0o755)
    if target != kernel_dir:
        os.symlink(kernel_dir, target)
    k = capbus.Kernel(os.path.join(kernel_dir, "kernel.sock"),
                      capbus.Policy(access={"uids": [victim]}), audit=None)
    report("ready")
    wait()
    k.stop()


def victim(report, wait) -> None:
    for what, call in (("connect", lambda: capbus.connect()),
                       ("kernel", lambda: capbus.Kernel())):
        try:
            call()
            report(what, "accepted")
        except capbus.PermissionDenied as exc:
            report(what, "refused", exc)


def kernel_as_me(report, wait, path: str, admit: int) -> None:
    k = capbus.Kernel(path, capbus.Policy(access={"uids": [admit]}), audit=None)
    report("ready")
    wait()
    k.stop()


def client_checks_peer(report, wait, path: str, kernel_uid: int) -> None:
    try:
        capbus.connect(path)
        report("plain", "accepted")
    except capbus.PermissionDenied as exc:
        report("plain", "refused", exc)
    with capbus.connect(path, kernel_uid=kernel_uid) as p:
        report("named", p.id)
    os.environ["CAPBUS_KERNEL_UID"] = str(kernel_uid)
    with capbus.connect(path) as p:
        report("env", p.id)


def try_connect(report, wait, path: str) -> None:
    try:
        with capbus.connect(path) as p:
            report("welcome", p.id)
    except capbus.IpcError as exc:
        report("refused", type(exc).__name__, exc)
    wait()


def serve_and_call(report, wait, path: str) -> None:
    server = capbus.connect(path)
    svc = server.register(f"svc.{os.getuid()}")
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                req = svc.recv(timeout=0.05)
            except capbus.Timeout:
                continue
            req.reply(req.opcode + 1, (os.getuid(), req.data[0], 0, 0))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    client = capbus.connect(path)
    r = client.lookup(f"svc.{os.getuid()}").call(1, (41,), timeout=10)
    report("called", r.opcode, r.data[0], r.data[1])
    stop.set()
    t.join(5)
    client.close()
    server.close()


def quota_user(report, wait, path: str) -> None:
    """Walk into each per-uid quota (regions' bytes, capabilities, channels) from several
    connections of one uid, report where it stopped, and show that letting go gives it back."""
    p1, p2 = capbus.connect(path), capbus.connect(path)
    # region bytes: 64 KiB in all (regions of 16 KiB, from two connections)
    regions, err = [], ""
    try:
        while True:
            regions.append((p1, p2)[len(regions) % 2].create_region(16 << 10))
    except capbus.OutOfMemory as exc:
        err = str(exc)
    report("regions", len(regions), "region_bytes_per_uid" in err)
    wait()  # the test checks another uid meanwhile
    regions.pop().close()
    regions.append(p1.create_region(16 << 10))  # the closed one's bytes were given back
    for r in regions:
        r.close()
    # capabilities: 10 in all, neither connection's own table anywhere near full
    small, err = [], ""
    try:
        while True:
            small.append((p1, p2)[len(small) % 2].create_region(1))
    except capbus.OutOfMemory as exc:
        err = str(exc)
    report("caps", len(small), "caps_per_uid" in err)
    p2.close()  # its capabilities go with it
    more = []
    with contextlib.suppress(capbus.OutOfMemory):
        while True:
            more.append(p1.create_region(1))
    report("after", len(more))
    for r in small[0::2] + more:
        r.close()
    # channels: 3 in all, one per connection's first call
    conns = [p1] + [capbus.connect(path) for _ in range(3)]
    calls, err = 0, ""
    try:
        for c in conns:
            c.lookup("quota.echo").call(1, (1,), timeout=10)
            calls += 1
    except capbus.OutOfMemory as exc:
        err = str(exc)
    report("channels", calls, "channels_per_uid" in err)
    wait()
    for c in conns:
        c.close()


def flood(report, wait, path: str, n: int) -> None:
    """Hold n raw connections to a kernel that does not admit us, never saying Hello."""
    import socket

    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(path)
        socks.append(s)
    report("holding", len(socks))
    wait()


def regions_ok(report, wait, path: str) -> None:
    with capbus.connect(path) as p:
        rs = [p.create_region(16 << 10) for _ in range(4)]
        report("regions", len(rs))
        for r in rs:
            r.close()


# ---- the squatter -------------------------------------------------------------------------------


@needs_root
@pytest.mark.parametrize("how", ["dir", "symlink"])
def test_a_squatted_default_directory_is_refused(users, how):
    victim_uid, squatter_uid = fresh_ids(2)
    target = f"/tmp/capbus-{victim_uid}"
    kernel_dir = target if how == "dir" else f"/tmp/capbus-squat-{squatter_uid}"
    for p in (target, kernel_dir):
        assert not os.path.lexists(p)
    try:
        sq = users(squatter_uid, squatter, target, kernel_dir, victim_uid, env=NO_ENV)
        assert sq.line() == "ready"
        # The trap is live (it admits the victim): only the victim's checks keep it out.
        with capbus.connect(os.path.join(kernel_dir, "kernel.sock"), kernel_uid=squatter_uid) as p:
            assert p.id > 0
        v = users(victim_uid, victim, env=NO_ENV)
        connect, kernel = v.line(), v.line()
        why = "a symlink" if how == "symlink" else f"belongs to uid {squatter_uid}"
        assert connect.startswith("connect refused") and why in connect and target in connect, \
            connect
        assert kernel.startswith("kernel refused") and why in kernel, kernel
        assert v.stop() == 0
        assert sq.stop() == 0
    finally:
        for p in (target, kernel_dir):
            if os.path.islink(p):
                os.unlink(p)
            else:
                shutil.rmtree(p, ignore_errors=True)


@needs_root
def test_a_kernel_of_another_uid_is_refused_by_its_credentials(users, base):
    """Its socket reached through a directory the client trusts (root's, as socket activation
    or an administrator's link would place it): only SO_PEERCRED tells."""
    me, other = fresh_ids(2)
    own = os.path.join(base, "other")
    os.mkdir(own, 0o755)
    os.chown(own, other, other)
    k = users(other, kernel_as_me, os.path.join(own, "k.sock"), me)
    assert k.line() == "ready"
    trusted = os.path.join(base, "trusted")
    os.mkdir(trusted, 0o755)
    os.link(os.path.join(own, "k.sock"), os.path.join(trusted, "k.sock"))
    c = users(me, client_checks_peer, os.path.join(trusted, "k.sock"), other, env=NO_ENV)
    plain, named, env = c.line(), c.line(), c.line()
    assert plain.startswith("plain refused") and f"runs as uid {other}" in plain, plain
    assert "kernel_uid" in plain  # says how to trust it on purpose
    assert named.startswith("named ") and env.startswith("env "), (named, env)
    assert c.stop() == 0 and k.stop() == 0


@needs_root
def test_a_socket_directory_others_may_write_or_own_is_refused(sockdir):
    _, other = fresh_ids(2)
    loose = os.path.join(sockdir, "loose")
    os.mkdir(loose)
    os.chmod(loose, 0o1777)  # /tmp-like: anyone may put a socket or a lock file here
    theirs = os.path.join(sockdir, "theirs")
    os.mkdir(theirs, 0o700)
    os.chown(theirs, other, other)
    link = os.path.join(sockdir, "link")
    os.symlink(sockdir, link)
    fds = _open_fds()
    for directory, why in ((loose, "others may write"), (theirs, f"belongs to uid {other}"),
                           (link, "is a symlink")):
        with pytest.raises(capbus.PermissionDenied, match=why) as info:
            capbus.Kernel(os.path.join(directory, "k.sock"))
        assert directory in str(info.value)
        with pytest.raises(capbus.PermissionDenied, match=why):
            capbus.connect(os.path.join(directory, "k.sock"))
    assert os.listdir(loose) == [] and os.listdir(theirs) == []
    assert _open_fds() <= fds  # no directory or lock fd left behind


def test_the_directory_checked_is_the_one_used(sockdir):
    """Renamed away after the check and a symlink put in its place (what a squatter with a
    writable parent could do): the socket is still bound, and connected to, in the directory that
    was checked, through its fd, never by name."""
    import socket

    checked, elsewhere = os.path.join(sockdir, "d"), os.path.join(sockdir, "elsewhere")
    os.mkdir(checked, 0o700)
    os.mkdir(elsewhere, 0o700)
    fd = _paths.open_dir(checked, frozenset({os.getuid(), 0}))
    try:
        os.rename(checked, checked + ".moved")
        os.symlink(elsewhere, checked)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as srv:
            srv.bind(_paths.via_fd(fd, "k.sock"))
            srv.listen(1)
            assert os.listdir(checked + ".moved") == ["k.sock"] and os.listdir(elsewhere) == []
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as c:
                c.connect(_paths.via_fd(fd, "k.sock"))
                assert _paths.peer_uid(c) == os.getuid()
    finally:
        os.close(fd)


# ---- lock and audit files -----------------------------------------------------------------------


@needs_root
@pytest.mark.parametrize("name", ["audit.db", "k.sock.lock", "audit.db-wal"])
@pytest.mark.parametrize("how", ["theirs", "symlink", "writable"])
def test_lock_and_audit_files_someone_else_made_are_never_used(sockdir, name, how):
    _, other = fresh_ids(2)
    planted = os.path.join(sockdir, name)
    bait = os.path.join(sockdir, "bait")
    with open(bait, "wb") as f:
        f.write(b"someone else's")
    os.chown(bait, other, other)
    if how == "symlink":
        os.symlink(bait, planted)
        os.lchown(planted, other, other)
    else:
        with open(planted, "wb"):
            pass
        if how == "theirs":
            os.chown(planted, other, other)
        else:
            os.chmod(planted, 0o666)  # ours, but anyone may have it open for writing
    fds = _open_fds()
    why = {"theirs": f"belongs to uid {other}", "symlink": "is a symlink",
           "writable": "others may write"}[how]
    with pytest.raises(capbus.PermissionDenied, match=why) as info:
        capbus.Kernel(os.path.join(sockdir, "k.sock"))
    assert planted in str(info.value)
    assert not os.path.exists(os.path.join(sockdir, "k.sock"))  # never served
    with open(bait, "rb") as f:
        assert f.read() == b"someone else's"
    assert os.stat(bait).st_uid == other
    assert _open_fds() <= fds
    os.unlink(planted)  # once it is gone, the kernel starts
    with capbus.Kernel(os.path.join(sockdir, "k.sock")) as k, capbus.connect(k.socket_path) as p:
        assert p.id > 0
    for made in ("audit.db", "k.sock.lock"):
        st = os.lstat(os.path.join(sockdir, made))
        assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600


# ---- many users on one daemon -------------------------------------------------------------------


@needs_root
def test_a_root_daemon_serves_the_users_and_groups_it_names(users, base):
    a, b, c, d, group = fresh_ids(5)
    path = os.path.join(base, "run", "k.sock")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "capbus", "kernel", "--socket", path, "--allow-uid", str(a),
         "--allow-group", str(group)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        line = daemon.stdout.readline()
        assert line.startswith("capbus kernel serving"), (line, daemon.stderr.read())
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o711
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666  # the gate is SO_PEERCRED
        assert stat.S_IMODE(os.stat(path + ".lock").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.join(base, "run", "audit.db")).st_mode) == 0o600
        ua = users(a, serve_and_call, path)
        assert ua.line() == f"called 2 {a} 41"
        ub = users(b, try_connect, path)
        refused = ub.line()
        assert refused.startswith("refused PermissionDenied") and f"uid {b} is not" in refused
        assert "--allow-uid" in refused
        uc = users(c, try_connect, path, groups=(group,))  # a supplementary member
        ud = users(d, try_connect, path, gid=group)  # its primary group
        assert uc.line().startswith("welcome ") and ud.line().startswith("welcome ")
        for u in (ua, ub, uc, ud):
            u.go()
            assert u.stop() == 0
        # the daemon's own user still lists its tables; b left no trace in them
        with capbus.connect(path) as p:
            from capbus._cli.query import rows as _query
            rows = _query(path, "processes")
            assert {r["uid"] for r in rows} == {0} and p.id > 0
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(10)
        daemon.stdout.close()
        daemon.stderr.close()


@needs_root
def test_per_uid_quotas_stop_one_user_and_leave_the_others(users, base):
    a, b, c = fresh_ids(3)
    k = capbus.Kernel(os.path.join(base, "run", "k.sock"), capbus.Policy(
        access={"uids": [a, b]},
        limits={"caps_per_uid": 10, "channels_per_uid": 3, "region_bytes_per_uid": 64 << 10}))
    server = capbus.connect(k.socket_path)
    svc = server.register("quota.echo")
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(capbus.Timeout):
                req = svc.recv(timeout=0.05)
                req.reply(req.opcode + 1, req.data)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        ua = users(a, quota_user, k.socket_path)
        assert ua.line() == "regions 4 True"
        assert k.uid_usage(a)["region_bytes"] == 64 << 10
        ub = users(b, regions_ok, k.socket_path)  # allowed too, and untouched by a's quota
        assert ub.line() == "regions 4"
        assert ub.stop() == 0
        uc = users(c, try_connect, k.socket_path)  # not allowed: refused, counted nowhere
        line = uc.line()
        assert line.startswith("refused PermissionDenied"), line
        assert k.uid_usage(c) == {"connections": 0, "caps": 0, "channels": 0, "region_bytes": 0,
        "subscriptions": 0}
        uc.go()
        assert uc.stop() == 0
        ua.go()
        assert ua.line() == "caps 10 True"
        assert ua.line() == "after 5"  # p2's five capabilities were given back with it
        assert ua.line() == "channels 3 True"
        assert k.uid_usage(a)["channels"] == 3
        ua.go()
        assert ua.stop() == 0
        zero = {"connections": 0, "caps": 0, "channels": 0, "region_bytes": 0,
        "subscriptions": 0}
        assert wait_until(lambda: k.uid_usage(a) == zero and k.uid_usage(b) == zero), \
            (k.uid_usage(a), k.uid_usage(b))
        assert k._st.usage.keys() == {0}  # nothing kept for uids that hold nothing
    finally:
        stop.set()
        t.join(5)
        server.close()
        k.stop()


@needs_root
def test_a_refused_user_flooding_connections_costs_the_kernel_little(users, base):
    admitted, refused = fresh_ids(2)
    k = capbus.Kernel(os.path.join(base, "run", "k.sock"),
                      capbus.Policy(access={"uids": [admitted]}), audit=None)
    try:
        fds = _open_fds()
        f = users(refused, flood, k.socket_path, 300)
        assert f.line() == "holding 300"
        time.sleep(0.3)  # the kernel has accepted what it will
        held = len(os.listdir("/proc/self/fd")) - fds - 2  # 2: the pipes to the flooder
        print(f"kernel fds held for 300 refused connections: {held}")
        assert held <= 64 + 2  # at most the refused connections kept for their Hello
        assert k.uid_usage(refused) == {"connections": 0, "caps": 0, "channels": 0,
                                        "region_bytes": 0,
        "subscriptions": 0}
        ok = users(admitted, try_connect, k.socket_path)  # meanwhile, an allowed user gets in
        assert ok.line().startswith("welcome "), "admitted user refused during the flood"
        ok.go()
        assert ok.stop() == 0
        # past their grace the kept ones are let go, though the flooder still holds its ends
        assert wait_until(lambda: len(os.listdir("/proc/self/fd")) <= fds + 2 + 2, 10)
        f.go()
        assert f.stop() == 0
    finally:
        k.stop()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# ---- configuration ------------------------------------------------------------------------------


def test_access_and_quotas_from_toml(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[access]\nuids = [1001, 1002]\ngroups = [0, "root"]\n'
                    '[limits]\ncaps_per_uid = 7\nchannels_per_uid = 5\n'
                    'region_bytes_per_uid = 4096\n')
    pol = capbus.Policy.from_toml(str(path))
    assert pol.access.uids == {1001, 1002} and pol.access.groups == {0}
    assert (pol.limits.caps_per_uid, pol.limits.channels_per_uid,
            pol.limits.region_bytes_per_uid) == (7, 5, 4096)
    assert not capbus.Policy().access  # nobody else by default
    for bad, why in (('[access]\nuids = "1001"\n', "lists"), ('[access]\nuids = [-1]\n', "not a uid"),
                     ('[access]\ngroups = ["no-such-group-x"]\n', "no group named"),
                     ('[access]\nusers = [1]\n', "unknown keys")):
        path.write_text(bad)
        with pytest.raises(ValueError, match=why):
            capbus.Policy.from_toml(str(path))
    with pytest.raises(ValueError, match="caps_per_uid"):
        capbus.Policy(limits={"caps_per_uid": 0})
    assert _policy.Access.coerce({"uids": [5]}).uids == {5}
    with pytest.raises(ValueError, match="not a uid"):
        _policy.Access(uids={-5})
    r = subprocess.run([sys.executable, "-m", "capbus", "kernel", "--socket",
                        str(tmp_path / "k.sock"), "--allow-uid", "-5"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "not a uid" in r.stderr, r.stderr
    assert not (tmp_path / "k.sock").exists()


def test_kernel_uid_must_be_a_uid(kernel, monkeypatch):
    with pytest.raises(ValueError, match="kernel_uid"):
        capbus.connect(kernel.socket_path, kernel_uid=-1)
    monkeypatch.setenv("CAPBUS_KERNEL_UID", "root")
    with pytest.raises(ValueError, match="CAPBUS_KERNEL_UID"):
        capbus.connect(kernel.socket_path)


def test_a_shared_kernel_needs_a_path_of_its_own(sockdir, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", sockdir)
    monkeypatch.delenv("CAPBUS_SOCKET", raising=False)
    with pytest.raises(ValueError, match="path of its own"):
        capbus.Kernel(policy=capbus.Policy(access={"uids": [12345]}))
    assert _paths.is_default_dir(os.path.join(sockdir, "capbus"))
