"""Control-plane frames: the message classes and their encoding, with no I/O.

A frame is one SOCK_SEQPACKET datagram: a 16-byte header (magic, version, kind, type, request
id, body length) followed by a JSON object whose keys and value types are fixed per message
type. Decoding validates everything (size, header, exact key set, value ranges, attached fd
count) and raises ProtocolError on anything else, so the shells never see a malformed event.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from dataclasses import field as dataclass_field
from typing import Any, ClassVar, TypeVar, dataclass_transform

from .._errors import ProtocolError
from .names import check_grant_key

MAGIC = b"CB"
VERSION = 1
MAX_FRAME = 64 * 1024
MAX_FDS = 8
HEADER = struct.Struct("<2sBBHHII")  # magic, version, kind, type, flags, request_id, body_len
U64_MAX = (1 << 64) - 1
MAX_STR = 4096
MAX_LIST = 1024
# Limits travel as a small dict: a process asks with expires_in_ms, the kernel tells expires_at_ns.
# max_priority travels as the priority + PRIO_CTRL_BIAS (every value is a u64; see Endpoint.restrict).
LIMIT_KEYS = frozenset({"rate", "bandwidth", "max_message_size", "expires_in_ms", "expires_at_ns",
                        "max_priority"})
# A service's bounds on what its clients may attach to one message and how many channels one of
# them may hold (the kernel checks the values; see Kernel's ServiceBounds).
BOUND_KEYS = frozenset({"max_caps", "max_regions", "max_region_bytes", "max_channels_per_process",
                        "max_channels_per_uid", "attach_ttl_ms"})

# Startup grants one process may hold (Welcome lists them all; the kernel refuses more at spawn
# and when it loads a policy). A grant's rights are at most an endpoint's.
MAX_GRANTS = 64
GRANT_KEYS = frozenset({"key", "handle", "process_id", "name", "rights", "limits"})
GRANT_RIGHTS = frozenset({"send", "share"})

KIND_REQUEST = 1
KIND_RESPONSE = 2
KIND_EVENT = 3


@dataclass(frozen=True)
class Frame:
    """Base of every frame body. Subclasses set TYPE, KIND and, when fds travel with it, FDS."""

    TYPE: ClassVar[int] = 0
    KIND: ClassVar[int] = 0
    FDS: ClassVar[int] = 0  # exactly this many fds travel with the frame (SCM_RIGHTS)


def _check_value(cls: type, name: str, kind: str, value: Any) -> Any:
    """Validate one decoded JSON value against its declared field kind."""
    ok: bool
    if kind == "u64":
        ok = type(value) is int and 0 <= value <= U64_MAX
    elif kind == "i64":
        ok = type(value) is int and -(1 << 63) <= value < (1 << 63)
    elif kind == "bool":
        ok = type(value) is bool
    elif kind == "str":
        ok = type(value) is str and len(value) <= MAX_STR
    elif kind == "str?":
        ok = value is None or (type(value) is str and len(value) <= MAX_STR)
    elif kind == "strs?":
        ok = value is None or (
            type(value) is list
            and len(value) <= MAX_LIST
            and all(type(v) is str and len(v) <= MAX_STR for v in value)
        )
    elif kind in ("limits", "bounds"):
        keys = LIMIT_KEYS if kind == "limits" else BOUND_KEYS
        ok = value is None or (
            type(value) is dict
            and set(value) <= keys
            and all(type(v) is int and 0 <= v <= U64_MAX for v in value.values())
        )
    elif kind == "u64s":
        ok = (
            type(value) is list
            and len(value) <= MAX_LIST
            and all(type(v) is int and 0 <= v <= U64_MAX for v in value)
        )
    elif kind == "rows":
        ok = (
            type(value) is list
            and len(value) <= MAX_LIST
            and all(type(v) is dict for v in value)
        )
    elif kind == "grants":
        ok = type(value) is list and len(value) <= MAX_GRANTS and all(
            _grant_row_ok(v) for v in value) and len({v["key"] for v in value}) == len(value)
    else:  # pragma: no cover - a schema mistake, caught by the unit tests
        raise AssertionError(f"unknown field kind {kind!r}")
    if not ok:
        raise ProtocolError(f"{cls.__name__}.{name}: bad value {value!r:.80} (expected {kind})")
    return value


def _grant_row_ok(row: Any) -> bool:
    """One Welcome grant: its key, and the endpoint (handle 0: not resolved yet, ask with Grant;
    then process_id is 0, name empty, rights and limits empty)."""
    if type(row) is not dict or set(row) != GRANT_KEYS:
        return False
    key, handle, pid, name = row["key"], row["handle"], row["process_id"], row["name"]
    rights, limits = row["rights"], row["limits"]
    try:
        check_grant_key(key)
    except (TypeError, ValueError):
        return False
    if not (type(handle) is int and 0 <= handle <= U64_MAX and type(pid) is int
            and 0 <= pid <= U64_MAX and type(name) is str and len(name) <= MAX_STR):
        return False
    if not (type(rights) is list and len(rights) <= len(GRANT_RIGHTS)
            and all(type(r) is str and r in GRANT_RIGHTS for r in rights)
            and len(set(rights)) == len(rights)):
        return False
    if not (type(limits) is dict and set(limits) <= LIMIT_KEYS
            and all(type(v) is int and 0 <= v <= U64_MAX for v in limits.values())):
        return False
    return handle != 0 or (pid == 0 and name == "" and not rights and not limits)


_REGISTRY: dict[int, type[Frame]] = {}
_SCHEMAS: dict[type[Frame], tuple[tuple[str, str], ...]] = {}
_REQUIRED: dict[type[Frame], frozenset[str]] = {}  # fields without a default


_M = TypeVar("_M", bound=Frame)


# dataclass_transform: type checkers see each frame class as the frozen dataclass wrap() makes of
# it (its generated __init__), as at run time.
@dataclass_transform(frozen_default=True)
def message(type_code: int, kind: int, fds: int = 0, **schema: str) -> Callable[[type[_M]], type[_M]]:
    """Class decorator: register a frame type with its field kinds (see _check_value)."""

    def wrap(cls: type[_M]) -> type[_M]:
        cls = dataclass(frozen=True)(cls)
        names = tuple(f.name for f in fields(cls))
        if set(names) != set(schema):  # pragma: no cover - schema mistake
            raise AssertionError(f"{cls.__name__}: schema {sorted(schema)} != fields {names}")
        if type_code in _REGISTRY:  # pragma: no cover - schema mistake
            raise AssertionError(f"duplicate frame type {type_code}")
        cls.TYPE, cls.KIND, cls.FDS = type_code, kind, fds
        _REGISTRY[type_code] = cls
        _SCHEMAS[cls] = tuple((n, schema[n]) for n in names)
        _REQUIRED[cls] = frozenset(f.name for f in fields(cls) if f.default is MISSING
                                   and f.default_factory is MISSING)
        return cls

    return wrap


# ---- requests (process -> kernel) -------------------------------------------------------------


@message(1, KIND_REQUEST, version="u64", wait_mode="str")
class Hello(Frame):
    version: int
    wait_mode: str


@message(2, KIND_REQUEST, name="str", allow="strs?", limits="limits", bounds="bounds",
         gateway="bool")
class Register(Frame):
    """limits: the defaults for every endpoint the service hands out. bounds: what one message
    may carry and how many channels one client may hold (BOUND_KEYS; None: the defaults).
    gateway: the process asks to serve a NAME@HOST name as a gateway (the kernel's policy
    decides whether it may)."""

    name: str
    allow: list[str] | None = None
    limits: dict[str, int] | None = None
    bounds: dict[str, int] | None = None
    gateway: bool = False


@message(3, KIND_REQUEST, allow="strs?", limits="limits", bounds="bounds")
class RegisterPackage(Frame):
    allow: list[str] | None = None
    limits: dict[str, int] | None = None
    bounds: dict[str, int] | None = None


@message(4, KIND_REQUEST, name="str", timeout_ms="u64")
class Lookup(Frame):
    name: str
    timeout_ms: int = 0


@message(5, KIND_REQUEST, package="str", timeout_ms="u64")
class LookupPackage(Frame):
    package: str
    timeout_ms: int = 0


@message(6, KIND_REQUEST)
class Subscribe(Frame):
    pass


@message(7, KIND_REQUEST, handle="u64")
class NotifyAck(Frame):
    """The subscriber consumed its pending notification: the kernel may send the next one."""

    handle: int


@message(8, KIND_REQUEST, handle="u64")
class Watch(Frame):
    handle: int


@message(9, KIND_REQUEST, handle="u64")
class Release(Frame):
    """Drop a capability (close an endpoint, unregister a service, end a subscription)."""

    handle: int


@message(11, KIND_REQUEST, handle="u64")
class OpenChannel(Frame):
    """A channel (one lane: rings and arenas) to the service an endpoint names."""

    handle: int


@message(12, KIND_REQUEST, handle="u64", index="u64")
class CloseChannel(Frame):
    handle: int
    index: int


@message(13, KIND_REQUEST, handle="u64", index="u64", reason="str")
class ReportBad(Frame):
    """A service found garbage on one of its channels; the kernel closes and records it."""

    handle: int
    index: int
    reason: str


@message(14, KIND_REQUEST, handle="u64", allow="strs?", deny="strs?")
class Access(Frame):
    """A service changes who may reach it (applies to live channels too)."""

    handle: int
    allow: list[str] | None
    deny: list[str] | None


@message(15, KIND_REQUEST, handle="u64", rights="strs?", limits="limits")
class Restrict(Frame):
    """A child capability with fewer rights / tighter limits (rights None: keep them)."""

    handle: int
    rights: list[str] | None
    limits: dict[str, int]


@message(16, KIND_REQUEST, handle="u64")
class Revoke(Frame):
    """Invalidate a capability and everything derived from it."""

    handle: int


@message(17, KIND_REQUEST, handle="u64", via="u64", index="u64", tag="u64", move="bool")
class Delegate(Frame):
    """Attach a child of `handle` to the message with `tag` on channel `index` of endpoint `via`;
    only the process serving that endpoint can claim it, for that message. move: the sender
    gives its own capability up (a region transfer)."""

    handle: int
    via: int
    index: int
    tag: int
    move: bool = False


@message(22, KIND_REQUEST, via="u64", index="u64", tag="u64", caps="u64s", regions="u64s",
         move="bool")
class Attach(Frame):
    """Attach children of these capabilities and regions to the message with `tag` on this
    process's channel `index` of endpoint `via`, all or nothing: refused as a whole when the
    message would exceed the service's bounds. move: the regions are moved (the sender gives
    them up)."""

    via: int
    index: int
    tag: int
    caps: list[int]
    regions: list[int]
    move: bool = False


@message(23, KIND_REQUEST, via="u64", index="u64", tag="u64")
class Detach(Frame):
    """Drop what this process attached to `tag` on its channel `index` of endpoint `via`: the
    message it was meant for was never sent (so it cannot ride on the next one)."""

    via: int
    index: int
    tag: int


@message(19, KIND_REQUEST, size="u64")
class CreateRegion(Frame):
    size: int


@message(20, KIND_REQUEST, handle="u64")
class MapRegion(Frame):
    """The fd of a region this process holds a capability to (e.g. one it claimed)."""

    handle: int


@message(21, KIND_REQUEST, handle="u64")
class SealRegion(Frame):
    """Seal a region against writes for good (no writable mapping may remain anywhere)."""

    handle: int


@message(18, KIND_REQUEST, handle="u64", index="u64", tag="u64", generation="u64")
class Claim(Frame):
    """A service takes the capabilities attached to one received message: the message with
    `tag` on the channel instance (`index`, `generation`) it came from (generation 0 names no
    channel). The answer has at most the service's per-message bounds of rows; its total says
    how many were attached (the difference was released in the kernel)."""

    handle: int
    index: int
    tag: int
    generation: int = 0


@message(24, KIND_REQUEST, key="str", timeout_ms="u64")
class Grant(Frame):
    """This process's startup grant `key` (one it was launched with, or its package has in the
    policy): its endpoint, resolved now if the service has registered since Welcome; else
    ServiceNotFound unless it registers within timeout_ms."""

    key: str
    timeout_ms: int = 0


@message(25, KIND_REQUEST, name="str", max_size="u64", history="u64", overflow="str",
         allow="strs?", max_subscribers="u64", max_depth="u64", max_held="u64",
         gateway="bool")
class PublishTopic(Frame):
    """Own the topic `name` (one publisher per name): the kernel sizes and makes its sample
    pool and answers TopicCreated with the pool's fd. Nobody can subscribe until SealTopic.
    gateway: publish a NAME@HOST topic (a remote one) as a gateway, as Register's."""

    name: str
    max_size: int
    history: int = 0
    overflow: str = "drop-oldest"
    allow: list[str] | None = None
    max_subscribers: int = 8
    max_depth: int = 16
    max_held: int = 8
    gateway: bool = False


