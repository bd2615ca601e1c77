"""Startup grants and lookup lists: a process can do what it was handed and nothing else.

Spawned children are real processes under a real kernel; each writes what it saw, one line per
step, to a file the test reads (with a timeout), and waits for a "go" file where the test must
act in between (revoke something).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import readline, wait_for

import capbus
from capbus._protocol import frames

# Prepended to every child's code: say() a line to the test, go() waits for the test's turn,
# outcome() names what a call raised.
CHILD = """
import capbus, os, sys, time
OUT = sys.argv[1]
def say(*a):
    with open(OUT, "a") as f:
        f.write(" ".join(map(str, a)) + "\\n")
def go(name, t=20):
    deadline = time.monotonic() + t
    while not os.path.exists(OUT + "." + name):
        if time.monotonic() > deadline:
            raise SystemExit(9)
        time.sleep(0.01)
def outcome(fn):
    try:
        r = fn()
    except Exception as e:
        return type(e).__name__
    return "ok" if r is None else f"ok:{r}"
"""

ECHO = """
import capbus, sys
p = capbus.connect()
svc = p.register(sys.argv[1])
print("ready", flush=True)
svc.serve(lambda req: (req.opcode, req.data))
"""


class Script:
    """A spawned child's output file: lines(n) waits until it holds n lines."""

    def __init__(self, path: str) -> None:
        self.path = path

    def lines(self, n: int, timeout: float = 20.0) -> list[str]:
        def have() -> bool:
            return os.path.exists(self.path) and len(self._read()) >= n

        if not wait_for(have, timeout):
            raise AssertionError(f"child wrote {self._read() if os.path.exists(self.path) else []}"
                                 f", expected {n} lines in {timeout} s")
        return self._read()[:n]

    def go(self, name: str) -> None:
        open(f"{self.path}.{name}", "w").close()

    def _read(self) -> list[str]:
        with open(self.path) as f:
            return f.read().splitlines()


@pytest.fixture
def spawn(kernel, tmp_path):
    """spawn(code, **spawn_kw) -> (Child, Script); every child is killed at teardown."""
    made = []

    def start(code: str, *, on=None, **kw):
        out = str(tmp_path / f"child{len(made)}.out")
        child = (on or kernel).spawn(
            [sys.executable, "-c", CHILD + textwrap.dedent(code), out], **kw)
        made.append(child)
        return child, Script(out)

    yield start
    for child in made:
        child.kill()
        with contextlib.suppress(capbus.IpcError):
            child.wait(10)


def _echo(children, name: str) -> subprocess.Popen:
    p = children.start(ECHO, name, stdin=subprocess.DEVNULL)
    assert readline(p) == "ready"
    return p


# ---- handed, and nothing else ------------------------------------------------------------------


def test_granted_child_calls_its_grant_and_looks_up_nothing(kernel, children, spawn):
    _echo(children, "kv")
    _echo(children, "other")
    child, out = spawn("""
        p = capbus.connect()
        say(sorted(p.grants), p.grants["db"].name, p.grants["db"].rights == {"send", "share"})
        say(p.grants["db"].call(1, data=(7,), timeout=5).data[0])
        say(outcome(lambda: p.lookup("kv")), outcome(lambda: p.lookup("other")),
            outcome(lambda: p.lookup_package("org.example.kv")))
        try:
            p.lookup("kv")
        except capbus.PermissionDenied as e:
            say("lookup list it was spawned with" in str(e))
        say(outcome(lambda: p.grants.__setitem__("x", 1)), outcome(lambda: p.grant("nope")))
    """, grants={"db": "kv"}, lookup=[])
    assert out.lines(5) == [
        "['db'] kv True",
        "7",
        "PermissionDenied PermissionDenied PermissionDenied",
        "True",
        "AttributeError KeyError",
    ]
    assert child.wait(20) == 0


