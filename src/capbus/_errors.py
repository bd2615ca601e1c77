"""The capbus error set, shared by the kernel and the runtime.

Every error has a stable numeric code so the kernel can send it over the control plane and the
runtime can raise the same class on its side. Messages say what was wrong and what to do.
Where Python has a built-in class for the same condition, the capbus error is one too
(Timeout is a TimeoutError, PeerDied a ConnectionError, WouldBlock a BlockingIOError,
PermissionDenied a PermissionError, InvalidArgument a TypeError), so code written against
sockets or multiprocessing catches them; they are built with one message argument (never an
errno), and pickle as (class, (message,)).
"""

from __future__ import annotations


class IpcError(Exception):
    """Base class of every capbus error."""

    code = 1


class InvalidCapability(IpcError):
    """The handle is unknown, stale (its generation moved on), revoked or expired."""

    code = 2


class ProcessNotFound(IpcError):
    code = 3


class ServiceNotFound(IpcError):
    code = 4


class NameTaken(IpcError):
    code = 5


class PermissionDenied(IpcError, PermissionError):
    """The capability, the policy or a service's access list does not allow this: ask whoever
    grants it (the policy, the service, the process that delegated the capability)."""

    code = 6


class MessageTooLarge(IpcError):
    code = 7


class OutOfMemory(IpcError):
    code = 8


class WouldBlock(IpcError, BlockingIOError):
    """The receiver's ring or arena is full (back-pressure): retry later, or call() (which waits
    for room) instead of send_async()."""

    code = 9


class RateLimitExceeded(IpcError):
    code = 10


class Timeout(IpcError, TimeoutError):
    """Nothing came within the timeout (given and printed in seconds); the call is cancelled,
    a late reply is dropped."""

    code = 11


class Cancelled(IpcError):
    code = 12


class PeerDied(IpcError, ConnectionError):
    """The process at the other end exited: look the service up again once it is back
    (Endpoint.on_death says when it goes)."""

    code = 13


class KernelUnavailable(IpcError):
    code = 14


class ProtocolError(IpcError):
    code = 15


class RemoteError(IpcError):
    """The service answered with an error of its own: `req.reply_error(code, text)` on its side
    (`.code` is the application's code, in a space of its own: never read as a capbus error),
    or its `serve()` handler raised (`.code` is None, `.remote_type` names the exception)."""

    code = 16  # class attribute: the wire code of a handler's exception; instances shadow it

    def __init__(self, code: int | None, text: str, remote_type: str | None = None,
                 service: str | None = None) -> None:
        where = f"{service!r}: " if service else ""
        what = remote_type if code is None else f"error {code}"
        super().__init__(f"{where}{what}: {text}" if what else f"{where}{text}")
        self.code = code  # type: ignore[assignment]
        self.text = text
        self.remote_type = remote_type

    # Picklable although __init__ takes more than the message.
    def __reduce__(self) -> tuple[type[RemoteError], tuple[int | None, str, str | None]]:
        return (type(self), (self.code, self.text, self.remote_type))


class NoReply(IpcError):
    """The service dropped the request (released it, or let it be garbage-collected) without
    replying: the caller hears at once instead of waiting for ever."""

    code = 17


class SandboxError(IpcError):
    """A sandbox that cannot be enforced as asked (this Linux lacks a Landlock ABI it needs, a
    path is missing, user= without root): the process is not started, never started weaker."""

    code = 18


class InvalidArgument(IpcError, TypeError):
    """A typed call's arguments (capbus.Interface) do not match the method's annotations: raised
    at the caller, the message says which argument and what was expected."""

    code = 19


class InterfaceMismatch(ProtocolError):
    """A proxy and the service it calls were built from different versions of an interface
    (capbus.Interface): the message names the methods that differ. Rebuild both from the same
    interface definition."""

    code = 20


ERRORS: dict[int, type[IpcError]] = {
    cls.code: cls
    for cls in (
        IpcError,
        InvalidCapability,
        ProcessNotFound,
        ServiceNotFound,
        NameTaken,
        PermissionDenied,
        MessageTooLarge,
        OutOfMemory,
        WouldBlock,
        RateLimitExceeded,
        Timeout,
        Cancelled,
        PeerDied,
        KernelUnavailable,
        ProtocolError,
        NoReply,
        SandboxError,
        InvalidArgument,
        InterfaceMismatch,
    )
}


# Bad arguments caught on the kernel's side travel with this code and are raised as ValueError.
VALUE_ERROR_CODE = 100


def error_from_code(code: int, message: str) -> Exception:
    """The exception for a code received from the other side (unknown codes become IpcError)."""
    if code == VALUE_ERROR_CODE:
        return ValueError(message)
    return ERRORS.get(code, IpcError)(message)
