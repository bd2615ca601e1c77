"""Wrong calls of the public API that the type checker must reject, each on a line marked with
the mypy error code it must report (`# E: <code>`). tests/test_typing.py runs mypy on this file
and expects exactly the marked lines, no more and no fewer. Never run, never collected.
"""

from __future__ import annotations

import abc

import capbus


class KV(capbus.Interface):
    @abc.abstractmethod
    def get(self, key: str) -> bytes: ...


def wrong(kernel: capbus.Kernel, proc: capbus.Process, ep: capbus.Endpoint,
          svc: capbus.Service) -> None:
    ep.call("get")  # E: arg-type
    # The core takes the data words as a tuple or list only (a range is a TypeError at run time).
    ep.call(1, range(4))  # E: arg-type
    ep.send_async(1, payload="text")  # E: arg-type
    ep.call(1, timeout_ns=5)  # E: call-arg
    req = svc.recv(timeout=1.0)
    text: str = req.payload  # E: assignment
    req.reply(1, data=(1,), timeout=1.0)  # E: call-arg
    svc.recv(timeout="soon")  # E: arg-type
    proc.register("store", max_caps="4")  # E: arg-type
    proc.register_package(max_capz=3)  # E: call-arg
    ep.restrict(["send"], rate=10)  # E: call-arg
    ep.unknown_method()  # E: attr-defined
    capbus.Kernel(policy=42)  # E: arg-type
    capbus.Sandbox(network="yes")  # E: arg-type
    kernel.spawn(["python3"], grants=["store"])  # E: arg-type
    kernel.spawn(["python3"], grants={"store": 5})  # E: dict-item
    opcode: str = ep.call(1).opcode  # E: assignment
    kv = proc.lookup("kv").proxy(KV)
    kv.get(1)  # E: arg-type
    name: str = kv.get("a")  # E: assignment
    kv.put("a", b"b")  # E: attr-defined
    proc.lookup("kv").proxy(int)  # E: type-var
    svc.serve_interface(object())  # E: arg-type
    print(text, opcode, name)
