"""Capabilities (VeridianOS): rights, limits, derivation, delegation, revocation, policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from conftest import readline

import capbus

ECHO = """
import capbus, sys, time
p = capbus.connect()
svc = p.register(sys.argv[1])
print("ready", flush=True)
def handler(req):
    if req.opcode == 99:
        time.sleep(req.data[0] / 1000)
    return (req.opcode, req.data)
svc.serve(handler)
"""


@pytest.fixture
def echo(kernel, children):
    p = children.start(ECHO, "echo", stdin=subprocess.DEVNULL)
    assert readline(p) == "ready"
    return p


def test_rights_and_limits_are_visible(kernel, echo):
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("echo")
        assert ep.rights == {"send", "share"}
        assert ep.limits == capbus.Limits()
        weaker = ep.restrict(rights={"send"}, rate_limit=100, max_message_size=1024,
                             expires_in=30)
        assert weaker.rights == {"send"} and weaker.handle != ep.handle
        assert weaker.limits.rate == 100 and weaker.limits.max_message_size == 1024
        assert weaker.limits.expires_at > time.monotonic() + 20
        assert weaker.call(1, data=(5,), timeout=5).data[0] == 5


def test_restrict_never_widens(kernel, echo):
    with capbus.connect(kernel.socket_path) as me:
        weaker = me.lookup("echo").restrict(rights={"send"}, rate_limit=10, expires_in=60)
        with pytest.raises(capbus.PermissionDenied, match="widen"):
            weaker.restrict(rights={"send", "share"})
        with pytest.raises(capbus.PermissionDenied, match="rate"):
            weaker.restrict(rate_limit=1000)
        with pytest.raises(capbus.PermissionDenied, match="expiry"):
            weaker.restrict(expires_in=3600)
        with pytest.raises(ValueError, match="unknown rights"):
            weaker.restrict(rights={"fly"})
        assert weaker.restrict(rate_limit=5).limits.rate == 5


def test_stale_and_copied_handles_grant_nothing(kernel, echo, children):
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("echo")
        handle = ep.handle
        weaker = ep.restrict(rights={"send"})
        stale = weaker.handle
        weaker.close()
        from capbus._protocol import frames

        with pytest.raises(capbus.InvalidCapability):
            me._request(frames.Restrict(stale, None, {}))
        p = children.start(f"""
            import capbus
            from capbus._protocol import frames
            p = capbus.connect()
            try:
                p._request(frames.OpenChannel({handle}))
                print("granted")
            except capbus.InvalidCapability:
                print("invalid")
        """, stdin=subprocess.DEVNULL)
        assert readline(p) == "invalid"


def test_delegation_needs_share_and_arrives_as_caps(kernel, echo):
    with capbus.connect(kernel.socket_path) as a, capbus.connect(kernel.socket_path) as b:
        inbox = b.register("inbox")
        to_b = a.lookup("inbox")
        weaker = a.lookup("echo").restrict(rights={"send", "share"}, rate_limit=1000)
        box: dict = {}

        def receive():
            req = inbox.recv(timeout=5)
            box["caps"] = req.caps
            req.reply(0)

        t = threading.Thread(target=receive)
        t.start()
        to_b.call(1, caps=[weaker], timeout=5)
        t.join(5)
        (got,) = box["caps"]
        assert isinstance(got, capbus.Endpoint) and got.name == "echo"
        assert got.rights <= weaker.rights and got.limits.rate == 1000
        assert got.call(1, data=(3,), timeout=5).data[0] == 3  # B can use what A gave it
        no_share = a.lookup("echo").restrict(rights={"send"})
        with pytest.raises(capbus.PermissionDenied, match="share"):
            to_b.call(1, caps=[no_share], timeout=5)


def test_revoke_reaches_descendants_and_blocked_callers(kernel, echo):
    with capbus.connect(kernel.socket_path) as a, capbus.connect(kernel.socket_path) as b:
        inbox = b.register("inbox")
        weaker = a.lookup("echo").restrict(rights={"send", "share"})
        threading.Timer(0.05, lambda: a.lookup("inbox").call(1, caps=[weaker], timeout=5)).start()
        req = inbox.recv(timeout=5)
        req.reply(0)
        (theirs,) = req.caps
        grandchild = theirs.restrict(rights={"send"})
        assert grandchild.call(1, timeout=5).opcode == 1
        outcome: dict = {}

        def blocked():
            try:
                theirs.call(99, data=(3000,), timeout=10)
                outcome["r"] = "returned"
            except capbus.IpcError as exc:
                outcome["r"] = type(exc).__name__

        t = threading.Thread(target=blocked)
        t.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        weaker.revoke()
        t.join(5)
        assert outcome["r"] == "InvalidCapability"
        assert time.monotonic() - t0 < 1.0
        for ep in (theirs, grandchild):
            with pytest.raises(capbus.InvalidCapability):
                ep.call(1, timeout=2)
        with pytest.raises(capbus.InvalidCapability):
            weaker.call(1, timeout=2)


def test_rate_limit_fails_fast_in_the_library(kernel, echo):
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("echo").restrict(rate_limit=20)
        ok = 0
        with pytest.raises(capbus.RateLimitExceeded):
            for _ in range(1000):
                ep.call(1, timeout=5)
                ok += 1
        assert 15 <= ok <= 25  # one second of burst


def test_size_and_expiry_limits(kernel, echo):
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("echo")
        small = ep.restrict(max_message_size=100)
        small.call(1, payload=b"x" * 100, timeout=5)
        with pytest.raises(capbus.MessageTooLarge):
            small.call(1, payload=b"x" * 101, timeout=5)
        brief = ep.restrict(expires_in=0.3)
        brief.call(1, timeout=5)
        time.sleep(0.4)
        with pytest.raises(capbus.InvalidCapability, match="expired"):
            brief.call(1, timeout=5)


def test_service_default_limits(kernel):
    with capbus.connect(kernel.socket_path) as srv, capbus.connect(kernel.socket_path) as cli:
        srv.register("metered", limits={"rate_limit": 50, "max_message_size": 64})
        ep = cli.lookup("metered")
        assert ep.limits.rate == 50 and ep.limits.max_message_size == 64


def test_policy_on_lookup(sockdir):
    policy = capbus.Policy(lookup=lambda who, name: name != "secret")
    with capbus.Kernel(os.path.join(sockdir, "k.sock"), policy=policy) as k:
        with capbus.connect(k.socket_path) as a, capbus.connect(k.socket_path) as b:
            a.register("secret")
            a.register("public")
            b.lookup("public")
            with pytest.raises(capbus.PermissionDenied, match="policy"):
                b.lookup("secret")


def test_capbus_caps_lists_derivation(kernel, echo):
    with capbus.connect(kernel.socket_path) as me:
        ep = me.lookup("echo")
        weaker = ep.restrict(rights={"send"}, rate_limit=7)
        r = subprocess.run([sys.executable, "-m", "capbus", "caps", str(me.id), "--json",
                            "--socket", kernel.socket_path], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0, r.stderr
        rows = {row["handle"]: row for row in json.loads(r.stdout)}
        w = rows[f"{weaker.handle:#x}"]
        assert w["rights"] == ["send"] and w["limits"] == {"rate": 7}
        assert w["derives_from"].startswith(f"{ep.handle:#x}")
        r = subprocess.run([sys.executable, "-m", "capbus", "caps", str(me.id), "--socket",
                            kernel.socket_path], capture_output=True, text=True, timeout=30)
        assert "rate=7" in r.stdout and "DERIVES_FROM" in r.stdout


def test_audit_trail_of_a_kernel_survives_restart(sockdir):
    sock = os.path.join(sockdir, "k.sock")
    with capbus.Kernel(sock) as k:
        assert k.audit_path == os.path.join(sockdir, "audit.db")
        with capbus.connect(sock) as srv, capbus.connect(sock) as cli:
            srv.register("audited", allow=[cli.id])
            ep = cli.lookup("audited")
            weaker = ep.restrict(rights={"send"})
            weaker.revoke()
            with capbus.connect(sock) as stranger:
                with pytest.raises(capbus.PermissionDenied):
                    stranger.lookup("audited")
                denied_id = stranger.id
    with capbus.Kernel(sock), capbus.connect(sock) as p:  # a restarted kernel appends
        p.register("second-run")
    r = subprocess.run([sys.executable, "-m", "capbus", "audit", "--json", "--limit", "0",
                        "--socket", sock], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    events = [(row["event"], row["target"]) for row in rows]
    for expected in [("register", "audited"), ("grant", "audited"), ("restrict", "audited"),
                     ("revoke", "audited"), ("register", "second-run")]:
        assert expected in events, (expected, events)
    assert any(row["event"] == "denied" and row["process_id"] == denied_id for row in rows)
    assert sum(row["event"] == "kernel-start" for row in rows) == 2
    only = json.loads(subprocess.run(
        [sys.executable, "-m", "capbus", "audit", "--json", "--process", str(denied_id),
         "--socket", sock], capture_output=True, text=True, timeout=30).stdout)
    assert only and all(row["process_id"] == denied_id for row in only)
