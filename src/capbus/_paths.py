"""Where the kernel's socket lives, shared by the kernel (to bind) and the runtime (to connect).

The default is a per-user directory of mode 0700: $XDG_RUNTIME_DIR/capbus when that is set, else
/tmp/capbus-<uid>. CAPBUS_SOCKET overrides the whole path. A kernel embedded in this process
(capbus.Kernel) announces its socket here, so that connect() finds it first.
"""

from __future__ import annotations

import os
import threading

ENV_SOCKET = "CAPBUS_SOCKET"
ENV_FD = "CAPBUS_FD"  # a pre-connected socket inherited from kernel.spawn()
ENV_SANDBOXED = "CAPBUS_SANDBOXED"  # "1": kernel.spawn() launched us in a capbus.Sandbox


def default_dir() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "capbus")
    return f"/tmp/capbus-{os.getuid()}"


def default_socket() -> str:
    return os.environ.get(ENV_SOCKET) or os.path.join(default_dir(), "kernel.sock")


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