def test_unrestricted_spawn_behaves_as_before(kernel, children, spawn):
    _echo(children, "kv")
    child, out = spawn("""
        p = capbus.connect()
        say(len(p.grants), dict(p.grants))
        say(p.lookup("kv").call(1, data=(3,), timeout=5).data[0])
    """)
    assert out.lines(2) == ["0 {}", "3"]
    assert child.wait(20) == 0


def test_restricted_rights_and_limits(kernel, children, spawn):
    _echo(children, "kv")
    child, out = spawn("""
        p = capbus.connect()
        db = p.grants["db"]
        say(sorted(db.rights), db.limits.rate)
        say(outcome(lambda: db.restrict(rights={"send", "share"})),
            outcome(lambda: db.restrict(rate_limit=1000)), db.call(1, timeout=5).opcode)
    """, grants={"db": {"service": "kv", "rights": {"send"}, "rate_limit": 50}}, lookup=[])
    assert out.lines(2) == ["['send'] 50", "PermissionDenied PermissionDenied 1"]
    assert child.wait(20) == 0


GRANDCHILD = """
import capbus, os
try:
    capbus.connect(os.environ["CAPBUS_SOCKET"]).lookup("kv")
    print("ok")
except Exception as e:
    print(type(e).__name__)
"""


def test_a_second_connection_by_path_is_as_restricted(kernel, children, spawn):
    """A restricted child that connects again by path (or whose own child does) is still
    restricted: the kernel knows the connecting pid's launched ancestor."""
    _echo(children, "kv")
    child, out = spawn(f"""
        import subprocess
        again = capbus.connect(os.environ["CAPBUS_SOCKET"])
        say(outcome(lambda: again.lookup("kv")), len(again.grants))
        r = subprocess.run([sys.executable, "-c", {GRANDCHILD!r}], capture_output=True,
                           text=True, timeout=30)
        say(r.stdout.strip())
    """, grants={"db": "kv"}, lookup=[])
    assert out.lines(2) == ["PermissionDenied 0", "PermissionDenied"]
    assert child.wait(30) == 0


def test_lookup_patterns_and_packages(kernel, children, spawn):
    _echo(children, "app.kv")
    _echo(children, "sys.secret")
    child, out = spawn("""
        p = capbus.connect()
        say(outcome(lambda: p.lookup("app.kv").name), outcome(lambda: p.lookup("sys.secret")),
            outcome(lambda: p.lookup_package("org.example.log")),
            outcome(lambda: p.lookup_package("org.evil.log")))
    """, lookup=["app.*", "package:org.example.*"])
    # org.example.log is allowed by the list but not registered: the list let it through
    assert out.lines(1) == ["ok:app.kv PermissionDenied ServiceNotFound PermissionDenied"]
    assert child.wait(20) == 0


# ---- revocation holds ----------------------------------------------------------------------------


def test_revoked_grant_is_gone_and_cannot_be_looked_up_again(kernel, children, spawn):
    _echo(children, "kv")
    child, out = spawn("""
        p = capbus.connect()
        db = p.grants["db"]
        say(db.call(1, data=(1,), timeout=5).data[0])
        go("revoked")
        say(outcome(lambda: db.call(1, timeout=5)))
        deadline = time.monotonic() + 10
        while "db" in p.grants and time.monotonic() < deadline:
            time.sleep(0.01)
        say("db" in p.grants, len(p.grants), outcome(lambda: p.grant("db")))
        try:
            p.lookup("kv")
        except capbus.PermissionDenied as e:
            say("revoked" in str(e))
    """, grants={"db": "kv"}, lookup=["kv"])
    assert out.lines(1) == ["1"]
    with pytest.raises(KeyError):
        child.revoke_grant("nope")
    child.revoke_grant("db")
    out.go("revoked")
    assert out.lines(4)[1:] == ["InvalidCapability", "False 0 KeyError", "True"]
    assert child.wait(20) == 0


