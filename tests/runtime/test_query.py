"""Process.query(): the kernel's tables for tools, every page of them, and only for those the
kernel lets read them (a lookup-listed or sandboxed process gets PermissionDenied, as from the
Query frame itself). Real kernel, real launched children."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

import capbus
from capbus._cli import query as cli_query

# The launched child's verdict is its exit status (a sandboxed child may write nowhere):
# 0 PermissionDenied, 3 it was given rows, 4 another error.
ASKER = """
import sys, capbus
p = capbus.connect()
try:
    rows = p.query(sys.argv[1])
except capbus.PermissionDenied as exc:
    sys.exit(0 if "may not" in str(exc) else 4)
except Exception:
    sys.exit(4)
sys.exit(3 if rows else 4)
"""


@pytest.fixture
def asker(tmp_path):
    script = tmp_path / "asker.py"
    script.write_text(textwrap.dedent(ASKER), encoding="utf-8")
    os.chmod(tmp_path, 0o755)
    os.chmod(script, 0o644)
    return str(script)


@pytest.fixture
def launched(kernel):
    kids: list[capbus.Child] = []
    yield kids
    for c in kids:
        c.kill()
        try:
            c.wait(10)
        except capbus.Timeout:
            pass


def test_query_follows_every_page(kernel):
    """450 services are more than two pages of 200: every one comes back, once."""
    with capbus.connect(kernel.socket_path) as me:
        names = [f"test.query.s{i:03d}" for i in range(450)]
        for n in names:
            me.register(n)
        rows = me.query("services", timeout=10)
        mine = [r["name"] for r in rows if r["id"] == me.id]
        assert sorted(mine) == names
        procs = me.query("processes")
        assert [r["id"] for r in procs] == [me.id]
        caps = me.query("caps", me.id)
        assert len(caps) >= 450  # a service capability for each name
        # the CLI's helper is the same query on a connection of its own
        assert {r["name"] for r in cli_query.rows(kernel.socket_path, "services")} >= set(names)


def test_query_refuses_an_unknown_table(kernel):
    with capbus.connect(kernel.socket_path) as me, pytest.raises(ValueError, match="unknown query"):
        me.query("secrets")


@pytest.mark.parametrize("what", ["processes", "services", "channels"])
def test_a_lookup_listed_process_may_not_query(kernel, asker, launched, what):
    child = kernel.spawn([sys.executable, asker, what], lookup=[])
    launched.append(child)
    assert child.wait(30) == 0  # PermissionDenied, said by the kernel
    plain = kernel.spawn([sys.executable, asker, "processes"])
    launched.append(plain)
    assert plain.wait(30) == 3  # the same script, unrestricted, reads the table


def test_a_sandboxed_process_may_not_query(kernel, asker, launched):
    available = capbus.Sandbox.available()
    try:
        capbus.Sandbox().check(available)
    except capbus.SandboxError as exc:
        pytest.skip(f"this Linux cannot enforce a sandbox: {exc}")
    child = kernel.spawn([sys.executable, asker, "processes"], sandbox=capbus.Sandbox())
    launched.append(child)
    assert child.wait(30) == 0


def test_bad_arguments_get_clear_errors_and_leave_the_connection_usable(kernel):
    with capbus.connect(kernel.socket_path) as me:
        for what, process_id in [("caps", -1), ("caps", 1 << 64), ("x" * 100_000, 0), (None, 0)]:
            with pytest.raises(capbus.ProtocolError, match="Query"):  # refused before it is sent
                me.query(what, process_id)
        with pytest.raises(capbus.ProcessNotFound):
            me.query("caps", 999_999)
        assert [r["id"] for r in me.query("processes")] == [me.id]
