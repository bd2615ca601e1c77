"""Capability tokens one gateway issues another: what a remote gateway may do with one export.

A token is the msgpack body (TokenBody) followed by the issuer's Ed25519 signature of it (64
bytes). The exporting gateway signs it at hello time and checks it on every request; checking a
signature costs more than a local call, so a token is verified once and cached by its bytes (its
id in the bytes: a forged token with a known id is other bytes, and is verified on its own). A
token is a bearer credential: whoever sees it on a link without TLS can replay it until it
expires or is revoked (docs/ARCHITECTURE.md, "Gateways").
"""

from __future__ import annotations

import base64
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from fnmatch import fnmatchcase

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .._errors import InvalidCapability, PermissionDenied, RateLimitExceeded

SIG = 64
MAX_TOKEN = 2048  # bytes: a token larger than this is garbage before any signature check
RIGHTS = frozenset({"call", "send", "subscribe"})


class TokenBody(msgspec.Struct, array_like=True, frozen=True):
    """What the issuer signs. service: the export's name or glob; rights: "call" (calls),
    "send" (one-way messages) and "subscribe" (a topic's samples); rate (messages/s),
    bandwidth (payload bytes/s), max_message_size (bytes): 0 is no limit; expires: Unix time."""

    v: int
    id: bytes
    issuer: str
    holder: str
    holder_key: bytes
    service: str
    rights: tuple[str, ...]
    rate: int
    bandwidth: int
    max_message_size: int
    expires: float


_encode = msgspec.msgpack.Encoder().encode
_decode_body = msgspec.msgpack.Decoder(TokenBody).decode


