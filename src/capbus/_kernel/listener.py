"""The kernel's door: the listening socket (its directory checked, a lock against a second
kernel, born with its final mode) and who may come in (SO_PEERCRED, SO_PEERGROUPS).
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import stat

from .. import _paths
from .._errors import IpcError
from .policy import Access

log = logging.getLogger("capbus.kernel")


def bind(path: str, shared: bool) -> tuple[int, int, socket.socket]:
    """Check the directory, lock, then bind the socket: a live kernel on the path refuses; a stale
    file is replaced. Returns (the directory's O_PATH fd, the lock's fd, the listening socket).

    The directory is created (mode 0700, or 0711 when shared) only when it does not exist; an
    existing one is used as it is, never chmod-ed (CAPBUS_SOCKET=/srv/k.sock must not touch /srv),
    once it passed _paths.open_dir's checks. Everything in it is reached through that fd, never
    by name again (see _paths). The socket is born 0600, or 0666 when shared: a set of uids and
    groups cannot be written as mode bits, so the socket lets anyone who can reach it connect and
    the kernel admits or refuses each connection by its SO_PEERCRED (not_admitted); 0711 lets others
    through the directory to the socket without listing (or writing) it."""
    directory = os.path.dirname(path) or "."
    name = os.path.basename(path)
    if shared and _paths.is_default_dir(directory):
        raise ValueError(f"a kernel open to other users needs a socket path of its own (--socket, "
                         f"say /run/capbus/kernel.sock), not this user's private {directory}")
    dirfd = _paths.open_dir(directory, frozenset({os.getuid(), 0}),
                            create=0o711 if shared else 0o700, who="the kernel's user")
    try:
        if shared and not os.fstat(dirfd).st_mode & 0o011:
            log.warning("%s lets only its owner through (mode %04o): the users this kernel allows "
                        "cannot reach its socket", directory,
                        stat.S_IMODE(os.fstat(dirfd).st_mode))
        lock_fd = _paths.open_private(dirfd, name + ".lock", path + ".lock")
        assert lock_fd is not None
    except BaseException:
        os.close(dirfd)
        raise
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(lock_fd)
        os.close(dirfd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise IpcError(
                f"another capbus kernel is already serving {path}: stop it, or give this one "
                "another socket path"
            ) from None
        raise
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dirfd)  # stale: its kernel is gone, since we hold the lock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        # Born with its final mode: no window where others may connect to a private kernel.
        old_umask = os.umask(0o111 if shared else 0o177)
        try:
            sock.bind(_paths.via_fd(dirfd, name))
        finally:
            os.umask(old_umask)
    except BaseException:
        os.close(lock_fd)
        os.close(dirfd)
        raise
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # inherited by accepted sockets
    sock.listen(1024)
    sock.setblocking(False)
    return dirfd, lock_fd, sock


def not_admitted(access: Access, kernel_uid: int, sock: socket.socket, pid: int, uid: int,
                 gid: int) -> str:
    """Why a connection from (pid, uid, gid) may not use this kernel at all, or "" if it may:
    the kernel's own user and root may, and whom its Access names (a uid, or a member of a
    group: primary gid from SO_PEERCRED, supplementary groups from SO_PEERGROUPS, both taken
    by the OS at connect(), so neither a later setgroups nor a reused pid can change them)."""
    if uid in (kernel_uid, 0) or uid in access.uids:
        return ""
    if access.groups and (gid in access.groups
                          or not access.groups.isdisjoint(peer_groups(sock, pid, uid))):
        return ""
    return (f"uid {uid} is not one of the users this kernel serves (it runs as uid "
            f"{kernel_uid}; its owner may admit others with --allow-uid / --allow-group, or "
            "[access] in its policy)")


_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13


def peer_groups(sock: socket.socket, pid: int, uid: int) -> set[int]:
    """The supplementary groups of the process that connected `sock`: SO_PEERGROUPS (taken at
    connect()); where that fails (an old kernel, or more than 256 groups: Python reads at most
    1 KiB), /proc/<pid>/status Groups:, trusted only if that pid still runs as `uid` and has not
    exited by the time it was read (a pidfd opened first tells)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 1024)
        return set(array.array("I", raw[: len(raw) // 4 * 4]))
    except OSError:
        pass
    if pid <= 0:
        return set()
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return set()
    try:
        groups: set[int] = set()
        owner = -1
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    owner = int(line.split()[2])  # effective uid, as SO_PEERCRED has it
                elif line.startswith(b"Groups:"):
                    groups = {int(g) for g in line.split()[1:]}
        exited = bool(select.select([pidfd], [], [], 0)[0])
        return groups if owner == uid and not exited else set()
    except (OSError, ValueError):
        return set()
    finally:
        os.close(pidfd)
