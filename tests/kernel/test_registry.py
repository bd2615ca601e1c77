"""Registries (Tock): names and packages, first come first served, policy filters."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest
from conftest import readline

import capbus


def test_register_lookup_and_name_taken(kernel):
    with capbus.connect(kernel.socket_path) as a, capbus.connect(kernel.socket_path) as b:
        svc = a.register("kv")
        assert svc.name == "kv"
        with pytest.raises(capbus.NameTaken, match="kv"):
            b.register("kv")
        ep = b.lookup("kv")
        assert ep.process_id == a.id and ep.name == "kv"
        assert b.lookup("kv") is ep  # one capability per service: a second lookup is the same
        svc.close()
        with pytest.raises(capbus.ServiceNotFound):
            b.lookup("kv")
        b.register("kv")  # free again


@pytest.mark.parametrize(
    "name, error",
    [("", ValueError), ("x" * 256, ValueError), ("é" * 128, ValueError), ("\0\0", ValueError),
     ("\ud800", ValueError), (b"kv", TypeError), (7, TypeError)],
)
def test_bad_names(kernel, name, error):
    with capbus.connect(kernel.socket_path) as p:
        with pytest.raises(error):
            p.register(name)
        with pytest.raises(error):
            p.lookup(name)


def test_edge_names_accepted(kernel):
    with capbus.connect(kernel.socket_path) as p:
        for name in ("x" * 255, "é" * 127, "a\0b", "\0x", "服务"):
            p.register(name)
            assert p.lookup(name).process_id == p.id


def test_lookup_waits_for_registration(kernel):
    with capbus.connect(kernel.socket_path) as a, capbus.connect(kernel.socket_path) as b:
        threading.Timer(0.2, lambda: a.register("late")).start()
        t0 = time.monotonic()
        ep = b.lookup("late", timeout=5)
        assert ep.process_id == a.id
        assert 0.15 < time.monotonic() - t0 < 2


def test_lookup_timeout_expires(kernel):
    with capbus.connect(kernel.socket_path) as p:
        t0 = time.monotonic()
        with pytest.raises(capbus.ServiceNotFound, match="within 200 ms"):
            p.lookup("never", timeout=0.2)
        assert time.monotonic() - t0 < 2


def test_package_registry_needs_verified_package(kernel, children):
    with capbus.connect(kernel.socket_path) as p:
        assert p.package is None
        with pytest.raises(capbus.PermissionDenied, match="no verified package"):
            p.register_package()
        child = kernel.spawn(
            [sys.executable, "-c",
             "import capbus,time; p=capbus.connect(); p.register_package(); time.sleep(60)"],
            package="org.example.kv",
        )
        ep = p.lookup_package("org.example.kv", timeout=10)
        assert ep.process_id == child.process_id
        # Nobody else can claim it: a second process launched with it finds it taken.
        other = kernel.spawn(
            [sys.executable, "-c",
             "import capbus; p=capbus.connect()\n"
             "try:\n    p.register_package()\nexcept capbus.NameTaken:\n    raise SystemExit(7)"],
            package="org.example.kv",
        )
        assert other.wait(20) == 7
        child.kill()
        child.wait(10)


def test_policy_callable_refuses(sockdir):
    def only_public(who: capbus.ProcessInfo, name: str) -> bool:
        return name.startswith("public.")

    with capbus.Kernel(os.path.join(sockdir, "k.sock"), policy=only_public) as k:
        with capbus.connect(k.socket_path) as p:
            p.register("public.kv")
            with pytest.raises(capbus.PermissionDenied, match="secret"):
                p.register("secret")


def test_policy_toml_rules_and_uid_package(sockdir):
    uid = os.getuid()
    path = os.path.join(sockdir, "policy.toml")
    with open(path, "w") as f:
        f.write(f"""
default_register = "allow"
[packages]
"{uid}" = "org.example.local"
[[register]]
name = "sys.*"
uids = [{uid + 1}]
[[register]]
name = "org.*"
packages = ["org.example.*"]
""")
    with capbus.Kernel(os.path.join(sockdir, "k.sock"), policy=path) as k:
        with capbus.connect(k.socket_path) as p:
            assert p.package == "org.example.local"  # mapped from our uid by the policy
            with pytest.raises(capbus.PermissionDenied):
                p.register("sys.clock")
            p.register("org.kv")
            p.register("anything")
            assert p.register_package().name == "org.example.local"


def test_policy_toml_errors(sockdir):
    path = os.path.join(sockdir, "bad.toml")
    with open(path, "w") as f:
        f.write("nonsense = 1\n")
    with pytest.raises(ValueError, match="unknown keys"):
        capbus.Policy.from_toml(path)
    with open(path, "w") as f:
        f.write("[[register]\n")
    with pytest.raises(ValueError, match="bad.toml"):
        capbus.Policy.from_toml(path)


def test_registrations_vanish_with_process(kernel, children):
    p = children.start("""
        import capbus, sys
        p = capbus.connect()
        p.register("ephemeral")
        print("ready", flush=True)
        sys.stdin.read()
    """, stdin=__import__("subprocess").PIPE)
    assert readline(p) == "ready"
    with capbus.connect(kernel.socket_path) as me:
        assert me.lookup("ephemeral").process_id
        p.kill()
        p.wait(5)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                me.lookup("ephemeral")
            except capbus.ServiceNotFound:
                break
            time.sleep(0.005)
        else:
            pytest.fail("registration survived its process")