@message(26, KIND_REQUEST, handle="u64")
class SealTopic(Frame):
    """The publisher has mapped its pool writable: the kernel seals it against every other
    write and opens the topic to subscribers."""

    handle: int


@message(27, KIND_REQUEST, name="str", depth="u64", handle="u64")
class SubscribeTopic(Frame):
    """By name (the topic's allowlist decides), or through a topic capability with the
    subscribe right (handle: one this process was handed; its name is ignored)."""

    name: str
    depth: int = 0  # 0: the topic's max_depth
    handle: int = 0


@message(28, KIND_REQUEST, handle="u64", index="u64", reason="str")
class DropSubscriber(Frame):
    """The publisher cuts one subscriber off (it held or released what it may not)."""

    handle: int
    index: int
    reason: str


@message(10, KIND_REQUEST, what="str", offset="u64", limit="u64", process_id="u64")
class Query(Frame):
    """Introspection for the CLI: "processes", "services" or "caps" (of process_id); paged."""

    what: str
    offset: int = 0
    limit: int = 200
    process_id: int = 0


# ---- responses (kernel -> process) ------------------------------------------------------------


@message(64, KIND_RESPONSE, process_id="u64", package="str?", pid="u64", grants="grants")
class Welcome(Frame):
    """grants: the capabilities the process starts with, one row per key (GRANT_KEYS); a row
    with handle 0 names a grant whose service was not there yet (ask for it with Grant)."""

    process_id: int
    package: str | None
    pid: int
    grants: list[dict[str, Any]] = dataclass_field(default_factory=list)


@message(65, KIND_RESPONSE)
class Ok(Frame):
    pass


@message(66, KIND_RESPONSE, code="u64", text="str")
class Error(Frame):
    code: int
    text: str


@message(67, KIND_RESPONSE, fds=3, handle="u64", name="str")
class Registered(Frame):
    """A service capability, with its doorbell, the doorbell's eventfd (for asyncio) and its
    sleep eventfd (a blocking server sleeps on it)."""

    handle: int
    name: str


@message(68, KIND_RESPONSE, handle="u64", process_id="u64", name="str", rights="strs?",
         limits="limits")
class Granted(Frame):
    """An endpoint capability: the handle, the serving process, its rights and limits."""

    handle: int
    process_id: int
    name: str
    rights: list[str] | None = None
    limits: dict[str, int] | None = None


@message(69, KIND_RESPONSE, handle="u64")
class Subscribed(Frame):
    handle: int


@message(71, KIND_RESPONSE, fds=7, index="u64", nslots="u64", arena_size="u64", pid="u64")
class ChannelGranted(Frame):
    """A channel's fds: the channel memfd, its control page, the service's doorbell, its
    eventfd, the channel's reply eventfd, the service's sleep eventfd and the read end of the
    channel's reply-sleep pipe."""

    index: int
    nslots: int
    arena_size: int
    # The server's OS pid, vouched for by the kernel now: the runtime opens a pidfd on it at
    # once, so that it still sees the server die once the kernel is gone (0: unknown).
    pid: int = 0


@message(72, KIND_RESPONSE, fds=1, handle="u64", size="u64", rights="strs?")
class RegionGranted(Frame):
    """A region capability and its memfd (read-only unless the capability has the write right)."""

    handle: int
    size: int
    rights: list[str] | None = None


@message(73, KIND_RESPONSE, fds=1, handle="u64", nslots="u64", slot_size="u64")
class TopicCreated(Frame):
    """A topic capability (publish, subscribe) and its sample pool's memfd, to map writable
    before SealTopic."""

    handle: int
    nslots: int
    slot_size: int


@message(74, KIND_RESPONSE, fds=4, handle="u64", index="u64", publisher="u64", nslots="u64",
         slot_size="u64", max_size="u64", depth="u64", max_held="u64")
class TopicSubscribed(Frame):
    """A subscription (subscribe right): the sealed pool, the subscription's control page
    (sealed), its ring and its eventfd."""

    handle: int
    index: int
    publisher: int
    nslots: int
    slot_size: int
    max_size: int
    depth: int
    max_held: int


@message(70, KIND_RESPONSE, rows="rows", total="u64")
class Rows(Frame):
    rows: list[dict[str, Any]]
    total: int


# ---- events (kernel -> process, request id 0) ---------------------------------------------------


@message(128, KIND_EVENT, handle="u64")
class RegistrationNotice(Frame):
    """Some service registered. Carries no identity: the subscriber re-discovers."""

    handle: int


@message(129, KIND_EVENT, handle="u64", process_id="u64")
class Death(Frame):
    """A watched endpoint's serving process has exited."""

    handle: int
    process_id: int


@message(130, KIND_EVENT, fds=5, handle="u64", index="u64", sender="u64", nslots="u64",
         arena_size="u64", generation="u64", pid="u64")
class ChannelOpened(Frame):
    """To a service: a client opened a channel (fds: channel memfd, control page, the channel's
    reply eventfd, both ends of its reply-sleep pipe: the server writes one and only holds the
    other, so that a write never meets a pipe without a reader)."""

    handle: int
    index: int
    sender: int
    nslots: int
    arena_size: int
    generation: int = 0  # this channel instance's, unique per kernel: a claim names it
    pid: int = 0  # the client's OS pid (see ChannelGranted.pid)


@message(131, KIND_EVENT, handle="u64", index="u64")
class ChannelClosed(Frame):
    """To a service: that channel's client is gone or closed it."""

    handle: int
    index: int


@message(132, KIND_EVENT, key="str")
class GrantRevoked(Frame):
    """The spawner revoked this process's startup grant `key` (Child.revoke_grant): its
    endpoint is gone, and asking for it again is refused."""

    key: str


@message(133, KIND_EVENT, fds=2, handle="u64", index="u64", process_id="u64", depth="u64")
class SubscriberJoined(Frame):
    """To a publisher: a subscriber joined (fds: the subscription's ring and eventfd)."""

    handle: int
    index: int
    process_id: int
    depth: int


@message(134, KIND_EVENT, handle="u64", index="u64")
class SubscriberLeft(Frame):
    """To a publisher: that subscriber is gone (closed, died, revoked, cut off): every
    sample it held is free."""

    handle: int
    index: int


@message(135, KIND_EVENT, handle="u64", reason="u64")
class TopicClosed(Frame):
    """To a subscriber: its subscription ended (reason: _topic_layout.REASON_*)."""

    handle: int
    reason: int


# Which responses a request may legitimately get (Error always may).
RESPONSES: dict[type[Frame], tuple[type[Frame], ...]] = {
    Hello: (Welcome,),
    Register: (Registered,),
    RegisterPackage: (Registered,),
    Lookup: (Granted,),
    LookupPackage: (Granted,),
    Subscribe: (Subscribed,),
    NotifyAck: (Ok,),
    Watch: (Ok,),
    Release: (Ok,),
    Query: (Rows,),
    Grant: (Granted,),
    OpenChannel: (ChannelGranted,),
    CloseChannel: (Ok,),
    ReportBad: (Ok,),
    Access: (Ok,),
    Restrict: (Granted,),
    Revoke: (Ok,),
    Delegate: (Ok,),
    Attach: (Ok,),
    Detach: (Ok,),
    Claim: (Rows,),
    CreateRegion: (RegionGranted,),
    MapRegion: (RegionGranted,),
    SealRegion: (Ok,),
    PublishTopic: (TopicCreated,),
    SealTopic: (Ok,),
    SubscribeTopic: (TopicSubscribed,),
    DropSubscriber: (Ok,),
}


def encode(msg: Frame, request_id: int = 0) -> bytes:
    """One frame. Raises ProtocolError if the receiving side's decode() would refuse it (a value
    out of its field's range, text that is not UTF-8) or if it would exceed MAX_FRAME: a sender
    learns of its own mistake, and never costs the receiver its connection."""
    cls = type(msg)
    body = {name: _check_value(cls, name, kind, getattr(msg, name)) for name, kind in _SCHEMAS[cls]}
    try:
        raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    except (UnicodeEncodeError, ValueError, TypeError) as exc:
        raise ProtocolError(f"{cls.__name__}: cannot encode ({exc!s:.200})") from None
    frame = HEADER.pack(MAGIC, VERSION, msg.KIND, msg.TYPE, 0, request_id, len(raw)) + raw
    if len(frame) > MAX_FRAME:
        raise ProtocolError(f"{type(msg).__name__} frame of {len(frame)} bytes exceeds {MAX_FRAME}")
    return frame


def decode(data: bytes, nfds: int = 0) -> tuple[Frame, int]:
    """Parse one frame into (message, request_id); ProtocolError on anything malformed."""
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(data)} bytes exceeds the maximum of {MAX_FRAME}")
    if len(data) < HEADER.size:
        raise ProtocolError(f"truncated frame: {len(data)} bytes, header needs {HEADER.size}")
    magic, version, kind, type_code, flags, request_id, body_len = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}: not a capbus peer")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version} not supported (this side speaks {VERSION})")
    if flags != 0:
        raise ProtocolError(f"unknown frame flags {flags:#x}")
    if body_len != len(data) - HEADER.size:
        raise ProtocolError(f"body length {body_len} != {len(data) - HEADER.size} bytes received")
    cls = _REGISTRY.get(type_code)
    if cls is None or kind != cls.KIND:
        raise ProtocolError(f"unknown frame type {type_code} of kind {kind}")
    if nfds != cls.FDS:
        raise ProtocolError(f"{cls.__name__} carries {cls.FDS} fds, got {nfds}")
    try:
        body = json.loads(data[HEADER.size :])
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"{cls.__name__}: body is not valid JSON ({exc})") from None
    # Every field without a default must be there; fields with one may be left out (a peer of an
    # earlier revision of this version); nothing unknown may be.
    schema = _SCHEMAS[cls]
    if type(body) is not dict or not _REQUIRED[cls] <= set(body) <= {n for n, _ in schema}:
        keys = sorted(body) if type(body) is dict else type(body).__name__
        raise ProtocolError(f"{cls.__name__}: fields {keys} do not fit {[n for n, _ in schema]}")
    values = {name: _check_value(cls, name, kind_, body[name])
              for name, kind_ in schema if name in body}
    return cls(**values), request_id
