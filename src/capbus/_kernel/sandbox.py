"""Sandboxed launch: what a process started with kernel.spawn(..., sandbox=Sandbox(...)) may do.

The LAUNCHER confines the child between fork and exec (subprocess's preexec_fn, after its
setgroups/setgid/setuid), so no code of the child's own ever runs unconfined and nothing the
child's runtime could skip is involved. The native half is capbus._sandbox (Landlock has no
Python wrappers; the seccomp filter is a few dozen lines of BPF); this module decides what to
allow and refuses, with SandboxError, any sandbox this Linux cannot enforce as asked: never a
silently weaker one.

What a sandboxed child gets:
* no_new_privs; dumpable 0 until exec (execve resets it: the runtime sets it again on connect).
* Landlock, every filesystem right of the running ABI handled: read (+execute where said) only
  to what `_system_paths` lists (the interpreter and its loader, /usr/lib and /lib*, the
  parent's stdlib, the venv's site-packages and pyvenv.cfg, libpython, the capbus package, the
  argv script's directory, and the few files the runtime and libc read) plus `read`; write only
  to `write` and /dev/null; no TCP bind/connect unless network=True; scoped (ABI >= 6): no
  abstract unix sockets and no signals to processes outside its domain.
* seccomp (capbus/_sandbox.c, build_filter, has the whole list): EPERM for ptrace,
  process_vm_*, pidfd_getfd, mounts, bpf, perf, kexec, modules, keyrings, userfaultfd,
  io_uring, namespaces, admin calls; for socket(AF_UNIX) (so neither it nor a forked
  grandchild can open an unconfined connection to the kernel's socket: Landlock cannot stop
  connect() to a named socket), socketpair other than stream/seqpacket and, with
  network=False, socket() of every family; for prlimit64, sched_set*, setpriority and
  ioprio_set on another process; for TIOCSTI. A foreign arch is killed, x32 refused.
* user= (the kernel must run as root): its own uid and gid and no supplementary groups.
* stdin from /dev/null, never the kernel's (perhaps the operator's terminal).

Not confined (Landlock has no right for them): stat() and path lookup anywhere (a child learns
whether a path exists, its size and owner, not its contents), and named sockets it was handed.
"""

from __future__ import annotations

import functools
import glob
import grp
import os
import platform
import pwd
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import _sandbox
from .._errors import SandboxError

# Files the interpreter, libc and the capbus runtime read in a child (all read-only): the
# loader's cache, the local time zone, /proc/loadavg (the native core's spin heuristic), the
# clock source (the core's timing check), the CPU count (os.cpu_count), urandom.
_SYSTEM_FILES = (
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/proc/loadavg",
    "/sys/devices/system/clocksource/clocksource0/current_clocksource",
    "/sys/devices/system/cpu/online",
    "/dev/urandom",
)
# Shared libraries (and the C locale data under /usr/lib): read, never execute. Only the ELF
# loader and the program itself need EXECUTE (dlopen's mmap(PROT_EXEC) is not a Landlock right).
_LIB_DIRS = ("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib")
_LOADERS = ("/lib64/ld-linux-*.so*", "/lib/ld-linux*.so*", "/lib/ld-musl-*.so*")
# Python options that take the next argument, for finding the script in an interpreter argv.
_PY_OPTS_WITH_ARG = {"-W", "-X", "--check-hash-based-pycs"}


