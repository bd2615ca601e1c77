"""Where the kernel's socket lives, shared by the kernel (to bind) and the runtime (to connect).

The default is a per-user directory of mode 0700: $XDG_RUNTIME_DIR/capbus when that is set, else
/tmp/capbus-<uid>. CAPBUS_SOCKET overrides the whole path. A kernel embedded in this process
(capbus.Kernel) announces its socket here, so that connect() finds it first.

The directory is checked here, by kernel and clients alike (open_dir), because a name in /tmp can
be taken by anyone first: /tmp/capbus-<uid> may be another user's directory, or a symlink to one
that its owner re-points later. The directory is opened with O_PATH|O_DIRECTORY|O_NOFOLLOW, the
checks are made on that fd (fstat), and the socket is bound or connected through
/proc/self/fd/<dirfd>/<name> (via_fd): the OS resolves that magic link to the directory the fd
holds, not to whatever the path names by then, so nothing can be swapped in between the check and
the use. (Linux has no bindat/connectat; chdir would move every thread of the process.) The lock
and audit files are opened relative to the same fd with O_NOFOLLOW.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
import threading

from ._errors import PermissionDenied

ENV_SOCKET = "CAPBUS_SOCKET"
ENV_FD = "CAPBUS_FD"  # a pre-connected socket inherited from kernel.spawn()
ENV_KERNEL_UID = "CAPBUS_KERNEL_UID"  # a uid, besides one's own and root, trusted to run a kernel
_UCRED = struct.Struct("3i")
ENV_SANDBOXED = "CAPBUS_SANDBOXED"  # "1": kernel.spawn() launched us in a capbus.Sandbox


def default_dir() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "capbus")
    return f"/tmp/capbus-{os.getuid()}"


def default_socket() -> str:
    return os.environ.get(ENV_SOCKET) or os.path.join(default_dir(), "kernel.sock")


def is_default_dir(directory: str) -> bool:
    return os.path.abspath(directory) == os.path.abspath(default_dir())


def open_dir(directory: str, owners: set[int] | frozenset[int], *, create: int | None = None,
             who: str = "this user") -> int:
    """An O_PATH fd on `directory` once it passed the checks; PermissionDenied naming the path and
    what is wrong otherwise.

    The default directory (default_dir()) must be owned by this user with no group/other bits; any
    other must be owned by one of `owners` (this user, root and whom the caller trusts) and be
    writable by nobody but its owner. Neither may be a symlink. create: the mode to create a
    missing directory with (its parents the usual way); an existing one is never chmod-ed."""
    directory = os.path.abspath(directory)
    default = is_default_dir(directory)
    made = False
    if create is not None:
        with contextlib.suppress(FileExistsError):
            try:
                os.mkdir(directory, create)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(directory), mode=0o755, exist_ok=True)
                os.mkdir(directory, create)
            made = True
    try:
        fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(directory):
            raise PermissionDenied(
                f"{directory} is a symlink (to {os.readlink(directory)!r}): capbus never follows "
                f"one to its socket directory, which someone else may re-point; remove it"
                + (" or set CAPBUS_SOCKET to a path of your own" if default else "")) from None
        if isinstance(exc, FileNotFoundError):
            raise
        raise PermissionDenied(f"{directory}: not a usable socket directory ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        uid = os.getuid()
        if default:
            problem = ""
            if st.st_uid != uid:
                problem = f"belongs to uid {st.st_uid}, not to {who} (uid {uid})"
            elif stat.S_IMODE(st.st_mode) & 0o077:
                problem = (f"has mode {stat.S_IMODE(st.st_mode):04o}, not 0700: others may reach "
                           "or replace what is in it")
            if problem:
                raise PermissionDenied(
                    f"the capbus directory {directory} {problem}; it may be another user's trap: "
                    "remove it (or set CAPBUS_SOCKET to a path of your own)")
        else:
            if st.st_uid not in owners:
                raise PermissionDenied(
                    f"the socket directory {directory} belongs to uid {st.st_uid}, which {who} "
                    f"does not trust (trusted: uids {sorted(owners)}); use a directory of your "
                    "own, or name that uid as the kernel's (kernel_uid= or CAPBUS_KERNEL_UID)")
            if stat.S_IMODE(st.st_mode) & 0o022:
                raise PermissionDenied(
                    f"the socket directory {directory} has mode {stat.S_IMODE(st.st_mode):04o}: "
                    "others may write in it (and so put their own socket, lock or audit file "
                    "there); use a directory only its owner can write (chmod go-w)")
        if made and create is not None and st.st_uid == uid and stat.S_IMODE(st.st_mode) != create:
            os.chmod(f"/proc/self/fd/{fd}", create)  # ours, just made: the umask took bits off
    except BaseException:
        os.close(fd)
        raise
    return fd


def via_fd(dirfd: int, name: str) -> str:
    """The path of `name` in the directory dirfd holds, resolved through the fd, never by name."""
    return f"/proc/self/fd/{dirfd}/{name}"


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected AF_UNIX socket (SO_PEERCRED)."""
    uid: int = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[1]
    return uid


