"""Sandboxed launch: real children, confined by the launcher before their first instruction, try
the worst they can and are refused, while what they were given keeps working.

Each child is a script this file writes to a tmp dir; it tries things and writes what happened
(JSON) into its `write` dir, which the test reads after the child exits.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading

import pytest
from conftest import wait_for

import capbus
from capbus._kernel import manifest

AVAILABLE = capbus.Sandbox.available()
pytestmark = pytest.mark.skipif(
    not (AVAILABLE["scoping"] and AVAILABLE["seccomp"]),
    reason=f"this Linux cannot enforce a full sandbox: {AVAILABLE}",
)

# The child's prelude: attempt(name, fn) records ["ok", repr] or ["err", errno] or ["exc", text].
PRELUDE = """
import errno, json, os, sys
OUT = sys.argv[1]
results = {}
def attempt(name, fn):
    try:
        results[name] = ["ok", repr(fn())[:200]]
    except OSError as e:
        if type(e).__module__.startswith("capbus"):  # PermissionDenied is a PermissionError too
            results[name] = ["exc", type(e).__name__ + ": " + str(e)[:300]]
        else:
            results[name] = ["err", e.errno]
    except Exception as e:
        results[name] = ["exc", type(e).__name__ + ": " + str(e)[:300]]
def done():
    with open(os.path.join(OUT, "result.json"), "w") as f:
        json.dump(results, f)
