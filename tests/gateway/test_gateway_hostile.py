"""Hostile Zenoh peers on a gateway's key space: garbage, forged, expired, revoked and
wrong-service tokens crash nothing and reach no service; revocation cuts a peer off at once;
TLS with mutual authentication (certificates made here) admits only a peer with a certificate
of the CA. The gateways run in this process here (the test revokes through the API)."""

from __future__ import annotations

import datetime
import json
import os
import threading
import time

import pytest
from _gwutil import free_port

import capbus

zenoh = pytest.importorskip("zenoh")
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from capbus._gateway import token as tok  # noqa: E402
from capbus._gateway import wire  # noqa: E402


class Counting:
    """A service that counts what reaches it (served on a thread of this process)."""

    def __init__(self, proc: capbus.Process, name: str) -> None:
        self.svc = proc.register(name)
        self.seen = 0
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        def handler(req):
            self.seen += 1
            return (1, req.data, b"ok")
        try:
            self.svc.serve(handler, poll=0.1)
        except capbus.IpcError:
            pass


@pytest.fixture
def world(sockdir):
    keyfile = os.path.join(sockdir, "b.pem")
    key = tok.new_key()
    with open(keyfile, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    ka = capbus.Kernel(os.path.join(sockdir, "a.sock"), audit=False)
    kb = capbus.Kernel(os.path.join(sockdir, "b.sock"), audit=False)
    pb = capbus.connect(os.path.join(sockdir, "b.sock"))
    kv = Counting(pb, "kv")
    port = free_port()
    gb = capbus.Gateway(os.path.join(sockdir, "b.sock"), name="host-b",
                        listen=[f"tcp/127.0.0.1:{port}"], export=["kv"],
                        config={"key": keyfile}, lease=1.0).start()
    ga = capbus.Gateway(os.path.join(sockdir, "a.sock"), name="host-a",
                        connect=[f"tcp/127.0.0.1:{port}"], lease=1.0).start()
    pa = capbus.connect(os.path.join(sockdir, "a.sock"))
    yield {"key": key, "port": port, "ga": ga, "gb": gb, "pa": pa, "kv": kv}
    for x in (pa, ga, gb, pb):
        x.close() if hasattr(x, "close") else x.stop()
    ka.stop()
    kb.stop()


def _raw_session(port: int):
    c = zenoh.Config()
    c.insert_json5("mode", '"peer"')
    c.insert_json5("scouting/multicast/enabled", "false")
    c.insert_json5("transport/shared_memory/enabled", "false")
    c.insert_json5("connect/endpoints", json.dumps([f"tcp/127.0.0.1:{port}"]))
    return zenoh.open(c)


def _ask(s, what: str, payload: bytes, attachment: bytes | None) -> list[tuple[str, bytes]]:
    out = []
    for r in s.get(f"capbus/gw/host-b/{what}", payload=payload, attachment=attachment,
                   timeout=5.0):
        if r.ok is not None:
            out.append(("ok", r.ok.payload.to_bytes()))
        else:
            out.append(("err", r.err.payload.to_bytes()))
    return out


def _req(token: bytes, name: str = "kv") -> bytes:
    return wire.pack_request(wire.CALL, token, name.encode(), 1, 0, (0, 0, 0, 0), 1000, 99)


def _code(replies: list[tuple[str, bytes]]) -> int:
    assert len(replies) == 1 and replies[0][0] == "err", replies
    return wire.unpack_error(replies[0][1])[1]


def _issue(key, service="kv", ttl=60.0, issuer="host-b"):
    return tok.issue(key, issuer=issuer, holder="mallory", holder_key=b"\0" * 32, service=service,
                     rights=frozenset({"call"}), rate=0, bandwidth=0, max_message_size=0, ttl=ttl)


def test_garbage_and_forged_tokens_reach_no_service(world):
    ep = world["pa"].lookup("kv@host-b", timeout=10)
    assert ep.call(1, timeout=10).payload == b"ok"
    seen = world["kv"].seen
    s = _raw_session(world["port"])
    try:
        rnd = os.urandom
        for _ in range(50):  # random payloads and headers, and none
            _ask(s, "q", rnd(64), rnd(int.from_bytes(rnd(1), "little")))
            _ask(s, "q", rnd(100), None)
            _ask(s, "hello", rnd(200), rnd(8))
            _ask(s, "elsewhere", rnd(10), None)
        good_shape = _req(rnd(150))
        assert _code(_ask(s, "q", b"", good_shape)) == capbus.InvalidCapability.code
        forged, _ = _issue(tok.new_key())  # signed by someone else
        assert _code(_ask(s, "q", b"", _req(forged))) == capbus.InvalidCapability.code
        expired, _ = _issue(world["key"], ttl=-1)
        assert _code(_ask(s, "q", b"", _req(expired))) == capbus.InvalidCapability.code
        other, _ = _issue(world["key"], service="secret")
        assert _code(_ask(s, "q", b"", _req(other))) == capbus.PermissionDenied.code
        wrong_issuer, _ = _issue(world["key"], issuer="host-c")
        assert _code(_ask(s, "q", b"", _req(wrong_issuer))) == capbus.InvalidCapability.code
        tampered = bytearray(_issue(world["key"])[0])
        tampered[20] ^= 1
        assert _code(_ask(s, "q", b"", _req(bytes(tampered)))) == capbus.InvalidCapability.code
        assert world["kv"].seen == seen, "a bad request reached the service"
        # the control: a genuine token does reach it (so the refusals above are the checks')
        good, body = _issue(world["key"])
        assert _ask(s, "q", b"", _req(good))[0][0] == "ok"
        assert world["kv"].seen == seen + 1
        world["gb"].revoke(body.id.hex())
        assert _code(_ask(s, "q", b"", _req(good))) == capbus.InvalidCapability.code
    finally:
        s.close()
    assert ep.call(1, timeout=10).payload == b"ok"  # nobody else noticed anything
    assert world["gb"].stats()["refused"] > 0


def test_liveliness_flood_does_not_disturb_the_importer(world):
    ep = world["pa"].lookup("kv@host-b", timeout=10)
    s = _raw_session(world["port"])
    try:
        tokens = [s.liveliness().declare_token(f"capbus/gw/host-b/svc/{os.urandom(8).hex()}")
                  for _ in range(300)]
        tokens += [s.liveliness().declare_token(f"capbus/gw/evil{i}/alive") for i in range(20)]
        tokens += [s.liveliness().declare_token(f"capbus/gw/x/{'y/' * i}z") for i in range(20)]
        time.sleep(1.0)
        assert ep.call(1, timeout=10).payload == b"ok"
        for t in tokens:
            t.undeclare()
    finally:
        s.close()
    assert ep.call(1, timeout=10).payload == b"ok"
    assert world["ga"].imports() == ["kv@host-b"]


def test_revoking_a_peer_cuts_it_off_at_once(world):
    ep = world["pa"].lookup("kv@host-b", timeout=10)
    assert ep.call(1, timeout=10).payload == b"ok"
    ids = [t["id"] for t in world["gb"].tokens() if t["holder"] == "host-a"]
    assert ids
    world["gb"].revoke(ids[0])
    with pytest.raises(capbus.InvalidCapability):
        ep.call(1, timeout=10)
    world["gb"].revoke_peer("host-a")
    with pytest.raises(capbus.InvalidCapability):
        ep.call(1, timeout=10)


def test_token_limits_are_enforced_by_the_exporter(sockdir):
    ka = capbus.Kernel(os.path.join(sockdir, "a.sock"), audit=False)
    kb = capbus.Kernel(os.path.join(sockdir, "b.sock"), audit=False)
    pb = capbus.connect(os.path.join(sockdir, "b.sock"))
    Counting(pb, "kv")
    port = free_port()
    cfg = {"export": [{"name": "kv", "rights": ["call"], "rate_limit": 5,
                       "max_message_size": 1000}]}
    with capbus.Gateway(os.path.join(sockdir, "b.sock"), name="host-b", config=cfg,
                        listen=[f"tcp/127.0.0.1:{port}"], lease=1.0), \
            capbus.Gateway(os.path.join(sockdir, "a.sock"), name="host-a",
                           connect=[f"tcp/127.0.0.1:{port}"], lease=1.0):
        pa = capbus.connect(os.path.join(sockdir, "a.sock"))
        ep = pa.lookup("kv@host-b", timeout=10)
        with pytest.raises(capbus.MessageTooLarge):
            ep.call(1, (), b"x" * 2000, timeout=10)
        with pytest.raises(capbus.RateLimitExceeded):
            for _ in range(50):
                ep.call(1, timeout=10)
        pa.close()
    pb.close()
    ka.stop()
    kb.stop()


def test_peers_pinned_by_key(sockdir):
    ka = capbus.Kernel(os.path.join(sockdir, "a.sock"), audit=False)
    kb = capbus.Kernel(os.path.join(sockdir, "b.sock"), audit=False)
    pb = capbus.connect(os.path.join(sockdir, "b.sock"))
    Counting(pb, "kv")
    port = free_port()
    stranger = tok.public_text(tok.new_key())
    cfg = {"export": ["kv"], "peers": {"host-a": {"public_key": stranger}}}
    with capbus.Gateway(os.path.join(sockdir, "b.sock"), name="host-b", config=cfg,
                        listen=[f"tcp/127.0.0.1:{port}"], lease=1.0), \
            capbus.Gateway(os.path.join(sockdir, "a.sock"), name="host-a",
                           connect=[f"tcp/127.0.0.1:{port}"], lease=1.0):
        pa = capbus.connect(os.path.join(sockdir, "a.sock"))
        with pytest.raises(capbus.ServiceNotFound):  # host-a's real key is not the pinned one
            pa.lookup("kv@host-b", timeout=2)
        pa.close()
    pb.close()
    ka.stop()
    kb.stop()


def _certs(d: str) -> dict[str, str]:
    """A CA and one certificate (for 127.0.0.1 / localhost) signed by it, as PEM files."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "capbus test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"root_ca": os.path.join(d, "ca.pem"), "certificate": os.path.join(d, "cert.pem"),
             "private_key": os.path.join(d, "key.pem")}
    with open(paths["root_ca"], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths["certificate"], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths["private_key"], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths


def test_mutual_tls_between_gateways(sockdir):
    paths = _certs(sockdir)
    ka = capbus.Kernel(os.path.join(sockdir, "a.sock"), audit=False)
    kb = capbus.Kernel(os.path.join(sockdir, "b.sock"), audit=False)
    pb = capbus.connect(os.path.join(sockdir, "b.sock"))
    Counting(pb, "kv")
    port = free_port()
    tls = {"tls": {**paths, "mtls": True}}
    with capbus.Gateway(os.path.join(sockdir, "b.sock"), name="host-b", export=["kv"],
                        listen=[f"tls/127.0.0.1:{port}"], config=tls, lease=1.0), \
            capbus.Gateway(os.path.join(sockdir, "a.sock"), name="host-a",
                           connect=[f"tls/localhost:{port}"], config=tls, lease=1.0):
        pa = capbus.connect(os.path.join(sockdir, "a.sock"))
        assert pa.lookup("kv@host-b", timeout=10).call(1, timeout=10).payload == b"ok"
        # a peer without a certificate of the CA gets no session with host-b at all
        c = zenoh.Config()
        c.insert_json5("mode", '"peer"')
        c.insert_json5("scouting/multicast/enabled", "false")
        c.insert_json5("transport/shared_memory/enabled", "false")
        c.insert_json5("connect/endpoints", json.dumps([f"tls/localhost:{port}"]))
        c.insert_json5("transport/link/tls/root_ca_certificate", json.dumps(paths["root_ca"]))
        try:
            s = zenoh.open(c)
        except zenoh.ZError:
            s = None
        if s is not None:
            try:
                time.sleep(0.5)
                assert _ask(s, "hello", b"x", None) == []
            finally:
                s.close()
        pa.close()
    pb.close()
    ka.stop()
    kb.stop()
