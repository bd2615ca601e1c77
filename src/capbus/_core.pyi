"""capbus._core -- the native core of capbus.

Python-visible API (internal; only the capbus kernel, runtime and tests use it). Layout
constants live in _native/layout.h and are exported as module attributes; the ring engine
(producer/consumer, CRC-32) lives in _native/ring.h; capability limits (control-page reads and
token buckets) in _native/limits.h.

---- Primitives on any buffer-protocol object (e.g. an mmap) at a byte offset --------------
Offsets must be inside the buffer and naturally aligned (offset and address), else ValueError.
Stores/CAS/add need a writable buffer (TypeError otherwise); loads, futex_wait and futex_wake
also work on read-only mappings. All of these atomics are seq_cst.
  futex_wait(buf, offset, expected, timeout=None) -> bool   shared futex; True if woken or
      the value differs, False on timeout (seconds, None = forever); EINTR retries with the
      remaining time after running Python signal handlers (which may raise)
  futex_wake(buf, offset, n=INT_MAX) -> int                  number woken
  atomic_load_u32/u64(buf, off) -> int
  atomic_store_u32/u64(buf, off, v) -> None
  atomic_cas_u32/u64(buf, off, expected, desired) -> bool
  atomic_add_u64(buf, off, v) -> int                          old value (wraps mod 2**64)

---- Layout helpers -------------------------------------------------------------------------
  channel_size(nslots=256, arena_size=128 MiB) -> int
  resp_ring_off(nslots) -> int      the client futex-waits on the u32 at
      resp_ring_off(nslots) + RING_TAIL_OFF (= RESP_TAIL_OFF for the default 256 slots); the
      kernel futex_wakes it on its own mapping after changing a control page, and writes the
      channel's reply eventfd (if it made one) for clients waiting in an event loop
  max_payload(arena_size) -> int    arena_size - 128 (one chunk header)
  (Channels and pages are made by the kernel alone, in capbus._kernel.shm; tests make them the
  same way. Every other offset is a module constant.)
  crc32(data, value=0) -> int       = zlib.crc32, the payload checksum
  channel_stats(buf) -> dict        the metrics of a channel (see "Metrics" below) from any
      buffer holding its header page (>= CHAN_SSTATS_OFF + SSTATS_SIZE bytes, else ValueError)

---- What the Python side hands in (calls go down only) -------------------------------------
  This module imports no capbus Python module and calls no Python method by name.
  register(*, errors, object_loads, object_pack)   called once by the runtime at import
      (capbus._runtime.message); a second call is RuntimeError. errors: the capbus._errors
      module (its classes are read once, here: a missing one is AttributeError, a non-class
      TypeError, and nothing is registered); object_loads(payload, trusted) -> object and
      object_pack(obj, pickle) -> bytes: the codec of Message.object(), Request.object() and
      Request.reply_object(). Adds CorruptChannel. Until it is called, Lane, ServerSet,
      EndpointBase and ServiceBase refuse to be made (RuntimeError).
  EndpointBase.__init__(self, *, open_lane, slow_call, slow_send, remote_error) and
  ServiceBase.__init__(self, *, slow_recv, claim): the up-calls of the fronts, each a plain
  function called with the object first (see "Fronts" below).

---- Result types ----------------------------------------------------------------------------
  call()/call_poll() results are Message instances (a tuple subclass), allocated directly by
  the core (no Python constructor runs): (opcode, flags, d0, d1, d2, d3, payload bytes or
  None); recv/poll/recv_many return Request instances. Neither can be replaced.

---- Lane: the client end of one channel ----------------------------------------------------
  Lane(chan_fd, ctrl_fd, doorbell_fd, index, nslots=256, arena_size=128 MiB, wait_mode=1,
       spin_ns=50000, bell_event_fd=-1, reply_event_fd=-1, bell_sleep_fd=-1,
       reply_sleep_fd=-1)
      wait_mode: 0 spin, 1 adaptive, 2 block. The Lane keeps its own mappings and duplicates of
      the fds (the event eventfds set O_NONBLOCK): the caller may close its fds afterwards.
      bell_sleep_fd: the service's sleep eventfd (written when the server sleeps on it);
      reply_sleep_fd: the read end of this channel's reply-sleep pipe (untimed waits sleep in
      read(2) on it). See "Sleep eventfds and kicks".
  data below is a tuple or list of up to 4 u64 (zero-padded; ValueError when more or out of
  range, TypeError for a non-int).
  .call(capability, opcode, flags, data, payload=None, timeout_ns=-1) -> Message
      Timeout (the request is cancelled), PeerDied / InvalidCapability from the control page
      (a reply already in the ring is delivered first), ValueError / MessageTooLarge before
      anything is written, ProtocolError if the server wrote garbage (the lane is then broken).
  .send(capability, opcode, flags, data, payload=None) -> None     one-way; WouldBlock (counted
      in .refused) when the ring or arena is full
  .send_many(capability, flags, [(opcode, data[, payload]), ...]) -> int accepted
      Every message that could fit (at most 1024) is parsed and checked before anything is
      written (TypeError / ValueError / MessageTooLarge: nothing written); then they are written
      in order until the ring, the arena or the rate/bandwidth limit stops them; one tail store
      and one doorbell ring for the batch. When the ring/arena stopped them, len(messages) -
      accepted is added to .refused. 0 accepted because of the rate/bandwidth limit raises
      RateLimitExceeded (0 because the ring is full returns 0).
  .call_start(capability, opcode, flags, data, payload=None) -> tag   a call that does not wait
      (WouldBlock, counted in .refused, when full); rings the doorbell.
  .call_poll(tag, arm=False) -> Message | None   the reply of the lane's latest call (tag must
      be it: ValueError otherwise), dropping older late replies as call() does; PeerDied /
      InvalidCapability / ProtocolError as call(). arm=True and nothing there: empties the
      reply eventfd, sets RING_CONSUMER_EVENT_OFF in the response ring, fences, looks again;
      None then means "armed": the server's next reply writes the reply eventfd. (A control-page
      change is announced by the kernel; the event loop should re-poll on that too.) One
      outstanding call_start per lane.
  .cancel(tag)   the call with this tag (and every earlier one) is not waited for any more:
      cancel_below = tag + 1 (never moves back); ValueError for a tag never sent.
  .want_room(on)   on=True: empties the reply eventfd, stores the wake target in
      RING_PRODUCER_WAITING_OFF of the request ring (the head, low 32 bits, half-way through what
      is outstanding; never 0) and fences; the server then writes the reply eventfd once its
      head reaches the target (once per target) and whenever a held chunk goes back (it looks
      without a fence: a waiter re-checks at least every SLEEP_CAP_NS). on=False stores 0. The
      caller retries its send after arming.
  .loan(n) -> memoryview   reserve a chunk of the request arena for an n-byte payload and
      return a WRITABLE view of exactly its n payload bytes (after the 128-byte LargeMessage
      struct; for n <= 64, its inline area). Nothing is sent yet. One loan per lane at a time
      (RuntimeError); while it is out, call/send/call_start/send_many with a payload raise
      RuntimeError (payload-less messages may go). WouldBlock ("the arena for this channel is
      full: the receiver still holds earlier payloads"; counted in .refused); MessageTooLarge
      for n > max_payload or the capability's size limit. Dropping the view does not end the
      loan (loan(n)[:] = data; send_loan(...) is fine).
  .call_loan(capability, opcode, flags, data, timeout_ns=-1) -> Message
  .send_loan(capability, opcode, flags, data) -> None
      commit the loan as this message's payload, no copy: the core writes the LargeMessage
      struct (CRC over the loaned bytes only with FLAG_CHECKSUM) and the slot, and sets
      FLAG_LOANED. As call()/send() otherwise (limits, Timeout, state errors). The loan stays
      out when nothing was written (an error before the write, a Timeout waiting for ring
      room, send_loan's WouldBlock for a full ring); RuntimeError without a loan.
  .cancel_loan()   give the chunk back (the cursor never moved: nothing else can have been
      allocated since); a no-op without a loan.
  Loan views never outlive their memory. A loan's views (and anything made from them: slices,
      numpy arrays) stay valid after the commit, the cancel and close(), and the lane never
      allocates a chunk that overlaps memory such a view still shows: after a commit they show
      only their own message (writing to them changes that payload, which the receiver may be
      reading: the documented hazard of loans), never a later one. When the place the arena
      offers is under a view, the other places the receiver accepts are tried (the FIFO cursor
      instead of the idle jump to offset 0, then the next lap's start); while one of those is
      only full, the arena counts as full (call() waits for the receiver as usual); when the
      receiver has released everything and only the lane's own loan views are in the way,
      payloads on THIS lane get WouldBlock ("a view of an earlier loan ... still shows the
      arena memory ..."; counted in .refused; call() raises it at once too: there is nothing
      to wait for) until the view goes. Other lanes and payload-less messages are not
      affected. So a cancelled loan whose views are kept keeps its chunk reserved; `v =
      loan(n)` in a loop (the previous view still bound) goes on. The channel stays mapped
      after close() until the last loan view is gone.
  .close();  attributes .index, .broken, .closed, .last_tag, .max_payload, .refused,
  .loaned (bytes of the loan that is out, or None), .spin_budget (ns the next adaptive wait
  spins before it sleeps; 0 once it learned that spinning does not pay)
  One thread at a time (RuntimeError otherwise); the channel must be fresh.
  Flags: callers may pass FLAG_CHECKSUM, FLAG_ERROR and FLAG_USER_MASK bits; FLAG_LARGE,
  FLAG_REPLY_EXPECTED and FLAG_LOANED are set by the core (call vs send, payload > 64 bytes,
  loan), so received flags can be passed back unchanged. Any other bit is a ValueError.
  payload=None is "no payload"; b"" is an empty payload (it is delivered as b"").
  Publishing (send, send_many, call, call_start): if the doorbell's DB_EVENT_WANTED_OFF is set
  and the Lane has a bell_event_fd, it writes 1 there (EAGAIN ignored).

---- Capability limits (both ends) ------------------------------------------------------------
  The kernel writes them into the control page: CTRL_RIGHTS_OFF (RIGHT_* bits), CTRL_EXPIRY_OFF
  (CLOCK_MONOTONIC ns, 0 none), CTRL_MAX_MESSAGE_SIZE_OFF (payload bytes, 0 none),
  CTRL_RATE_LIMIT_OFF (messages/s, 0 none), CTRL_BANDWIDTH_OFF (payload bytes/s, 0 none), and
  LAST CTRL_FLAGS_OFF: only with CTRL_F_ENFORCE set is anything checked (one branch otherwise).
  It may change them at any time; they are read per message. Before it hands the page out it
  also writes which buckets the rate and bandwidth belong to: CTRL_CAP_ID_OFF (the
  capability's kernel-unique id, never reused while the kernel runs; 0 = the channel's own
  bucket) and CTRL_CHAIN_OFF/CTRL_CHAIN_LEN_OFF (up to CTRL_CHAIN_MAX limited ancestors:
  id, rate, bandwidth). Those are read once, by ServerSet.add.
  Buckets: rate: capacity one second of messages; bandwidth: one second of bytes; both start
  full.
  Lane (fail fast, nothing written): no RIGHT_SEND -> PermissionDenied; expired ->
  InvalidCapability("...expired"); payload > max -> MessageTooLarge; its own buckets (per
  lane: advisory, a fresh lane starts full) -> RateLimitExceeded.
  ServerSet (what counts; its buckets are private): the buckets belong to capabilities, not
  channels. add() finds (or makes) the bucket of CTRL_CAP_ID_OFF and of each chain id in a
  private hash table and pins them, so every channel, thread and process using one
  capability, or one derived from it, draws on the same budget, and each message is charged
  to the leaf's bucket and every ancestor's: O(1 + chain), no lookup, lock or syscall. A
  bucket outlives its last channel until it has refilled (BKT_IDLE_NS), so closing and
  reopening channels gains nothing; at most BUCKET_IDLE_MAX idle ones are kept (memory is
  bounded by the channels: see "Buckets per capability" in _native/limits.h). A message that
  fails is not delivered; a call gets an automatic error reply (FLAG_ERROR, data[0] =
  RateLimitExceeded.code for rate or bandwidth, naming the limit that refused it,
  MessageTooLarge.code for size, InvalidCapability.code for expiry or a missing send right;
  payload a short text), a one-way message is dropped; counted per reason.

---- ServerSet: the service end, up to MAX_CHANNELS channels by index ----------------------
  ServerSet(doorbell_fd, wait_mode=1, spin_ns=50000, event_fd=-1, sleep_fd=-1)
      sleep_fd: the service's sleep eventfd (blocking): untimed waits sleep in read(2) on it.
  .add(index, chan_fd, ctrl_fd, nslots=256, arena_size=128 MiB, sender_id=None,
       reply_event_fd=-1, reply_sleep_fd=-1, reply_sleep_keep_fd=-1, generation=0)
      sender_id None = read it from the control page now; generation: the kernel's name of
      this channel instance, read back as Request.generation (a claim names it);
      reply_event_fd: the client's eventfd, written after a reply when the client armed it;
      reply_sleep_fd / reply_sleep_keep_fd: the write end of the client's reply-sleep pipe
      (a byte wakes a client asleep on it) and a spare read end the set only holds (without
      it the write end is not used: a write to a pipe with no reader raises SIGPIPE)
  .remove(index, drain=False)   KeyError if absent; safe while recv/reply run in other threads
      (the unmap is deferred until they are done). drain=True (the client exited or closed
      the channel): the requests already in the ring -- up to the tail seen now -- are still
      delivered although the control page is no longer OPEN, then the channel goes. The index
      is free at once (add() may reuse it); a drained call's reply raises PeerDied. Never for
      a REVOKED channel (also stops a drain in progress) or a corrupt one; a drained channel
      found corrupt just ends its drain (its index may be someone else's: nothing is raised).
  .recv(timeout_ns=-1) -> Request
      Timeout; CorruptChannel(.index, .reason) for a channel that sent garbage (it is then
      dead; call recv again to go on serving the others); Cancelled after interrupt().
      Round robin, one message per channel per turn. Cancelled calls are skipped; channels
      whose control page is not OPEN are skipped (unless draining).
  .poll() -> Request | None       never waits (None also while another thread is receiving)
  .recv_many(max_n, timeout_ns=-1) -> [Request]   waits (per wait mode) for one message, then
      takes more without waiting, up to max_n in all, round robin; [] on timeout. A channel
      found corrupt after some were gathered: they are returned, and the CorruptChannel is
      raised by the next recv/poll/recv_many.
  .poll_armed() -> Request | None   as poll(), but when nothing is there: empties event_fd,
      sets the doorbell's DB_EVENT_WANTED_OFF, fences, looks again; None means "armed": a
      client's next publish writes the service's eventfd. A returned message (any recv/poll)
      clears the flag. Hostile clients: setting the flag or writing the eventfd only causes
      spurious wake-ups; clearing the flag (or reading the shared eventfd) can make a wake-up
      go missing, so an event loop must re-poll at least every SLEEP_CAP_NS while armed (the
      futex path has the same bound). If the receive budget ran out with work left, it
      writes event_fd itself (come straight back) instead of arming.
  .reply(index, tag, opcode, flags, data, payload=None) -> None   the raw reply (no check that
      the tag belongs to the channel now at that index: the runtime uses Request.reply). Never
      blocks: WouldBlock if the response ring/arena is full; PeerDied if the channel is removed,
      dead or not OPEN; CorruptChannel if the client scribbled the response ring's cursors.
  .refused(index) -> int            the client's count of messages refused for a full ring
                                    (CHAN_REFUSED_OFF: untrusted, informational)
  Zero-copy receive: a request whose payload has FLAG_LOANED or >= ZC_THRESHOLD (64 KiB)
      bytes is not copied: Request.payload is a READ-ONLY memoryview of the request arena
      (checksum, if any, verified in place at receive). It, and everything made from it
      (slices, casts, memoryview(p), numpy.frombuffer, Request.object() results), stays valid
      and shows that message's bytes for as long as it lives: the chunk goes back to the client
      only when the request is done -- replied to (any final outcome: sent, PeerDied; not
      WouldBlock), Request.release(), or the Request deallocated -- AND the last view of it is
      gone, whichever comes last. From the request's end on, .payload itself reads as a
      released memoryview (take views before replying). memoryview.release() on a view counts
      as that view gone (arrays built on it before must not be used after it). Smaller
      payloads are still copied (bytes). The sender can rewrite a zero-copy payload while it is
      held (only a hostile or careless one would): copy it, or use a sealed region, where that
      matters.
      Chunks are released in any order; the client sees only the contiguous released prefix
      (arena_released), so held memory is never reused. A channel keeps at most
      max(64, 2 * nslots) queue entries (released chunks behind a held one share entries);
      when they are used up it is not served until the oldest held payload is released: a
      receiver that holds requests or views stalls (and fills the arena of) only that channel;
      its sender gets WouldBlock. remove()/drain/close() keep a channel's mapping until the
      last of its payload views is gone (CorruptChannel channels too: views stay readable).
  .drops(index) -> {"rate", "bandwidth", "size", "expired", "rights": int}   refused by limits
  .interrupt()  the running (or next) recv/recv_many raises Cancelled
  .is_dead(index) -> bool;  .close();  .draining (int);  len(set);  index in set
  .buckets (int)   token buckets held per capability (see "Capability limits" above)
  One receiver at a time (recv/poll/recv_many share a lock; reply may run in any thread).

---- Request: a received message ------------------------------------------------------------
  Made only by the core. Read-only: .sender (kernel-verified ProcessId), .opcode, .flags
  (FLAG_USER_MASK bits), .data (4-tuple), .payload (bytes, b"" when none; a
  read-only memoryview when zero-copy), .zero_copy, .expects_reply,
  .replied, .capability (as sent, untrusted), .index, .tag (internal). Read-write: .regions,
  .caps (default ()). Holds a strong reference to its ServerSet, and replies only to the
  channel instance it came from (never to a later channel at the same index).
  .generation (internal): its channel instance's, as given to ServerSet.add(generation=).
  .reply(opcode=0, data=(), payload=b"", flags=0) -> bool   flags: FLAG_USER_MASK (and
      FLAG_CHECKSUM) bits, else ValueError; b"" = no payload. True if the reply was written;
      False if it was dropped (and counted in reply_failed): the client is gone, its channel is
      not open, it does not read its replies (a full response ring) or it scribbled that ring;
      the request counts as answered either way, and a client can never make this raise.
      IpcError("...already been replied to") the second time, IpcError("...send_async: it
      takes no reply") for a one-way message; bad arguments raise (ValueError, TypeError,
      MessageTooLarge).
  .reply_error(code, text) -> bool   FLAG_ERROR, data[0] = code, payload = text (str: UTF-8,
      or bytes-like; cut to 4096 bytes); False if answered already, one-way, or undeliverable
      (as reply()): error paths need not catch anything. reply_object(obj, opcode=0,
      pickle=False) -> bool: reply() with an object payload.
  .payload is bytes, or a read-only memoryview for a zero-copy payload (.zero_copy True; see
  ServerSet). .release(): the request is done with a zero-copy payload before (or without)
  replying (its chunk goes back once no view of it is left); a no-op otherwise and the second
  time. reply/reply_error do the same.

---- Metrics (channel header page; layout in _native/layout.h, every offset exported) ----------
  Client block at CHAN_CSTATS_OFF, written only by the Lane; server block at CHAN_SSTATS_OFF,
  written only by the ServerSet; u64 counters, stored with RELAXED atomic stores from private
  copies (single writer: no locked RMW, no syscall). Untrusted numbers for any reader.
  Lane: sent (messages: calls and one-way, counted when published; send_many once per batch),
  bytes_sent, calls (call, call_start, call_loan), timeouts (Timeout from call/call_loan),
  refused_rate (messages refused by the lane's buckets: one per RateLimitExceeded, send_many:
  each message they stopped), refused_size (one per MessageTooLarge the lane raises, loan()
  included), refused_perm (PermissionDenied / expired), latency_max_ns / _sum_ns / _count and
  hist[STATS_HIST_BUCKETS] (call round trips: CLOCK_MONOTONIC before the write and when the
  reply is taken; call_start to call_poll for those; bucket i = [100 ns * 2^i, 100 ns *
  2^(i+1)), bucket 0 also below, the last also above), sec_index / sec_count / prev_count
  (messages sent per CLOCK_MONOTONIC second). CHAN_REFUSED_OFF stays the WouldBlock count.
  ServerSet: received / bytes_received (delivered requests), replies (the application's
  replies written: Request.reply/reply_error, ServerSet.reply; not automatic refusals),
  reply_failed (PeerDied on a reply while the channel is still in the set), drops_rate /
  _bandwidth / _size / _expired / _rights (as .drops()), cancelled (skipped cancelled calls),
  sec_index / sec_count / prev_count (received per second).
  channel_stats(buf) keys: sent, bytes_sent, calls, timeouts, refused_wouldblock, refused_rate,
  refused_size, refused_perm, latency_max_ns, latency_sum_ns, latency_count, sent_last_second,
  hist (list of 28), received, bytes_received, replies, reply_failed, drops_rate,
  drops_bandwidth, drops_size, drops_expired, drops_rights, cancelled, received_last_second.
  *_last_second: prev_count if sec_index is the current second, sec_count if it is the one
  before, else 0 (i.e. the messages of the last whole second).

---- Fronts: EndpointBase and ServiceBase (bases of capbus.Endpoint and capbus.Service) ------
  EndpointBase.call(opcode, data=(), payload=b"", timeout=None, flags=0, caps=(), regions=(),
  move=False) and .send_async(opcode, data=(), payload=b"", flags=0, caps=(), regions=(),
  move=False, timeout=0) run the plain case natively (flags 0, no caps or regions; a
  send_async with a timeout other than 0 is tried natively, and only a full ring or arena goes
  on to slow_send, which waits for room); anything else goes to
  slow_call(self, *args, **kw) / slow_send(self, *args, **kw) with the same arguments. A
  thread's lane comes from open_lane(self) -> Lane on a cache miss (kept per thread and fork
  generation; dropped by ._forget_lanes() or a new .handle). An error reply raises what
  remote_error(self, reply) returns. ServiceBase.recv(timeout=None) runs natively unless ._closed,
  ._slow or no ._set: then slow_recv(self, timeout=None); a CorruptChannel met natively goes to
  slow_recv(self, time_left, corrupt); a request with TRANSFER_FLAG is passed to claim(self,
  request) before it is returned. ._lost (a KernelUnavailable or None): why a closed service's
  recv fails. A subclass that never called the base's __init__ gets TypeError from these.

---- Exceptions -----------------------------------------------------------------------------
  capbus._errors classes (IpcError, Timeout, PeerDied, InvalidCapability, WouldBlock,
  MessageTooLarge, ProtocolError, Cancelled, PermissionDenied, RateLimitExceeded), as
  register() handed them in, plus CorruptChannel(ProtocolError) defined by register().

---- Memfd requirements ---------------------------------------------------------------------
  Every memfd handed to Lane/ServerSet must be sealed against shrinking (F_SEAL_SHRINK; we add
  it if the memfd allows sealing) and at least as big as its layout, else ValueError: a peer
  that could truncate a mapping under us would crash us with SIGBUS.
"""

