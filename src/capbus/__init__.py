"""capbus: capability-secured, microkernel-style IPC for Python processes on Linux.

This module is the public surface (docs/ARCHITECTURE.md lists the parts); everything under a
leading underscore is private and may change.
"""

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
from ._runtime.topic import Publisher, Sample, Subscriber, TopicCapability, TopicLoan

INVALID_PROCESS = 0
__version__ = "0.1.0"

__all__ = [
    "INVALID_PROCESS",
    "Cancelled",
    "Child",
    "Endpoint",
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
