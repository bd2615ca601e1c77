"""Keeping other processes of the same uid out of a capbus process.

Inside one uid, any process may ptrace another, read its memory through /proc/<pid>/mem, open
its fds through /proc/<pid>/fd or take them with pidfd_getfd: the channels, regions and payloads
of a capbus process would be open to every other program its user runs. A non-dumpable process
(prctl(PR_SET_DUMPABLE, 0)) is out of their reach (only a process with CAP_SYS_PTRACE gets in),
and leaves no core dump. So every capbus process makes itself non-dumpable: the kernel (daemon or
embedded capbus.Kernel) and every process that calls capbus.connect(), a forked child included
(fork keeps the flag, exec resets it: a program the kernel launches is protected from its own
connect() on).

A debugger, a profiler that reads memory (py-spy) or a core dump needs the process dumpable:
capbus.connect(debuggable=True), capbus.Kernel(debuggable=True), or CAPBUS_DEBUGGABLE=1 in the
environment (for a program one cannot change). That only leaves the flag alone: it never makes a
process dumpable that was made non-dumpable before (by an earlier connect() in it, or by the OS
after a change of uid).
"""

from __future__ import annotations

import os

from . import _layout  # not _core: the kernel calls this too, and never loads the data plane

ENV_DEBUGGABLE = "CAPBUS_DEBUGGABLE"


def protect(debuggable: bool | None = None) -> None:
    """Make this process non-dumpable, unless debuggable (None: as CAPBUS_DEBUGGABLE=1 says)."""
    if debuggable is None:
        debuggable = os.environ.get(ENV_DEBUGGABLE, "") == "1"
    if not debuggable:
        _layout.set_dumpable(False)
