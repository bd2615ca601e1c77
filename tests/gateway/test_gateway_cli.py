"""`capbus gateway`: the CLI serves exports like the API, and SIGHUP applies the config file's
revoked token ids at once (the CLI way to revoke)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from _gwutil import Child, Hosts

import capbus

pytest.importorskip("zenoh")


def test_cli_gateway_exports_and_revokes_on_sighup(tmp_path):
    hosts = Hosts()
    cli = None
    try:
        hosts.service("host-b", "kv")
        conf = tmp_path / "gw.toml"
        conf.write_text('export = ["kv"]\nlease_ms = 1000\n')
        capbus_bin = shutil.which("capbus", path=os.path.dirname(sys.executable))
        assert capbus_bin, "the capbus command is not installed beside this Python"
        cli = subprocess.Popen(
            [capbus_bin, "gateway", "--socket", hosts.sock["host-b"], "--name", "host-b",
             "--listen", f"tcp/127.0.0.1:{hosts.port}", "--config", str(conf)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert cli.stdout is not None
        assert cli.stdout.readline().startswith("gateway host-b: public key ")
        hosts.gateway("host-a", connect=[f"tcp/127.0.0.1:{hosts.port}"])
        pa = hosts.connect("host-a")
        ep = pa.lookup("kv@host-b", timeout=15)
        assert ep.call(1, (), b"ab", timeout=10).payload == b"ba"
        # the token's id is in the gateway's log (one INFO line per token issued)
        assert cli.stderr is not None
        os.set_blocking(cli.stderr.fileno(), False)
        log = ""
        deadline = time.monotonic() + 10
        while "issued token" not in log and time.monotonic() < deadline:
            log += cli.stderr.read() or ""
            time.sleep(0.05)
        token_id = log.split("issued token ", 1)[1].split()[0]
        conf.write_text(f'export = ["kv"]\nlease_ms = 1000\nrevoked = ["{token_id}"]\n')
        cli.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:
            try:
                ep.call(1, timeout=10)
            except capbus.InvalidCapability:
                break
            assert time.monotonic() < deadline, "SIGHUP did not revoke the token"
            time.sleep(0.1)
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=15) == 0
    finally:
        if cli is not None and cli.poll() is None:
            cli.kill()
            cli.wait()
        hosts.close()


def test_cli_without_the_extra_names_it(tmp_path):
    # a Python where zenoh cannot be imported: the message names the extra
    code = ("import sys; sys.modules['zenoh'] = None\n"
            "from capbus._cli.main import main\n"
            "sys.exit(main(['gateway', '--name', 'x']))")
    c = Child(["-c", code], graceful=False)
    out = c.line()
    assert "capbus[gateway]" in out
