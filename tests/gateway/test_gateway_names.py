"""The kernel keeps NAME@HOST names for gateways: an ordinary registration of one is refused,
whoever makes it; a process asking as a gateway is admitted only if the policy admits it (the
kernel's own user, root, or [gateways])."""

from __future__ import annotations

import os

import pytest
from _users import as_user, fresh_uid, need_root  # noqa: F401 - as_user is a fixture

import capbus
from capbus._kernel.policy import Gateways


def test_plain_process_cannot_serve_a_remote_name(kernel):
    with capbus.connect(kernel_path(kernel)) as p:
        with pytest.raises(capbus.PermissionDenied, match="only a gateway"):
            p.register("kv@host-b")
        svc = p.register("kv@host-b", gateway=True)  # the kernel's own user, asking as one
        with capbus.connect(kernel_path(kernel)) as q:
            assert q.lookup("kv@host-b").name == "kv@host-b"
        svc.close()
        p.register("plain", gateway=True).close()  # the flag changes nothing for other names


def kernel_path(kernel: capbus.Kernel) -> str:
    return kernel.socket_path


def test_policy_gateways_form():
    g = capbus.Policy.from_mapping({"gateways": {"uids": [1234], "packages": ["org.gw.*"]}}).gateways
    info = capbus.ProcessInfo(1, 1, 1234, 1234, None, None)
    assert g.allows(info, kernel_uid=999)
    assert not g.allows(capbus.ProcessInfo(1, 1, 4321, 1, None, None), kernel_uid=999)
    assert g.allows(capbus.ProcessInfo(1, 1, 4321, 1, "org.gw.x", None), kernel_uid=999)
    assert Gateways().allows(capbus.ProcessInfo(1, 1, 999, 1, None, None), kernel_uid=999)
    with pytest.raises(ValueError):
        capbus.Policy.from_mapping({"gateways": {"hosts": []}})


def _register_as_gateway(link, path: str, kernel_uid: int) -> None:
    with capbus.connect(path, kernel_uid=kernel_uid) as p:
        try:
            p.register("kv@host-b", gateway=True)
            result = "registered"
        except capbus.PermissionDenied as exc:
            result = f"refused: {exc}"
    link.send(result)


def test_other_user_is_no_gateway_unless_the_policy_says(sockdir, as_user):  # noqa: F811
    need_root()
    uid = fresh_uid()
    os.chmod(sockdir, 0o755)
    for admitted in (False, True):
        path = os.path.join(sockdir, f"k{admitted}", "k.sock")
        policy = capbus.Policy(access={"uids": [uid]},
                               gateways={"uids": [uid]} if admitted else None)
        k = capbus.Kernel(path, policy=policy, audit=False)
        try:
            got = as_user(uid, _register_as_gateway, path, os.geteuid()).recv(timeout=30)
        finally:
            k.stop()
        assert got.startswith("registered" if admitted else "refused"), got