@dataclass(frozen=True)
class Sandbox:
    """Confinement for a launched process (kernel.spawn(sandbox=...), [process.sandbox]).

    read: directories and files it may read (absolute, existing), beside what a Python child
    needs to start (module docstring of capbus._kernel.sandbox). write: what it may create,
    write, rename and remove in (and read). network: TCP bind/connect and sockets of any
    family but AF_UNIX (False: none). user/group: run as this uid or user name (group: gid or
    group name; default the user's primary group, or the uid's number when it has no account),
    no supplementary groups; needs the kernel to run as root.
    """

    read: Sequence[str] = ()
    write: Sequence[str] = ()
    network: bool = False
    user: int | str | None = None
    group: int | str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "read", _check_paths("read", self.read))
        object.__setattr__(self, "write", _check_paths("write", self.write))
        if not isinstance(self.network, bool):
            raise SandboxError(f"Sandbox network must be True or False, not {self.network!r:.80}")
        for key in ("user", "group"):
            v = getattr(self, key)
            if v is None or (isinstance(v, str) and v) or (
                    isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32 - 1):
                continue
            raise SandboxError(f"Sandbox {key} must be a {key} name or a number in [0, 2**32-1), "
                               f"not {v!r:.80}")
        if self.group is not None and self.user is None:
            raise SandboxError("Sandbox group= needs user= too (the child keeps the kernel's "
                               "identity otherwise)")

    @staticmethod
    def available() -> dict[str, Any]:
        """What this Linux can enforce: the Landlock ABI (0: none), seccomp filters, TCP
        rules (ABI >= 4), scoping of signals and abstract sockets (ABI >= 6), user= (root)."""
        abi = _sandbox.landlock_abi()
        return {
            "landlock_abi": abi,
            "known_abi": _sandbox.KNOWN_ABI,
            "seccomp": _sandbox.seccomp_supported(),
            "tcp": abi >= 4,
            "scoping": abi >= 6,
            "user": os.geteuid() == 0,
            "arch": platform.machine(),
        }

    def check(self, available: Mapping[str, Any] | None = None) -> None:
        """Raise SandboxError unless this sandbox can be enforced in full here (`available`:
        Sandbox.available() by default; another mapping asks about another machine)."""
        av = Sandbox.available() if available is None else available
        if av["landlock_abi"] < 1:
            raise SandboxError("Landlock is not available on this Linux (it needs 5.13+ with "
                               "landlock in the lsm= list): a sandbox cannot be enforced")
        if not av["seccomp"]:
            raise SandboxError(f"seccomp filters are not available here (arch {av.get('arch')}): "
                               "a sandbox cannot be enforced")
        if not self.network and not av["tcp"]:
            raise SandboxError(f"network=False needs Landlock ABI 4 (Linux 6.7) to refuse TCP; "
                               f"this Linux has ABI {av['landlock_abi']}")
        if not av["scoping"]:
            raise SandboxError(f"a sandbox needs Landlock ABI 6 (Linux 6.12) to keep signals and "
                               f"abstract sockets inside it; this Linux has ABI {av['landlock_abi']}")
        if self.user is not None and not av["user"]:
            raise SandboxError(f"Sandbox user={self.user!r} needs the kernel to run as root "
                               f"(it runs as uid {os.geteuid()})")
        self.identity()
        _check_paths("read", self.read)
        # The child may replace anything in a write path, by a symlink say: a path of this
        # sandbox under a write path would name what the child chose at the next launch.
        for r in self.read:
            w = _inside_write(r, self.write)
            if w is not None:
                raise SandboxError(f"Sandbox read path {r!r:.200} lies in the write path "
                                   f"{w!r:.200} (readable already, and the child could swap it)")
        for i, w in enumerate(self.write):
            other = _inside_write(w, (*self.write[:i], *self.write[i + 1:]))
            if other is not None:
                raise SandboxError(f"Sandbox write path {w!r:.200} lies in the write path "
                                   f"{other!r:.200}: name only the outer one")
        for w in _check_paths("write", self.write):
            for p in _protected():
                if _within(p, w) or _within(w, p):
                    raise SandboxError(
                        f"Sandbox write path {w!r:.200} overlaps {p!r:.200}, code that processes "
                        "outside the sandbox run (the interpreter, its libraries, capbus): a "
                        "sandboxed child could change it. Give it a directory of its own")

    def identity(self) -> tuple[int, int] | None:
        """(uid, gid) the child runs as, or None to keep the kernel's."""
        if self.user is None:
            return None
        if isinstance(self.user, str):
            try:
                pw = pwd.getpwnam(self.user)
            except KeyError:
                raise SandboxError(f"Sandbox user {self.user!r}: no such user") from None
            uid, gid = pw.pw_uid, pw.pw_gid
        else:
            uid = self.user
            try:
                gid = pwd.getpwuid(uid).pw_gid
            except KeyError:
                gid = uid  # a fresh uid with no account: its own group number, never ours
        if isinstance(self.group, str):
            try:
                gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                raise SandboxError(f"Sandbox group {self.group!r}: no such group") from None
        elif self.group is not None:
            gid = self.group
        return uid, gid


@dataclass
class Prepared:
    """One launch's sandbox: the Landlock ruleset (the caller closes it once the child runs)
    and what to hand subprocess.Popen."""

    ruleset_fd: int
    popen_kwargs: dict[str, Any]

    def close(self) -> None:
        if self.ruleset_fd >= 0:
            os.close(self.ruleset_fd)
            self.ruleset_fd = -1