"""

# x86-64 and AArch64 numbers of the syscalls the filter refuses that Python has no wrapper for.
SYSCALLS = {
    "x86_64": {"pidfd_getfd": 438, "process_vm_readv": 310, "bpf": 321, "keyctl": 250,
               "userfaultfd": 323, "io_uring_setup": 425, "unshare": 272, "ptrace": 101,
               "prlimit64": 302, "mount": 165, "fsopen": 430, "getpid": 39, "clone": 56,
               "clone3": 435},
    "aarch64": {"pidfd_getfd": 438, "process_vm_readv": 270, "bpf": 280, "keyctl": 219,
                "userfaultfd": 282, "io_uring_setup": 425, "unshare": 97, "ptrace": 117,
                "prlimit64": 261, "mount": 40, "fsopen": 430, "getpid": 172, "clone": 220,
                "clone3": 435},
}


@pytest.fixture
def box():
    """Directories of one test: scripts (the child may read them), data (granted with read=),
    out (granted with write=), secret (granted nothing). All removed at teardown."""
    root = tempfile.mkdtemp(prefix="cb-sbx-")
    dirs = {k: os.path.join(root, k) for k in ("scripts", "data", "out", "secret")}
    for d in dirs.values():
        os.mkdir(d)
    for d in ("data", "secret"):
        with open(os.path.join(dirs[d], "file.txt"), "w") as f:
            f.write(f"{d} contents")
    dirs["root"] = root
    yield dirs
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def spawned():
    """Children launched by a test: every one killed and reaped at teardown."""
    kids: list[capbus.Child] = []
    yield kids
    for c in kids:
        c.kill()
        try:
            c.wait(10)
        except capbus.Timeout:
            pass


def run(kernel, box, spawned, body: str, sandbox: capbus.Sandbox | None = None,
        *, python: str = sys.executable, timeout: float = 60, **spawn) -> dict:
    """Run `body` (after PRELUDE, then done()) in a sandboxed child; its results."""
    script = os.path.join(box["scripts"], f"child{len(spawned)}.py")
    with open(script, "w") as f:
        f.write(PRELUDE + textwrap.dedent(body) + "\ndone()\n")
    if sandbox is None:
        sandbox = capbus.Sandbox(read=[box["data"]], write=[box["out"]])
    child = kernel.spawn([python, script, box["out"]], sandbox=sandbox, **spawn)
    spawned.append(child)
    code = child.wait(timeout)
    out = os.path.join(box["out"], "result.json")
    assert code == 0 and os.path.exists(out), f"child exited {code} without its report"
    with open(out) as f:
        results = json.load(f)
    os.unlink(out)
    return results


def refused(result, errnos=(13, 1)) -> bool:
    return result[0] == "err" and result[1] in errnos


def test_files_outside_read_and_write_are_refused(kernel, box, spawned):
    r = run(kernel, box, spawned, f"""
        attempt("read_data", lambda: open({box['data']!r} + "/file.txt").read())
        attempt("list_data", lambda: sorted(os.listdir({box['data']!r})))
        attempt("write_out", lambda: open(OUT + "/new.txt", "w").write("x"))
        attempt("mkdir_out", lambda: os.mkdir(OUT + "/sub"))
        attempt("read_out", lambda: open(OUT + "/new.txt").read())
        attempt("read_secret", lambda: open({box['secret']!r} + "/file.txt").read())
        attempt("list_secret", lambda: os.listdir({box['secret']!r}))
        attempt("write_data", lambda: open({box['data']!r} + "/file.txt", "a").write("x"))
        attempt("create_in_data", lambda: open({box['data']!r} + "/new.txt", "w"))
        attempt("write_tmp", lambda: open("/tmp/cb-sbx-escape.txt", "w"))
        attempt("read_passwd", lambda: open("/etc/passwd").read())
        attempt("read_home", lambda: os.listdir(os.path.expanduser("~")))
        attempt("rename_out_to_data", lambda: os.rename(OUT + "/new.txt", {box['data']!r} + "/x"))
        attempt("symlink_to_secret", lambda: (os.symlink({box['secret']!r} + "/file.txt",
                                                         OUT + "/link"),
                                              open(OUT + "/link").read()))
        attempt("hardlink_data", lambda: os.link({box['data']!r} + "/file.txt", OUT + "/hl"))
        import subprocess
        attempt("exec_true", lambda: subprocess.run(["/bin/true"]).returncode)
        attempt("devnull", lambda: open(os.devnull, "w").write("x"))
    """)
    assert r["read_data"] == ["ok", repr("data contents")]
    assert r["list_data"] == ["ok", repr(["file.txt"])]
    assert r["write_out"][0] == "ok" and r["mkdir_out"][0] == "ok" and r["read_out"][0] == "ok"
    assert r["devnull"][0] == "ok"
    for name in ("read_secret", "list_secret", "write_data", "create_in_data", "write_tmp",
                 "read_passwd", "read_home", "exec_true", "symlink_to_secret"):
        assert refused(r[name]), (name, r[name])
    assert r["rename_out_to_data"][0] == "err", r["rename_out_to_data"]  # EXDEV or EACCES
    # a hard link would make a read-only file writable through the write path: refused
    assert r["hardlink_data"][0] == "err" and not os.path.exists(os.path.join(box["out"], "hl"))
    assert not os.path.exists("/tmp/cb-sbx-escape.txt")
    with open(os.path.join(box["data"], "file.txt")) as f:
        assert f.read() == "data contents"


@pytest.fixture
def listener():
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(10)
    yield srv
    srv.close()


@pytest.mark.parametrize("network", [False, True])
def test_tcp_needs_network_true(kernel, box, spawned, listener, network):
    port = listener.getsockname()[1]
    r = run(kernel, box, spawned, f"""
        import socket
        attempt("connect", lambda: socket.create_connection(("127.0.0.1", {port}), timeout=5).close())
        attempt("bind", lambda: socket.create_server(("127.0.0.1", 0)).close())
        attempt("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close())
    """, capbus.Sandbox(read=[box["data"]], write=[box["out"]], network=network))
    if network:
        assert r["connect"][0] == "ok" and r["bind"][0] == "ok" and r["udp"][0] == "ok", r
        listener.accept()[0].close()  # the connection really arrived
    else:
        assert refused(r["connect"]) and refused(r["bind"]) and refused(r["udp"]), r
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()


def test_signals_stay_inside_the_domain(kernel, box, spawned):
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)  # a group of its own
    try:
        r = run(kernel, box, spawned, f"""
            import signal, time
            attempt("kill_outsider", lambda: os.kill({sleeper.pid}, signal.SIGTERM))
            attempt("kill_kernel", lambda: os.kill({os.getpid()}, 0))  # a probe: harmless
            attempt("kill_group", lambda: os.killpg({sleeper.pid}, signal.SIGTERM))
            pid = os.fork()
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            attempt("kill_own_child", lambda: os.kill(pid, signal.SIGKILL))
            attempt("reap_own_child", lambda: os.waitpid(pid, 0)[1])
        """)
        assert refused(r["kill_outsider"], (1,)) and refused(r["kill_kernel"], (1,)), r
        assert refused(r["kill_group"], (1,)), r
        assert r["kill_own_child"][0] == "ok" and r["reap_own_child"] == ["ok", repr(9)], r
        assert sleeper.poll() is None  # still running
    finally:
        sleeper.kill()
        sleeper.wait(10)


def test_no_ptrace_no_memory_of_capbus_processes(kernel, box, spawned):
    me = os.getpid()  # this process embeds the kernel: the one worth attacking
    r = run(kernel, box, spawned, f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        def ptrace_attach():
            if libc.ptrace(16, {me}, None, None) != 0:   # PTRACE_ATTACH
                raise OSError(ctypes.get_errno(), "ptrace")
        attempt("ptrace", ptrace_attach)
        attempt("mem", lambda: open("/proc/{me}/mem", "rb"))
        attempt("environ", lambda: open("/proc/{me}/environ", "rb").read())
        attempt("fd_dir", lambda: os.listdir("/proc/{me}/fd"))
        attempt("maps", lambda: open("/proc/{me}/maps").read())
    """)
    for name in ("ptrace", "mem", "environ", "fd_dir", "maps"):
        assert refused(r[name]), (name, r[name])