# The types below are read off the C sources in _native/ (module.c's method table, each type's
# PyMethodDef/PyMemberDef/PyGetSetDef): METH_O, METH_VARARGS without keywords and METH_FASTCALL
# without keywords take positional arguments only (`/`). `Any` is left only where the value is
# whatever a peer's payload decodes to (object()).
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType
from typing import Any, TypeAlias, final

from typing_extensions import Buffer, disjoint_base

from capbus._errors import ProtocolError

# What capbus._layout (the kernel's small module) exports too (ChannelStats, the channel layout
# constants, futex_wake, the atomic stores, set_dumpable): declared once, there.
from capbus._layout import *  # noqa: F403
from capbus._runtime.endpoint import Endpoint
from capbus._runtime.region import Region
from capbus._runtime.topic import TopicCapability

# The four data words: a tuple or list of up to 4 u64 (zero-padded); parse_data takes no other
# sequence.
Data: TypeAlias = tuple[int, ...] | list[int]
# A payload: any object with the buffer protocol (bytes, bytearray, memoryview, mmap, numpy
# array), or None for "no payload".
Payload: TypeAlias = Buffer | None
# send_many's messages: (opcode, data) or (opcode, data, payload) tuples.
Batch: TypeAlias = Sequence[tuple[int, Data] | tuple[int, Data, Payload]]

