"""Speaking the control protocol by hand, as a hostile process would: frames built byte by byte
(raw_frame, hello, lookup, register), a bounded client socket in the test's own process (Raw),
and RAW, the prelude of a child process that does the same: conn() to $CAPBUS_SOCKET, send(),
recv() (closing any fds that come with an answer), hello(), out()."""

from __future__ import annotations

import array
import json
import os
import select
import socket
import time

from capbus._protocol import frames
from capbus._protocol.frames import HEADER, KIND_REQUEST, MAX_FRAME

_ANC = socket.CMSG_SPACE(frames.MAX_FDS * 4)


def raw_frame(
    kind: int,
    type_code: int,
    body: object,
    rid: int = 1,
    *,
    magic: bytes = frames.MAGIC,
    version: int = frames.VERSION,
    flags: int = 0,
    body_len: int | None = None,
) -> bytes:
    """A frame built by hand: body is bytes, str (encoded as is) or a JSON-able value."""
    if isinstance(body, bytes):
        raw = body
    elif isinstance(body, str):
        raw = body.encode()
    else:
        raw = json.dumps(body).encode()
    n = len(raw) if body_len is None else body_len
    return HEADER.pack(magic, version, kind, type_code, flags, rid, n) + raw


def hello(rid: int = 1, version: int = frames.VERSION) -> bytes:
    return raw_frame(KIND_REQUEST, 1, {"version": version, "wait_mode": "block"}, rid)


def lookup(name: str, timeout_ms: int = 0, rid: int = 2) -> bytes:
    return raw_frame(KIND_REQUEST, 4, {"name": name, "timeout_ms": timeout_ms}, rid)


def register(name: str, rid: int = 2) -> bytes:
    return raw_frame(KIND_REQUEST, 2, {"name": name, "allow": None}, rid)


class Raw:
    """A hand-driven client socket. Every blocking call is bounded."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(2.0)
        self.sock.connect(path)

    def send(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        if fds:
            self.sock.sendmsg(
                [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            )
        else:
            self.sock.send(data)

    def recv(self, timeout: float = 2.0) -> tuple[frames.Frame, int] | None:
        """One decoded frame from the kernel, or None at end of stream."""
        self.sock.settimeout(timeout)
        return self._recv_one()

    def _recv_one(self) -> tuple[frames.Frame, int] | None:
        # Some responses carry fds (e.g. a service's doorbell): take and close them.
        data, anc, _, _ = self.sock.recvmsg(MAX_FRAME + 1, _ANC)
        nfds = 0
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                for fd in fds:
                    os.close(fd)
                nfds += len(fds)
        if not data and not anc:
            return None
        return frames.decode(data, nfds)

    def hello(self) -> frames.Welcome:
        self.send(hello())
        got = self.recv()
        assert got is not None, "the kernel closed a connection that sent a valid Hello"
        msg, rid = got
        assert isinstance(msg, frames.Welcome) and rid == 1, msg
        return msg

    def wait_closed(self, timeout: float = 2.0) -> list[frames.Frame]:
        """Read until the kernel closes the connection (fail if it does not within `timeout`);
        returns what it sent before closing."""
        got: list[frames.Frame] = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the kernel did not close the connection in {timeout} s")
            self.sock.settimeout(left)
            try:
                one = self._recv_one()
            except ConnectionResetError:  # closed with our frames still unread in its queue
                return got
            except TimeoutError:
                raise AssertionError(
                    f"the kernel did not close the connection in {timeout} s (got {got})"
                ) from None
            if one is None:
                return got
            got.append(one[0])

    def assert_open(self, quiet: float = 0.1) -> None:
        """Still connected, and nothing to read (poll without consuming)."""
        r, _, _ = select.select([self.sock], [], [], quiet)
        if r:
            data = self.sock.recv(MAX_FRAME + 1, socket.MSG_PEEK)
            assert data, "the kernel closed the connection"

    def close(self) -> None:
        self.sock.close()



RAW = """
import array, os, socket, sys, time
from capbus._protocol import frames
ANC = socket.CMSG_SPACE(frames.MAX_FDS * 4)
PATH = os.environ["CAPBUS_SOCKET"]

def conn():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    s.settimeout(10)
    s.connect(PATH)
    return s

def send(s, msg, rid):
    s.send(frames.encode(msg, rid))

def recv(s):
    data, anc, _, _ = s.recvmsg(frames.MAX_FRAME + 1, ANC)
    n = 0
    for level, kind, payload in anc:
        if kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(payload[: len(payload) - len(payload) % 4])
            for fd in fds:
                os.close(fd)
            n += len(fds)
    if not data:
        return None
    return frames.decode(data, n)[0]

def hello(s):
    send(s, frames.Hello(frames.VERSION, "block"), 1)
    return recv(s)

def out(*a):
    print(*a, flush=True)
"""
