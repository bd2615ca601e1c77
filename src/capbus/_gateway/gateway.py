"""capbus.Gateway: this host's door to other hosts' capbus services, over Eclipse Zenoh.

To its local kernel a gateway is an ordinary process (it connects like anyone, and holds
capabilities like anyone); the kernel lets it, and only it, serve NAME@HOST names. It exports
the local services its `export` patterns match (export.py) and imports what other gateways
export to it (imports.py). docs/ARCHITECTURE.md ("Gateways") tells the life of a remote call.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import zenoh

from .._runtime.process import Process, connect
from .config import GatewayConfig, export_rule
from .export import ORIGIN_OPCODE, Exporter
from .imports import Importer
from .token import load_key, new_key, public_text
from .wire import check_host

log = logging.getLogger("capbus.gateway")


class Gateway:
    """A gateway named `name` (the HOST of NAME@HOST), listening on and connecting to Zenoh
    endpoints ("tcp/10.0.0.2:7447", "tls/host-b:7447"), exporting the local services whose
    names match `export` (names or globs) to the remote gateways the config allows. `config`: a
    TOML file's path or a dict (docs/ARCHITECTURE.md, "Gateways"); the arguments add to it.
    Use start()/stop(), or `with`."""

    def __init__(self, socket_path: str | None = None, name: str = "host-a",
                 listen: Sequence[str] = (), connect: Sequence[str] = (),
                 export: Sequence[str] = (), config: str | Mapping[str, Any] | None = None,
                 *, lease: float | None = None) -> None:
        cfg = GatewayConfig.load(config)
        if name != "host-a" or config is None or "name" not in (
                config if isinstance(config, Mapping) else {"name": cfg.name}):
            cfg.name = check_host(name)
        cfg.listen += list(listen)
        cfg.connect += list(connect)
        cfg.exports += [export_rule(e, "Gateway(export=...)") for e in export]
        if lease is not None:
            if lease <= 0:
                raise ValueError("lease is a positive number of seconds")
            cfg.lease_ms = max(100, int(lease * 1000))
        self.config = cfg
        self.name = cfg.name
        self.socket_path = socket_path
        self._key = load_key(cfg.key) if cfg.key else new_key()
        self.public_key = public_text(self._key)
        self._session: zenoh.Session | None = None
        self._proc: Process | None = None
        self._exporter: Exporter | None = None
        self._importer: Importer | None = None

    # ---- life --------------------------------------------------------------------------------

    def zenoh_config(self) -> zenoh.Config:
        """The Zenoh session's configuration: a peer, scouting off (only the endpoints given),
        the lease, TLS when configured."""
        c = self.config
        z = zenoh.Config()
        z.insert_json5("mode", '"peer"')
        z.insert_json5("scouting/multicast/enabled", "false")
        z.insert_json5("scouting/gossip/enabled", "false")
        # No Zenoh shared memory: gateways talk over the network, and a gateway killed with a
        # segment open would leave its file in /dev/shm.
        z.insert_json5("transport/shared_memory/enabled", "false")
        z.insert_json5("listen/endpoints", json.dumps(c.listen))
        z.insert_json5("connect/endpoints", json.dumps(c.connect))
        z.insert_json5("transport/link/tx/lease", str(c.lease_ms))
        z.insert_json5("transport/link/tx/keep_alive", "4")
        if c.tls is not None:
            t = c.tls
            z.insert_json5("transport/link/tls/root_ca_certificate", json.dumps(t.root_ca))
            if t.certificate and t.private_key:
                for side in ("listen", "connect"):
                    z.insert_json5(f"transport/link/tls/{side}_certificate",
                                   json.dumps(t.certificate))
                    z.insert_json5(f"transport/link/tls/{side}_private_key",
                                   json.dumps(t.private_key))
            z.insert_json5("transport/link/tls/enable_mtls", json.dumps(t.mtls))
        return z

    def start(self) -> Gateway:
        if self._session is not None:
            raise RuntimeError(f"gateway {self.name} is already started")
        self._proc = connect(self.socket_path)
        try:
            self._session = zenoh.open(self.zenoh_config())
            self._exporter = Exporter(self.config, self._session, self._proc, self._key,
                                      self.socket_path)
            self._exporter.start()
            self._importer = Importer(self.config, self._session, self._key, self.socket_path)
            self._importer.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop: the importers here see every export of this gateway die (liveliness), the
        local NAME@HOST services this gateway serves end (their callers: PeerDied)."""
        if self._importer is not None:
            self._importer.stop()
            self._importer = None
        if self._exporter is not None:
            self._exporter.stop()
            self._exporter = None
        if self._session is not None:
            try:
                self._session.close()
            except Exception:
                log.debug("zenoh session close", exc_info=True)
            self._session = None
        if self._proc is not None:
            self._proc.close()
            self._proc = None

    def __enter__(self) -> Gateway:
        return self.start() if self._session is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- what it holds -----------------------------------------------------------------------

    def imports(self) -> list[str]:
        """The NAME@HOST services this gateway serves locally now."""
        imp = self._importer
        return sorted(f"{n}@{p}" for p, n in (imp.imports if imp else {}))

    def topic_imports(self) -> list[str]:
        """The NAME@HOST topics this gateway publishes locally now."""
        imp = self._importer
        return sorted(f"{n}@{p}" for p, n in (imp.topics if imp else {}))

    def exports(self) -> list[str]:
        """The local services this gateway exports now."""
        return sorted(self._exporter.exported) if self._exporter else []

    def topic_exports(self) -> list[str]:
        """The local topics this gateway exports now."""
        return sorted(self._exporter.topics) if self._exporter else []

    def tokens(self) -> list[dict[str, Any]]:
        """The tokens this gateway issued (id in hex, holder, service, rights, expires)."""
        return list(self._exporter.issued.values()) if self._exporter else []

    def stats(self) -> dict[str, int]:
        """Counters: refused requests, dropped one-way messages, origins, imports, calls (remote
        calls in flight here, as the exporter), fast_calls (remote calls answered on Zenoh's
        thread, the fast path), handed_calls (calls started there whose slow reply the event
        loop awaited); for topics:
        topic_puts (samples put to Zenoh here: one per sample and importing gateway),
        topic_dropped (samples a slow link made the exported topics lose, drop-oldest),
        topic_imports, topic_lost (samples the exporters' sequence numbers say did not arrive
        here) and topic_bad (remote samples dropped here as malformed)."""
        e, i = self._exporter, self._importer
        ti = list(i.topics.values()) if i else []
        return {"refused": e.refused if e else 0, "dropped": e.dropped if e else 0,
                "origins": len(e.origins) if e else 0,
                "imports": len(i.imports) if i else 0,
                "send_refused": sum(x.refused for x in i.imports.values()) if i else 0,
                "calls": e.calls if e else 0,
                "fast_calls": e.fast if e else 0, "handed_calls": e.handed if e else 0,
                "topic_puts": e.puts if e else 0,
                "topic_dropped": e.topic_dropped() if e else 0,
                "topic_imports": len(ti), "topic_lost": sum(x.lost for x in ti),
                "topic_bad": sum(x.bad for x in ti)}

    def revoke(self, token_id: str) -> None:
        """Revoke a token this gateway issued (its id, hex): every request carrying it is
        refused from now on (InvalidCapability)."""
        self._need().revoke(bytes.fromhex(token_id))

    def revoke_peer(self, peer: str) -> None:
        """Cut the remote gateway `peer` off: all its tokens refused, its hellos too, its local
        stand-in connections closed."""
        self._need().revoke_peer(check_host(peer))

    def restore_peer(self, peer: str) -> None:
        """Let a cut-off gateway say hello again (its old tokens stay revoked by id only if
        revoked by id)."""
        self._need().verifier.restore_holder(peer)

    def _need(self) -> Exporter:
        if self._exporter is None:
            raise RuntimeError(f"gateway {self.name} is not started")
        return self._exporter

    @staticmethod
    def origin(proc: Process, sender: int, gateway: str, timeout: float = 5.0) -> dict[str, Any]:
        """For a service: the remote origin of a request whose `req.sender` is `sender`, asked of
        the local gateway `gateway`: {"gateway", "host" (the remote gateway), "process" (the
        caller's ProcessId there)}; ProcessNotFound if `sender` is no remote caller of it."""
        ep = proc.lookup(f"capbus.gateway@{check_host(gateway)}", timeout=timeout)
        reply = ep.call(ORIGIN_OPCODE, (sender,), timeout=timeout)
        found: dict[str, Any] = reply.object()
        return found
