"""The `capbus` command: run a kernel, launch from a manifest, and look at a running system.

This module is argparse and dispatch only: each verb's body lives in the module of its family
(admin, top, metrics, audit, demo), imported when the verb runs, so `capbus ps` does not load
rich or prometheus_client.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from .. import __version__, _paths
from .._errors import IpcError


def cmd_kernel(args: argparse.Namespace) -> int:
    from . import admin

    return admin.cmd_kernel(args)


def cmd_run(args: argparse.Namespace) -> int:
    from . import admin

    return admin.cmd_run(args)


def cmd_ps(args: argparse.Namespace) -> int:
    from . import admin

    return admin.cmd_ps(args)


def cmd_services(args: argparse.Namespace) -> int:
    from . import admin

    return admin.cmd_services(args)


def cmd_caps(args: argparse.Namespace) -> int:
    from . import admin

    return admin.cmd_caps(args)


def cmd_sandbox_check(args: argparse.Namespace) -> int:
    from . import admin

    return admin.cmd_sandbox_check(args)


def cmd_audit(args: argparse.Namespace) -> int:
    from . import audit

    return audit.run(args)


def cmd_gateway(args: argparse.Namespace) -> int:
    from . import gateway

    return gateway.run(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.main()


def cmd_stats(args: argparse.Namespace) -> int:
    from . import top

    return top.run_stats(args.socket, args.json, args.channels, args.sort)


def cmd_top(args: argparse.Namespace) -> int:
    from . import top

    return top.run_top(args.socket, args.interval, args.sort)


def cmd_metrics(args: argparse.Namespace) -> int:
    from . import metrics

    return metrics.serve(args.socket, args.serve, args.host, args.allow_remote)


def cmd_bench(args: argparse.Namespace) -> int:
    """The benchmarks are not part of the installed package (they start peers, compile C
    anchors and need optional libraries): they live in bench/ at the top of a clone. Run from
    there (the current directory), `capbus bench ARGS` is `python -m bench ARGS`, in this
    process; anywhere else it says where to find them. (It runs the code of the directory it
    is started in, as `python -m` does: only where that is a capbus clone.)"""
    here = os.getcwd()
    try:
        with open(os.path.join(here, "pyproject.toml"), encoding="utf-8") as f:
            clone = '\nname = "capbus"\n' in f.read()
    except OSError:
        clone = False
    if not (clone and os.path.isfile(os.path.join(here, "bench", "main.py"))):
        print("capbus bench: the benchmarks live in a clone of the capbus repository, not in the "
              "installed package: run `make bench` (or `python -m bench --help`) at its top",
              file=sys.stderr)
        return 2
    if here not in sys.path:
        sys.path.insert(0, here)
    from bench import main as bench_main

    return bench_main.main(args.rest)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="capbus", description=__doc__.split("\n\n")[0])
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
    # Its options belong to bench/ (python -m bench --help): everything after "bench" is its own.
    sub.add_parser("bench", add_help=False, help="from a clone of capbus: the benchmarks "
                   "(python -m bench; make bench)").set_defaults(fn=cmd_bench)

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
    p = with_socket(sub.add_parser(
        "gateway", help="export this host's services to other hosts' gateways and import "
        "theirs as NAME@HOST (Eclipse Zenoh; needs capbus[gateway]); SIGHUP reloads revoked"))
    p.add_argument("--name", default=None, help="this gateway's name: the HOST of NAME@HOST")
    p.add_argument("--listen", action="append", default=[], metavar="ENDPOINT",
                   help="a Zenoh endpoint to listen on, e.g. tcp/0.0.0.0:7447 (repeatable)")
    p.add_argument("--connect", action="append", default=[], metavar="ENDPOINT",
                   help="another gateway's Zenoh endpoint (repeatable)")
    p.add_argument("--export", action="append", default=[], metavar="NAME",
                   help="a local service name or glob to export (repeatable)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="TOML: rights and limits per export, peers and their keys, TLS, revoked")
    p.add_argument("--lease", type=float, default=None,
                   help="Zenoh lease in seconds: a lost link is noticed within it (default 10)")
    p.set_defaults(fn=cmd_gateway)

    args, rest = parser.parse_known_args(argv)
    if rest and args.fn is not cmd_bench:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        rc: int = args.fn(args)
        return rc
    except IpcError as exc:
        print(f"capbus: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"capbus: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
