"""capbus: capability-secured, microkernel-style IPC for Python processes on Linux.

This module is the public surface (docs/ARCHITECTURE.md lists the parts); everything under a
leading underscore is private and may change.

Names load on first use (PEP 562): the errors are plain Python and come at once; the kernel and
the runtime load their modules when first named. So `capbus kernel` (the trusted side) never
loads `capbus._core`, the native module that parses what peers write, and a process that only
connects never loads the kernel.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._errors import (
    Cancelled,
    InterfaceMismatch,
    InvalidArgument,
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

if TYPE_CHECKING:
    from ._gateway.gateway import Gateway
    from ._kernel.kernel import Kernel
    from ._kernel.launcher import Child
    from ._kernel.policy import KernelLimits, Policy, ProcessInfo
    from ._kernel.sandbox import Sandbox
    from ._runtime.endpoint import Endpoint
    from ._runtime.interface import Interface
    from ._runtime.limits import Limits
    from ._runtime.message import LargeMessage, Message, Request, SmallMessage
    from ._runtime.process import Process, connect
    from ._runtime.region import Region
    from ._runtime.service import Service
    from ._runtime.subscription import Subscription
    from ._runtime.topic import Publisher, Sample, Subscriber, TopicCapability, TopicLoan

# name -> the module that defines it, imported on first use.
_LAZY = {
    # capbus.Gateway needs the gateway extra (eclipse-zenoh, cryptography): its package's
    # ImportError names the extra when they are missing.
    "Gateway": "._gateway",
    "Kernel": "._kernel.kernel",
    "Child": "._kernel.launcher",
    "KernelLimits": "._kernel.policy",
    "Policy": "._kernel.policy",
    "ProcessInfo": "._kernel.policy",
    "Sandbox": "._kernel.sandbox",
    "Endpoint": "._runtime.endpoint",
    "Interface": "._runtime.interface",
    "Limits": "._runtime.limits",
    "LargeMessage": "._runtime.message",
    "Message": "._runtime.message",
    "Request": "._runtime.message",
    "SmallMessage": "._runtime.message",
    "Process": "._runtime.process",
    "connect": "._runtime.process",
    "Region": "._runtime.region",
    "Service": "._runtime.service",
    "Subscription": "._runtime.subscription",
    "Publisher": "._runtime.topic",
    "Sample": "._runtime.topic",
    "Subscriber": "._runtime.topic",
    "TopicCapability": "._runtime.topic",
    "TopicLoan": "._runtime.topic",
}


def __getattr__(name: str) -> Any:
    if name == "_core":
        # `from capbus import _core` asks here first: the native data plane comes with its
        # runtime, which registers the error classes and the object codec with it.
        core = importlib.import_module("._core", __name__)
        importlib.import_module("._runtime.message", __name__)
        return core
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'capbus' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # the next access is a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


INVALID_PROCESS = 0
__version__ = "0.1.0"

__all__ = [
    "INVALID_PROCESS",
    "Cancelled",
    "Child",
    "Endpoint",
    "Interface",
    "InterfaceMismatch",
    "InvalidArgument",
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
    "Publisher",
    "RateLimitExceeded",
    "Region",
    "RemoteError",
    "Request",
    "Sample",
    "Sandbox",
    "SandboxError",
    "Service",
    "ServiceNotFound",
    "SmallMessage",
    "Subscriber",
    "Subscription",
    "Timeout",
    "TopicCapability",
    "TopicLoan",
    "WouldBlock",
    "connect",
]