# ---- Primitives on any buffer-protocol object at a byte offset
def futex_wait(buf: Buffer, offset: int, expected: int, timeout: float | None = None) -> bool: ...
def atomic_load_u32(buf: Buffer, off: int, /) -> int: ...
def atomic_load_u64(buf: Buffer, off: int, /) -> int: ...
def atomic_cas_u32(buf: Buffer, off: int, expected: int, desired: int, /) -> bool: ...
def atomic_cas_u64(buf: Buffer, off: int, expected: int, desired: int, /) -> bool: ...
def atomic_add_u64(buf: Buffer, off: int, v: int, /) -> int: ...

# ---- Layout helpers and module-level functions
def max_payload(arena_size: int, /) -> int: ...
def latency_clock() -> str: ...  # "monotonic", "monotonic (tsc rate not measured yet)" or "tsc"
def crc32(data: Buffer, value: int = 0, /) -> int: ...
def thread_priority() -> int: ...
def refresh_priority() -> None: ...
def restore_priority() -> None: ...

def dumpable() -> bool: ...
def register(*, errors: ModuleType, object_loads: Callable[[Any, bool], Any],
             object_pack: Callable[[Any, bool], bytes]) -> None: ...

class CorruptChannel(ProtocolError):
    index: int
    reason: str

