"""The typed contract: `mypy --strict` (configured in pyproject.toml) is clean on src/capbus and
on a user-style program that calls the whole public API (tests/tools/typed/user_api.py), and rejects
exactly the wrong calls of tests/tools/typed/user_wrong.py, each marked `# E: <error code>` on its line.

One mypy run checks all three (about 3 s here with a cold cache: the cache goes to a temporary
directory, never into the tree). The native core is checked through its stub,
src/capbus/_core.pyi, so a stub that drifts from what the code does with it fails here; and
mypy's stubtest holds the stubs (_core.pyi, _layout.pyi, _sandbox.pyi) against the built modules: every name
on both sides, the signatures the C functions declare, which types can be subclassed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # tests/tools/ -> the repository
USER_API = "tests/tools/typed/user_api.py"
USER_WRONG = "tests/tools/typed/user_wrong.py"
STUBTEST_ALLOWLIST = "tests/tools/typed/stubtest_allowlist.txt"

_ERROR = re.compile(r"^(?P<path>[^:\n]+):(?P<line>\d+): error: (?P<msg>.*?)\s+\[(?P<code>[a-z-]+)\]$")
_MARK = re.compile(r"#\s*E:\s*(?P<code>[a-z-]+)\s*$")


@pytest.fixture(scope="module")
def mypy_errors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[int, str, str]]]:
    """path -> [(line, code, message)] of one `mypy` run over src/capbus and both user files."""
    pytest.importorskip("mypy", reason="mypy is in the test extra: pip install '.[test]'")
    cache = tmp_path_factory.mktemp("mypy-cache")
    cmd = [sys.executable, "-m", "mypy", "--config-file", "pyproject.toml", "--cache-dir", str(cache),
           "--no-color-output", "--no-error-summary", "--show-error-codes",
           "src/capbus", USER_API, USER_WRONG]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    errors: dict[str, list[tuple[int, str, str]]] = {}
    for line in run.stdout.splitlines():
        m = _ERROR.match(line)
        if m:
            errors.setdefault(m["path"], []).append((int(m["line"]), m["code"], m["msg"]))
        elif ": error: " in line:  # an error this test cannot read is a failure, not a pass
            errors.setdefault("<unparsed>", []).append((0, "", line))
    # mypy exits 1 when it found errors, 2 when it could not run at all (a crash, a bad config).
    assert run.returncode in (0, 1), f"mypy did not run ({run.returncode}):\n{run.stdout}{run.stderr}"
    assert run.returncode == (1 if errors else 0), run.stdout + run.stderr
    return errors


def _show(errs: list[tuple[int, str, str]], path: str) -> str:
    return "\n".join(f"{path}:{line}: [{code}] {msg}" for line, code, msg in errs)


def test_src_is_clean_under_strict(mypy_errors: dict[str, list[tuple[int, str, str]]]) -> None:
    src = {p: e for p, e in mypy_errors.items() if p not in (USER_API, USER_WRONG)}
    assert not src, "mypy --strict on src/capbus:\n" + "\n".join(_show(e, p) for p, e in src.items())


def test_the_public_api_as_users_call_it_is_clean(
        mypy_errors: dict[str, list[tuple[int, str, str]]]) -> None:
    errs = mypy_errors.get(USER_API, [])
    assert not errs, "mypy --strict on " + USER_API + ":\n" + _show(errs, USER_API)


def test_wrong_calls_are_rejected_exactly_where_marked(
        mypy_errors: dict[str, list[tuple[int, str, str]]]) -> None:
    expected = set()
    for n, text in enumerate((ROOT / USER_WRONG).read_text().splitlines(), 1):
        m = _MARK.search(text)
        if m:
            expected.add((n, m["code"]))
    assert len(expected) >= 10, "user_wrong.py lost its marked lines"
    got = {(line, code) for line, code, _ in mypy_errors.get(USER_WRONG, [])}
    missed, extra = sorted(expected - got), sorted(got - expected)
    assert not missed and not extra, (
        f"marked but not reported (line, code): {missed}\n"
        f"reported but not marked: {extra}\n" + _show(mypy_errors.get(USER_WRONG, []), USER_WRONG))


def test_the_native_stubs_match_the_built_modules() -> None:
    """stubtest imports the built capbus._core, _layout and _sandbox (the installed ones: `make
    setup` builds them from this tree) and compares them with the stubs in src/capbus."""
    pytest.importorskip("mypy", reason="mypy is in the test extra: pip install '.[test]'")
    # capbus._core as a program sees it: after its runtime registered the error classes with it
    # (CorruptChannel is one of them), which `import capbus` alone no longer does.
    run_stubtest = ("import sys, capbus._runtime.message; from mypy.stubtest import main; "
                    "sys.exit(main())")
    cmd = [sys.executable, "-c", run_stubtest, "capbus._core", "capbus._layout", "capbus._sandbox",
           "--mypy-config-file", "pyproject.toml", "--allowlist", STUBTEST_ALLOWLIST]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Success" in run.stdout, run.stdout + run.stderr
