"""The launcher: starts processes holding a pre-connected control socket, and restarts them.

A launched process's package identity is the one the kernel launched it with: the socket it
inherits is the proof, so it never has to claim anything. Restarts get a new ProcessId.
A spec with a sandbox (capbus.Sandbox, sandbox.py) is confined here, between fork and exec.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .._errors import SandboxError, Timeout
from .._paths import ENV_FD, ENV_SANDBOXED, ENV_SOCKET
from .grants import GrantSpec
from .sandbox import Sandbox, prepare

RESTART_POLICIES = ("never", "on-failure")


@dataclass(frozen=True)
class LaunchSpec:
    argv: tuple[str, ...]
    name: str | None = None
    package: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    restart: str = "never"
    max_restarts: int = 3
    cwd: str | None = None
    # What it starts with (see grants.py) and what else it may look up (None: anything).
    grants: tuple[GrantSpec, ...] = ()
    lookup: tuple[str, ...] | None = None
    sandbox: Sandbox | None = None

    def __post_init__(self) -> None:
        if not self.argv or not all(isinstance(a, str) for a in self.argv):
            raise ValueError("argv must be a non-empty sequence of strings")
        if self.restart not in RESTART_POLICIES:
            raise ValueError(f"restart must be one of {RESTART_POLICIES}, not {self.restart!r}")
        if self.max_restarts < 0:
            raise ValueError("max_restarts must be >= 0")
        if self.sandbox is not None and not isinstance(self.sandbox, Sandbox):
            raise TypeError(f"sandbox must be a capbus.Sandbox or None, not {type(self.sandbox).__name__}")


def default_lookup(spec: LaunchSpec) -> tuple[str, ...] | None:
    """The lookup list of a process spawned without one: unrestricted, except for a sandboxed
    process, which may look nothing up (it reaches only what it was granted). The one place
    that decides it: the sandbox reads spec.sandbox when LaunchSpec has it."""
    return () if getattr(spec, "sandbox", None) else None


def launch(spec: LaunchSpec, socket_path: str) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Start one incarnation; returns the child and the kernel's end of its socket.

    SandboxError if spec.sandbox cannot be enforced or the child cannot start inside it."""
    env = dict(os.environ)
    env.update(spec.env)
    env.pop(ENV_SANDBOXED, None)
    if spec.sandbox is None:
        return _start(spec, socket_path, env, {})
    prepared = prepare(spec.sandbox, spec.argv, env, spec.cwd)
    env[ENV_SANDBOXED] = "1"
    kwargs = prepared.popen_kwargs
    try:
        return _start(spec, socket_path, env, kwargs)
    except (PermissionError, subprocess.SubprocessError) as exc:
        # exec refused inside the domain (EACCES), or enter() failed (preexec_fn raised); a
        # missing program or cwd stays the FileNotFoundError it is
        who = f" as uid {kwargs['user']}" if "user" in kwargs else ""
        raise SandboxError(
            f"{spec.argv[0]!r} could not start in its sandbox{who}: {exc} (is it, and what it "
            "loads, readable there? add the paths it needs to the sandbox's read list)"
        ) from None
    finally:
        prepared.close()  # the child holds its domain now; the ruleset fd is not needed


def _start(spec: LaunchSpec, socket_path: str, env: dict[str, str],
           kwargs: dict[str, Any]) -> tuple[subprocess.Popen[bytes], socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # before the child can send
        env[ENV_FD] = str(theirs.fileno())
        env[ENV_SOCKET] = socket_path
        popen = subprocess.Popen(
            list(spec.argv), env=env, pass_fds=(theirs.fileno(),), cwd=spec.cwd, **kwargs
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return popen, ours


class Child:
    """A process the kernel launched (public as the result of Kernel.spawn)."""

    def __init__(self, spec: LaunchSpec) -> None:
        self.spec = spec
        self.restarts = 0
        self._popen: subprocess.Popen[bytes] | None = None
        self._process_id = 0
        self._stopping = False
        self._done = threading.Event()
        self._returncode: int | None = None
        self._kernel: Any = None  # the Kernel that launched it (set by Kernel.spawn)
        # Startup grants the spawner revoked: a restarted incarnation does not get them back.
        self.revoked_grants: set[str] = set()

    def __repr__(self) -> str:
        return f"<capbus.Child {self.spec.name or self.spec.argv[0]} pid={self.pid} id={self.process_id}>"

    @property
    def pid(self) -> int:
        return self._popen.pid if self._popen else 0

    @property
    def process_id(self) -> int:
        """The current incarnation's ProcessId (a restart gets a new one)."""
        return self._process_id

    @property
    def returncode(self) -> int | None:
        return self._returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait until the process has exited for good (no restart pending); its exit code."""
        if not self._done.wait(timeout):
            raise Timeout(f"{self!r} still running after {timeout} s")
        assert self._returncode is not None
        return self._returncode

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the current incarnation and stop restarting it."""
        self._stopping = True
        self.send_signal(sig)

    def terminate(self) -> None:
        self.kill(signal.SIGTERM)

    def revoke_grant(self, key: str) -> None:
        """Take back the startup grant `key` (thread-safe): the endpoint and everything derived
        from it are revoked (their calls fail with InvalidCapability), `proc.grants` stops
        yielding it, the process may not look its service up again, and a restart does not
        bring it back. KeyError if the process was not given `key`."""
        if self._kernel is None:
            raise RuntimeError("this Child was not launched by a Kernel")
        self._kernel._call(self._kernel._revoke_grant, self, key)

    def send_signal(self, sig: int) -> None:
        if self._popen is not None and self._popen.returncode is None:
            try:
                self._popen.send_signal(sig)
            except ProcessLookupError:
                pass

    # -- called by the kernel thread ------------------------------------------------------------

    def _started(self, popen: subprocess.Popen[bytes], process_id: int) -> None:
        self._popen, self._process_id = popen, process_id

    def _exited(self) -> bool:
        """Reap the incarnation; True if the kernel should start another."""
        assert self._popen is not None
        code = self._popen.wait()
        failed = code != 0
        if (
            failed
            and not self._stopping
            and self.spec.restart == "on-failure"
            and self.restarts < self.spec.max_restarts
        ):
            self.restarts += 1
            return True
        self._returncode = code
        self._done.set()
        return False

    def _abandon(self, code: int) -> None:
        """The kernel is stopping or could not restart: this child is over."""
        if not self._done.is_set():
            self._returncode = code
            self._done.set()