class Message(tuple[int, int, int, int, int, int, bytes | None]):
    """A call's reply: (opcode, flags, d0, d1, d2, d3, payload bytes or None), made by the core."""

    @property
    def opcode(self) -> int: ...
    @property
    def flags(self) -> int: ...
    @property
    def data(self) -> tuple[int, int, int, int]: ...
    @property
    def payload(self) -> bytes: ...  # b"" when none
    def object(self, trusted: bool = False) -> Any: ...  # what the peer's payload decodes to

@final  # not subclassable (no Py_TPFLAGS_BASETYPE)
class Lane:
    @property
    def index(self) -> int: ...
    @property
    def broken(self) -> bool: ...
    @property
    def closed(self) -> bool: ...
    @property
    def marked(self) -> int: ...
    @property
    def last_tag(self) -> int: ...
    @property
    def max_payload(self) -> int: ...
    @property
    def spin_budget(self) -> int: ...
    @property
    def refused(self) -> int: ...
    @property
    def loaned(self) -> int | None: ...
    def __init__(self, chan_fd: int, ctrl_fd: int, doorbell_fd: int, index: int, nslots: int = 256,
                 arena_size: int = ..., wait_mode: int = 1, spin_ns: int = 50000,
                 bell_event_fd: int = -1, reply_event_fd: int = -1, bell_sleep_fd: int = -1,
                 reply_sleep_fd: int = -1) -> None: ...
    def call(self, capability: int, opcode: int, flags: int, data: Data, payload: Payload = None,
             timeout_ns: int = -1) -> Message: ...
    def send(self, capability: int, opcode: int, flags: int, data: Data,
             payload: Payload = None) -> None: ...
    def send_many(self, capability: int, flags: int, messages: Batch, /) -> int: ...
    def call_start(self, capability: int, opcode: int, flags: int, data: Data,
                   payload: Payload = None) -> int: ...
    def call_poll(self, tag: int, arm: bool = False) -> Message | None: ...
    def call_wait(self, tag: int, timeout_ns: int | None) -> Message | None: ...
    def cancel(self, tag: int, /) -> None: ...
    def want_room(self, on: bool, /) -> None: ...
    def loan(self, n: int, /) -> memoryview: ...
    def call_loan(self, capability: int, opcode: int, flags: int, data: Data,
                  timeout_ns: int = -1) -> Message: ...
    def send_loan(self, capability: int, opcode: int, flags: int, data: Data) -> None: ...
    def cancel_loan(self) -> None: ...
    def close(self) -> None: ...
    def mark(self, state: int, /) -> None: ...

