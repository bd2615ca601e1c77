"""The export side of a gateway: what remote gateways may reach here, and the door they knock on.

It watches the local kernel's services (a registration notice, then one `query("services")`),
and for each one an export rule matches it holds an endpoint (whose on_death ends the export)
and a Zenoh liveliness token `svc/<live id>` (its loss tells every importer at once). A remote
gateway says hello (signed with its key; pinned in [peers] when the config has any) and gets
the exports it may have, each with a token this gateway signed. Every request on `q` carries a
token: checked (signature once, cached), then its expiry, revocation, service, right and limits;
only then does it reach a service, through a local connection of its own per remote origin
(remote gateway, remote ProcessId): the service sees that connection's ProcessId as the sender,
and `capbus.gateway@<this name>` tells it which remote host and process that is. A call is
checked on Zenoh's thread and, on the fast path (see _fast), started there on a pooled lane of
the local endpoint and answered there if the service replies within FAST_WAIT (1 ms): no
hand-over to another thread on the common path. Otherwise (a slow reply, a service marked slow,
Zenoh's thread too busy waiting, a first call from a new origin) the call, or what is left of
it, goes to this gateway's event loop as an `acall` task (no thread waits long for a service:
a slow one never stalls the others); a CANCEL from the importing gateway (its caller stopped
waiting) cancels the task, and so the local call. One-way batches, topic subscriptions and
hellos are taken from a bounded queue by a few worker threads. Nothing a remote peer sends can
make this side hold more than the queue, the calls in flight (QUEUE), the origin table
(max_origins per peer) and the token cache. Zenoh's threads keep their Python thread state
between callbacks (threads.py).

Topics the export rules match (with the right "subscribe") are exported too: this gateway
subscribes to each once, as an ordinary local subscriber, and a pump thread `put`s each sample
to Zenoh once per importing gateway that asked for it with a SUB request carrying its token
(key t/<holder>/<live id>). Whatever a holder's token no longer allows (revoked, its holder cut
off, expired and not renewed) gets nothing more. A slow link slows the pump (its puts block), so
the local ring fills and drops its oldest samples, counted (drop-oldest, as a local subscriber).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zenoh

from .. import _core
from .._errors import (
    IpcError,
    OutOfMemory,
    PermissionDenied,
    ProcessNotFound,
    RemoteError,
    ServiceNotFound,
    Timeout,
    WouldBlock,
)
from .._runtime.endpoint import Endpoint, PendingCall, start_call
from .._runtime.process import Process, connect
from .._runtime.topic import Subscriber
from .config import ExportRule, GatewayConfig
from .threads import keep_state
from .token import Verifier, issue, verify_signature
from .wire import (
    ACK,
    CALL,
    CANCEL,
    REP,
    SAMPLE,
    SEND,
    SUB,
    Export,
    Welcome,
    WireError,
    call_id,
    check_host,
    decode_hello,
    encode,
    hello_signed_part,
    key,
    pack_error,
    unpack_batch,
    unpack_request,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger("capbus.gateway")

HELLO_SKEW = 120.0  # seconds a hello's clock may be off (a replayed old hello is refused)
_FLAGS = 0x7FFF0000  # user flags and the object bit; never the transfer bit
QUEUE = 1024  # queries waiting for a worker, at most
ORIGIN_OPCODE = 1  # capbus.gateway@NAME: data[0] = a sender ProcessId -> its remote origin
# The fast path (see _fast): how long Zenoh's thread waits for a local reply before it hands the
# call to the event loop, and how long a service that made it wait that long is then called
# through the loop only (its calls start on Zenoh's thread, nobody waits there for them):
# SLOW_MIN after a miss, twice as long after each miss that follows a hold, up to SLOW_HOLD (a
# reply in time clears it: a busy machine's rare late reply costs little). And the share of its
# time Zenoh's thread may spend in such waits (measured over FAST_WINDOW): past it, queries are
# piling up behind the waits (many callers, a service with many threads), and every call goes
# through the loop (concurrent there) for SLOW_HOLD.
FAST_WAIT = 0.001
SLOW_MIN = 0.01
# Payloads larger than this are not copied or sent on Zenoh's thread (a 1 MiB call there took
# ~1.5x as long: while Zenoh's thread copies and sends, it reads nothing): such calls go to the
# loop, and so do such replies of the fast path.
FAST_MAX = 64 << 10
SLOW_HOLD = 1.0
FAST_DUTY = 0.5
FAST_WINDOW = 0.1


@dataclass
class _Exported:
    name: str
    live: str
    endpoint: Endpoint
    token: Any  # zenoh.LivelinessToken


@dataclass(eq=False)
class _ExportedTopic:
    name: str
    live: str
    max_size: int
    sub: Subscriber
    token: Any  # zenoh.LivelinessToken
    # importing gateway -> (id, expiry) of the token it asked with: the flow's authority
    holders: dict[str, tuple[bytes, float]] = field(default_factory=dict)
    dead: threading.Event = field(default_factory=threading.Event)
    resubscribed: int = 0  # local subscriptions dropped as corrupt and made again


@dataclass
class _Origin:
    """One remote caller (remote gateway, its ProcessId there) as a local process."""

    holder: str
    remote: int
    proc: Process
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    busy: int = 0

    def endpoint(self, name: str) -> Endpoint:
        ep = self.endpoints.get(name)
        if ep is None or ep.dead:
            ep = self.endpoints[name] = self.proc.lookup(name)
        return ep


class Exporter:
    def __init__(self, cfg: GatewayConfig, session: zenoh.Session, proc: Process,
                 key_: Ed25519PrivateKey, socket_path: str | None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.session = session
        self.proc = proc
        self.key = key_
        self.socket_path = socket_path
        self.verifier = Verifier(cfg.name, key_)
        self.verifier.revoked_ids |= cfg.revoked
        self.verifier.revoked_holders |= cfg.revoked_peers
        self.exported: dict[str, _Exported] = {}
        self.topics: dict[str, _ExportedTopic] = {}
        self.puts = 0  # topic samples put to Zenoh (one per sample and importing gateway)
        self.issued: dict[bytes, dict[str, Any]] = {}  # token id -> what it allows
        self._reuse: dict[tuple[str, bytes, str], tuple[bytes, float]] = {}
        self.origins: OrderedDict[tuple[str, int], _Origin] = OrderedDict()
        self.by_pid: dict[int, _Origin] = {}
        self.refused = 0  # requests refused (bad bytes, bad token, no such export)
        self.dropped = 0  # one-way messages a full local ring kept refusing past send_timeout
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.calls = 0  # calls in flight (tasks on the loop), at most QUEUE
        self._tasks: dict[tuple[str, int], asyncio.Task[None]] = {}  # (holder, call id)
        # service -> (until when its calls skip the fast wait, that hold's length)
        self._slow: dict[str, tuple[float, float]] = {}
        self._busy_until = 0.0  # until when no call is waited for on Zenoh's thread
        self._window = (0.0, 0.0)  # (start, time waited since) of the FAST_DUTY measure
        self.fast = 0  # calls answered on Zenoh's thread (the fast path)
        self.handed = 0  # calls started there whose reply the event loop awaited
        self._loop = asyncio.new_event_loop()

    # ---- life --------------------------------------------------------------------------------

    def start(self) -> None:
        self._spawn(self._loop.run_forever, "capbus-gw-calls")
        self.alive = self.session.liveliness().declare_token(key(self.name, "alive"))
        self._queue: queue.Queue[zenoh.Query] = queue.Queue(QUEUE)
        self._q_key = key(self.name, "q")
        self.queryable = self.session.declare_queryable(
            key(self.name, "**"), zenoh.handlers.Callback(self._enqueue, indirect=False))
        self.origin_svc = self.proc.register(f"capbus.gateway@{self.name}", gateway=True)
        self._sub = self.proc.subscribe_registrations()
        self._scan()
        for i in range(self.cfg.workers):
            self._spawn(self._work, f"capbus-gw-export-{i}")
        self._spawn(self._watch, "capbus-gw-scan")
        self._spawn(self._serve_origin, "capbus-gw-origin")

    def _spawn(self, fn: Any, name: str, *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            self.queryable.undeclare()
        with contextlib.suppress(Exception):
            self.alive.undeclare()
        for e in list(self.exported.values()):
            with contextlib.suppress(Exception):
                e.token.undeclare()
        for tp in list(self.topics.values()):
            self._topic_gone(tp)
        with contextlib.suppress(Exception):
            self.origin_svc.close()
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._end_loop)
        for t in self._threads:
            t.join(timeout=2)
        if not self._loop.is_running():
            self._loop.close()
        for o in list(self.origins.values()):
            with contextlib.suppress(Exception):
                o.proc.close()
        self.origins.clear()

    # ---- what is exported --------------------------------------------------------------------

    def rule_for(self, name: str, peer: str | None = None) -> ExportRule | None:
        allowed = None
        if peer is not None and self.cfg.peers:
            p = self.cfg.peers.get(peer)
            allowed = p.exports if p is not None else ()
        for r in self.cfg.exports:
            if (allowed is None or r.pattern in allowed) and _fits(name, r.pattern):
                return r
        return None

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                # A notice says something registered; a service closed without its process
                # exiting sends none, and no on_death: a scan every second notices that too.
                self._sub.wait(timeout=1.0)
                self._scan()
            except IpcError:
                if self._stop.wait(0.5):
                    return

    def _scan(self) -> None:
        try:
            rows = self.proc.query("services")
        except IpcError as exc:
            log.warning("gateway %s cannot list the local services: %s", self.name, exc)
            return
        owners = {row.get("name"): row.get("id") for row in rows if row.get("kind") == "name"}
        for e in list(self.exported.values()):
            if owners.get(e.name) != e.endpoint.process_id:
                self._gone(e)
        for row in rows:
            name = row.get("name")
            if row.get("kind") != "name" or not isinstance(name, str) or "@" in name:
                continue
            if name in self.exported or self.rule_for(name) is None:
                continue
            try:
                ep = self.proc.lookup(name)
            except IpcError:
                continue
            live = os.urandom(8).hex()
            tok = self.session.liveliness().declare_token(key(self.name, f"svc/{live}"))
            e = _Exported(name, live, ep, tok)
            with self._lock:
                self.exported[name] = e
            ep.on_death(_ender(self, e))
        self._scan_topics()

    def _scan_topics(self) -> None:
        try:
            rows = self.proc.query("topics")
        except IpcError as exc:
            log.warning("gateway %s cannot list the local topics: %s", self.name, exc)
            return
        live = {row.get("topic"): row for row in rows}
        for t in list(self.topics.values()):
            if t.name not in live or t.dead.is_set():
                self._topic_gone(t)
        for name in live:
            if not isinstance(name, str) or "@" in name or name in self.topics:
                continue
            rule = self.rule_for(name)
            if rule is None or "subscribe" not in rule.rights:
                continue
            try:
                sub = self.proc.subscribe(name)
            except IpcError:
                continue
            tok = self.session.liveliness().declare_token(
                key(self.name, f"svc/{(lv := os.urandom(8).hex())}"))
            t = _ExportedTopic(name, lv, int(sub.max_size), sub, tok)
            with self._lock:
                self.topics[name] = t
            self._spawn(self._pump, f"capbus-gw-topic-{name}"[:60], t)

    def _topic_gone(self, t: _ExportedTopic) -> None:
        t.dead.set()
        with self._lock:
            if self.topics.get(t.name) is t:
                del self.topics[t.name]
        with contextlib.suppress(Exception):
            t.token.undeclare()  # the importers close their stand-ins: PeerDied there
        with contextlib.suppress(Exception):
            t.sub.close()

    def _pump(self, t: _ExportedTopic) -> None:
        """One local subscriber per exported topic; each sample goes out once per holder."""
        keys: dict[str, str] = {}
        block = zenoh.CongestionControl.BLOCK
        v = self.verifier
        while not self._stop.is_set() and not t.dead.is_set():
            try:
                s = t.sub.recv(timeout=0.5)
            except Timeout:
                continue
            except _core.CorruptChannel as exc:
                # The local publisher's garbage (or, on a starved machine, an entry it was
                # preempted in the middle of): subscribe again, the export and its importers
                # live on (they lose the samples in between, counted by sequence number).
                log.warning("gateway %s: topic %s: %s; subscribing again", self.name, t.name, exc)
                if self._stop.wait(0.05) or not self._resubscribe(t):
                    break
                continue
            except IpcError:  # the publisher died or closed the topic: the export ends
                break
            try:
                now = time.time()
                holders = [h for h, (tid, exp) in list(t.holders.items())
                           if exp > now and tid not in v.revoked_ids
                           and h not in v.revoked_holders]
                if not holders:
                    continue
                body = bytes(s.payload)
                att = SAMPLE.pack(s.seq, s.opcode, *s.data)
                for h in holders:
                    k = keys.get(h) or keys.setdefault(h, key(self.name, f"t/{h}/{t.live}"))
                    self.puts += 1  # before the put: its sample may arrive before it returns
                    self.session.put(k, body, attachment=att, congestion_control=block)
            except Exception:
                if self._stop.is_set():
                    break
                log.exception("gateway %s: topic %s: a put failed", self.name, t.name)
            finally:
                s.release()
        self._topic_gone(t)

    def _resubscribe(self, t: _ExportedTopic) -> bool:
        with contextlib.suppress(Exception):
            t.sub.close()
        try:
            t.sub = self.proc.subscribe(t.name)
        except IpcError:
            return False
        t.resubscribed += 1
        return True

    def topic_dropped(self) -> int:
        """Samples the exported topics' local subscriptions lost to drop-oldest (a slow link)."""
        return sum(int(t.sub.dropped) for t in list(self.topics.values()))

    def _gone(self, e: _Exported) -> None:
        with self._lock:
            if self.exported.get(e.name) is e:
                del self.exported[e.name]
        self._slow.pop(e.name, None)
        with contextlib.suppress(Exception):
            e.token.undeclare()
        with contextlib.suppress(Exception):
            e.endpoint.close()

    # ---- revocation --------------------------------------------------------------------------

    def revoke(self, token_id: bytes) -> None:
        self.verifier.revoke(token_id)
        with self._lock:
            for k, (tok, _) in list(self._reuse.items()):
                if tok[:-64].find(token_id) >= 0:
                    del self._reuse[k]

    def revoke_peer(self, peer: str) -> None:
        self.verifier.revoke_holder(peer)
        with self._lock:
            for k in [k for k in self._reuse if k[0] == peer]:
                del self._reuse[k]
            gone = [o for o in self.origins.values() if o.holder == peer]
        for o in gone:
            self._drop_origin(o)

    # ---- the queryable -----------------------------------------------------------------------

    def _end_loop(self) -> None:
        for task in asyncio.all_tasks(self._loop):
            task.cancel()
        self._loop.call_later(0.2, self._loop.stop)

    def _enqueue(self, query: zenoh.Query) -> None:
        """On a Zenoh thread: a call takes the fast path (see _fast), else goes to the event
        loop (a task there), as do other requests; a hello goes to a worker. Zenoh's thread never
        waits more than FAST_WAIT. Too many in flight is an OutOfMemory answer at once."""
        keep_state()
        if str(query.key_expr) == self._q_key:
            with self._lock:
                full = self.calls >= QUEUE
                if not full:
                    self.calls += 1
            if full:
                self.refused += 1
                self._fail(query, OutOfMemory(f"gateway {self.name} has {QUEUE} calls in "
                                              "flight"))
                with contextlib.suppress(Exception):
                    query.drop()
                return
            try:
                if not self._fast(query):
                    self._loop.call_soon_threadsafe(self._begin, query)
            except RuntimeError:  # stopping
                with self._lock:
                    self.calls -= 1
            return
        try:
            self._queue.put_nowait(query)
        except queue.Full:
            self.refused += 1
            self._fail(query, OutOfMemory(f"gateway {self.name} has {QUEUE} requests waiting"))

    def _begin(self, query: zenoh.Query) -> None:
        """On the loop: a call becomes a task; anything else goes to the workers."""
        try:
            att = query.attachment
            if att is None:
                raise WireError("a request without its header")
            raw = att.to_bytes()
            req = unpack_request(raw)
            kind = req[0]
            if kind == CALL:
                self._loop.create_task(self._call(query, req, call_id(raw)))
                return
            if kind == CANCEL:
                self._cancel(query, req, call_id(raw))
                self._done(query)
                return
        except (WireError, IpcError) as exc:
            self.refused += 1
            self._fail(query, exc)
            self._done(query)
            return
        with self._lock:
            self.calls -= 1  # not a call: the workers' queue bounds it
        self._enqueue_worker(query)

    def _done(self, query: zenoh.Query) -> None:
        with self._lock:
            self.calls -= 1
        with contextlib.suppress(Exception):
            query.drop()

    def _cancel(self, query: zenoh.Query, req: Any, cid: int) -> None:
        """The importing gateway's caller stopped waiting: cancel its call here (the service
        skips it if it has not taken it yet). Only the token's holder may cancel its calls."""
        kind, token, name, *_ = req
        checked = self.verifier.check(token, name, "call", 0)
        task = self._tasks.get((checked.body.holder, cid))
        if task is not None:
            task.cancel()
        query.reply(query.key_expr, ACK.pack(int(task is not None), 0))

    def _fast(self, query: zenoh.Query) -> bool:
        """On Zenoh's thread: a call to a service whose origin and endpoint are open already
        starts here (a pooled lane of the endpoint, the request written, the doorbell rung: no
        wait), and its reply is waited for here, FAST_WAIT at most (the lane's wait, without the
        GIL), and sent at once: no hand-over to another thread on the common path. A reply that
        has not come by then is the event loop's to await (a task, cancellable as any call), and
        the service is marked slow (see _missed): its calls are not waited for here meanwhile, so
        that a service slow for good holds Zenoh's thread FAST_WAIT once per SLOW_HOLD; nor are
        any calls while these waits take more than FAST_DUTY of Zenoh's thread (see _waited):
        under load the calls run concurrently on the loop, as they did before the fast path.
        False: not taken (not a call, or no origin, endpoint or idle lane yet): the loop does
        it all."""
        try:
            att = query.attachment
            if att is None:
                return False
            raw = att.to_bytes()
            req = unpack_request(raw)
        except WireError:
            return False  # the loop says why
        kind, token, name, opcode, flags, data, tmo, origin = req
        if kind != CALL or name not in self.exported:
            return False
        try:
            zb = query.payload
            checked = self.verifier.check(token, name, "call", len(zb) if zb is not None else 0)
        except (WireError, IpcError) as exc:
            self.refused += 1
            self._fail(query, exc)
            self._done(query)
            return True
        holder = checked.body.holder
        timeout = min(tmo / 1000.0, self.cfg.call_timeout) if tmo else self.cfg.call_timeout
        deadline = time.monotonic() + timeout
        if zb is not None and len(zb) > FAST_MAX:  # copied on the loop (the payload arg: b"")
            self._hand(query, req, raw, holder, None, deadline, None, None)
            return True
        payload = zb.to_bytes() if zb is not None else b""
        o = self._origin_now(holder, origin)
        if o is None:
            self._hand(query, req, raw, holder, payload, deadline, None, None)
            return True
        pending: PendingCall | None = None
        try:
            ep = o.endpoints.get(name)
            if ep is not None and not ep.dead:
                pending = start_call(ep, opcode, data, payload, flags)
            if pending is not None:
                now = time.monotonic()
                slow = self._slow.get(name)
                wait = (0.0 if self._busy_until > now or (slow is not None and slow[0] > now)
                        else min(FAST_WAIT, timeout))
                msg = pending.wait(wait)
                if wait:
                    self._waited(now, time.monotonic())
                    if msg is None:
                        self._missed(name, now, slow)
                    elif slow is not None:
                        self._slow.pop(name, None)  # in time again
                if msg is not None:
                    self.fast += 1
                    with self._lock:
                        o.busy -= 1
                    o = None
                    p = msg.payload
                    if p is not None and len(p) > FAST_MAX:
                        self._loop.call_soon_threadsafe(self._reply, query, msg)
                        return True
                    self._reply(query, msg)
                    return True
                self.handed += 1
        except Exception as exc:  # the call is over (its error), or never started
            if o is not None:
                with self._lock:
                    o.busy -= 1
            if not isinstance(exc, IpcError):
                log.exception("gateway %s: a call failed", self.name)
            self.refused += 1
            self._fail(query, exc)
            self._done(query)
            return True
        self._hand(query, req, raw, holder, payload, deadline, o, pending)
        return True

    def _reply(self, query: zenoh.Query, msg: Any) -> None:
        """A fast-path call's reply (on Zenoh's thread, or on the loop when large)."""
        try:
            # msg[1]: the flags as sent, the object bit included (.flags drops it)
            query.reply(query.key_expr, msg.payload or b"",
                        attachment=REP.pack(msg.opcode, msg[1] & _FLAGS, *msg.data))
        except Exception as exc:
            log.warning("gateway %s: a reply could not be sent: %s", self.name, exc)
        finally:
            self._done(query)

    def _missed(self, name: str, now: float, slow: tuple[float, float] | None) -> None:
        """`name` did not answer within FAST_WAIT: its calls are not waited for during a hold,
        SLOW_MIN, or twice the last one if this miss follows it closely (a service slow for
        good costs Zenoh's thread one FAST_WAIT per SLOW_HOLD once the hold has grown)."""
        until, hold = slow if slow is not None else (0.0, 0.0)
        hold = min(SLOW_HOLD, 2 * hold) if now - until < max(hold, SLOW_MIN) else SLOW_MIN
        self._slow[name] = (now + hold, hold)

    def _waited(self, start: float, end: float) -> None:
        """Zenoh's thread waited from start to end: past FAST_DUTY of a window, it waits no
        more for SLOW_HOLD (the queries behind it go to the loop meanwhile). Zenoh's threads
        may race here: a lost update only blurs a measure."""
        w0, waited = self._window
        waited += end - start
        if end - w0 >= FAST_WINDOW:
            if waited > FAST_DUTY * (end - w0):
                self._busy_until = end + SLOW_HOLD
            w0, waited = end, 0.0
        self._window = (w0, waited)

    def _hand(self, query: zenoh.Query, req: Any, raw: bytes, holder: str,
              payload: bytes | None, deadline: float, o: _Origin | None,
              pending: PendingCall | None) -> None:
        """From Zenoh's thread: the rest of a checked call (its origin, endpoint, and call, or
        only the wait for its reply) is a task on the loop. payload None: not copied yet."""
        def begin() -> None:
            self._loop.create_task(self._call(query, req, call_id(raw), checked=(
                holder, payload, deadline, o, pending)))

        try:
            self._loop.call_soon_threadsafe(begin)
        except RuntimeError:  # stopping: the call is dropped with the loop
            if pending is not None:
                pending.cancel()
            if o is not None:
                with self._lock:
                    o.busy -= 1
            self._fail(query, Timeout(f"gateway {self.name} stopped"))
            self._done(query)

    async def _call(self, query: zenoh.Query, req: Any, cid: int,
                    checked: tuple[str, bytes | None, float, _Origin | None, PendingCall | None]
                    | None = None) -> None:
        """A call as a task on the loop: all of it, or (checked: from _fast) what is left of
        it (the origin's connection and endpoint lookups, or only the wait for the reply)."""
        kind, token, name, opcode, flags, data, tmo, origin = req
        tk = None
        o: _Origin | None = None
        pending: PendingCall | None = None
        try:
            if checked is None:
                zb = query.payload
                holder = self.verifier.check(token, name, "call",
                                             len(zb) if zb is not None else 0).body.holder
                payload = zb.to_bytes() if zb is not None else b""
                timeout = (min(tmo / 1000.0, self.cfg.call_timeout) if tmo
                           else self.cfg.call_timeout)
                deadline = time.monotonic() + timeout
            else:
                holder, given, deadline, o, pending = checked
                if given is None:  # not copied on Zenoh's thread (large)
                    zb = query.payload
                    given = zb.to_bytes() if zb is not None else b""
                payload = given
            task = asyncio.current_task()
            if cid and task is not None and len(self._tasks) < QUEUE:
                tk = (holder, cid)
                self._tasks[tk] = task  # a later call with the same id replaces it: its own
            if pending is None and name not in self.exported:
                raise ServiceNotFound(f"{self.name} exports no live service {name[:200]!r}")
            if o is None:
                o = self._origin_now(holder, origin)
            if o is None:  # a new origin: its connection is a kernel round trip, off the loop
                o = await asyncio.to_thread(self._origin, holder, origin)
            if pending is not None:
                msg = await pending.result(deadline, tmo / 1000.0 if tmo else
                                           self.cfg.call_timeout)
            else:
                ep = o.endpoints.get(name)
                if ep is None or ep.dead:
                    ep = await asyncio.to_thread(o.endpoint, name)
                msg = await ep.acall(opcode, data, payload,
                                     timeout=max(0.0, deadline - time.monotonic()), flags=flags)
            pending = None
            # msg[1]: the flags as sent, the runtime's object bit included (.flags drops it)
            query.reply(query.key_expr, msg.payload or b"",
                        attachment=REP.pack(msg.opcode, msg[1] & _FLAGS, *msg.data))
        except asyncio.CancelledError:
            # cancelled by the caller's gateway (or our stop): nobody waits for an answer
            self._fail(query, Timeout(f"{name[:200]!r}: the caller stopped waiting"))
        except (WireError, IpcError) as exc:
            self.refused += 1
            self._fail(query, exc)
        except Exception as exc:
            self.refused += 1
            log.exception("gateway %s: a call failed", self.name)
            self._fail(query, exc)
        finally:
            if pending is not None:
                pending.cancel()  # (result() cancels it itself; this is for what came before)
            if o is not None:
                with self._lock:
                    o.busy -= 1
            if tk is not None and self._tasks.get(tk) is asyncio.current_task():
                del self._tasks[tk]
            self._done(query)

    def _origin_now(self, holder: str, remote: int) -> _Origin | None:
        """The origin's stand-in if it is open already (busy counted), else None."""
        with self._lock:
            o = self.origins.get((holder, remote))
            if o is None or o.proc.closed:
                return None
            self.origins.move_to_end((holder, remote))
            o.busy += 1
            return o

    def _enqueue_worker(self, query: zenoh.Query) -> None:
        try:
            self._queue.put_nowait(query)
        except queue.Full:
            self.refused += 1
            self._fail(query, OutOfMemory(f"gateway {self.name} has {QUEUE} requests waiting"))
            with contextlib.suppress(Exception):
                query.drop()

    def _work(self) -> None:
        hello_key = key(self.name, "hello")
        q_key = key(self.name, "q")
        while not self._stop.is_set():
            try:
                query = self._queue.get(timeout=0.25)
            except queue.Empty:
                continue
            try:
                k = str(query.key_expr)
                if k == q_key:
                    self._request(query)
                elif k == hello_key:
                    self._hello(query)
                else:
                    raise WireError(f"nothing is served at {k[:120]}")
            except (WireError, IpcError) as exc:
                self.refused += 1
                self._fail(query, exc)
            except Exception as exc:  # never let one query end a worker
                self.refused += 1
                log.exception("gateway %s: a query failed", self.name)
                self._fail(query, exc)
            finally:
                with contextlib.suppress(Exception):
                    query.drop()

    def _fail(self, query: zenoh.Query, exc: Exception) -> None:
        if isinstance(exc, RemoteError):
            kind, code = (1, exc.code) if exc.code is not None else (2, 0)
            raw = pack_error(kind, code, exc.text if isinstance(exc.text, str) else str(exc))
        elif isinstance(exc, IpcError):
            raw = pack_error(0, type(exc).code, str(exc))
        else:
            raw = pack_error(0, PermissionDenied.code if isinstance(exc, WireError) else 1,
                             f"{type(exc).__name__}: {exc}"[:1000])
        with contextlib.suppress(Exception):
            query.reply_err(raw)

    def _hello(self, query: zenoh.Query) -> None:
        payload = query.payload
        if payload is None or len(payload) > 4096:
            raise WireError("a hello is at most 4096 bytes")
        try:
            h = decode_hello(payload.to_bytes())
            check_host(h.name)
        except Exception:
            raise WireError("not a gateway hello") from None
        if h.v != 1 or h.to != self.name or len(h.key) != 32 or len(h.nonce) != 16:
            raise WireError("a hello for another gateway, or malformed")
        if abs(time.time() - h.ts) > HELLO_SKEW:
            raise PermissionDenied("hello too old or from the future (check the clocks)")
        if not verify_signature(h.key, h.sig, hello_signed_part(h)):
            raise PermissionDenied("hello not signed by the key it names")
        if self.cfg.peers:
            peer = self.cfg.peers.get(h.name)
            if peer is None or peer.key != h.key:
                raise PermissionDenied(f"gateway {h.name!r} (with this key) is not one of "
                                       f"{self.name}'s peers")
        if h.name in self.verifier.revoked_holders or h.name == self.name:
            raise PermissionDenied(f"gateway {h.name!r} is cut off by {self.name}")
        exports = []
        with self._lock:
            current = list(self.exported.values())
        for e in current:
            rule = self.rule_for(e.name, h.name)
            if rule is not None:
                exports.append(Export(e.name, e.live, self._token(h.name, h.key, rule)))
        with self._lock:
            topics = list(self.topics.values())
        for t in topics:
            rule = self.rule_for(t.name, h.name)
            if rule is not None and "subscribe" in rule.rights:
                exports.append(Export(t.name, t.live, self._token(h.name, h.key, rule), "topic",
                                      t.max_size))
        query.reply(query.key_expr, encode(Welcome(1, _pub(self.key), exports)))

    def _token(self, holder: str, holder_key: bytes, rule: ExportRule) -> bytes:
        k = (holder, holder_key, rule.pattern)
        now = time.time()
        with self._lock:
            hit = self._reuse.get(k)
            if hit is not None and hit[1] - now > self.cfg.token_ttl / 2:
                return hit[0]
        tok, body = issue(self.key, issuer=self.name, holder=holder, holder_key=holder_key,
                          service=rule.pattern, rights=rule.rights, rate=rule.rate,
                          bandwidth=rule.bandwidth, max_message_size=rule.max_message_size,
                          ttl=self.cfg.token_ttl)
        with self._lock:
            if len(self._reuse) >= 65536:  # a cache: the oldest go (a new hello re-issues)
                self._reuse.pop(next(iter(self._reuse)))
            self._reuse[k] = (tok, body.expires)
            self.issued[body.id] = {"id": body.id.hex(), "holder": holder,
                                    "service": rule.pattern, "rights": sorted(rule.rights),
                                    "expires": body.expires}
            if len(self.issued) > 65536:  # bookkeeping only: the oldest go
                self.issued.pop(next(iter(self.issued)))
        log.info("gateway %s issued token %s to %s for %s", self.name, body.id.hex(), holder,
                 rule.pattern)
        return tok

    def _request(self, query: zenoh.Query) -> None:
        """On a worker: a batch of one-way messages, or a topic subscription (calls are tasks
        on the loop, see _call)."""
        att = query.attachment
        if att is None:
            raise WireError("a request without its header")
        kind, token, name, _opcode, _flags, _data, _tmo, origin = unpack_request(att.to_bytes())
        zb = query.payload
        # the token first: nothing of an unchecked request is copied or kept
        if kind == SUB:
            self._subscribe(self.verifier.check(token, name, "subscribe", 0), name, query)
            return
        if kind != SEND:
            raise WireError("only one-way batches and topic subscriptions reach the workers")
        checked = self.verifier.check(token, name, "send", 0)
        payload = zb.to_bytes() if zb is not None else b""
        if name not in self.exported:
            raise ServiceNotFound(f"{self.name} exports no live service {name[:200]!r}")
        o = self._origin(checked.body.holder, origin)
        try:
            ep = o.endpoint(name)
            msgs = unpack_batch(payload)
            now = time.monotonic()
            for m in msgs:
                checked.admit(len(m[3]), now)
            sent = self._send(ep, msgs)
            query.reply(query.key_expr, ACK.pack(sent, len(msgs) - sent))
        finally:
            with self._lock:
                o.busy -= 1

    def _subscribe(self, checked: Any, name: str, query: zenoh.Query) -> None:
        """A remote gateway asks for (or renews) a topic's flow, with its checked token."""
        t = self.topics.get(name)
        if t is None:
            raise ServiceNotFound(f"{self.name} exports no live topic {name[:200]!r}")
        b = checked.body
        t.holders[b.holder] = (b.id, b.expires)  # one entry per importing gateway: bounded
        query.reply(query.key_expr, ACK.pack(1, 0))

    def _send(self, ep: Endpoint, msgs: list[Any]) -> int:
        """Queue the batch on the local service, waiting (never dropping silently) while its
        ring is full: the importer holds its next batch meanwhile, its ring fills, and its
        senders see WouldBlock. Past send_timeout the rest is refused and counted."""
        deadline = time.monotonic() + self.cfg.send_timeout
        sent = 0
        delay = 0.0002
        for opcode, flags, data, p in msgs:
            while True:
                try:
                    ep.send_async(opcode, data, p, flags=flags)
                    sent += 1
                    break
                except WouldBlock:
                    if time.monotonic() > deadline or self._stop.is_set():
                        self.dropped += len(msgs) - sent
                        return sent
                    time.sleep(delay)
                    delay = min(delay * 2, 0.02)
        return sent

    # ---- remote origins as local processes ---------------------------------------------------

    def _origin(self, holder: str, remote: int) -> _Origin:
        k = (holder, remote)
        with self._lock:
            o = self.origins.get(k)
            if o is not None and not o.proc.closed:
                self.origins.move_to_end(k)
                o.busy += 1
                return o
            mine = [x for x in self.origins.values() if x.holder == holder]
            victim = None
            # max_origins per remote gateway, and 4x that for all together (each one is a
            # connection to the kernel: its connections_per_pid bounds this process)
            pool = mine if len(mine) >= self.cfg.max_origins else (
                list(self.origins.values())
                if len(self.origins) >= 4 * self.cfg.max_origins else None)
            if pool is not None:
                victim = next((x for x in pool if x.busy == 0), None)
                if victim is None:
                    raise OutOfMemory(f"{self.name}: {len(pool)} remote processes are calling "
                                      "at once (max_origins)")
                self._forget(victim)
        if victim is not None:
            with contextlib.suppress(Exception):
                victim.proc.close()
        proc = connect(self.socket_path)
        o = _Origin(holder, remote, proc, busy=1)
        with self._lock:
            self.origins[k] = o
            self.by_pid[proc.id] = o
        return o

    def _forget(self, o: _Origin) -> None:
        self.origins.pop((o.holder, o.remote), None)
        self.by_pid.pop(o.proc.id, None)

    def _drop_origin(self, o: _Origin) -> None:
        with self._lock:
            self._forget(o)
        with contextlib.suppress(Exception):
            o.proc.close()

    def origin_of(self, pid: int) -> dict[str, Any] | None:
        o = self.by_pid.get(pid)
        return None if o is None else {"gateway": self.name, "host": o.holder,
                                       "process": o.remote}

    def _serve_origin(self) -> None:
        def handler(req: Any) -> Any:
            if req.opcode != ORIGIN_OPCODE:
                raise ValueError(f"capbus.gateway@{self.name}: opcode 1 only")
            found = self.origin_of(req.data[0])
            if found is None:
                raise ProcessNotFound(f"process {req.data[0]} is no remote caller of "
                                      f"{self.name}")
            req.reply_object(found)
            return None

        with contextlib.suppress(IpcError):
            self.origin_svc.serve(handler)


def _ender(exporter: Exporter, e: _Exported) -> Any:
    def gone(_ep: Endpoint) -> None:
        # On the runtime's control thread, which must never block: the endpoint's close() is a
        # kernel request that this very thread would have to answer (it hung the exporter's
        # connection for good when a service's death notice came before the scan saw it).
        threading.Thread(target=exporter._gone, args=(e,), name="capbus-gw-gone",
                         daemon=True).start()
    return gone


def _fits(name: str, pattern: str) -> bool:
    from fnmatch import fnmatchcase
    return name == pattern or fnmatchcase(name, pattern)


def _pub(k: Ed25519PrivateKey) -> bytes:
    from .token import public_bytes
    return public_bytes(k)