def test_revoked_grant_stays_revoked_across_a_restart(kernel, children, spawn):
    _echo(children, "kv")
    child, out = spawn("""
        p = capbus.connect()
        say(sorted(p.grants), outcome(lambda: p.lookup("kv").name))
        go("again")
        raise SystemExit(3)
    """, grants={"db": "kv", "keep": "kv"}, lookup=["kv"], restart="on-failure", max_restarts=1)
    assert out.lines(1) == ["['db', 'keep'] ok:kv"]
    child.revoke_grant("db")
    out.go("again")
    # The restarted incarnation starts without the revoked grant, and may not look kv up
    assert out.lines(2)[1] == "['keep'] PermissionDenied"


def test_delegated_then_revoked_cap_cannot_be_looked_up_again(kernel, children, spawn):
    _echo(children, "kv")
    child, out = spawn("""
        p = capbus.connect()
        inbox = p.register("child.inbox")
        say("ready")
        req = inbox.recv(timeout=20)
        kv = req.caps[0].keep()
        req.reply(0)
        say(kv.call(1, data=(5,), timeout=5).data[0], sorted(kv.rights))
        go("revoked")
        say(outcome(lambda: kv.call(1, timeout=5)))
        say(outcome(lambda: p.lookup("kv")))
    """, lookup=["kv"])
    assert out.lines(1) == ["ready"]
    with capbus.connect(kernel.socket_path) as me:
        weaker = me.lookup("kv").restrict(rights={"send", "share"}, rate_limit=1000)
        me.lookup("child.inbox").call(1, caps=[weaker], timeout=10)
        assert out.lines(2)[1] == "5 ['send', 'share']"
        weaker.revoke()
        out.go("revoked")
        assert out.lines(4)[2:] == ["InvalidCapability", "PermissionDenied"]
    assert child.wait(20) == 0


def test_unrestricted_holder_may_look_up_after_a_revocation(kernel, children):
    _echo(children, "kv")
    with capbus.connect(kernel.socket_path) as a, capbus.connect(kernel.socket_path) as b:
        inbox = b.register("b.inbox")
        weaker = a.lookup("kv").restrict(rate_limit=1000)
        threading.Timer(0.05, lambda: a.lookup("b.inbox").call(1, caps=[weaker], timeout=5)).start()
        req = inbox.recv(timeout=5)
        (theirs,) = req.caps
        theirs.keep()
        req.reply(0)
        weaker.revoke()
        with pytest.raises(capbus.InvalidCapability):
            theirs.call(1, timeout=5)
        assert b.lookup("kv").call(1, data=(2,), timeout=5).data[0] == 2  # as before


# ---- a grant to a service that is not there yet --------------------------------------------------


def test_grant_of_a_service_registered_later(kernel, children, spawn):
    child, out = spawn("""
        p = capbus.connect()
        say("db" in p.grants, outcome(lambda: p.grants["db"]))
        ep = p.grant("db", timeout=20)
        say(ep.name, ep.call(1, data=(9,), timeout=5).data[0], p.grants["db"] is ep)
    """, grants={"db": "late"}, lookup=[])
    assert out.lines(1) == ["True ServiceNotFound"]
    _echo(children, "late")
    assert out.lines(2)[1] == "late 9 True"
    assert child.wait(20) == 0


def test_grant_waits_time_out(kernel, spawn):
    child, out = spawn("""
        p = capbus.connect()
        t = time.monotonic()
        say(outcome(lambda: p.grant("db", timeout=0.2)), time.monotonic() - t >= 0.15)
    """, grants={"db": "never"}, lookup=[])
    assert out.lines(1) == ["ServiceNotFound True"]
    assert child.wait(20) == 0


def test_grant_respects_the_services_allowlist(kernel, spawn):
    with capbus.connect(kernel.socket_path) as srv:
        srv.register("kv", allow=["uid:4242424"])
        child, out = spawn("""
            p = capbus.connect()
            say(outcome(lambda: p.grants["db"]))
        """, grants={"db": "kv"}, lookup=[])
        assert out.lines(1) == ["PermissionDenied"]
        assert child.wait(20) == 0


# ---- hostile values ------------------------------------------------------------------------------