@disjoint_base  # a C layout of its own
class Request:
    """A received message (made only by the core: recv/poll/recv_many)."""

    @property
    def sender(self) -> int: ...  # kernel-verified ProcessId
    @property
    def opcode(self) -> int: ...
    @property
    def flags(self) -> int: ...
    @property
    def priority(self) -> int | None: ...
    @property
    def data(self) -> tuple[int, int, int, int]: ...
    @property
    def payload(self) -> bytes | memoryview: ...  # a read-only memoryview when zero-copy
    @property
    def zero_copy(self) -> bool: ...
    @property
    def expects_reply(self) -> bool: ...
    @property
    def replied(self) -> bool: ...
    @property
    def cancelled(self) -> bool: ...  # the caller stopped waiting (its cancel mark, or gone)
    @property
    def capability(self) -> int: ...  # as sent: untrusted
    @property
    def index(self) -> int: ...
    @property
    def tag(self) -> int: ...
    @property
    def generation(self) -> int: ...
    # Read-write, () until the runtime's claim fills them (Service._claim).
    regions: tuple[Region, ...]
    caps: tuple[Endpoint, ...]
    topics: tuple[TopicCapability, ...]  # topic capabilities that came with it
    def reply(self, opcode: int = 0, data: Data = (), payload: Payload = b"", flags: int = 0) -> bool: ...
    def reply_error(self, code: int, text: str | Buffer) -> bool: ...
    def _reply_ipc_error(self, code: int, text: str | Buffer) -> bool: ...
    def reply_object(self, obj: object, opcode: int = 0, pickle: bool = False) -> bool: ...
    def object(self, trusted: bool = False) -> Any: ...  # what the peer's payload decodes to
    def release(self) -> None: ...

