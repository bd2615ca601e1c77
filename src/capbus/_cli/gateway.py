"""`capbus gateway`: run a gateway (capbus.Gateway) in the foreground until SIGINT/SIGTERM.

SIGHUP rereads the config file's `revoked` (token ids, hex) and `revoked_peers` (gateway
names) and applies them at once: the way to revoke from the command line is to add the id or
the name there and `kill -HUP` the gateway (token ids are in its log, one INFO line per token
issued). Revoking one token ends that token; the peer may say hello for a new one unless it is
cut off (revoked_peers, or left out of [peers]).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading

log = logging.getLogger("capbus.gateway")


def run(args: argparse.Namespace) -> int:
    try:
        from .. import _gateway
    except ImportError as exc:
        print(f"capbus gateway: {exc}")
        return 2
    from .._gateway.config import GatewayConfig

    kw = {"listen": args.listen, "connect": args.connect, "export": args.export,
          "config": args.config}
    if args.name:
        kw["name"] = args.name
    if args.lease:
        kw["lease"] = args.lease
    logging.getLogger("capbus.gateway").setLevel(logging.INFO)  # each token issued: its id
    gw = _gateway.Gateway(args.socket, **kw)
    done = threading.Event()
    reload = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: done.set())
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    def hup(*_: object) -> None:
        reload.set()
        done.set()

    signal.signal(signal.SIGHUP, hup)
    with gw:
        print(f"gateway {gw.name}: public key {gw.public_key}", flush=True)
        while True:
            done.wait()
            if not reload.is_set():
                break
            done.clear()
            reload.clear()
            if args.config:
                try:
                    cfg = GatewayConfig.load(args.config)
                except (OSError, ValueError) as exc:
                    log.warning("gateway %s: config not reloaded: %s", gw.name, exc)
                    continue
                for tid in cfg.revoked:
                    gw.revoke(tid.hex())
                for peer in cfg.revoked_peers:
                    gw.revoke_peer(peer)
                log.info("gateway %s: %d revoked token ids and %d cut-off peers applied",
                         gw.name, len(cfg.revoked), len(cfg.revoked_peers))
    return 0
