"""The fd limit: a kernel, and a service with many clients, hold many fds."""

from __future__ import annotations

import contextlib
import resource


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard one. A kernel holds two fds per process (socket and
    pidfd), a service three per client channel (reply eventfd, both reply-sleep pipe ends):
    1000 of either need more than the usual soft limit of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY
                                                        else 1 << 20, hard))