@final  # not subclassable (no Py_TPFLAGS_BASETYPE)
class ServerSet:
    @property
    def draining(self) -> int: ...
    @property
    def buckets(self) -> int: ...
    def __init__(self, doorbell_fd: int, wait_mode: int = 1, spin_ns: int = 50000, event_fd: int = -1,
                 sleep_fd: int = -1) -> None: ...
    def add(self, index: int, chan_fd: int, ctrl_fd: int, nslots: int = 256, arena_size: int = ...,
            sender_id: int | None = None, reply_event_fd: int = -1, reply_sleep_fd: int = -1,
            reply_sleep_keep_fd: int = -1, generation: int = 0) -> None: ...
    def remove(self, index: int, drain: bool = False) -> None: ...
    def recv(self, timeout_ns: int = -1, /) -> Request: ...
    def set_priority(self, lo: int, hi: int, adopt: bool = True) -> None: ...
    def recv_many(self, max_n: int, timeout_ns: int = -1, /) -> list[Request]: ...
    def poll(self) -> Request | None: ...
    def poll_armed(self) -> Request | None: ...
    def reply(self, index: int, tag: int, opcode: int, flags: int, data: Data,
              payload: Payload = None, /) -> None: ...
    def interrupt(self) -> None: ...
    def close(self) -> None: ...
    def is_dead(self, index: int, /) -> bool: ...
    def refused(self, index: int, /) -> int: ...
    def drops(self, index: int, /) -> dict[str, int]: ...
    def __contains__(self, index: object, /) -> bool: ...
    def __len__(self) -> int: ...

