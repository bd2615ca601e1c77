"""`make demo` / `capbus demo`: a tour on an embedded kernel.

Three launched processes register, discover each other and watch each other's death; the
kernel launches one under a verified package; then one is killed with SIGKILL and the others
are told at once.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time

PEERS = ("alpha", "beta", "gamma")


def worker(name: str) -> int:
    import capbus

    proc = capbus.connect()
    proc.register(name)
    print(f"  [{name}] connected as process {proc.id}, registered {name!r}", flush=True)
    told = []
    for other in PEERS:
        if other != name:
            ep = proc.lookup(other, timeout=10)
            ep.on_death(lambda ep: (told.append(ep.name), print(
                f"  [{name}] told: {ep.name!r} (process {ep.process_id}) died", flush=True)))
    print(f"  [{name}] found {', '.join(p for p in PEERS if p != name)}", flush=True)
    sys.stdout.flush()
    deadline = time.monotonic() + 20
    while not told and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.close()
    return 0 if told else 1


def main() -> int:
    import capbus
    from capbus._cli import _table

    with tempfile.TemporaryDirectory() as tmp, capbus.Kernel(os.path.join(tmp, "k.sock")) as kernel:
        print(f"capbus demo: kernel embedded at {kernel.socket_path}\n")
        me = capbus.connect(kernel.socket_path)
        sub = me.subscribe_registrations()
        children = {
            name: kernel.spawn([sys.executable, "-m", "capbus._demo", name], name=name,
                               package=f"org.capbus.demo.{name}")
            for name in PEERS
        }
        for name in PEERS:
            ep = me.lookup(name, timeout=10)
            print(f"demo: discovered {name!r} -> process {ep.process_id}")
        print(f"demo: registration notice received: {sub.wait(1)} (it carries no identity)")
        time.sleep(0.5)  # let every worker finish its lookups before one dies
        print("\n" + _table(kernel.processes(), ("id", "pid", "package", "services", "wait")) + "\n")
        victim = children["beta"]
        print(f"demo: SIGKILL to beta (pid {victim.pid})")
        t0 = time.perf_counter()
        victim.kill(signal.SIGKILL)
        codes = {name: child.wait(20) for name, child in children.items()}
        print(f"\ndemo: survivors exited {codes['alpha']}, {codes['gamma']} "
              f"within {time.perf_counter() - t0:.3f} s; beta {codes['beta']}")
        try:
            me.lookup("beta")
        except capbus.ServiceNotFound as exc:
            print(f"demo: lookup('beta') -> ServiceNotFound: {exc}")
        me.close()
        ok = codes["alpha"] == 0 and codes["gamma"] == 0
        print("\ndemo: OK" if ok else "\ndemo: FAILED")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1]) if len(sys.argv) > 1 else main())
