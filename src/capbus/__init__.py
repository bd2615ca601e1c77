"""capbus: capability-secured, microkernel-style IPC for Python processes on Linux.

This module is the public surface (docs/ARCHITECTURE.md lists the parts); everything under a
leading underscore is private and may change.
"""

from typing import TYPE_CHECKING, Any

from ._errors import (
    Cancelled,
    InvalidCapability,
    IpcError,
    KernelUnavailable,
    MessageTooLarge,
    NameTaken,
    NoReply,
    OutOfMemory,
    PeerDied,
    PermissionDenied,
    ProcessNotFound,
    ProtocolError,
    RateLimitExceeded,
    RemoteError,
    SandboxError,
    ServiceNotFound,
    Timeout,
    WouldBlock,
)
from ._kernel.kernel import Kernel
from ._kernel.launcher import Child
from ._kernel.policy import KernelLimits, Policy, ProcessInfo
from ._kernel.sandbox import Sandbox
from ._runtime.endpoint import Endpoint
from ._runtime.limits import Limits
from ._runtime.message import LargeMessage, Message, Request, SmallMessage
from ._runtime.process import Process, connect
from ._runtime.region import Region
from ._runtime.service import Service
from ._runtime.subscription import Subscription

if TYPE_CHECKING:
    from ._gateway.gateway import Gateway

INVALID_PROCESS = 0
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # capbus.Gateway is imported when first used: it needs the gateway extra (eclipse-zenoh,
    # cryptography), and names it in its ImportError when they are missing.
    if name == "Gateway":
        from ._gateway import Gateway

        return Gateway
    raise AttributeError(f"module 'capbus' has no attribute {name!r}")

__all__ = [
    "INVALID_PROCESS",
    "Cancelled",
    "Child",
    "Endpoint",
    "Gateway",
    "InvalidCapability",
    "IpcError",
    "Kernel",
    "KernelUnavailable",
    "LargeMessage",
    "Limits",
    "KernelLimits",
    "Message",
    "MessageTooLarge",
    "NameTaken",
    "NoReply",
    "OutOfMemory",
    "PeerDied",
    "PermissionDenied",
    "Policy",
    "Process",
    "ProcessInfo",
    "ProcessNotFound",
    "ProtocolError",
    "RateLimitExceeded",
    "Region",
    "RemoteError",
    "Request",
    "Sandbox",
    "SandboxError",
    "Service",
    "ServiceNotFound",
    "SmallMessage",
    "Subscription",
    "Timeout",
    "WouldBlock",
    "connect",
]