# A topic's layout as the native data path uses it (_native/topic.h); the same numbers as
# capbus._topic_layout (tests/core/test_core_topic.py compares them).
TP_POOL_PUBLISHED_OFF: int
TP_POOL_HEADER: int
TP_R_HEAD_OFF: int
TP_R_WAKE_OFF: int
TP_R_PUB_WAITING_OFF: int
TP_R_REL_TAIL_OFF: int
TP_R_DELIVERED_OFF: int
TP_R_SLEEPING_OFF: int
TP_R_PUB_WAKE_OFF: int
TP_R_REL_HEAD_OFF: int
TP_R_TAKEN_OFF: int
TP_R_DROPPED_OFF: int
TP_R_ENTRIES_OFF: int
TP_ENTRY_SIZE: int
TP_ST_WRITTEN: int
TP_ST_TAKEN: int
TP_ST_BUSY: int

@final
class TopicPub:
    """A publisher's data path (topic_pub.c): slots, what each subscriber holds (its private
    count), delivery into every subscription ring. GIL held; the caller holds its lock."""

    def __new__(cls, pool: Buffer, slots: int, slot_size: int, history: int,
                max_held: int, block: bool = False, max_size: int = 0) -> TopicPub: ...
    def add(self, index: int, ring: Buffer, depth: int, event_fd: int, /) -> None: ...
    def remove(self, index: int, /) -> None: ...
    def publish(self, payload: Buffer, opcode: int, data: Sequence[int],
                /) -> int | bool | None: ...
    def publish_many(self, items: list[tuple[int, Sequence[int], Buffer]], start: int,
                     block: bool, max_size: int, /) -> tuple[int, int, bool]: ...
    def alloc(self) -> int | None: ...
    def unref(self, slot: int, /) -> None: ...
    def deliver(self, slot: int, n: int, opcode: int, data: Sequence[int], /) -> int: ...
    def full(self) -> int: ...
    def take_cuts(self) -> list[tuple[int, str]]: ...
    def refs(self) -> int: ...
    @property
    def seq(self) -> int: ...
    @property
    def cuts(self) -> int: ...

@final
class TopicSub:
    """A subscriber's data path (topic_sub.c): claim entries, count drops, release slots."""

    def __new__(cls, ring: Buffer, pool: Buffer, slots: int, depth: int, slot_size: int,
                max_size: int, relcap: int, max_held: int, publisher: int) -> TopicSub: ...
    def take(self) -> Sample | str | bool | None: ...
    def take_many(self, n: int, /) -> list[Sample] | str | bool | None: ...
    def flush(self) -> bool: ...
    def pending(self) -> bool: ...
    @property
    def dropped(self) -> int: ...
    @property
    def held(self) -> int: ...

@final
class Sample:
    """One received topic sample (topic_sample.c), public as capbus.Sample: the slot goes back
    once it is released AND no view of its payload is left."""

    def __buffer__(self, flags: int, /) -> memoryview: ...
    @property
    def payload(self) -> memoryview: ...
    @property
    def opcode(self) -> int: ...
    @property
    def data(self) -> tuple[int, int, int, int]: ...
    @property
    def seq(self) -> int: ...
    @property
    def dropped(self) -> int: ...
    @property
    def publisher(self) -> int: ...
    @property
    def released(self) -> bool: ...
    def release(self) -> None: ...
    def __enter__(self) -> Sample: ...
    def __exit__(self, *exc: object) -> None: ...

@final
class SampleView:
    """One topic sample's memory (topic_view.c): on_free(arg) runs once, when done() was called
    and no view of it is left (or the object dies); then it refuses new exports (BufferError)."""

    def __new__(cls, mapping: Buffer, offset: int, length: int, readonly: bool,
                on_free: Callable[[Any], object], arg: Any) -> SampleView: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def done(self) -> None: ...
    @property
    def exports(self) -> int: ...
    @property
    def freed(self) -> bool: ...

@disjoint_base  # a C layout of its own
class EndpointBase:
    """The native half of capbus.Endpoint: call and send_async (slow paths: _call_slow, ...)."""

    handle: int
    def __init__(self, *, open_lane: Callable[[Any], Lane], slow_call: Callable[..., Any],
                 slow_send: Callable[..., Any],
                 remote_error: Callable[[Any, Message], Exception]) -> None: ...
    def call(self, opcode: int, data: Data = (), payload: Payload = b"", timeout: float | None = None,
             flags: int = 0, caps: Iterable[Endpoint | TopicCapability] = (), regions: Iterable[Region] = (),
             move: bool = False) -> Message: ...
    def send_async(self, opcode: int, data: Data = (), payload: Payload = b"", flags: int = 0,
                   caps: Iterable[Endpoint | TopicCapability] = (), regions: Iterable[Region] = (),
                   move: bool = False, timeout: float | None = 0) -> None: ...
    def _forget_lanes(self) -> None: ...