def test_no_new_connection_to_the_kernel_from_child_or_grandchild(kernel, box, spawned, request):
    path = kernel.socket_path
    before = len(kernel.processes())
    dgram_path = os.path.join(box["root"], "log.sock")  # like /dev/log: anyone may write
    log = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    request.addfinalizer(log.close)
    log.bind(dgram_path)
    os.chmod(dgram_path, 0o777)
    log.setblocking(False)
    r = run(kernel, box, spawned, f"""
        import socket, capbus
        def raw():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect({path!r})
        attempt("socket_unix", raw)
        attempt("capbus_connect", lambda: capbus.connect({path!r}))
        attempt("reconnect", lambda: capbus.connect(reconnect=True))
        def pair_then_connect(kind):
            a, b = socket.socketpair(socket.AF_UNIX, kind)
            a.connect({path!r})
        attempt("pair_seqpacket", lambda: pair_then_connect(socket.SOCK_SEQPACKET))
        attempt("pair_dgram", lambda: pair_then_connect(socket.SOCK_DGRAM))
        attempt("abstract", lambda: socket.socket(socket.AF_UNIX).bind("\\0cb-sbx"))
        def dgram_to(path):  # a datagram end may send to any named socket: none is made
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            a.sendto(b"spam", path)
        attempt("dgram_sendto", lambda: dgram_to({dgram_path!r}))
        attempt("pair_stream", lambda: socket.socketpair())
        rd, wr = os.pipe()
        pid = os.fork()
        if pid == 0:          # a grandchild: the same sandbox, the same refusal
            try:
                raw()
                os.write(wr, b"connected")
            except OSError as e:
                os.write(wr, str(e.errno).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        results["grandchild"] = os.read(rd, 100).decode()
    """)
    assert refused(r["socket_unix"], (1,)), r
    assert r["capbus_connect"][0] == "exc" and "PermissionDenied" in r["capbus_connect"][1], r
    assert "sandbox" in r["capbus_connect"][1]
    assert r["reconnect"][0] == "exc" and "PermissionDenied" in r["reconnect"][1], r
    for name in ("pair_seqpacket", "pair_dgram", "abstract"):
        assert r[name][0] == "err", (name, r[name])  # EISCONN / EPERM: never ok
    assert r["dgram_sendto"] == ["err", 1] and r["pair_stream"][0] == "ok", r
    with pytest.raises(BlockingIOError):
        log.recv(100)
    assert r["grandchild"] == "1", r
    assert len(kernel.processes()) == before