@pytest.mark.parametrize("grants, match", [
    ({f"g{i}": "kv" for i in range(65)}, "at most 64"),
    ({"a b": "kv"}, "grant key"),
    ({"x" * 65: "kv"}, "grant key"),
    ({"db": ""}, "service name"),
    ({"db": {"service": "kv", "rights": ["receive"]}}, "rights"),
    ({"db": {"service": "kv", "rights": []}}, "rights"),
    ({"db": {"service": "kv", "rights": [["send"]]}}, "rights"),
    ({"db": {"service": "kv", "rights": "send"}}, "rights"),
    ({"db": {"service": "kv", "rate_limit": -1}}, "rate_limit"),
    ({"db": {"service": "kv", "rate_limit": 0}}, "rate_limit"),
    ({"db": {"service": "kv", "rate_limit": True}}, "rate_limit"),
    ({"db": {"service": "kv", "package": "org.x"}}, "either"),
    ({"db": {"service": "kv", "admin": True}}, "unknown"),
    ({"db": 5}, "service name"),
    (["kv"], "mapping"),
])
def test_spawn_refuses_bad_grants(kernel, grants, match):
    with pytest.raises(ValueError, match=match):
        kernel.spawn([sys.executable, "-c", "pass"], grants=grants)
    assert kernel.processes() == []  # nothing was launched


@pytest.mark.parametrize("lookup", ["kv", ["x" * 300], [5], ["k"] * 257])
def test_spawn_refuses_bad_lookup_lists(kernel, lookup):
    with pytest.raises((ValueError, TypeError)):
        kernel.spawn([sys.executable, "-c", "pass"], lookup=lookup)


def test_policy_and_spawn_grants_together_are_bounded(sockdir):
    policy = capbus.Policy(packages={"org.example.p": {"grants": {f"p{i}": "kv" for i in range(40)}}})
    with capbus.Kernel(os.path.join(sockdir, "k.sock"), policy, audit=False) as k:
        with pytest.raises(ValueError, match="at most 64"):
            k.spawn([sys.executable, "-c", "pass"], package="org.example.p",
                    grants={f"s{i}": "kv" for i in range(30)})
    with pytest.raises(ValueError, match="at most 64"):
        capbus.Policy(packages={"org.example.p": {"grants": {f"p{i}": "kv" for i in range(65)}}})
    with pytest.raises(ValueError, match="grants and lookup"):
        capbus.Policy(packages={"org.example.p": {"grant": {}}})


def _welcome(grants) -> bytes:
    """A Welcome frame with these rows, built by hand (encode would refuse the bad ones)."""
    import json
    body = json.dumps({"process_id": 1, "package": None, "pid": 1, "grants": grants}).encode()
    return frames.HEADER.pack(frames.MAGIC, frames.VERSION, frames.KIND_RESPONSE,
                              frames.Welcome.TYPE, 0, 1, len(body)) + body


def _row(key="db", handle=5, **kw):
    row = {"key": key, "handle": handle, "process_id": 2, "name": "kv", "rights": ["send"],
           "limits": {}}
    row.update(kw)
    return row


@pytest.mark.parametrize("rows", [
    [_row(f"k{i}") for i in range(65)],  # more than a process may hold
    [_row(), _row()],  # a key twice
    [_row(rights=["receive"])],  # a right no endpoint has
    [_row(rights=["send", "send"])],
    [_row(extra=1)],
    [{k: v for k, v in _row().items() if k != "limits"}],
    [_row(key="a b")],
    [_row(key="")],
    [_row(handle=0)],  # pending, yet it names a service
    [_row(handle=-1)],
    [_row(handle=1 << 64)],
    [_row(limits={"rate": -1})],
    [_row(limits={"admin": 1})],
    [_row(name=5)],
    ["db"],
    {"db": _row()},
])
def test_welcome_codec_refuses_hostile_grant_rows(rows):
    with pytest.raises(capbus.ProtocolError):
        frames.decode(_welcome(rows))
    if isinstance(rows, list):  # encode refuses what decode would
        with pytest.raises(capbus.ProtocolError):
            frames.encode(frames.Welcome(1, None, 1, rows), 1)


