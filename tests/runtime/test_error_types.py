"""capbus errors are the built-in exceptions Python users already catch (TimeoutError,
ConnectionError, BlockingIOError, PermissionError, TypeError), still IpcErrors with their codes,
and survive pickling and the trip across the wire; each is raised here for real, by a kernel
and a server process, and caught by its built-in class."""

from __future__ import annotations

import pickle
import subprocess
import time

import pytest
from conftest import readline

import capbus
from capbus._errors import ERRORS, error_from_code

BUILTIN = {
    capbus.Timeout: TimeoutError,
    capbus.PeerDied: ConnectionError,
    capbus.WouldBlock: BlockingIOError,
    capbus.PermissionDenied: PermissionError,
    capbus.InvalidArgument: TypeError,
}

SLOW = """
import capbus, sys, time
svc = capbus.connect().register(sys.argv[1])
print("ready", flush=True)
if sys.argv[2] == "idle":       # registered, never reads: its rings fill up
    time.sleep(60)
def handler(req):
    if req.opcode == 1:
        time.sleep(req.data[0] / 1000)
    if req.opcode == 2:
        raise KeyError("no such key")
    if req.opcode == 3:
        req.reply_error(42, "the application's own error")
    return 0
svc.serve(handler)
"""


def test_classes_and_codes():
    for cls, builtin in BUILTIN.items():
        exc = cls("what happened: what to do")
        assert isinstance(exc, builtin) and isinstance(exc, capbus.IpcError)
        assert str(exc) == "what happened: what to do" and exc.args == ("what happened: what to do",)
        assert ERRORS[cls.code] is cls
    assert issubclass(capbus.InterfaceMismatch, capbus.ProtocolError)
    assert isinstance(capbus.Timeout("x"), OSError) and capbus.Timeout("x").errno is None
    # Every code travels and comes back as its class, message intact, and pickles.
    for code, cls in ERRORS.items():
        exc = error_from_code(code, "msg")
        assert type(exc) is cls and str(exc) == "msg"
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is cls and str(back) == "msg"
    r = pickle.loads(pickle.dumps(capbus.RemoteError(None, "boom", "KeyError", "svc")))
    assert (r.code, r.text, r.remote_type) == (None, "boom", "KeyError")
    r = pickle.loads(pickle.dumps(capbus.RemoteError(42, "app")))
    assert (r.code, r.text, r.remote_type) == (42, "app", None)


@pytest.fixture
def me(kernel):
    p = capbus.connect(kernel.socket_path)
    yield p
    p.close()


def _server(children, name: str, mode: str = "serve") -> subprocess.Popen:
    p = children.start(SLOW, name, mode, stdin=subprocess.DEVNULL)
    assert readline(p, 20) == "ready"
    return p


def test_real_errors_are_builtin_kinds(children, me):
    p = _server(children, "slow")
    ep = me.lookup("slow", timeout=10)
    # A timeout is a TimeoutError, and says its timeout in seconds.
    with pytest.raises(TimeoutError, match=r"no reply within 0\.05 s") as ti:
        ep.call(1, (2000,), timeout=0.05)
    assert isinstance(ti.value, capbus.Timeout)
    # Remote errors still arrive as RemoteError with their code / remote type.
    with pytest.raises(capbus.RemoteError) as ri:
        ep.call(2, timeout=10)
    assert ri.value.remote_type == "KeyError" and ri.value.code is None
    with pytest.raises(capbus.RemoteError) as ri:
        ep.call(3, timeout=10)
    assert ri.value.code == 42 and ri.value.text == "the application's own error"
    assert ep.call(0, timeout=10).opcode == 0  # and the server goes on
    # A capability without the right to send: PermissionError.
    with pytest.raises(PermissionError):
        ep.restrict(rights={"send"}).restrict(rights={"send", "share"})
    # The server dies while we wait: ConnectionError.
    started = time.monotonic()
    p.kill()
    with pytest.raises(ConnectionError) as di:
        for _ in range(1000):  # the death may come before or during a call
            ep.call(1, (100,), timeout=10)
    assert isinstance(di.value, capbus.PeerDied) and time.monotonic() - started < 10


def test_would_block_is_blocking_io_error(children, me):
    _server(children, "idle", "idle")
    ep = me.lookup("idle", timeout=10)
    with pytest.raises(BlockingIOError) as wi:
        for _ in range(100000):
            ep.send_async(1, (1,))
    assert isinstance(wi.value, capbus.WouldBlock)
