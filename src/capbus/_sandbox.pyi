"""capbus._sandbox -- Landlock rulesets and the seccomp filter of sandboxed launch (the C source:
_sandbox.c; its caller: _kernel/sandbox.py)."""

from collections.abc import Sequence

KNOWN_ABI: int  # the newest Landlock ABI this build knows

def handled_rights(network: bool = False, scope: bool = True, /) -> tuple[int, int, int]: ...
def accepted_rights() -> tuple[int, int, int]: ...  # (fs, net, scoped) right bits
def landlock_abi() -> int: ...  # 0: no Landlock
def seccomp_supported() -> bool: ...
def landlock_ruleset(read_paths: Sequence[str], write_paths: Sequence[str],
                     exec_paths: Sequence[str], network: bool, scope: bool) -> int: ...
def enter(ruleset_fd: int, network: bool, dumpable: bool = False) -> None: ...
