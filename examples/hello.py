"""The README's example: an embedded kernel, a launched key-value service, and a call."""

import sys

import capbus

SERVER = """
import capbus
store = {}
svc = capbus.connect().register_package()      # its package is the one it was launched with
svc.serve(lambda req: store.setdefault(req.data[0], req.data[1]) if req.opcode == 1
          else (0, (store.get(req.data[0], 0),)))
"""

with capbus.Kernel() as kernel:                                   # the kernel, in a thread
    kernel.spawn([sys.executable, "-c", SERVER], package="org.example.kv")
    me = capbus.connect(kernel.socket_path)                       # this process's identity
    kv = me.lookup_package("org.example.kv", timeout=5)           # an endpoint capability
    kv.on_death(lambda ep: print("kv is gone"))                   # told at once, however it ends
    kv.call(1, data=(7, 42))                                      # put: shared memory, no kernel
    print("get(7) =", kv.call(2, data=(7,)).data[0])              # -> 42
    weaker = kv.restrict(rights={"send"}, rate_limit=100)         # a capability with less power
    print("rights:", sorted(weaker.rights), "rate:", weaker.limits.rate)
