"""The examples the README shows run as shown."""

from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_hello_example(sockdir):
    env = dict(os.environ, CAPBUS_SOCKET=os.path.join(sockdir, "k.sock"))
    r = subprocess.run([sys.executable, os.path.join(HERE, "..", "..", "examples", "hello.py")],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert "get('seven') = b'42'" in r.stdout and "rights: ['send'] rate: 100" in r.stdout
