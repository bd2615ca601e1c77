"""What gateways say to each other over Zenoh: key expressions, and the fixed binary headers of
requests and replies (struct, so that per-request work stays a pack and an unpack).

Key space of a gateway H (every key under capbus/gw/H/):
  hello            queryable: a signed hello in, the exports this peer may have (with tokens) out
  q                queryable: one call (kind CALL) or a batch of one-way messages (kind SEND)
  origin/...       (nothing: the origin of a remote caller is asked locally, see export.py)
  alive            liveliness token: the gateway is up (its loss: every import from H dies)
  svc/<live id>    liveliness token per exported service or topic incarnation (its loss: that
                   one died)
  t/<holder>/<live id>  the samples of an exported topic, put once per importing gateway (the
                   holder) that asked for them with its token (a SUB request on q)
Everything read here comes from the network: each decoder checks sizes and raises WireError.
"""

from __future__ import annotations

import re
import struct

import msgspec

PREFIX = "capbus/gw"
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")

CALL = 1
SEND = 2
SUB = 3  # start (or renew) a topic's flow to the importing gateway; answered with an ACK
CANCEL = 4  # the caller of the call with this call id stopped waiting: cancel it; an ACK
# request attachment: version, kind, name length, token length, opcode, flags, d0..d3, call id
# (the importer's, to cancel it by; 0: none), timeout (ms), origin ProcessId (the caller on the
# importing host); then token, then name
REQ = struct.Struct("<BBHHIIQQQQQIQ")
# reply attachment: opcode, flags, d0..d3
REP = struct.Struct("<IIQQQQ")
# error reply payload: 0 = a capbus error (code is its class's), 1 = the service's own
# (RemoteError with .code), 2 = a handler's exception (RemoteError, .code None); then text
ERR = struct.Struct("<BQ")
# one message of a SEND batch: opcode, flags, d0..d3, payload length; then the payload
MSG = struct.Struct("<IIQQQQI")
# SEND batch reply: delivered, refused (the service's ring stayed full past the send timeout)
ACK = struct.Struct("<II")
# a topic sample's attachment: its sequence number on the exporting host, opcode, d0..d3
SAMPLE = struct.Struct("<QIQQQQ")
MAX_TEXT = 4096
MAX_BATCH = 256


class WireError(ValueError):
    """Bytes from the network that are not a gateway message."""


def check_host(name: object, what: str = "gateway name") -> str:
    if not isinstance(name, str) or not _HOST.match(name):
        raise ValueError(f"{what} {name!r:.80}: use 1..63 ASCII letters, digits, '_', '.' or '-' "
                         "(it is a Zenoh key chunk and the HOST of NAME@HOST)")
    return name


def key(host: str, what: str) -> str:
    return f"{PREFIX}/{host}/{what}"


def pack_request(kind: int, token: bytes, name: bytes, opcode: int, flags: int,
                 data: tuple[int, int, int, int], timeout_ms: int, origin: int,
                 call: int = 0) -> bytes:
    return REQ.pack(1, kind, len(name), len(token), opcode, flags, *data, call,
                    timeout_ms, origin) + token + name


def call_id(att: bytes) -> int:
    """The call id of a request header unpack_request accepted."""
    return int(REQ.unpack_from(att)[10])


def unpack_request(att: bytes) -> tuple[int, bytes, str, int, int, tuple[int, int, int, int],
                                        int, int]:
    """(kind, token, service name, opcode, flags, data, timeout ms, origin)."""
    if len(att) < REQ.size:
        raise WireError("short request header")
    v, kind, nlen, tlen, opcode, flags, d0, d1, d2, d3, _call, tmo, origin = REQ.unpack_from(att)
    if v != 1 or kind not in (CALL, SEND, SUB, CANCEL) or len(att) != REQ.size + nlen + tlen or not nlen:
        raise WireError("bad request header")
    token = att[REQ.size:REQ.size + tlen]
    try:
        name = att[REQ.size + tlen:].decode()
    except UnicodeDecodeError:
        raise WireError("service name is not UTF-8") from None
    return kind, token, name, opcode, flags, (d0, d1, d2, d3), tmo, origin


def pack_error(kind: int, code: int, text: str) -> bytes:
    return ERR.pack(kind, code) + text.encode("utf-8", "replace")[:MAX_TEXT]


def unpack_error(raw: bytes) -> tuple[int, int, str]:
    if len(raw) < ERR.size:
        raise WireError("short error reply")
    kind, code = ERR.unpack_from(raw)
    return kind, code, raw[ERR.size:ERR.size + MAX_TEXT].decode("utf-8", "replace")


def pack_batch(msgs: list[tuple[int, int, tuple[int, ...], bytes]]) -> bytes:
    parts: list[bytes] = []
    for opcode, flags, data, payload in msgs:
        parts.append(MSG.pack(opcode, flags, *data, len(payload)))
        parts.append(payload)
    return b"".join(parts)


def unpack_batch(raw: bytes | memoryview) -> list[tuple[int, int, tuple[int, int, int, int],
                                                       memoryview]]:
    view = memoryview(raw)
    out: list[tuple[int, int, tuple[int, int, int, int], memoryview]] = []
    off = 0
    while off < len(view):
        if len(view) - off < MSG.size or len(out) >= MAX_BATCH:
            raise WireError("bad one-way batch")
        opcode, flags, d0, d1, d2, d3, plen = MSG.unpack_from(view, off)
        off += MSG.size
        if plen > len(view) - off:
            raise WireError("one-way batch payload overruns")
        out.append((opcode, flags, (d0, d1, d2, d3), view[off:off + plen]))
        off += plen
    return out


class Hello(msgspec.Struct, array_like=True, frozen=True):
    """An importing gateway's signed hello: who it is (name, Ed25519 public key), whom it
    greets, when (Unix time) and a nonce; sig covers everything before it."""

    v: int
    name: str
    key: bytes
    to: str
    ts: float
    nonce: bytes
    sig: bytes = b""


class Export(msgspec.Struct, array_like=True, frozen=True):
    """One export: kind "service" or "topic" (then max_size: its samples' largest size)."""

    name: str
    live: str
    token: bytes
    kind: str = "service"
    max_size: int = 0


class Welcome(msgspec.Struct, array_like=True, frozen=True):
    """The exporter's answer: its public key and the exports this peer may have."""

    v: int
    key: bytes
    exports: list[Export]


encode = msgspec.msgpack.Encoder().encode
decode_hello = msgspec.msgpack.Decoder(Hello).decode
decode_welcome = msgspec.msgpack.Decoder(Welcome).decode


def hello_signed_part(h: Hello) -> bytes:
    return encode(Hello(h.v, h.name, h.key, h.to, h.ts, h.nonce))