def test_refused_syscalls(kernel, box, spawned):
    nrs = SYSCALLS.get(platform.machine())
    if nrs is None:
        pytest.skip(f"no syscall table here for {platform.machine()}")
    prio, policy = os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0)
    r = run(kernel, box, spawned, f"""
        import ctypes, resource
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        NR = {nrs!r}
        NR["getpid_x32"] = 0x40000000 | NR["getpid"]
        def call(name, *args):
            def go():
                ret = libc.syscall(ctypes.c_long(NR[name]), *[ctypes.c_long(a) for a in args])
                if ret < 0:
                    raise OSError(ctypes.get_errno(), name)
                return ret
            return go
        attempt("pidfd_getfd", call("pidfd_getfd", 0, 0, 0))
        attempt("process_vm_readv", call("process_vm_readv", {os.getpid()}, 0, 0, 0, 0, 0))
        attempt("bpf", call("bpf", 0, 0, 0))
        attempt("keyctl", call("keyctl", 0, 0))
        attempt("userfaultfd", call("userfaultfd", 0))
        attempt("io_uring_setup", call("io_uring_setup", 8, 0))
        attempt("unshare", call("unshare", 0x10000000))          # CLONE_NEWUSER
        attempt("ptrace_traceme", call("ptrace", 0, 0, 0, 0))
        attempt("mount", call("mount", 0, 0, 0, 0, 0))
        attempt("fsopen", call("fsopen", 0, 0))
        attempt("prlimit_other", call("prlimit64", {os.getpid()}, 7, 0, 0))
        attempt("prlimit_self", lambda: resource.getrlimit(resource.RLIMIT_NOFILE))
        attempt("getpid", call("getpid"))
        def clone_userns():  # CLONE_NEWUSER | SIGCHLD: a namespace would hand out capabilities
            if call("clone", 0x10000000 | 17, 0, 0, 0, 0)() == 0:
                os._exit(0)  # only if the filter failed: the test sees "ok" from the parent
        attempt("clone_userns", clone_userns)
        attempt("clone3", call("clone3", 0, 0))
        import threading
        t = threading.Thread(target=lambda: None)
        attempt("thread", lambda: (t.start(), t.join()))  # libc falls back from clone3 to clone
        kernel_pid = {os.getpid()}
        # Each asks for what the target has already (harmless if let through); the filter
        # refuses by pid, whatever the value.
        cpus, nice = os.sched_getaffinity(0), os.getpriority(os.PRIO_PROCESS, 0)
        attempt("affinity_other", lambda: os.sched_setaffinity(kernel_pid, cpus))
        attempt("affinity_self", lambda: os.sched_setaffinity(0, cpus))
        attempt("sched_other", lambda: os.sched_setscheduler(kernel_pid, os.SCHED_OTHER,
                                                             os.sched_param(0)))
        attempt("renice_other", lambda: os.setpriority(os.PRIO_PROCESS, kernel_pid, nice))
        attempt("renice_group", lambda: os.setpriority(os.PRIO_PGRP, 0, nice))
        attempt("nice_self", lambda: os.nice(1))
        import fcntl, termios
        null = os.open(os.devnull, os.O_RDWR)  # no tty: ENOTTY if let through, never typed
        attempt("tiocsti", lambda: fcntl.ioctl(null, termios.TIOCSTI, b"x"))
        if {platform.machine()!r} == "x86_64":   # an x32 syscall number: refused as a whole
            attempt("x32_getpid", call("getpid_x32"))
    """)
    for name in ("pidfd_getfd", "process_vm_readv", "bpf", "keyctl", "userfaultfd",
                 "io_uring_setup", "unshare", "ptrace_traceme", "mount", "fsopen",
                 "prlimit_other", "clone_userns", "affinity_other", "sched_other", "renice_other",
                 "renice_group", "tiocsti"):
        assert r[name] == ["err", 1], (name, r[name])  # EPERM, from the filter
    assert r["clone3"] == ["err", 38], r  # ENOSYS
    for name in ("prlimit_self", "getpid", "thread", "affinity_self", "nice_self"):
        assert r[name][0] == "ok", (name, r[name])
    assert os.getpriority(os.PRIO_PROCESS, 0) == prio and os.sched_getscheduler(0) == policy
    if platform.machine() == "x86_64":
        assert r["x32_getpid"] == ["err", 1], r


def test_a_foreign_arch_syscall_kills(kernel, box, spawned):
    if platform.machine() != "x86_64":
        pytest.skip("the i386 entry (int 0x80) is an x86-64 test")
    script = os.path.join(box["scripts"], "i386.py")
    with open(script, "w") as f:  # getpid through the i386 entry: mov eax, 20; int 0x80; ret
        f.write(textwrap.dedent("""
            import ctypes, mmap
            buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
            buf.write(bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3]))
            addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
            ctypes.CFUNCTYPE(ctypes.c_int)(addr)()
            print("survived")
        """))
    child = kernel.spawn([sys.executable, script], sandbox=capbus.Sandbox())
    spawned.append(child)
    code = child.wait(30)
    if code == -signal.SIGSEGV:
        pytest.skip("this kernel has no i386 emulation (int 0x80 faults)")
    assert code == -signal.SIGSYS, code  # SECCOMP_RET_KILL_PROCESS


ECHO_SERVICE = "test.sandbox.echo"


@pytest.fixture
def echo(kernel):
    """A service in this process answering opcode+1 with the payload reversed."""
    proc = capbus.connect(kernel.socket_path)
    svc = proc.register(ECHO_SERVICE)
    t = threading.Thread(target=svc.serve,
                         args=(lambda req: (req.opcode + 1, req.data, req.payload[::-1]),),
                         daemon=True)
    t.start()
    yield
    proc.close()
    t.join(10)


def test_capbus_over_the_inherited_connection_works(kernel, box, spawned, echo):
    r = run(kernel, box, spawned, f"""
        import capbus, ctypes
        from capbus._protocol import frames
        p = capbus.connect()
        ep = p.grants["echo"]  # a sandboxed process looks nothing up: it is handed what it needs
        attempt("lookup", lambda: p.lookup({ECHO_SERVICE!r}))
        def call():
            m = ep.call(41, data=(7,), payload=b"abc", timeout=10)
            return (m.opcode, m.data[0], m.payload)
        attempt("call", call)
        import asyncio
        async def acall():  # the event loop's self-pipe is a socketpair: allowed
            m = await ep.acall(41, data=(8,), payload=b"xyz", timeout=10)
            return (m.opcode, m.data[0], m.payload)
        attempt("acall", lambda: asyncio.run(acall()))
        attempt("query", lambda: p._request(frames.Query("processes")))
        attempt("dumpable", lambda: ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))  # PR_GET_DUMPABLE
        attempt("id", lambda: p.id)
    """, package="org.example.plugin", grants={"echo": ECHO_SERVICE})
    assert r["lookup"][0] == "exc" and "PermissionDenied" in r["lookup"][1], r
    assert r["call"] == ["ok", repr((42, 7, b"cba"))], r
    assert r["acall"] == ["ok", repr((42, 8, b"zyx"))], r
    assert r["query"][0] == "exc" and "PermissionDenied" in r["query"][1], r
    assert r["dumpable"] == ["ok", "0"], r