def kernel_uid_from_env() -> int | None:
    raw = os.environ.get(ENV_KERNEL_UID)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{ENV_KERNEL_UID}={raw!r} is not a uid (an integer)") from None
    if not 0 <= value < 2**32 - 1:
        raise ValueError(f"{ENV_KERNEL_UID}={raw!r} is not a uid")
    return value


# Kernels running in this process, oldest first: (pid, socket path). The pid: a forked child has
# the list but not the kernel's thread, so it must not take them for its own.
_embedded: list[tuple[int, str]] = []
_embedded_lock = threading.Lock()


def announce_embedded(path: str) -> None:
    with _embedded_lock:
        _embedded.append((os.getpid(), path))


def withdraw_embedded(path: str) -> None:
    with _embedded_lock:
        for i in range(len(_embedded) - 1, -1, -1):
            if _embedded[i][1] == path:
                del _embedded[i]
                break


def embedded_socket() -> str | None:
    """The socket of the kernel this process started last and still runs, if any."""
    with _embedded_lock:
        pid = os.getpid()
        for owner, path in reversed(_embedded):
            if owner == pid:
                return path
    return None


def open_private(dirfd: int, name: str, shown: str, *, create: bool = True) -> int | None:
    """An O_RDWR fd on the file `name` of the directory dirfd holds (shown: its path, for errors),
    created 0600 with O_EXCL when missing (create; else None), never through a symlink.

    An existing file must be a regular file of this user that nobody else may write; one with
    group/other read bits only is tightened to 0600 (it is ours; a reader learns nothing new from
    here on). Anything else is refused with PermissionDenied: a file another user created first
    (or made writable to them) could be one they still hold open and write."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    if create:
        with contextlib.suppress(FileExistsError):
            return os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dirfd)
    try:
        fd = os.open(name, flags, dir_fd=dirfd)
    except FileNotFoundError:
        if create:  # removed between the two opens: only its owner or root could do that
            raise PermissionDenied(f"{shown} came and went while the kernel opened it") from None
        return None
    except OSError as exc:
        if stat.S_ISLNK(os.lstat(name, dir_fd=dirfd).st_mode):
            raise PermissionDenied(f"{shown} is a symlink: capbus never follows one to its lock "
                                   "or audit files; remove it") from None
        raise PermissionDenied(f"cannot open {shown}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISREG(st.st_mode):
            raise PermissionDenied(f"{shown} is not a regular file: remove it")
        if st.st_uid != os.getuid():
            raise PermissionDenied(
                f"{shown} belongs to uid {st.st_uid}, not to the kernel's user (uid "
                f"{os.getuid()}): someone created it first; it is not used: remove it")
        if mode & 0o022:
            raise PermissionDenied(
                f"{shown} has mode {mode:04o}: others may write it (or hold it open for writing); "
                "it is not used: remove it")
        if mode & 0o077:
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd
