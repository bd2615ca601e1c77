"""Process identity: ids, credentials, spawn with a verified package, restarts, capbus run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

import capbus


def test_ids_are_nonzero_unique_and_per_connection(kernel):
    assert capbus.INVALID_PROCESS == 0
    procs = [capbus.connect(kernel.socket_path) for _ in range(5)]
    ids = [p.id for p in procs]
    assert all(i > 0 for i in ids) and len(set(ids)) == 5
    for p in procs:
        p.close()
    again = capbus.connect(kernel.socket_path)
    assert again.id not in ids  # never reused while the kernel runs
    rows = {r["id"]: r for r in kernel.processes()}
    assert rows[again.id]["pid"] == os.getpid()
    assert rows[again.id]["uid"] == os.getuid()
    again.close()


def test_connect_errors(sockdir):
    with pytest.raises(capbus.KernelUnavailable, match="no capbus kernel"):
        capbus.connect(os.path.join(sockdir, "nothing.sock"))
    with pytest.raises(ValueError, match="wait"):
        capbus.connect(os.path.join(sockdir, "nothing.sock"), wait="sometimes")


def test_capbus_socket_env(kernel, monkeypatch):
    monkeypatch.setenv("CAPBUS_SOCKET", kernel.socket_path)
    with capbus.connect(wait="spin") as p:
        assert p.id > 0


def test_spawn_output_and_identity(kernel, tmp_path):
    out = tmp_path / "out.txt"
    code = textwrap.dedent(f"""
        import capbus, os
        p = capbus.connect()
        q = capbus.connect()
        open({str(out)!r}, "w").write(f"{{p.id}} {{p.package}} {{q.package}} {{'CAPBUS_FD' in os.environ}}")
    """)
    child = kernel.spawn([sys.executable, "-c", code], package="org.example.probe")
    assert child.wait(20) == 0
    pid_, pkg, pkg2, leaked = out.read_text().split()
    assert int(pid_) == child.process_id
    assert pkg == "org.example.probe" and pkg2 == "None" and leaked == "False"


def test_restart_on_failure_gets_new_id(kernel, tmp_path):
    log = tmp_path / "ids"
    code = textwrap.dedent(f"""
        import capbus
        p = capbus.connect()
        with open({str(log)!r}, "a") as f:
            f.write(f"{{p.id}}\\n")
        raise SystemExit(3)
    """)
    child = kernel.spawn([sys.executable, "-c", code], restart="on-failure", max_restarts=2)
    assert child.wait(30) == 3
    ids = [int(x) for x in log.read_text().split()]
    assert len(ids) == 3 and len(set(ids)) == 3
    assert child.restarts == 2


def test_never_restart_and_kill(kernel):
    child = kernel.spawn([sys.executable, "-c", "import time; time.sleep(60)"], restart="on-failure")
    time.sleep(0.2)
    child.kill()
    assert child.wait(10) == -9
    assert child.restarts == 0
    with pytest.raises(ValueError):
        kernel.spawn([sys.executable], restart="always")


def test_capbus_run_manifest(sockdir, tmp_path):
    log = tmp_path / "runs"
    script = tmp_path / "svc.py"
    script.write_text(textwrap.dedent(f"""
        import capbus
        p = capbus.connect()
        with open({str(log)!r}, "a") as f:
            f.write(f"{{p.id}} {{p.package}}\\n")
        raise SystemExit(1)
    """))
    manifest = tmp_path / "app.toml"
    manifest.write_text(textwrap.dedent(f"""
        [[process]]
        name = "svc"
        argv = ["{sys.executable}", "svc.py"]
        package = "org.example.svc"
        restart = "on-failure"
        max_restarts = 2
    """))
    sock = os.path.join(sockdir, "run.sock")
    r = subprocess.run([sys.executable, "-m", "capbus", "run", str(manifest), "--socket", sock],
                       capture_output=True, text=True, timeout=60)
    assert "exited 1 after 2 restarts" in r.stdout, r.stdout + r.stderr
    lines = log.read_text().split("\n")[:-1]
    assert len(lines) == 3 and all(line.endswith("org.example.svc") for line in lines)
    assert len({line.split()[0] for line in lines}) == 3


def test_manifest_errors(tmp_path):
    from capbus._kernel import manifest

    bad = tmp_path / "bad.toml"
    bad.write_text('argv = "python x.py"\n')
    with pytest.raises(ValueError, match="list of strings"):
        manifest.load(str(bad))
    bad.write_text('argv = ["x"]\nrestart = "sometimes"\n')
    with pytest.raises(ValueError, match="restart"):
        manifest.load(str(bad))