def test_ps_rows_say_sandboxed(kernel, box, spawned):
    script = os.path.join(box["scripts"], "wait.py")
    with open(script, "w") as f:
        f.write("import capbus, time\np = capbus.connect()\ntime.sleep(60)\n")
    child = kernel.spawn([sys.executable, script], package="org.example.plugin",
                         sandbox=capbus.Sandbox())
    spawned.append(child)
    plain = kernel.spawn([sys.executable, script], package="org.example.plain")
    spawned.append(plain)
    assert wait_for(lambda: len(kernel.processes()) == 2, 20)
    rows = {r["package"]: r for r in kernel.processes()}
    assert rows["org.example.plugin"]["sandboxed"] is True
    assert rows["org.example.plain"]["sandboxed"] is False
    assert rows["org.example.plugin"]["pid"] == child.pid


def _probe_as(uid: int, gid: int, fn) -> str:
    """fn() run in a forked process with that uid/gid (no exec, no account needed)."""
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            out = str(fn())
        except BaseException as exc:  # noqa: BLE001 - any failure is the report
            out = f"{type(exc).__name__}: {exc}"
        os.write(wr, out.encode()[:4000])
        os._exit(0)
    os.close(wr)
    with os.fdopen(rd) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return out


def _readable_by(uid: int, python: str) -> bool:
    import sysconfig

    paths = [os.path.realpath(python), sysconfig.get_paths()["stdlib"],
             os.path.dirname(capbus.__file__)]
    return _probe_as(uid, uid, lambda: all(os.access(p, os.R_OK | (os.X_OK if os.path.isdir(p)
                                                                    or p == paths[0] else 0))
                                           for p in paths)) == "True"


def test_user_runs_with_its_own_uid_and_no_groups(kernel, box, spawned):
    if os.geteuid() != 0:
        pytest.skip("user= needs the kernel to run as root")
    import sysconfig

    uid = 61000 + os.getpid() % 3000
    site = sysconfig.get_paths()["purelib"]
    python, env = sys.executable, {}
    if not _readable_by(uid, python):
        # The venv's interpreter lives where a fresh uid cannot read (e.g. under /root): the
        # system interpreter of the same version runs the child, capbus from the venv.
        python = "/usr/bin/python3"
        env = {"PYTHONPATH": site}
        probe = (f"import os; print(all(os.access(p, os.R_OK) for p in "
                 f"({os.path.realpath(python)!r}, {site!r}, {os.path.dirname(capbus.__file__)!r})))")
        if not (os.path.exists(python) and _probe_as(uid, uid, lambda: subprocess.run(
                [python, "-c", probe], capture_output=True, text=True, timeout=30,
                env={"PATH": "/usr/bin:/bin"}).stdout.strip()) == "True"):
            pytest.skip(f"neither {sys.executable} nor {python} (with capbus) is readable by "
                        f"uid {uid}")
        ver = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        if ver != str(sys.version_info[:2]):
            pytest.skip(f"{python} is Python {ver}, not this one's: it cannot load capbus's C core")
    os.chmod(box["root"], 0o755)
    os.chmod(box["scripts"], 0o755)
    os.chown(box["out"], uid, uid)
    # Only this uid may reach the service: the call working shows the kernel recorded it.
    proc = capbus.connect(kernel.socket_path)
    svc = proc.register("test.sandbox.uid-only", allow=[f"uid:{uid}"])
    t = threading.Thread(target=svc.serve, args=(lambda req: (1, (req.sender,)),), daemon=True)
    t.start()
    try:
        r = run(kernel, box, spawned, """
            attempt("ids", lambda: (os.getuid(), os.geteuid(), os.getgid(), os.getegid(),
                                    os.getgroups()))
            attempt("write_out", lambda: open(OUT + "/mine", "w").write("x"))
            import capbus
            p = capbus.connect()
            ep = p.grants["svc"]
            attempt("call", lambda: ep.call(0, timeout=10).data[0] == p.id)
        """, capbus.Sandbox(write=[box["out"]], user=uid), python=python, env=env,
            grants={"svc": "test.sandbox.uid-only"})
    finally:
        proc.close()
        t.join(10)
    assert r["ids"] == ["ok", repr((uid, uid, uid, uid, []))], r
    assert r["write_out"][0] == "ok"
    assert os.stat(os.path.join(box["out"], "mine")).st_uid == uid
    assert r["call"] == ["ok", "True"], r


