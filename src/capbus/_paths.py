"""Where the kernel's socket lives, shared by the kernel (to bind) and the runtime (to connect).

The default is a per-user directory of mode 0700: $XDG_RUNTIME_DIR/capbus when that is set, else
/tmp/capbus-<uid>. CAPBUS_SOCKET overrides the whole path.
"""

from __future__ import annotations

import os

ENV_SOCKET = "CAPBUS_SOCKET"
ENV_FD = "CAPBUS_FD"  # a pre-connected socket inherited from kernel.spawn()


def default_dir() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "capbus")
    return f"/tmp/capbus-{os.getuid()}"


def default_socket() -> str:
    return os.environ.get(ENV_SOCKET) or os.path.join(default_dir(), "kernel.sock")
