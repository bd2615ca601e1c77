"""capbus._layout -- what the trusted kernel uses of the native core.

Built from the same C parts as capbus._core (src/capbus/_native/layout_module.c #includes them),
and only those that need no ring: the kernel (capbus._kernel.shm, capbus._protect) imports this
module, not capbus._core, so the rings, arenas, Lane, ServerSet, Request and Message code is not
in the kernel's import closure. Every name here is also in capbus._core, with the same value and behaviour
(_core.pyi documents them); raises only ValueError, TypeError and OSError (no register() needed).

  channel_size(nslots=256, arena_size=128 MiB) -> int    bytes of a channel memfd
  resp_ring_off(nslots) -> int     the response ring's offset; clients futex-wait on its tail
      word (+ RING_TAIL_OFF), which the kernel futex_wakes after changing a control page
  atomic_store_u32/u64(buf, off, v)   seq_cst stores (writable buffer, aligned offset in range)
  futex_wake(buf, offset, n=INT_MAX) -> int   shared futex wake; number woken
  channel_stats(buf) -> ChannelStats   the counters both ends keep in a channel header page
      (untrusted numbers)
  set_dumpable(flag)               prctl(PR_SET_DUMPABLE, flag)
"""

from typing import TypedDict

from typing_extensions import Buffer

def futex_wake(buf: Buffer, offset: int, n: int = ...) -> int: ...
def atomic_store_u32(buf: Buffer, off: int, v: int, /) -> None: ...
def atomic_store_u64(buf: Buffer, off: int, v: int, /) -> None: ...
def channel_size(nslots: int = 256, arena_size: int = ...) -> int: ...
def resp_ring_off(nslots: int, /) -> int: ...

class ChannelStats(TypedDict):
    """channel_stats(): a channel's metrics (untrusted numbers: both ends write them)."""

    sent: int
    bytes_sent: int
    calls: int
    timeouts: int
    refused_wouldblock: int
    refused_rate: int
    refused_size: int
    refused_perm: int
    latency_max_ns: int
    latency_sum_ns: int
    latency_count: int
    sent_last_second: int
    hist: list[int]  # STATS_HIST_BUCKETS counts
    received: int
    bytes_received: int
    replies: int
    reply_failed: int
    drops_rate: int
    drops_bandwidth: int
    drops_size: int
    drops_expired: int
    drops_rights: int
    cancelled: int
    received_last_second: int

def channel_stats(buf: Buffer, /) -> ChannelStats: ...
def set_dumpable(on: bool, /) -> None: ...

# ---- Layout constants (values from _native/layout.h; _core.pyi takes these declarations)
CTRL_SIZE: int
CTRL_STATE_OFF: int
CTRL_GENERATION_OFF: int
CTRL_EXPIRY_OFF: int
CTRL_MAX_MESSAGE_SIZE_OFF: int
CTRL_RATE_LIMIT_OFF: int
CTRL_BANDWIDTH_OFF: int
CTRL_RIGHTS_OFF: int
CTRL_FLAGS_OFF: int
CTRL_SENDER_ID_OFF: int
CTRL_F_ENFORCE: int
CTRL_CAP_ID_OFF: int
CTRL_CHAIN_LEN_OFF: int
CTRL_MAX_PRIORITY_OFF: int
PRIO_MIN: int
PRIO_MAX: int
PRIO_CTRL_BIAS: int
PRIO_RT_BASE: int
CTRL_CHAIN_OFF: int
CTRL_CHAIN_ENTRY_SIZE: int
CTRL_CHAIN_MAX: int
RIGHT_SEND: int
RIGHT_RECEIVE: int
RIGHT_SHARE: int
RIGHT_MAP: int
RIGHT_READ: int
RIGHT_WRITE: int
STATE_OPEN: int
STATE_REVOKED: int
STATE_PEER_DEAD: int
STATE_CLOSED: int
DOORBELL_SIZE: int
MAX_CHANNELS: int
CHAN_MAGIC_OFF: int
CHAN_VERSION_OFF: int
CHAN_NSLOTS_OFF: int
CHAN_ARENA_SIZE_OFF: int
CHAN_MAGIC: int
CHAN_VERSION: int
RING_TAIL_OFF: int