@disjoint_base  # a C layout of its own
class ServiceBase:
    """The native half of capbus.Service: recv (slow path: _recv_slow)."""

    _closed: bool
    _slow: bool
    _lost: Any  # KernelUnavailable | None: set by the runtime when the kernel is gone
    def __init__(self, *, slow_recv: Callable[..., Any],
                 claim: Callable[[Any, Request], None]) -> None: ...
    _set: ServerSet  # never None: unset reads raise AttributeError, None is refused
    def recv(self, timeout: float | None = None) -> Request: ...

# ---- Constants (from _native/layout.h and the module's own; all int)
CHAN_MAGIC_BYTES: bytes

BUCKET_IDLE_MAX: int
DB_SEQ_OFF: int
DB_SERVER_SLEEPING_OFF: int
DB_EVENT_WANTED_OFF: int
DB_SERVER_SPINS_OFF: int
DB_BITMAP_OFF: int
CHAN_HEADER_SIZE: int
CHAN_CANCEL_BELOW_OFF: int
CHAN_REFUSED_OFF: int
RING_HEAD_OFF: int
RING_CONSUMER_SLEEPING_OFF: int
RING_CONSUMER_EVENT_OFF: int
RING_PRODUCER_WAITING_OFF: int
RING_ARENA_RELEASED_OFF: int
RING_SLOTS_OFF: int
REQ_RING_OFF: int
DEFAULT_NSLOTS: int
MIN_NSLOTS: int
MAX_NSLOTS: int
DEFAULT_ARENA_SIZE: int
MIN_ARENA_SIZE: int
MAX_ARENA_SIZE: int
SLOT_SIZE: int
SMALL_MESSAGE_SIZE: int
FLAG_LARGE: int
FLAG_CHECKSUM: int
FLAG_REPLY_EXPECTED: int
FLAG_ERROR: int
FLAG_LOANED: int
FLAG_IPC_ERROR: int
FLAG_USER_MASK: int
FLAG_PRIO: int
FLAG_PRIO_RR: int
FLAG_PRIO_MASK: int
FLAG_PRIO_SHIFT: int
PRIO_SLOT_BIAS: int
FLAG_KNOWN_MASK: int
ZC_THRESHOLD: int
CHAN_CSTATS_OFF: int
CSTATS_SENT_OFF: int
CSTATS_BYTES_SENT_OFF: int
CSTATS_CALLS_OFF: int
CSTATS_TIMEOUTS_OFF: int
CSTATS_REFUSED_RATE_OFF: int
CSTATS_REFUSED_SIZE_OFF: int
CSTATS_REFUSED_PERM_OFF: int
CSTATS_LATENCY_MAX_OFF: int
CSTATS_LATENCY_SUM_OFF: int
CSTATS_LATENCY_COUNT_OFF: int
CSTATS_SEC_INDEX_OFF: int
CSTATS_SEC_COUNT_OFF: int
CSTATS_PREV_COUNT_OFF: int
CSTATS_HIST_OFF: int
CSTATS_SIZE: int
STATS_HIST_BUCKETS: int
STATS_HIST_BASE_NS: int
STATS_SEC_INDEX_OFF: int
STATS_SEC_COUNT_OFF: int
STATS_PREV_COUNT_OFF: int
CHAN_SSTATS_OFF: int
SSTATS_RECEIVED_OFF: int
SSTATS_BYTES_RECEIVED_OFF: int
SSTATS_REPLIES_OFF: int
SSTATS_REPLY_FAILED_OFF: int
SSTATS_DROPS_RATE_OFF: int
SSTATS_DROPS_BANDWIDTH_OFF: int
SSTATS_DROPS_SIZE_OFF: int
SSTATS_DROPS_EXPIRED_OFF: int
SSTATS_DROPS_RIGHTS_OFF: int
SSTATS_CANCELLED_OFF: int
SSTATS_SEC_INDEX_OFF: int
SSTATS_SEC_COUNT_OFF: int
SSTATS_PREV_COUNT_OFF: int
SSTATS_SIZE: int
LARGE_MSG_SIZE: int
LM_CAPABILITY_OFF: int
LM_OPCODE_OFF: int
LM_FLAGS_OFF: int
LM_TOTAL_SIZE_OFF: int
LM_CHECKSUM_OFF: int
LM_PAD_OFF: int
LM_REGION_BASE_OFF: int
LM_REGION_SIZE_OFF: int
LM_REGION_PERMISSIONS_OFF: int
LM_REGION_CACHE_POLICY_OFF: int
LM_INLINE_OFF: int
LM_INLINE_SIZE: int
REGION_PERM_READ: int
CHUNK_ALIGN: int
WAIT_SPIN: int
WAIT_ADAPTIVE: int
WAIT_BLOCK: int
DEFAULT_SPIN_NS: int
SLEEP_CAP_NS: int
SLICE_NS: int
FULL_SCAN_NS: int
BATCH_MAX: int
TRANSFER_FLAG: int
OBJECT_FLAG: int
DEFAULT_RESP_RING_OFF: int
RESP_TAIL_OFF: int
SLOT_TAG_OFF: int
SLOT_CAPABILITY_OFF: int
SLOT_OPCODE_OFF: int
SLOT_FLAGS_OFF: int
SLOT_DATA_OFF: int
SLOT_PAYLOAD_OFF_OFF: int
SLOT_PAYLOAD_LEN_OFF: int