def test_welcome_codec_round_trips_grants():
    rows = [_row(f"k{i}") for i in range(64)] + []
    rows[3] = {"key": "k3", "handle": 0, "process_id": 0, "name": "", "rights": [], "limits": {}}
    msg, rid = frames.decode(frames.encode(frames.Welcome(1, "org.x", 7, rows), 9))
    assert msg.grants == rows and rid == 9
    # A Welcome of an earlier revision (no grants key) still decodes: no grants
    import json
    body = json.dumps({"process_id": 1, "package": None, "pid": 1}).encode()
    raw = frames.HEADER.pack(frames.MAGIC, frames.VERSION, frames.KIND_RESPONSE,
                             frames.Welcome.TYPE, 0, 1, len(body)) + body
    assert frames.decode(raw)[0].grants == []


def test_hostile_grant_requests(kernel):
    """A process with no grants asks for some anyway: an error for it, nothing else."""
    with capbus.connect(kernel.socket_path) as p:
        for key in ("db", "x" * 64):
            with pytest.raises(capbus.InvalidCapability, match="no grant"):
                p._request(frames.Grant(key, 0))
        with pytest.raises(capbus.InvalidCapability):
            p._request(frames.Grant("z" * 4000, 100))
        assert p.lookup  # the connection is still good
        p.register("still.here")


def test_64_grants_with_huge_names_fit_and_resolve(kernel, spawn):
    """64 grants whose service names each take ~1.5 KB of JSON: Welcome would not hold them all;
    those that do not fit arrive pending and resolve on first use."""
    names = [f"s{i:02d}" + "\x01" * 250 for i in range(64)]
    with capbus.connect(kernel.socket_path) as srv:
        svcs = [srv.register(n) for n in names]
        child, out = spawn("""
            p = capbus.connect()
            say(len(p.grants), sum(1 for k in p.grants if p._grants[k] is not None) < 64)
            say(sorted(p.grants[k].name[:3] for k in p.grants) == [f"s{i:02d}" for i in range(64)])
        """, grants={f"g{i}": n for i, n in enumerate(names)}, lookup=[])
        assert out.lines(2) == ["64 True", "True"]
        assert child.wait(20) == 0
        del svcs


# ---- manifests and the policy --------------------------------------------------------------------