def test_an_unenforceable_sandbox_never_starts(kernel, box, spawned):
    with pytest.raises(capbus.SandboxError, match="does not exist"):
        capbus.Sandbox(read=["/nonexistent/cb-sbx"])
    with pytest.raises(capbus.SandboxError, match="not absolute"):
        capbus.Sandbox(write=["relative/dir"])
    with pytest.raises(capbus.SandboxError, match="list of paths"):
        capbus.Sandbox(read="/tmp")
    with pytest.raises(capbus.SandboxError, match="network"):
        capbus.Sandbox(network="no")
    with pytest.raises(capbus.SandboxError, match="group= needs user="):
        capbus.Sandbox(group=100)
    with pytest.raises(capbus.SandboxError, match="no such user"):
        capbus.Sandbox(user="cb-sbx-no-such-user").check()

    # What an older Linux could not enforce: refused, never run weaker.
    old = dict(AVAILABLE, landlock_abi=3, tcp=False, scoping=False)
    with pytest.raises(capbus.SandboxError, match="ABI 4"):
        capbus.Sandbox(network=False).check(old)
    with pytest.raises(capbus.SandboxError, match="ABI 6"):
        capbus.Sandbox(network=True).check(old)
    with pytest.raises(capbus.SandboxError, match="Landlock is not available"):
        capbus.Sandbox().check(dict(AVAILABLE, landlock_abi=0))
    with pytest.raises(capbus.SandboxError, match="seccomp"):
        capbus.Sandbox().check(dict(AVAILABLE, seccomp=False))

    # user= when the kernel is not root: asked of a real non-root process (forked, setuid).
    if os.geteuid() == 0:
        out = _probe_as(61999, 61999, lambda: capbus.Sandbox(user=62000).check())
        assert out.startswith("SandboxError") and "root" in out, out

    # Write access to code that unsandboxed processes run (the venv, capbus, /usr/lib, or a
    # directory above them): refused.
    for above in (sys.prefix, os.path.dirname(capbus.__file__), "/usr/lib", "/"):
        with pytest.raises(capbus.SandboxError, match="overlaps"):
            capbus.Sandbox(write=[above]).check()
    # A script in its own write path: it could make its restart's grants (its directory) "/".
    inside = os.path.join(box["out"], "plugin.py")
    with open(inside, "w") as f:
        f.write("pass\n")
    with pytest.raises(capbus.SandboxError, match="lies in the sandbox's write path"):
        kernel.spawn([sys.executable, inside], sandbox=capbus.Sandbox(write=[box["out"]]))
    # Nor a read path or another write path inside a write path: the child could swap it for
    # a symlink to / before its restart.
    sub = os.path.join(box["out"], "sub")
    os.mkdir(sub)
    with pytest.raises(capbus.SandboxError, match="read path .* lies in the write path"):
        capbus.Sandbox(read=[sub], write=[box["out"]]).check()
    with pytest.raises(capbus.SandboxError, match="write path .* lies in the write path"):
        capbus.Sandbox(write=[box["out"], sub]).check()
    link = os.path.join(box["root"], "link")
    os.symlink(box["out"], link)  # the same through a symlink
    with pytest.raises(capbus.SandboxError, match="lies in the write path"):
        capbus.Sandbox(read=[sub], write=[link]).check()
    with pytest.raises(capbus.SandboxError, match="overlaps"):
        capbus.Sandbox(write=["/dev"]).check()

    # A path that vanished after the Sandbox was made: spawn refuses, nothing starts.
    gone = os.path.join(box["root"], "gone")
    os.mkdir(gone)
    sb = capbus.Sandbox(read=[gone])
    os.rmdir(gone)
    before = len(kernel.processes())
    with pytest.raises(capbus.SandboxError, match="does not exist"):
        kernel.spawn([sys.executable, "-c", "pass"], sandbox=sb)
    assert len(kernel.processes()) == before

    # A program whose interpreter the sandbox may not execute (a /bin/sh script): a clear
    # SandboxError from spawn, no half-started child.
    prog = os.path.join(box["scripts"], "prog.sh")
    with open(prog, "w") as f:
        f.write("#!/bin/sh\nexit 0\n")
    os.chmod(prog, 0o755)
    with pytest.raises(capbus.SandboxError, match="could not start in its sandbox"):
        kernel.spawn([prog], sandbox=capbus.Sandbox())
    assert len(kernel.processes()) == before


