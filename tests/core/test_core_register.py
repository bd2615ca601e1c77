"""What capbus._core needs of the Python side is handed in, never looked up: the error classes and
the object codec through one _core.register() call at import, the up-calls of EndpointBase and
ServiceBase through their __init__. A missing or wrong piece fails at once, with a TypeError or
RuntimeError that says what to do, never as a crash or a call of the wrong thing later."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import capbus
from capbus import _core, _errors
from capbus._runtime import objects


def test_register_twice_is_refused():
    # The runtime registered at import; the classes are baked into every error raised since.
    with pytest.raises(RuntimeError, match="called already"):
        _core.register(errors=_errors, object_loads=objects.loads, object_pack=objects.pack)
    assert issubclass(_core.CorruptChannel, capbus.ProtocolError)


def test_an_unregistered_core_refuses_to_work():
    """The extension loaded alone (no capbus runtime imported): every type that can raise a capbus
    error refuses to be made; a bad registration changes nothing; a good one makes it work."""
    # In a child: the native state is per process, and there capbus's __init__ (which imports the
    # runtime, which registers) never runs.
    code = textwrap.dedent(r"""
        import importlib.machinery, importlib.util, sys, types, glob, os
        src = sys.argv[1]
        pkg = types.ModuleType("capbus")  # a bare package: its __init__ (the runtime) never runs
        pkg.__path__ = [src]
        sys.modules["capbus"] = pkg
        so = glob.glob(os.path.join(src, "_core*.so"))[0]
        loader = importlib.machinery.ExtensionFileLoader("capbus._core", so)
        spec = importlib.util.spec_from_file_location("capbus._core", so, loader=loader)
        core = importlib.util.module_from_spec(spec)
        loader.exec_module(core)
        out = []
        def attempt(name, fn):
            try:
                fn()
                out.append((name, "ok"))
            except Exception as exc:
                out.append((name, type(exc).__name__ + ": " + str(exc)))
        attempt("lane", lambda: core.Lane(0, 0, 0, 1, 256, 1 << 20))
        attempt("serverset", lambda: core.ServerSet(0))
        attempt("endpoint", lambda: core.EndpointBase())
        attempt("service", lambda: core.ServiceBase())
        attempt("corrupt", lambda: core.CorruptChannel)
        attempt("no_codec", lambda: core.register(errors=types.SimpleNamespace()))
        attempt("bad_errors", lambda: core.register(errors=types.SimpleNamespace(IpcError=ValueError),
                                                   object_loads=len, object_pack=len))
        attempt("not_classes", lambda: core.register(errors=types.SimpleNamespace(**{n: 1 for n in (
            "IpcError Timeout PeerDied InvalidCapability WouldBlock MessageTooLarge ProtocolError "
            "Cancelled PermissionDenied RateLimitExceeded KernelUnavailable NoReply").split()}),
            object_loads=len, object_pack=len))
        attempt("still_refused", lambda: core.ServerSet(0))
        for row in out:
            print(*row, sep=" | ")
    """)
    src = capbus.__path__[0]
    r = subprocess.run([sys.executable, "-c", code, src], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    got = dict(line.split(" | ", 1) for line in r.stdout.splitlines())
    for name in ("lane", "serverset", "endpoint", "service", "still_refused"):
        assert got[name].startswith("RuntimeError: capbus._core.register() has not been called"), got
    assert got["corrupt"].startswith("AttributeError"), got
    assert got["no_codec"].startswith("TypeError"), got
    assert got["bad_errors"].startswith("AttributeError"), got  # errors.Timeout is missing
    assert got["not_classes"].startswith("TypeError: errors.IpcError is not an exception class"), got


class _NoInit(_core.EndpointBase):
    def __init__(self) -> None:  # forgets super().__init__(...)
        self.handle = 1


class _NoInitService(_core.ServiceBase):
    def __init__(self) -> None:
        pass


def test_a_subclass_that_skips_the_base_init_gets_a_clear_error():
    ep = _NoInit()
    with pytest.raises(TypeError, match=r"super\(\).__init__"):
        ep.call(1)
    with pytest.raises(TypeError, match=r"super\(\).__init__"):
        ep.call(1, flags=0x10000)  # the slow path is not set either
    with pytest.raises(TypeError, match=r"super\(\).__init__"):
        ep.send_async(1, flags=0x10000)
    with pytest.raises(TypeError, match=r"super\(\).__init__"):
        _NoInitService().recv(0)  # no ServerSet: recv goes to the (unset) slow path


@pytest.mark.parametrize("kw", [
    {},
    dict(open_lane=len, slow_call=len, slow_send=len),  # one missing
    dict(open_lane=5, slow_call=len, slow_send=len, remote_error=len),  # not callable
])
def test_endpoint_base_needs_every_up_call(kw):
    with pytest.raises(TypeError):
        _core.EndpointBase(**kw)
    with pytest.raises(TypeError):
        _core.EndpointBase(len, len, len, len)  # keywords only: no order to get wrong


def test_service_base_needs_every_up_call():
    with pytest.raises(TypeError, match="claim"):
        _core.ServiceBase(slow_recv=len)
    with pytest.raises(TypeError, match="slow_recv"):
        _core.ServiceBase(slow_recv=None, claim=len)
    _core.ServiceBase(slow_recv=len, claim=len)


def test_the_runtime_hands_in_its_own_functions():
    """The up-calls are plain functions of the runtime's classes (called with the object first),
    so grep finds each one's single use at construction."""
    import inspect

    src = inspect.getsource(capbus.Endpoint.__init__)
    for name in ("open_lane=Endpoint._lane_for_thread", "slow_call=Endpoint._call_slow",
                 "slow_send=Endpoint._send_async_slow", "remote_error=Endpoint._remote_error"):
        assert name in src
    src = inspect.getsource(capbus.Service.__init__)
    assert "slow_recv=Service._recv_slow" in src and "claim=Service._claim" in src