def test_manifest_grants_and_lookup(tmp_path, sockdir):
    out = tmp_path / "client.out"
    (tmp_path / "kv.py").write_text(ECHO)
    (tmp_path / "client.py").write_text(CHILD + textwrap.dedent("""
        p = capbus.connect()
        ep = p.grant("db", timeout=20)
        say(sorted(p.grants), ep.call(1, data=(4,), timeout=5).data[0], sorted(ep.rights))
        say(outcome(lambda: p.lookup("kv")), outcome(lambda: p.lookup("log")))
    """))
    manifest = tmp_path / "app.toml"
    manifest.write_text(textwrap.dedent(f"""
        [[process]]
        argv = [{sys.executable!r}, "kv.py", "kv"]
        [[process]]
        argv = [{sys.executable!r}, "client.py", {str(out)!r}]
        grants = {{ db = {{ service = "kv", rights = ["send"] }} }}
        lookup = ["log"]
    """))
    from capbus._kernel import manifest as mf
    specs = mf.load(str(manifest))
    assert specs[1].lookup == ("log",) and specs[1].grants[0].rights == {"send"}
    assert specs[0].lookup is None and specs[0].grants == ()
    sock = os.path.join(sockdir, "run.sock")
    run = subprocess.Popen([sys.executable, "-m", "capbus", "run", str(manifest), "--socket", sock],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        script = Script(str(out))
        assert script.lines(2) == ["['db'] 4 ['send']", "PermissionDenied ServiceNotFound"]
    finally:
        run.send_signal(signal.SIGTERM)
        try:
            run.wait(15)
        except subprocess.TimeoutExpired:
            run.kill()
            run.wait(5)
        run.stderr.close()


@pytest.mark.parametrize("entry, match", [
    ('grants = { db = { service = "kv", rights = ["receive"] } }', "rights"),
    ('grants = "kv"', "mapping"),
    ('lookup = "kv"', "list"),
])
def test_manifest_refuses_bad_grants(tmp_path, entry, match):
    from capbus._kernel import manifest as mf
    path = tmp_path / "m.toml"
    path.write_text(f'argv = ["true"]\n{entry}\n')
    with pytest.raises(ValueError, match=match):
        mf.load(str(path))


def _policy_file(tmp_path, text: str) -> str:
    path = tmp_path / "policy.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_policy_package_grants_apply_to_spawned_and_uid_mapped(tmp_path, sockdir):
    uid = os.getuid()
    policy = _policy_file(tmp_path, f"""
        [packages]
        "{uid}" = "org.example.plugin"

        [package."org.example.plugin"]
        grants = {{ db = "kv", log = {{ service = "log", rights = ["send"] }} }}
        lookup = ["kv", "other"]
    """)
    with capbus.Kernel(os.path.join(sockdir, "k.sock"), policy, audit=False) as k:
        srv = capbus.connect(k.socket_path)  # mapped too: it may register, not look up freely
        kv = srv.register("kv")
        threading.Thread(target=kv.serve, args=(lambda r: (r.opcode, r.data),),
                         daemon=True).start()
        srv.register("other")
        srv.register("elsewhere")
        # A process mapped by uid (this one) gets the package's grants and lookup list
        with capbus.connect(k.socket_path) as me:
            assert me.package == "org.example.plugin" and sorted(me.grants) == ["db", "log"]
            assert me.grants["db"].call(1, data=(6,), timeout=5).data[0] == 6
            with pytest.raises(capbus.ServiceNotFound):
                me.grants["log"]
            assert me.lookup("other").name == "other"
            with pytest.raises(capbus.PermissionDenied, match="policy's lookup list"):
                me.lookup("elsewhere")
        # A spawned one: the union of grants (the policy's wins a shared key), the intersection
        # of lookup lists (each refusal names its list)
        script = str(tmp_path / "c.out")
        code = CHILD + textwrap.dedent("""
            p = capbus.connect()
            say(sorted(p.grants), p.grants["db"].name, p.grants["mine"].name)
            try:
                p.lookup("other")
            except capbus.PermissionDenied as e:
                say("spawned with" in str(e))
            try:
                p.lookup("elsewhere")
            except capbus.PermissionDenied as e:
                say("policy's lookup list" in str(e))
            say(p.lookup("kv").name)
        """)
        child = k.spawn([sys.executable, "-c", code, script], package="org.example.plugin",
                        grants={"db": "other", "mine": "other"}, lookup=["kv", "elsewhere"])
        assert Script(script).lines(4) == ["['db', 'log', 'mine'] kv other", "True", "True", "kv"]
        assert child.wait(20) == 0
        srv.close()


def test_policy_file_refuses_bad_package_tables(tmp_path):
    for text, match in [
        ('[package."org.x"]\ngrants = { db = 5 }\n', "service name"),
        ('[package."org.x"]\nlookup = "kv"\n', "list"),
        ('[package."org.x"]\nadmin = true\n', "grants and lookup"),
        ("package = 5\n", "package"),
    ]:
        with pytest.raises(ValueError, match=match):
            capbus.Policy.from_toml(_policy_file(tmp_path, text))


# ---- name:N entries ------------------------------------------------------------------------------


def test_name_entry_does_not_admit_a_squatter(kernel):
    """No policy reserves "friend": whoever registers it first is not admitted by name:friend."""
    with capbus.connect(kernel.socket_path) as rx, capbus.connect(kernel.socket_path) as squat:
        squat.register("friend")
        rx.register("inbox", allow=["name:friend"])
        with pytest.raises(capbus.PermissionDenied, match="allowlist"):
            squat.lookup("inbox")


def test_name_entry_admits_the_reserved_names_server(sockdir):
    me = os.getuid()
    policy = capbus.Policy.from_mapping({
        "register": [{"name": "friend", "packages": ["org.example.friend"]}],
    })
    assert policy.reserves("friend") and not policy.reserves("inbox")
    with capbus.Kernel(os.path.join(sockdir, "k.sock"), policy, audit=False) as k:
        with capbus.connect(k.socket_path) as rx, capbus.connect(k.socket_path) as squat:
            with pytest.raises(capbus.PermissionDenied):
                squat.register("friend")  # reserved: a squatter cannot take it
            svc = rx.register("inbox", allow=["name:friend"])
            code = textwrap.dedent("""
                import capbus, sys
                p = capbus.connect()
                p.register("friend")
                p.lookup("inbox").call(1, timeout=10)
            """)
            child = k.spawn([sys.executable, "-c", code], package="org.example.friend")
            req = svc.recv(timeout=20)
            assert req.sender == child.process_id
            req.reply(0)
            assert child.wait(20) == 0
            with pytest.raises(capbus.PermissionDenied):
                squat.lookup("inbox")
    del me


def test_waiting_grant_answered_when_its_process_goes(kernel, spawn):
    """A parked Grant request of a process that dies leaves nothing behind."""
    child, out = spawn("""
        p = capbus.connect()
        say("waiting")
        p.grant("db", timeout=60)
    """, grants={"db": "late"}, lookup=[])
    assert out.lines(1) == ["waiting"]
    time.sleep(0.2)
    child.kill()
    child.wait(10)
    with capbus.connect(kernel.socket_path) as srv:
        srv.register("late")  # nobody waits any more: nothing to answer
        assert [p["id"] for p in kernel.processes()] == [srv.id]


def test_restricted_process_may_not_list_the_kernels_tables(kernel, children, spawn):
    _echo(children, "kv")
    child, out = spawn("""
        p = capbus.connect()
        from capbus._protocol import frames
        say(outcome(lambda: p._request(frames.Query("services"))))
        say(p.grants["db"].call(1, timeout=5).opcode)
        go("listed")
    """, grants={"db": "kv"}, lookup=[])
    assert out.lines(2) == ["PermissionDenied", "1"]
    rows = [r for r in kernel.caps(child.process_id) if r["kind"] == "endpoint"]
    assert [(r["grant"], r["target"]) for r in rows] == [("db", "kv")]
    out.go("listed")
    assert child.wait(20) == 0


def test_reconnect_brings_policy_grants_back(sockdir):
    """A process connected by path with reconnect=True gets its package's grants again from
    the new kernel (a launched child has no path to reconnect to: its kernel is its parent)."""
    path = os.path.join(sockdir, "k.sock")
    policy = capbus.Policy(uid_packages={os.getuid(): "org.example.plugin"},
                           packages={"org.example.plugin": {"grants": {"db": "kv"}}})
    kernels = [capbus.Kernel(path, policy, audit=False)]
    try:
        srv = capbus.connect(path, reconnect=True)
        svc = srv.register("kv")
        threading.Thread(target=svc.serve, args=(lambda r: (r.opcode, r.data),),
                         daemon=True).start()
        cl = capbus.connect(path, reconnect=True)
        back = threading.Event()
        cl.on_reconnect(lambda proc: back.set())
        db = cl.grants["db"]
        assert db.call(1, data=(1,), timeout=5).data[0] == 1
        kernels[0].stop()
        kernels.append(capbus.Kernel(path, policy, audit=False))
        assert back.wait(20)
        # kv may come back after this process does: then the grant is asked for anew (a new
        # Endpoint; the old one is rebound only if Welcome already had it)
        ep = cl.grant("db", timeout=20)
        assert "db" in cl.grants and (ep is db or db._closed)
        assert wait_for(lambda: _calls(ep), 10)
        cl.close()
        srv.close()
    finally:
        for k in kernels:
            k.stop()


def _calls(ep) -> bool:
    try:
        return ep.call(1, data=(2,), timeout=2).data[0] == 2
    except capbus.IpcError:
        return False
