"""Kernel pipes and sockets: multiprocessing.Pipe and socketpair round trips, and the
large-message anchors (a shared-memory file plus a Pipe for the handshake; pickle over
a Pipe)."""

from __future__ import annotations

import contextlib
from typing import Any

from bench.results import (
    Result,
)

from .harness import (
    _CTX,
    _MSG,
    DEFAULT_DURATION,
    DEFAULT_TIMEOUT,
    MSG_SIZE,
    _Child,
    _default_warmup,
    _latency_result,
    _time_round_trips,
)

# ---- multiprocessing.Pipe


def _child_pipe_echo(conn: Any) -> None:
    recv, send = conn.recv_bytes, conn.send_bytes
    try:
        while True:
            m = recv()
            if not m:
                break
            send(m)
    except EOFError:
        pass
    finally:
        conn.close()


def pipe_round_trip(
    iterations: int | None = None,
    duration: float = DEFAULT_DURATION,
    warmup: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Result:
    """multiprocessing.Pipe (duplex): send_bytes / recv_bytes of 48 bytes, child echoes."""
    warmup = _default_warmup(iterations, 2000) if warmup is None else warmup
    parent, child_end = _CTX.Pipe()
    try:
        with _Child(_child_pipe_echo, (child_end,), timeout):
            child_end.close()
            send, recv = parent.send_bytes, parent.recv_bytes

            def rt() -> bytes:
                send(_MSG)
                return recv()

            samples = _time_round_trips(rt, iterations, duration, warmup)
            if rt() != _MSG:
                raise RuntimeError("multiprocessing.Pipe: echo mismatch")
            send(b"")
    finally:
        parent.close()
    return _latency_result("multiprocessing.Pipe", samples, "duplex Pipe, send_bytes/recv_bytes")


# ---- socket.socketpair


def _recv_exact(sock: Any, n: int) -> bytes:
    data = sock.recv(n)
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise EOFError("socket closed")
        data += more
    return data


def _child_socket_echo(sock: Any) -> None:
    try:
        while True:
            m = sock.recv(MSG_SIZE)
            if not m:
                break
            if len(m) < MSG_SIZE:
                m += _recv_exact(sock, MSG_SIZE - len(m))
            sock.sendall(m)
    except OSError:
        pass
    finally:
        sock.close()


def socketpair_round_trip(
    iterations: int | None = None,
    duration: float = DEFAULT_DURATION,
    warmup: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Result:
    """socket.socketpair(AF_UNIX, SOCK_STREAM): sendall / recv of 48 bytes, child echoes."""
    import socket

    warmup = _default_warmup(iterations, 2000) if warmup is None else warmup
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _Child(_child_socket_echo, (b,), timeout):
            b.close()
            sendall, recv = a.sendall, a.recv

            def rt() -> bytes:
                sendall(_MSG)
                m = recv(MSG_SIZE)
                if len(m) < MSG_SIZE:
                    if not m:
                        raise EOFError("socketpair: child closed the socket")
                    m += _recv_exact(a, MSG_SIZE - len(m))
                return m

            samples = _time_round_trips(rt, iterations, duration, warmup)
            if rt() != _MSG:
                raise RuntimeError("socketpair: echo mismatch")
            a.shutdown(socket.SHUT_WR)
    finally:
        a.close()
        b.close()
    return _latency_result("socket.socketpair (AF_UNIX stream)", samples, "blocking sendall/recv")


# =========================================================================== large messages


def _large_payload(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


def _child_shm_reader(conn: Any) -> None:
    from multiprocessing import shared_memory

    attached: dict[str, Any] = {}
    try:
        while True:
            req = conn.recv()
            if req is None:
                break
            name, size = req
            shm = attached.get(name)
            if shm is None:
                shm = attached[name] = shared_memory.SharedMemory(name=name)
            data = bytes(shm.buf[:size])  # the receiver reads (copies out) the payload
            conn.send_bytes(data[-1:])
    except EOFError:
        pass
    finally:
        for shm in attached.values():
            with contextlib.suppress(Exception):
                shm.close()
        conn.close()


def shm_pipe_large_round_trip(
    size: int = 1 << 20,
    iterations: int | None = None,
    duration: float = 1.0,
    warmup: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Result:
    """multiprocessing.shared_memory + Pipe: write into a SharedMemory block, send (name, size).

    One block is created up front and reused; per round trip the parent
    copies the payload in, sends ``(name, size)`` over a Pipe, the child
    (attached once) copies the payload out and replies with one byte.
    """
    from multiprocessing import shared_memory

    warmup = _default_warmup(iterations, 3) if warmup is None else warmup
    payload = _large_payload(size)
    shm = shared_memory.SharedMemory(create=True, size=size)
    parent, child_end = _CTX.Pipe()
    try:
        with _Child(_child_shm_reader, (child_end,), timeout):
            child_end.close()
            buf, name = shm.buf, shm.name
            send, recv = parent.send, parent.recv_bytes
            last = payload[-1:]

            def rt() -> bytes:
                buf[:size] = payload
                send((name, size))
                return recv()

            samples = _time_round_trips(rt, iterations, duration, warmup)
            if rt() != last:
                raise RuntimeError("shared_memory + Pipe: bad reply")
            send(None)
    finally:
        parent.close()
        shm.close()
        shm.unlink()
    return _latency_result(
        "shared_memory + Pipe",
        samples,
        "one reused block; sender copies in, receiver copies out; 1-byte ack",
        size,
    )


def _child_pickle_reader(conn: Any) -> None:
    try:
        while True:
            data = conn.recv()
            if data is None:
                break
            conn.send_bytes(data[-1:])
    except EOFError:
        pass
    finally:
        conn.close()


def pickle_pipe_large_round_trip(
    size: int = 1 << 20,
    iterations: int | None = None,
    duration: float = 1.0,
    warmup: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Result:
    """Pipe.send(bytes) (pickled) of the payload; the child unpickles it and acks one byte."""
    warmup = _default_warmup(iterations, 3) if warmup is None else warmup
    payload = _large_payload(size)
    parent, child_end = _CTX.Pipe()
    try:
        with _Child(_child_pickle_reader, (child_end,), timeout):
            child_end.close()
            send, recv = parent.send, parent.recv_bytes
            last = payload[-1:]

            def rt() -> bytes:
                send(payload)
                return recv()

            samples = _time_round_trips(rt, iterations, duration, warmup)
            if rt() != last:
                raise RuntimeError("pickle over Pipe: bad reply")
            send(None)
    finally:
        parent.close()
    return _latency_result("pickle over Pipe", samples, "Connection.send(bytes); 1-byte ack", size)


# =========================================================================== registry
