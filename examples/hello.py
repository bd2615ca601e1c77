"""The README's example: an embedded kernel, a launched typed key-value service, and calls.

The service (examples/kv_server.py) implements the interface of examples/kv_api.py.
"""

import os
import sys

import capbus
from kv_api import KV  # class KV(capbus.Interface): get(key: str) -> bytes, put, keys

SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kv_server.py")

with capbus.Kernel() as kernel:                                   # the kernel, in a thread
    kernel.spawn([sys.executable, SERVER], package="org.example.kv")
    me = capbus.connect(kernel.socket_path)                       # this process's identity
    ep = me.lookup_package("org.example.kv", timeout=5)           # an endpoint capability
    ep.on_death(lambda ep: print("kv is gone"))                   # told at once, however it ends
    kv = ep.proxy(KV)                                             # checked against the service's KV
    kv.put("seven", b"42")                                        # shared memory, no kernel
    print("get('seven') =", kv.get("seven"))                      # -> b'42'; kv.get(7): TypeError
    weaker = ep.restrict(rights={"send"}, rate_limit=100)         # a capability with less power
    print("rights:", sorted(weaker.rights), "rate:", weaker.limits.rate)