def new_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def load_key(path: str) -> Ed25519PrivateKey:
    """A gateway's Ed25519 private key from a PEM file (PKCS#8, no password)."""
    with open(path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key (make one with "
                         "`openssl genpkey -algorithm ed25519`)")
    return key


def public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_text(key: Ed25519PrivateKey) -> str:
    """The public key as the config file names it (base64 of the 32 raw bytes)."""
    return base64.b64encode(public_bytes(key)).decode()


def parse_public(text: str, where: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raw = b""
    if len(raw) != 32:
        raise ValueError(f"{where}: a public key is base64 of 32 bytes (Gateway.public_key)")
    return raw


def issue(key: Ed25519PrivateKey, *, issuer: str, holder: str, holder_key: bytes, service: str,
          rights: frozenset[str], rate: int, bandwidth: int, max_message_size: int,
          ttl: float) -> tuple[bytes, TokenBody]:
    body = TokenBody(1, os.urandom(16), issuer, holder, holder_key, service,
                     tuple(sorted(rights)), rate, bandwidth, max_message_size, time.time() + ttl)
    raw = _encode(body)
    return raw + key.sign(raw), body


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    return key.sign(data)


def verify_signature(public: bytes, sig: bytes, data: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(sig, data)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass
class Checked:
    """A verified token, with its holder's budgets (token buckets), kept in the cache."""

    body: TokenBody
    tokens: float
    bytes_left: float
    stamp: float
    lock: threading.Lock

    def admit(self, nbytes: int, now: float) -> None:
        """Charge one message of `nbytes` to the token's limits (RateLimitExceeded)."""
        b = self.body
        if b.max_message_size and nbytes > b.max_message_size:
            from .._errors import MessageTooLarge
            raise MessageTooLarge(f"{nbytes} bytes: this gateway token allows at most "
                                  f"{b.max_message_size} bytes per message")
        if not (b.rate or b.bandwidth):
            return
        with self.lock:
            dt, self.stamp = now - self.stamp, now
            if b.rate:
                self.tokens = min(float(b.rate), self.tokens + dt * b.rate)
                if self.tokens < 1:
                    raise RateLimitExceeded(f"this gateway token allows {b.rate} messages/s")
            if b.bandwidth:
                self.bytes_left = min(float(b.bandwidth), self.bytes_left + dt * b.bandwidth)
                if self.bytes_left < nbytes:
                    raise RateLimitExceeded(f"this gateway token allows {b.bandwidth} bytes/s")
                self.bytes_left -= nbytes
            if b.rate:
                self.tokens -= 1


class Verifier:
    """The exporter's check of the tokens it issued: signature once (cached by the token's bytes,
    at most `cache` entries, least recently used out), then per request: issuer, holder,
    expiry, revocation, service and right, limits."""

    def __init__(self, name: str, key: Ed25519PrivateKey, cache: int = 4096) -> None:
        self.name = name
        self._public = public_bytes(key)
        self._cache: OrderedDict[bytes, Checked] = OrderedDict()
        self._max = cache
        self._lock = threading.Lock()
        self.revoked_ids: set[bytes] = set()
        self.revoked_holders: set[str] = set()

    def revoke(self, token_id: bytes) -> None:
        with self._lock:
            self.revoked_ids.add(token_id)

    def revoke_holder(self, holder: str) -> None:
        with self._lock:
            self.revoked_holders.add(holder)

    def restore_holder(self, holder: str) -> None:
        with self._lock:
            self.revoked_holders.discard(holder)

    def check(self, token: bytes, service: str, right: str, nbytes: int) -> Checked:
        """The checked token for a request to `service` with `right` carrying `nbytes`, or the
        capbus error its sender gets (InvalidCapability, PermissionDenied, RateLimitExceeded,
        MessageTooLarge)."""
        c = self._cache.get(token)
        if c is None:
            c = self._verify(token)
        b = c.body
        now = time.time()
        if b.expires < now:
            raise InvalidCapability(f"gateway token {b.id.hex()} expired: the importing gateway "
                                    "must say hello again for a new one")
        if b.id in self.revoked_ids or b.holder in self.revoked_holders:
            raise InvalidCapability(f"gateway token {b.id.hex()} was revoked by {self.name}")
        if service != b.service and not fnmatchcase(service, b.service):
            raise PermissionDenied(f"gateway token {b.id.hex()} is for {b.service!r}, not "
                                   f"{service[:200]!r}")
        if right not in b.rights:
            raise PermissionDenied(f"gateway token {b.id.hex()} lacks the right {right!r}")
        c.admit(nbytes, time.monotonic())
        return c

    def _verify(self, token: bytes) -> Checked:
        if not SIG < len(token) <= MAX_TOKEN:
            raise InvalidCapability("not a gateway token (bad length)")
        raw, sig = token[:-SIG], token[-SIG:]
        if not verify_signature(self._public, sig, raw):
            raise InvalidCapability(f"gateway token not signed by {self.name}")
        try:
            body = _decode_body(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise InvalidCapability("gateway token body is malformed") from None
        if body.issuer != self.name:
            raise InvalidCapability(f"gateway token issued by {body.issuer!r}, not {self.name!r}")
        c = Checked(body, float(body.rate), float(body.bandwidth), time.monotonic(),
                    threading.Lock())
        with self._lock:
            self._cache[token] = c
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        return c


def token_id(token: bytes) -> bytes:
    """The id inside a token (no signature check: for the holder's bookkeeping)."""
    return _decode_body(token[:-SIG]).id


def body_of(token: bytes) -> TokenBody:
    return _decode_body(token[:-SIG])


def rights_of(rights: object, where: str) -> frozenset[str]:
    if not isinstance(rights, list | tuple) or not set(rights) <= RIGHTS or not rights:
        raise ValueError(f"{where}: rights is a non-empty list of {sorted(RIGHTS)}")
    return frozenset(rights)


def fits(name: str, pattern: str) -> bool:
    return name == pattern or fnmatchcase(name, pattern)


__all__ = ["Checked", "TokenBody", "Verifier", "issue", "load_key", "new_key", "parse_public",
           "public_bytes", "public_text", "sign", "verify_signature", "PermissionDenied"]
