"""The per-connection state machine of the control plane, one class per side, with no I/O.

Both sides feed received frames in and get validated messages out; both ask it to produce the
frames they send. It enforces the order (Hello first, exactly once), request-id bookkeeping
(unique while in flight, bounded in number) and which response answers which request.
"""

from __future__ import annotations

import enum

from .._errors import ProtocolError
from . import frames
from .frames import KIND_EVENT, KIND_REQUEST, KIND_RESPONSE, RESPONSES, Frame

# A process may have this many requests awaiting an answer (parked lookups included).
MAX_IN_FLIGHT = 64


class State(enum.Enum):
    START = "start"  # nothing exchanged yet
    HELLO_SENT = "hello-sent"  # process side: waiting for Welcome
    READY = "ready"
    CLOSED = "closed"


class KernelConnection:
    """The kernel's view of one process connection."""

    def __init__(self) -> None:
        self.state = State.START
        self.in_flight: dict[int, type[Frame]] = {}

    def receive(self, data: bytes, nfds: int = 0) -> tuple[Frame, int]:
        if self.state is State.CLOSED:
            raise ProtocolError("frame on a closed connection")
        msg, request_id = frames.decode(data, nfds)
        if msg.KIND != KIND_REQUEST:
            raise ProtocolError(f"a process may only send requests, not {type(msg).__name__}")
        if request_id == 0:
            raise ProtocolError("request id 0 is reserved for events")
        if request_id in self.in_flight:
            raise ProtocolError(f"request id {request_id} is already in flight")
        if len(self.in_flight) >= MAX_IN_FLIGHT:
            raise ProtocolError(f"more than {MAX_IN_FLIGHT} requests in flight")
        if self.state is State.START:
            if not isinstance(msg, frames.Hello):
                raise ProtocolError(f"expected Hello first, got {type(msg).__name__}")
            if msg.version != frames.VERSION:
                raise ProtocolError(f"Hello for protocol version {msg.version}")
        elif isinstance(msg, frames.Hello):
            raise ProtocolError("Hello sent twice")
        self.in_flight[request_id] = type(msg)
        return msg, request_id

    def respond(self, request_id: int, msg: Frame) -> bytes:
        """The frame answering request_id. Encoded before anything changes: a response that
        does not fit a frame raises ProtocolError and leaves the request in flight, so the
        kernel can still answer it with an Error."""
        request = self.in_flight.get(request_id)
        if request is None:  # pragma: no cover - a kernel bug
            raise AssertionError(f"response to unknown request {request_id}")
        if not isinstance(msg, frames.Error) and type(msg) not in RESPONSES[request]:
            raise AssertionError(f"{type(msg).__name__} does not answer {request.__name__}")
        frame = frames.encode(msg, request_id)
        del self.in_flight[request_id]
        if request is frames.Hello:
            self.state = State.READY if not isinstance(msg, frames.Error) else State.CLOSED
        return frame

    def event(self, msg: Frame) -> bytes:
        assert msg.KIND == KIND_EVENT and self.state is State.READY
        return frames.encode(msg, 0)

    def close(self) -> None:
        self.state = State.CLOSED
        self.in_flight.clear()


class ProcessConnection:
    """A process's view of its connection to the kernel."""

    def __init__(self) -> None:
        self.state = State.START
        self.pending: dict[int, type[Frame]] = {}
        self._next_id = 1

    def request(self, msg: Frame) -> tuple[int, bytes]:
        if self.state is State.CLOSED:
            raise ProtocolError("connection closed")
        if (self.state is State.START) != isinstance(msg, frames.Hello):
            raise ProtocolError(f"{type(msg).__name__} not allowed in state {self.state.value}")
        request_id = self._next_id
        frame = frames.encode(msg, request_id)  # first: a frame that does not encode changes nothing
        self._next_id = self._next_id % 0xFFFFFFFF + 1  # u32, never 0
        self.pending[request_id] = type(msg)
        if isinstance(msg, frames.Hello):
            self.state = State.HELLO_SENT
        return request_id, frame

    def receive(self, data: bytes, nfds: int = 0) -> tuple[Frame, int]:
        """A response (with its request id) or an event (request id 0)."""
        msg, request_id = frames.decode(data, nfds)
        if msg.KIND == KIND_EVENT:
            if request_id != 0 or self.state is not State.READY:
                raise ProtocolError(f"unexpected event {type(msg).__name__}")
            return msg, 0
        if msg.KIND != KIND_RESPONSE:
            raise ProtocolError(f"the kernel sent a {type(msg).__name__} request")
        request = self.pending.pop(request_id, None)
        if request is None:
            raise ProtocolError(f"response to unknown request id {request_id}")
        if not isinstance(msg, frames.Error) and type(msg) not in RESPONSES[request]:
            raise ProtocolError(f"{type(msg).__name__} does not answer {request.__name__}")
        if request is frames.Hello:
            self.state = State.CLOSED if isinstance(msg, frames.Error) else State.READY
        return msg, request_id

    def close(self) -> None:
        self.state = State.CLOSED
        self.pending.clear()
