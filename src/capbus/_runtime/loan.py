"""Loan: a buffer in a lane's request arena, filled in place and sent without a copy
(Endpoint.loan)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import _core
from .._errors import IpcError
from .message import OBJECT_FLAG, USER_FLAGS, Message, bad_flags, error_reply
from .wait import timeout_ns

if TYPE_CHECKING:
    from .._core import Lane
    from .endpoint import Endpoint

_REPLY = _core.FLAG_REPLY_EXPECTED
_ERROR = _core.FLAG_ERROR


class Loan:
    """A loaned arena buffer (see Endpoint.loan); unsent loans are given back on exit."""

    __slots__ = ("_ep", "_native", "_buffer", "_open")

    def __init__(self, ep: Endpoint, native: Lane, buffer: memoryview) -> None:
        # ep: whose handle the message goes under (and whose name an error reply names);
        # native: the lane the buffer is in. Nothing more: this is on every loan.
        self._ep, self._native = ep, native
        self._buffer: memoryview | None = buffer
        self._open = True

    @property
    def buffer(self) -> memoryview:
        """The loaned bytes: fill them, then call() or send_async()."""
        if self._buffer is None:
            raise IpcError("this loan was given back unsent: its buffer is gone")
        return self._buffer

    def __enter__(self) -> Loan:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._open:
            self._open = False
            self._native.cancel_loan()
            # A cancelled chunk stays reserved while a view of it lives: drop ours, so that the
            # next loan in a loop (this Loan still bound to its variable) can have it.
            self._buffer = None

    def call(self, opcode: int, data: _core.Data = (), timeout: float | None = None,
             flags: int = 0) -> Message:
        """Send the loaned buffer as a call's payload, no copy; wait for the reply."""
        if not self._open or flags:  # the checks of _commit, without its frame when plain
            self._commit(flags)
        self._open = False
        r = self._native.call_loan(self._ep.handle, opcode, flags | _REPLY, data,
                                   -1 if timeout is None else timeout_ns(timeout))
        if r[1] & _ERROR:
            raise error_reply(r, self._ep.name)
        return r

    def send_async(self, opcode: int, data: _core.Data = (), flags: int = 0) -> None:
        """Send the loaned buffer as a one-way message's payload, no copy."""
        self._commit(flags)
        self._native.send_loan(self._ep.handle, opcode, flags, data)

    def _commit(self, flags: int) -> None:
        if not self._open:
            raise IpcError("this loan was already sent or given back")
        if flags & ~USER_FLAGS and flags != OBJECT_FLAG:
            raise bad_flags(flags)
        self._open = False