def prepare(sandbox: Sandbox, argv: Sequence[str], env: Mapping[str, str],
            cwd: str | None) -> Prepared:
    """Check `sandbox` and build its ruleset in this (the parent) process."""
    sandbox.check()
    read, execs, write, own = _system_paths(argv, env, cwd)
    # What the child can change must not decide what its next launch (a restart) is given: a
    # script directory it replaced by a symlink to / would be granted as /.
    for given in own + read + execs + write:
        w = _inside_write(given, sandbox.write)
        if w is not None:
            raise SandboxError(
                f"{given!r:.200}, which a sandboxed child is given to start (its program, script "
                f"directory or a system path), lies in the sandbox's write path {w!r:.200}: the "
                "child could change what its next launch is given; keep it outside")
    try:
        fd = _sandbox.landlock_ruleset(read + list(sandbox.read), write + list(sandbox.write),
                                       execs, sandbox.network, True)
    except OSError as exc:
        raise SandboxError(f"cannot build the sandbox's Landlock ruleset: {exc}") from None
    kwargs: dict[str, Any] = {
        # functools.partial is C: the forked child runs no Python bytecode before the C call.
        "preexec_fn": functools.partial(_sandbox.enter, fd, sandbox.network),
        # Not the kernel's stdin: that may be the operator's terminal (typed passwords).
        # stdout and stderr stay inherited, for its logs.
        "stdin": subprocess.DEVNULL,
    }
    ident = sandbox.identity()
    if ident is not None:
        # Popen does setgroups([]), setregid, setreuid in C before preexec_fn runs.
        kwargs.update(user=ident[0], group=ident[1], extra_groups=[])
    return Prepared(fd, kwargs)


def _check_paths(key: str, paths: Sequence[str]) -> tuple[str, ...]:
    if isinstance(paths, str | bytes):
        raise SandboxError(f"Sandbox {key} must be a list of paths, not one string: [{paths!r:.80}]")
    out = []
    for p in paths:
        if not isinstance(p, str) or not p or "\0" in p:
            raise SandboxError(f"Sandbox {key} paths must be non-empty strings, not {p!r:.80}")
        if not os.path.isabs(p):
            raise SandboxError(f"Sandbox {key} path {p!r:.200} is not absolute")
        if not os.path.exists(p):
            raise SandboxError(f"Sandbox {key} path {p!r:.200} does not exist: create it first "
                               "(a rule needs the file or directory to attach to)")
        out.append(os.path.normpath(p))
    return tuple(out)


def _system_paths(argv: Sequence[str], env: Mapping[str, str], cwd: str | None
                  ) -> tuple[list[str], list[str], list[str], list[str]]:
    """(read, execute, write, own) paths every sandboxed child gets: the least a Python child
    (this interpreter) needs to start and run the capbus runtime; own: of those, the ones its
    argv chose (the program, the script's directory), as given and resolved. Missing ones are
    left out."""
    read: list[str] = []
    execs: list[str] = []
    prog = argv[0]
    if "/" not in prog:
        prog = shutil.which(prog, path=env.get("PATH", os.defpath)) or prog
    elif not os.path.isabs(prog) and cwd:
        prog = os.path.join(cwd, prog)
    execs.append(prog)  # a script: its shebang interpreter is ours (below) or must be in read
    own = [prog] if os.path.isabs(prog) else []  # a name not on PATH: Popen will say so
    execs.append(sys.executable)
    for pattern in _LOADERS:
        execs.extend(glob.glob(pattern))
    read.extend(_LIB_DIRS)
    read.extend(_SYSTEM_FILES)
    paths = sysconfig.get_paths()
    read.extend(paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib"))
    read.append(os.path.join(sys.prefix, "pyvenv.cfg"))
    libdir, ldlib = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    if libdir and ldlib:
        read.append(os.path.join(libdir, ldlib))
    read.append(os.path.dirname(os.path.abspath(_sandbox.__file__)))  # the capbus package
    script = _script_of(argv)
    if script is not None:
        script = os.path.join(cwd or os.getcwd(), script)
        if os.path.isfile(script):
            read.append(os.path.dirname(script))
            own.append(os.path.dirname(script))
    own += [os.path.realpath(p) for p in own]
    return _existing(read), _existing(execs), ["/dev/null"], own


def _script_of(argv: Sequence[str]) -> str | None:
    """The script a Python argv runs (None for -c, -m or no script)."""
    it = iter(argv[1:])
    for a in it:
        if a in ("-c", "-m", "-"):
            return None
        if a in _PY_OPTS_WITH_ARG:
            next(it, None)
        elif not a.startswith("-"):
            return a
    return None


def _protected() -> list[str]:
    """What unsandboxed processes run: never inside (nor above) a write path."""
    return _existing([sys.prefix, sys.base_prefix, sys.exec_prefix,
                      os.path.dirname(os.path.abspath(_sandbox.__file__)),
                      *_LIB_DIRS, "/bin", "/sbin", "/usr/bin", "/usr/sbin", "/etc", "/dev",
                      "/proc", "/sys"])


def _inside_write(path: str, writes: Sequence[str]) -> str | None:
    """The write path that `path` (as given or resolved) lies in, if any."""
    for w in writes:
        for top in {w, os.path.realpath(w)}:
            if _within(path, top) or _within(os.path.realpath(path), top):
                return w
    return None


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _existing(paths: list[str]) -> list[str]:
    """Resolved (a rule attaches to the inode a symlink names), existing, each once."""
    seen: dict[str, None] = {}
    for p in paths:
        if os.path.exists(p):
            seen.setdefault(os.path.realpath(p), None)
    return list(seen)
