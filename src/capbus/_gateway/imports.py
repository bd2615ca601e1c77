"""The import side of a gateway: remote services as local NAME@HOST services.

It watches the liveliness of every gateway (`capbus/gw/*/alive`, `.../svc/*`): a gateway that
appears is greeted (a hello signed with this gateway's key); its answer lists the exports this
gateway may have, each with the token its owner signed. Each import is a local connection of its
own that registers NAME@HOST as a gateway (the kernel admits it, see docs/POLICY.md), so that
the import's end is a process's end to its local clients: when the remote service's liveliness
token goes (its death, its gateway's stop, or the link's loss within the Zenoh lease) the
connection is closed, and every local caller gets PeerDied and its on_death callbacks.

One thread per import takes requests from the local ring; a call goes out as a Zenoh query
(a pack of a fixed header, the token and the name) and is answered from the Zenoh thread that
receives its reply (no thread waits for it; Zenoh's threads keep their Python thread state
between callbacks, see threads.py); a watcher polls the calls in flight for their
caller's cancel mark (Request.cancelled: its timeout, its task cancelled, its death) and sends
the exporter a CANCEL for each, which cancels the call there; one-way messages go in batches,
one batch in flight per import, so that a full remote ring holds this side's ring full and the
local sender sees WouldBlock rather than a drop.

An exported topic is imported once per host however many subscribe here: a local connection
publishes NAME@HOST as a gateway (its pool here, so local subscribers read samples in place),
a Zenoh subscriber on the exporter's t/<this gateway>/<live id> re-publishes each sample it
receives (drop-oldest for slow local subscribers, as any publisher), and a SUB request with the
token (again at each renewal) asks the exporter for the flow. Its end is the stand-in's end, as
for a service: the local subscribers get PeerDied.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zenoh

from .._errors import (
    ERRORS,
    IpcError,
    PeerDied,
    PermissionDenied,
    RemoteError,
    Timeout,
)
from .._runtime.process import Process, connect
from .._runtime.service import Service, reply_failure
from .._runtime.topic import Publisher
from .config import GatewayConfig
from .threads import keep_state
from .token import body_of, public_bytes, sign, verify_signature
from .wire import (
    ACK,
    CALL,
    CANCEL,
    MAX_BATCH,
    PREFIX,
    REP,
    SAMPLE,
    SEND,
    SUB,
    Hello,
    WireError,
    check_host,
    decode_welcome,
    encode,
    hello_signed_part,
    key,
    pack_batch,
    pack_request,
    unpack_error,
)

log = logging.getLogger("capbus.gateway")
_TRANSFER = 0x80000000  # capabilities and regions never cross hosts
# Imports from one gateway at most (each is a local connection and a thread here; the kernel's
# connections_per_pid bounds them all): an exporter cannot make this side hold more.
MAX_IMPORTS = 128
MAX_PEERS = 256  # gateways greeted at most (a stray peer can declare any number of names)
EVENTS = 4096  # liveliness events waiting, at most
RESYNC = 30.0  # seconds between hellos to every gateway seen
HELLO_WAIT = 3.0  # seconds a hello waits for its answer
CANCEL_POLL = 0.005  # seconds between looks at the cancel marks of the calls in flight
# A remote topic's stand-in here: its largest sample (an exporter saying more is cut to this, and
# larger samples are dropped, counted) and the pool's shape (samples ~ max_size x 101 bytes of
# sparse memfd, counted against this uid's region bytes).
MAX_TOPIC_SAMPLE = 64 << 20
TOPIC_SUBSCRIBERS = 8
TOPIC_DEPTH = 8
TOPIC_HELD = 4


@dataclass
class _Import:
    peer: str
    name: str
    live: str
    token: bytes
    proc: Process
    svc: Service
    querier: Any
    expires: float
    dead: threading.Event = field(default_factory=threading.Event)
    idle: threading.Event = field(default_factory=threading.Event)  # no one-way batch in flight
    refused: int = 0  # one-way messages the remote side could not queue in time


@dataclass(eq=False)
class _TopicImport:
    peer: str
    name: str
    live: str
    token: bytes
    proc: Process
    pub: Publisher
    expires: float
    zsub: Any = None
    dead: threading.Event = field(default_factory=threading.Event)
    last: int = 0  # the exporter's last sequence number seen
    lost: int = 0  # samples the exporter's sequence numbers say never arrived
    bad: int = 0  # samples dropped here: malformed, too large, out of order


class Importer:
    def __init__(self, cfg: GatewayConfig, session: zenoh.Session, key_: Any,
                 socket_path: str | None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.session = session
        self.key = key_
        self.socket_path = socket_path
        self.imports: dict[tuple[str, str], _Import] = {}
        self.topics: dict[tuple[str, str], _TopicImport] = {}
        self.peers: set[str] = set()
        # Bounded: a peer declaring liveliness tokens in a loop fills it, and what does not fit
        # is dropped; the resync (a hello to every gateway seen, every RESYNC seconds) brings
        # the imports back in line with what each exporter says, whatever was missed.
        self._events: queue.Queue[tuple[str, ...]] = queue.Queue(EVENTS)
        self._next_resync = time.monotonic() + RESYNC
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._queriers: dict[str, Any] = {}
        # calls in flight: call id -> (request, import, answered flag); the watcher's work
        self._pending: dict[int, tuple[Any, _Import, list[bool]]] = {}
        self._pending_added = threading.Event()
        self._next_call = 0

    def start(self) -> None:
        self._spawn(self._manage, "capbus-gw-import")
        self._spawn(self._watch_cancels, "capbus-gw-cancels")
        self.sub = self.session.liveliness().declare_subscriber(
            f"{PREFIX}/*/**", zenoh.handlers.Callback(self._on_live, indirect=False),
            history=True)

    def _spawn(self, fn: Any, name: str, *args: Any) -> threading.Thread:
        t = threading.Thread(target=fn, args=args, name=name, daemon=True)
        t.start()
        self._threads.append(t)
        return t

    def stop(self) -> None:
        self._stop.set()
        self._pending_added.set()
        self._events.put(("stop",))
        with contextlib.suppress(Exception):
            self.sub.undeclare()
        for imp in list(self.imports.values()):
            self._kill(imp, "the gateway stopped")
        for ti in list(self.topics.values()):
            self._kill_topic(ti, "the gateway stopped")
        for t in self._threads:
            t.join(timeout=2)

    # ---- liveliness --------------------------------------------------------------------------

    def _on_live(self, sample: zenoh.Sample) -> None:
        """On a Zenoh thread: only parse and queue."""
        keep_state()
        parts = str(sample.key_expr).split("/")
        if len(parts) < 4 or parts[2] == self.name:
            return
        peer = parts[2]
        put = sample.kind == zenoh.SampleKind.PUT
        with contextlib.suppress(queue.Full):
            if parts[3:] == ["alive"]:
                self._events.put_nowait(("alive", peer, "put" if put else "del"))
            elif len(parts) == 5 and parts[3] == "svc":
                self._events.put_nowait(("svc", peer, parts[4], "put" if put else "del"))

    def _manage(self) -> None:
        while not self._stop.is_set():
            if time.monotonic() >= self._next_resync:
                self._next_resync = time.monotonic() + RESYNC
                for peer in sorted(self.peers):
                    with contextlib.suppress(Exception):
                        self.hello(peer)
            try:
                ev = self._events.get(timeout=1.0)
            except queue.Empty:
                self._renew()
                continue
            try:
                self._event(ev)
            except Exception:
                log.exception("gateway %s: import event %r failed", self.name, ev)

    def _event(self, ev: tuple[str, ...]) -> None:
        if ev[0] == "stop":
            return
        peer = ev[1]
        try:
            check_host(peer)
        except ValueError:
            return
        if self.cfg.imports is not None and peer not in self.cfg.imports:
            return
        if ev[0] == "alive":
            if ev[2] == "put":
                if peer not in self.peers and len(self.peers) >= MAX_PEERS:
                    log.warning("gateway %s: more than %d gateways seen; %s ignored (list the "
                                "ones to import from in the config's import)", self.name,
                                MAX_PEERS, peer)
                    return
                self.peers.add(peer)
                self.hello(peer)
            else:
                self.peers.discard(peer)
                for imp in [i for i in self.imports.values() if i.peer == peer]:
                    self._kill(imp, f"gateway {peer} is gone (stopped, or its link lost)")
                for ti in [i for i in self.topics.values() if i.peer == peer]:
                    self._kill_topic(ti, f"gateway {peer} is gone (stopped, or its link lost)")
                q = self._queriers.pop(peer, None)
                with contextlib.suppress(Exception):
                    if q is not None:
                        q.undeclare()
        elif ev[0] == "svc":
            live = ev[2]
            if ev[3] == "del":
                for imp in [i for i in self.imports.values() if i.peer == peer and
                            i.live == live]:
                    self._kill(imp, f"{imp.name} on {peer} died")
                for ti in [i for i in self.topics.values() if i.peer == peer and
                           i.live == live]:
                    self._kill_topic(ti, f"topic {ti.name} on {peer} ended")
            elif peer in self.peers and live not in (
                    {i.live for i in self.imports.values()} |
                    {t.live for t in self.topics.values()}):
                self.hello(peer)  # only a gateway seen alive (a stray token greets nobody)

    def _renew(self) -> None:
        now = time.time()
        soon = now + self.cfg.token_ttl / 4
        due = ({i.peer for i in self.imports.values() if i.expires < soon} |
               {t.peer for t in self.topics.values() if t.expires < soon})
        for peer in due:
            self.hello(peer)

    # ---- hello -------------------------------------------------------------------------------

    def hello(self, peer: str) -> None:
        """Greet `peer` and bring the imports from it in line with its answer."""
        h = Hello(1, self.name, public_bytes(self.key), peer, time.time(), os.urandom(16))
        h = Hello(h.v, h.name, h.key, h.to, h.ts, h.nonce, sign(self.key, hello_signed_part(h)))
        welcome = None
        for reply in self.session.get(key(peer, "hello"), payload=encode(h), timeout=HELLO_WAIT):
            if reply.ok is not None:
                try:
                    welcome = decode_welcome(reply.ok.payload.to_bytes())
                except Exception:
                    log.warning("gateway %s: %s sent a malformed welcome", self.name, peer)
            elif reply.err is not None:
                with contextlib.suppress(WireError):
                    _, _, text = unpack_error(reply.err.payload.to_bytes())
                    log.warning("gateway %s: %s refused our hello: %s", self.name, peer, text)
        if welcome is None:
            return
        pinned = self.cfg.peers.get(peer)
        if pinned is not None and welcome.key != pinned.key:
            log.warning("gateway %s: %s answered with a key that is not its pinned one",
                        self.name, peer)
            return
        seen: set[Any] = set()
        for e in welcome.exports[:MAX_IMPORTS]:
            try:
                body = body_of(e.token)
                if not verify_signature(welcome.key, e.token[-64:], e.token[:-64]):
                    continue
                if body.issuer != peer or body.holder != self.name or "@" in e.name:
                    continue
                if len(f"{e.name}@{peer}".encode()) > 255:
                    continue
            except Exception:
                continue
            if e.kind == "topic":
                self._topic_export(peer, e, body.expires, seen)
                continue
            if e.kind != "service":
                continue
            seen.add(e.name)
            cur = self.imports.get((peer, e.name))
            if cur is not None and cur.live == e.live and not cur.dead.is_set():
                cur.token, cur.expires = e.token, body.expires
                continue
            if cur is not None:
                self._kill(cur, f"{e.name} on {peer} was replaced")
            self._open(peer, e.name, e.live, e.token, body.expires)
        for imp in [i for i in self.imports.values() if i.peer == peer and i.name not in seen]:
            self._kill(imp, f"{peer} no longer exports {imp.name} to {self.name}")
        for ti in [i for i in self.topics.values() if i.peer == peer and
                   ("topic", i.name) not in seen]:
            self._kill_topic(ti, f"{peer} no longer exports topic {ti.name} to {self.name}")

    # ---- remote topics -----------------------------------------------------------------------

    def _topic_export(self, peer: str, e: Any, expires: float, seen: set[Any]) -> None:
        seen.add(("topic", e.name))
        cur = self.topics.get((peer, e.name))
        if cur is not None and cur.live == e.live and not cur.dead.is_set():
            cur.token, cur.expires = e.token, expires
            self._ask_flow(cur)  # renew: the exporter keeps the flow while the token allows
            return
        if cur is not None:
            self._kill_topic(cur, f"topic {e.name} on {peer} was replaced")
        if len(self.topics) >= MAX_IMPORTS * 4:
            log.warning("gateway %s: %d remote topics already; %s@%s left out", self.name,
                        len(self.topics), e.name, peer)
            return
        proc = connect(self.socket_path)
        try:
            pub = proc.publish(f"{e.name}@{peer}", max_size=max(1, min(e.max_size,
                                                                       MAX_TOPIC_SAMPLE)),
                               max_subscribers=TOPIC_SUBSCRIBERS, max_depth=TOPIC_DEPTH,
                               max_held=TOPIC_HELD, gateway=True)
        except IpcError as exc:
            proc.close()
            log.warning("gateway %s cannot publish topic %s@%s here: %s", self.name, e.name,
                        peer, exc)
            return
        ti = _TopicImport(peer, e.name, e.live, e.token, proc, pub, expires)
        with self._lock:
            self.topics[(peer, e.name)] = ti
        try:
            # subscribed before asking for the flow: no sample of it is missed
            ti.zsub = self.session.declare_subscriber(
                key(peer, f"t/{self.name}/{e.live}"),
                zenoh.handlers.Callback(_sampler(ti), indirect=False))
        except Exception as exc:
            self._kill_topic(ti, f"no Zenoh subscriber: {exc}")
            raise
        self._ask_flow(ti)

    def _ask_flow(self, ti: _TopicImport) -> None:
        """A SUB request with the token: refused (revoked, cut off), the stand-in ends."""
        att = pack_request(SUB, ti.token, ti.name.encode(), 0, 0, (0, 0, 0, 0), 0, 0)
        why = f"no answer from {ti.peer}"
        try:
            for reply in self._querier(ti.peer).get(payload=b"", attachment=att):
                if reply.ok is not None:
                    return
                why = str(_error(_err_bytes(reply), ti))
        except Exception as exc:
            why = str(exc)
        self._kill_topic(ti, f"{ti.peer} refused the flow of topic {ti.name}: {why}")

    def _kill_topic(self, ti: _TopicImport, why: str) -> None:
        if ti.dead.is_set():
            return
        ti.dead.set()
        with self._lock:
            if self.topics.get((ti.peer, ti.name)) is ti:
                del self.topics[(ti.peer, ti.name)]
        log.info("gateway %s: topic %s@%s ends: %s", self.name, ti.name, ti.peer, why)
        with contextlib.suppress(Exception):
            ti.zsub.undeclare()
        with contextlib.suppress(Exception):
            ti.pub.close()  # its subscribers here: PeerDied
        with contextlib.suppress(Exception):
            ti.proc.close()

    def _querier(self, peer: str) -> Any:
        q = self._queriers.get(peer)
        if q is None:
            q = self._queriers[peer] = self.session.declare_querier(
                key(peer, "q"), timeout=self.cfg.call_timeout + 1.0,
                consolidation=zenoh.ConsolidationMode.NONE)
        return q

    def _open(self, peer: str, name: str, live: str, token: bytes, expires: float) -> None:
        proc = connect(self.socket_path)
        try:
            svc = proc.register(f"{name}@{peer}", gateway=True)
        except IpcError as exc:
            proc.close()
            log.warning("gateway %s cannot serve %s@%s here: %s", self.name, name, peer, exc)
            return
        imp = _Import(peer, name, live, token, proc, svc, self._querier(peer), expires)
        imp.idle.set()
        with self._lock:
            self.imports[(peer, name)] = imp
        self._spawn(self._serve, f"capbus-gw-{name}@{peer}"[:60], imp)

    def _kill(self, imp: _Import, why: str) -> None:
        """The remote service is gone: so is its stand-in here (its callers get PeerDied)."""
        if imp.dead.is_set():
            return
        imp.dead.set()
        imp.idle.set()
        with self._lock:
            if self.imports.get((imp.peer, imp.name)) is imp:
                del self.imports[(imp.peer, imp.name)]
        log.info("gateway %s: %s@%s ends: %s", self.name, imp.name, imp.peer, why)
        with contextlib.suppress(Exception):
            imp.proc.close()

    # ---- forwarding --------------------------------------------------------------------------

    def _serve(self, imp: _Import) -> None:
        name = imp.name.encode()
        timeout_ms = int(self.cfg.call_timeout * 1000)
        while not imp.dead.is_set():
            try:
                reqs = imp.svc.recv_many(MAX_BATCH, timeout=0.5)
            except IpcError:
                break
            batch = []
            for req in reqs:
                if req.caps or req.regions:
                    if req.expects_reply:
                        reply_failure(req, PermissionDenied(
                            "capabilities and regions do not cross hosts (a gateway forwards "
                            "bytes only)"))
                    continue
                if req.expects_reply:
                    self._call(imp, req, name, timeout_ms)
                else:
                    p = req.payload
                    batch.append((req.opcode, req.flags & ~_TRANSFER, req.data,
                                  p if type(p) is bytes else bytes(p)))
                    req.release()
            if batch:
                self._send(imp, batch, name)

    def _call(self, imp: _Import, req: Any, name: bytes, timeout_ms: int) -> None:
        p = req.payload
        with self._lock:
            self._next_call += 1
            cid = self._next_call
        att = pack_request(CALL, imp.token, name, req.opcode, req.flags & ~_TRANSFER, req.data,
                           timeout_ms, req.sender, cid)
        answered = [False]
        pending = self._pending

        def on_reply(reply: zenoh.Reply) -> None:
            keep_state()
            if answered[0]:
                return
            answered[0] = True
            pending.pop(cid, None)
            ok = reply.ok
            try:
                if ok is not None:
                    a = ok.attachment
                    if a is None:
                        raise WireError("a reply without its header")
                    opcode, flags, d0, d1, d2, d3 = REP.unpack(a.to_bytes())
                    req.reply(opcode, (d0, d1, d2, d3), ok.payload.to_bytes(), flags)
                else:
                    reply_failure(req, _error(_err_bytes(reply), imp))
            except Exception as exc:  # a malformed reply: the caller learns, nothing else does
                with contextlib.suppress(Exception):
                    reply_failure(req, exc if isinstance(exc, IpcError) else PeerDied(
                        f"{imp.name}@{imp.peer}: a malformed reply ({exc})"))

        started = time.monotonic()

        def on_done() -> None:
            # No reply and the query is over: at its deadline, a Timeout; before it, the
            # exporter went away with the query (its death, its stop, the link's loss).
            keep_state()
            pending.pop(cid, None)
            if not answered[0]:
                answered[0] = True
                late = time.monotonic() - started >= timeout_ms / 1000.0
                with contextlib.suppress(Exception):
                    reply_failure(req, Timeout(
                        f"{imp.name}@{imp.peer}: no answer from gateway {imp.peer} "
                        f"within {timeout_ms} ms") if late else PeerDied(
                        f"{imp.name}@{imp.peer}: gateway {imp.peer} went away"))

        pending[cid] = (req, imp, answered)
        if len(pending) == 1:
            self._pending_added.set()
        try:
            imp.querier.get(zenoh.handlers.Callback(on_reply, on_done, indirect=False),
                            payload=p if type(p) is bytes else bytes(p), attachment=att)
        except Exception as exc:
            pending.pop(cid, None)
            reply_failure(req, PeerDied(f"{imp.name}@{imp.peer}: {exc}"))

    def _watch_cancels(self) -> None:
        """Every CANCEL_POLL while calls are in flight: a call whose caller stopped waiting is
        cancelled at the exporter (its service skips it, or its late answer is not waited for)
        and answered here (to no one: the caller is gone) at once."""
        pending = self._pending
        while not self._stop.is_set():
            if not pending:
                self._pending_added.wait(1.0)
                self._pending_added.clear()
                continue
            time.sleep(CANCEL_POLL)
            for cid, (req, imp, answered) in list(pending.items()):
                try:
                    gone = req.cancelled
                except Exception:
                    gone = True
                if not gone or answered[0]:
                    continue
                answered[0] = True
                pending.pop(cid, None)
                att = pack_request(CANCEL, imp.token, imp.name.encode(), 0, 0, (0, 0, 0, 0), 0,
                                   0, cid)
                with contextlib.suppress(Exception):
                    imp.querier.get(zenoh.handlers.Callback(_ignore, indirect=False),
                                    payload=b"", attachment=att)
                with contextlib.suppress(Exception):
                    reply_failure(req, Timeout(f"{imp.name}@{imp.peer}: the caller stopped "
                                               "waiting"))

    def _send(self, imp: _Import, batch: list[Any], name: bytes) -> None:
        # One batch in flight: wait for the last one's answer before sending this one (the
        # ring fills meanwhile, and the local senders see WouldBlock: back-pressure).
        while not imp.idle.wait(0.5):
            if imp.dead.is_set():
                return
        if imp.dead.is_set():
            return
        imp.idle.clear()
        att = pack_request(SEND, imp.token, name, 0, 0, (0, 0, 0, 0), 0, 0)

        def on_reply(reply: zenoh.Reply) -> None:
            keep_state()
            ok = reply.ok
            if ok is not None:
                with contextlib.suppress(Exception):
                    _, refused = ACK.unpack(ok.payload.to_bytes())
                    imp.refused += refused
            else:
                imp.refused += len(batch)
                with contextlib.suppress(Exception):
                    log.warning("gateway %s: %d one-way messages to %s@%s refused: %s",
                                self.name, len(batch), imp.name, imp.peer,
                                _error(_err_bytes(reply), imp))

        try:
            imp.querier.get(zenoh.handlers.Callback(on_reply, imp.idle.set, indirect=False),
                            payload=pack_batch(batch), attachment=att)
        except Exception:
            imp.idle.set()
            raise


def _ignore(_reply: zenoh.Reply) -> None:
    pass


def _sampler(ti: _TopicImport) -> Any:
    """On a Zenoh thread: one remote sample, checked, re-published here (never blocks: the
    stand-in's overflow is drop-oldest)."""
    def on_sample(s: zenoh.Sample) -> None:
        keep_state()
        if ti.dead.is_set():
            return
        try:
            a = s.attachment
            if a is None:
                raise WireError("a sample without its header")
            seq, opcode, d0, d1, d2, d3 = SAMPLE.unpack(a.to_bytes())
            if seq <= ti.last:
                raise WireError("a sample out of order")
            payload = s.payload.to_bytes()
            if len(payload) > ti.pub.max_size:
                raise WireError("a sample larger than the topic's max_size")
            if ti.last:
                ti.lost += seq - ti.last - 1
            ti.last = seq
            ti.pub.publish(opcode, (d0, d1, d2, d3), payload)
        except Exception:  # garbage from the network, or the stand-in closing: dropped
            ti.bad += 1
    return on_sample


def _err_bytes(reply: zenoh.Reply) -> bytes:
    err = reply.err
    return err.payload.to_bytes() if err is not None else b""


def _error(raw: bytes, imp: _Import | _TopicImport) -> IpcError:
    kind, code, text = unpack_error(raw)
    if kind == 1:
        return RemoteError(code, text, service=f"{imp.name}@{imp.peer}")
    if kind == 2:
        return RemoteError(None, text, service=f"{imp.name}@{imp.peer}")
    cls = ERRORS.get(code, IpcError)
    if cls is RemoteError:
        return RemoteError(None, text, service=f"{imp.name}@{imp.peer}")
    return cls(f"{imp.peer}: {text}")
