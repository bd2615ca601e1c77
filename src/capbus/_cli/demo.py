"""`make demo` / `capbus demo`: a tour of capbus on an embedded kernel.

A key-value service and a worker are launched by the kernel under verified packages; this
process discovers them, calls, streams one-way messages into an allowlisted inbox, hands over a
sealed shared-memory region, delegates a rate-limited capability and revokes it, watches a
process die, and ends with the traffic counters the kernel read from the channels.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time

KV = "org.capbus.demo.kv"
WORKER = "org.capbus.demo.worker"


def kv_service() -> int:
    """The launched key-value service: calls (get/put/sum) and an allowlisted async inbox."""
    import capbus

    proc = capbus.connect()
    store: dict[int, int] = {}
    svc = proc.register_package()
    inbox = proc.register("demo.inbox", allow=["package:org.capbus.demo.tour"])
    counted = [0]

    def drain() -> None:
        while True:
            counted[0] += len(inbox.recv_many(1024, timeout=1))

    threading.Thread(target=drain, daemon=True).start()

    def handle(req: capbus.Request) -> int | tuple[int, tuple[int, ...]]:
        op, key, value = req.opcode, req.data[0], req.data[1]
        if op == 1:  # put
            store[key] = value
            return 0
        if op == 2:  # get
            return (0, (store.get(key, 0),))
        if op == 3:  # how many inbox messages arrived
            return (0, (counted[0],))
        if op == 4:  # sum of a region of float64 (sealed by the sender: check once, trust it)
            (region,) = req.regions
            return (0, (int(sum(region.buffer.cast("d"))), int(region.sealed)))
        raise ValueError(f"unknown opcode {op}")

    svc.serve(handle)
    return 0


def worker() -> int:
    """Waits for a capability, calls with it until it is revoked, then says how it ended."""
    import capbus

    proc = capbus.connect()
    svc = proc.register_package()
    req = svc.recv(timeout=30)
    (kv,) = req.caps
    req.reply(0)
    calls = 0
    try:
        while True:
            kv.call(2, (7,), timeout=5)
            calls += 1
    except capbus.RateLimitExceeded:
        print(f"  [worker] {calls} calls, then RateLimitExceeded (its capability: "
              f"{kv.limits.rate}/s)", flush=True)
    time.sleep(1.2)  # a fresh second of tokens
    svc.recv(timeout=30).reply(0)  # the go-ahead after the revocation
    try:
        kv.call(2, (7,), timeout=5)
        print("  [worker] still works after revoke?!", flush=True)
    except capbus.InvalidCapability as exc:
        print(f"  [worker] after revoke: InvalidCapability ({exc})", flush=True)
    time.sleep(60)
    return 0


def main() -> int:
    import capbus

    from .fmt import table

    def step(text: str) -> None:
        print(f"\n== {text}")

    with tempfile.TemporaryDirectory() as tmp, capbus.Kernel(os.path.join(tmp, "k.sock")) as kernel:
        print(f"capbus demo: kernel embedded at {kernel.socket_path}")
        step("registries: the kernel launches two processes under verified packages")
        kv_child = kernel.spawn([sys.executable, "-m", "capbus._cli.demo", "kv"], name="kv", package=KV)
        w_child = kernel.spawn([sys.executable, "-m", "capbus._cli.demo", "worker"], name="worker",
                               package=WORKER)
        me = capbus.connect(kernel.socket_path)
        kv = me.lookup_package(KV, timeout=10)
        w = me.lookup_package(WORKER, timeout=10)
        print(f"  discovered {KV} -> process {kv.process_id}, {WORKER} -> process {w.process_id}")
        print("  " + table(kernel.processes(), ("id", "pid", "package", "services")).replace("\n", "\n  "))

        step("synchronous calls over shared memory")
        kv.call(1, (7, 42))
        t0 = time.perf_counter()
        n = 20_000
        for _ in range(n):
            kv.call(2, (7,))
        dt = time.perf_counter() - t0
        print(f"  put(7, 42); get(7) -> {kv.call(2, (7,)).data[0]}; {n} calls in {dt * 1000:.0f} ms "
              f"({dt / n * 1e6:.2f} us per round trip, wait='adaptive')")

        step("asynchronous mailbox with an allowlist")
        try:
            me.lookup("demo.inbox")
        except capbus.PermissionDenied as exc:
            print(f"  this process (no package) is refused at lookup: {exc}")
        sender = kernel.spawn([sys.executable, "-c", _SENDER], name="sender",
                              package="org.capbus.demo.tour")
        deadline = time.monotonic() + 30
        while kv.call(3).data[0] < 100_000 and time.monotonic() < deadline:
            time.sleep(0.01)
        print(f"  the allowlisted sender streamed 100,000 messages (send_many, 256 a batch); "
              f"the inbox counted {kv.call(3).data[0]}")

        step("shared memory regions: sealed, handed over, trusted without a copy")
        region = me.create_region(8 << 20)
        region.buffer.cast("d")[:] = memoryview(b"\0\0\0\0\0\0\xf0\x3f" * (1 << 20)).cast("d")
        region.seal_readonly()
        total, sealed = kv.call(4, regions=[region]).data[:2]
        print(f"  8 MiB of float64 ones, sealed={region.sealed}: kv sums {total} and sees "
              f"sealed={bool(sealed)}")

        step("capabilities: restrict, delegate, revoke")
        limited = kv.restrict(rights={"send"}, rate_limit=50)
        print(f"  derived: rights {sorted(limited.rights)}, rate {limited.limits.rate}/s "
              f"(from {sorted(kv.rights)})")
        shareable = kv.restrict(rate_limit=50)
        w.call(0, caps=[shareable], timeout=10)
        time.sleep(1.5)
        shareable.revoke()
        print("  revoked the delegated capability (and everything derived from it)")
        w.call(0, timeout=10)
        time.sleep(0.5)

        from .query import snapshot
        from .top import format_stats

        snap = snapshot(kernel.socket_path)  # before the death below takes channels with it

        step("death: the worker is killed, watchers are told at once")
        told = threading.Event()
        w.on_death(lambda ep: told.set())
        t0 = time.perf_counter()
        w_child.kill(signal.SIGKILL)
        told.wait(5)
        print(f"  on_death fired {1000 * (time.perf_counter() - t0):.1f} ms after SIGKILL; "
              f"lookup now: ", end="")
        try:
            me.lookup_package(WORKER)
        except capbus.ServiceNotFound:
            print("ServiceNotFound")

        step("what the kernel counted on the channels (capbus stats, read before the death)")
        print("  " + format_stats(snap, channels=True).replace("\n", "\n  "))
        me.close()
        for child in (kv_child, w_child, sender):
            child.kill()
            child.wait(10)
        print("\ndemo: OK")
        return 0


_SENDER = """
import capbus
p = capbus.connect()
ep = p.lookup("demo.inbox", timeout=10)
msgs = [(1, (i,)) for i in range(256)]
sent = 0
import time
while sent < 100_000:
    n = ep.send_many(msgs[: min(256, 100_000 - sent)])
    sent += n
    if n == 0:
        time.sleep(0.0002)  # back-pressure: the receiver is behind
time.sleep(60)  # stays, so that its channel is still there for the stats at the end
"""


if __name__ == "__main__":
    role = sys.argv[1] if len(sys.argv) > 1 else ""
    sys.exit(kv_service() if role == "kv" else worker() if role == "worker" else main())
