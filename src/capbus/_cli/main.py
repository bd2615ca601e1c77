"""The `capbus` command: run a kernel, launch from a manifest, and look at a running system."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import __version__, _paths
from ._errors import IpcError


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(row: dict[str, Any], col: str) -> str:
        value = row.get(col)
        if col == "since" and isinstance(value, (int, float)):
            return time.strftime("%H:%M:%S", time.localtime(value))
        if isinstance(value, list):
            return ",".join(map(str, value)) or "-"
        return "-" if value is None or value == "" else str(value)

    cells = [[cell(r, c) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _query(socket_path: str | None, what: str, process_id: int = 0) -> list[dict[str, Any]]:
    from ._protocol import frames
    from ._runtime.process import connect

    rows: list[dict[str, Any]] = []
    with connect(socket_path) as proc:
        while True:
            reply = proc._request(frames.Query(what, len(rows), 200, process_id))
            assert isinstance(reply, frames.Rows)
            rows.extend(reply.rows)
            if not reply.rows or len(rows) >= reply.total:
                return rows


def cmd_kernel(args: argparse.Namespace) -> int:
    from ._kernel.kernel import Kernel
    from ._kernel.policy import Access, Policy, group_id

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
    from ._kernel import manifest
    from ._kernel.kernel import Kernel

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
    rows = _query(args.socket, "processes")
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(_table(rows, ("id", "pid", "uid", "package", "name", "services", "wait", "sandboxed",
                             "since")))
    return 0


def cmd_services(args: argparse.Namespace) -> int:
    rows = _query(args.socket, "services")
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(_table(rows, ("name", "kind", "id", "pid", "uid", "package", "since")))
    return 0


def cmd_caps(args: argparse.Namespace) -> int:
    # ID is a ProcessId; an OS pid is accepted too when it names exactly one connection.
    procs = _query(args.socket, "processes")
    ids = {r["id"] for r in procs}
    by_pid = [r["id"] for r in procs if r["pid"] == args.id]
    if args.id in ids:
        process_id = args.id
    elif len(by_pid) == 1:
        process_id = by_pid[0]
    else:
        print(f"capbus: no process {args.id} (ProcessId or pid; see capbus ps)", file=sys.stderr)
        return 1
    rows = _query(args.socket, "caps", process_id)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        r["limits"] = ",".join(f"{k}={v}" for k, v in r["limits"].items()) or "-"
    print(f"capabilities of process {process_id}")
    print(_table(rows, ("handle", "kind", "target", "serving_process", "rights", "limits",
                        "derives_from", "children")))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from . import _audit_cli

    return _audit_cli.run(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from . import _demo

    return _demo.main()


def cmd_bench(args: argparse.Namespace) -> int:
    from ._bench import main as bench_main

    return bench_main.main(args)


def cmd_stats(args: argparse.Namespace) -> int:
    from . import _top

    return _top.run_stats(args.socket, args.json, args.channels, args.sort)


def cmd_top(args: argparse.Namespace) -> int:
    from . import _top

    return _top.run_top(args.socket, args.interval, args.sort)


def cmd_sandbox_check(args: argparse.Namespace) -> int:
    from ._errors import SandboxError
    from ._kernel.sandbox import Sandbox

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


def cmd_metrics(args: argparse.Namespace) -> int:
    from . import _metrics

    return _metrics.serve(args.socket, args.serve, args.host, args.allow_remote)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="capbus", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the kernel does")
    parser.add_argument("--version", action="version", version=f"capbus {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_socket(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--socket", default=None,
                       help=f"kernel socket (default ${_paths.ENV_SOCKET} or {_paths.default_socket()})")
        return p

    p = with_socket(sub.add_parser("kernel", help="run the kernel as a daemon (SIGINT/SIGTERM stop it)"))
    p.add_argument("--policy", default=None, help="TOML policy file")
    p.add_argument("--allow-uid", action="append", default=[], type=int, metavar="UID",
                   help="also serve this uid (repeatable); opens the socket to other users, "
                        "who are then admitted or refused by their credentials")
    p.add_argument("--allow-group", action="append", default=[], metavar="GROUP",
                   help="also serve members of this group (name or gid; repeatable)")
    p.set_defaults(fn=cmd_kernel)
    p = with_socket(sub.add_parser("run", help="start a kernel and launch a manifest's processes"))
    p.add_argument("manifest")
    p.add_argument("--policy", default=None)
    p.set_defaults(fn=cmd_run)
    for name, fn, text in (("ps", cmd_ps, "list connected processes"),
                           ("services", cmd_services, "list registered services")):
        p = with_socket(sub.add_parser(name, help=text))
        p.add_argument("--json", action="store_true")
        p.set_defaults(fn=fn)
    p = with_socket(sub.add_parser("caps", help="a process's capabilities: rights, limits, derivation"))
    p.add_argument("id", type=int, help="ProcessId (or OS pid)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_caps)
    p = with_socket(sub.add_parser("audit", help="the kernel's audit trail"))
    p.add_argument("--db", default=None, help="audit log file (default: audit.db beside the socket)")
    p.add_argument("--since", default=None, help="age (30s, 10m, 2h, 1d) or ISO datetime / HH:MM")
    p.add_argument("--process", type=int, default=None, help="only this ProcessId")
    p.add_argument("--event", default=None, help="only this event (grant, denied, revoke, ...)")
    p.add_argument("--limit", type=int, default=1000, help="newest N events (0: all)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_audit)
    sub.add_parser("demo", help="the tour, on an embedded kernel").set_defaults(fn=cmd_demo)
    p = sub.add_parser("bench", help="benchmarks against the peers, printed as tables")
    p.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    p.add_argument("--only", default=None,
                   help="comma-separated: call,caps,async,large,scale,sandbox")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="also draw the tables as a chart")
    p.set_defaults(fn=cmd_bench)

    p = with_socket(sub.add_parser("stats", help="traffic, latency and refusals per service, "
                                                 "process and channel"))
    p.add_argument("--json", action="store_true")
    p.add_argument("--channels", action="store_true", help="also a table of every channel")
    p.add_argument("--sort", choices=("rate", "latency", "refused", "name"), default="name")
    p.set_defaults(fn=cmd_stats)
    p = with_socket(sub.add_parser("top", help="live view of traffic (keys: r l f n sort, q quit)"))
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.add_argument("--sort", choices=("rate", "latency", "refused", "name"), default="rate")
    p.set_defaults(fn=cmd_top)
    p = sub.add_parser("sandbox-check", help="what this Linux can enforce of a capbus.Sandbox")
    p.add_argument("--network", action="store_true", help="ask about network=True sandboxes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_sandbox_check)
    p = with_socket(sub.add_parser("metrics", help="serve the figures to Prometheus (/metrics)"))
    p.add_argument("--serve", type=int, required=True, metavar="PORT", help="TCP port (0: any free)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host")
    p.set_defaults(fn=cmd_metrics)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.fn(args)
    except IpcError as exc:
        print(f"capbus: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"capbus: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
