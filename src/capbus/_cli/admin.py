"""The administrative verbs: `capbus kernel` (the daemon), `run` (a manifest), `ps`, `services`,
`caps` (the kernel's tables, read through query.py) and `sandbox-check`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from .._layout import PRIO_CTRL_BIAS
from . import query
from .fmt import table


def cmd_kernel(args: argparse.Namespace) -> int:
    from .._kernel.kernel import Kernel
    from .._kernel.policy import Access, Policy, group_id

    policy = Policy.coerce(args.policy)
    if args.allow_uid or args.allow_group:  # added to the policy's [access]
        policy.access = Access(
            policy.access.uids | {int(u) for u in args.allow_uid},
            policy.access.groups | {group_id(g, "--allow-group") for g in args.allow_group})
    kernel = Kernel(args.socket, policy, start=False)
    print(f"capbus kernel serving {kernel.socket_path} (pid {os.getpid()})", flush=True)
    kernel.serve_forever()
    print("capbus kernel stopped", flush=True)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .._kernel import manifest
    from .._kernel.kernel import Kernel

    specs = manifest.load(args.manifest)
    for spec in specs:  # every sandbox enforceable before any process starts
        if spec.sandbox is not None:
            spec.sandbox.check()
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)
    with Kernel(args.socket, args.policy) as kernel:
        print(f"capbus run: kernel at {kernel.socket_path}", flush=True)
        children = [
            kernel.spawn(s.argv, name=s.name, package=s.package, env=s.env, restart=s.restart,
                         max_restarts=s.max_restarts, cwd=s.cwd, sandbox=s.sandbox,
                         grants={g.key: g for g in s.grants},
                         # no lookup key in the manifest: spawn's default (TOML has no None)
                         **({"lookup": s.lookup} if s.lookup is not None else {}))
            for s in specs
        ]
        codes: dict[int, int] = {}
        while not stop and len(codes) < len(children):
            for i, child in enumerate(children):
                if i not in codes and child.returncode is not None:
                    codes[i] = child.returncode
                    print(f"capbus run: {child.spec.name or child.spec.argv[0]} exited "
                          f"{child.returncode} after {child.restarts} restarts", flush=True)
            time.sleep(0.05)
    return max((abs(c) for c in codes.values()), default=0) if not stop else 130


def cmd_ps(args: argparse.Namespace) -> int:
    rows = query.rows(args.socket, "processes")
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(table(rows, ("id", "pid", "uid", "package", "name", "services", "wait", "sandboxed",
                             "since")))
    return 0


def cmd_services(args: argparse.Namespace) -> int:
    rows = query.rows(args.socket, "services")
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(table(rows, ("name", "kind", "id", "pid", "uid", "package", "since")))
    return 0


def cmd_caps(args: argparse.Namespace) -> int:
    # ID is a ProcessId; an OS pid is accepted too when it names exactly one connection.
    procs = query.rows(args.socket, "processes")
    ids = {r["id"] for r in procs}
    by_pid = [r["id"] for r in procs if r["pid"] == args.id]
    if args.id in ids:
        process_id = args.id
    elif len(by_pid) == 1:
        process_id = by_pid[0]
    else:
        print(f"capbus: no process {args.id} (ProcessId or pid; see capbus ps)", file=sys.stderr)
        return 1
    rows = query.rows(args.socket, "caps", process_id)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:  # max_priority travels biased (every wire value is a u64): print the priority
        r["limits"] = ",".join(f"{k}={v - PRIO_CTRL_BIAS if k == 'max_priority' else v}"
                               for k, v in r["limits"].items()) or "-"
    print(f"capabilities of process {process_id}")
    print(table(rows, ("handle", "kind", "target", "serving_process", "rights", "limits",
                        "derives_from", "children")))
    return 0


def cmd_sandbox_check(args: argparse.Namespace) -> int:
    from .._errors import SandboxError
    from .._kernel.sandbox import Sandbox

    avail = Sandbox.available()
    try:
        Sandbox(network=args.network).check(avail)
        verdict = "a sandbox can be enforced here"
    except SandboxError as exc:
        verdict = f"a sandbox cannot be enforced here: {exc}"
    if args.json:
        print(json.dumps(dict(avail, ok=verdict.startswith("a sandbox can"), verdict=verdict)))
    else:
        for key, value in avail.items():
            print(f"{key:13} {value}")
        print(verdict)
    return 0 if verdict.startswith("a sandbox can") else 1