def test_manifest_sandbox_table(box):
    path = os.path.join(box["root"], "app.toml")
    with open(path, "w") as f:
        f.write(textwrap.dedent("""
            [[process]]
            argv = ["python3", "plugin.py"]
            package = "org.example.plugin"
            [process.sandbox]
            read = ["data"]
            write = ["out"]
            network = true
            user = 61000

            [[process]]
            argv = ["python3", "plain.py"]
        """))
    plugin, plain = manifest.load(path)
    assert plugin.sandbox == capbus.Sandbox(read=[box["data"]], write=[box["out"]], network=True,
                                            user=61000)
    assert plain.sandbox is None
    with open(path, "w") as f:
        f.write('argv = ["x"]\n[sandbox]\nread = ["data"]\nexecute = ["/"]\n')
    with pytest.raises(ValueError, match="unknown sandbox keys"):
        manifest.load(path)
    with open(path, "w") as f:
        f.write('argv = ["x"]\n[sandbox]\nread = ["missing"]\n')
    with pytest.raises(capbus.SandboxError, match="does not exist"):
        manifest.load(path)


def test_restarts_are_sandboxed_too(kernel, box, spawned):
    script = os.path.join(box["scripts"], "flaky.py")
    with open(script, "w") as f:
        f.write(textwrap.dedent(f"""
            import os, sys
            n = len(os.listdir({box['out']!r}))
            open(os.path.join({box['out']!r}, f"run{{n}}"), "w").close()
            try:
                open({box['secret']!r} + "/file.txt").read()
                open(os.path.join({box['out']!r}, "LEAK"), "w").close()
            except PermissionError:
                pass
            sys.exit(1 if n < 2 else 0)
        """))
    child = kernel.spawn([sys.executable, script], restart="on-failure", max_restarts=3,
                         sandbox=capbus.Sandbox(write=[box["out"]]))
    spawned.append(child)
    assert child.wait(60) == 0 and child.restarts == 2
    assert sorted(os.listdir(box["out"])) == ["run0", "run1", "run2"]


def test_a_killed_sandboxed_child_is_reaped(kernel, box, spawned):
    script = os.path.join(box["scripts"], "hang.py")
    with open(script, "w") as f:
        f.write("import capbus, time\np = capbus.connect()\ntime.sleep(60)\n")
    child = kernel.spawn([sys.executable, script], sandbox=capbus.Sandbox())
    spawned.append(child)
    assert wait_for(lambda: any(r["pid"] == child.pid for r in kernel.processes()), 20)
    child.kill(signal.SIGKILL)
    assert child.wait(10) == -signal.SIGKILL
    assert wait_for(lambda: not any(r["pid"] == child.pid for r in kernel.processes()), 10)
    kernel.stop()  # flushes the audit log: the launch is recorded as sandboxed
    from capbus._kernel.audit import query

    starts = [r for r in query(kernel.audit_path, event="process-start") if r["pid"] == child.pid]
    assert [r["detail"] for r in starts] == ["launched sandboxed"]


def _ruleset_fds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += "landlock" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return n


def test_the_kernel_keeps_no_ruleset_and_survives_a_failed_restart(kernel, box, spawned):
    before = _ruleset_fds()
    # Refused launches (the script may not be executed by /bin/sh: exec fails in the child).
    prog = os.path.join(box["scripts"], "prog.sh")
    with open(prog, "w") as f:
        f.write("#!/bin/sh\nexit 0\n")
    os.chmod(prog, 0o755)
    for _ in range(20):
        with pytest.raises(capbus.SandboxError):
            kernel.spawn([prog], sandbox=capbus.Sandbox())
    # A restart whose read path vanished meanwhile: not started weaker, given up; the kernel
    # goes on serving.
    gone = os.path.join(box["root"], "gone")
    os.mkdir(gone)
    script = os.path.join(box["scripts"], "fail.py")
    with open(script, "w") as f:
        f.write("import sys\nsys.exit(3)\n")
    child = kernel.spawn([sys.executable, script], restart="on-failure", max_restarts=3,
                         sandbox=capbus.Sandbox(read=[gone]))
    spawned.append(child)
    os.rmdir(gone)  # long before the child's interpreter is up and exits
    assert child.wait(30) == -1 and child.restarts == 1
    assert _ruleset_fds() == before
    with capbus.connect(kernel.socket_path) as p:  # still serving
        p.register("test.sandbox.after")


