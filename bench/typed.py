"""Typed calls (capbus.Interface): a proxy call with small Python arguments next to a plain
ep.call() and next to grpcio unary over a unix socket, all in the same run, as tables.

Each mechanism has its own server process; client and server are pinned to different CPUs where
there are two. The typed row pays the msgspec encode of the arguments, the decode and type check
on the server, the result's encode and decode; grpcio's server gets bytes (a generic handler,
no protoc) and the client encodes and decodes with msgspec too, so both carry the same values.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

from .capbus_calls import _pinned
from .results import METRIC_ROUND_TRIP, Result, percentile

_IFACE = '''
import capbus

class Calc(capbus.Interface):
    def add(self, a: int, b: int) -> int: ...

class CalcImpl(Calc):
    def add(self, a: int, b: int) -> int:
        return a + b
'''

_TYPED_SERVER = _IFACE + """
import os, sys
cpu = int(sys.argv[2])
if cpu >= 0:
    os.sched_setaffinity(0, {cpu})
svc = capbus.connect(wait=sys.argv[1]).register("calc")
print("ready", flush=True)
svc.serve_interface(CalcImpl())
"""

_PLAIN_SERVER = """
import os, sys, capbus
cpu = int(sys.argv[2])
if cpu >= 0:
    os.sched_setaffinity(0, {cpu})
svc = capbus.connect(wait=sys.argv[1]).register("plain")
print("ready", flush=True)
def serve(svc):
    while True:
        req = svc.recv()
        d = req.data
        req.reply(0, (d[0] + d[1],))
serve(svc)
"""

_GRPC_SERVER = """
import os, sys
from concurrent import futures
import grpc, msgspec
cpu = int(sys.argv[2])
if cpu >= 0:
    os.sched_setaffinity(0, {cpu})
dec, enc = msgspec.msgpack.Decoder(tuple[int, int]), msgspec.msgpack.Encoder()
def add(request, context):
    a, b = dec.decode(request)
    return enc.encode(a + b)
handler = grpc.method_handlers_generic_handler(
    "bench.Calc", {"Add": grpc.unary_unary_rpc_method_handler(add)})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port("unix:" + sys.argv[1])
server.start()
print("ready", flush=True)
server.wait_for_termination()
"""


@contextmanager
def _child(code: str, *args: str, env: dict[str, str] | None = None):
    child = subprocess.Popen([sys.executable, "-c", code, *args], env=env,
                             stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        if child.stdout is None or child.stdout.readline().strip() != "ready":
            raise RuntimeError("a bench server did not start")
        yield child
    finally:
        child.kill()
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()


def _cpus() -> tuple[int, int]:
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if len(cpus) > 1 else (cpus[0], cpus[0])


def _time(fn, n: int) -> list[int]:
    clock = time.perf_counter_ns
    samples = []
    append = samples.append
    for _ in range(n):
        t0 = clock()
        fn(1, 2)
        append(clock() - t0)
    return samples


def _row(mechanism: str, samples: list[int], note: str) -> Result:
    s = sorted(samples)
    return Result(mechanism, METRIC_ROUND_TRIP, percentile(s, 0.5) / 1000, percentile(s, 0.99) / 1000,
                  note=note, samples=len(s))


def capbus_rows(wait: str, n: int) -> list[Result]:
    """A plain call and a typed proxy call, in alternating rounds against their own servers."""
    import capbus

    ns: dict[str, object] = {}
    exec(_IFACE, ns)  # the same interface source the server runs
    calc_iface = ns["Calc"]
    server_cpu, client_cpu = _cpus()
    with tempfile.TemporaryDirectory(prefix="cb-bench-") as tmp:
        kernel = capbus.Kernel(os.path.join(tmp, "k.sock"), audit=None)
        env = dict(os.environ, CAPBUS_SOCKET=kernel.socket_path)
        try:
            with _child(_PLAIN_SERVER, wait, str(server_cpu), env=env), \
                    _child(_TYPED_SERVER, wait, str(server_cpu), env=env), \
                    capbus.connect(kernel.socket_path, wait=wait) as proc, _pinned(client_cpu):
                plain_ep = proc.lookup("plain", timeout=10)
                calc = proc.lookup("calc", timeout=10).proxy(calc_iface)

                def plain(a: int, b: int) -> int:
                    return plain_ep.call(1, (a, b)).data[0]

                typed = calc.add
                assert plain(1, 2) == 3 and typed(1, 2) == 3
                _time(plain, min(n, 5000))
                _time(typed, min(n, 5000))
                ps: list[int] = []
                ts: list[int] = []
                for _ in range(5):  # alternating rounds: both see the same machine
                    ps += _time(plain, n // 5)
                    ts += _time(typed, n // 5)
        finally:
            kernel.stop()
    where = "cross-CPU" if server_cpu != client_cpu else "same CPU"
    return [_row(f"capbus {wait} plain call", ps, f"ep.call(1, (a, b)), {where}, pinned"),
            _row(f"capbus {wait} typed call", ts, f"proxy.add(a, b) -> int, {where}, pinned")]


def grpc_row(n: int) -> Result:
    try:
        import grpc
        import msgspec
    except ImportError:
        return Result.skip("grpcio unary", METRIC_ROUND_TRIP, "grpcio not installed (pip install "
                           "'.[bench]')")
    server_cpu, client_cpu = _cpus()
    with tempfile.TemporaryDirectory(prefix="cb-bench-") as tmp:
        path = os.path.join(tmp, "grpc.sock")
        with _child(_GRPC_SERVER, path, str(server_cpu)), _pinned(client_cpu):
            channel = grpc.insecure_channel("unix:" + path)
            stub = channel.unary_unary("/bench.Calc/Add")
            enc, dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(int)

            def add(a: int, b: int) -> int:
                return dec.decode(stub(enc.encode((a, b)), timeout=10))

            assert add(1, 2) == 3
            _time(add, min(n, 500))
            samples = _time(add, n)
            channel.close()
    where = "cross-CPU" if server_cpu != client_cpu else "same CPU"
    return _row("grpcio unary", samples, f"unix socket, bytes + msgspec, {where}, pinned")


def run_typed(quick: bool = False) -> list[Result]:
    n = 2_000 if quick else 50_000
    # adaptive is connect()'s default; block sleeps in the kernel for every reply (as gRPC does).
    return (capbus_rows("spin", n) + capbus_rows("adaptive", n) + capbus_rows("block", n // 5)
            + [grpc_row(n // 10)])
