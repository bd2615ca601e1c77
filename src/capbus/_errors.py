"""The capbus error set, shared by the kernel and the runtime.

Every error has a stable numeric code so the kernel can send it over the control plane and the
runtime can raise the same class on its side. Messages say what was wrong and what to do.
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


class PermissionDenied(IpcError):
    code = 6


class MessageTooLarge(IpcError):
    code = 7


class OutOfMemory(IpcError):
    code = 8


class WouldBlock(IpcError):
    code = 9


class RateLimitExceeded(IpcError):
    code = 10


class Timeout(IpcError):
    code = 11


class Cancelled(IpcError):
    code = 12


class PeerDied(IpcError):
    code = 13


class KernelUnavailable(IpcError):
    code = 14


class ProtocolError(IpcError):
    code = 15


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
    )
}


# Bad arguments caught on the kernel's side travel with this code and are raised as ValueError.
VALUE_ERROR_CODE = 100


def error_from_code(code: int, message: str) -> Exception:
    """The exception for a code received from the other side (unknown codes become IpcError)."""
    if code == VALUE_ERROR_CODE:
        return ValueError(message)
    return ERRORS.get(code, IpcError)(message)