def test_sandbox_check_command(capsys):
    from capbus._cli.main import main

    assert main(["sandbox-check", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and out["landlock_abi"] == AVAILABLE["landlock_abi"] >= 6


def test_every_right_this_landlock_knows_is_handled():
    from capbus import _sandbox

    accepted = _sandbox.accepted_rights()  # probed bit by bit from the running kernel
    assert accepted[0] and accepted[1] and accepted[2]
    assert _sandbox.handled_rights(False, True) == accepted  # nothing left unrestricted
    fs, net, scoped = _sandbox.handled_rights(True, True)
    assert (fs, net, scoped) == (accepted[0], 0, accepted[2])  # network=True: TCP unhandled


def test_capbus_run_launches_a_sandboxed_manifest(box, sockdir, capsys):
    from capbus._cli.main import main

    script = os.path.join(box["scripts"], "plugin.py")
    with open(script, "w") as f:
        f.write(textwrap.dedent(f"""
            import capbus, os, sys
            p = capbus.connect()
            try:
                open({box['secret']!r} + "/file.txt")
                sys.exit(5)
            except PermissionError:
                open(os.path.join({box['out']!r}, "ran"), "w").close()
        """))
    path = os.path.join(box["root"], "app.toml")
    with open(path, "w") as f:
        f.write(f'argv = [{sys.executable!r}, "scripts/plugin.py"]\n'
                f'package = "org.example.plugin"\n[sandbox]\nwrite = ["out"]\n')
    sock = os.path.join(sockdir, "run.sock")
    assert main(["run", "--socket", sock, path]) == 0, capsys.readouterr().err
    assert os.path.exists(os.path.join(box["out"], "ran"))
    with open(path, "a") as f:
        f.write('user = "cb-sbx-no-such-user"\n')
    assert main(["run", "--socket", sock, path]) == 1
    assert "no such user" in capsys.readouterr().err


def test_a_failed_enter_never_runs_the_child(box):
    """enter() failing in the forked child (a bad ruleset fd here): Popen reports it and the
    program is never executed: no unconfined fallback."""
    import functools

    from capbus import _sandbox

    marker = os.path.join(box["out"], "ran")
    with pytest.raises(subprocess.SubprocessError, match="preexec_fn"):
        subprocess.Popen([sys.executable, "-c", f"open({marker!r}, 'w')"],
                         preexec_fn=functools.partial(_sandbox.enter, 1_000_000, False))
    assert not os.path.exists(marker)


def test_the_kernels_stdin_is_not_the_childs(kernel, box, spawned):
    """The kernel's stdin may be the operator's terminal: a sandboxed child reads /dev/null."""
    rd, wr = os.pipe()
    os.write(wr, b"typed password\n")
    os.close(wr)
    saved = os.dup(0)
    os.dup2(rd, 0)
    os.close(rd)
    try:
        r = run(kernel, box, spawned, """
            attempt("stdin", lambda: sys.stdin.read())
        """)
    finally:
        os.dup2(saved, 0)
        os.close(saved)
    assert r["stdin"] == ["ok", repr("")], r


def test_a_sandboxed_server_serves(kernel, box, spawned):
    """A plugin usually serves: registering, the channel set-up and replies need nothing the
    sandbox refuses."""
    script = os.path.join(box["scripts"], "server.py")
    with open(script, "w") as f:
        f.write(textwrap.dedent("""
            import capbus
            p = capbus.connect()
            svc = p.register_package()
            svc.serve(lambda req: (req.opcode * 2, req.data, bytes(req.payload).upper()))
        """))
    child = kernel.spawn([sys.executable, script], package="org.example.plugin",
                         sandbox=capbus.Sandbox())
    spawned.append(child)
    with capbus.connect(kernel.socket_path) as p:
        ep = p.lookup_package("org.example.plugin", timeout=20)
        m = ep.call(21, data=(5,), payload=b"abc", timeout=10)
        assert (m.opcode, m.data[0], m.payload) == (42, 5, b"ABC")
        big = os.urandom(1 << 20)  # a large payload: the shared arena, not the control socket
        assert ep.call(1, payload=big, timeout=10).payload == big.upper()


def test_the_bench_section_runs():
    """`capbus bench --only sandbox` end to end on two rounds (no figure is asserted)."""
    from bench import sandbox as sandbox_bench

    rows = sandbox_bench.run_spawn(True, rounds=2)
    assert [r.mechanism for r in rows][:2] == ["kernel.spawn, plain", "kernel.spawn, sandboxed"]
    assert all(r.samples == 2 and not r.skipped for r in rows), rows
    calls = sandbox_bench.run_calls(True, rounds=1)
    assert [r.mechanism for r in calls] == [f"capbus {mode} call from a {what} child"
                                            for mode in ("spin", "block")
                                            for what in ("plain", "sandboxed")]
    assert all(r.median_us and not r.skipped for r in calls), calls
