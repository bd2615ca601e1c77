/*
 * capbus._core -- the native core of capbus.
 *
 * Python-visible API (internal; only the capbus kernel, runtime and tests use it). Layout
 * constants live in _core_layout.h and are exported as module attributes; the ring engine
 * (producer/consumer, CRC-32) lives in _core_ring.h; capability limits (control-page reads and
 * token buckets) in _core_limits.h.
 *
 * ---- Primitives on any buffer-protocol object (e.g. an mmap) at a byte offset --------------
 * Offsets must be inside the buffer and naturally aligned (offset and address), else ValueError.
 * Stores/CAS/add need a writable buffer (TypeError otherwise); loads, futex_wait and futex_wake
 * also work on read-only mappings. All of these atomics are seq_cst.
 *   futex_wait(buf, offset, expected, timeout=None) -> bool   shared futex; True if woken or
 *       the value differs, False on timeout (seconds, None = forever); EINTR retries with the
 *       remaining time after running Python signal handlers (which may raise)
 *   futex_wake(buf, offset, n=INT_MAX) -> int                  number woken
 *   atomic_load_u32/u64(buf, off) -> int
 *   atomic_store_u32/u64(buf, off, v) -> None
 *   atomic_cas_u32/u64(buf, off, expected, desired) -> bool
 *   atomic_add_u64(buf, off, v) -> int                          old value (wraps mod 2**64)
 *
 * ---- Layout helpers -------------------------------------------------------------------------
 *   channel_size(nslots=256, arena_size=128 MiB) -> int
 *   channel_layout(nslots=256, arena_size=128 MiB) -> dict of absolute offsets (req_tail,
 *       resp_tail, resp_consumer_sleeping, resp_consumer_event, req_arena, resp_arena,
 *       cancel_below, refused, cstats, sstats, size, ...)
 *   resp_ring_off(nslots) -> int      the client futex-waits on the u32 at
 *       resp_ring_off(nslots) + RING_TAIL_OFF (= RESP_TAIL_OFF for the default 256 slots)
 *   max_payload(arena_size) -> int    arena_size - 128 (one chunk header)
 *   create_channel(nslots=256, arena_size=128 MiB) -> fd   memfd, sized, header written,
 *       sealed SHRINK|GROW|SEAL
 *   create_page(name="capbus-page") -> fd   4096-byte memfd sealed SHRINK|GROW (more seals,
 *       e.g. F_SEAL_FUTURE_WRITE for a control page, may still be added)
 *   wake_lane(chan, nslots=256) -> int   futex_wake every client blocked in call() on a channel
 *       (chan = the channel memfd, or a buffer mapping it from offset 0); the kernel calls this
 *       (or futex_wake on its own mapping at that offset) after changing a control page, and
 *       writes the channel's reply eventfd (if it made one) for clients waiting in an event loop
 *   crc32(data, value=0) -> int       = zlib.crc32, the payload checksum
 *   channel_stats(buf) -> dict        the metrics of a channel (see "Metrics" below) from any
 *       buffer holding its header page (>= CHAN_SSTATS_OFF + SSTATS_SIZE bytes, else ValueError)
 *
 * ---- Result types ----------------------------------------------------------------------------
 *   set_types(message_type, request_type)   called once by the runtime at import. message_type: a
 *       tuple subclass (capbus.Message); call()/call_poll() results are its instances, allocated
 *       directly by the core (no Python constructor runs): (opcode, flags, d0, d1, d2, d3,
 *       payload bytes or None). request_type: a subclass of Request (slot-free: __slots__ = ());
 *       recv/poll/recv_many return its instances. None restores the default (tuple / Request).
 *
 * ---- Lane: the client end of one channel ----------------------------------------------------
 *   Lane(chan_fd, ctrl_fd, doorbell_fd, index, nslots=256, arena_size=128 MiB, wait_mode=1,
 *        spin_ns=50000, bell_event_fd=-1, reply_event_fd=-1, bell_sleep_fd=-1,
 *        reply_sleep_fd=-1)
 *       wait_mode: 0 spin, 1 adaptive, 2 block. The Lane keeps its own mappings and duplicates of
 *       the fds (the event eventfds set O_NONBLOCK): the caller may close its fds afterwards.
 *       bell_sleep_fd: the service's sleep eventfd (written when the server sleeps on it);
 *       reply_sleep_fd: the read end of this channel's reply-sleep pipe (untimed waits sleep in
 *       read(2) on it). See "Sleep eventfds and kicks".
 *   data below is a tuple or list of up to 4 u64 (zero-padded; ValueError when more or out of
 *   range, TypeError for a non-int).
 *   .call(capability, opcode, flags, data, payload=None, timeout_ns=-1) -> Message
 *       Timeout (the request is cancelled), PeerDied / InvalidCapability from the control page
 *       (a reply already in the ring is delivered first), ValueError / MessageTooLarge before
 *       anything is written, ProtocolError if the server wrote garbage (the lane is then broken).
 *   .send(capability, opcode, flags, data, payload=None) -> None     one-way; WouldBlock (counted
 *       in .refused) when the ring or arena is full
 *   .send_many(capability, flags, [(opcode, data[, payload]), ...]) -> int accepted
 *       Every message that could fit (at most 1024) is parsed and checked before anything is
 *       written (TypeError / ValueError / MessageTooLarge: nothing written); then they are written
 *       in order until the ring, the arena or the rate/bandwidth limit stops them; one tail store
 *       and one doorbell ring for the batch. When the ring/arena stopped them, len(messages) -
 *       accepted is added to .refused. 0 accepted because of the rate/bandwidth limit raises
 *       RateLimitExceeded (0 because the ring is full returns 0).
 *   .call_start(capability, opcode, flags, data, payload=None) -> tag   a call that does not wait
 *       (WouldBlock, counted in .refused, when full); rings the doorbell.
 *   .call_poll(tag, arm=False) -> Message | None   the reply of the lane's latest call (tag must
 *       be it: ValueError otherwise), dropping older late replies as call() does; PeerDied /
 *       InvalidCapability / ProtocolError as call(). arm=True and nothing there: empties the
 *       reply eventfd, sets RING_CONSUMER_EVENT_OFF in the response ring, fences, looks again;
 *       None then means "armed": the server's next reply writes the reply eventfd. (A control-page
 *       change is announced by the kernel; the event loop should re-poll on that too.) One
 *       outstanding call_start per lane.
 *   .cancel(tag)   the call with this tag (and every earlier one) is not waited for any more:
 *       cancel_below = tag + 1 (never moves back); ValueError for a tag never sent.
 *   .loan(n) -> memoryview   reserve a chunk of the request arena for an n-byte payload and
 *       return a WRITABLE view of exactly its n payload bytes (after the 128-byte LargeMessage
 *       struct; for n <= 64, its inline area). Nothing is sent yet. One loan per lane at a time
 *       (RuntimeError); while it is out, call/send/call_start/send_many with a payload raise
 *       RuntimeError (payload-less messages may go). WouldBlock ("the arena for this channel is
 *       full: the receiver still holds earlier payloads"; counted in .refused); MessageTooLarge
 *       for n > max_payload or the capability's size limit. Dropping the view does not end the
 *       loan (loan(n)[:] = data; send_loan(...) is fine).
 *   .call_loan(capability, opcode, flags, data, timeout_ns=-1) -> Message
 *   .send_loan(capability, opcode, flags, data) -> None
 *       commit the loan as this message's payload, no copy: the core writes the LargeMessage
 *       struct (CRC over the loaned bytes only with FLAG_CHECKSUM) and the slot, and sets
 *       FLAG_LOANED. As call()/send() otherwise (limits, Timeout, state errors). The loan stays
 *       out when nothing was written (an error before the write, a Timeout waiting for ring
 *       room, send_loan's WouldBlock for a full ring); RuntimeError without a loan.
 *   .cancel_loan()   give the chunk back (the cursor never moved: nothing else can have been
 *       allocated since); a no-op without a loan.
 *   Loan views never outlive their memory. A loan's views (and anything made from them: slices,
 *       numpy arrays) stay valid after the commit, the cancel and close(), and the lane never
 *       allocates a chunk that overlaps memory such a view still shows: after a commit they show
 *       only their own message (writing to them changes that payload, which the receiver may be
 *       reading: the documented hazard of loans), never a later one. When the place the arena
 *       offers is under a view, the other places the receiver accepts are tried (the FIFO cursor
 *       instead of the idle jump to offset 0, then the next lap's start); while one of those is
 *       only full, the arena counts as full (call() waits for the receiver as usual); when the
 *       receiver has released everything and only the lane's own loan views are in the way,
 *       payloads on THIS lane get WouldBlock ("a view of an earlier loan ... still shows the
 *       arena memory ..."; counted in .refused; call() raises it at once too: there is nothing
 *       to wait for) until the view goes. Other lanes and payload-less messages are not
 *       affected. So a cancelled loan whose views are kept keeps its chunk reserved; `v =
 *       loan(n)` in a loop (the previous view still bound) goes on. The channel stays mapped
 *       after close() until the last loan view is gone.
 *   .close();  attributes .index, .broken, .closed, .last_tag, .max_payload, .refused,
 *   .loaned (bytes of the loan that is out, or None)
 *   One thread at a time (RuntimeError otherwise); the channel must be fresh.
 *   Flags: callers may pass FLAG_CHECKSUM, FLAG_ERROR and FLAG_USER_MASK bits; FLAG_LARGE,
 *   FLAG_REPLY_EXPECTED and FLAG_LOANED are set by the core (call vs send, payload > 64 bytes,
 *   loan), so received flags can be passed back unchanged. Any other bit is a ValueError.
 *   payload=None is "no payload"; b"" is an empty payload (it is delivered as b"").
 *   Publishing (send, send_many, call, call_start): if the doorbell's DB_EVENT_WANTED_OFF is set
 *   and the Lane has a bell_event_fd, it writes 1 there (EAGAIN ignored).
 *
 * ---- Capability limits (both ends) ------------------------------------------------------------
 *   The kernel writes them into the control page: CTRL_RIGHTS_OFF (RIGHT_* bits), CTRL_EXPIRY_OFF
 *   (CLOCK_MONOTONIC ns, 0 none), CTRL_MAX_MESSAGE_SIZE_OFF (payload bytes, 0 none),
 *   CTRL_RATE_LIMIT_OFF (messages/s, 0 none), CTRL_BANDWIDTH_OFF (payload bytes/s, 0 none), and
 *   LAST CTRL_FLAGS_OFF: only with CTRL_F_ENFORCE set is anything checked (one branch otherwise).
 *   It may change them at any time; they are read per message. Before it hands the page out it
 *   also writes which buckets the rate and bandwidth belong to: CTRL_CAP_ID_OFF (the
 *   capability's kernel-unique id, never reused while the kernel runs; 0 = the channel's own
 *   bucket) and CTRL_CHAIN_OFF/CTRL_CHAIN_LEN_OFF (up to CTRL_CHAIN_MAX limited ancestors:
 *   id, rate, bandwidth). Those are read once, by ServerSet.add.
 *   Buckets: rate: capacity one second of messages; bandwidth: one second of bytes; both start
 *   full.
 *   Lane (fail fast, nothing written): no RIGHT_SEND -> PermissionDenied; expired ->
 *   InvalidCapability("...expired"); payload > max -> MessageTooLarge; its own buckets (per
 *   lane: advisory, a fresh lane starts full) -> RateLimitExceeded.
 *   ServerSet (what counts; its buckets are private): the buckets belong to capabilities, not
 *   channels. add() finds (or makes) the bucket of CTRL_CAP_ID_OFF and of each chain id in a
 *   private hash table and pins them, so every channel, thread and process using one
 *   capability, or one derived from it, draws on the same budget, and each message is charged
 *   to the leaf's bucket and every ancestor's: O(1 + chain), no lookup, lock or syscall. A
 *   bucket outlives its last channel until it has refilled (BKT_IDLE_NS), so closing and
 *   reopening channels gains nothing; at most BUCKET_IDLE_MAX idle ones are kept (memory is
 *   bounded by the channels: see "Buckets per capability" in _core_limits.h). A message that
 *   fails is not delivered; a call gets an automatic error reply (FLAG_ERROR, data[0] =
 *   RateLimitExceeded.code for rate or bandwidth, naming the limit that refused it,
 *   MessageTooLarge.code for size, InvalidCapability.code for expiry or a missing send right;
 *   payload a short text), a one-way message is dropped; counted per reason.
 *
 * ---- ServerSet: the service end, up to MAX_CHANNELS channels by index ----------------------
 *   ServerSet(doorbell_fd, wait_mode=1, spin_ns=50000, event_fd=-1, sleep_fd=-1)
 *       sleep_fd: the service's sleep eventfd (blocking): untimed waits sleep in read(2) on it.
 *   .add(index, chan_fd, ctrl_fd, nslots=256, arena_size=128 MiB, sender_id=None,
 *        reply_event_fd=-1, reply_sleep_fd=-1, reply_sleep_keep_fd=-1, generation=0)
 *       sender_id None = read it from the control page now; generation: the kernel's name of
 *       this channel instance, read back as Request.generation (a claim names it);
 *       reply_event_fd: the client's eventfd, written after a reply when the client armed it;
 *       reply_sleep_fd / reply_sleep_keep_fd: the write end of the client's reply-sleep pipe
 *       (a byte wakes a client asleep on it) and a spare read end the set only holds (without
 *       it the write end is not used: a write to a pipe with no reader raises SIGPIPE)
 *   .remove(index, drain=False)   KeyError if absent; safe while recv/reply run in other threads
 *       (the unmap is deferred until they are done). drain=True (the client exited or closed
 *       the channel): the requests already in the ring -- up to the tail seen now -- are still
 *       delivered although the control page is no longer OPEN, then the channel goes. The index
 *       is free at once (add() may reuse it); a drained call's reply raises PeerDied. Never for
 *       a REVOKED channel (also stops a drain in progress) or a corrupt one; a drained channel
 *       found corrupt just ends its drain (its index may be someone else's: nothing is raised).
 *   .recv(timeout_ns=-1) -> Request
 *       Timeout; CorruptChannel(.index, .reason) for a channel that sent garbage (it is then
 *       dead; call recv again to go on serving the others); Cancelled after interrupt().
 *       Round robin, one message per channel per turn. Cancelled calls are skipped; channels
 *       whose control page is not OPEN are skipped (unless draining).
 *   .poll() -> Request | None       never waits (None also while another thread is receiving)
 *   .recv_many(max_n, timeout_ns=-1) -> [Request]   waits (per wait mode) for one message, then
 *       takes more without waiting, up to max_n in all, round robin; [] on timeout. A channel
 *       found corrupt after some were gathered: they are returned, and the CorruptChannel is
 *       raised by the next recv/poll/recv_many.
 *   .poll_armed() -> Request | None   as poll(), but when nothing is there: empties event_fd,
 *       sets the doorbell's DB_EVENT_WANTED_OFF, fences, looks again; None means "armed": a
 *       client's next publish writes the service's eventfd. A returned message (any recv/poll)
 *       clears the flag. Hostile clients: setting the flag or writing the eventfd only causes
 *       spurious wake-ups; clearing the flag (or reading the shared eventfd) can make a wake-up
 *       go missing, so an event loop must re-poll at least every SLEEP_CAP_NS while armed (the
 *       futex path has the same bound). If the receive budget ran out with work left, it
 *       writes event_fd itself (come straight back) instead of arming.
 *   .reply(index, tag, opcode, flags, data, payload=None) -> None   the raw reply (no check that
 *       the tag belongs to the channel now at that index: the runtime uses Request.reply). Never
 *       blocks: WouldBlock if the response ring/arena is full; PeerDied if the channel is removed,
 *       dead or not OPEN; CorruptChannel if the client scribbled the response ring's cursors.
 *   .refused(index) -> int            the client's count of messages refused for a full ring
 *                                     (CHAN_REFUSED_OFF: untrusted, informational)
 *   Zero-copy receive: a request whose payload has FLAG_LOANED or >= ZC_THRESHOLD (64 KiB)
 *       bytes is not copied: Request.payload is a READ-ONLY memoryview of the request arena
 *       (checksum, if any, verified in place at receive). It, and everything made from it
 *       (slices, casts, memoryview(p), numpy.frombuffer, Request.object() results), stays valid
 *       and shows that message's bytes for as long as it lives: the chunk goes back to the client
 *       only when the request is done -- replied to (any final outcome: sent, PeerDied; not
 *       WouldBlock), Request.release(), or the Request deallocated -- AND the last view of it is
 *       gone, whichever comes last. From the request's end on, .payload itself reads as a
 *       released memoryview (take views before replying). memoryview.release() on a view counts
 *       as that view gone (arrays built on it before must not be used after it). Smaller
 *       payloads are still copied (bytes). The sender can rewrite a zero-copy payload while it is
 *       held (only a hostile or careless one would): copy it, or use a sealed region, where that
 *       matters.
 *       Chunks are released in any order; the client sees only the contiguous released prefix
 *       (arena_released), so held memory is never reused. A channel keeps at most
 *       max(64, 2 * nslots) queue entries (released chunks behind a held one share entries);
 *       when they are used up it is not served until the oldest held payload is released: a
 *       receiver that holds requests or views stalls (and fills the arena of) only that channel;
 *       its sender gets WouldBlock. remove()/drain/close() keep a channel's mapping until the
 *       last of its payload views is gone (CorruptChannel channels too: views stay readable).
 *   .drops(index) -> {"rate", "bandwidth", "size", "expired", "rights": int}   refused by limits
 *   .interrupt()  the running (or next) recv/recv_many raises Cancelled
 *   .is_dead(index) -> bool;  .close();  .draining (int);  len(set);  index in set
 *   .buckets (int)   token buckets held per capability (see "Capability limits" above)
 *   One receiver at a time (recv/poll/recv_many share a lock; reply may run in any thread).
 *
 * ---- Request: a received message ------------------------------------------------------------
 *   Made only by the core. Read-only: .sender (kernel-verified ProcessId), .opcode, .flags
 *   (FLAG_USER_MASK bits), .data (4-tuple), .payload (bytes, b"" when none; a
 *   read-only memoryview when zero-copy), .zero_copy, .expects_reply,
 *   .replied, .capability (as sent, untrusted), .index, .tag (internal). Read-write: .regions,
 *   .caps (default ()). Holds a strong reference to its ServerSet, and replies only to the
 *   channel instance it came from (never to a later channel at the same index).
 *   .generation (internal): its channel instance's, as given to ServerSet.add(generation=).
 *   .reply(opcode=0, data=(), payload=b"", flags=0)   flags: FLAG_USER_MASK (and FLAG_CHECKSUM)
 *       bits, else ValueError; b"" = no payload. IpcError("...already been replied to") the
 *       second time, IpcError("...send_async: it takes no reply") for a one-way message; PeerDied
 *       when the client is gone; WouldBlock when its response ring is full (the request stays
 *       unanswered: try again).
 *   .reply_error(code, text)   FLAG_ERROR, data[0] = code, payload = text (str: UTF-8; at most
 *       4096 bytes); a no-op if answered already, one-way, or the client is gone (no PeerDied:
 *       error paths need not catch it); WouldBlock / CorruptChannel as reply().
 *   .payload is bytes, or a read-only memoryview for a zero-copy payload (.zero_copy True; see
 *   ServerSet). .release(): the request is done with a zero-copy payload before (or without)
 *   replying (its chunk goes back once no view of it is left); a no-op otherwise and the second
 *   time. reply/reply_error do the same.
 *
 * ---- Metrics (channel header page; layout in _core_layout.h, every offset exported) ----------
 *   Client block at CHAN_CSTATS_OFF, written only by the Lane; server block at CHAN_SSTATS_OFF,
 *   written only by the ServerSet; u64 counters, stored with RELAXED atomic stores from private
 *   copies (single writer: no locked RMW, no syscall). Untrusted numbers for any reader.
 *   Lane: sent (messages: calls and one-way, counted when published; send_many once per batch),
 *   bytes_sent, calls (call, call_start, call_loan), timeouts (Timeout from call/call_loan),
 *   refused_rate (messages refused by the lane's buckets: one per RateLimitExceeded, send_many:
 *   each message they stopped), refused_size (one per MessageTooLarge the lane raises, loan()
 *   included), refused_perm (PermissionDenied / expired), latency_max_ns / _sum_ns / _count and
 *   hist[STATS_HIST_BUCKETS] (call round trips: CLOCK_MONOTONIC before the write and when the
 *   reply is taken; call_start to call_poll for those; bucket i = [100 ns * 2^i, 100 ns *
 *   2^(i+1)), bucket 0 also below, the last also above), sec_index / sec_count / prev_count
 *   (messages sent per CLOCK_MONOTONIC second). CHAN_REFUSED_OFF stays the WouldBlock count.
 *   ServerSet: received / bytes_received (delivered requests), replies (the application's
 *   replies written: Request.reply/reply_error, ServerSet.reply; not automatic refusals),
 *   reply_failed (PeerDied on a reply while the channel is still in the set), drops_rate /
 *   _bandwidth / _size / _expired / _rights (as .drops()), cancelled (skipped cancelled calls),
 *   sec_index / sec_count / prev_count (received per second).
 *   channel_stats(buf) keys: sent, bytes_sent, calls, timeouts, refused_wouldblock, refused_rate,
 *   refused_size, refused_perm, latency_max_ns, latency_sum_ns, latency_count, sent_last_second,
 *   hist (list of 28), received, bytes_received, replies, reply_failed, drops_rate,
 *   drops_bandwidth, drops_size, drops_expired, drops_rights, cancelled, received_last_second.
 *   *_last_second: prev_count if sec_index is the current second, sec_count if it is the one
 *   before, else 0 (i.e. the messages of the last whole second).
 *
 * ---- Exceptions -----------------------------------------------------------------------------
 *   capbus._errors classes (IpcError, Timeout, PeerDied, InvalidCapability, WouldBlock,
 *   MessageTooLarge, ProtocolError, Cancelled, PermissionDenied, RateLimitExceeded), plus
 *   CorruptChannel(ProtocolError) defined here.
 *
 * ---- Memfd requirements ---------------------------------------------------------------------
 *   Every memfd handed to Lane/ServerSet must be sealed against shrinking (F_SEAL_SHRINK; we add
 *   it if the memfd allows sealing) and at least as big as its layout, else ValueError: a peer
 *   that could truncate a mapping under us would crash us with SIGBUS.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#ifdef Py_GIL_DISABLED
#error "capbus's native core relies on the GIL (gil_lock_t, free lists): no free-threaded CPython"
#endif

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* HOT: a function on the path of a call or a receive. GCC places these together (.text.hot), so
 * a round trip runs from 6 pages of this module's code instead of 13 spread over it: after each
 * context switch, fewer instruction-cache lines and TLB entries to refill. */
#define HOT __attribute__((hot))

#include "_core_layout.h"
#include "_core_limits.h"
#include "_core_ring.h"

/* ---------------------------------------------------------------------------------------------
 * capbus._errors classes, looked up once at module init.
 * ------------------------------------------------------------------------------------------- */

static PyObject *IpcError, *Timeout, *PeerDied, *InvalidCapability, *WouldBlock, *MessageTooLarge,
    *ProtocolError, *PermissionDenied, *RateLimitExceeded, *KernelUnavailable, *NoReply;

/* How many fork()s this process descends through (bumped in the child by wd_atfork_child). A Lane
 * or ServerSet belongs to the process that made it: in a forked child it refuses to work (it
 * would share rings and locks with the parent: a second producer on an SPSC ring, a recv lock
 * held by a parent thread that does not exist here). */
static unsigned long fork_gen;

static int check_fork(unsigned long made_in, const char *what)
{
    if (__builtin_expect(made_in == fork_gen, 1))
        return 0;
    PyErr_Format(KernelUnavailable,
                 "this %s belongs to the parent process; a forked child must call "
                 "capbus.connect() for its own connection",
                 what);
    return -1;
}
/* Their .code values, sent in data[0] of the server's automatic error replies. */
static uint64_t code_invalid_capability, code_message_too_large, code_rate_limit, code_no_reply;

/* ---------------------------------------------------------------------------------------------
 * Clock and futex helpers.
 * ------------------------------------------------------------------------------------------- */

static inline uint64_t now_ns(void) { return clock_ns(CLOCK_MONOTONIC); }
/* coarse_ns() (in _core_limits.h): CLOCK_MONOTONIC_COARSE, for checks that tolerate a tick. */

/* ---- The call-latency clock. -----------------------------------------------------------------
 * Every call's round trip goes into the metrics (sum, max, histogram). Two CLOCK_MONOTONIC reads
 * cost ~50 ns on a VM (the vDSO reads the TSC and converts it, ~25 ns each). Where the kernel's
 * own clocksource is the TSC (it then runs at a constant rate, in step on every CPU), the call
 * reads the TSC itself twice and converts only the difference: ~20 ns. The TSC's rate is taken
 * from CLOCK_MONOTONIC once, at the first call 50 ms or more after the module was loaded; calls
 * before that, and every call where the TSC is not the clocksource, read CLOCK_MONOTONIC. */
typedef struct {
    uint64_t t;
    int tsc; /* t is a TSC reading (else CLOCK_MONOTONIC ns) */
} lat_t;

#define TSC_CALIBRATE_NS 50000000ull
static int tsc_state;                /* 0: not usable, 1: rate not known yet, 2: in use */
static uint64_t tsc_mult;            /* ns per tick, 32.32 fixed point (set once, then read) */
static uint64_t tsc_ref_tick, tsc_ref_ns;

#if defined(__x86_64__)
#include <x86intrin.h>

static void tsc_init(void) /* module init */
{
    char buf[16] = {0};
    int fd = open("/sys/devices/system/clocksource/clocksource0/current_clocksource",
                  O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n >= 3 && memcmp(buf, "tsc", 3) == 0 && (n == 3 || buf[3] == '\n')) {
        tsc_ref_ns = now_ns();
        tsc_ref_tick = __rdtsc();
        tsc_state = 1;
    }
}

/* GIL held (the globals change once, here). */
static void tsc_calibrate(void)
{
    uint64_t ns = now_ns(), tick = __rdtsc();
    if (ns - tsc_ref_ns < TSC_CALIBRATE_NS)
        return;
    if (tick <= tsc_ref_tick) {
        tsc_state = 0;
        return;
    }
    unsigned __int128 m = ((unsigned __int128)(ns - tsc_ref_ns) << 32) / (tick - tsc_ref_tick);
    if (m == 0 || m >= (unsigned __int128)100 << 32) { /* not a rate a TSC runs at: don't use it */
        tsc_state = 0;
        return;
    }
    tsc_mult = (uint64_t)m;
    tsc_state = 2;
}

static inline lat_t lat_start(void)
{
    if (__builtin_expect(tsc_state == 2, 1))
        return (lat_t){__rdtsc(), 1};
    if (tsc_state == 1)
        tsc_calibrate();
    return (lat_t){now_ns(), 0};
}

static inline uint64_t lat_elapsed(const lat_t *s)
{
    if (s->tsc)
        return (uint64_t)(((unsigned __int128)(__rdtsc() - s->t) * tsc_mult) >> 32);
    return now_ns() - s->t;
}
#else
static void tsc_init(void) {}
static inline lat_t lat_start(void) { return (lat_t){now_ns(), 0}; }
static inline uint64_t lat_elapsed(const lat_t *s) { return now_ns() - s->t; }
#endif

/* FUTEX_WAIT without FUTEX_PRIVATE_FLAG: the word lives in a MAP_SHARED memfd mapping that other
 * processes map too, and only shared futexes are keyed on the (inode, offset) of the page. The
 * timeout is relative (FUTEX_WAIT measures it against CLOCK_MONOTONIC). Returns 0 or -errno. */
static inline int sys_futex_wait(const uint32_t *addr, uint32_t expected, uint64_t rel_ns,
                                 int forever)
{
    struct timespec ts, *tsp = NULL;
    if (!forever) {
        ts.tv_sec = (time_t)(rel_ns / 1000000000ull);
        ts.tv_nsec = (long)(rel_ns % 1000000000ull);
        tsp = &ts;
    }
    long r = syscall(SYS_futex, addr, FUTEX_WAIT, expected, tsp, NULL, 0);
    return r == 0 ? 0 : -errno;
}

static inline int sys_futex_wake(const uint32_t *addr, int n)
{
    /* FUTEX_WAKE never writes the word, so it works on a PROT_READ mapping as well. */
    long r = syscall(SYS_futex, addr, FUTEX_WAKE, n, NULL, NULL, 0);
    return r < 0 ? -errno : (int)r;
}

/* The first half of every Dekker handshake here: store our flag, then a full fence before we
 * look at the peer's. On x86 a single XCHG does both (a locked instruction is a full barrier,
 * and as a SEQ_CST read-modify-write the compiler keeps later loads after it); it costs less
 * than MOV + MFENCE. Elsewhere: a RELAXED store and a SEQ_CST fence. */
#if defined(__x86_64__) || defined(__i386__)
#define CB_X86 1
#else
#define CB_X86 0
#endif

static inline void store_fence_u32(uint32_t *p, uint32_t v)
{
#if CB_X86
    __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);
#else
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
}

/* prod_publish, then a full fence: the producer's half of the handshake ("publish the tail;
 * fence; load the consumer's flags"). On x86 the tail goes out with one XCHG (SEQ_CST, which is
 * also the RELEASE prod_publish gives). */
static inline void prod_publish_fence(prod_t *p)
{
#if CB_X86
    if (p->published != p->tail) {
        p->published = p->tail;
        __atomic_exchange_n(ring_u64(p->ring, RING_TAIL_OFF), p->tail, __ATOMIC_SEQ_CST);
        return;
    }
#else
    prod_publish(p);
#endif
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/* ---------------------------------------------------------------------------------------------
 * Part A: primitives on a buffer at an offset.
 * ------------------------------------------------------------------------------------------- */

/* Get a buffer view and a pointer to `size` naturally aligned bytes at `off`. */
static int get_word(PyObject *obj, Py_buffer *view, Py_ssize_t off, size_t size, int writable,
                    void **out)
{
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
        /* Exporters disagree on the error for a read-only buffer (mmap and bytes say BufferError);
         * always say TypeError, like writing to a read-only memoryview does. */
        if (writable && PyErr_ExceptionMatches(PyExc_BufferError)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_TypeError, "buffer is read-only; this operation writes to it");
        }
        return -1;
    }
    if (off < 0 || (size_t)off > (size_t)view->len || (size_t)view->len - (size_t)off < size) {
        PyErr_Format(PyExc_ValueError, "offset %zd out of range for a buffer of %zd bytes", off,
                     view->len);
        goto fail;
    }
    char *p = (char *)view->buf + off;
    if ((uintptr_t)p % size != 0) {
        PyErr_Format(PyExc_ValueError, "offset %zd is not %zu-byte aligned", off, size);
        goto fail;
    }
    *out = p;
    return 0;
fail:
    PyBuffer_Release(view);
    return -1;
}

/* An exact int of at most one internal digit (0 <= v < 2**30: opcodes, data words, flags)
 * read in place, without a call into the interpreter: 1, or 0 for anything else. */
static inline int small_u64(PyObject *o, uint64_t *out)
{
    if (!PyLong_CheckExact(o))
        return 0;
#if PY_VERSION_HEX >= 0x030C0000
    if (!PyUnstable_Long_IsCompact((PyLongObject *)o))
        return 0;
    Py_ssize_t v = PyUnstable_Long_CompactValue((PyLongObject *)o);
    if (v < 0)
        return 0;
    *out = (uint64_t)v;
    return 1;
#else
    Py_ssize_t size = Py_SIZE(o); /* digits, negative for a negative number */
    if (size == 0 || size == 1) {
        *out = size ? ((PyLongObject *)o)->ob_digit[0] : 0;
        return 1;
    }
    return 0;
#endif
}

/* Python int -> u64 / u32 with a ValueError (not OverflowError) when out of range. */
static int to_u64_slow(PyObject *o, uint64_t *out, const char *what);

static inline int to_u64(PyObject *o, uint64_t *out, const char *what)
{
    return small_u64(o, out) ? 0 : to_u64_slow(o, out, what);
}

static int to_u64_slow(PyObject *o, uint64_t *out, const char *what)
{
    if (!PyLong_Check(o)) {
        /* An integer of another type (numpy.int64, anything with __index__; never a float). */
        PyNumberMethods *nb = Py_TYPE(o)->tp_as_number;
        if (!nb || !nb->nb_index) {
            PyErr_Format(PyExc_TypeError, "%s must be an int, not %.100s", what,
                         Py_TYPE(o)->tp_name);
            return -1;
        }
        PyObject *i = PyNumber_Index(o);
        if (!i)
            return -1;
        int r = to_u64_slow(i, out, what);
        Py_DECREF(i);
        return r;
    }
    /* Negative and too-large values both raise OverflowError here; report them as ValueError.
     * On LP64 PyLong_AsUnsignedLong is the same conversion without CPython's byte-array detour
     * for values above 2**30 (capability handles, most of all). */
#if ULONG_MAX == UINT64_MAX
    unsigned long long v = PyLong_AsUnsignedLong(o);
#else
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
#endif
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s must be in 0..2**64-1", what);
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

static inline int to_u32(PyObject *o, uint32_t *out, const char *what)
{
    uint64_t v;
    if (small_u64(o, &v)) { /* < 2**30 on every build: fits */
        *out = (uint32_t)v;
        return 0;
    }
    if (to_u64_slow(o, &v, what) < 0)
        return -1;
    if (v > UINT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s must be in 0..2**32-1", what);
        return -1;
    }
    *out = (uint32_t)v;
    return 0;
}

static PyObject *py_futex_wait(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"buf", "offset", "expected", "timeout", NULL};
    PyObject *obj, *exp_o, *timeout_o = Py_None;
    Py_ssize_t off;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OnO|O:futex_wait", kwlist, &obj, &off, &exp_o,
                                     &timeout_o))
        return NULL;
    uint32_t expected;
    if (to_u32(exp_o, &expected, "expected") < 0)
        return NULL;
    int forever = timeout_o == Py_None;
    uint64_t deadline = 0;
    if (!forever) {
        double t = PyFloat_AsDouble(timeout_o);
        if (t == -1.0 && PyErr_Occurred())
            return NULL;
        if (isnan(t)) {
            PyErr_SetString(PyExc_ValueError, "timeout must not be NaN");
            return NULL;
        }
        if (t < 0)
            t = 0;
        if (t > 1e9) /* ~31 years: treat as forever rather than overflow the deadline */
            forever = 1;
        else
            deadline = now_ns() + (uint64_t)(t * 1e9);
    }
    Py_buffer view;
    void *p;
    if (get_word(obj, &view, off, 4, 0, &p) < 0)
        return NULL;
    /* A value that already differs answers True even with a zero timeout, exactly as the
     * kernel's FUTEX_WAIT would (EAGAIN). Acquire: a caller that sees the new value may go on to
     * read data published before it. */
    if (__atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE) != expected) {
        PyBuffer_Release(&view);
        Py_RETURN_TRUE;
    }
    int r;
    for (;;) {
        uint64_t rel = 0;
        if (!forever) {
            uint64_t now = now_ns();
            if (now >= deadline) {
                r = -ETIMEDOUT;
                break;
            }
            rel = deadline - now;
        }
        /* The buffer export (view) keeps the mapping alive while we sleep without the GIL. */
        Py_BEGIN_ALLOW_THREADS
        r = sys_futex_wait((const uint32_t *)p, expected, rel, forever);
        Py_END_ALLOW_THREADS
        if (r != -EINTR)
            break;
        if (PyErr_CheckSignals() < 0) {
            PyBuffer_Release(&view);
            return NULL;
        }
    }
    PyBuffer_Release(&view);
    if (r == 0 || r == -EAGAIN)
        Py_RETURN_TRUE;
    if (r == -ETIMEDOUT)
        Py_RETURN_FALSE;
    errno = -r;
    return PyErr_SetFromErrno(PyExc_OSError);
}

static PyObject *py_futex_wake(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"buf", "offset", "n", NULL};
    PyObject *obj;
    Py_ssize_t off;
    int n = INT_MAX;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "On|i:futex_wake", kwlist, &obj, &off, &n))
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "n must be >= 0");
        return NULL;
    }
    Py_buffer view;
    void *p;
    if (get_word(obj, &view, off, 4, 0, &p) < 0)
        return NULL;
    int r = sys_futex_wake((const uint32_t *)p, n);
    PyBuffer_Release(&view);
    if (r < 0) {
        errno = -r;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(r);
}

/* The Python-level atomics are all seq_cst: they are used for rare control-plane work (the kernel
 * flipping a state word, tests poking at rings) where the cost is irrelevant and the strongest
 * order means no caller ever has to reason about which order they got. */

static PyObject *py_atomic_load_u32(PyObject *self, PyObject *args)
{
    PyObject *obj;
    Py_ssize_t off;
    if (!PyArg_ParseTuple(args, "On:atomic_load_u32", &obj, &off))
        return NULL;
    Py_buffer view;
    void *p;
    if (get_word(obj, &view, off, 4, 0, &p) < 0)
        return NULL;
    uint32_t v = __atomic_load_n((uint32_t *)p, __ATOMIC_SEQ_CST); /* see comment above */
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(v);
}

static PyObject *py_atomic_load_u64(PyObject *self, PyObject *args)
{
    PyObject *obj;
    Py_ssize_t off;
    if (!PyArg_ParseTuple(args, "On:atomic_load_u64", &obj, &off))
        return NULL;
    Py_buffer view;
    void *p;
    if (get_word(obj, &view, off, 8, 0, &p) < 0)
        return NULL;
    uint64_t v = __atomic_load_n((uint64_t *)p, __ATOMIC_SEQ_CST); /* see comment above */
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(v);
}

static PyObject *py_atomic_store_u32(PyObject *self, PyObject *args)
{
    PyObject *obj, *vo;
    Py_ssize_t off;
    uint32_t v;
    if (!PyArg_ParseTuple(args, "OnO:atomic_store_u32", &obj, &off, &vo))
        return NULL;
    if (to_u32(vo, &v, "value") < 0)
        return NULL;
    Py_buffer view;
    void *p;
    if (get_word(obj, &view, off, 4, 1, &p) < 0)
        return NULL;
    __atomic_store_n((uint32_t *)p, v, __ATOMIC_SEQ_CST); /* see comment above */
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *py_atomic_store_u64(PyObject *self, PyObject *args)
{
    PyObject *obj, *vo;
    Py_ssize_t off;
    uint64_t v;
    if (!PyArg_ParseTuple(args, "OnO:atomic_store_u64", &obj, &off, &vo))
        return NULL;
    if (to_u64(vo, &v, "value") < 0)
        return NULL;
    Py_buffer view;
    void *p;
    if (get_word(obj, &view, off, 8, 1, &p) < 0)
        return NULL;
    __atomic_store_n((uint64_t *)p, v, __ATOMIC_SEQ_CST); /* see comment above */
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *py_atomic_cas_u32(PyObject *self, PyObject *args)
{
    PyObject *obj, *eo, *dof;
    Py_ssize_t off;
    uint32_t e, d;
    if (!PyArg_ParseTuple(args, "OnOO:atomic_cas_u32", &obj, &off, &eo, &dof))
        return NULL;
    if (to_u32(eo, &e, "expected") < 0 || to_u32(dof, &d, "desired") < 0)
        return NULL;
    Py_buffer view;
    void *p;
    if (get_word(obj, &view, off, 4, 1, &p) < 0)
        return NULL;
    /* seq_cst on success and failure: see comment above. */
    int ok = __atomic_compare_exchange_n((uint32_t *)p, &e, d, 0, __ATOMIC_SEQ_CST,
                                         __ATOMIC_SEQ_CST);
    PyBuffer_Release(&view);
    return PyBool_FromLong(ok);
}

static PyObject *py_atomic_cas_u64(PyObject *self, PyObject *args)
{
    PyObject *obj, *eo, *dof;
    Py_ssize_t off;
    uint64_t e, d;
    if (!PyArg_ParseTuple(args, "OnOO:atomic_cas_u64", &obj, &off, &eo, &dof))
        return NULL;
    if (to_u64(eo, &e, "expected") < 0 || to_u64(dof, &d, "desired") < 0)
        return NULL;
    Py_buffer view;
    void *p;
    if (get_word(obj, &view, off, 8, 1, &p) < 0)
        return NULL;
    /* seq_cst on success and failure: see comment above. */
    int ok = __atomic_compare_exchange_n((uint64_t *)p, &e, d, 0, __ATOMIC_SEQ_CST,
                                         __ATOMIC_SEQ_CST);
    PyBuffer_Release(&view);
    return PyBool_FromLong(ok);
}

static PyObject *py_atomic_add_u64(PyObject *self, PyObject *args)
{
    PyObject *obj, *vo;
    Py_ssize_t off;
    uint64_t v;
    if (!PyArg_ParseTuple(args, "OnO:atomic_add_u64", &obj, &off, &vo))
        return NULL;
    if (to_u64(vo, &v, "value") < 0)
        return NULL;
    Py_buffer view;
    void *p;
    if (get_word(obj, &view, off, 8, 1, &p) < 0)
        return NULL;
    /* Wraps modulo 2**64 like the hardware does; seq_cst: see comment above. */
    uint64_t old = __atomic_fetch_add((uint64_t *)p, v, __ATOMIC_SEQ_CST);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(old);
}

/* ---------------------------------------------------------------------------------------------
 * Part B: the data plane.
 * ------------------------------------------------------------------------------------------- */

#define WAIT_SPIN 0
#define WAIT_ADAPTIVE 1
#define WAIT_BLOCK 2
#define DEFAULT_SPIN_NS 50000ull

/* Longest a wait runs without the GIL before coming back to run signal handlers and re-check
 * the deadline, and the cap on every single futex sleep (see the doorbell comment at ServerSet:
 * a lost wake-up caused by a scribbler, or a control-page change the kernel forgot to announce,
 * costs at most this much latency, never a hang). */
#define SLICE_NS 50000000ull
#define SLEEP_CAP_NS 50000000ull
/* The server re-scans every ring at least this often even while busy, so a channel whose doorbell
 * bit a scribbler keeps clearing is still served with bounded delay. */
#define FULL_SCAN_NS 10000000ull
#define SPIN_SCAN_NS 1000000ull
/* Adaptive waiting that notices when spinning only burns the CPU a sleeper needs.
 *
 * A spin pays off only while the peer runs on another CPU. With more busy threads than CPUs (on a
 * 2-core machine: three clients calling one server), a spinner holds a CPU that a woken thread
 * needs, and whoever shares a CPU with the server makes one call per scheduler switch while the
 * others make a call per microsecond: plain spinning gave three such clients 38k : 313k : 304k
 * calls in 3 s. The sign is cheap to read: a thread on an oversubscribed CPU is preempted
 * involuntarily tens of thousands of times a second (48,000/s for the server above), against
 * about a hundred on a machine with room. So an adaptive wait reads its thread's involuntary
 * context switches (getrusage, at most every CONTENTION_CHECK_NS), and while they run above
 * CONTENDED_PER_S it does not spin at all (it sleeps at once, as "block" does, which shares the
 * CPUs fairly), for CONTENTION_HOLD_NS after the last such reading.
 *
 * Besides, a spin that ended in a sleep halves the next one (down to SPIN_FLOOR_NS) and one that
 * saw its event doubles it (up to spin_ns): spinning for a peer that takes long is waste too. */
#define CONTENTION_CHECK_NS 10000000ull
#define CONTENTION_HOLD_NS 200000000ull
#define CONTENDED_PER_S 2000u
#define SPIN_FLOOR_NS 1000ull

static inline uint64_t spin_lost(uint64_t cur)
{
    return cur / 2 > SPIN_FLOOR_NS ? cur / 2 : SPIN_FLOOR_NS;
}

static inline uint64_t spin_won(uint64_t cur, uint64_t max)
{
    return cur >= max ? cur : (2 * cur < max ? 2 * cur : max);
}

/* Per thread (the waits run without the GIL): the last reading and until when to hold off. */
static __thread struct {
    uint64_t at, nivcsw, hold_until;
} contention;

/* More runnable threads in the system than CPUs for us (the 4th field of /proc/loadavg counts
 * the running and runnable ones, the reader included)? Involuntary switches alone also come from
 * a peer woken on our own CPU: a client and its server that landed on one CPU would then settle
 * into sleeping ping-pong there, where spinning lets the scheduler move one of them away. */
static int cpus_oversubscribed(void)
{
    static int ncpu;
    if (!ncpu) {
        cpu_set_t set;
        ncpu = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
    }
    int fd = open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 1; /* cannot tell: trust the switches */
    char buf[128];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 1;
    buf[n] = 0;
    const char *p = buf;
    for (int field = 0; field < 3 && p; field++) {
        p = strchr(p, ' ');
        if (p)
            p++;
    }
    return p ? atoi(p) > ncpu : 1;
}

/* May an adaptive wait starting at `now` spin? No while this thread's CPU is oversubscribed. */
static HOT int spin_allowed(uint64_t now)
{
    if (__builtin_expect(now - contention.at >= CONTENTION_CHECK_NS, 0)) {
        struct rusage ru;
        if (getrusage(RUSAGE_THREAD, &ru) == 0) {
            uint64_t n = (uint64_t)ru.ru_nivcsw, dt = now - contention.at;
            if (contention.at && dt < 10 * CONTENTION_CHECK_NS &&
                (n - contention.nivcsw) * 1000000000ull > (uint64_t)CONTENDED_PER_S * dt &&
                cpus_oversubscribed())
                contention.hold_until = now + CONTENTION_HOLD_NS;
            contention.nivcsw = n;
        }
        contention.at = now;
    }
    return now >= contention.hold_until;
}

/* Payload copies (and CRCs) at least this big run without the GIL. */
#define NOGIL_COPY_BYTES (64u << 10)
#define BATCH_MAX 1024u

static PyObject *CorruptChannel, *Cancelled;

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

static inline uint64_t deadline_after(int64_t timeout_ns)
{
    if (timeout_ns < 0)
        return UINT64_MAX;
    uint64_t now = now_ns();
    return (uint64_t)timeout_ns > UINT64_MAX - now ? UINT64_MAX : now + (uint64_t)timeout_ns;
}

/* The control page is written only by the trusted kernel, but its state is still range-checked:
 * anything unexpected counts as CLOSED. ACQUIRE: pairs with the kernel's store of the state (an
 * atomic_store_u32, seq_cst), so fields the kernel wrote before it are visible after it. */
static inline uint32_t ctrl_state(const char *ctrl)
{
    uint32_t st = __atomic_load_n((const uint32_t *)(ctrl + CTRL_STATE_OFF), __ATOMIC_ACQUIRE);
    return (st >= STATE_OPEN && st <= STATE_CLOSED) ? st : STATE_CLOSED;
}

static void raise_for_state(uint32_t st, const char *who)
{
    if (st == STATE_PEER_DEAD)
        PyErr_Format(PeerDied, "the %s process died", who);
    else if (st == STATE_REVOKED)
        PyErr_SetString(InvalidCapability, "the capability for this channel was revoked");
    else
        PyErr_SetString(InvalidCapability, "channel closed");
}

static void raise_corrupt(uint32_t index, const char *reason)
{
    PyObject *exc = PyObject_CallFunction(
        CorruptChannel, "N",
        PyUnicode_FromFormat("channel %u sent garbage (%s); it is dead and will not be read again",
                             index, reason));
    if (!exc)
        return;
    PyObject *idx = PyLong_FromUnsignedLong(index);
    PyObject *why = PyUnicode_FromString(reason);
    if (idx && why && PyObject_SetAttrString(exc, "index", idx) == 0 &&
        PyObject_SetAttrString(exc, "reason", why) == 0)
        PyErr_SetObject(CorruptChannel, exc);
    Py_XDECREF(idx);
    Py_XDECREF(why);
    Py_DECREF(exc);
}

/* ---- Validating and mapping the kernel's memfds. ---------------------------------------------
 * A peer holding a writable fd of a memfd could ftruncate it under us, and touching a page past
 * EOF is SIGBUS, i.e. a crashed server. So every memfd we map must carry F_SEAL_SHRINK (we add
 * it if the memfd allows sealing; create memfds with MFD_ALLOW_SEALING, or use create_channel()/
 * create_page()). The seal goes on first and the size is checked after, so no shrink can slip
 * in between. */
static void *map_memfd(int fd, uint64_t need, int writable, const char *what)
{
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0 || !(seals & F_SEAL_SHRINK)) {
        if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) < 0) {
            PyErr_Format(PyExc_ValueError,
                         "the %s fd must be a memfd sealed against shrinking (create it with "
                         "os.MFD_ALLOW_SEALING, or with capbus._core.create_channel/create_page)",
                         what);
            return NULL;
        }
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return NULL;
    }
    if (!S_ISREG(st.st_mode) || (uint64_t)st.st_size < need) {
        PyErr_Format(PyExc_ValueError, "the %s memfd has %lld bytes, needs %llu", what,
                     (long long)st.st_size, (unsigned long long)need);
        return NULL;
    }
    if (need > SIZE_MAX) {
        PyErr_SetString(PyExc_ValueError, "mapping too large");
        return NULL;
    }
    /* MAP_NORESERVE: the arenas are huge and sparse; only touched pages cost memory. */
    void *p = mmap(NULL, (size_t)need, writable ? PROT_READ | PROT_WRITE : PROT_READ,
                   MAP_SHARED | MAP_NORESERVE, fd, 0);
    if (p == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        return NULL;
    }
    return p;
}

static int check_geometry(uint64_t nslots, uint64_t asize)
{
    if (nslots < MIN_NSLOTS || nslots > MAX_NSLOTS || (nslots & (nslots - 1))) {
        PyErr_Format(PyExc_ValueError, "nslots must be a power of two in %u..%u", MIN_NSLOTS,
                     MAX_NSLOTS);
        return -1;
    }
    if (asize < MIN_ARENA_SIZE || asize > MAX_ARENA_SIZE || asize % PAGE_SIZE_) {
        PyErr_Format(PyExc_ValueError,
                     "arena_size must be a multiple of 4096 in %llu..%llu",
                     (unsigned long long)MIN_ARENA_SIZE, (unsigned long long)MAX_ARENA_SIZE);
        return -1;
    }
    return 0;
}

static int check_wait(int mode, long long spin_ns)
{
    if (mode < WAIT_SPIN || mode > WAIT_BLOCK) {
        PyErr_SetString(PyExc_ValueError, "wait_mode must be 0 (spin), 1 (adaptive) or 2 (block)");
        return -1;
    }
    if (spin_ns < 0) {
        PyErr_SetString(PyExc_ValueError, "spin_ns must be >= 0");
        return -1;
    }
    return 0;
}

/* ---- Parsing arguments. --------------------------------------------------------------------- */

/* Parse a METH_FASTCALL | METH_KEYWORDS call into out[i] (NULL when not given) by position or by
 * name; names is NULL-terminated and the first nreq are required. No allocation. */
static HOT int fast_args_n(const char *fname, PyObject *const *args, Py_ssize_t nargs,
                       PyObject *kwnames, const char *const *names, int nnames, int nreq,
                       PyObject **out);

/* names is a NULL-terminated static array: its length is known at compile time. */
#define fast_args(fname, args, nargs, kwnames, names, nreq, out)                                  \
    fast_args_n(fname, args, nargs, kwnames, names,                                              \
                (int)(sizeof(names) / sizeof((names)[0])) - 1, nreq, out)

static HOT int fast_args_n(const char *fname, PyObject *const *args, Py_ssize_t nargs,
                       PyObject *kwnames, const char *const *names, int nnames, int nreq,
                       PyObject **out)
{
    /* The common case: all positional, no keywords. */
    if (!kwnames && nargs >= nreq && nargs <= nnames) {
        for (int i = 0; i < nnames; i++)
            out[i] = i < nargs ? args[i] : NULL;
        return 0;
    }
    if (nargs > nnames) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d arguments (%zd given)", fname, nnames,
                     nargs);
        return -1;
    }
    for (int i = 0; i < nnames; i++)
        out[i] = i < nargs ? args[i] : NULL;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        int j = 0;
        while (j < nnames && PyUnicode_CompareWithASCIIString(key, names[j]) != 0)
            j++;
        if (j == nnames) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument %R", fname, key);
            return -1;
        }
        if (out[j]) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", fname,
                         names[j]);
            return -1;
        }
        out[j] = args[nargs + k];
    }
    for (int i = 0; i < nreq; i++) {
        if (!out[i]) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fname, names[i]);
            return -1;
        }
    }
    return 0;
}

/* Flags a caller may pass. FLAG_LARGE, FLAG_REPLY_EXPECTED and FLAG_LOANED are decided here (by
 * payload size, call vs send, loan or not) and silently replaced, so a received flags value can
 * be echoed. */
static HOT int parse_flags(PyObject *o, uint32_t *flags, uint32_t extra)
{
    uint32_t f;
    if (to_u32(o, &f, "flags") < 0)
        return -1;
    if (f & ~FLAG_KNOWN_MASK) {
        PyErr_Format(PyExc_ValueError, "unknown flag bits 0x%x", f & ~FLAG_KNOWN_MASK);
        return -1;
    }
    *flags = (f & ~(FLAG_LARGE | FLAG_REPLY_EXPECTED | FLAG_LOANED)) | extra;
    return 0;
}

/* data: a tuple or list of up to four u64, zero-padded. Items are ints or anything with
 * __index__ (numpy integers). Converting an int runs no Python code; __index__ may, and may
 * change a list under us, so a list holding anything but ints is read through a tuple copy. */
static HOT int parse_data(PyObject *o, uint64_t d[4])
{
    PyObject **items;
    Py_ssize_t n;
    if (PyTuple_Check(o)) {
        items = ((PyTupleObject *)o)->ob_item;
        n = PyTuple_GET_SIZE(o);
    } else if (PyList_Check(o)) {
        items = ((PyListObject *)o)->ob_item;
        n = PyList_GET_SIZE(o);
        for (Py_ssize_t i = 0; i < n && i < 5; i++) {
            if (!PyLong_Check(items[i])) {
                PyObject *t = PyList_AsTuple(o);
                if (!t)
                    return -1;
                int r = parse_data(t, d);
                Py_DECREF(t);
                return r;
            }
        }
    } else {
        PyErr_Format(PyExc_TypeError, "data must be a tuple or list of up to 4 ints, not %.100s",
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    if (n > 4) {
        PyErr_Format(PyExc_ValueError, "data carries at most 4 values, got %zd", n);
        return -1;
    }
    Py_ssize_t i = 0;
    for (; i < n; i++)
        if (to_u64(items[i], &d[i], "data values") < 0)
            return -1;
    for (; i < 4; i++)
        d[i] = 0;
    return 0;
}

/* A payload that is not one contiguous run of bytes: say what is wanted (BufferError from numpy
 * for a non-contiguous array, TypeError for a str or an int). */
static int payload_type_error(PyObject *o)
{
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyErr_Format(PyExc_TypeError,
                 "payload must be a contiguous bytes-like object (bytes, bytearray, memoryview, a "
                 "C-contiguous numpy array) or None, not %.100s%s",
                 Py_TYPE(o)->tp_name,
                 PyObject_CheckBuffer(o) ? " that is not contiguous (copy it, e.g. np.ascontiguousarray)"
                                         : "");
    Py_XDECREF(et);
    Py_XDECREF(ev);
    Py_XDECREF(tb);
    return -1;
}

/* Take the payload buffer (None = no payload) and finish the flags. view->obj == NULL if none.
 * With empty_is_none, an empty payload is no payload (replies: saves the arena chunk). */
static HOT int parse_payload(PyObject *o, outmsg_t *m, Py_buffer *view, uint64_t max_payload,
                         int empty_is_none)
{
    view->obj = NULL;
    m->payload = NULL;
    m->plen = 0;
    if (o == Py_None || (empty_is_none && PyBytes_CheckExact(o) && PyBytes_GET_SIZE(o) == 0)) {
        m->flags &= ~(FLAG_CHECKSUM | FLAG_LARGE);
        return 0;
    }
    if (PyObject_GetBuffer(o, view, PyBUF_SIMPLE) < 0) {
        view->obj = NULL;
        return payload_type_error(o);
    }
    if (empty_is_none && view->len == 0) {
        PyBuffer_Release(view);
        view->obj = NULL;
        m->flags &= ~(FLAG_CHECKSUM | FLAG_LARGE);
        return 0;
    }
    if ((uint64_t)view->len > max_payload) {
        PyErr_Format(MessageTooLarge, "payload of %zd bytes exceeds the maximum of %llu bytes",
                     view->len, (unsigned long long)max_payload);
        PyBuffer_Release(view);
        view->obj = NULL;
        return -1;
    }
    static const uint8_t empty[1] = {0};
    m->payload = view->len ? (const uint8_t *)view->buf : empty;
    m->plen = (uint64_t)view->len;
    if (m->plen > LM_INLINE_SIZE)
        m->flags |= FLAG_LARGE;
    return 0;
}

static inline void release_view(Py_buffer *v)
{
    if (v->obj)
        PyBuffer_Release(v);
    v->obj = NULL;
}

static inline int to_i64_timeout(PyObject *o, int64_t *out)
{
    if (!o || o == Py_None) {
        *out = -1;
        return 0;
    }
    long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred())
        return -1;
    *out = v;
    return 0;
}

/* Copy a received payload into a new bytes object (GIL held; the copy itself runs without the
 * GIL when big). NULL with an exception, or sets *corrupt_why and returns NULL with no
 * exception on a checksum mismatch. */
static PyObject *take_payload(cons_t *c, const inmsg_t *m, const char **corrupt_why)
{
    PyObject *b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)m->plen);
    if (!b)
        return NULL;
    int r;
    uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(b);
    if (m->plen >= NOGIL_COPY_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        r = cons_copy_payload(c, m, dst, corrupt_why);
        Py_END_ALLOW_THREADS
    } else {
        r = cons_copy_payload(c, m, dst, corrupt_why);
    }
    if (r != RG_OK) {
        Py_DECREF(b);
        return NULL;
    }
    return b;
}

/* ---- Eventfds (event-loop waiters; see poll_armed and call_poll). ---------------------------- */

/* Our own duplicate of a caller's eventfd (a negative fd means none and gives -1; -2 is an error
 * with an exception set). The caller may close its fd afterwards. O_NONBLOCK goes on the shared
 * open file description: a write must never block (a hostile holder of the fd could push the
 * counter to its maximum), and the event loop that reads it wants nonblocking reads anyway. */
static int efd_dup(int fd)
{
    if (fd < 0)
        return -1;
    int d = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (d < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -2;
    }
    int fl = fcntl(d, F_GETFL);
    if (fl < 0 || fcntl(d, F_SETFL, fl | O_NONBLOCK) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        close(d);
        return -2;
    }
    return d;
}

static inline void efd_signal(int fd)
{
    uint64_t one = 1;
    if (write(fd, &one, sizeof one) < 0) {
        /* EAGAIN: the counter is saturated, so the reader is due to wake anyway. Anything else
         * (not an eventfd after all): nothing useful to do on this path. */
    }
}

static inline void efd_drain(int fd)
{
    uint64_t v;
    if (read(fd, &v, sizeof v) < 0) {
        /* EAGAIN: it was empty. */
    }
}

/* ---- Sleep eventfds and kicks ----------------------------------------------------------------
 *
 * A blocking server (block mode, or adaptive once its spin is over, with no deadline) sleeps in
 * read(2) on its service's sleep eventfd, and a client wakes it with write(2). On this project's
 * VM that pair costs ~0.3 us less per round trip than FUTEX_WAIT/FUTEX_WAKE on the doorbell word:
 * a shared futex looks its page up through the page tables on every call, an eventfd does not.
 * The doorbell's server_sleeping says which one the server sleeps in (SLEEP_FUTEX, SLEEP_EFD).
 *
 * Every client of the service holds that eventfd, and its open file description is BLOCKING (the
 * sleep needs it, and the flag is shared by every holder), so a hostile client can
 *   - read it empty: a wake-up is stolen, and the server sleeps on with work queued;
 *   - push the counter to its maximum: an honest client's write then blocks until a read;
 *   - make it non-blocking (fcntl on the shared description): the server's read returns EAGAIN at
 *     once, and that ServerSet sleeps on the futex from then on (efd_off).
 * Kicks bound the first two. A thread about to make one of these reads or writes arms its kick
 * slot with a new ticket; the watchdog thread (one per process, see wd_main) sends the kick
 * signal to a thread it finds in the SAME read or write at two ticks in a row, and the syscall
 * returns EINTR (the handler is installed without SA_RESTART). The server then rescans every
 * ring; a client goes on (its message is in the ring, and a full counter wakes the server
 * anyway). A stolen wake-up or a blocked write thus costs at most ~2 ticks, as a lost futex
 * wake-up does, and an idle server is kicked about as often as the futex watchdog wakes one.
 *
 * A kick must interrupt THAT syscall and no other: the watchdog turns the ticket into KS_KICKING
 * with a compare-exchange before it signals, and the thread, back from its syscall, turns its
 * ticket into KS_IDLE with a compare-exchange; if that fails, a signal is on its way, and the
 * thread waits for the handler (KS_KICKED: the signal is delivered on its way back to user mode
 * at the latest) before it goes on. The signal is capbus's own (SIGRTMAX-3). If the process has
 * another handler for it, or the thread blocks it, that thread sleeps on the futex and its
 * writes are not kicked. The handler trusts nothing in the siginfo (any process of the same user
 * can queue signals to us): the slot must be one of ours, and the worst a forged signal does is
 * one EINTR and one early "kicked".
 * ============================================================================================= */

enum { SLEEP_NONE = 0, SLEEP_FUTEX = 1, SLEEP_EFD = 2 }; /* the doorbell's server_sleeping */
enum { KS_IDLE = 0, KS_KICKING = 0xfffffffeu, KS_KICKED = 0xffffffffu };
#define KICK_SLOTS 1024
#define KICK_WAIT_NS 2000000ull /* for the handler of a kick in flight, then go on regardless */

typedef struct {
    pthread_t th;    /* the owner (a live thread while the slot is used) */
    uint32_t state;  /* atomic: KS_IDLE, a ticket (in the syscall), KS_KICKING, KS_KICKED */
    uint32_t seen;   /* the watchdog's: state at its previous tick (wd_mu) */
    uint32_t ticket; /* the owner's last ticket */
    uint32_t used;   /* wd_mu */
} kick_slot_t;

static kick_slot_t kick_slots[KICK_SLOTS]; /* never freed: a late handler writes only here */
static uint32_t kick_hi;                   /* wd_mu: slots [0, kick_hi) have been handed out */
static int kick_sig = -1;                  /* after kick_setup: the signal, or -1 (none) */
static pthread_once_t kick_once = PTHREAD_ONCE_INIT;
static pthread_key_t kick_key;
/* initial-exec: read on every ring and every sleep, and by nothing else */
static __thread __attribute__((tls_model("initial-exec"))) kick_slot_t *my_kick;
static __thread __attribute__((tls_model("initial-exec"))) int my_kick_state; /* 0, 1, -1 */

static pthread_mutex_t wd_mu = PTHREAD_MUTEX_INITIALIZER;
static int wd_running; /* wd_mu: the thread exists (in this process: see wd_atfork) */
static int wd_start_locked(void);

static void kick_handler(int sig, siginfo_t *si, void *uc)
{
    (void)sig;
    (void)uc;
    uintptr_t p = (uintptr_t)si->si_value.sival_ptr, base = (uintptr_t)kick_slots;
    if (si->si_code != SI_QUEUE || p < base || p >= base + sizeof kick_slots ||
        (p - base) % sizeof(kick_slot_t))
        return;
    __atomic_store_n(&((kick_slot_t *)p)->state, KS_KICKED, __ATOMIC_RELEASE);
}

static void kick_thread_exit(void *v)
{
    kick_slot_t *k = v;
    pthread_mutex_lock(&wd_mu);
    __atomic_store_n(&k->state, KS_IDLE, __ATOMIC_RELAXED);
    k->used = 0;
    pthread_mutex_unlock(&wd_mu);
}

static void kick_setup(void)
{
    if (pthread_key_create(&kick_key, kick_thread_exit) != 0)
        return;
    int sig = SIGRTMAX - 3;
    struct sigaction old, sa;
    if (sig <= SIGRTMIN || sigaction(sig, NULL, &old) != 0)
        return;
    if (!(old.sa_flags & SA_SIGINFO) && old.sa_handler == SIG_DFL) {
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = kick_handler;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK; /* no SA_RESTART: the read or write must return */
        sigemptyset(&sa.sa_mask);
        if (sigaction(sig, &sa, NULL) != 0)
            return;
    } else if (!(old.sa_flags & SA_SIGINFO) || old.sa_sigaction != kick_handler) {
        return; /* someone else's signal: no eventfd sleeps, no kicked writes in this process */
    }
    kick_sig = sig;
}

/* This thread's slot, or NULL: no kicks here (and then no eventfd sleeps either). */
static __attribute__((noinline)) kick_slot_t *kick_mine_slow(void)
{
    pthread_once(&kick_once, kick_setup);
    sigset_t m;
    if (kick_sig < 0 || pthread_sigmask(SIG_BLOCK, NULL, &m) != 0 || sigismember(&m, kick_sig)) {
        my_kick_state = -1;
        return NULL;
    }
    kick_slot_t *k = NULL;
    pthread_mutex_lock(&wd_mu);
    if (wd_start_locked() == 0) {
        for (uint32_t i = 0; i < KICK_SLOTS; i++)
            if (!kick_slots[i].used) {
                k = &kick_slots[i];
                break;
            }
    }
    if (k) {
        k->used = 1;
        k->th = pthread_self();
        k->seen = k->ticket = 0;
        __atomic_store_n(&k->state, KS_IDLE, __ATOMIC_RELAXED);
        if ((uint32_t)(k - kick_slots) >= kick_hi)
            kick_hi = (uint32_t)(k - kick_slots) + 1;
        if (pthread_setspecific(kick_key, k) != 0) {
            k->used = 0;
            k = NULL;
        }
    }
    pthread_mutex_unlock(&wd_mu);
    my_kick = k;
    my_kick_state = k ? 1 : -1;
    return k;
}

static HOT inline kick_slot_t *kick_mine(void)
{
    if (__builtin_expect(my_kick_state > 0, 1))
        return my_kick;
    return my_kick_state < 0 ? NULL : kick_mine_slow();
}

/* Around a read or write a hostile peer can stall: arm, make it, disarm. The state word is only
 * ever changed by compare-exchange once armed; RELEASE/ACQUIRE order our ticket with the
 * watchdog's look at it (the syscall itself is what a kick is about). */
static HOT inline uint32_t kick_arm(kick_slot_t *k)
{
    uint32_t t = k->ticket + 1;
    if (t >= KS_KICKING)
        t = 1;
    k->ticket = t;
    __atomic_store_n(&k->state, t, __ATOMIC_RELEASE);
    return t;
}

static __attribute__((noinline, cold)) void kick_wait(kick_slot_t *k)
{
    uint64_t end = now_ns() + KICK_WAIT_NS;
    for (unsigned i = 1; __atomic_load_n(&k->state, __ATOMIC_ACQUIRE) != KS_KICKED; i++) {
        cpu_relax();
        if (i % 256 == 0 && now_ns() >= end)
            break; /* not our handler (replaced since): the EINTR was all it could do */
    }
    __atomic_store_n(&k->state, KS_IDLE, __ATOMIC_RELEASE);
}

static HOT inline void kick_disarm(kick_slot_t *k, uint32_t t)
{
    if (!__atomic_compare_exchange_n(&k->state, &t, KS_IDLE, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE))
        kick_wait(k);
}

/* The watchdog's half (wd_mu held, every tick). */
static void kick_scan(void)
{
    for (uint32_t i = 0; i < kick_hi; i++) {
        kick_slot_t *k = &kick_slots[i];
        if (!k->used)
            continue;
        uint32_t s = __atomic_load_n(&k->state, __ATOMIC_ACQUIRE);
        uint32_t was = s;
        if (s != KS_IDLE && s < KS_KICKING && s == k->seen &&
            __atomic_compare_exchange_n(&k->state, &s, KS_KICKING, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_RELAXED)) {
            union sigval v;
            v.sival_ptr = k;
            if (pthread_sigqueue(k->th, kick_sig, v) != 0)
                __atomic_store_n(&k->state, KS_KICKED, __ATOMIC_RELEASE);
        }
        k->seen = was;
    }
}

/* After fork(): only the forking thread is left, and no watchdog (wd_mu is held: see
 * wd_atfork_child). Every slot is free again; the forking thread takes a new one (and starts a
 * watchdog) the next time it needs one. */
static void kick_atfork_child(void)
{
    for (uint32_t i = 0; i < kick_hi; i++) {
        kick_slots[i].used = 0;
        kick_slots[i].state = KS_IDLE;
    }
    if (my_kick_state > 0) { /* (the key exists then) its old slot may go to another thread */
        pthread_setspecific(kick_key, NULL);
        my_kick = NULL;
        my_kick_state = 0;
    }
}

/* Wake a sleep-eventfd sleeper: write 1, under a kick (a full counter would block us). EINTR
 * (kicked) and EAGAIN (made non-blocking, and full) both mean the counter is non-zero already. */
static HOT void efd_ring(int fd)
{
    kick_slot_t *k = kick_mine();
    uint32_t t = k ? kick_arm(k) : 0;
    uint64_t one = 1;
    if (write(fd, &one, sizeof one) < 0) {
        /* see above */
    }
    if (k)
        kick_disarm(k, t);
}

/* Our duplicate of a sleep fd (a sleep eventfd, one end of a reply-sleep pipe), with O_NONBLOCK
 * set (1), cleared (0) or left alone (-1). A sleep eventfd's open file description is shared by
 * every holder and must stay blocking: left alone. The client's read end of a pipe and the
 * server's write end are descriptions of their own (the kernel made the pipe and let its copies
 * go), so the flag is theirs to choose; the server's spare read end may share the client's (see
 * ChannelShm), so it is left alone. Out of fds: -1, no exception (the caller does without:
 * futex sleeps, rather than refusing the channel). -1 for none, -2 on error. */
static int sleep_fd_dup(int fd, int nonblock)
{
    if (fd < 0)
        return -1;
    int d = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (d < 0 && (errno == EMFILE || errno == ENFILE))
        return -1;
    int fl = d < 0 ? -1 : fcntl(d, F_GETFL);
    if (fl < 0 || (nonblock >= 0 &&
                   fcntl(d, F_SETFL, nonblock ? fl | O_NONBLOCK : fl & ~O_NONBLOCK) < 0)) {
        PyErr_SetFromErrno(PyExc_OSError);
        if (d >= 0)
            close(d);
        return -2;
    }
    return d;
}

/* ---- Result objects. ------------------------------------------------------------------------ */

/* set_types(): the capbus.Message class (a tuple subclass) and the Python Request subclass.
 * msg_type NULL = plain tuples; req_type defaults to _core.Request. Strong references. */
static PyTypeObject *msg_type;
static PyTypeObject *req_type;

/* The interpreter's own cached ints 0..255, looked up once: an opcode, a flags word or a data
 * value in that range becomes an int without a call into the interpreter (whose code for it
 * would be one more page touched per message). */
#define SMALL_INTS 256
static PyObject *small_ints[SMALL_INTS];

static int small_ints_init(void)
{
    for (int i = 0; i < SMALL_INTS; i++)
        if (!small_ints[i] && !(small_ints[i] = PyLong_FromLong(i)))
            return -1;
    return 0;
}

static inline PyObject *u64_object(uint64_t v)
{
    return v < SMALL_INTS ? Py_NewRef(small_ints[v]) : PyLong_FromUnsignedLongLong(v);
}

/* Free lists of the two result types (exact types only; GIL held). A round trip makes one
 * Message and one Request and frees them soon after: reusing the memory skips the allocator,
 * the zeroing and the collector's bookkeeping, work that runs on cold caches right after a
 * context switch. The list keeps the memory of objects whose deallocation ran in full (their
 * references are gone and the collector no longer tracks them); taking one out starts its life
 * again as a fresh allocation would (PyObject_Init, empty fields, then tracked). */
#define FREE_LIST_MAX 16
typedef struct {
    int n;
    PyObject *items[FREE_LIST_MAX];
} free_list_t;
static free_list_t msg_free_list, req_free_list;

static inline int free_list_push(free_list_t *fl, PyObject *o)
{
    if (fl->n == FREE_LIST_MAX)
        return 0;
    fl->items[fl->n++] = o;
    return 1;
}

static inline PyObject *free_list_pop(free_list_t *fl)
{
    return fl->n ? fl->items[--fl->n] : NULL;
}

static PyTypeObject MessageType;

#define MESSAGE_ITEMS 7

/* MessageType's tp_free: tuple's deallocator has untracked it and released its items. */
static HOT void Message_free(void *p)
{
    PyObject *o = p;
    if (Py_TYPE(o) == &MessageType && Py_SIZE(o) == MESSAGE_ITEMS &&
        free_list_push(&msg_free_list, o))
        return;
    PyObject_GC_Del(p);
}

/* A new instance of msg_type (or a tuple), tracked, with 7 NULL items. */
static HOT PyObject *message_alloc(void)
{
    if (msg_type == &MessageType) {
        PyObject *t = free_list_pop(&msg_free_list);
        if (t) {
            memset(((PyTupleObject *)t)->ob_item, 0, MESSAGE_ITEMS * sizeof(PyObject *));
            PyObject_InitVar((PyVarObject *)t, &MessageType, MESSAGE_ITEMS);
            PyObject_GC_Track(t);
            return t;
        }
    }
    return msg_type ? msg_type->tp_alloc(msg_type, MESSAGE_ITEMS) : PyTuple_New(MESSAGE_ITEMS);
}

/* (opcode, flags, d0, d1, d2, d3, payload or None) as a msg_type instance, allocated directly
 * (no Python-level constructor runs). Steals `payload`. */
static HOT PyObject *make_message(const slot_t *s, PyObject *payload)
{
    PyObject *t = message_alloc();
    if (!t) {
        Py_DECREF(payload);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 6, payload);
    PyObject *o = u64_object(s->opcode);
    if (!o)
        goto fail;
    PyTuple_SET_ITEM(t, 0, o);
    if (!(o = u64_object(s->flags)))
        goto fail;
    PyTuple_SET_ITEM(t, 1, o);
    for (int i = 0; i < 4; i++) {
        if (!(o = u64_object(s->data[i])))
            goto fail;
        PyTuple_SET_ITEM(t, 2 + i, o);
    }
    return t;
fail:
    Py_DECREF(t); /* the remaining NULL items are fine for the tuple's dealloc */
    return NULL;
}

/* ---- Metrics counters (the CSTATS / SSTATS blocks of the channel header page). -------------
 * One writer per block (the Lane: one thread at a time; the ServerSet: every update runs under
 * the GIL, which serialises recv and reply threads). The writer keeps the values in private
 * memory and STORES them: no load of the shared copy, no LOCK-prefixed read-modify-write (there
 * is no second writer to race with), and a peer that scribbles the block cannot make us count
 * from its numbers. RELAXED: readers want each u64 untorn and nothing else; no other memory is
 * published with a counter. No syscall, no lock, a handful of stores to lines no peer writes. */

static inline void stat_store(char *blk, const uint64_t *priv, unsigned off)
{
    __atomic_store_n((uint64_t *)(blk + off), priv[off / 8], __ATOMIC_RELAXED); /* see above */
}

static inline void stat_add(char *blk, uint64_t *priv, unsigned off, uint64_t k)
{
    priv[off / 8] += k;
    stat_store(blk, priv, off);
}

/* The per-second bucket (same offsets in both blocks): `now` is any CLOCK_MONOTONIC reading
 * (coarse or not). k messages happened now. */
static inline void stat_second(char *blk, uint64_t *priv, uint64_t now, uint64_t k)
{
    uint64_t sec = now / 1000000000ull;
    uint64_t *idx = &priv[STATS_SEC_INDEX_OFF / 8], *cnt = &priv[STATS_SEC_COUNT_OFF / 8];
    if (__builtin_expect(sec == *idx, 1)) {
        *cnt += k;
        stat_store(blk, priv, STATS_SEC_COUNT_OFF);
        return;
    }
    priv[STATS_PREV_COUNT_OFF / 8] = sec == *idx + 1 ? *cnt : 0;
    *cnt = k;
    *idx = sec;
    stat_store(blk, priv, STATS_PREV_COUNT_OFF);
    stat_store(blk, priv, STATS_SEC_COUNT_OFF);
    stat_store(blk, priv, STATS_SEC_INDEX_OFF);
}

/* Histogram bucket of a round trip: i with BASE * 2^i <= ns < BASE * 2^(i+1), clamped. */
static inline unsigned stat_hist_bucket(uint64_t ns)
{
    uint64_t q = ns / STATS_HIST_BASE_NS;
    if (q < 2)
        return 0;
    unsigned b = 63u - (unsigned)__builtin_clzll(q);
    return b < STATS_HIST_BUCKETS ? b : STATS_HIST_BUCKETS - 1;
}

/* ---- Views of shared memory (zero-copy payloads and loans). -----------------------------------
 * Request.payload (zero-copy) and Lane.loan() hand out memoryviews of a ZBuf, a tiny exporter
 * over arena memory that allows any number of exports and counts them. Every view made from the
 * memoryview (slices, casts, memoryview(mv), pickle's out-of-band buffers) shares its managed
 * buffer, which holds one export until the last of those views is gone; a consumer that keeps
 * the memoryview object instead of an export (numpy.frombuffer, an array built by
 * Request.object()) keeps that managed buffer alive too. So "no export left" means "no view of
 * this memory left", and only then may the memory be reused:
 *  - a payload's arena chunk goes back to the sender (ch_release_chunk) once its Request is done
 *    (replied to, released, deallocated) AND its last export is gone, whichever comes last;
 *  - a lane never allocates over a loan's chunk (committed or cancelled) while an export of that
 *    loan lives (lane_reserve: WouldBlock on that lane only).
 * Nothing is revoked: a view stays valid, and shows its own message's bytes, for as long as it
 * lives (the sender of a loan can still write them: see the loan API). Once a ZBuf's memory is
 * given back it is "spent" and refuses new exports (BufferError), so its object (mv.obj) cannot
 * reach reused memory. memoryview.release() counts as "this view is gone": an array built on
 * that view before (numpy keeps the object, not an export, so nobody can tell) must not be used
 * after it. The mapping under a view stays while its ZBuf lives (ServerSet channel views, Lane
 * pins). */

typedef struct zbuf {
    PyObject_HEAD
    char *buf;
    Py_ssize_t len;
    int readonly;
    int spent;                /* the memory was given back: no new export */
    Py_ssize_t exports;       /* live exports (managed buffers of memoryviews, other consumers) */
    PyObject *owner;          /* strong: the ServerSet (payload) or the Lane (loan) */
    struct chan *ch;          /* payload: its channel, pinned (ch->views) while we live */
    uint64_t seq;             /* payload: its entry in the channel's held-chunk queue */
    int held;                 /* payload: the arena chunk is still held */
    int done;                 /* payload: its Request is finished with it */
    int lane_pin;             /* loan: on the owner Lane's list: its chunk and mapping are kept */
    uint64_t coff, clen;      /* loan: the arena chunk (offset, bytes) no allocation may cover */
    struct zbuf *prev, *next; /* loan: the Lane's pinned buffers */
} ZBufObject;

static PyTypeObject ZBufType;
static PyObject *released_view; /* a released memoryview: what a finished Request's .payload is */
static void zb_last_export(ZBufObject *E);

static int zb_getbuf(ZBufObject *E, Py_buffer *view, int flags)
{
    if (E->spent) {
        view->obj = NULL;
        PyErr_SetString(PyExc_BufferError,
                        "this shared buffer's memory went back to its channel when its last view "
                        "was dropped: keep a view (or a copy) for as long as you need the bytes");
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)E, E->buf, E->len, E->readonly, flags) < 0)
        return -1;
    E->exports++;
    return 0;
}

static void zb_releasebuf(ZBufObject *E, Py_buffer *view)
{
    if (--E->exports == 0)
        zb_last_export(E); /* defined with the ZBuf lifetime, after the ServerSet */
}

static PyBufferProcs zb_as_buffer = {(getbufferproc)zb_getbuf, (releasebufferproc)zb_releasebuf};

/* A new ZBuf (owner: a strong reference is taken) and its first memoryview, or NULL. */
static PyObject *zb_view(PyObject *owner, char *buf, uint64_t len, int readonly, ZBufObject **out)
{
    ZBufObject *E = PyObject_New(ZBufObject, &ZBufType);
    if (!E)
        return NULL;
    E->buf = buf;
    E->len = (Py_ssize_t)len;
    E->readonly = readonly;
    E->spent = 0;
    E->exports = 0;
    Py_INCREF(owner);
    E->owner = owner;
    E->ch = NULL;
    E->seq = 0;
    E->held = E->done = E->lane_pin = 0;
    E->coff = E->clen = 0;
    E->prev = E->next = NULL;
    PyObject *mv = PyMemoryView_FromObject((PyObject *)E);
    if (!mv) {
        Py_DECREF(E);
        return NULL;
    }
    *out = E;
    Py_DECREF(E); /* the managed buffer holds it now (and the caller takes its own reference) */
    return mv;
}

/* =============================================================================================
 * Lane: the client end of one channel.
 *
 * One Lane per channel memfd and per thread: it owns the request ring's producer side and the
 * response ring's consumer side. Concurrent use from two threads raises RuntimeError. The
 * channel must be fresh (all rings at zero) when the Lane is created.
 * ============================================================================================= */

typedef struct {
    PyObject_HEAD
    char *chan;
    size_t chan_len;
    char *ctrl;
    char *db;
    uint32_t index;
    int mode;
    uint64_t spin_ns;
    uint64_t spin_cur; /* adaptive: this wait's spin (see spin_won/spin_lost) */
    uint64_t max_payload;
    prod_t req;
    cons_t resp;
    uint64_t last_tag;    /* tags are 1, 2, 3, ... per lane (calls and sends alike) */
    uint64_t call_tag;    /* tag of the latest call (call or call_start) */
    uint64_t cancel_below; /* last value stored to CHAN_CANCEL_BELOW_OFF (never goes back) */
    uint64_t refused;     /* messages refused for a full ring/arena; mirrored to CHAN_REFUSED_OFF */
    int bell_efd;         /* our duplicate of the service's eventfd, or -1 */
    int sleep_efd;        /* our duplicate of the service's sleep eventfd, or -1 */
    int rs_fd;            /* the read end of our reply-sleep pipe (blocking), or -1 */
    int rs_off;           /* that pipe is at end of file: futex sleeps from now on */
    int reply_efd;        /* our duplicate of this channel's reply eventfd, or -1 */
    int armed;            /* we set the response ring's consumer-event flag */
    int busy;
    int broken;
    bucket_t bucket;      /* client-private rate/bandwidth buckets */
    outmsg_t *batch;      /* send_many scratch, allocated once at init */
    Py_buffer *views;
    /* The loan (at most one): a reserved request-arena chunk the user writes in place. */
    int loan_active;
    uint64_t loan_len;    /* payload bytes */
    prod_res_t loan_res;
    ZBufObject *loan_buf; /* borrowed: the loan's buffer while it has views (a buffer holds its
                             Lane, so a strong reference here would be a cycle); the loan itself
                             stays out after its views are dropped */
    ZBufObject *bufs;     /* every loan buffer of this lane with views alive (lane_reserve never
                             allocates over their chunks) */
    int pins;             /* how many: the channel stays mapped while > 0 */
    char *chan_kept;      /* closed, but still mapped for loan views */
    uint64_t call_t0;     /* CLOCK_MONOTONIC at the latest call_start (round-trip counter) */
    uint64_t cst[CSTATS_SIZE / 8]; /* the client metrics block (private copy; see stat_add) */
    unsigned long fork_gen;        /* of the process that made it (check_fork) */
    /* 0, or a STATE_* the runtime set itself (Lane.mark): with the kernel gone nobody writes the
     * control page any more, so the runtime's own pidfd watch says "peer dead" here. */
    uint32_t local_state;
} LaneObject;

/* The channel's state: the kernel's control page, unless it still says OPEN and the runtime
 * marked the lane itself. RELAXED: a mark is a hint set from another thread; the waits re-read
 * it after every wake-up. */
static inline uint32_t lane_state(const LaneObject *L)
{
    uint32_t st = ctrl_state(L->ctrl);
    if (__builtin_expect(st == STATE_OPEN, 1)) {
        uint32_t m = __atomic_load_n(&L->local_state, __ATOMIC_RELAXED);
        if (__builtin_expect(m != 0, 0))
            return m;
    }
    return st;
}

static void lane_cancel_loan(LaneObject *L);

/* Unmap everything; the channel itself stays mapped while loan views live (lane_unpin). */
static void lane_unmap(LaneObject *L)
{
    lane_cancel_loan(L);
    if (L->chan) {
        if (L->pins) {
            L->chan_kept = L->chan;
        } else {
            munmap(L->chan, L->chan_len);
        }
    }
    if (L->ctrl)
        munmap(L->ctrl, CTRL_SIZE);
    if (L->db)
        munmap(L->db, DOORBELL_SIZE);
    L->chan = L->ctrl = L->db = NULL;
    if (L->bell_efd >= 0)
        close(L->bell_efd);
    if (L->reply_efd >= 0)
        close(L->reply_efd);
    if (L->sleep_efd >= 0)
        close(L->sleep_efd);
    if (L->rs_fd >= 0)
        close(L->rs_fd);
    L->bell_efd = L->reply_efd = L->sleep_efd = L->rs_fd = -1;
    PyMem_Free(L->batch);
    PyMem_Free(L->views);
    L->batch = NULL;
    L->views = NULL;
}

/* The last view of a loan buffer of L is gone: its chunk may be allocated again, and the last
 * one of a closed lane unmaps the channel. */
static void lane_unpin(LaneObject *L, ZBufObject *E)
{
    E->lane_pin = 0;
    if (L->loan_buf == E)
        L->loan_buf = NULL; /* the loan is still out: the caller dropped its views */
    if (E->prev)
        E->prev->next = E->next;
    else
        L->bufs = E->next;
    if (E->next)
        E->next->prev = E->prev;
    E->prev = E->next = NULL;
    if (--L->pins == 0 && L->chan_kept) {
        munmap(L->chan_kept, L->chan_len);
        L->chan_kept = NULL;
    }
}

/* Does the arena chunk [off, off + len) overlap a chunk that a loan view of L still shows? */
static int lane_pinned(const LaneObject *L, uint64_t off, uint64_t len)
{
    for (const ZBufObject *E = L->bufs; E; E = E->next)
        if (off < E->coff + E->clen && E->coff < off + len)
            return 1;
    return 0;
}

/* RG_PINNED: the arena has room, but the chunk it offers is still under a loan view of this lane
 * (a committed loan's memory after the receiver let it go, or a cancelled loan's). */
enum { RG_PINNED = 3 };

/* prod_reserve, never over a chunk a loan view still shows (GIL held: the list is the GIL's).
 * One branch while no loan view is alive. When the place prod_reserve picks is pinned, the other
 * places the consumer accepts are tried: the FIFO cursor without the idle jump to offset 0 (so
 * `v = loan(n)` in a loop, the previous view still alive, goes on), then the start of the next
 * lap. */
static HOT int lane_reserve(LaneObject *L, uint64_t plen, prod_res_t *r, const char **why)
{
    int rc = prod_reserve(&L->req, plen, r, why);
    if (__builtin_expect(L->pins == 0, 1) || rc != RG_OK || !lane_pinned(L, r->off, r->len))
        return rc;
    static const int other[] = {RES_NO_JUMP, RES_NO_JUMP | RES_WRAP};
    int full = 0; /* a place not pinned may come free as the receiver releases more */
    for (size_t i = 0; i < sizeof other / sizeof other[0]; i++) {
        rc = prod_reserve_at(&L->req, plen, other[i], r, why);
        if (rc == RG_CORRUPT)
            return rc;
        if (rc == RG_OK && !lane_pinned(L, r->off, r->len))
            return RG_OK;
        full |= rc == RG_FULL;
    }
    /* Full but the receiver has released everything: only our own views are in the way. */
    const prod_t *p = &L->req;
    uint64_t rel = (p->rel_seen == p->jump_from && p->jump_to) ? p->jump_to : p->rel_seen;
    return full && rel != p->cursor ? RG_FULL : RG_PINNED;
}

static const char pinned_msg[] =
    "a view of an earlier loan on this lane still shows the arena memory the next payload needs: "
    "drop that view (or copy what you keep of it) and send again";

static PyObject *Lane_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    LaneObject *L = (LaneObject *)PyType_GenericNew(type, args, kw);
    if (L)
        L->bell_efd = L->reply_efd = L->sleep_efd = L->rs_fd = -1; /* never close fd 0 */
    return (PyObject *)L;
}

static void Lane_dealloc(LaneObject *L)
{
    lane_unmap(L);
    Py_TYPE(L)->tp_free((PyObject *)L);
}

static int Lane_init(LaneObject *L, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"chan_fd",   "ctrl_fd", "doorbell_fd",   "index",
                             "nslots",    "arena_size", "wait_mode",  "spin_ns",
                             "bell_event_fd", "reply_event_fd", "bell_sleep_fd",
                             "reply_sleep_fd", NULL};
    int chan_fd, ctrl_fd, db_fd, mode = WAIT_ADAPTIVE, bell_fd = -1, reply_fd = -1, sleep_fd = -1,
        rs_fd = -1;
    unsigned long long index, nslots = DEFAULT_NSLOTS, asize = DEFAULT_ARENA_SIZE;
    long long spin_ns = DEFAULT_SPIN_NS;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iiiK|KKiLiiii:Lane", kwlist, &chan_fd,
                                     &ctrl_fd, &db_fd, &index, &nslots, &asize, &mode, &spin_ns,
                                     &bell_fd, &reply_fd, &sleep_fd, &rs_fd))
        return -1;
    if (L->chan) {
        PyErr_SetString(PyExc_RuntimeError, "Lane already initialised");
        return -1;
    }
    if (index >= MAX_CHANNELS) {
        PyErr_Format(PyExc_ValueError, "index must be in 0..%u", MAX_CHANNELS - 1);
        return -1;
    }
    if (check_geometry(nslots, asize) < 0 || check_wait(mode, spin_ns) < 0)
        return -1;
    uint64_t len = channel_size(nslots, asize);
    if (L->chan_kept) {
        PyErr_SetString(PyExc_RuntimeError, "Lane already initialised");
        return -1;
    }
    L->chan = map_memfd(chan_fd, len, 1, "channel");
    if (!L->chan)
        return -1;
    L->chan_len = (size_t)len;
    L->ctrl = map_memfd(ctrl_fd, CTRL_SIZE, 0, "control page");
    if (!L->ctrl)
        goto fail;
    L->db = map_memfd(db_fd, DOORBELL_SIZE, 1, "doorbell");
    if (!L->db)
        goto fail;
    if ((L->bell_efd = efd_dup(bell_fd)) == -2 || (L->reply_efd = efd_dup(reply_fd)) == -2 ||
        (L->sleep_efd = sleep_fd_dup(sleep_fd, -1)) == -2 ||
        (L->rs_fd = sleep_fd_dup(rs_fd, 0)) == -2)
        goto fail;
    L->rs_off = 0;
    unsigned nb = nslots < BATCH_MAX ? (unsigned)nslots : BATCH_MAX;
    L->batch = PyMem_Calloc(nb, sizeof *L->batch);
    L->views = PyMem_Calloc(nb, sizeof *L->views);
    if (!L->batch || !L->views) {
        PyErr_NoMemory();
        goto fail;
    }
    L->index = (uint32_t)index;
    L->mode = mode;
    L->spin_ns = L->spin_cur = (uint64_t)spin_ns;
    L->max_payload = max_payload_for(asize);
    memset(&L->req, 0, sizeof L->req);
    memset(&L->resp, 0, sizeof L->resp);
    memset(&L->bucket, 0, sizeof L->bucket);
    L->req.ring = L->chan + REQ_RING_OFF;
    L->req.arena = L->chan + req_arena_off(nslots);
    L->req.nslots = nslots;
    L->req.asize = asize;
    L->resp.ring = L->chan + resp_ring_off(nslots);
    L->resp.arena = L->chan + resp_arena_off(nslots, asize);
    L->resp.nslots = nslots;
    L->resp.asize = asize;
    L->last_tag = L->call_tag = L->cancel_below = L->refused = 0;
    L->busy = L->broken = L->armed = 0;
    L->loan_active = 0;
    L->call_t0 = 0;
    memset(L->cst, 0, sizeof L->cst);
    L->fork_gen = fork_gen;
    L->local_state = 0;
    return 0;
fail:
    if (L->bell_efd == -2)
        L->bell_efd = -1;
    if (L->reply_efd == -2)
        L->reply_efd = -1;
    if (L->sleep_efd == -2)
        L->sleep_efd = -1;
    if (L->rs_fd == -2)
        L->rs_fd = -1;
    lane_unmap(L);
    return -1;
}

static HOT int lane_usable(LaneObject *L)
{
    if (!L->chan) {
        PyErr_SetString(PyExc_ValueError, "Lane is closed");
        return 0;
    }
    if (check_fork(L->fork_gen, "capbus channel") < 0)
        return 0;
    if (L->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Lane used from two threads at once (one per thread)");
        return 0;
    }
    if (L->broken) {
        PyErr_SetString(ProtocolError, "lane is unusable after a protocol error");
        return 0;
    }
    return 1;
}

static void lane_break(LaneObject *L, const char *why)
{
    L->broken = 1;
    PyErr_Format(ProtocolError, "server wrote garbage into channel %u (%s); the lane is unusable",
                 L->index, why);
}

/* Tell the server there is work: hint bit; then, unless the server spins (it watches the hint
 * bits itself and never sleeps), seq bump, a wake-up only if it sleeps (a write to the sleep
 * eventfd or a futex wake, whichever it sleeps on), and an eventfd write only if an event-loop
 * server asked for one. */
static HOT void lane_ring_doorbell(LaneObject *L)
{
    uint64_t *word = (uint64_t *)(L->db + DB_BITMAP_OFF) + L->index / 64;
    uint32_t *seq = (uint32_t *)(L->db + DB_SEQ_OFF);
    /* RELEASE: a server that sees the bit and then ACQUIRE-loads our tail sees this message (it
     * re-reads the tail before trusting anything: the bit is only a hint). */
    __atomic_fetch_or(word, 1ull << (L->index % 64), __ATOMIC_RELEASE);
#if !defined(__x86_64__) && !defined(__i386__)
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* on x86 the locked RMW above is this fence */
#endif
    /* Dekker with ss_poll(arm), which clears server_spins before it sets event_wanted, fences and
     * scans: either that scan sees our tail, or this load sees 0 and we do the full handshake.
     * A client that scribbles the flag to 1 can make wake-ups go missing, like one that clears
     * server_sleeping: the sleep watchdog / timers bound that. Saves the seq line (which a
     * spinning server reads) and a fence per message. */
    if (__atomic_load_n((uint32_t *)(L->db + DB_SERVER_SPINS_OFF), __ATOMIC_RELAXED) == 1)
        return;
    /* SEQ_CST (RELEASE would do for this): a server that ACQUIRE-loads seq and sees this
     * increment also sees our tail. Then a full fence, Dekker with the server's "store
     * sleeping=1; fence; load seq; scan" (ss_wait) and with poll_armed's "store event_wanted=1;
     * fence; scan": either the server's scan sees our tail, or our loads below see its flag and
     * we wake it. On x86 the locked add is that fence. Both loads are RELAXED (the fence orders
     * them) and hit one cache line. */
    __atomic_fetch_add(seq, 1, __ATOMIC_SEQ_CST);
#if !CB_X86
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
    uint32_t sleeping = __atomic_load_n((uint32_t *)(L->db + DB_SERVER_SLEEPING_OFF),
                                        __ATOMIC_RELAXED);
    if (sleeping == SLEEP_EFD && L->sleep_efd >= 0)
        efd_ring(L->sleep_efd);
    else if (sleeping)
        sys_futex_wake(seq, INT_MAX);
    if (L->bell_efd >= 0 &&
        __atomic_load_n((uint32_t *)(L->db + DB_EVENT_WANTED_OFF), __ATOMIC_RELAXED))
        efd_signal(L->bell_efd);
}

/* The client's cancel mark: the server skips requests with tag < cancel_below. It never moves
 * back (that would revive requests cancelled before). RELEASE is not needed for correctness (it
 * is a hint; a skipped or a served request are both fine), but costs nothing on x86 and keeps the
 * store ordered after the request it cancels. */
static void lane_cancel(LaneObject *L, uint64_t tag)
{
    if (tag + 1 <= L->cancel_below)
        return;
    L->cancel_below = tag + 1;
    __atomic_store_n((uint64_t *)(L->chan + CHAN_CANCEL_BELOW_OFF), tag + 1, __ATOMIC_RELEASE);
}

/* Count messages refused for a full ring/arena. RELAXED: an informational counter the server
 * reads without trusting it; no other memory is published with it. */
static void lane_refused(LaneObject *L, uint64_t n)
{
    L->refused += n;
    __atomic_store_n((uint64_t *)(L->chan + CHAN_REFUSED_OFF), L->refused, __ATOMIC_RELAXED);
}

/* ---- Client metrics (the CSTATS block; see stat_add for why plain stores suffice). --------- */

static inline void lane_stat(LaneObject *L, unsigned off, uint64_t k)
{
    stat_add(L->chan + CHAN_CSTATS_OFF, L->cst, off, k);
}

/* n messages, `calls` of them calls, carrying `bytes` payload bytes, were published at `now`
 * (CLOCK_MONOTONIC, coarse or not). */
static inline void lane_count_sent(LaneObject *L, uint64_t n, uint64_t bytes, uint64_t calls,
                                   uint64_t now)
{
    char *blk = L->chan + CHAN_CSTATS_OFF;
    stat_add(blk, L->cst, CSTATS_SENT_OFF, n);
    if (bytes)
        stat_add(blk, L->cst, CSTATS_BYTES_SENT_OFF, bytes);
    if (calls)
        stat_add(blk, L->cst, CSTATS_CALLS_OFF, calls);
    stat_second(blk, L->cst, now, n);
}

/* A call's reply arrived `ns` after the call was started. */
static inline void lane_count_latency(LaneObject *L, uint64_t ns)
{
    char *blk = L->chan + CHAN_CSTATS_OFF;
    if (ns > L->cst[CSTATS_LATENCY_MAX_OFF / 8]) {
        L->cst[CSTATS_LATENCY_MAX_OFF / 8] = ns;
        stat_store(blk, L->cst, CSTATS_LATENCY_MAX_OFF);
    }
    stat_add(blk, L->cst, CSTATS_LATENCY_SUM_OFF, ns);
    stat_add(blk, L->cst, CSTATS_LATENCY_COUNT_OFF, 1);
    stat_add(blk, L->cst, CSTATS_HIST_OFF + 8u * stat_hist_bucket(ns), 1);
}

/* ---- Client-side limit checks (fail fast; the server enforces the same on its side). ------- */

static int raise_limit(int lim, const limits_t *l, uint64_t plen)
{
    if (lim == LIM_RIGHTS)
        PyErr_SetString(PermissionDenied, "this capability does not carry the right to send");
    else if (lim == LIM_EXPIRED)
        PyErr_SetString(InvalidCapability, "the capability has expired");
    else if (lim == LIM_SIZE)
        PyErr_Format(MessageTooLarge,
                     "payload of %llu bytes exceeds this capability's limit of %llu bytes",
                     (unsigned long long)plen, (unsigned long long)l->max_size);
    else if (lim == LIM_RATE)
        PyErr_Format(RateLimitExceeded, "rate limit of %llu messages/s exceeded",
                     (unsigned long long)l->rate);
    else
        PyErr_Format(RateLimitExceeded, "bandwidth limit of %llu bytes/s exceeded",
                     (unsigned long long)l->bandwidth);
    return -1;
}

/* raise_limit, counted in the client metrics (refused_perm / _size / _rate). */
static int lane_refuse(LaneObject *L, int lim, const limits_t *l, uint64_t plen, uint64_t n)
{
    unsigned off = lim == LIM_SIZE                          ? CSTATS_REFUSED_SIZE_OFF
                   : (lim == LIM_RATE || lim == LIM_BANDWIDTH) ? CSTATS_REFUSED_RATE_OFF
                                                            : CSTATS_REFUSED_PERM_OFF;
    lane_stat(L, off, n);
    return raise_limit(lim, l, plen);
}

/* What a prepared message owes the client's buckets once it is written. */
typedef struct {
    int enforce;  /* CTRL_F_ENFORCE was set: bucket_take(l) after the write */
    uint64_t now; /* coarse_ns() of the check */
    limits_t l;
} charge_t;

/* Every client-side check for one message of `plen` payload bytes, in the order rights,
 * expiry, size, rate, bandwidth (CTRL_F_ENFORCE is set). 0: it may go, and c->l / c->now are
 * what bucket_take charges after the write; -1 with PermissionDenied, InvalidCapability,
 * MessageTooLarge or RateLimitExceeded. Out of line and "cold": only channels whose capability
 * carries a limit come here, and the others keep a smaller, denser hot path (measured: with the
 * checks inline the unlimited round trip got slower; this way it costs nothing measurable). */
static __attribute__((noinline, cold)) int lane_check(LaneObject *L, charge_t *c, uint64_t plen)
{
    ctrl_limits(L->ctrl, &c->l);
    c->now = limits_need_clock(&c->l) ? coarse_ns() : 0;
    int lim = limits_static(&c->l, c->now, plen);
    if (lim == LIM_OK)
        lim = bucket_check(&L->bucket, &c->l, c->now, plen);
    return lim == LIM_OK ? 0 : lane_refuse(L, lim, &c->l, plen, 1);
}

/* send_many's first step: 0 (no checks), 1 (*l and *now set: sizes and buckets are checked per
 * message), or -1 with PermissionDenied / InvalidCapability. */
static int lane_limits_batch(LaneObject *L, limits_t *l, uint64_t *now)
{
    if (__builtin_expect(!(ctrl_flags(L->ctrl) & CTRL_F_ENFORCE), 1))
        return 0;
    ctrl_limits(L->ctrl, l);
    *now = limits_need_clock(l) ? coarse_ns() : 0;
    int lim = limits_static(l, *now, 0);
    return lim == LIM_OK ? 1 : lane_refuse(L, lim, l, 0, 1);
}

/* Parse and check one outgoing message (call, call_start, send); nothing is written. On success
 * the payload view is held in *view (release_view), and *c says what to charge the buckets
 * after the write. (Six arguments: all of them travel in registers.) */
static HOT int lane_prepare(LaneObject *L, PyObject *const *a, uint32_t extra, outmsg_t *m,
                        Py_buffer *view, charge_t *c)
{
    /* a = capability (NULL: m->capability is set already), opcode, flags, data, payload (NULL =
     * none) */
    view->obj = NULL;
    if (!lane_usable(L))
        return -1;
    if ((a[0] && to_u64(a[0], &m->capability, "capability") < 0) ||
        to_u32(a[1], &m->opcode, "opcode") < 0 ||
        parse_flags(a[2], &m->flags, extra) < 0 || parse_data(a[3], m->data) < 0)
        return -1;
    uint32_t st = lane_state(L);
    if (st != STATE_OPEN) {
        raise_for_state(st, "server");
        return -1;
    }
    if (parse_payload(a[4] ? a[4] : Py_None, m, view, L->max_payload, 0) < 0) {
        if (PyErr_ExceptionMatches(MessageTooLarge))
            lane_stat(L, CSTATS_REFUSED_SIZE_OFF, 1);
        return -1;
    }
    if (__builtin_expect(L->loan_active, 0) && m->payload) {
        release_view(view);
        PyErr_SetString(PyExc_RuntimeError,
                        "a loan is out on this lane: commit it (call_loan/send_loan) or "
                        "cancel_loan() before sending another payload");
        return -1;
    }
    /* The capability's limits: one predictable branch when the kernel set none. */
    c->enforce = __builtin_expect(ctrl_flags(L->ctrl) & CTRL_F_ENFORCE, 0) != 0;
    if (c->enforce && lane_check(L, c, m->plen) < 0) {
        release_view(view);
        return -1;
    }
    return 0;
}

enum { LW_READY, LW_STATE, LW_SLICE, LW_AGAIN };

/* One futex sleep until the response ring's tail moves (at most rel_ns unless `forever`):
 * LW_READY / LW_STATE if there is no need to sleep, LW_SLICE after a signal, else LW_AGAIN. */
static HOT int lane_sleep(LaneObject *L, uint64_t *tail, uint32_t *sleeping, uint64_t head,
                      uint64_t rel_ns, int forever)
{
    /* An untimed sleep reads the reply-sleep pipe (see "Sleep eventfds and kicks": cheaper than
     * a futex), under a kick: the server can reopen its end for reading and steal the byte. */
    kick_slot_t *k = NULL;
    int piped = forever && L->rs_fd >= 0 && !L->rs_off && (k = kick_mine()) != NULL;
    /* Store + full fence (store_fence_u32) + re-check: the Dekker half matching the server's
     * "store tail; fence; load sleeping" in ss_write_reply. Either the server sees our flag
     * and wakes us, or we see its tail here and do not sleep. */
    store_fence_u32(sleeping, piped ? SLEEP_EFD : SLEEP_FUTEX);
    uint64_t t = __atomic_load_n(tail, __ATOMIC_RELAXED);
    uint32_t st = lane_state(L);
    if (t != head || st != STATE_OPEN) {
        __atomic_store_n(sleeping, 0, __ATOMIC_RELAXED);
        return t != head ? LW_READY : LW_STATE;
    }
    if (piped) {
        /* A byte wakes us; more than one (a wake-up we did not need) just ends the next sleep
         * early. End of file: every write end is closed (the server is gone or dropped the
         * channel; the control page will say so), so from now on the futex, which the kernel
         * wakes after any change of the control page. */
        char buf[64];
        uint32_t tk = kick_arm(k);
        ssize_t n = read(L->rs_fd, buf, sizeof buf);
        int e = n < 0 ? errno : 0;
        kick_disarm(k, tk);
        __atomic_store_n(sleeping, 0, __ATOMIC_RELAXED);
        if (n == 0 || (n < 0 && e != EINTR))
            L->rs_off = 1;
        return e == EINTR ? LW_SLICE : LW_AGAIN;
    }
    /* The futex word is the low 32 bits of the u64 tail (little-endian). A new reply changes
     * it, so FUTEX_WAIT either sees the change (EAGAIN) or is woken by the server. The kernel
     * wakes this same word after changing the control page (see wake_lane). */
    int r = sys_futex_wait((const uint32_t *)tail, (uint32_t)t, rel_ns, forever);
    /* RELAXED: the flag only saves the server a syscall; a stale 1 costs one spurious wake. */
    __atomic_store_n(sleeping, 0, __ATOMIC_RELAXED);
    return r == -EINTR ? LW_SLICE : LW_AGAIN; /* EINTR: let the caller run signal handlers */
}

/* Wait (WITHOUT the GIL) until something is in the response ring, the control page leaves OPEN,
 * or the slice (<= SLICE_NS, <= deadline) is over. */
static HOT int lane_wait(LaneObject *L, uint64_t deadline)
{
    uint64_t *tail = ring_u64(L->resp.ring, RING_TAIL_OFF);
    uint32_t *sleeping = ring_u32(L->resp.ring, RING_CONSUMER_SLEEPING_OFF);
    uint64_t head = L->resp.head;
    /* No deadline and no spin: sleep until woken, without reading the clock or arming a timer
     * (a timed FUTEX_WAIT costs ~0.2 us more per sleep on this kind of VM). Nothing is lost by
     * that: a reply wakes this word (ss_write_reply), so does the kernel after any change of the
     * control page (peer dead, revoked, closed), and a signal interrupts the wait (EINTR). */
    int forever = deadline == UINT64_MAX && L->mode != WAIT_SPIN;
    if (forever && L->mode == WAIT_BLOCK)
        return lane_sleep(L, tail, sleeping, head, 0, 1);
    uint64_t start = now_ns();
    if (start >= deadline)
        return LW_SLICE;
    uint64_t slice_end = deadline - start > SLICE_NS ? start + SLICE_NS : deadline;
    uint64_t spin_end = start;
    if (L->mode == WAIT_SPIN)
        spin_end = slice_end;
    else if (L->mode == WAIT_ADAPTIVE && spin_allowed(start))
        spin_end = slice_end - start > L->spin_cur ? start + L->spin_cur : slice_end;
    if (spin_end > start) {
        for (unsigned i = 1;; i++) {
            /* RELAXED: only an "anything new?" test; cons_poll re-reads the tail with ACQUIRE. */
            if (__atomic_load_n(tail, __ATOMIC_RELAXED) != head) {
                L->spin_cur = spin_won(L->spin_cur, L->spin_ns);
                return LW_READY;
            }
            if (lane_state(L) != STATE_OPEN)
                return LW_STATE;
            cpu_relax();
            if (i % 1024 == 0 && now_ns() >= spin_end)
                break;
        }
        if (L->mode == WAIT_ADAPTIVE)
            L->spin_cur = spin_lost(L->spin_cur);
    }
    if (forever) /* adaptive, spun out */
        return lane_sleep(L, tail, sleeping, head, 0, 1);
    for (;;) {
        uint64_t now = now_ns();
        if (now >= slice_end)
            return LW_SLICE;
        uint64_t rel = slice_end - now < SLEEP_CAP_NS ? slice_end - now : SLEEP_CAP_NS;
        int r = lane_sleep(L, tail, sleeping, head, rel, 0);
        if (r != LW_AGAIN)
            return r;
    }
}

/* Consume the response ring up to the reply for `tag`. Returns 1 with *out = a Message, 0 if
 * the ring is empty (or after a bounded number of late replies), -1 with an exception. */
static HOT int lane_take_reply(LaneObject *L, uint64_t tag, PyObject **out)
{
    const char *why = NULL;
    /* Bounded: a hostile server could produce late replies as fast as we drop them. */
    for (uint64_t n = 0; n <= L->resp.nslots; n++) {
        int r = cons_poll(&L->resp, &why);
        if (r == RG_EMPTY)
            return 0;
        inmsg_t m;
        if (r == RG_CORRUPT || cons_read(&L->resp, &m, &why) != RG_OK)
            goto corrupt;
        if (m.s.tag > tag) {
            why = "reply for a request that was never sent";
            goto corrupt;
        }
        if (m.s.tag < tag) { /* late reply of a cancelled call: drop it, free its chunk */
            cons_release(&L->resp, &m);
            continue;
        }
        PyObject *payload = Py_None;
        Py_INCREF(payload);
        if (m.has_payload) {
            Py_DECREF(payload);
            why = NULL;
            payload = take_payload(&L->resp, &m, &why);
            if (!payload) {
                if (why)
                    goto corrupt;
                return -1;
            }
        }
        PyObject *t = make_message(&m.s, payload);
        if (!t)
            return -1; /* the reply stays in the ring */
        cons_release(&L->resp, &m);
        if (L->armed) {
            /* RELAXED: our own flag; a stale 1 seen by the server costs one spurious write. */
            __atomic_store_n(ring_u32(L->resp.ring, RING_CONSUMER_EVENT_OFF), 0, __ATOMIC_RELAXED);
            L->armed = 0;
        }
        *out = t;
        return 1;
    }
    return 0;
corrupt:
    lane_break(L, why);
    return -1;
}

/* Write one message into the request ring, copying big payloads without the GIL. With `loan`,
 * the payload is the lane's loaned chunk (m->payload points into it): only the LargeMessage
 * struct and the slot are written (plus the CRC, without the GIL when big), and the loan ends;
 * its views stay valid (and keep its chunk from being allocated again). The chunk is reserved
 * with the GIL held (lane_reserve reads the loan views), the copy runs without it: only this
 * lane's own thread adds loan views, so none can appear meanwhile. */
static HOT int lane_write(LaneObject *L, const outmsg_t *m, int loan, const char **why)
{
    int r = RG_OK;
    prod_res_t res = {0, 0, 0, 0, 0};
    if (loan) {
        if ((m->flags & FLAG_CHECKSUM) && m->plen >= NOGIL_COPY_BYTES) {
            Py_BEGIN_ALLOW_THREADS
            prod_write_at(&L->req, m, &L->loan_res);
            Py_END_ALLOW_THREADS
        } else {
            prod_write_at(&L->req, m, &L->loan_res);
        }
        L->loan_active = 0;
        L->loan_buf = NULL; /* its views stay valid (and keep the mapping and the chunk) */
    } else if (m->payload) {
        r = lane_reserve(L, m->plen, &res, why);
        if (r == RG_OK && m->plen >= NOGIL_COPY_BYTES) {
            Py_BEGIN_ALLOW_THREADS
            prod_write_at(&L->req, m, &res);
            Py_END_ALLOW_THREADS
        } else if (r == RG_OK) {
            prod_write_at(&L->req, m, &res);
        }
    } else {
        prod_write_at(&L->req, m, &res);
    }
    return r;
}

static const char *const call_kw[] = {"capability", "opcode",     "flags", "data",
                                      "payload",    "timeout_ns", NULL};
static const char *const send_kw[] = {"capability", "opcode", "flags", "data", "payload", NULL};

/* The body of call() and call_loan(): write (waiting for room), publish, wait for the reply. */
static HOT PyObject *lane_call_run(LaneObject *L, outmsg_t *m, Py_buffer *view, const charge_t *c,
                               int64_t timeout_ns, int loan)
{
    /* The round trip for the metrics (lat_*); CLOCK_MONOTONIC only for a timeout. */
    lat_t t0 = lat_start();
    uint64_t deadline = deadline_after(timeout_ns);
    uint64_t tag = L->last_tag + 1;
    m->tag = tag;
    const char *why = NULL;
    PyObject *result = NULL;
    uint32_t st;
    L->busy = 1;

    /* 1. Room in the request ring and arena. The server never wakes producers, so poll with
     * short sleeps (10 us doubling to 1 ms) until the deadline. (A loan has its arena chunk.) */
    long backoff_ns = 10000;
    for (;;) {
        uint64_t nfree;
        if (prod_slots_free(&L->req, 1, &nfree, &why) != RG_OK) {
            lane_break(L, why);
            goto out;
        }
        if (nfree > 0) {
            int r = lane_write(L, m, loan, &why);
            if (r == RG_OK)
                break;
            if (r == RG_CORRUPT) {
                lane_break(L, why);
                goto out;
            }
            if (r == RG_PINNED) { /* waiting would not help: this thread holds the view */
                lane_refused(L, 1);
                PyErr_SetString(WouldBlock, pinned_msg);
                goto out;
            }
        }
        st = lane_state(L);
        if (st != STATE_OPEN) {
            raise_for_state(st, "server");
            goto out;
        }
        if (now_ns() >= deadline) {
            lane_stat(L, CSTATS_TIMEOUTS_OFF, 1);
            PyErr_SetString(Timeout, "timed out waiting for room in the request ring");
            goto out;
        }
        struct timespec ts = {0, backoff_ns};
        Py_BEGIN_ALLOW_THREADS
        nanosleep(&ts, NULL);
        Py_END_ALLOW_THREADS
        if (backoff_ns < 1000000)
            backoff_ns *= 2;
        if (PyErr_CheckSignals() < 0)
            goto out;
    }
    release_view(view);
    if (c->enforce)
        bucket_take(&L->bucket, &c->l, m->plen);
    L->last_tag = L->call_tag = tag;
    prod_publish(&L->req);
    lane_ring_doorbell(L);
    lane_count_sent(L, 1, m->plen, 1, coarse_ns());

    /* 2. The reply. */
    for (;;) {
        int r = lane_take_reply(L, tag, &result);
        if (r != 0)
            goto got;
        st = lane_state(L);
        if (st != STATE_OPEN) {
            /* A reply published before the state change is still delivered. */
            r = lane_take_reply(L, tag, &result);
            if (r != 0)
                goto got;
            lane_cancel(L, tag);
            raise_for_state(st, "server");
            goto out;
        }
        if (deadline != UINT64_MAX && now_ns() >= deadline) {
            lane_cancel(L, tag);
            lane_stat(L, CSTATS_TIMEOUTS_OFF, 1);
            PyErr_Format(Timeout, "no reply within %lld ns", (long long)timeout_ns);
            goto out;
        }
        Py_BEGIN_ALLOW_THREADS
        lane_wait(L, deadline);
        Py_END_ALLOW_THREADS
        if (PyErr_CheckSignals() < 0) {
            lane_cancel(L, tag);
            goto out;
        }
    }
got:
    if (result)
        lane_count_latency(L, lat_elapsed(&t0));
out:
    release_view(view);
    L->busy = 0;
    return result;
}

/* call(capability, opcode, flags, data, payload=None, timeout_ns=-1) -> Message */
static PyObject *Lane_call(LaneObject *L, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames)
{
    PyObject *a[6];
    int64_t timeout_ns;
    if (fast_args("call", args, nargs, kwnames, call_kw, 4, a) < 0 ||
        to_i64_timeout(a[5], &timeout_ns) < 0)
        return NULL;
    outmsg_t m;
    Py_buffer view;
    charge_t c;
    if (lane_prepare(L, a, FLAG_REPLY_EXPECTED, &m, &view, &c) < 0)
        return NULL;
    return lane_call_run(L, &m, &view, &c, timeout_ns, 0);
}

/* Push one prepared message without waiting: RG_OK (published, doorbell rung, counted as sent
 * at `now`), RG_FULL / RG_PINNED (refused, counted) or -1 with an exception (the lane is
 * broken). */
static int lane_push(LaneObject *L, outmsg_t *m, const charge_t *c, int loan, uint64_t now)
{
    const char *why = NULL;
    uint64_t nfree;
    m->tag = L->last_tag + 1;
    L->busy = 1;
    int r = prod_slots_free(&L->req, 1, &nfree, &why);
    if (r == RG_OK && nfree == 0)
        r = RG_FULL;
    if (r == RG_OK)
        r = lane_write(L, m, loan, &why);
    L->busy = 0;
    if (r == RG_OK) {
        if (c->enforce)
            bucket_take(&L->bucket, &c->l, m->plen);
        L->last_tag = m->tag;
        prod_publish(&L->req);
        lane_ring_doorbell(L);
        lane_count_sent(L, 1, m->plen, (m->flags & FLAG_REPLY_EXPECTED) != 0, now);
        return RG_OK;
    }
    if (r == RG_FULL || r == RG_PINNED) {
        lane_refused(L, 1);
        return r;
    }
    lane_break(L, why);
    return -1;
}

/* Push a prepared one-way message: None, WouldBlock (refused, counted), or the lane's error. */
static PyObject *lane_send_prepared(LaneObject *L, outmsg_t *m, Py_buffer *view, const charge_t *c)
{
    int r = lane_push(L, m, c, 0, coarse_ns());
    release_view(view);
    if (r == RG_OK)
        Py_RETURN_NONE;
    if (r == RG_FULL)
        PyErr_SetString(WouldBlock, "request ring or arena is full");
    else if (r == RG_PINNED)
        PyErr_SetString(WouldBlock, pinned_msg);
    return NULL;
}

/* send(capability, opcode, flags, data, payload=None): one-way, never blocks. */
static PyObject *Lane_send(LaneObject *L, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames)
{
    PyObject *a[5];
    if (fast_args("send", args, nargs, kwnames, send_kw, 4, a) < 0)
        return NULL;
    outmsg_t m;
    Py_buffer view;
    charge_t c;
    if (lane_prepare(L, a, 0, &m, &view, &c) < 0)
        return NULL;
    return lane_send_prepared(L, &m, &view, &c);
}

/* call_start(capability, opcode, flags, data, payload=None) -> tag: a call that does not wait. */
static PyObject *Lane_call_start(LaneObject *L, PyObject *const *args, Py_ssize_t nargs,
                                 PyObject *kwnames)
{
    PyObject *a[5];
    if (fast_args("call_start", args, nargs, kwnames, send_kw, 4, a) < 0)
        return NULL;
    outmsg_t m;
    Py_buffer view;
    charge_t c;
    if (lane_prepare(L, a, FLAG_REPLY_EXPECTED, &m, &view, &c) < 0)
        return NULL;
    uint64_t t0 = now_ns();
    int r = lane_push(L, &m, &c, 0, t0);
    release_view(&view);
    if (r == RG_OK) {
        L->call_tag = m.tag;
        L->call_t0 = t0;
        return PyLong_FromUnsignedLongLong(m.tag);
    }
    if (r == RG_FULL)
        PyErr_SetString(WouldBlock, "request ring or arena is full");
    else if (r == RG_PINNED)
        PyErr_SetString(WouldBlock, pinned_msg);
    return NULL;
}

/* ---- Loans: payloads written in place. ------------------------------------------------------ */

/* Give the loaned chunk back (nothing was committed, the cursor never moved: forgetting the
 * reservation is the roll-back). Its views stay valid: while one lives, lane_reserve will not
 * hand that memory out again. No-op without a loan. */
static void lane_cancel_loan(LaneObject *L)
{
    if (!L->loan_active)
        return;
    L->loan_active = 0;
    L->loan_buf = NULL;
}

/* loan(n) -> writable memoryview of exactly n bytes in the request arena. */
static PyObject *Lane_loan(LaneObject *L, PyObject *arg)
{
    uint64_t n;
    if (to_u64(arg, &n, "n") < 0 || !lane_usable(L))
        return NULL;
    if (L->loan_active) {
        PyErr_SetString(PyExc_RuntimeError,
                        "this lane already has a loan out: commit it (call_loan/send_loan) or "
                        "cancel_loan() first");
        return NULL;
    }
    if (n > L->max_payload) {
        lane_stat(L, CSTATS_REFUSED_SIZE_OFF, 1);
        PyErr_Format(MessageTooLarge, "a loan of %llu bytes exceeds the maximum of %llu bytes",
                     (unsigned long long)n, (unsigned long long)L->max_payload);
        return NULL;
    }
    uint32_t st = lane_state(L);
    if (st != STATE_OPEN) {
        raise_for_state(st, "server");
        return NULL;
    }
    if (__builtin_expect(ctrl_flags(L->ctrl) & CTRL_F_ENFORCE, 0)) {
        /* Fail before the caller fills a payload the capability would refuse anyway. */
        limits_t l;
        ctrl_limits(L->ctrl, &l);
        if (l.max_size && n > l.max_size) {
            lane_refuse(L, LIM_SIZE, &l, n, 1);
            return NULL;
        }
    }
    const char *why = NULL;
    prod_res_t res;
    int r = lane_reserve(L, n, &res, &why);
    if (r == RG_CORRUPT) {
        lane_break(L, why);
        return NULL;
    }
    if (r == RG_PINNED) {
        lane_refused(L, 1);
        PyErr_SetString(WouldBlock, pinned_msg);
        return NULL;
    }
    if (r == RG_FULL) {
        lane_refused(L, 1);
        PyErr_SetString(WouldBlock,
                        "the arena for this channel is full: the receiver still holds earlier "
                        "payloads");
        return NULL;
    }
    ZBufObject *E;
    PyObject *mv = zb_view((PyObject *)L, prod_res_payload(&L->req, &res, n), n, 0, &E);
    if (!mv)
        return NULL;
    E->lane_pin = 1;
    E->coff = res.off;
    E->clen = res.len;
    E->next = L->bufs;
    if (L->bufs)
        L->bufs->prev = E;
    L->bufs = E;
    L->pins++;
    L->loan_buf = E;
    L->loan_res = res;
    L->loan_len = n;
    L->loan_active = 1;
    return mv;
}

/* cancel_loan(): give the loaned chunk back (reserved until its views go). No-op without one. */
static PyObject *Lane_cancel_loan(LaneObject *L, PyObject *unused)
{
    if (L->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Lane used from two threads at once (one per thread)");
        return NULL;
    }
    lane_cancel_loan(L);
    Py_RETURN_NONE;
}

/* Parse and check a loan commit (capability, opcode, flags, data); nothing is written. The loan
 * stays out when this fails. */
static int lane_prepare_loan(LaneObject *L, PyObject *const *a, uint32_t extra, outmsg_t *m,
                             charge_t *c)
{
    if (!lane_usable(L))
        return -1;
    if (to_u64(a[0], &m->capability, "capability") < 0 || to_u32(a[1], &m->opcode, "opcode") < 0 ||
        parse_flags(a[2], &m->flags, extra | FLAG_LOANED) < 0 || parse_data(a[3], m->data) < 0)
        return -1;
    if (!L->loan_active) {
        PyErr_SetString(PyExc_RuntimeError, "no loan is out on this lane: call loan(n) first");
        return -1;
    }
    uint32_t st = lane_state(L);
    if (st != STATE_OPEN) {
        raise_for_state(st, "server");
        return -1;
    }
    m->plen = L->loan_len;
    m->payload = (const uint8_t *)prod_res_payload(&L->req, &L->loan_res, m->plen);
    if (m->plen > LM_INLINE_SIZE)
        m->flags |= FLAG_LARGE;
    c->enforce = __builtin_expect(ctrl_flags(L->ctrl) & CTRL_F_ENFORCE, 0) != 0;
    if (c->enforce && lane_check(L, c, m->plen) < 0)
        return -1;
    return 0;
}

/* call_loan(capability, opcode, flags, data, timeout_ns=-1) -> Message */
static PyObject *Lane_call_loan(LaneObject *L, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames)
{
    static const char *const kw[] = {"capability", "opcode", "flags", "data", "timeout_ns", NULL};
    PyObject *a[5];
    int64_t timeout_ns;
    if (fast_args("call_loan", args, nargs, kwnames, kw, 4, a) < 0 ||
        to_i64_timeout(a[4], &timeout_ns) < 0)
        return NULL;
    outmsg_t m;
    Py_buffer view;
    view.obj = NULL;
    charge_t c;
    if (lane_prepare_loan(L, a, FLAG_REPLY_EXPECTED, &m, &c) < 0)
        return NULL;
    return lane_call_run(L, &m, &view, &c, timeout_ns, 1);
}

/* send_loan(capability, opcode, flags, data) -> None; WouldBlock (the loan stays out) if the
 * request ring is full. */
static PyObject *Lane_send_loan(LaneObject *L, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames)
{
    static const char *const kw[] = {"capability", "opcode", "flags", "data", NULL};
    PyObject *a[4];
    if (fast_args("send_loan", args, nargs, kwnames, kw, 4, a) < 0)
        return NULL;
    outmsg_t m;
    charge_t c;
    if (lane_prepare_loan(L, a, 0, &m, &c) < 0)
        return NULL;
    int r = lane_push(L, &m, &c, 1, coarse_ns());
    if (r == RG_OK)
        Py_RETURN_NONE;
    if (r == RG_FULL)
        PyErr_SetString(WouldBlock, "request ring is full (the loan is still out)");
    return NULL;
}

/* call_poll(tag, arm=False) -> Message | None: the reply of a call_start, if it is there. */
static PyObject *Lane_call_poll(LaneObject *L, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames)
{
    static const char *const kw[] = {"tag", "arm", NULL};
    PyObject *a[2];
    uint64_t tag;
    if (fast_args("call_poll", args, nargs, kwnames, kw, 1, a) < 0 ||
        to_u64(a[0], &tag, "tag") < 0)
        return NULL;
    int arm = a[1] ? PyObject_IsTrue(a[1]) : 0;
    if (arm < 0 || !lane_usable(L))
        return NULL;
    if (tag == 0 || tag != L->call_tag) {
        PyErr_Format(PyExc_ValueError, "tag %llu is not this lane's latest call (%llu)",
                     (unsigned long long)tag, (unsigned long long)L->call_tag);
        return NULL;
    }
    PyObject *result = NULL;
    L->busy = 1; /* take_payload may drop the GIL for a big payload */
    int r = lane_take_reply(L, tag, &result);
    if (r == 0) {
        uint32_t st = lane_state(L);
        if (st != STATE_OPEN) {
            /* A reply published before the state change is still delivered. */
            r = lane_take_reply(L, tag, &result);
            if (r == 0) {
                lane_cancel(L, tag);
                raise_for_state(st, "server");
                r = -1;
            }
        } else if (arm) {
            /* Empty the eventfd first: a write before this belongs to a reply we are about to
             * see below, and a stale count would only wake the event loop for nothing. Then
             * RELAXED store + SEQ_CST fence + re-check, the Dekker half matching the server's
             * "publish; fence; load consumer flags" in ss_write_reply: either the server sees the
             * flag and writes the eventfd, or we see its reply here. */
            if (L->reply_efd >= 0)
                efd_drain(L->reply_efd);
            __atomic_store_n(ring_u32(L->resp.ring, RING_CONSUMER_EVENT_OFF), 1, __ATOMIC_RELAXED);
            L->armed = 1;
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            r = lane_take_reply(L, tag, &result);
            if (r == 0 && lane_state(L) != STATE_OPEN) {
                /* The kernel changed the state after our first look: report it now rather than
                 * rely on a wake-up the kernel sends to futex sleepers, not to eventfds. */
                r = lane_take_reply(L, tag, &result);
                if (r == 0) {
                    lane_cancel(L, tag);
                    raise_for_state(lane_state(L), "server");
                    r = -1;
                }
            }
        }
    }
    L->busy = 0;
    if (r < 0)
        return NULL;
    if (r == 0)
        Py_RETURN_NONE;
    lane_count_latency(L, now_ns() - L->call_t0);
    return result;
}

/* cancel(tag): the call with this tag (and every earlier one) will not be waited for. */
static PyObject *Lane_cancel(LaneObject *L, PyObject *arg)
{
    uint64_t tag;
    if (to_u64(arg, &tag, "tag") < 0 || !lane_usable(L))
        return NULL;
    if (tag > L->last_tag) {
        PyErr_Format(PyExc_ValueError, "tag %llu was never sent (last tag %llu)",
                     (unsigned long long)tag, (unsigned long long)L->last_tag);
        return NULL;
    }
    lane_cancel(L, tag);
    Py_RETURN_NONE;
}

/* send_many(capability, flags, [(opcode, data[, payload]), ...]) -> accepted count.
 * Every message that could fit is parsed and checked first (nothing is written if one is bad),
 * then they are written in order until the ring, the arena or the rate/bandwidth buckets say
 * stop, and published with one tail store and one doorbell ring. Runs entirely under the GIL. */
static PyObject *Lane_send_many(LaneObject *L, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError,
                        "send_many(capability, flags, [(opcode, data[, payload]), ...])");
        return NULL;
    }
    if (!lane_usable(L))
        return NULL;
    uint64_t cap;
    uint32_t flags;
    if (to_u64(args[0], &cap, "capability") < 0 || parse_flags(args[1], &flags, 0) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(args[2], "send_many expects a list or tuple of tuples");
    if (!seq)
        return NULL;
    Py_ssize_t total = PySequence_Fast_GET_SIZE(seq), n = total;
    uint32_t st = lane_state(L);
    if (st != STATE_OPEN) {
        raise_for_state(st, "server");
        Py_DECREF(seq);
        return NULL;
    }
    limits_t l;
    uint64_t now = 0;
    int enf = lane_limits_batch(L, &l, &now);
    if (enf < 0) {
        Py_DECREF(seq);
        return NULL;
    }
    const char *why = NULL;
    uint64_t nfree;
    /* Enough room for the whole batch, or for more than one batch can take: either way `full`
     * below is decided as with a fresh head. */
    uint64_t want = (uint64_t)total <= BATCH_MAX ? (uint64_t)total : BATCH_MAX + 1;
    if (prod_slots_free(&L->req, want, &nfree, &why) != RG_OK) {
        lane_break(L, why);
        Py_DECREF(seq);
        return NULL;
    }
    uint64_t room = nfree < BATCH_MAX ? nfree : BATCH_MAX;
    int full = (uint64_t)total > nfree && nfree <= BATCH_MAX; /* the ring cannot take them all */
    if ((uint64_t)n > room)
        n = (Py_ssize_t)room;
    Py_ssize_t parsed = 0, written = 0;
    for (; parsed < n; parsed++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, parsed);
        if (!PyTuple_Check(item) || (PyTuple_GET_SIZE(item) != 2 && PyTuple_GET_SIZE(item) != 3)) {
            PyErr_SetString(PyExc_TypeError,
                            "send_many items are tuples (opcode, data) or (opcode, data, payload)");
            goto fail;
        }
        outmsg_t *m = &L->batch[parsed];
        m->capability = cap;
        m->flags = flags;
        if (to_u32(PyTuple_GET_ITEM(item, 0), &m->opcode, "opcode") < 0 ||
            parse_data(PyTuple_GET_ITEM(item, 1), m->data) < 0)
            goto fail;
        if (parse_payload(PyTuple_GET_SIZE(item) == 3 ? PyTuple_GET_ITEM(item, 2) : Py_None, m,
                          &L->views[parsed], L->max_payload, 0) < 0) {
            if (PyErr_ExceptionMatches(MessageTooLarge))
                lane_stat(L, CSTATS_REFUSED_SIZE_OFF, 1);
            goto fail;
        }
        if (L->loan_active && m->payload) {
            PyErr_SetString(PyExc_RuntimeError,
                            "a loan is out on this lane: commit it (call_loan/send_loan) or "
                            "cancel_loan() before sending another payload");
            parsed++; /* its view is held: release it below */
            goto fail;
        }
        if (enf && l.max_size && m->plen > l.max_size) {
            lane_refuse(L, LIM_SIZE, &l, m->plen, 1);
            parsed++; /* its view is held: release it below */
            goto fail;
        }
    }
    int limited = 0; /* stopped by the rate/bandwidth buckets */
    int lim = LIM_OK;
    uint64_t bytes = 0;
    L->busy = 1;
    for (; written < n; written++) {
        outmsg_t *m = &L->batch[written];
        if (enf && (lim = bucket_check(&L->bucket, &l, now, m->plen)) != LIM_OK) {
            limited = 1;
            break;
        }
        m->tag = L->last_tag + 1;
        prod_res_t res = {0, 0, 0, 0, 0};
        int r = m->payload ? lane_reserve(L, m->plen, &res, &why) : RG_OK;
        if (r == RG_OK)
            prod_write_at(&L->req, m, &res);
        if (r == RG_FULL || r == RG_PINNED) {
            full = 1;
            break;
        }
        if (r == RG_CORRUPT) {
            L->busy = 0;
            lane_break(L, why);
            goto fail;
        }
        if (enf)
            bucket_take(&L->bucket, &l, m->plen);
        bytes += m->plen;
        L->last_tag++;
    }
    L->busy = 0;
    for (Py_ssize_t i = 0; i < parsed; i++)
        release_view(&L->views[i]);
    Py_DECREF(seq);
    if (written) {
        prod_publish(&L->req);
        lane_ring_doorbell(L);
        lane_count_sent(L, (uint64_t)written, bytes, 0, coarse_ns()); /* once per batch */
    }
    if (full && !limited && written < total)
        lane_refused(L, (uint64_t)(total - written));
    if (limited)
        lane_stat(L, CSTATS_REFUSED_RATE_OFF, (uint64_t)(total - written));
    if (limited && written == 0) {
        raise_limit(lim, &l, 0);
        return NULL;
    }
    return PyLong_FromSsize_t(written);
fail:
    for (Py_ssize_t i = 0; i < parsed; i++)
        release_view(&L->views[i]);
    Py_DECREF(seq);
    /* Anything written before a corruption was detected is abandoned with the lane. */
    return NULL;
}

static PyObject *Lane_close(LaneObject *L, PyObject *unused)
{
    if (L->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Lane is in use by another thread");
        return NULL;
    }
    lane_unmap(L); /* cancels the loan; loan views keep the channel mapped until they go */
    Py_RETURN_NONE;
}

/* mark(state): the runtime's own verdict on this channel (STATE_PEER_DEAD: the server's pidfd
 * said it exited; STATE_CLOSED: given up at a reconnect), for when no kernel will write the
 * control page. Wakes a caller asleep on the reply futex; one asleep in its reply-sleep pipe
 * sees end of file (a dead server) or the watchdog's kick. A mark never goes back to OPEN. */
static PyObject *Lane_mark(LaneObject *L, PyObject *arg)
{
    unsigned long st = PyLong_AsUnsignedLong(arg);
    if (st == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (st != STATE_PEER_DEAD && st != STATE_CLOSED && st != STATE_REVOKED) {
        PyErr_SetString(PyExc_ValueError, "mark(state): STATE_PEER_DEAD, STATE_REVOKED or STATE_CLOSED");
        return NULL;
    }
    uint32_t zero = 0;
    __atomic_compare_exchange_n(&L->local_state, &zero, (uint32_t)st, 0, __ATOMIC_SEQ_CST,
                                __ATOMIC_SEQ_CST);
    if (L->chan)
        sys_futex_wake((const uint32_t *)ring_u64(L->resp.ring, RING_TAIL_OFF), INT_MAX);
    Py_RETURN_NONE;
}

static PyObject *Lane_get_marked(LaneObject *L, void *c)
{
    return PyLong_FromUnsignedLong(__atomic_load_n(&L->local_state, __ATOMIC_RELAXED));
}

static PyObject *Lane_get_index(LaneObject *L, void *c) { return PyLong_FromUnsignedLong(L->index); }
static PyObject *Lane_get_broken(LaneObject *L, void *c) { return PyBool_FromLong(L->broken); }
static PyObject *Lane_get_closed(LaneObject *L, void *c) { return PyBool_FromLong(!L->chan); }
static PyObject *Lane_get_last_tag(LaneObject *L, void *c)
{
    return PyLong_FromUnsignedLongLong(L->last_tag);
}
static PyObject *Lane_get_max_payload(LaneObject *L, void *c)
{
    return PyLong_FromUnsignedLongLong(L->max_payload);
}
static PyObject *Lane_get_refused(LaneObject *L, void *c)
{
    return PyLong_FromUnsignedLongLong(L->refused);
}
static PyObject *Lane_get_loaned(LaneObject *L, void *c)
{
    if (!L->loan_active)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(L->loan_len);
}

static PyMethodDef Lane_methods[] = {
    {"call", (PyCFunction)(void (*)(void))Lane_call, METH_FASTCALL | METH_KEYWORDS,
     "call(capability, opcode, flags, data, payload=None, timeout_ns=-1) -> Message\n"
     "(opcode, flags, d0, d1, d2, d3, payload or None)"},
    {"send", (PyCFunction)(void (*)(void))Lane_send, METH_FASTCALL | METH_KEYWORDS,
     "send(capability, opcode, flags, data, payload=None) -> None; WouldBlock if full"},
    {"send_many", (PyCFunction)(void (*)(void))Lane_send_many, METH_FASTCALL,
     "send_many(capability, flags, [(opcode, data[, payload]), ...]) -> int accepted"},
    {"call_start", (PyCFunction)(void (*)(void))Lane_call_start, METH_FASTCALL | METH_KEYWORDS,
     "call_start(capability, opcode, flags, data, payload=None) -> tag; WouldBlock if full"},
    {"call_poll", (PyCFunction)(void (*)(void))Lane_call_poll, METH_FASTCALL | METH_KEYWORDS,
     "call_poll(tag, arm=False) -> Message or None"},
    {"cancel", (PyCFunction)Lane_cancel, METH_O,
     "cancel(tag): the call with this tag (and every earlier one) is not waited for any more"},
    {"loan", (PyCFunction)Lane_loan, METH_O,
     "loan(n) -> writable memoryview of n bytes in the request arena (one loan at a time);\n"
     "WouldBlock if the arena is full, MessageTooLarge if n is too big"},
    {"call_loan", (PyCFunction)(void (*)(void))Lane_call_loan, METH_FASTCALL | METH_KEYWORDS,
     "call_loan(capability, opcode, flags, data, timeout_ns=-1) -> Message: the loan is the "
     "payload (no copy)"},
    {"send_loan", (PyCFunction)(void (*)(void))Lane_send_loan, METH_FASTCALL | METH_KEYWORDS,
     "send_loan(capability, opcode, flags, data) -> None: one-way, the loan is the payload; "
     "WouldBlock if the ring is full (the loan stays out)"},
    {"cancel_loan", (PyCFunction)Lane_cancel_loan, METH_NOARGS,
     "cancel_loan(): give the loaned chunk back (its views are released); no-op without a loan"},
    {"close", (PyCFunction)Lane_close, METH_NOARGS, "Unmap everything; the Lane is unusable."},
    {"mark", (PyCFunction)Lane_mark, METH_O,
     "mark(state): treat the channel as in `state` (STATE_PEER_DEAD, ...) from now on, whatever "
     "the control page says, and wake a caller waiting for its reply"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Lane_getset[] = {
    {"index", (getter)Lane_get_index, NULL, "doorbell index of this channel", NULL},
    {"broken", (getter)Lane_get_broken, NULL, "True after a protocol error", NULL},
    {"closed", (getter)Lane_get_closed, NULL, "True after close()", NULL},
    {"marked", (getter)Lane_get_marked, NULL, "the state mark() set, or 0", NULL},
    {"last_tag", (getter)Lane_get_last_tag, NULL, "tag of the last request sent", NULL},
    {"max_payload", (getter)Lane_get_max_payload, NULL, "largest payload in bytes", NULL},
    {"refused", (getter)Lane_get_refused, NULL,
     "messages send/send_many/call_start/send_loan/loan refused because the ring or arena was "
     "full", NULL},
    {"loaned", (getter)Lane_get_loaned, NULL, "bytes of the loan that is out, or None", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "capbus._core.Lane",
    .tp_basicsize = sizeof(LaneObject),
    .tp_dealloc = (destructor)Lane_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Lane(chan_fd, ctrl_fd, doorbell_fd, index, nslots=256, arena_size=128 MiB, "
              "wait_mode=1, spin_ns=50000, bell_event_fd=-1, reply_event_fd=-1, bell_sleep_fd=-1, "
              "reply_sleep_fd=-1): the client end of a channel.",
    .tp_methods = Lane_methods,
    .tp_getset = Lane_getset,
    .tp_init = (initproc)Lane_init,
    .tp_new = Lane_new,
};

/* =============================================================================================
 * ServerSet: the service end, up to MAX_CHANNELS channels by index.
 *
 * The doorbell is writable by every client, so nothing in it is trusted:
 *   - the ready bitmap is only a hint: bits for indices that are not (alive) channels of this
 *     set are ignored, a set bit on an empty ring costs one tail load, and a cleared bit is
 *     recovered by a full scan of every ring, which runs before every sleep and at least every
 *     FULL_SCAN_NS while busy (the rings are the truth);
 *   - seq only tells a waiting server "look again": a scribbled seq causes spurious scans (bounded
 *     CPU, deadlines still honoured) or a missed wake-up;
 *   - a missed wake-up (server_sleeping scribbled to 0, seq held constant) is bounded by the
 *     SLEEP_CAP_NS cap on every timed futex sleep, and by the sleep watchdog (below) for the
 *     untimed ones: it costs at most about that much latency, never a hang;
 *   - event_wanted (poll_armed): a client that sets it, or writes the service's eventfd (even
 *     its saturating maximum: honest writes then fail with EAGAIN, and the counter is non-zero
 *     anyway), only causes spurious wake-ups of the event loop (poll_armed then finds nothing,
 *     empties the eventfd and re-arms). A client that CLEARS the flag, or reads the shared
 *     eventfd empty, can make a wake-up go missing: like a cleared server_sleeping, that costs
 *     latency, and an event loop bounds it the same way (it re-polls at least every
 *     SLEEP_CAP_NS while armed).
 *
 * The table has two halves: channel indices 0..MAX_CHANNELS-1, and as many drain slots, where
 * remove(index, drain=True) parks a closed channel while its last requests are delivered (the
 * kernel may hand its index to a new channel at once). Drain slots are found by full scans only.
 *
 * Threads: one recv/poll/recv_many at a time (recv_mu, waited for without the GIL when held).
 * reply() may run in any thread; per channel, replies are serialised by the channel's lock. Both
 * are gil_lock_t: taken only with the GIL, so a free one costs no locked instruction. add(),
 * remove() and the bookkeeping below run under the GIL. recv scans without the GIL, so remove()
 * never unmaps a channel while a recv is running or a reply is using it: it parks the channel on
 * a graveyard list, freed by whoever is last out.
 * ============================================================================================= */

/* A lock that is only ever TAKEN by a thread holding the GIL (recv_mu, a channel's reply lock).
 * The GIL serialises every acquisition, so taking a free lock is a load and a store: no locked
 * instruction, no library call. The holder may then let the GIL go (recv sleeps, a big reply is
 * copied) and may release the lock without it. A thread that finds the lock held waits with the
 * GIL released and tries again with it (the free-threaded build has no GIL: see the check at
 * the top of this file). */
typedef struct {
    uint32_t held;    /* atomic: 0 or 1 */
    uint32_t waiters; /* threads in gl_acquire's wait (changed under the GIL) */
} gil_lock_t;

static inline int gl_try(gil_lock_t *l) /* GIL held */
{
    /* ACQUIRE: the previous holder's writes (RELEASEd in gl_release, possibly without the GIL)
     * are visible to us. No other thread can take it between the load and the store. */
    if (__atomic_load_n(&l->held, __ATOMIC_ACQUIRE))
        return 0;
    __atomic_store_n(&l->held, 1, __ATOMIC_RELAXED);
    return 1;
}

/* GIL held on entry and exit; released while the lock is held by another thread. */
static void gl_acquire(gil_lock_t *l)
{
    if (gl_try(l))
        return;
    l->waiters++;
    do {
        /* The holder wakes the word when it lets go and sees a waiter; the 1 ms bound makes a
         * wake-up lost to the unordered read of `waiters` cost 1 ms, not a hang. */
        Py_BEGIN_ALLOW_THREADS
        sys_futex_wait(&l->held, 1, 1000000, 0);
        Py_END_ALLOW_THREADS
    } while (!gl_try(l));
    l->waiters--;
}

static inline void gl_release(gil_lock_t *l) /* with or without the GIL */
{
    __atomic_store_n(&l->held, 0, __ATOMIC_RELEASE); /* RELEASE: pairs with gl_try's ACQUIRE */
    if (__atomic_load_n(&l->waiters, __ATOMIC_RELAXED))
        sys_futex_wake(&l->held, 1);
}

#define TABLE_SLOTS (2 * MAX_CHANNELS)
#define TABLE_WORDS (TABLE_SLOTS / 64)

typedef struct chan {
    char *map;
    size_t map_len;
    char *ctrl;
    uint32_t index;     /* the channel index the kernel gave it */
    uint32_t slot;      /* its place in the table: index, or a drain slot >= MAX_CHANNELS */
    uint64_t serial;    /* unique per add() in this set: a Request names its channel by it */
    uint64_t sender_id;
    uint64_t generation; /* the kernel's name of this channel instance (add(generation=)) */
    cons_t req;         /* consumer of the client's requests (recv thread only) */
    prod_t resp;        /* producer of replies (under lock) */
    uint64_t last_tag;  /* request tags must increase */
    uint64_t drain_end; /* draining: deliver requests below this tail, then retire */
    int draining;       /* atomic: set (GIL) before the channel is published in its drain
                           slot; read by recv, which may be scanning without the GIL */
    int dead;           /* corrupt: never read again (atomic) */
    int removed;        /* GIL */
    const char *report_why; /* a reply found it corrupt (static string; GIL): see ss_defer_report */
    int reported;       /* ... and recv has raised that (GIL) */
    int users;          /* reply() calls using the mapping (GIL) */
    gil_lock_t lock;    /* serialises replies (gl_*) */
    int reply_efd;      /* our duplicate of the client's reply eventfd, or -1 */
    int rs_wfd;         /* the write end of the client's reply-sleep pipe (non-blocking), or -1 */
    int rs_keep;        /* its read end, never read: a write never raises SIGPIPE (or -1) */
    /* Server-private token buckets (recv thread only; see "Buckets per capability" in
     * _core_limits.h): the leaf's (CTRL_CAP_ID_OFF: a shared one, or `own` for id 0) and its
     * limited ancestors', all resolved in add(). Every message is charged to each. */
    bucket_t *leaf;
    cbkt_t *leaf_c;     /* the shared leaf bucket (pinned), or NULL */
    uint32_t nanc;
    struct {
        cbkt_t *c;      /* pinned */
        uint64_t rate, bw;
    } anc[CTRL_CHAIN_MAX];
    bucket_t own;
    uint64_t drops[LIM_NREASONS]; /* refused by the limits, per reason (GIL) */
    struct chan *next_grave;
    /* Zero-copy receive (all GIL). Chunks consumed since the oldest one still held, in FIFO
     * order: each entry is the release position after its chunk, and whether a Request still
     * holds it (consecutive released chunks share an entry). arena_released is published only
     * as the end of the released prefix. zq_cap entries (a power of two, >= 2 * nslots),
     * allocated at the first zero-copy message; when full the channel is not served until a
     * release: a receiver that never releases stalls only this channel. */
    struct zent *zq;
    uint64_t zq_cap, zq_first, zq_next; /* entries [zq_first, zq_next) by sequence number */
    int zc_blocked;     /* atomic: queue full (read by scans without the GIL) */
    int views;          /* live ZBufs of this channel: the mapping stays while > 0 */
    uint64_t sst[SSTATS_SIZE / 8]; /* the server metrics block (private copy; see stat_add) */
} chan_t;

typedef struct zent {
    uint64_t end;  /* release position after this entry's chunk(s) */
    uint64_t held; /* a Request (its ZBuf) still holds the chunk */
} zent_t;

typedef struct {
    PyObject_HEAD
    char *db;
    int mode;
    uint64_t spin_ns;
    uint64_t spin_cur; /* adaptive: this wait's spin (see spin_won/spin_lost) */
    int recv_active;    /* GIL */
    int interrupt;      /* atomic */
    uint32_t rr;        /* round-robin position (recv only) */
    uint32_t nchan;     /* GIL */
    int event_efd;      /* our duplicate of the service's eventfd, or -1 */
    int sleep_efd;      /* our duplicate of the service's sleep eventfd (blocking), or -1 */
    int efd_off;        /* the sleep eventfd was made non-blocking: futex sleeps only */
    uint64_t last_full_scan;
    /* The sleep watchdog (see wd_*): asleep is 0, or the ticket of the untimed sleep in progress
     * (atomic: the recv thread writes, the watchdog reads); wd_seen is the watchdog's own. */
    uint32_t asleep, sleep_ticket, wd_seen;
    int wd_registered; /* in wd_sets (set by the recv thread, cleared by ss_free_all) */
    unsigned long fork_gen; /* of the process that made it (check_fork) */
    int rescan;           /* atomic: a channel was added (or parked to drain): scan every ring */
    uint64_t next_serial; /* GIL */
    gil_lock_t recv_mu;
    /* A CorruptChannel that recv_many met after it had gathered messages: raised by the next
     * recv/poll/recv_many (recv_mu). pend_why is a static string. */
    int pend_corrupt;
    uint32_t pend_index;
    const char *pend_why;
    uint32_t reports; /* GIL: channels a reply found corrupt, not yet raised (ss_defer_report) */
    chan_t *grave;
    btab_t buckets;     /* GIL: the buckets per capability of every channel, live or parked */
    uint64_t drain_used[MAX_CHANNELS / 64]; /* GIL: drain slots in use */
    uint64_t coarse_now;          /* coarse_ns() of the current receive step (metrics) */
    uint32_t span;                /* atomic: 1 + the highest word of `active` in use (GIL writes) */
    uint64_t active[TABLE_WORDS]; /* alive channels (atomic words; changed under the GIL) */
    uint64_t ready[TABLE_WORDS];  /* recv-private: channels that may have requests */
    chan_t *table[TABLE_SLOTS];   /* atomic pointers */
} ServerSetObject;

/* ---- The sleep watchdog ----------------------------------------------------------------------
 *
 * A server with no deadline sleeps on its doorbell without a timer (a timed FUTEX_WAIT costs
 * ~0.4 us more per sleep on this kind of VM, on every round trip of a blocking call). But the
 * doorbell is writable by every client, so a hostile one can make an honest client's wake-up go
 * missing (it clears server_sleeping, or puts seq back). The timer used to bound that; now one
 * native thread per process does: every WD_TICK_NS it wakes each ServerSet that has been in the
 * SAME untimed sleep since its previous tick, which then rescans every ring and sleeps again.
 * A lost wake-up thus costs at most ~2 ticks (<= SLEEP_CAP_NS) of latency, as before, and an
 * idle server wakes about as often as it did with the timer. The thread never touches Python.
 * wd_mu guards the list; ss_free_all takes the set out of it before unmapping the doorbell. */

#define WD_TICK_NS (SLEEP_CAP_NS / 2)

static ServerSetObject **wd_sets; /* wd_mu */
static size_t wd_n, wd_cap;       /* wd_mu */

static void *wd_main(void *unused)
{
    (void)unused;
    for (;;) {
        struct timespec ts = {0, (long)WD_TICK_NS};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
            ;
        pthread_mutex_lock(&wd_mu);
        for (size_t i = 0; i < wd_n; i++) {
            ServerSetObject *S = wd_sets[i];
            /* RELAXED: a timing heuristic; a stale value costs one spurious wake or one tick. */
            uint32_t a = __atomic_load_n(&S->asleep, __ATOMIC_RELAXED);
            if (a && a == S->wd_seen)
                sys_futex_wake((uint32_t *)(S->db + DB_SEQ_OFF), INT_MAX);
            S->wd_seen = a;
        }
        kick_scan();
        pthread_mutex_unlock(&wd_mu);
    }
    return NULL;
}

/* Start the watchdog thread unless it runs (wd_mu held). 0, or -1 if it cannot. */
static int wd_start_locked(void)
{
    if (wd_running)
        return 0;
    pthread_t th;
    pthread_attr_t attr;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* signals stay with the interpreter's threads */
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    int r = pthread_create(&th, &attr, wd_main, NULL);
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (r != 0)
        return -1;
    wd_running = 1;
    return 0;
}

static void wd_lock(void) { pthread_mutex_lock(&wd_mu); }
static void wd_unlock(void) { pthread_mutex_unlock(&wd_mu); }
/* After fork() the child has no watchdog thread (and wd_mu was held across the fork by
 * wd_lock, so it is consistent): the next untimed sleep in the child starts one. */
static void wd_atfork_child(void)
{
    fork_gen++;
    wd_running = 0;
    /* The parent's sets are not ours to wake (and refuse to work here: check_fork). */
    for (size_t i = 0; i < wd_n; i++)
        wd_sets[i]->wd_registered = 0;
    wd_n = 0;
    kick_atfork_child();
    pthread_mutex_unlock(&wd_mu);
}

/* Put S under the watchdog (recv thread, no GIL needed). 0, or -1 if that is impossible (no
 * memory, no thread): the caller then sleeps with a timer, as it would with a deadline. */
static int wd_register(ServerSetObject *S)
{
    int ok = 0;
    pthread_mutex_lock(&wd_mu);
    if (wd_n == wd_cap) {
        size_t cap = wd_cap ? 2 * wd_cap : 8;
        ServerSetObject **p = realloc(wd_sets, cap * sizeof *p);
        if (!p)
            goto out;
        wd_sets = p;
        wd_cap = cap;
    }
    if (wd_start_locked() < 0)
        goto out;
    S->wd_seen = 0;
    wd_sets[wd_n++] = S;
    S->wd_registered = 1;
    ok = 1;
out:
    pthread_mutex_unlock(&wd_mu);
    return ok ? 0 : -1;
}

static void wd_forget(ServerSetObject *S)
{
    if (!S->wd_registered)
        return;
    pthread_mutex_lock(&wd_mu);
    for (size_t i = 0; i < wd_n; i++)
        if (wd_sets[i] == S) {
            wd_sets[i] = wd_sets[--wd_n];
            break;
        }
    S->wd_registered = 0;
    pthread_mutex_unlock(&wd_mu);
}

static void chan_free(chan_t *ch)
{
    if (ch->map)
        munmap(ch->map, ch->map_len);
    if (ch->ctrl)
        munmap(ch->ctrl, CTRL_SIZE);
    if (ch->reply_efd >= 0)
        close(ch->reply_efd);
    if (ch->rs_wfd >= 0)
        close(ch->rs_wfd);
    if (ch->rs_keep >= 0)
        close(ch->rs_keep);
    PyMem_RawFree(ch->zq);
    PyMem_RawFree(ch);
}

/* Resolve the channel's buckets from its control page (GIL held, once, in add()): the leaf's
 * and its chain's, pinned. -1 with MemoryError (nothing pinned). The kernel wrote the fields
 * before handing the page out; a chain longer than CTRL_CHAIN_MAX is cut (the kernel never
 * writes one). */
static int ch_pin_buckets(ServerSetObject *S, chan_t *ch)
{
    uint64_t now = coarse_ns();
    btab_sweep(&S->buckets, now); /* every add and remove sweeps, with limits or without */
    ch->leaf = &ch->own;
    uint64_t id = __atomic_load_n((uint64_t *)(ch->ctrl + CTRL_CAP_ID_OFF), __ATOMIC_RELAXED);
    if (id && !(ch->leaf_c = btab_pin(&S->buckets, id, now)))
        goto oom;
    uint32_t n = __atomic_load_n((uint32_t *)(ch->ctrl + CTRL_CHAIN_LEN_OFF), __ATOMIC_RELAXED);
    n = n < CTRL_CHAIN_MAX ? n : CTRL_CHAIN_MAX;
    for (uint32_t i = 0; i < n; i++) {
        const uint64_t *e =
            (const uint64_t *)(ch->ctrl + CTRL_CHAIN_OFF + i * CTRL_CHAIN_ENTRY_SIZE);
        uint64_t aid = __atomic_load_n(&e[0], __ATOMIC_RELAXED);
        if (!aid || aid == id)
            continue; /* not a bucket of its own: nothing to share */
        cbkt_t *c = btab_pin(&S->buckets, aid, now);
        if (!c)
            goto oom;
        ch->anc[ch->nanc].c = c;
        ch->anc[ch->nanc].rate = __atomic_load_n(&e[1], __ATOMIC_RELAXED);
        ch->anc[ch->nanc].bw = __atomic_load_n(&e[2], __ATOMIC_RELAXED);
        ch->nanc++;
    }
    if (ch->leaf_c)
        ch->leaf = &ch->leaf_c->b;
    return 0;
oom:
    PyErr_NoMemory();
    return -1;
}

/* The channel lets its buckets go (GIL held; idempotent). */
static void ch_unpin_buckets(ServerSetObject *S, chan_t *ch)
{
    uint64_t now = coarse_ns();
    if (ch->leaf_c)
        btab_unpin(&S->buckets, ch->leaf_c, now);
    for (uint32_t i = 0; i < ch->nanc; i++)
        btab_unpin(&S->buckets, ch->anc[i].c, now);
    ch->leaf_c = NULL;
    ch->nanc = 0;
    ch->leaf = &ch->own;
    btab_sweep(&S->buckets, now);
}

/* Free parked channels nobody uses any more (GIL held). */
static HOT void ss_reap(ServerSetObject *S)
{
    if (S->recv_active)
        return;
    chan_t **pp = &S->grave;
    while (*pp) {
        chan_t *ch = *pp;
        if (ch->users == 0 && ch->views == 0) {
            *pp = ch->next_grave;
            ch_unpin_buckets(S, ch);
            chan_free(ch);
        } else {
            pp = &ch->next_grave;
        }
    }
}

/* How many words of the bitmaps the scans look at (GIL held, after any change of `active`):
 * the kernel hands out low indices first and drain slots are rare, so a set with a few channels
 * scans a word or two, not all TABLE_WORDS. RELAXED: a scan that reads a stale span scans a
 * little more, or misses a channel added this instant for that one scan (add() also asks for a
 * rescan, and the full scans before every sleep catch it). */
static void ss_update_span(ServerSetObject *S)
{
    uint32_t w = TABLE_WORDS;
    while (w > 0 && !__atomic_load_n(&S->active[w - 1], __ATOMIC_RELAXED))
        w--;
    __atomic_store_n(&S->span, w, __ATOMIC_RELAXED);
}

static inline uint32_t ss_span(ServerSetObject *S)
{
    return __atomic_load_n(&S->span, __ATOMIC_RELAXED); /* RELAXED: see ss_update_span */
}

/* Take a slot out of the set of alive ones (GIL held). RELEASE: keeps the clear ordered after
 * anything we did to the channel before, for a scanning recv that ACQUIRE-loads the word. */
static void ss_deactivate(ServerSetObject *S, uint32_t slot)
{
    __atomic_fetch_and(&S->active[slot / 64], ~(1ull << (slot % 64)), __ATOMIC_RELEASE);
    ss_update_span(S);
}

static void ss_mark_dead(ServerSetObject *S, chan_t *ch)
{
    /* RELAXED: read by the same threads under the GIL or by recv, which only reads channels
     * through the active bitmap cleared just after. */
    __atomic_store_n(&ch->dead, 1, __ATOMIC_RELAXED);
    ss_deactivate(S, ch->slot);
}

/* A channel found corrupt outside a receive (a reply met a scribbled response ring): the next
 * recv/poll/recv_many raises its CorruptChannel, so the Service reports it to the kernel as it
 * does for garbage met while receiving. The reply itself just fails (returns False): a hostile
 * client cannot make Request.reply raise in a plain `recv(); reply()` loop. */
static void ss_defer_report(ServerSetObject *S, chan_t *ch, const char *why)
{
    if (ch->report_why)
        return;
    ch->report_why = why ? why : "corrupt response ring";
    S->reports++;
}

/* Take a channel out of the table and park it on the graveyard (GIL held); the caller reaps. */
static void ss_unlink(ServerSetObject *S, chan_t *ch)
{
    uint32_t slot = ch->slot;
    ss_deactivate(S, slot);
    /* RELEASE: pairs with the ACQUIRE pointer loads of a scanning recv (which, having the old
     * pointer, is safe: the memory is parked, not unmapped, while it runs). */
    __atomic_store_n(&S->table[slot], NULL, __ATOMIC_RELEASE);
    if (slot >= MAX_CHANNELS) {
        uint32_t j = slot - MAX_CHANNELS;
        S->drain_used[j / 64] &= ~(1ull << (j % 64));
    } else {
        S->nchan--;
    }
    ch->removed = 1;
    ch->next_grave = S->grave;
    S->grave = ch;
}

/* Wake a sleeping recv: seq bump, futex wake, and the sleep eventfd if it sleeps on that. The
 * seq bump is a full fence: a flag the caller stored before (interrupt) is ordered before the
 * load of server_sleeping, and an eventfd sleeper re-reads it after its own fence (ss_wait), so
 * either it sees the flag or we see SLEEP_EFD. */
static void ss_wake_sleeper(ServerSetObject *S)
{
    uint32_t *seq = (uint32_t *)(S->db + DB_SEQ_OFF);
    __atomic_fetch_add(seq, 1, __ATOMIC_SEQ_CST); /* SEQ_CST: as a client's doorbell ring */
    sys_futex_wake(seq, INT_MAX);
    if (S->sleep_efd >= 0 &&
        __atomic_load_n((uint32_t *)(S->db + DB_SERVER_SLEEPING_OFF), __ATOMIC_RELAXED) ==
            SLEEP_EFD)
        efd_ring(S->sleep_efd);
}

/* Make a waiting recv (or event loop) look again: the sleeper's wake-up, and the eventfd. */
static void ss_kick(ServerSetObject *S)
{
    ss_wake_sleeper(S);
    if (S->event_efd >= 0)
        efd_signal(S->event_efd);
}

/* ---- The held-chunk queue (zero-copy receive; see chan_t). GIL held for all of these. ------ */

static int ch_zq_alloc(chan_t *ch)
{
    uint64_t cap = 64;
    while (cap < 2 * ch->req.nslots)
        cap *= 2;
    ch->zq = PyMem_RawMalloc((size_t)cap * sizeof *ch->zq);
    if (!ch->zq) {
        PyErr_NoMemory();
        return -1;
    }
    ch->zq_cap = cap;
    return 0;
}

static inline int ch_zq_full(const chan_t *ch)
{
    return ch->zq_cap && ch->zq_next - ch->zq_first == ch->zq_cap;
}

/* Consume the message at head (its slot goes back to the client). hold: its chunk stays ours
 * (a zero-copy payload); returns its queue entry. Otherwise the chunk is released: at once when
 * nothing is held (the ordinary path), else behind the held ones. The queue is not full. */
static HOT uint64_t ch_consume(chan_t *ch, const inmsg_t *m, int hold)
{
    if (!hold && (!m->has_payload || ch->zq_first == ch->zq_next)) {
        cons_release(&ch->req, m);
        return 0;
    }
    uint64_t seq = ch->zq_next, mask = ch->zq_cap - 1;
    zent_t *last = seq != ch->zq_first ? &ch->zq[(seq - 1) & mask] : NULL;
    if (!hold && last && !last->held) {
        last->end = m->new_released;
    } else {
        ch->zq[seq & mask].end = m->new_released;
        ch->zq[seq & mask].held = (uint64_t)hold;
        ch->zq_next++;
    }
    cons_consume(&ch->req, m);
    return seq;
}

/* A held chunk is released: publish how far the released prefix now reaches, and serve the
 * channel again if the queue was full. */
static void ch_release_chunk(ServerSetObject *S, chan_t *ch, uint64_t seq)
{
    uint64_t mask = ch->zq_cap - 1;
    if (seq - ch->zq_first >= ch->zq_next - ch->zq_first)
        return; /* not in the queue (cannot happen) */
    ch->zq[seq & mask].held = 0;
    if (seq != ch->zq_first)
        return; /* an older chunk is still held: the producer must not reach this one */
    uint64_t v;
    do {
        v = ch->zq[ch->zq_first & mask].end;
        ch->zq_first++;
    } while (ch->zq_first != ch->zq_next && !ch->zq[ch->zq_first & mask].held);
    cons_publish_released(&ch->req, v);
    /* RELAXED: the flag only steers scans; the kick below makes a waiting recv look again. */
    if (__atomic_load_n(&ch->zc_blocked, __ATOMIC_RELAXED)) {
        __atomic_store_n(&ch->zc_blocked, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&S->rescan, 1, __ATOMIC_RELAXED);
        if (S->db)
            ss_kick(S);
    }
}

static void ss_free_all(ServerSetObject *S)
{
    for (uint32_t i = 0; i < TABLE_SLOTS; i++) {
        chan_t *ch = S->table[i];
        if (!ch)
            continue;
        S->table[i] = NULL;
        ch_unpin_buckets(S, ch);
        if (ch->views) { /* payload views still use its mapping: the last one frees it */
            ch->removed = 1;
            ch->next_grave = S->grave;
            S->grave = ch;
        } else {
            chan_free(ch);
        }
    }
    memset(S->active, 0, sizeof S->active);
    memset(S->drain_used, 0, sizeof S->drain_used);
    S->span = 0;
    S->nchan = 0;
    for (chan_t **pp = &S->grave; *pp;) {
        chan_t *ch = *pp;
        ch_unpin_buckets(S, ch); /* before the table goes: a channel kept by views outlives it */
        if (ch->views) {
            pp = &ch->next_grave;
        } else {
            *pp = ch->next_grave;
            chan_free(ch);
        }
    }
    btab_free(&S->buckets);
    wd_forget(S); /* before the doorbell goes: the watchdog wakes through it */
    if (S->db)
        munmap(S->db, DOORBELL_SIZE);
    S->db = NULL;
    if (S->event_efd >= 0)
        close(S->event_efd);
    if (S->sleep_efd >= 0)
        close(S->sleep_efd);
    S->event_efd = S->sleep_efd = -1;
}

static PyObject *ServerSet_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    ServerSetObject *S = (ServerSetObject *)PyType_GenericNew(type, args, kw);
    if (S)
        S->event_efd = S->sleep_efd = -1; /* never close fd 0 by accident */
    return (PyObject *)S;
}

static void ServerSet_dealloc(ServerSetObject *S)
{
    ss_free_all(S);
    Py_TYPE(S)->tp_free((PyObject *)S);
}

static int ServerSet_init(ServerSetObject *S, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"doorbell_fd", "wait_mode", "spin_ns", "event_fd", "sleep_fd", NULL};
    int db_fd, mode = WAIT_ADAPTIVE, event_fd = -1, sleep_fd = -1;
    long long spin_ns = DEFAULT_SPIN_NS;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "i|iLii:ServerSet", kwlist, &db_fd, &mode,
                                     &spin_ns, &event_fd, &sleep_fd))
        return -1;
    if (S->db) {
        PyErr_SetString(PyExc_RuntimeError, "ServerSet already initialised");
        return -1;
    }
    if (check_wait(mode, spin_ns) < 0)
        return -1;
    int efd = efd_dup(event_fd);
    if (efd == -2)
        return -1;
    int sfd = sleep_fd_dup(sleep_fd, -1);
    if (sfd == -2) {
        if (efd >= 0)
            close(efd);
        return -1;
    }
    S->db = map_memfd(db_fd, DOORBELL_SIZE, 1, "doorbell");
    if (!S->db) {
        if (efd >= 0)
            close(efd);
        if (sfd >= 0)
            close(sfd);
        return -1;
    }
    S->event_efd = efd;
    S->sleep_efd = sfd;
    S->efd_off = 0;
    S->fork_gen = fork_gen;
    /* RELAXED: read by clients' doorbell rings; see lane_ring_doorbell and ss_poll. */
    __atomic_store_n((uint32_t *)(S->db + DB_SERVER_SPINS_OFF), mode == WAIT_SPIN, __ATOMIC_RELAXED);
    S->mode = mode;
    S->spin_ns = S->spin_cur = (uint64_t)spin_ns;
    return 0;
}

static HOT int ss_usable(ServerSetObject *S)
{
    if (!S->db) {
        PyErr_SetString(PyExc_ValueError, "ServerSet is closed");
        return 0;
    }
    if (check_fork(S->fork_gen, "capbus service") < 0)
        return 0;
    return 1;
}

/* The live channel at a user-visible index (GIL held), or NULL with KeyError. */
static chan_t *ss_lookup(ServerSetObject *S, PyObject *arg)
{
    unsigned long long index = PyLong_AsUnsignedLongLong(arg);
    if (index == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (index >= MAX_CHANNELS || !S->table[index]) {
        PyErr_Format(PyExc_KeyError, "no channel with index %llu", index);
        return NULL;
    }
    return S->table[index];
}

/* add(index, chan_fd, ctrl_fd, nslots=256, arena_size=128 MiB, sender_id=None,
 *     reply_event_fd=-1, reply_sleep_fd=-1, reply_sleep_keep_fd=-1, generation=0) */
static PyObject *ServerSet_add(ServerSetObject *S, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"index",     "chan_fd",        "ctrl_fd", "nslots", "arena_size",
                             "sender_id", "reply_event_fd", "reply_sleep_fd",
                             "reply_sleep_keep_fd", "generation", NULL};
    unsigned long long index, nslots = DEFAULT_NSLOTS, asize = DEFAULT_ARENA_SIZE, gen = 0;
    int chan_fd, ctrl_fd, reply_fd = -1, rs_fd = -1, rs_keep = -1;
    PyObject *sender_o = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Kii|KKOiiiK:add", kwlist, &index, &chan_fd,
                                     &ctrl_fd, &nslots, &asize, &sender_o, &reply_fd, &rs_fd,
                                     &rs_keep, &gen))
        return NULL;
    if (!ss_usable(S))
        return NULL;
    if (index >= MAX_CHANNELS) {
        PyErr_Format(PyExc_ValueError, "index must be in 0..%u", MAX_CHANNELS - 1);
        return NULL;
    }
    if (S->table[index]) {
        PyErr_Format(PyExc_ValueError, "channel index %llu is already in use", index);
        return NULL;
    }
    if (check_geometry(nslots, asize) < 0)
        return NULL;
    uint64_t sender = 0;
    if (sender_o != Py_None && to_u64(sender_o, &sender, "sender_id") < 0)
        return NULL;
    chan_t *ch = PyMem_RawCalloc(1, sizeof *ch);
    if (!ch)
        return PyErr_NoMemory();
    ch->reply_efd = ch->rs_wfd = ch->rs_keep = -1;
    uint64_t len = channel_size(nslots, asize);
    ch->map = map_memfd(chan_fd, len, 1, "channel");
    if (!ch->map)
        goto fail;
    ch->map_len = (size_t)len;
    ch->ctrl = map_memfd(ctrl_fd, CTRL_SIZE, 0, "control page");
    if (!ch->ctrl)
        goto fail;
    if ((ch->reply_efd = efd_dup(reply_fd)) == -2) {
        ch->reply_efd = -1;
        goto fail;
    }
    if ((ch->rs_wfd = sleep_fd_dup(rs_fd, 1)) == -2) {
        ch->rs_wfd = -1;
        goto fail;
    }
    if ((ch->rs_keep = sleep_fd_dup(rs_keep, -1)) == -2) {
        ch->rs_keep = -1;
        goto fail;
    }
    if (ch->rs_wfd >= 0 && ch->rs_keep < 0) { /* no read end of our own: EPIPE could kill us */
        close(ch->rs_wfd);
        ch->rs_wfd = -1;
    }
    if (sender_o == Py_None) /* the kernel wrote it; ACQUIRE is not needed at add() time */
        sender = __atomic_load_n((uint64_t *)(ch->ctrl + CTRL_SENDER_ID_OFF), __ATOMIC_RELAXED);
    ch->index = ch->slot = (uint32_t)index;
    ch->serial = ++S->next_serial;
    ch->sender_id = sender;
    ch->generation = gen;
    ch->req.ring = ch->map + REQ_RING_OFF;
    ch->req.arena = ch->map + req_arena_off(nslots);
    ch->req.nslots = nslots;
    ch->req.asize = asize;
    ch->resp.ring = ch->map + resp_ring_off(nslots);
    ch->resp.arena = ch->map + resp_arena_off(nslots, asize);
    ch->resp.nslots = nslots;
    ch->resp.asize = asize;
    if (ch_pin_buckets(S, ch) < 0) {
        ch_unpin_buckets(S, ch);
        goto fail;
    }
    /* RELEASE (pointer, then bit): a recv scanning without the GIL that ACQUIRE-loads the bit and
     * then the pointer sees a fully initialised chan_t. */
    __atomic_store_n(&S->table[index], ch, __ATOMIC_RELEASE);
    __atomic_fetch_or(&S->active[index / 64], 1ull << (index % 64), __ATOMIC_RELEASE);
    ss_update_span(S);
    S->nchan++;
    /* Requests may be waiting already, and their doorbell hint was dropped while the index was
     * not ours: the next take scans every ring, so the new channel gets its turns at once.
     * RELAXED: read by the recv holder, which then reads the rings with their own ordering. */
    __atomic_store_n(&S->rescan, 1, __ATOMIC_RELAXED);
    /* And wake a recv asleep already: the client's first request may have rung the doorbell
     * before this channel was ours, and the scan that woke found nothing, so without this the
     * request waited for the next wake-up of any kind (the 50 ms sleep cap or the watchdog: a
     * fresh channel's first call took ~51 ms in about one process in ten). The seq bump is a
     * full fence after the table store: a sleeper either scans the new channel or is woken. An
     * event loop's eventfd only if it is armed. */
    ss_wake_sleeper(S);
    if (S->event_efd >= 0 &&
        __atomic_load_n((uint32_t *)(S->db + DB_EVENT_WANTED_OFF), __ATOMIC_RELAXED))
        efd_signal(S->event_efd);
    Py_RETURN_NONE;
fail:
    chan_free(ch);
    return NULL;
}

/* A free drain slot (GIL held), or -1. */
static int ss_drain_slot(ServerSetObject *S)
{
    for (uint32_t w = 0; w < MAX_CHANNELS / 64; w++)
        if (~S->drain_used[w])
            return (int)(w * 64 + (uint32_t)__builtin_ctzll(~S->drain_used[w]));
    return -1;
}

/* remove(index, drain=False) */
static PyObject *ServerSet_remove(ServerSetObject *S, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"index", "drain", NULL};
    PyObject *index_o;
    int drain = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|p:remove", kwlist, &index_o, &drain))
        return NULL;
    chan_t *ch = ss_lookup(S, index_o);
    if (!ch)
        return NULL;
    /* Drain: the requests already in the ring (up to the tail we see now: a client that is still
     * alive cannot extend the drain) are delivered, then the channel goes. Never for a revoked
     * capability or a corrupt channel. head and tail_seen are only changed by recv under the GIL,
     * so they are stable here. */
    if (drain && !__atomic_load_n(&ch->dead, __ATOMIC_RELAXED) &&
        ctrl_state(ch->ctrl) != STATE_REVOKED) {
        /* ACQUIRE: as in cons_poll (the slots before this tail are written). */
        uint64_t t = __atomic_load_n(ring_u64(ch->req.ring, RING_TAIL_OFF), __ATOMIC_ACQUIRE);
        int j = ss_drain_slot(S);
        if (t >= ch->req.tail_seen && t - ch->req.head <= ch->req.nslots && t != ch->req.head &&
            j >= 0) {
            uint32_t index = ch->index, slot = MAX_CHANNELS + (uint32_t)j;
            ss_deactivate(S, index);
            __atomic_store_n(&S->table[index], NULL, __ATOMIC_RELEASE); /* as in ss_unlink */
            S->nchan--;
            /* RELAXED: a scan holding the pointer from the old slot may read it meanwhile (it
             * then marks the channel ready: harmless); the RELEASE below publishes it with the
             * new slot. */
            __atomic_store_n(&ch->draining, 1, __ATOMIC_RELAXED);
            ch->drain_end = t;
            ch->slot = slot;
            S->drain_used[j / 64] |= 1ull << (j % 64);
            /* RELEASE (pointer, then bit), as in add(). */
            __atomic_store_n(&S->table[slot], ch, __ATOMIC_RELEASE);
            __atomic_fetch_or(&S->active[slot / 64], 1ull << (slot % 64), __ATOMIC_RELEASE);
            ss_update_span(S);
            __atomic_store_n(&S->rescan, 1, __ATOMIC_RELAXED); /* drain slots have no hints */
            ss_kick(S);
            Py_RETURN_NONE;
        }
    }
    ss_unlink(S, ch);
    ss_reap(S); /* not while payload views of the channel live: the last one unmaps it */
    Py_RETURN_NONE;
}

/* Full scan: mark every alive channel whose request ring is non-empty (and every draining one)
 * as ready. Called by the recv holder, with or without the GIL. Returns whether anything is.
 * `now`: coarse_ns() at or shortly before the call (recorded as the time of the last scan). */
static HOT int ss_full_scan(ServerSetObject *S, uint64_t now)
{
    int found = 0;
    uint32_t span = ss_span(S);
    for (uint32_t w = 0; w < span; w++) {
        /* ACQUIRE: pairs with add()'s RELEASE, so the channel it names is initialised. */
        uint64_t a = __atomic_load_n(&S->active[w], __ATOMIC_ACQUIRE);
        while (a) {
            uint32_t b = (uint32_t)__builtin_ctzll(a);
            a &= a - 1;
            chan_t *ch = __atomic_load_n(&S->table[w * 64 + b], __ATOMIC_ACQUIRE); /* as above */
            if (!ch)
                continue;
            /* RELAXED: set and cleared under the GIL; a stale value costs one pop (P_EMPTY) or
             * one scan late (the release that clears it also asks for a rescan and kicks). */
            if (__atomic_load_n(&ch->zc_blocked, __ATOMIC_RELAXED))
                continue; /* its held-chunk queue is full: nothing to take until a release */
            /* RELAXED: see remove(); the pop (under the GIL) decides. */
            if (__atomic_load_n(&ch->draining, __ATOMIC_RELAXED)) { /* delivers or retires it */
                S->ready[w] |= 1ull << b;
                found = 1;
                continue;
            }
            if (ctrl_state(ch->ctrl) != STATE_OPEN)
                continue;
            /* RELAXED: a "non-empty?" test only; the pop re-reads the tail with ACQUIRE. */
            if (__atomic_load_n(ring_u64(ch->req.ring, RING_TAIL_OFF), __ATOMIC_RELAXED) !=
                ch->req.head) {
                S->ready[w] |= 1ull << b;
                found = 1;
            }
        }
    }
    S->last_full_scan = now; /* early or a tick late: FULL_SCAN_NS is a lower bound */
    return found;
}

/* Fold the doorbell's hint bits into the private ready set (bits of unknown or dead channels in
 * the span are dropped by the mask -- add() asks for a full scan for that reason; drain slots have
 * no hint bits). */
static HOT void ss_refresh_hints(ServerSetObject *S)
{
    uint64_t *bm = (uint64_t *)(S->db + DB_BITMAP_OFF);
    uint32_t span = ss_span(S);
    /* Words past the span hold only bits of channels not (yet) ours: they stay, for later. */
    for (uint32_t w = 0; w < DB_BITMAP_WORDS && w < span; w++) {
        /* RELAXED: hints only; every use of a channel re-reads its tail with ACQUIRE. The plain
         * load first avoids dirtying 64 shared cache lines per turn. */
        if (__atomic_load_n(&bm[w], __ATOMIC_RELAXED)) {
            uint64_t bits = __atomic_exchange_n(&bm[w], 0, __ATOMIC_RELAXED);
            S->ready[w] |= bits & __atomic_load_n(&S->active[w], __ATOMIC_RELAXED);
        }
    }
}

static HOT int ss_find_from(ServerSetObject *S, uint32_t start)
{
    uint32_t span = ss_span(S);
    for (uint32_t w = start / 64; w < span; w++) {
        uint64_t bits = S->ready[w] & __atomic_load_n(&S->active[w], __ATOMIC_RELAXED);
        if (w == start / 64)
            bits &= ~0ull << (start % 64);
        if (bits)
            return (int)(w * 64 + (uint32_t)__builtin_ctzll(bits));
    }
    return -1;
}

/* Round robin: the next ready channel at or after rr; at the end of a turn, fold in the hints
 * (at most *refreshes times per wait cycle, so a scribbler setting every bit cannot keep us
 * busy) and start again from 0; if nothing is ready at all, scan every ring -- unless the caller
 * goes to ss_wait next (will_wait), which scans every ring itself after its fence. */
static HOT int ss_pick(ServerSetObject *S, int *refreshes, int will_wait)
{
    int i = S->rr < TABLE_SLOTS ? ss_find_from(S, S->rr) : -1;
    if (i >= 0)
        return i;
    if (*refreshes > 0) {
        ss_refresh_hints(S);
        (*refreshes)--;
    }
    S->rr = 0;
    i = ss_find_from(S, 0);
    if (i >= 0 || will_wait)
        return i;
    ss_full_scan(S, coarse_ns());
    return ss_find_from(S, 0);
}

enum { W_AGAIN, W_INTERRUPT };

/* Wait WITHOUT the GIL for work: at most one slice (or, with no deadline and no spinning left,
 * one untimed sleep under the watchdog), then the caller re-checks everything. */
static HOT int ss_wait(ServerSetObject *S, uint64_t deadline)
{
    uint32_t *seq = (uint32_t *)(S->db + DB_SEQ_OFF);
    uint32_t *sleeping = (uint32_t *)(S->db + DB_SERVER_SLEEPING_OFF);
    int forever = deadline == UINT64_MAX && S->mode != WAIT_SPIN;
    if (forever && !S->wd_registered && wd_register(S) < 0)
        forever = 0;
    uint64_t start = 0, slice_end = UINT64_MAX;
    if (!forever || S->mode == WAIT_ADAPTIVE) /* block mode with no deadline reads no clock */
        start = now_ns();
    if (start >= deadline)
        return W_AGAIN;
    if (start)
        slice_end = deadline - start > SLICE_NS ? start + SLICE_NS : deadline;
    uint64_t spin_end = start;
    if (S->mode == WAIT_SPIN)
        spin_end = slice_end;
    else if (S->mode == WAIT_ADAPTIVE && spin_allowed(start))
        spin_end = slice_end - start > S->spin_cur ? start + S->spin_cur : slice_end;
    if (spin_end > start) {
        /* ACQUIRE: if a later load sees a different seq we rescan anyway; reading seq BEFORE the
         * scan closes the window where a client publishes between our scan and our read. */
        uint32_t seen = __atomic_load_n(seq, __ATOMIC_ACQUIRE);
        if (ss_full_scan(S, coarse_ns()))
            return W_AGAIN;
        uint64_t next_scan = start + SPIN_SCAN_NS;
        uint64_t *bm = (uint64_t *)(S->db + DB_BITMAP_OFF);
        uint32_t span = ss_span(S);
        for (unsigned i = 1;; i++) {
            if (__atomic_load_n(seq, __ATOMIC_RELAXED) != seen) { /* RELAXED: "look again" */
                S->spin_cur = spin_won(S->spin_cur, S->spin_ns);
                return W_AGAIN;
            }
            /* The hint bits too: clients of a spinning server set only those (server_spins).
             * RELAXED: "look again" as well; a scribbled bit costs one empty turn. */
            for (uint32_t w = 0; w < span && w < DB_BITMAP_WORDS; w++)
                if (__atomic_load_n(&bm[w], __ATOMIC_RELAXED) &
                    __atomic_load_n(&S->active[w], __ATOMIC_RELAXED)) {
                    S->spin_cur = spin_won(S->spin_cur, S->spin_ns);
                    return W_AGAIN;
                }
            if (__atomic_load_n(&S->interrupt, __ATOMIC_RELAXED))
                return W_INTERRUPT;
            cpu_relax();
            if (i % 1024 == 0) {
                uint64_t now = now_ns();
                if (now >= spin_end) {
                    if (S->mode == WAIT_ADAPTIVE)
                        S->spin_cur = spin_lost(S->spin_cur);
                    break;
                }
                if (now >= next_scan) { /* a scribbler may hold seq still: trust only rings */
                    if (ss_full_scan(S, coarse_ns()))
                        return W_AGAIN;
                    next_scan = now + SPIN_SCAN_NS;
                }
            }
        }
    }
    uint64_t rel = 0;
    if (!forever) {
        uint64_t now = now_ns();
        if (now >= slice_end)
            return W_AGAIN;
        rel = slice_end - now < SLEEP_CAP_NS ? slice_end - now : SLEEP_CAP_NS;
    }
    kick_slot_t *k;
    if (forever && S->sleep_efd >= 0 && !S->efd_off && (k = kick_mine()) != NULL) {
        /* The eventfd sleep (see "Sleep eventfds and kicks"). Dekker as below, but the wake-up
         * is a counter: a client that saw SLEEP_EFD and wrote after our scan makes the read
         * return at once, so no seq compare is needed (a write we did not need costs one
         * spurious wake-up later). The kick slot, not `asleep`, is the watchdog's view. */
        store_fence_u32(sleeping, SLEEP_EFD);
        if (!ss_full_scan(S, S->coarse_now) && !__atomic_load_n(&S->interrupt, __ATOMIC_RELAXED)) {
            uint64_t v;
            uint32_t t = kick_arm(k);
            ssize_t r = read(S->sleep_efd, &v, sizeof v); /* any outcome: the caller rescans */
            int e = r < 0 ? errno : 0;
            kick_disarm(k, t);
            if (e == EAGAIN)
                S->efd_off = 1; /* someone made it non-blocking: futex sleeps from now on */
        }
        __atomic_store_n(sleeping, SLEEP_NONE, __ATOMIC_RELAXED);
        return __atomic_load_n(&S->interrupt, __ATOMIC_RELAXED) ? W_INTERRUPT : W_AGAIN;
    }
    /* Store + full fence (store_fence_u32), Dekker with lane_ring_doorbell ("bump seq; fence;
     * load sleeping"): either the client sees our flag and wakes us, or our seq load below sees
     * its increment (ACQUIRE: and then its tail) and FUTEX_WAIT returns at once. The scan's clock
     * is the one ss_take read just before (a lower bound for the next full scan either way). */
    store_fence_u32(sleeping, SLEEP_FUTEX);
    uint32_t seen = __atomic_load_n(seq, __ATOMIC_ACQUIRE);
    if (!ss_full_scan(S, S->coarse_now) && !__atomic_load_n(&S->interrupt, __ATOMIC_RELAXED)) {
        if (forever) {
            uint32_t ticket = ++S->sleep_ticket ? S->sleep_ticket : ++S->sleep_ticket;
            __atomic_store_n(&S->asleep, ticket, __ATOMIC_RELAXED); /* see wd_main */
        }
        sys_futex_wait(seq, seen, rel, forever); /* any outcome (EINTR included): caller rescans */
        if (forever)
            __atomic_store_n(&S->asleep, 0, __ATOMIC_RELAXED);
    }
    __atomic_store_n(sleeping, 0, __ATOMIC_RELAXED); /* RELAXED: saves clients a syscall only */
    return __atomic_load_n(&S->interrupt, __ATOMIC_RELAXED) ? W_INTERRUPT : W_AGAIN;
}

/* Write one reply into ch's response ring; never blocks. GIL held on entry and exit (a big
 * payload's copy, and a contended lock, run without it). RG_OK, RG_FULL, or RG_CORRUPT (ch is
 * then marked dead). If remove() ran meanwhile and no recv is active, ch is freed on return: the
 * caller must not use it afterwards (recv's own auto-replies may: recv_active keeps it). `app`:
 * the application's reply (counted in the metrics), not an automatic refusal; APP_REPLY_DEFER:
 * and a corrupt ring is reported by the next recv (ss_defer_report), not raised by the caller. */
enum { APP_REPLY = 1, APP_REPLY_DEFER = 2 };
/* The write itself, with ch->lock held (with or without the GIL); lets the lock go. */
static HOT int reply_write_locked(chan_t *ch, const outmsg_t *m, const char **why)
{
    uint64_t nfree;
    int r = prod_slots_free(&ch->resp, 1, &nfree, why);
    if (r == RG_OK)
        r = nfree ? prod_write(&ch->resp, m, why) : RG_FULL;
    if (r == RG_OK)
        prod_publish_fence(&ch->resp);
    gl_release(&ch->lock);
    return r;
}

static HOT int ss_write_reply(ServerSetObject *S, chan_t *ch, const outmsg_t *m, const char **why,
                          int app)
{
    int r;
    ch->users++;
    /* The lock is taken with the GIL (waiting without it while another thread copies a big
     * reply); a big payload is then copied without the GIL, and the lock let go before the GIL
     * is taken back, so its holder never waits for the GIL: no deadlock. */
    gl_acquire(&ch->lock);
    if (m->payload && m->plen >= NOGIL_COPY_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        r = reply_write_locked(ch, m, why);
        Py_END_ALLOW_THREADS
    } else {
        r = reply_write_locked(ch, m, why);
    }
    if (r == RG_OK) {
        /* The full fence after our tail store (prod_publish_fence) orders it before the loads
         * of the client's flags: the Dekker half matching lane_wait (sleeping) and
         * call_poll(arm=True) (event). RELAXED loads; both flags share the consumer's cache
         * line. The flags are client-written: a hostile value costs that client a spurious
         * wake-up. */
        char *ring = ch->resp.ring;
        uint32_t sleeping = __atomic_load_n(ring_u32(ring, RING_CONSUMER_SLEEPING_OFF),
                                            __ATOMIC_RELAXED);
        if (sleeping == SLEEP_EFD && ch->rs_wfd >= 0) {
            if (write(ch->rs_wfd, "", 1) < 0) {
                /* EAGAIN: the pipe is full, so the client wakes anyway (rs_keep: no EPIPE) */
            }
        } else if (sleeping) {
            sys_futex_wake((const uint32_t *)ring_u64(ring, RING_TAIL_OFF), INT_MAX);
        }
        if (ch->reply_efd >= 0 &&
            __atomic_load_n(ring_u32(ring, RING_CONSUMER_EVENT_OFF), __ATOMIC_RELAXED))
            efd_signal(ch->reply_efd);
        if (app)
            stat_add(ch->map + CHAN_SSTATS_OFF, ch->sst, SSTATS_REPLIES_OFF, 1);
    } else if (app) {
        stat_add(ch->map + CHAN_SSTATS_OFF, ch->sst, SSTATS_REPLY_FAILED_OFF, 1);
    }
    ch->users--;
    if (r == RG_CORRUPT && !ch->removed) {
        ss_mark_dead(S, ch);
        if (app == APP_REPLY_DEFER)
            ss_defer_report(S, ch, *why);
    }
    if (ch->removed)
        ss_reap(S); /* may free ch */
    return r;
}

static HOT PyObject *reply_outcome(int r, uint32_t index, const char *why)
{
    if (r == RG_OK)
        Py_RETURN_NONE;
    if (r == RG_FULL)
        PyErr_Format(WouldBlock, "response ring or arena of channel %u is full", index);
    else
        raise_corrupt(index, why);
    return NULL;
}

/* ---- ZBuf lifetime (the type is described with the views of shared memory, before Lane). ---- */

/* A zero-copy payload's chunk is released (GIL held; idempotent): its Request is done and no view
 * is left. A removed or dead channel's ring is read by nobody any more: nothing to publish. */
static void zb_release_chunk(ZBufObject *E)
{
    if (!E->held)
        return;
    E->held = 0;
    E->spent = 1;
    chan_t *ch = E->ch;
    if (ch->removed || __atomic_load_n(&ch->dead, __ATOMIC_RELAXED))
        return;
    /* A forked child dropping the views it inherited: the ring and its held chunks are the
     * parent's, which may still be reading them. */
    if (((ServerSetObject *)E->owner)->fork_gen != fork_gen)
        return;
    ch_release_chunk((ServerSetObject *)E->owner, ch, E->seq);
}

/* The last export of E is gone (GIL held; from zb_releasebuf, so wherever a view dies). */
static void zb_last_export(ZBufObject *E)
{
    if (E->ch && E->done)
        zb_release_chunk(E);
    else if (E->lane_pin) {
        E->spent = 1;
        lane_unpin((LaneObject *)E->owner, E);
    }
}

static void zb_dealloc(ZBufObject *E)
{
    if (E->ch) {
        chan_t *ch = E->ch;
        zb_release_chunk(E); /* normally done by its Request already */
        if (--ch->views == 0 && ch->removed)
            ss_reap((ServerSetObject *)E->owner); /* may unmap and free ch */
    }
    if (E->lane_pin)
        lane_unpin((LaneObject *)E->owner, E);
    Py_XDECREF(E->owner);
    PyObject_Free(E);
}

static PyTypeObject ZBufType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "capbus._core.SharedBuffer",
    .tp_basicsize = sizeof(ZBufObject),
    .tp_dealloc = (destructor)zb_dealloc,
    .tp_as_buffer = &zb_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Shared memory behind a zero-copy payload or a loan; the memory is kept for as "
              "long as any view of it lives.",
};

/* ---- Request: one received message, answered with .reply(). -------------------------------- */

/* The runtime's own user flag bits (capbus._runtime.message takes them from here). */
#define RT_TRANSFER_FLAG 0x80000000u /* capabilities or regions travel with this message */
#define RT_OBJECT_FLAG 0x40000000u   /* the payload is an object (capbus._runtime.objects) */

typedef struct {
    PyObject_HEAD
    ServerSetObject *set; /* strong reference */
    /* .opcode and .payload are built when the request is received and read as object members
     * (T_OBJECT_EX): the interpreter specialises such reads to a load from the object
     * (LOAD_ATTR_SLOT), where a getter or a T_UINT member costs a descriptor call each time. A
     * server reads the opcode of every request, to dispatch. .data stays a getter: building the
     * tuple for every message would cost a receiver that drains a stream in batches (recv_many)
     * a quarter of its throughput. */
    PyObject *opcode_o;   /* the opcode as an int */
    PyObject *data_t;     /* the data 4-tuple, built on first use */
    PyObject *payload;    /* bytes (b"" when none) or a read-only memoryview of the arena
                             (zero-copy: zbuf is set); never NULL while the request lives */
    ZBufObject *zbuf;     /* strong: the zero-copy payload's buffer, or NULL */
    uint64_t plen;        /* payload bytes */
    PyObject *regions;    /* NULL reads as () */
    PyObject *caps;       /* NULL reads as () */
    uint64_t tag;
    uint64_t capability;
    uint64_t sender;
    uint64_t serial;      /* of its channel: a reply never reaches a later channel at the index */
    uint64_t generation;  /* its channel's, as given to add(generation=) */
    uint64_t data[4];
    uint32_t index;
    uint32_t opcode;
    uint32_t flags;       /* as received (FLAG_REPLY_EXPECTED etc.) */
    int done;
    /* A new field: set it in ss_pop, or clear it in request_alloc (free-list reuse). */
} RequestObject;

static PyTypeObject RequestType;

static int Request_traverse(RequestObject *R, visitproc visit, void *arg)
{
    Py_VISIT(R->data_t);
    Py_VISIT(R->regions);
    Py_VISIT(R->caps);
    return 0;
}

static HOT int Request_clear(RequestObject *R)
{
    Py_CLEAR(R->opcode_o);
    Py_CLEAR(R->data_t);
    Py_CLEAR(R->regions);
    Py_CLEAR(R->caps);
    return 0;
}

/* Done with a zero-copy payload: the Request lets go of its own view (.payload reads as a
 * released memoryview from now on), and the chunk goes back to the client (in FIFO order behind
 * any older held chunk) now if no other view is left, else when the last one goes. No-op
 * otherwise, and the second time. */
static HOT void req_release_payload(RequestObject *R)
{
    ZBufObject *E = R->zbuf;
    if (!E || E->done)
        return;
    E->done = 1;
    PyObject *own = R->payload;
    R->payload = Py_NewRef(released_view);
    Py_DECREF(own); /* when only we held it, its export goes: zb_last_export releases the chunk */
    if (E->exports == 0)
        zb_release_chunk(E); /* the user had released every view already (memoryview.release) */
}

static void req_no_reply(RequestObject *R);

static HOT void Request_dealloc(RequestObject *R)
{
    PyObject_GC_UnTrack(R);
    if (__builtin_expect(!R->done && (R->flags & FLAG_REPLY_EXPECTED), 0))
        req_no_reply(R);
    req_release_payload(R);
    Request_clear(R);
    Py_CLEAR(R->payload);
    Py_CLEAR(R->zbuf);
    Py_CLEAR(R->set);
    if (Py_TYPE(R) == &RequestType && free_list_push(&req_free_list, (PyObject *)R))
        return;
    Py_TYPE(R)->tp_free((PyObject *)R);
}

/* A new instance of req_type, tracked (as tp_alloc makes it). From the free list only the
 * fields ss_pop does not set are cleared (tp_alloc zeroes them all). */
static HOT RequestObject *request_alloc(void)
{
    if (req_type == &RequestType) {
        RequestObject *R = (RequestObject *)free_list_pop(&req_free_list);
        if (R) {
            PyObject_Init((PyObject *)R, &RequestType);
            R->data_t = R->regions = R->caps = NULL;
            R->zbuf = NULL;
            R->done = 0;
            PyObject_GC_Track(R);
            return R;
        }
    }
    return (RequestObject *)req_type->tp_alloc(req_type, 0);
}

/* Send a reply for R (GIL held): True if it was written into the client's response ring.
 * A reply that cannot be delivered -- the client is gone, its channel is not open, it does not
 * read its replies (a full response ring) or it scribbled that ring -- is dropped and counted
 * (reply_failed): False, and the request counts as answered. Only bad arguments raise. */
static HOT PyObject *req_send(RequestObject *R, outmsg_t *m, PyObject *payload_o, int empty_is_none)
{
    ServerSetObject *S = R->set;
    if (check_fork(S->fork_gen, "capbus request") < 0)
        return NULL;
    chan_t *ch = S->db ? S->table[R->index] : NULL;
    if (ch && ch->serial != R->serial)
        ch = NULL; /* a later channel at the same index */
    if (!ch || __atomic_load_n(&ch->dead, __ATOMIC_RELAXED) || ctrl_state(ch->ctrl) != STATE_OPEN) {
        R->done = 1;
        if (ch) /* a removed channel has no header to count in any more */
            stat_add(ch->map + CHAN_SSTATS_OFF, ch->sst, SSTATS_REPLY_FAILED_OFF, 1);
        req_release_payload(R);
        Py_RETURN_FALSE;
    }
    Py_buffer view;
    if (parse_payload(payload_o, m, &view, max_payload_for(ch->resp.asize), empty_is_none) < 0)
        return NULL;
    const char *why = NULL;
    /* Answered from here on: ss_write_reply may drop the GIL, and a second thread replying to
     * the same request meanwhile must get "already replied", not send a second reply. */
    R->done = 1;
    int r = ss_write_reply(S, ch, m, &why, APP_REPLY_DEFER); /* ch may be gone after this */
    release_view(&view);
    req_release_payload(R); /* answered (or dropped): the payload is the request's no more */
    return Py_NewRef(r == RG_OK ? Py_True : Py_False);
}

/* An error reply with FLAG_ERROR (| FLAG_IPC_ERROR for capbus's own codes); text: str (UTF-8)
 * or bytes, cut to 4096 bytes (a readable message, not a data channel). True if delivered;
 * False if answered already, one-way, or undeliverable. */
static PyObject *req_send_error(RequestObject *R, uint64_t code, PyObject *text_o, uint32_t flags)
{
    PyObject *text;
    if (PyUnicode_Check(text_o)) {
        text = PyUnicode_AsEncodedString(text_o, "utf-8", "replace");
        if (!text)
            return NULL;
    } else if (PyObject_CheckBuffer(text_o)) {
        text = Py_NewRef(text_o);
    } else {
        PyErr_SetString(PyExc_TypeError, "text must be str or bytes");
        return NULL;
    }
    if (R->done || !(R->flags & FLAG_REPLY_EXPECTED)) {
        Py_DECREF(text);
        Py_RETURN_FALSE;
    }
    Py_buffer v;
    if (PyObject_GetBuffer(text, &v, PyBUF_SIMPLE) < 0) {
        Py_DECREF(text);
        return NULL;
    }
    PyObject *cut = PyBytes_FromStringAndSize(v.buf, v.len > 4096 ? 4096 : v.len);
    PyBuffer_Release(&v);
    Py_DECREF(text);
    if (!cut)
        return NULL;
    outmsg_t m;
    m.capability = 0;
    m.opcode = 0;
    m.flags = FLAG_ERROR | flags;
    m.tag = R->tag;
    m.data[0] = code;
    m.data[1] = m.data[2] = m.data[3] = 0;
    PyObject *r = req_send(R, &m, cut, 1);
    Py_DECREF(cut);
    return r;
}

/* A call dropped without a reply (released, or deallocated): its caller gets NoReply now rather
 * than waiting for ever. Never raises (it runs from a deallocator too). */
static void req_no_reply(RequestObject *R)
{
    if (R->done || !(R->flags & FLAG_REPLY_EXPECTED) || !R->set)
        return;
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyObject *text = PyUnicode_FromString("the service dropped the request without replying");
    PyObject *r = text ? req_send_error(R, code_no_reply, text, FLAG_IPC_ERROR) : NULL;
    Py_XDECREF(text);
    Py_XDECREF(r);
    R->done = 1;
    PyErr_Clear();
    PyErr_Restore(et, ev, tb);
}

/* reply(opcode=0, data=(), payload=b"", flags=0) */
static HOT PyObject *Request_reply(RequestObject *R, PyObject *const *args, Py_ssize_t nargs,
                               PyObject *kwnames)
{
    static const char *const kw[] = {"opcode", "data", "payload", "flags", NULL};
    PyObject *a[4];
    if (fast_args("reply", args, nargs, kwnames, kw, 0, a) < 0)
        return NULL;
    if (R->done) {
        PyErr_SetString(IpcError, "this request has already been replied to");
        return NULL;
    }
    if (!(R->flags & FLAG_REPLY_EXPECTED)) {
        PyErr_SetString(IpcError, "this message came from send_async: it takes no reply");
        return NULL;
    }
    outmsg_t m;
    m.capability = 0;
    m.opcode = 0;
    m.flags = 0;
    m.tag = R->tag;
    if (a[0] && to_u32(a[0], &m.opcode, "opcode") < 0)
        return NULL;
    if (a[3]) {
        if (to_u32(a[3], &m.flags, "flags") < 0)
            return NULL;
        if (m.flags & ~(FLAG_USER_MASK | FLAG_CHECKSUM)) {
            PyErr_Format(PyExc_ValueError, "user flags must lie in 0x%x, got 0x%x",
                         FLAG_USER_MASK, m.flags);
            return NULL;
        }
    }
    if (a[1]) {
        if (parse_data(a[1], m.data) < 0)
            return NULL;
    } else {
        memset(m.data, 0, sizeof m.data);
    }
    return req_send(R, &m, a[2] ? a[2] : Py_None, 1);
}

/* reply_error(code, text): the application's error (RemoteError at the caller, .code = code). */
static PyObject *Request_reply_error(RequestObject *R, PyObject *const *args, Py_ssize_t nargs,
                                     PyObject *kwnames)
{
    static const char *const kw[] = {"code", "text", NULL};
    PyObject *a[2];
    uint64_t code;
    if (fast_args("reply_error", args, nargs, kwnames, kw, 2, a) < 0 ||
        to_u64(a[0], &code, "code") < 0)
        return NULL;
    return req_send_error(R, code, a[1], 0);
}

/* _reply_ipc_error(code, text): a capbus error (the caller raises the IpcError of that code). */
static PyObject *Request_reply_ipc_error(RequestObject *R, PyObject *const *args,
                                         Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const kw[] = {"code", "text", NULL};
    PyObject *a[2];
    uint64_t code;
    if (fast_args("_reply_ipc_error", args, nargs, kwnames, kw, 2, a) < 0 ||
        to_u64(a[0], &code, "code") < 0)
        return NULL;
    return req_send_error(R, code, a[1], FLAG_IPC_ERROR);
}

/* The four data words as a tuple of ints (a new reference). */
static HOT PyObject *data_tuple(const uint64_t d[4])
{
    PyObject *t = PyTuple_New(4);
    if (!t)
        return NULL;
    for (int i = 0; i < 4; i++) {
        PyObject *o = u64_object(d[i]);
        if (!o) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, o);
    }
    return t;
}

static HOT PyObject *Request_get_data(RequestObject *R, void *c)
{
    if (!R->data_t && !(R->data_t = data_tuple(R->data)))
        return NULL;
    return Py_NewRef(R->data_t);
}

static PyObject *Request_get_flags(RequestObject *R, void *c)
{
    return PyLong_FromUnsignedLong(R->flags & FLAG_USER_MASK);
}

static PyObject *empty_bytes, *empty_tuple;

static PyObject *Request_get_expects_reply(RequestObject *R, void *c)
{
    return PyBool_FromLong(R->flags & FLAG_REPLY_EXPECTED);
}

static PyObject *Request_get_replied(RequestObject *R, void *c) { return PyBool_FromLong(R->done); }

static PyObject *Request_get_regions(RequestObject *R, void *c)
{
    PyObject *v = R->regions ? R->regions : empty_tuple;
    Py_INCREF(v);
    return v;
}

static int Request_set_regions(RequestObject *R, PyObject *v, void *c)
{
    Py_XINCREF(v); /* NULL (del) resets to () */
    Py_XSETREF(R->regions, v);
    return 0;
}

static PyObject *Request_get_caps(RequestObject *R, void *c)
{
    PyObject *v = R->caps ? R->caps : empty_tuple;
    Py_INCREF(v);
    return v;
}

static int Request_set_caps(RequestObject *R, PyObject *v, void *c)
{
    Py_XINCREF(v);
    Py_XSETREF(R->caps, v);
    return 0;
}

static PyObject *Request_repr(RequestObject *R)
{
    PyObject *data = Request_get_data(R, NULL);
    if (!data)
        return NULL;
    PyObject *r = PyUnicode_FromFormat(
        "<capbus.Request from %llu opcode=%u data=%R payload=%llu bytes%s>",
        (unsigned long long)R->sender, R->opcode, data, (unsigned long long)R->plen,
        (R->flags & FLAG_REPLY_EXPECTED) ? (R->done ? " (replied)" : " (call)") : " (one-way)");
    Py_DECREF(data);
    return r;
}

/* release(): done with the request. Its payload goes back (see req_release_payload), and a call
 * not replied to fails its caller with NoReply. */
static PyObject *Request_release(RequestObject *R, PyObject *unused)
{
    req_no_reply(R);
    req_release_payload(R);
    Py_RETURN_NONE;
}

static PyObject *Request_get_zero_copy(RequestObject *R, void *c)
{
    return PyBool_FromLong(R->zbuf != NULL);
}

/* object(trusted=False) and reply_object(obj, opcode=0, pickle=False): object payloads, through
 * capbus._runtime.objects (imported on first use; the Request type itself stays native so that
 * receiving and dropping a request costs no Python-level subclass machinery). */
static PyObject *objects_module(void)
{
    static PyObject *mod;
    if (!mod)
        mod = PyImport_ImportModule("capbus._runtime.objects");
    return mod;
}


/* ---- Message: a call's reply, (opcode, flags, d0, d1, d2, d3, payload or None). -------------
 * A tuple subclass defined here rather than in Python: make_message allocates it directly, and a
 * static type's instances die through tuple's own dealloc (a Python subclass goes through
 * subtype_dealloc and a type reference per object). Its fields are native getters too, so reading
 * reply.data or reply.payload runs no Python frame. */

#define MSG_USER_FLAGS (FLAG_USER_MASK & ~(RT_TRANSFER_FLAG | RT_OBJECT_FLAG))

static PyObject *msg_item(PyObject *t, Py_ssize_t i)
{
    if (PyTuple_GET_SIZE(t) <= i) {
        PyErr_SetString(PyExc_IndexError, "tuple index out of range");
        return NULL;
    }
    return PyTuple_GET_ITEM(t, i);
}

static PyObject *Message_get_opcode(PyObject *t, void *c)
{
    return Py_XNewRef(msg_item(t, 0));
}

static PyObject *Message_get_flags(PyObject *t, void *c)
{
    PyObject *f = msg_item(t, 1);
    if (!f)
        return NULL;
    unsigned long v = PyLong_AsUnsignedLong(f);
    if (v == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    return PyLong_FromUnsignedLong(v & MSG_USER_FLAGS);
}

static PyObject *Message_get_data(PyObject *t, void *c)
{
    if (!msg_item(t, 5))
        return NULL;
    return PyTuple_GetSlice(t, 2, 6);
}

/* The payload: item 6, or b"" when that is None or empty. */
static PyObject *Message_get_payload(PyObject *t, void *c)
{
    PyObject *p = msg_item(t, 6);
    if (!p)
        return NULL;
    int truth = p == Py_None ? 0 : PyObject_IsTrue(p);
    if (truth < 0)
        return NULL;
    return Py_NewRef(truth ? p : empty_bytes);
}

/* object(trusted=False) of a Message or a Request: objects.loads(payload, trusted). */
static PyObject *payload_object(PyObject *payload, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"trusted", NULL};
    int trusted = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|p:object", kwlist, &trusted))
        return NULL;
    PyObject *mod = objects_module();
    if (!mod)
        return NULL;
    return PyObject_CallMethod(mod, "loads", "OO", payload, trusted ? Py_True : Py_False);
}

static PyObject *Message_object(PyObject *t, PyObject *args, PyObject *kw)
{
    PyObject *payload = Message_get_payload(t, NULL);
    if (!payload)
        return NULL;
    PyObject *r = payload_object(payload, args, kw);
    Py_DECREF(payload);
    return r;
}

static PyObject *Message_repr(PyObject *t)
{
    PyObject *data = Message_get_data(t, NULL);
    PyObject *payload = data ? Message_get_payload(t, NULL) : NULL;
    Py_ssize_t n = payload ? PyObject_Length(payload) : -1;
    PyObject *r = NULL;
    if (n >= 0)
        r = PyUnicode_FromFormat("<capbus.Message opcode=%R data=%R payload=%zd bytes>",
                                 PyTuple_GET_ITEM(t, 0), data, n);
    Py_XDECREF(data);
    Py_XDECREF(payload);
    return r;
}

static PyMethodDef Message_methods[] = {
    {"object", (PyCFunction)(void (*)(void))Message_object, METH_VARARGS | METH_KEYWORDS,
     "object(trusted=False): the Python object the payload carries (see Endpoint.call_object)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Message_getset[] = {
    {"opcode", (getter)Message_get_opcode, NULL, "the reply's opcode", NULL},
    {"flags", (getter)Message_get_flags, NULL, "user flags", NULL},
    {"data", (getter)Message_get_data, NULL, "the four u64 data words", NULL},
    {"payload", (getter)Message_get_payload, NULL, "the payload (b'' when none)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject MessageType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "capbus.Message",
    .tp_repr = Message_repr,
    .tp_free = Message_free,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "A received message: .opcode, .flags, .data (four u64) and .payload (bytes).\n\n"
              "A tuple underneath (opcode, flags, d0, d1, d2, d3, payload or None), exactly as\n"
              "the native core returns it.",
    .tp_methods = Message_methods,
    .tp_getset = Message_getset,
};

static PyObject *Request_object(RequestObject *R, PyObject *args, PyObject *kw)
{
    return payload_object(R->payload, args, kw);
}

static PyObject *Request_reply_object(RequestObject *R, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"obj", "opcode", "pickle", NULL};
    PyObject *obj, *opcode = NULL;
    int pickle = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|Op:reply_object", kwlist, &obj, &opcode,
                                     &pickle))
        return NULL;
    PyObject *mod = objects_module();
    PyObject *fn = mod ? PyObject_GetAttrString(mod, "pack") : NULL;
    if (!fn)
        return NULL;
    /* One positional argument, whatever obj is (a tuple must not be spread into arguments). */
    PyObject *pargs = PyTuple_Pack(1, obj);
    PyObject *pkw = pargs ? Py_BuildValue("{s:O}", "pickle", pickle ? Py_True : Py_False) : NULL;
    PyObject *packed = pkw ? PyObject_Call(fn, pargs, pkw) : NULL;
    Py_DECREF(fn);
    Py_XDECREF(pargs);
    Py_XDECREF(pkw);
    if (!packed)
        return NULL;
    PyObject *op = opcode ? Py_NewRef(opcode) : PyLong_FromLong(0);
    PyObject *flags = PyLong_FromUnsignedLong(RT_OBJECT_FLAG);
    PyObject *r = NULL;
    if (op && flags) {
        PyObject *stack[4] = {op, empty_tuple, packed, flags};
        r = Request_reply(R, stack, 4, NULL);
    }
    Py_XDECREF(op);
    Py_XDECREF(flags);
    Py_DECREF(packed);
    return r;
}

static PyMethodDef Request_methods[] = {
    {"object", (PyCFunction)(void (*)(void))Request_object, METH_VARARGS | METH_KEYWORDS,
     "object(trusted=False): the Python object the payload carries (see Endpoint.send_object /\n"
     "call_object). Its numpy arrays are read-only views of the payload, not copies. The\n"
     "payload is data-only msgpack, which names no code; a pickled one (the sender passed\n"
     "pickle=True) is ProtocolError unless trusted=True, which lets the sender run code here."},
    {"reply_object", (PyCFunction)(void (*)(void))Request_reply_object,
     METH_VARARGS | METH_KEYWORDS,
     "reply_object(obj, opcode=0, pickle=False): answer a call with a Python object (the\n"
     "caller reads it with reply.object()); pickle=True for objects msgpack cannot carry, which\n"
     "only a caller that passes trusted=True will decode."},
    {"release", (PyCFunction)Request_release, METH_NOARGS,
     "release(): done with this request. .payload reads as a released memoryview from now on, "
     "and a zero-copy payload's arena memory goes back to the client once no view taken from it "
     "is left (views you keep stay valid). A call not replied to fails its caller at once with "
     "NoReply (as when the request is garbage-collected unanswered). Replying releases the "
     "payload too. Idempotent."},
    {"reply", (PyCFunction)(void (*)(void))Request_reply, METH_FASTCALL | METH_KEYWORDS,
     "reply(opcode=0, data=(), payload=b'', flags=0) -> bool: answer the call. True if the "
     "reply was delivered; False if it was dropped (and counted) because the client is gone, "
     "does not read its replies, or scribbled its response ring (that channel is then dropped "
     "and reported by the next recv): a client can never make this raise. IpcError if answered "
     "already or a one-way message; ValueError/TypeError/MessageTooLarge for bad arguments."},
    {"reply_error", (PyCFunction)(void (*)(void))Request_reply_error,
     METH_FASTCALL | METH_KEYWORDS,
     "reply_error(code, text) -> bool: answer with the application's own error: the caller "
     "raises capbus.RemoteError with .code = code (any u64, never mistaken for a capbus error) "
     "and .text = text (str or bytes, at most 4096 bytes). False if answered already, a "
     "one-way message, or undeliverable (as reply())."},
    {"_reply_ipc_error", (PyCFunction)(void (*)(void))Request_reply_ipc_error,
     METH_FASTCALL | METH_KEYWORDS,
     "_reply_ipc_error(code, text) -> bool: answer with a capbus error (IpcError.code): the "
     "caller raises that class (Service.serve uses it)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Request_members[] = {
    {"sender", T_ULONGLONG, offsetof(RequestObject, sender), READONLY,
     "kernel-verified ProcessId of the client"},
    {"opcode", T_OBJECT_EX, offsetof(RequestObject, opcode_o), READONLY, "opcode"},
    {"payload", T_OBJECT_EX, offsetof(RequestObject, payload), READONLY,
     "payload: bytes (b'' when none), or for a zero-copy one (FLAG_LOANED or >= ZC_THRESHOLD "
     "bytes) a read-only memoryview of the arena; views taken from it stay valid for as long "
     "as they live, .payload itself until reply/release"},
    {"capability", T_ULONGLONG, offsetof(RequestObject, capability), READONLY,
     "the capability value the client sent (untrusted)"},
    {"index", T_UINT, offsetof(RequestObject, index), READONLY, "channel index (internal)"},
    {"tag", T_ULONGLONG, offsetof(RequestObject, tag), READONLY, "transaction tag (internal)"},
    {"generation", T_ULONGLONG, offsetof(RequestObject, generation), READONLY,
     "the channel instance's generation, as given to ServerSet.add (internal)"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef Request_getset[] = {
    {"flags", (getter)Request_get_flags, NULL, "user flags (FLAG_USER_MASK bits)", NULL},
    {"data", (getter)Request_get_data, NULL, "the four u64 data words", NULL},
    {"zero_copy", (getter)Request_get_zero_copy, NULL,
     "True if .payload is a view of the arena (zero-copy)", NULL},
    {"expects_reply", (getter)Request_get_expects_reply, NULL, "a call (not a send)", NULL},
    {"replied", (getter)Request_get_replied, NULL, "answered already (or its client is gone)",
     NULL},
    {"regions", (getter)Request_get_regions, (setter)Request_set_regions,
     "shared regions (set by the runtime)", NULL},
    {"caps", (getter)Request_get_caps, (setter)Request_set_caps,
     "capabilities (set by the runtime)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RequestType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "capbus._core.Request",
    .tp_basicsize = sizeof(RequestObject),
    .tp_dealloc = (destructor)Request_dealloc,
    .tp_repr = (reprfunc)Request_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A message a Service received (made by recv/poll/recv_many, not by Python code).\n\n"
              ".sender (the kernel-verified ProcessId of the caller), .opcode, .flags, .data,\n"
              ".payload, .expects_reply, .regions, .caps; .reply(opcode=0, data=(), payload=b'',\n"
              "flags=0) answers a call (PeerDied if the caller has gone: the reply is dropped).",
    .tp_traverse = (traverseproc)Request_traverse,
    .tp_clear = (inquiry)Request_clear,
    .tp_methods = Request_methods,
    .tp_members = Request_members,
    .tp_getset = Request_getset,
};

/* ---- Receiving. ------------------------------------------------------------------------------ */

enum { P_EMPTY, P_SKIPPED, P_TURN, P_DELIVERED, P_RETIRE, P_CORRUPT, P_ERROR };

/* Check a popped message against the channel's limits (CTRL_F_ENFORCE is set). LIM_OK takes its
 * tokens from the server-private buckets: the capability's and each limited ancestor's, shared
 * with every other channel pinning them. *shared: an ancestor's bucket refused it (l then holds
 * that ancestor's rate and bandwidth). */
static int ss_enforce(chan_t *ch, const inmsg_t *m, limits_t *l, int *shared)
{
    ctrl_limits(ch->ctrl, l);
    uint64_t now = limits_need_clock(l) || ch->nanc ? coarse_ns() : 0;
    int lim = limits_static(l, now, m->plen);
    if (lim != LIM_OK || (lim = bucket_check(ch->leaf, l, now, m->plen)) != LIM_OK)
        return lim;
    /* Every limited ancestor must have room too; nothing is taken unless all do. */
    for (uint32_t i = 0; i < ch->nanc; i++) {
        lim = bucket_check_rb(&ch->anc[i].c->b, ch->anc[i].rate, ch->anc[i].bw, now, m->plen);
        if (lim != LIM_OK) {
            l->rate = ch->anc[i].rate; /* the limit that refused it, for the error text */
            l->bandwidth = ch->anc[i].bw;
            *shared = 1;
            return lim;
        }
    }
    bucket_take(ch->leaf, l, m->plen);
    for (uint32_t i = 0; i < ch->nanc; i++)
        bucket_take_rb(&ch->anc[i].c->b, ch->anc[i].rate, ch->anc[i].bw, m->plen);
    return LIM_OK;
}

/* The automatic error reply to a call the limits refused: FLAG_ERROR, data[0] = the capbus error
 * code, a short text. Dropped if the response ring is full (a client that does not read its
 * replies has no use for it). */
static int ss_refuse_call(ServerSetObject *S, chan_t *ch, uint64_t tag, int lim,
                          const limits_t *l, int shared, uint64_t plen, const char **why)
{
    char text[LM_INLINE_SIZE * 2];
    uint64_t code = code_invalid_capability;
    switch (lim) {
    case LIM_RIGHTS:
        snprintf(text, sizeof text, "the capability does not carry the right to send");
        break;
    case LIM_EXPIRED:
        snprintf(text, sizeof text, "the capability has expired");
        break;
    case LIM_SIZE:
        code = code_message_too_large;
        snprintf(text, sizeof text, "payload of %llu bytes exceeds the capability's limit of %llu",
                 (unsigned long long)plen, (unsigned long long)l->max_size);
        break;
    case LIM_RATE:
        code = code_rate_limit;
        snprintf(text, sizeof text, "rate limit of %llu messages/s exceeded%s",
                 (unsigned long long)l->rate, shared ? " (a parent capability's)" : "");
        break;
    default:
        code = code_rate_limit;
        snprintf(text, sizeof text, "bandwidth limit of %llu bytes/s exceeded%s",
                 (unsigned long long)l->bandwidth, shared ? " (a parent capability's)" : "");
        break;
    }
    outmsg_t e;
    e.capability = 0;
    e.opcode = 0;
    e.flags = FLAG_ERROR | FLAG_IPC_ERROR;
    e.data[0] = code;
    e.data[1] = e.data[2] = e.data[3] = 0;
    e.tag = tag;
    e.payload = (const uint8_t *)text;
    e.plen = strlen(text);
    if (e.plen > LM_INLINE_SIZE)
        e.flags |= FLAG_LARGE;
    int r = ss_write_reply(S, ch, &e, why, 0); /* recv is active: ch stays valid */
    return r == RG_CORRUPT ? P_CORRUPT : P_TURN;
}

/* The limits for a popped message (CTRL_F_ENFORCE is set). P_DELIVERED: it passes (its tokens
 * are taken). Otherwise it is consumed and refused: not delivered, a call answered with an
 * error, and its turn used up (a client flooding refused messages cannot hold the server on its
 * channel): P_TURN, or P_CORRUPT if the error reply found the response ring scribbled. Out of
 * line: only channels whose capability carries a limit come here, and the others keep a
 * smaller hot path. */
static __attribute__((noinline, cold)) int ss_limits(ServerSetObject *S, chan_t *ch,
                                                     inmsg_t *m, const char **why)
{
    static const unsigned drop_off[LIM_NREASONS] = {
        [LIM_RIGHTS] = SSTATS_DROPS_RIGHTS_OFF, [LIM_EXPIRED] = SSTATS_DROPS_EXPIRED_OFF,
        [LIM_SIZE] = SSTATS_DROPS_SIZE_OFF,     [LIM_RATE] = SSTATS_DROPS_RATE_OFF,
        [LIM_BANDWIDTH] = SSTATS_DROPS_BANDWIDTH_OFF,
    };
    limits_t l;
    int shared = 0;
    int lim = ss_enforce(ch, m, &l, &shared);
    if (lim == LIM_OK)
        return P_DELIVERED;
    ch->drops[lim]++;
    stat_add(ch->map + CHAN_SSTATS_OFF, ch->sst, drop_off[lim], 1);
    ch->last_tag = m->s.tag;
    ch_consume(ch, m, 0);
    if ((m->s.flags & FLAG_REPLY_EXPECTED) && !ch->draining && ctrl_state(ch->ctrl) == STATE_OPEN)
        return ss_refuse_call(S, ch, m->s.tag, lim, &l, shared, m->plen, why);
    return P_TURN;
}

/* A zero-copy payload: a read-only view of the arena chunk, whose checksum (if any) is verified
 * in place. NULL with an exception, or with *corrupt_why set and no exception. */
static PyObject *zc_payload(ServerSetObject *S, chan_t *ch, const inmsg_t *m, ZBufObject **E,
                            const char **corrupt_why)
{
    int r;
    if ((m->s.flags & FLAG_CHECKSUM) && m->plen >= NOGIL_COPY_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        r = cons_check_in_place(&ch->req, m, corrupt_why);
        Py_END_ALLOW_THREADS
    } else {
        r = cons_check_in_place(&ch->req, m, corrupt_why);
    }
    if (r != RG_OK)
        return NULL;
    return zb_view((PyObject *)S, ch->req.arena + m->pay_off, m->plen, 1, E);
}

/* Pop one request from channel ch (GIL held). */
static HOT int ss_pop(ServerSetObject *S, chan_t *ch, PyObject **out, const char **why)
{
    if (ch->draining) {
        if (ch->req.head == ch->drain_end || ctrl_state(ch->ctrl) == STATE_REVOKED)
            return P_RETIRE;
    } else if (ctrl_state(ch->ctrl) != STATE_OPEN) {
        return P_EMPTY; /* skipped until the kernel removes it (or reopens it) */
    }
    if (__builtin_expect(ch_zq_full(ch), 0)) {
        /* Every consumption may need a queue entry: not served until a release (which clears
         * the flag and kicks us). RELAXED: see ss_full_scan. */
        __atomic_store_n(&ch->zc_blocked, 1, __ATOMIC_RELAXED);
        return P_EMPTY;
    }
    int r = cons_poll(&ch->req, why);
    if (r == RG_EMPTY)
        return ch->draining ? P_RETIRE : P_EMPTY;
    inmsg_t m;
    if (r == RG_CORRUPT || cons_read(&ch->req, &m, why) != RG_OK)
        return P_CORRUPT;
    if (m.s.tag <= ch->last_tag) {
        *why = "request tag did not increase";
        return P_CORRUPT;
    }
    char *sblk = ch->map + CHAN_SSTATS_OFF;
    /* Only calls are cancelled: a client's calls are synchronous, so when the call with tag T
     * timed out every call before it is finished or cancelled too; one-way sends queued before
     * it are still wanted. RELAXED: the mark is a hint about the client's own requests. */
    uint64_t cancel_below =
        __atomic_load_n((uint64_t *)(ch->map + CHAN_CANCEL_BELOW_OFF), __ATOMIC_RELAXED);
    if ((m.s.flags & FLAG_REPLY_EXPECTED) && m.s.tag < cancel_below) {
        ch->last_tag = m.s.tag;
        ch_consume(ch, &m, 0);
        stat_add(sblk, ch->sst, SSTATS_CANCELLED_OFF, 1);
        return P_SKIPPED;
    }
    /* The capability's limits: one predictable branch when the kernel set none. */
    if (__builtin_expect(ctrl_flags(ch->ctrl) & CTRL_F_ENFORCE, 0)) {
        int p = ss_limits(S, ch, &m, why);
        if (p != P_DELIVERED)
            return p;
    }
    /* Allocate everything first: a failure (or a GC run releasing other requests) must find the
     * message unconsumed and the held-chunk queue untouched. */
    PyObject *payload = NULL;
    ZBufObject *E = NULL;
    int zc = m.has_payload && ((m.s.flags & FLAG_LOANED) || m.plen >= ZC_THRESHOLD);
    if (zc) {
        if (!ch->zq && ch_zq_alloc(ch) < 0)
            return P_ERROR;
        *why = NULL;
        payload = zc_payload(S, ch, &m, &E, why);
        if (!payload)
            return *why ? P_CORRUPT : P_ERROR;
    } else if (m.has_payload) {
        *why = NULL;
        payload = take_payload(&ch->req, &m, why);
        if (!payload)
            return *why ? P_CORRUPT : P_ERROR;
    }
    PyObject *opcode_o = u64_object(m.s.opcode);
    RequestObject *R = opcode_o ? request_alloc() : NULL;
    if (!R) {
        Py_XDECREF(opcode_o);
        Py_XDECREF(payload); /* frees E too */
        return P_ERROR; /* not consumed: the next recv gets it again */
    }
    Py_INCREF(S);
    R->set = S;
    R->opcode_o = opcode_o;
    R->payload = payload ? payload : Py_NewRef(empty_bytes);
    R->plen = m.plen;
    R->tag = m.s.tag;
    R->capability = m.s.capability;
    R->sender = ch->sender_id;
    R->serial = ch->serial;
    R->generation = ch->generation;
    memcpy(R->data, m.s.data, sizeof R->data);
    R->index = ch->index;
    R->opcode = m.s.opcode;
    R->flags = m.s.flags;
    ch->last_tag = m.s.tag;
    uint64_t seq = ch_consume(ch, &m, zc);
    if (zc) {
        Py_INCREF(E);
        R->zbuf = E;
        E->ch = ch;
        E->seq = seq;
        E->held = 1;
        ch->views++;
    }
    stat_add(sblk, ch->sst, SSTATS_RECEIVED_OFF, 1);
    if (m.plen)
        stat_add(sblk, ch->sst, SSTATS_BYTES_RECEIVED_OFF, m.plen);
    stat_second(sblk, ch->sst, S->coarse_now, 1);
    *out = (PyObject *)R;
    return P_DELIVERED;
}

enum { TK_ERROR = -1, TK_NONE = 0, TK_GOT = 1, TK_BUDGET = 2 };

/* Take the next message without waiting (GIL and recv_mu held). TK_GOT with *out; TK_NONE when
 * nothing is ready (every ring was looked at, or with will_wait every hint); TK_BUDGET when *budget pops delivered nothing (a
 * client can make its ring flicker, or stream cancelled requests, as fast as we look: the
 * caller re-checks its deadline and signals before going on); TK_ERROR with an exception. With
 * defer, a corrupt channel is recorded for the next call instead of raised. */
static HOT int ss_take(ServerSetObject *S, PyObject **out, int *refreshes, unsigned *budget,
                   int defer, int will_wait)
{
    const char *why = NULL;
    for (;;) {
        S->coarse_now = coarse_ns(); /* also the metrics' clock for what ss_pop delivers */
        if (__atomic_load_n(&S->rescan, __ATOMIC_RELAXED) ||
            S->coarse_now - S->last_full_scan >= FULL_SCAN_NS) {
            __atomic_store_n(&S->rescan, 0, __ATOMIC_RELAXED); /* before the scan: none missed */
            ss_full_scan(S, S->coarse_now);
        }
        if (!*budget)
            return TK_BUDGET;
        int i = ss_pick(S, refreshes, will_wait);
        if (i < 0)
            return TK_NONE;
        (*budget)--;
        chan_t *ch = S->table[i];
        int p = ch ? ss_pop(S, ch, out, &why) : P_EMPTY;
        if (p == P_CORRUPT && ch->draining)
            p = P_RETIRE; /* its index may belong to a new channel: nothing to report */
        switch (p) {
        case P_DELIVERED:
            S->rr = (uint32_t)i + 1;
            return TK_GOT;
        case P_SKIPPED: /* same channel again: a cancelled request does not use up its turn */
            continue;
        case P_TURN:
            S->rr = (uint32_t)i + 1;
            continue;
        case P_EMPTY:
            S->ready[i / 64] &= ~(1ull << (i % 64));
            continue;
        case P_RETIRE:
            S->ready[i / 64] &= ~(1ull << (i % 64));
            ss_unlink(S, ch);
            continue;
        case P_CORRUPT:
            S->ready[i / 64] &= ~(1ull << (i % 64));
            ss_mark_dead(S, ch);
            if (defer) {
                S->pend_corrupt = 1;
                S->pend_index = ch->index;
                S->pend_why = why;
                return TK_NONE;
            }
            raise_corrupt(ch->index, why);
            return TK_ERROR;
        default:
            return TK_ERROR;
        }
    }
}

/* Raise the CorruptChannel a recv_many deferred, or one a reply found (recv_mu held). */
static HOT int ss_raise_pending(ServerSetObject *S)
{
    if (__builtin_expect(S->reports, 0)) {
        for (uint32_t i = 0; i < TABLE_SLOTS; i++) {
            chan_t *ch = S->table[i];
            if (ch && ch->report_why && !ch->reported) {
                ch->reported = 1;
                S->reports--;
                raise_corrupt(ch->index, ch->report_why);
                return -1;
            }
        }
        S->reports = 0; /* removed meanwhile: nothing left to report */
    }
    if (!S->pend_corrupt)
        return 0;
    S->pend_corrupt = 0;
    raise_corrupt(S->pend_index, S->pend_why);
    return -1;
}

/* A message was returned: the event loop is awake, so the doorbell needs no eventfd write. Load
 * first so the shared line is not dirtied per message. RELAXED: a hint (see poll_armed). */
static inline void ss_clear_event(ServerSetObject *S)
{
    uint32_t *ew = (uint32_t *)(S->db + DB_EVENT_WANTED_OFF);
    if (__atomic_load_n(ew, __ATOMIC_RELAXED))
        __atomic_store_n(ew, 0, __ATOMIC_RELAXED);
}

/* recv_mu for a receive (GIL held on entry and exit); -1 if the set was closed meanwhile. */
static HOT int ss_enter(ServerSetObject *S, int wait)
{
    if (!gl_try(&S->recv_mu)) {
        if (!wait)
            return 1;
        gl_acquire(&S->recv_mu);
    }
    if (!S->db) { /* closed while we waited for the lock */
        gl_release(&S->recv_mu);
        PyErr_SetString(PyExc_ValueError, "ServerSet is closed");
        return -1;
    }
    S->recv_active = 1;
    return 0;
}

static HOT void ss_leave(ServerSetObject *S)
{
    S->recv_active = 0;
    gl_release(&S->recv_mu);
    ss_reap(S);
}

/* Wait (per wait mode) until a message is taken or the deadline passes. TK_GOT, TK_NONE (deadline)
 * or TK_ERROR (CorruptChannel, Cancelled, a signal handler's exception). recv_mu held. */
static HOT int ss_take_wait(ServerSetObject *S, PyObject **out, uint64_t deadline)
{
    int refreshes = 2;
    unsigned budget = 2 * MAX_CHANNELS;
    for (;;) {
        /* Load first: the locked exchange only when interrupt() was called. */
        if (__atomic_load_n(&S->interrupt, __ATOMIC_RELAXED) &&
            __atomic_exchange_n(&S->interrupt, 0, __ATOMIC_RELAXED)) {
            PyErr_SetString(Cancelled, "recv interrupted");
            return TK_ERROR;
        }
        /* With no deadline, nothing found means ss_wait next: its full scan comes after the
         * fence, so the one before it would only repeat it. */
        int t = ss_take(S, out, &refreshes, &budget, 0, deadline == UINT64_MAX);
        if (t == TK_GOT || t == TK_ERROR)
            return t;
        if (deadline != UINT64_MAX && now_ns() >= deadline)
            return TK_NONE;
        int w;
        Py_BEGIN_ALLOW_THREADS
        w = ss_wait(S, deadline);
        Py_END_ALLOW_THREADS
        refreshes = 2;
        budget = 2 * MAX_CHANNELS;
        if (w == W_INTERRUPT)
            continue;
        if (PyErr_CheckSignals() < 0)
            return TK_ERROR;
    }
}

static PyObject *ss_recv(ServerSetObject *S, int64_t timeout_ns);

/* recv(timeout_ns=-1) -> Request. Timeout if nothing arrives; CorruptChannel for a bad channel
 * (then call again); Cancelled after interrupt(). */
static PyObject *ServerSet_recv(ServerSetObject *S, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "recv(timeout_ns=-1)");
        return NULL;
    }
    int64_t timeout_ns = -1;
    if (nargs == 1 && to_i64_timeout(args[0], &timeout_ns) < 0)
        return NULL;
    return ss_recv(S, timeout_ns);
}

static HOT PyObject *ss_recv(ServerSetObject *S, int64_t timeout_ns)
{
    if (!ss_usable(S))
        return NULL;
    uint64_t deadline = deadline_after(timeout_ns);
    if (ss_enter(S, 1) < 0)
        return NULL;
    PyObject *result = NULL;
    if (ss_raise_pending(S) == 0) {
        int t = ss_take_wait(S, &result, deadline);
        if (t == TK_GOT)
            ss_clear_event(S);
        else if (t == TK_NONE)
            PyErr_SetString(Timeout, "no request arrived in time");
    }
    ss_leave(S);
    return result;
}

/* recv_many(max_n, timeout_ns=-1) -> list of Requests: waits for one, then takes up to max_n
 * in all without waiting, round robin one per channel per turn. [] on timeout. */
static PyObject *ServerSet_recv_many(ServerSetObject *S, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "recv_many(max_n, timeout_ns=-1)");
        return NULL;
    }
    Py_ssize_t max_n = PyLong_AsSsize_t(args[0]);
    if (max_n == -1 && PyErr_Occurred())
        return NULL;
    if (max_n < 1) {
        PyErr_SetString(PyExc_ValueError, "max_n must be >= 1");
        return NULL;
    }
    int64_t timeout_ns = -1;
    if (nargs == 2 && to_i64_timeout(args[1], &timeout_ns) < 0)
        return NULL;
    if (!ss_usable(S))
        return NULL;
    uint64_t deadline = deadline_after(timeout_ns);
    PyObject *list = PyList_New(0);
    if (!list)
        return NULL;
    if (ss_enter(S, 1) < 0) {
        Py_DECREF(list);
        return NULL;
    }
    PyObject *one = NULL;
    if (ss_raise_pending(S) < 0)
        goto fail;
    int t = ss_take_wait(S, &one, deadline);
    if (t == TK_ERROR)
        goto fail;
    if (t == TK_GOT) {
        int r = PyList_Append(list, one);
        Py_DECREF(one);
        if (r < 0)
            goto fail;
        int refreshes = 1;
        unsigned budget = 2 * MAX_CHANNELS;
        while (PyList_GET_SIZE(list) < max_n) {
            t = ss_take(S, &one, &refreshes, &budget, 1, 0);
            if (t != TK_GOT)
                break;
            r = PyList_Append(list, one);
            Py_DECREF(one);
            if (r < 0)
                break;
        }
        /* Whatever stopped the gathering (nothing more, the budget, a failed allocation -- the
         * message then stays in its ring), the gathered messages are returned; a corrupt channel
         * was recorded for the next call. */
        PyErr_Clear();
        ss_clear_event(S);
    }
    ss_leave(S);
    return list;
fail:
    ss_leave(S);
    Py_DECREF(list);
    return NULL;
}

/* poll() / poll_armed(): take a message without waiting (None if there is none, or if another
 * thread is receiving). Armed: see the API comment. */
static PyObject *ss_poll(ServerSetObject *S, int arm)
{
    if (!ss_usable(S))
        return NULL;
    int e = ss_enter(S, 0);
    if (e < 0)
        return NULL;
    if (e > 0)
        Py_RETURN_NONE; /* another thread is in recv: it takes the messages */
    PyObject *result = NULL;
    int t = TK_ERROR;
    if (ss_raise_pending(S) == 0) {
        int refreshes = 1;
        unsigned budget = 2 * MAX_CHANNELS;
        t = ss_take(S, &result, &refreshes, &budget, 0, 0);
        if (t == TK_NONE && arm) {
            /* Empty the eventfd (a write before this belongs to a message the scan below sees;
             * a stale count would only wake the loop for nothing). Then RELAXED store + SEQ_CST
             * fence + full scan, Dekker with lane_ring_doorbell ("publish; bump seq; fence; load
             * event_wanted"): either the scan sees the client's tail, or the client sees the
             * flag and writes the eventfd. */
            if (S->event_efd >= 0)
                efd_drain(S->event_efd);
            /* An event loop waits on the eventfd: clients must do the whole handshake from now
             * on (a spinning server stops advertising that it spins, for good). */
            __atomic_store_n((uint32_t *)(S->db + DB_SERVER_SPINS_OFF), 0, __ATOMIC_RELAXED);
            __atomic_store_n((uint32_t *)(S->db + DB_EVENT_WANTED_OFF), 1, __ATOMIC_RELAXED);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            ss_full_scan(S, coarse_ns());
            refreshes = 0;
            t = ss_take(S, &result, &refreshes, &budget, 0, 0);
        }
        if (t == TK_GOT)
            ss_clear_event(S);
        else if (t == TK_BUDGET && arm && S->event_efd >= 0)
            efd_signal(S->event_efd); /* more to look at: come straight back */
    }
    ss_leave(S);
    if (t == TK_GOT)
        return result;
    if (t == TK_ERROR)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *ServerSet_poll(ServerSetObject *S, PyObject *unused) { return ss_poll(S, 0); }
static PyObject *ServerSet_poll_armed(ServerSetObject *S, PyObject *unused)
{
    return ss_poll(S, 1);
}

/* reply(index, tag, opcode, flags, data, payload=None): never blocks. */
static PyObject *ServerSet_reply(ServerSetObject *S, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 5 || nargs > 6) {
        PyErr_SetString(PyExc_TypeError, "reply(index, tag, opcode, flags, data, payload=None)");
        return NULL;
    }
    if (!ss_usable(S))
        return NULL;
    uint64_t index;
    outmsg_t m;
    m.capability = 0;
    if (to_u64(args[0], &index, "index") < 0 || to_u64(args[1], &m.tag, "tag") < 0 ||
        to_u32(args[2], &m.opcode, "opcode") < 0 || parse_flags(args[3], &m.flags, 0) < 0 ||
        parse_data(args[4], m.data) < 0)
        return NULL;
    chan_t *ch = index < MAX_CHANNELS ? S->table[index] : NULL;
    if (!ch || __atomic_load_n(&ch->dead, __ATOMIC_RELAXED)) {
        if (ch)
            stat_add(ch->map + CHAN_SSTATS_OFF, ch->sst, SSTATS_REPLY_FAILED_OFF, 1);
        PyErr_Format(PeerDied, "channel %llu is gone", (unsigned long long)index);
        return NULL;
    }
    uint32_t st = ctrl_state(ch->ctrl);
    if (st != STATE_OPEN) {
        stat_add(ch->map + CHAN_SSTATS_OFF, ch->sst, SSTATS_REPLY_FAILED_OFF, 1);
        PyErr_Format(PeerDied, "channel %llu is not open (state %u)", (unsigned long long)index,
                     st);
        return NULL;
    }
    Py_buffer view;
    if (parse_payload(nargs > 5 ? args[5] : Py_None, &m, &view, max_payload_for(ch->resp.asize),
                      0) < 0)
        return NULL;
    const char *why = NULL;
    int r = ss_write_reply(S, ch, &m, &why, 1); /* ch may be gone after this */
    release_view(&view);
    return reply_outcome(r, (uint32_t)index, why);
}

static PyObject *ServerSet_interrupt(ServerSetObject *S, PyObject *unused)
{
    if (!S->db) {
        PyErr_SetString(PyExc_ValueError, "ServerSet is closed");
        return NULL;
    }
    if (S->fork_gen != fork_gen)
        Py_RETURN_NONE; /* a forked child's Service.close(): nothing of it runs here */
    /* RELAXED flag + the wake-up below (the waiter re-reads the flag after waking). */
    __atomic_store_n(&S->interrupt, 1, __ATOMIC_RELAXED);
    ss_wake_sleeper(S);
    Py_RETURN_NONE;
}

static PyObject *ServerSet_close(ServerSetObject *S, PyObject *unused)
{
    if (S->recv_active) {
        PyErr_SetString(PyExc_RuntimeError, "recv() is running in another thread");
        return NULL;
    }
    for (uint32_t i = 0; i < TABLE_SLOTS; i++)
        if (S->table[i] && S->table[i]->users) {
            PyErr_SetString(PyExc_RuntimeError, "reply() is running in another thread");
            return NULL;
        }
    ss_free_all(S);
    Py_RETURN_NONE;
}

static PyObject *ServerSet_contains(ServerSetObject *S, PyObject *arg)
{
    unsigned long long index = PyLong_AsUnsignedLongLong(arg);
    if (index == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        Py_RETURN_FALSE;
    }
    return PyBool_FromLong(index < MAX_CHANNELS && S->table[index]);
}

static PyObject *ServerSet_is_dead(ServerSetObject *S, PyObject *arg)
{
    chan_t *ch = ss_lookup(S, arg);
    return ch ? PyBool_FromLong(__atomic_load_n(&ch->dead, __ATOMIC_RELAXED)) : NULL;
}

static PyObject *ServerSet_refused(ServerSetObject *S, PyObject *arg)
{
    chan_t *ch = ss_lookup(S, arg);
    if (!ch)
        return NULL;
    /* RELAXED: an informational, client-written number; nothing is read through it. */
    return PyLong_FromUnsignedLongLong(
        __atomic_load_n((uint64_t *)(ch->map + CHAN_REFUSED_OFF), __ATOMIC_RELAXED));
}

static PyObject *ServerSet_drops(ServerSetObject *S, PyObject *arg)
{
    chan_t *ch = ss_lookup(S, arg);
    if (!ch)
        return NULL;
    return Py_BuildValue("{sKsKsKsKsK}", "rate", (unsigned long long)ch->drops[LIM_RATE],
                         "bandwidth", (unsigned long long)ch->drops[LIM_BANDWIDTH], "size",
                         (unsigned long long)ch->drops[LIM_SIZE], "expired",
                         (unsigned long long)ch->drops[LIM_EXPIRED], "rights",
                         (unsigned long long)ch->drops[LIM_RIGHTS]);
}

static Py_ssize_t ServerSet_len(ServerSetObject *S) { return S->nchan; }

static PyObject *ServerSet_get_draining(ServerSetObject *S, void *c)
{
    Py_ssize_t n = 0;
    for (uint32_t w = 0; w < MAX_CHANNELS / 64; w++)
        n += __builtin_popcountll(S->drain_used[w]);
    return PyLong_FromSsize_t(n);
}

static PyMethodDef ServerSet_methods[] = {
    {"add", (PyCFunction)(void (*)(void))ServerSet_add, METH_VARARGS | METH_KEYWORDS,
     "add(index, chan_fd, ctrl_fd, nslots=256, arena_size=128 MiB, sender_id=None, "
     "reply_event_fd=-1, reply_sleep_fd=-1, reply_sleep_keep_fd=-1, generation=0)"},
    {"remove", (PyCFunction)(void (*)(void))ServerSet_remove, METH_VARARGS | METH_KEYWORDS,
     "remove(index, drain=False): drain=True still delivers the requests already in the ring"},
    {"recv", (PyCFunction)(void (*)(void))ServerSet_recv, METH_FASTCALL,
     "recv(timeout_ns=-1) -> Request"},
    {"recv_many", (PyCFunction)(void (*)(void))ServerSet_recv_many, METH_FASTCALL,
     "recv_many(max_n, timeout_ns=-1) -> list of Requests ([] on timeout)"},
    {"poll", (PyCFunction)ServerSet_poll, METH_NOARGS, "poll() -> Request or None (never waits)"},
    {"poll_armed", (PyCFunction)ServerSet_poll_armed, METH_NOARGS,
     "poll_armed() -> Request or None; None means armed: a client's next message writes the "
     "event fd"},
    {"reply", (PyCFunction)(void (*)(void))ServerSet_reply, METH_FASTCALL,
     "reply(index, tag, opcode, flags, data, payload=None)"},
    {"interrupt", (PyCFunction)ServerSet_interrupt, METH_NOARGS,
     "Make the running (or the next) recv raise Cancelled."},
    {"close", (PyCFunction)ServerSet_close, METH_NOARGS, "Unmap every channel and the doorbell."},
    {"is_dead", (PyCFunction)ServerSet_is_dead, METH_O,
     "is_dead(index) -> bool: was the channel found corrupt?"},
    {"refused", (PyCFunction)ServerSet_refused, METH_O,
     "refused(index) -> int: messages the client says it could not queue (untrusted)"},
    {"drops", (PyCFunction)ServerSet_drops, METH_O,
     "drops(index) -> dict(rate, bandwidth, size, expired, rights): messages refused by the "
     "capability's limits"},
    {"__contains__", (PyCFunction)ServerSet_contains, METH_O | METH_COEXIST, NULL},
    {NULL, NULL, 0, NULL},
};

static PyObject *ServerSet_get_buckets(ServerSetObject *S, void *c)
{
    return PyLong_FromUnsignedLong(S->buckets.n);
}

static PyGetSetDef ServerSet_getset[] = {
    {"draining", (getter)ServerSet_get_draining, NULL, "channels still being drained", NULL},
    {"buckets", (getter)ServerSet_get_buckets, NULL,
     "token buckets held per capability (pinned by channels, or idle until refilled)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static int ServerSet_sq_contains(ServerSetObject *S, PyObject *arg)
{
    PyObject *r = ServerSet_contains(S, arg);
    int v = r == Py_True;
    Py_XDECREF(r);
    return v;
}

static PySequenceMethods ServerSet_as_seq = {
    .sq_length = (lenfunc)ServerSet_len,
    .sq_contains = (objobjproc)ServerSet_sq_contains,
};

static PyTypeObject ServerSetType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "capbus._core.ServerSet",
    .tp_basicsize = sizeof(ServerSetObject),
    .tp_dealloc = (destructor)ServerSet_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "ServerSet(doorbell_fd, wait_mode=1, spin_ns=50000, event_fd=-1, sleep_fd=-1): "
              "the service end.",
    .tp_methods = ServerSet_methods,
    .tp_getset = ServerSet_getset,
    .tp_as_sequence = &ServerSet_as_seq,
    .tp_init = (initproc)ServerSet_init,
    .tp_new = ServerSet_new,
};

/* =============================================================================================
 * Fronts: the native halves of capbus.Endpoint and capbus.Service.
 *
 * Endpoint.call, Endpoint.send_async and Service.recv are the calls every message goes through.
 * Here they run without a Python frame of their own: on one CPU a blocking round trip costs the
 * sum of both sides' work, and a frame on each side was ~10% of it (and ~40% of an unbatched
 * send_async). Only the plain case runs here; anything else (flags, delegated capabilities or
 * regions, a closed service, a corrupt channel) calls the Python method of the same name with
 * "_slow" appended, which is the reference behaviour. A thread's lane comes from the Python
 * method _thread_core() and is cached for that thread (its PyThreadState id, never reused in
 * this interpreter) and this process (fork_gen: a forked child asks again, and is refused).
 * ============================================================================================= */

static PyObject *str_call_slow, *str_send_async_slow, *str_recv_slow, *str_thread_core,
    *str_remote_error, *str_claim, *int_zero;

/* Call self.<name>(*args, **kw) with the arguments of a METH_FASTCALL|METH_KEYWORDS call. */
static PyObject *front_slow(PyObject *self, PyObject *name, PyObject *const *args,
                            Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *stack[1 + 16];
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs + nkw > 16) {
        PyErr_SetString(PyExc_TypeError, "too many arguments");
        return NULL;
    }
    stack[0] = self;
    memcpy(stack + 1, args, (size_t)(nargs + nkw) * sizeof(PyObject *));
    return PyObject_VectorcallMethod(name, stack, 1 + nargs, kwnames);
}

/* timeout (seconds, None = no deadline) -> ns, -1 for none: as endpoint.timeout_ns(). */
static HOT int front_timeout(PyObject *o, int64_t *out)
{
    *out = -1;
    if (!o || o == Py_None)
        return 0;
    double t = PyFloat_AsDouble(o);
    if (t == -1.0 && PyErr_Occurred())
        return -1;
    if (!(t >= 0)) {
        PyErr_SetString(PyExc_ValueError, "timeout must be >= 0 or None");
        return -1;
    }
    if (t * 1e9 < 9.2e18) /* beyond ~292 years: no deadline */
        *out = (int64_t)(t * 1e9);
    return 0;
}

/* The payload argument of Endpoint.call/send_async: NULL for none (None, or any empty
 * bytes-like object). Judged by its length in bytes, never by truthiness: a numpy array is its
 * bytes (np.zeros(1) is 8 bytes, not "false"). Anything else goes on to parse_payload, which
 * says what it needs. */
static HOT int front_payload(PyObject *o, PyObject **out)
{
    *out = NULL;
    if (!o || o == Py_None)
        return 0;
    if (PyBytes_CheckExact(o)) {
        if (PyBytes_GET_SIZE(o))
            *out = o;
        return 0;
    }
    if (PyMemoryView_Check(o)) {
        if (PyMemoryView_GET_BUFFER(o)->len)
            *out = o;
        return 0;
    }
    if (PyObject_CheckBuffer(o)) {
        Py_buffer v;
        if (PyObject_GetBuffer(o, &v, PyBUF_SIMPLE) < 0)
            return payload_type_error(o);
        Py_ssize_t n = v.len;
        PyBuffer_Release(&v);
        if (!n)
            return 0;
    }
    *out = o;
    return 0;
}

/* Anything the native path does not handle: nonzero flags, or capabilities/regions to pass. */
static HOT int front_plain(PyObject *flags, PyObject *caps, PyObject *regions)
{
    if (flags && flags != int_zero) { /* 0 is a cached small int: usually the same object */
        if (!PyLong_Check(flags))
            return 0;
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(flags, &overflow);
        if (v == -1 && PyErr_Occurred())
            PyErr_Clear(); /* the Python path raises it again */
        if (v != 0 || overflow)
            return 0;
    }
    for (int i = 0; i < 2; i++) {
        PyObject *o = i ? regions : caps;
        if (!o)
            continue;
        if ((PyTuple_CheckExact(o) && PyTuple_GET_SIZE(o) == 0) ||
            (PyList_CheckExact(o) && PyList_GET_SIZE(o) == 0))
            continue;
        return 0; /* the Python path decides (an empty generator is not "no caps" there either) */
    }
    return 1;
}

typedef struct {
    PyObject_HEAD
    PyObject *handle;       /* the capability's handle (an int), or NULL before it is set */
    uint64_t handle_u64;    /* the same, converted once */
    LaneObject *lane;       /* the lane of the thread that called last (strong), or NULL */
    uint64_t lane_tid;      /* that thread's PyThreadState id */
    unsigned long lane_fork_gen;
    uint64_t lane_epoch;    /* bumped when the handle changes or lanes are forgotten */
} EndpointBaseObject;

/* This thread's lane (a new reference), or NULL with an exception. */
static HOT LaneObject *ep_lane(EndpointBaseObject *E)
{
    uint64_t tid = PyThreadState_GetID(PyThreadState_Get());
    if (E->lane && E->lane_tid == tid && E->lane_fork_gen == fork_gen)
        return (LaneObject *)Py_NewRef(E->lane);
    uint64_t epoch = E->lane_epoch;
    PyObject *core = PyObject_CallMethodNoArgs((PyObject *)E, str_thread_core);
    if (!core)
        return NULL;
    if (!PyObject_TypeCheck(core, &LaneType)) {
        PyErr_Format(PyExc_TypeError, "_thread_core() returned %.100s, not a Lane",
                     Py_TYPE(core)->tp_name);
        Py_DECREF(core);
        return NULL;
    }
    /* A reconnect changed the handle while _thread_core ran (it can give up the GIL): the lane
     * it chose may be of the old kernel. Use it for this call, but do not keep it. */
    if (E->lane_epoch != epoch)
        return (LaneObject *)core;
    Py_XSETREF(E->lane, (LaneObject *)Py_NewRef(core));
    E->lane_tid = tid;
    E->lane_fork_gen = fork_gen;
    return (LaneObject *)core;
}

static HOT int ep_handle(EndpointBaseObject *E)
{
    if (!E->handle) {
        PyErr_SetString(PyExc_AttributeError, "the endpoint has no handle yet");
        return -1;
    }
    return 0;
}

static const char *const ep_call_kw[] = {"opcode", "data", "payload", "timeout", "flags", "caps",
                                         "regions", "move", NULL};
static const char *const ep_send_kw[] = {"opcode", "data", "payload", "flags", "caps", "regions",
                                         "move", NULL};

/* The plain case of call/send_async up to a prepared message: this thread's lane (a new
 * reference), or NULL with an exception. payload_arg as given (`payload or None` is applied). */
static HOT LaneObject *ep_prepare(EndpointBaseObject *E, PyObject *opcode, PyObject *data,
                              PyObject *payload_arg, uint32_t extra, outmsg_t *m, Py_buffer *view,
                              charge_t *c)
{
    PyObject *payload;
    if (ep_handle(E) < 0 || front_payload(payload_arg, &payload) < 0)
        return NULL;
    LaneObject *L = ep_lane(E);
    if (!L)
        return NULL;
    PyObject *la[5] = {NULL, opcode, int_zero, data ? data : empty_tuple, payload};
    m->capability = E->handle_u64;
    if (lane_prepare(L, la, extra, m, view, c) < 0) {
        Py_DECREF(L);
        return NULL;
    }
    return L;
}

/* call(opcode, data=(), payload=b"", timeout=None, flags=0, caps=(), regions=(), move=False) */
static HOT PyObject *EP_call(EndpointBaseObject *E, PyObject *const *args, Py_ssize_t nargs,
                         PyObject *kwnames)
{
    PyObject *a[8];
    if (fast_args("call", args, nargs, kwnames, ep_call_kw, 1, a) < 0)
        return NULL;
    if (!front_plain(a[4], a[5], a[6]))
        return front_slow((PyObject *)E, str_call_slow, args, nargs, kwnames);
    int64_t tns;
    if (front_timeout(a[3], &tns) < 0)
        return NULL;
    outmsg_t m;
    Py_buffer view;
    charge_t c;
    LaneObject *L = ep_prepare(E, a[0], a[1], a[2], FLAG_REPLY_EXPECTED, &m, &view, &c);
    if (!L)
        return NULL;
    PyObject *r = lane_call_run(L, &m, &view, &c, tns, 0);
    Py_DECREF(L);
    if (r && (PyLong_AsUnsignedLong(PyTuple_GET_ITEM(r, 1)) & FLAG_ERROR)) {
        PyObject *exc = PyObject_CallMethodOneArg((PyObject *)E, str_remote_error, r);
        Py_DECREF(r);
        if (exc) {
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            Py_DECREF(exc);
        }
        return NULL;
    }
    return r;
}

/* send_async(opcode, data=(), payload=b"", flags=0, caps=(), regions=(), move=False) */
static PyObject *EP_send_async(EndpointBaseObject *E, PyObject *const *args, Py_ssize_t nargs,
                               PyObject *kwnames)
{
    PyObject *a[7];
    if (fast_args("send_async", args, nargs, kwnames, ep_send_kw, 1, a) < 0)
        return NULL;
    if (!front_plain(a[3], a[4], a[5]))
        return front_slow((PyObject *)E, str_send_async_slow, args, nargs, kwnames);
    outmsg_t m;
    Py_buffer view;
    charge_t c;
    LaneObject *L = ep_prepare(E, a[0], a[1], a[2], 0, &m, &view, &c);
    if (!L)
        return NULL;
    PyObject *r = lane_send_prepared(L, &m, &view, &c);
    Py_DECREF(L);
    return r;
}

/* Drop the cached lane (the endpoint was closed or revoked). */
static PyObject *EP_forget_lanes(EndpointBaseObject *E, PyObject *unused)
{
    E->lane_epoch++;
    Py_CLEAR(E->lane);
    Py_RETURN_NONE;
}

static PyObject *EP_get_handle(EndpointBaseObject *E, void *c)
{
    if (ep_handle(E) < 0)
        return NULL;
    return Py_NewRef(E->handle);
}

static int EP_set_handle(EndpointBaseObject *E, PyObject *v, void *c)
{
    uint64_t h;
    if (!v) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete handle");
        return -1;
    }
    if (!PyLong_Check(v) || to_u64(v, &h, "handle") < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "handle must be an int");
        return -1;
    }
    Py_XSETREF(E->handle, Py_NewRef(v));
    E->handle_u64 = h;
    E->lane_epoch++;
    Py_CLEAR(E->lane); /* a lane belongs to one capability */
    return 0;
}

/* Instances are of the Python subclasses, whose traverse visits the type itself (this base is a
 * static type): ours visits only our own references. */
static int EP_traverse(EndpointBaseObject *E, visitproc visit, void *arg)
{
    Py_VISIT(E->lane);
    return 0;
}

static int EP_clear(EndpointBaseObject *E)
{
    Py_CLEAR(E->lane);
    Py_CLEAR(E->handle);
    return 0;
}

static void EP_dealloc(EndpointBaseObject *E)
{
    PyTypeObject *tp = Py_TYPE(E);
    PyObject_GC_UnTrack(E);
    EP_clear(E);
    tp->tp_free((PyObject *)E);
}

static PyMethodDef EP_methods[] = {
    {"call", (PyCFunction)(void (*)(void))EP_call, METH_FASTCALL | METH_KEYWORDS,
     "call($self, /, opcode, data=(), payload=b'', timeout=None, flags=0, caps=(), regions=(),"
     " move=False)\n--\n\n"
     "Send a request and wait for the reply (a Message).\n\n"
     "Timeout cancels the transaction (a late reply is dropped); PeerDied if the server exits;\n"
     "ValueError / MessageTooLarge / RateLimitExceeded before anything is sent if the arguments\n"
     "or the capability's limits do not allow it. caps: capabilities to delegate with it (each\n"
     "needs the share right); they arrive as req.caps. regions: shared memory regions to pass\n"
     "on, arriving as req.regions; move=True transfers them (this side loses them), else they\n"
     "are shared (needs the share right)."},
    {"send_async", (PyCFunction)(void (*)(void))EP_send_async, METH_FASTCALL | METH_KEYWORDS,
     "send_async($self, /, opcode, data=(), payload=b'', flags=0, caps=(), regions=(), "
     "move=False)\n--\n\n"
     "Queue a one-way message; never blocks: WouldBlock when the receiver's ring for this\n"
     "sender is full (back-pressure: nothing is dropped silently)."},
    {"_forget_lanes", (PyCFunction)EP_forget_lanes, METH_NOARGS, "drop the cached lane"},
    {NULL},
};

static PyGetSetDef EP_getset[] = {
    {"handle", (getter)EP_get_handle, (setter)EP_set_handle, "the capability's handle", NULL},
    {NULL},
};

static PyTypeObject EndpointBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "capbus._core.EndpointBase",
    .tp_basicsize = sizeof(EndpointBaseObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The native half of capbus.Endpoint (call and send_async).",
    .tp_traverse = (traverseproc)EP_traverse,
    .tp_clear = (inquiry)EP_clear,
    .tp_dealloc = (destructor)EP_dealloc,
    .tp_methods = EP_methods,
    .tp_getset = EP_getset,
    .tp_new = PyType_GenericNew,
};

typedef struct {
    PyObject_HEAD
    ServerSetObject *set; /* _set (strong), or NULL */
    char closed;          /* _closed */
    char slow;            /* _slow: more than one ServerSet to serve (see _recv_slow) */
} ServiceBaseObject;

static const char *const sv_recv_kw[] = {"timeout", NULL};

/* recv(timeout=None) -> Request */
/* Closed because its kernel is gone for good (the Python side set _lost): recv() then raises
 * that (KernelUnavailable) rather than the Cancelled a close() gives. Cold: after an interrupt. */
static int sv_lost(ServiceBaseObject *V)
{
    if (!V->closed)
        return 0;
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyObject *lost = PyObject_GetAttrString((PyObject *)V, "_lost");
    int r = lost && lost != Py_None;
    Py_XDECREF(lost);
    PyErr_Clear();
    PyErr_Restore(et, ev, tb);
    return r;
}

static HOT PyObject *SV_recv(ServiceBaseObject *V, PyObject *const *args, Py_ssize_t nargs,
                         PyObject *kwnames)
{
    PyObject *a[1];
    if (fast_args("recv", args, nargs, kwnames, sv_recv_kw, 0, a) < 0)
        return NULL;
    if (V->closed || !V->set || V->slow)
        return front_slow((PyObject *)V, str_recv_slow, args, nargs, kwnames);
    int64_t tns;
    if (front_timeout(a[0], &tns) < 0)
        return NULL;
    uint64_t deadline = deadline_after(tns);
    ServerSetObject *S = (ServerSetObject *)Py_NewRef(V->set);
    PyObject *req = ss_recv(S, tns);
    /* Interrupted because the service closed (or lost its kernel for good: the Python side says
     * which), or because a reconnect gave it a new ServerSet: go on there, within the time left
     * (in Python while the old kernel's channels are still served beside the new ones). */
    while (!req && PyErr_ExceptionMatches(Cancelled) && (sv_lost(V) || V->set != S || V->slow)) {
        PyErr_Clear();
        Py_DECREF(S);
        if (V->closed || !V->set || V->slow)
            return front_slow((PyObject *)V, str_recv_slow, args, nargs, kwnames);
        S = (ServerSetObject *)Py_NewRef(V->set);
        uint64_t now = now_ns();
        req = ss_recv(S, deadline == UINT64_MAX ? -1 : now >= deadline ? 0 : (int64_t)(deadline - now));
    }
    Py_DECREF(S);
    if (req) {
        if (((RequestObject *)req)->flags & RT_TRANSFER_FLAG) {
            PyObject *r = PyObject_CallMethodOneArg((PyObject *)V, str_claim, req);
            if (!r)
                Py_CLEAR(req);
            Py_XDECREF(r);
        }
        return req;
    }
    if (!PyErr_ExceptionMatches(CorruptChannel))
        return NULL;
    /* Garbage on a channel: the Python loop reports it and goes on, within what is left of the
     * caller's timeout (garbage does not extend it). */
    PyObject *etype, *exc, *tb;
    PyErr_Fetch(&etype, &exc, &tb);
    PyErr_NormalizeException(&etype, &exc, &tb);
    Py_XDECREF(etype);
    Py_XDECREF(tb);
    if (!exc)
        return NULL;
    PyObject *left = Py_NewRef(Py_None);
    if (deadline != UINT64_MAX) {
        uint64_t now = now_ns();
        Py_SETREF(left, PyFloat_FromDouble(now >= deadline ? 0.0 : (deadline - now) / 1e9));
    }
    PyObject *out = NULL;
    if (left)
        out = PyObject_CallMethodObjArgs((PyObject *)V, str_recv_slow, left, exc, NULL);
    Py_XDECREF(left);
    Py_DECREF(exc);
    return out;
}

static PyObject *SV_get_set(ServiceBaseObject *V, void *c)
{
    if (!V->set) {
        PyErr_SetString(PyExc_AttributeError, "_set");
        return NULL;
    }
    return Py_NewRef(V->set);
}

static int SV_set_set(ServiceBaseObject *V, PyObject *v, void *c)
{
    if (v && !PyObject_TypeCheck(v, &ServerSetType)) {
        PyErr_SetString(PyExc_TypeError, "_set must be a ServerSet");
        return -1;
    }
    Py_XSETREF(V->set, (ServerSetObject *)Py_XNewRef(v));
    return 0;
}

static int SV_traverse(ServiceBaseObject *V, visitproc visit, void *arg)
{
    Py_VISIT(V->set);
    return 0;
}

static int SV_clear(ServiceBaseObject *V)
{
    Py_CLEAR(V->set);
    return 0;
}

static void SV_dealloc(ServiceBaseObject *V)
{
    PyTypeObject *tp = Py_TYPE(V);
    PyObject_GC_UnTrack(V);
    SV_clear(V);
    tp->tp_free((PyObject *)V);
}

static PyMethodDef SV_methods[] = {
    {"recv", (PyCFunction)(void (*)(void))SV_recv, METH_FASTCALL | METH_KEYWORDS,
     "recv($self, /, timeout=None)\n--\n\n"
     "The next message from any client (round robin across them); Timeout if none."},
    {NULL},
};

static PyMemberDef SV_members[] = {
    {"_closed", T_BOOL, offsetof(ServiceBaseObject, closed), 0, "unregistered"},
    {"_slow", T_BOOL, offsetof(ServiceBaseObject, slow), 0,
     "recv() goes to _recv_slow (channels of a former kernel are served too)"},
    {NULL},
};

static PyGetSetDef SV_getset[] = {
    {"_set", (getter)SV_get_set, (setter)SV_set_set, "the ServerSet", NULL},
    {NULL},
};

static PyTypeObject ServiceBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "capbus._core.ServiceBase",
    .tp_basicsize = sizeof(ServiceBaseObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The native half of capbus.Service (recv).",
    .tp_traverse = (traverseproc)SV_traverse,
    .tp_clear = (inquiry)SV_clear,
    .tp_dealloc = (destructor)SV_dealloc,
    .tp_methods = SV_methods,
    .tp_members = SV_members,
    .tp_getset = SV_getset,
    .tp_new = PyType_GenericNew,
};

/* set_types(message_type, request_type): the classes recv/call results are made of. */
static PyObject *py_set_types(PyObject *self, PyObject *args)
{
    PyObject *mt, *rt;
    if (!PyArg_ParseTuple(args, "OO:set_types", &mt, &rt))
        return NULL;
    if (mt != Py_None &&
        (!PyType_Check(mt) || !PyType_IsSubtype((PyTypeObject *)mt, &PyTuple_Type))) {
        PyErr_SetString(PyExc_TypeError, "message_type must be a subclass of tuple (or None)");
        return NULL;
    }
    if (rt != Py_None &&
        (!PyType_Check(rt) || !PyType_IsSubtype((PyTypeObject *)rt, &RequestType))) {
        PyErr_SetString(PyExc_TypeError,
                        "request_type must be a subclass of capbus._core.Request (or None)");
        return NULL;
    }
    PyTypeObject *new_mt = mt == Py_None ? NULL : (PyTypeObject *)mt;
    PyTypeObject *new_rt = rt == Py_None ? &RequestType : (PyTypeObject *)rt;
    Py_XINCREF(new_mt);
    Py_INCREF(new_rt);
    Py_XSETREF(msg_type, new_mt);
    Py_XSETREF(req_type, new_rt);
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------------
 * Module-level helpers for the kernel (and tests).
 * ------------------------------------------------------------------------------------------- */

static int parse_geometry(PyObject *args, PyObject *kw, const char *fmt, uint64_t *n, uint64_t *a)
{
    static char *kwlist[] = {"nslots", "arena_size", NULL};
    unsigned long long nn = DEFAULT_NSLOTS, aa = DEFAULT_ARENA_SIZE;
    if (!PyArg_ParseTupleAndKeywords(args, kw, fmt, kwlist, &nn, &aa))
        return -1;
    if (check_geometry(nn, aa) < 0)
        return -1;
    *n = nn;
    *a = aa;
    return 0;
}

static PyObject *py_channel_size(PyObject *self, PyObject *args, PyObject *kw)
{
    uint64_t n, a;
    if (parse_geometry(args, kw, "|KK:channel_size", &n, &a) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(channel_size(n, a));
}

static PyObject *py_channel_layout(PyObject *self, PyObject *args, PyObject *kw)
{
    uint64_t n, a;
    if (parse_geometry(args, kw, "|KK:channel_layout", &n, &a) < 0)
        return NULL;
    uint64_t rq = REQ_RING_OFF, rs = resp_ring_off(n);
    return Py_BuildValue(
        "{sKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsK}", "size", channel_size(n, a), "nslots", n,
        "arena_size", a, "ring_size", ring_size(n), "cancel_below",
        (unsigned long long)CHAN_CANCEL_BELOW_OFF, "refused", (unsigned long long)CHAN_REFUSED_OFF,
        "resp_consumer_event", rs + RING_CONSUMER_EVENT_OFF, "req_ring", rq, "req_tail", rq + RING_TAIL_OFF,
        "req_head", rq + RING_HEAD_OFF, "req_arena_released", rq + RING_ARENA_RELEASED_OFF,
        "req_slots", rq + RING_SLOTS_OFF, "resp_ring", rs, "resp_tail", rs + RING_TAIL_OFF,
        "resp_head", rs + RING_HEAD_OFF, "resp_consumer_sleeping",
        rs + RING_CONSUMER_SLEEPING_OFF, "resp_arena_released", rs + RING_ARENA_RELEASED_OFF,
        "resp_slots", rs + RING_SLOTS_OFF, "req_arena", req_arena_off(n), "resp_arena",
        resp_arena_off(n, a), "cstats", (unsigned long long)CHAN_CSTATS_OFF, "sstats",
        (unsigned long long)CHAN_SSTATS_OFF);
}

/* latency_clock() -> str: what a call's round trip for the metrics is measured with. */
static PyObject *py_latency_clock(PyObject *self, PyObject *unused)
{
    static const char *names[] = {"monotonic", "monotonic (tsc rate not measured yet)", "tsc"};
    return PyUnicode_FromString(names[tsc_state]);
}

static PyObject *py_resp_ring_off(PyObject *self, PyObject *arg)
{
    unsigned long long n = PyLong_AsUnsignedLongLong(arg);
    if (n == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (check_geometry(n, MIN_ARENA_SIZE) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(resp_ring_off(n));
}

static PyObject *py_max_payload(PyObject *self, PyObject *arg)
{
    unsigned long long a = PyLong_AsUnsignedLongLong(arg);
    if (a == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (check_geometry(DEFAULT_NSLOTS, a) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(max_payload_for(a));
}

/* A memfd sealed against shrinking and growing. `extra` adds seals: F_SEAL_SEAL for channels
 * (nobody may add seals later: a client adding F_SEAL_FUTURE_WRITE before the server maps the
 * channel would make add() fail), none for pages (the kernel seals a control page with
 * F_SEAL_FUTURE_WRITE once it has mapped it). */
static int new_sealed_memfd(const char *name, uint64_t size, int extra)
{
    int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        return -1;
    if (ftruncate(fd, (off_t)size) < 0 ||
        fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | extra) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

static PyObject *py_create_channel(PyObject *self, PyObject *args, PyObject *kw)
{
    uint64_t n, a;
    if (parse_geometry(args, kw, "|KK:create_channel", &n, &a) < 0)
        return NULL;
    int fd = new_sealed_memfd("capbus-channel", channel_size(n, a), F_SEAL_SEAL);
    if (fd < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    /* The informational header. pwrite, not a mapping: only the first page is touched. */
    unsigned char hdr[24];
    uint64_t magic = CHAN_MAGIC, asz = a;
    uint32_t ver = CHAN_VERSION, ns = (uint32_t)n;
    memcpy(hdr + CHAN_MAGIC_OFF, &magic, 8);
    memcpy(hdr + CHAN_VERSION_OFF, &ver, 4);
    memcpy(hdr + CHAN_NSLOTS_OFF, &ns, 4);
    memcpy(hdr + CHAN_ARENA_SIZE_OFF, &asz, 8);
    if (pwrite(fd, hdr, sizeof hdr, 0) != (ssize_t)sizeof hdr) {
        int e = errno;
        close(fd);
        errno = e;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(fd);
}

static PyObject *py_create_page(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"name", NULL};
    const char *name = "capbus-page";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|s:create_page", kwlist, &name))
        return NULL;
    int fd = new_sealed_memfd(name, PAGE_SIZE_, 0);
    if (fd < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(fd);
}

/* wake_lane(chan, nslots=256) -> int: futex_wake the response-tail word of a channel, i.e. every
 * client blocked in call() on it, after the kernel changed its control page. `chan` is the
 * channel memfd (int) or any buffer mapping the channel from offset 0 (at least up to the
 * response ring header). */
static PyObject *py_wake_lane(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"chan", "nslots", NULL};
    PyObject *chan;
    unsigned long long n = DEFAULT_NSLOTS;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|K:wake_lane", kwlist, &chan, &n))
        return NULL;
    if (check_geometry(n, MIN_ARENA_SIZE) < 0)
        return NULL;
    uint64_t off = resp_ring_off(n) + RING_TAIL_OFF;
    int r;
    if (PyLong_Check(chan)) {
        int fd = (int)PyLong_AsLong(chan);
        if (fd == -1 && PyErr_Occurred())
            return NULL;
        size_t len = (size_t)round_up_u64(off + 8, PAGE_SIZE_);
        void *p = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED)
            return PyErr_SetFromErrno(PyExc_OSError);
        r = sys_futex_wake((const uint32_t *)((char *)p + off), INT_MAX);
        munmap(p, len);
    } else {
        Py_buffer view;
        void *w;
        if (get_word(chan, &view, (Py_ssize_t)off, 4, 0, &w) < 0)
            return NULL;
        r = sys_futex_wake((const uint32_t *)w, INT_MAX);
        PyBuffer_Release(&view);
    }
    if (r < 0) {
        errno = -r;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(r);
}

/* Copy n u64 out of a buffer the peer may write: RELAXED atomic loads when aligned (each value
 * untorn), else a plain copy (a torn number is still just a number). */
static void load_u64s(uint64_t *dst, const char *src, size_t n)
{
    if ((uintptr_t)src % 8 == 0) {
        for (size_t i = 0; i < n; i++)
            dst[i] = __atomic_load_n((const uint64_t *)src + i, __ATOMIC_RELAXED);
    } else {
        memcpy(dst, src, n * 8);
    }
}

/* The count of the whole second before now, from a (sec_index, sec_count, prev_count) bucket. */
static uint64_t last_second(const uint64_t *blk, uint64_t now_sec)
{
    uint64_t idx = blk[STATS_SEC_INDEX_OFF / 8];
    if (idx == now_sec)
        return blk[STATS_PREV_COUNT_OFF / 8];
    if (idx != UINT64_MAX && idx + 1 == now_sec)
        return blk[STATS_SEC_COUNT_OFF / 8];
    return 0;
}

static int dict_u64(PyObject *d, const char *key, uint64_t v)
{
    PyObject *o = PyLong_FromUnsignedLongLong(v);
    int r = o ? PyDict_SetItemString(d, key, o) : -1;
    Py_XDECREF(o);
    return r;
}

/* channel_stats(buf) -> dict: both metrics blocks of a channel header page, from any buffer of
 * at least CHAN_SSTATS_OFF + SSTATS_SIZE bytes. The numbers are whatever is there (untrusted):
 * nothing is indexed or sized with them. */
static PyObject *py_channel_stats(PyObject *self, PyObject *arg)
{
    Py_buffer v;
    if (PyObject_GetBuffer(arg, &v, PyBUF_SIMPLE) < 0)
        return NULL;
    if ((size_t)v.len < CHAN_SSTATS_OFF + SSTATS_SIZE) {
        PyErr_Format(PyExc_ValueError, "a channel header page has %u bytes, got %zd",
                     CHAN_HEADER_SIZE, v.len);
        PyBuffer_Release(&v);
        return NULL;
    }
    uint64_t c[CSTATS_SIZE / 8], sv[SSTATS_SIZE / 8], refused;
    load_u64s(c, (const char *)v.buf + CHAN_CSTATS_OFF, CSTATS_SIZE / 8);
    load_u64s(sv, (const char *)v.buf + CHAN_SSTATS_OFF, SSTATS_SIZE / 8);
    load_u64s(&refused, (const char *)v.buf + CHAN_REFUSED_OFF, 1);
    PyBuffer_Release(&v);
    /* CLOCK_MONOTONIC, not coarse: the writers' seconds (either clock) are never ahead of it. */
    uint64_t now_sec = now_ns() / 1000000000ull;
    PyObject *d = PyDict_New();
    if (!d)
        return NULL;
    static const struct {
        const char *key;
        int server;
        unsigned off;
    } fields[] = {
        {"sent", 0, CSTATS_SENT_OFF},
        {"bytes_sent", 0, CSTATS_BYTES_SENT_OFF},
        {"calls", 0, CSTATS_CALLS_OFF},
        {"timeouts", 0, CSTATS_TIMEOUTS_OFF},
        {"refused_rate", 0, CSTATS_REFUSED_RATE_OFF},
        {"refused_size", 0, CSTATS_REFUSED_SIZE_OFF},
        {"refused_perm", 0, CSTATS_REFUSED_PERM_OFF},
        {"latency_max_ns", 0, CSTATS_LATENCY_MAX_OFF},
        {"latency_sum_ns", 0, CSTATS_LATENCY_SUM_OFF},
        {"latency_count", 0, CSTATS_LATENCY_COUNT_OFF},
        {"received", 1, SSTATS_RECEIVED_OFF},
        {"bytes_received", 1, SSTATS_BYTES_RECEIVED_OFF},
        {"replies", 1, SSTATS_REPLIES_OFF},
        {"reply_failed", 1, SSTATS_REPLY_FAILED_OFF},
        {"drops_rate", 1, SSTATS_DROPS_RATE_OFF},
        {"drops_bandwidth", 1, SSTATS_DROPS_BANDWIDTH_OFF},
        {"drops_size", 1, SSTATS_DROPS_SIZE_OFF},
        {"drops_expired", 1, SSTATS_DROPS_EXPIRED_OFF},
        {"drops_rights", 1, SSTATS_DROPS_RIGHTS_OFF},
        {"cancelled", 1, SSTATS_CANCELLED_OFF},
    };
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++)
        if (dict_u64(d, fields[i].key, (fields[i].server ? sv : c)[fields[i].off / 8]) < 0)
            goto fail;
    if (dict_u64(d, "refused_wouldblock", refused) < 0 ||
        dict_u64(d, "sent_last_second", last_second(c, now_sec)) < 0 ||
        dict_u64(d, "received_last_second", last_second(sv, now_sec)) < 0)
        goto fail;
    PyObject *hist = PyList_New(STATS_HIST_BUCKETS);
    if (!hist)
        goto fail;
    for (unsigned i = 0; i < STATS_HIST_BUCKETS; i++) {
        PyObject *o = PyLong_FromUnsignedLongLong(c[CSTATS_HIST_OFF / 8 + i]);
        if (!o) {
            Py_DECREF(hist);
            goto fail;
        }
        PyList_SET_ITEM(hist, i, o);
    }
    int r = PyDict_SetItemString(d, "hist", hist);
    Py_DECREF(hist);
    if (r < 0)
        goto fail;
    return d;
fail:
    Py_DECREF(d);
    return NULL;
}

/* prctl(PR_SET_DUMPABLE): here rather than through ctypes, which every capbus process would then
 * import (and load libc through) only for this; os has no prctl. */
static PyObject *py_set_dumpable(PyObject *self, PyObject *arg)
{
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    if (prctl(PR_SET_DUMPABLE, on ? 1 : 0, 0, 0, 0) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *py_dumpable(PyObject *self, PyObject *unused)
{
    int r = prctl(PR_GET_DUMPABLE, 0, 0, 0, 0);
    if (r < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyBool_FromLong(r == 1);
}

static PyObject *py_crc32(PyObject *self, PyObject *args)
{
    Py_buffer view;
    unsigned int value = 0;
    if (!PyArg_ParseTuple(args, "y*|I:crc32", &view, &value))
        return NULL;
    uint32_t c;
    if (view.len >= (Py_ssize_t)NOGIL_COPY_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        c = crc32_update(value, view.buf, (size_t)view.len);
        Py_END_ALLOW_THREADS
    } else {
        c = crc32_update(value, view.buf, (size_t)view.len);
    }
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(c);
}

/* ---------------------------------------------------------------------------------------------
 * Module.
 * ------------------------------------------------------------------------------------------- */

static PyMethodDef core_methods[] = {
    {"futex_wait", (PyCFunction)(void (*)(void))py_futex_wait, METH_VARARGS | METH_KEYWORDS,
     "futex_wait(buf, offset, expected, timeout=None) -> bool\n\n"
     "Sleep on the u32 at buf[offset] while it equals `expected` (shared futex). True if woken\n"
     "or the value differed, False on timeout (seconds; None = forever)."},
    {"futex_wake", (PyCFunction)(void (*)(void))py_futex_wake, METH_VARARGS | METH_KEYWORDS,
     "futex_wake(buf, offset, n=INT_MAX) -> int\n\nWake up to n waiters; returns how many."},
    {"atomic_load_u32", py_atomic_load_u32, METH_VARARGS, "atomic_load_u32(buf, off) -> int"},
    {"atomic_load_u64", py_atomic_load_u64, METH_VARARGS, "atomic_load_u64(buf, off) -> int"},
    {"atomic_store_u32", py_atomic_store_u32, METH_VARARGS, "atomic_store_u32(buf, off, v)"},
    {"atomic_store_u64", py_atomic_store_u64, METH_VARARGS, "atomic_store_u64(buf, off, v)"},
    {"atomic_cas_u32", py_atomic_cas_u32, METH_VARARGS,
     "atomic_cas_u32(buf, off, expected, desired) -> bool"},
    {"atomic_cas_u64", py_atomic_cas_u64, METH_VARARGS,
     "atomic_cas_u64(buf, off, expected, desired) -> bool"},
    {"atomic_add_u64", py_atomic_add_u64, METH_VARARGS,
     "atomic_add_u64(buf, off, v) -> int (old value, wraps modulo 2**64)"},
    {"channel_size", (PyCFunction)(void (*)(void))py_channel_size, METH_VARARGS | METH_KEYWORDS,
     "channel_size(nslots=256, arena_size=128 MiB) -> int: bytes of a channel memfd"},
    {"channel_layout", (PyCFunction)(void (*)(void))py_channel_layout,
     METH_VARARGS | METH_KEYWORDS,
     "channel_layout(nslots=256, arena_size=128 MiB) -> dict of absolute offsets in a channel"},
    {"max_payload", py_max_payload, METH_O, "max_payload(arena_size) -> int"},
    {"latency_clock", py_latency_clock, METH_NOARGS,
     "latency_clock() -> str: 'tsc' when calls time their round trips with the TSC (the kernel's\n"
     "clocksource is the TSC and its rate has been measured), else 'monotonic...'"},
    {"resp_ring_off", py_resp_ring_off, METH_O,
     "resp_ring_off(nslots) -> int: offset of the response ring in a channel (its tail word, at\n"
     "+RING_TAIL_OFF, is what clients futex-wait on; see wake_lane)"},
    {"create_channel", (PyCFunction)(void (*)(void))py_create_channel,
     METH_VARARGS | METH_KEYWORDS,
     "create_channel(nslots=256, arena_size=128 MiB) -> fd of a new sealed, sized channel memfd"},
    {"create_page", (PyCFunction)(void (*)(void))py_create_page, METH_VARARGS | METH_KEYWORDS,
     "create_page(name='capbus-page') -> fd of a new sealed 4096-byte memfd (control page or "
     "doorbell)"},
    {"wake_lane", (PyCFunction)(void (*)(void))py_wake_lane, METH_VARARGS | METH_KEYWORDS,
     "wake_lane(chan, nslots=256) -> int: wake clients blocked on a channel (chan: memfd or "
     "buffer mapping the channel from offset 0)"},
    {"crc32", py_crc32, METH_VARARGS, "crc32(data, value=0) -> int (same as zlib.crc32)"},
    {"set_dumpable", py_set_dumpable, METH_O,
     "set_dumpable(flag) -> None   prctl(PR_SET_DUMPABLE, flag): with False, processes of the "
     "same uid can no longer ptrace this one, read its /proc/<pid>/mem, open its /proc/<pid>/fd "
     "or take its fds with pidfd_getfd, and it leaves no core dump"},
    {"dumpable", py_dumpable, METH_NOARGS, "dumpable() -> bool   prctl(PR_GET_DUMPABLE) == 1"},
    {"channel_stats", py_channel_stats, METH_O,
     "channel_stats(buf) -> dict: the client and server metrics of a channel header page"},
    {"set_types", py_set_types, METH_VARARGS,
     "set_types(message_type, request_type): call results become message_type (a tuple\n"
     "subclass) instances and received messages request_type (a Request subclass) instances."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT, "capbus._core",
    "capbus native core (see the comment at the top of _core.c).",
    -1, core_methods, NULL, NULL, NULL, NULL,
};

static int add_u64(PyObject *m, const char *name, uint64_t v)
{
    PyObject *o = PyLong_FromUnsignedLongLong(v);
    if (!o || PyModule_AddObject(m, name, o) < 0) {
        Py_XDECREF(o);
        return -1;
    }
    return 0;
}

PyMODINIT_FUNC PyInit__core(void)
{
    crc32_init();
    if (!tsc_state)
        tsc_init();
    if (small_ints_init() < 0)
        return NULL;
    static int atfork_done; /* once per process, however often this module is initialised */
    if (!atfork_done) {
        if (pthread_atfork(wd_lock, wd_unlock, wd_atfork_child) != 0) {
            PyErr_SetString(PyExc_RuntimeError, "pthread_atfork failed");
            return NULL;
        }
        atfork_done = 1;
    }
    PyObject *errors = PyImport_ImportModule("capbus._errors");
    if (!errors)
        return NULL;
    struct {
        PyObject **slot;
        const char *name;
    } errs[] = {
        {&IpcError, "IpcError"},         {&Timeout, "Timeout"},
        {&PeerDied, "PeerDied"},         {&InvalidCapability, "InvalidCapability"},
        {&WouldBlock, "WouldBlock"},     {&MessageTooLarge, "MessageTooLarge"},
        {&ProtocolError, "ProtocolError"}, {&Cancelled, "Cancelled"},
        {&PermissionDenied, "PermissionDenied"}, {&RateLimitExceeded, "RateLimitExceeded"},
        {&KernelUnavailable, "KernelUnavailable"}, {&NoReply, "NoReply"},
    };
    for (size_t i = 0; i < sizeof errs / sizeof errs[0]; i++) {
        *errs[i].slot = PyObject_GetAttrString(errors, errs[i].name);
        if (!*errs[i].slot) {
            Py_DECREF(errors);
            return NULL;
        }
    }
    Py_DECREF(errors);
    struct {
        uint64_t *slot;
        PyObject *cls;
    } codes[] = {
        {&code_invalid_capability, InvalidCapability},
        {&code_message_too_large, MessageTooLarge},
        {&code_rate_limit, RateLimitExceeded},
        {&code_no_reply, NoReply},
    };
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
        PyObject *c = PyObject_GetAttrString(codes[i].cls, "code");
        if (!c)
            return NULL;
        int bad = to_u64(c, codes[i].slot, "error code");
        Py_DECREF(c);
        if (bad < 0)
            return NULL;
    }
    empty_bytes = PyBytes_FromStringAndSize(NULL, 0);
    empty_tuple = PyTuple_New(0);
    if (!empty_bytes || !empty_tuple)
        return NULL;
    CorruptChannel = PyErr_NewExceptionWithDoc(
        "capbus._core.CorruptChannel",
        "A client wrote garbage into its channel. The ServerSet has marked the channel dead and "
        "will not read it again; .index is the channel index, .reason says what was wrong.",
        ProtocolError, NULL);
    if (!CorruptChannel)
        return NULL;
    MessageType.tp_base = &PyTuple_Type;
    if (PyType_Ready(&MessageType) < 0 || PyType_Ready(&LaneType) < 0 ||
        PyType_Ready(&ServerSetType) < 0 ||
        PyType_Ready(&RequestType) < 0 || PyType_Ready(&ZBufType) < 0 ||
        PyType_Ready(&EndpointBaseType) < 0 || PyType_Ready(&ServiceBaseType) < 0)
        return NULL;
    struct {
        PyObject **slot;
        const char *s;
    } names[] = {
        {&str_call_slow, "_call_slow"},         {&str_send_async_slow, "_send_async_slow"},
        {&str_recv_slow, "_recv_slow"},         {&str_thread_core, "_thread_core"},
        {&str_remote_error, "_remote_error"},   {&str_claim, "_claim"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (!(*names[i].slot = PyUnicode_InternFromString(names[i].s)))
            return NULL;
    if (!(int_zero = PyLong_FromLong(0)))
        return NULL;
    released_view = PyMemoryView_FromMemory((char *)"", 0, PyBUF_READ);
    if (!released_view)
        return NULL;
    PyObject *rel = PyObject_CallMethod(released_view, "release", NULL);
    if (!rel)
        return NULL;
    Py_DECREF(rel);
    if (!req_type) {
        Py_INCREF(&RequestType);
        req_type = &RequestType;
    }

    PyObject *m = PyModule_Create(&core_module);
    if (!m)
        return NULL;
    Py_INCREF(CorruptChannel);
    Py_INCREF(&LaneType);
    Py_INCREF(&ServerSetType);
    Py_INCREF(&RequestType);
    Py_INCREF(&MessageType);
    if (PyModule_AddObject(m, "Message", (PyObject *)&MessageType) < 0 ||
        PyModule_AddObject(m, "CorruptChannel", CorruptChannel) < 0 ||
        PyModule_AddObject(m, "Lane", (PyObject *)&LaneType) < 0 ||
        PyModule_AddObject(m, "ServerSet", (PyObject *)&ServerSetType) < 0 ||
        PyModule_AddObject(m, "Request", (PyObject *)&RequestType) < 0)
        goto fail;
    Py_INCREF(&EndpointBaseType);
    Py_INCREF(&ServiceBaseType);
    if (PyModule_AddObject(m, "EndpointBase", (PyObject *)&EndpointBaseType) < 0 ||
        PyModule_AddObject(m, "ServiceBase", (PyObject *)&ServiceBaseType) < 0)
        goto fail;

    static const struct {
        const char *name;
        uint64_t v;
    } consts[] = {
#define C(x) {#x, (uint64_t)(x)}
        C(CTRL_SIZE), C(CTRL_STATE_OFF), C(CTRL_GENERATION_OFF), C(CTRL_EXPIRY_OFF),
        C(CTRL_MAX_MESSAGE_SIZE_OFF), C(CTRL_RATE_LIMIT_OFF), C(CTRL_BANDWIDTH_OFF),
        C(CTRL_RIGHTS_OFF), C(CTRL_FLAGS_OFF), C(CTRL_SENDER_ID_OFF), C(CTRL_F_ENFORCE),
        C(CTRL_CAP_ID_OFF), C(CTRL_CHAIN_LEN_OFF), C(CTRL_CHAIN_OFF), C(CTRL_CHAIN_ENTRY_SIZE),
        C(CTRL_CHAIN_MAX), C(BUCKET_IDLE_MAX),
        C(RIGHT_SEND), C(RIGHT_RECEIVE), C(RIGHT_SHARE), C(RIGHT_MAP), C(RIGHT_READ),
        C(RIGHT_WRITE),
        C(STATE_OPEN), C(STATE_REVOKED), C(STATE_PEER_DEAD), C(STATE_CLOSED),
        C(DOORBELL_SIZE), C(DB_SEQ_OFF), C(DB_SERVER_SLEEPING_OFF), C(DB_EVENT_WANTED_OFF),
        C(DB_SERVER_SPINS_OFF),
        C(DB_BITMAP_OFF),
        C(MAX_CHANNELS),
        C(CHAN_HEADER_SIZE), C(CHAN_MAGIC_OFF), C(CHAN_VERSION_OFF), C(CHAN_NSLOTS_OFF),
        C(CHAN_ARENA_SIZE_OFF), C(CHAN_CANCEL_BELOW_OFF), C(CHAN_REFUSED_OFF), C(CHAN_MAGIC),
        C(CHAN_VERSION), C(RING_TAIL_OFF), C(RING_HEAD_OFF), C(RING_CONSUMER_SLEEPING_OFF),
        C(RING_CONSUMER_EVENT_OFF),
        C(RING_ARENA_RELEASED_OFF), C(RING_SLOTS_OFF), C(REQ_RING_OFF),
        C(DEFAULT_NSLOTS), C(MIN_NSLOTS), C(MAX_NSLOTS), C(DEFAULT_ARENA_SIZE),
        C(MIN_ARENA_SIZE), C(MAX_ARENA_SIZE),
        C(SLOT_SIZE), C(SMALL_MESSAGE_SIZE),
        {"SLOT_CAPABILITY_OFF", offsetof(slot_t, capability)},
        {"SLOT_OPCODE_OFF", offsetof(slot_t, opcode)},
        {"SLOT_FLAGS_OFF", offsetof(slot_t, flags)},
        {"SLOT_DATA_OFF", offsetof(slot_t, data)},
        {"SLOT_TAG_OFF", offsetof(slot_t, tag)},
        {"SLOT_PAYLOAD_LEN_OFF", offsetof(slot_t, payload_len)},
        {"SLOT_PAYLOAD_OFF_OFF", offsetof(slot_t, payload_off)},
        C(FLAG_LARGE), C(FLAG_CHECKSUM), C(FLAG_REPLY_EXPECTED), C(FLAG_ERROR), C(FLAG_LOANED), C(FLAG_IPC_ERROR),
        C(FLAG_USER_MASK), C(FLAG_KNOWN_MASK), C(ZC_THRESHOLD), {"TRANSFER_FLAG", RT_TRANSFER_FLAG},
        {"OBJECT_FLAG", RT_OBJECT_FLAG},
        C(CHAN_CSTATS_OFF), C(CSTATS_SENT_OFF), C(CSTATS_BYTES_SENT_OFF), C(CSTATS_CALLS_OFF),
        C(CSTATS_TIMEOUTS_OFF), C(CSTATS_REFUSED_RATE_OFF), C(CSTATS_REFUSED_SIZE_OFF),
        C(CSTATS_REFUSED_PERM_OFF), C(CSTATS_LATENCY_MAX_OFF), C(CSTATS_LATENCY_SUM_OFF),
        C(CSTATS_LATENCY_COUNT_OFF), C(CSTATS_SEC_INDEX_OFF), C(CSTATS_SEC_COUNT_OFF),
        C(CSTATS_PREV_COUNT_OFF), C(CSTATS_HIST_OFF), C(CSTATS_SIZE), C(STATS_HIST_BUCKETS),
        C(STATS_HIST_BASE_NS), C(STATS_SEC_INDEX_OFF), C(STATS_SEC_COUNT_OFF),
        C(STATS_PREV_COUNT_OFF),
        C(CHAN_SSTATS_OFF), C(SSTATS_RECEIVED_OFF), C(SSTATS_BYTES_RECEIVED_OFF),
        C(SSTATS_REPLIES_OFF), C(SSTATS_REPLY_FAILED_OFF), C(SSTATS_DROPS_RATE_OFF),
        C(SSTATS_DROPS_BANDWIDTH_OFF), C(SSTATS_DROPS_SIZE_OFF), C(SSTATS_DROPS_EXPIRED_OFF),
        C(SSTATS_DROPS_RIGHTS_OFF), C(SSTATS_CANCELLED_OFF), C(SSTATS_SEC_INDEX_OFF),
        C(SSTATS_SEC_COUNT_OFF), C(SSTATS_PREV_COUNT_OFF), C(SSTATS_SIZE),
        C(LARGE_MSG_SIZE), C(LM_CAPABILITY_OFF), C(LM_OPCODE_OFF), C(LM_FLAGS_OFF),
        C(LM_TOTAL_SIZE_OFF), C(LM_CHECKSUM_OFF), C(LM_PAD_OFF), C(LM_REGION_BASE_OFF),
        C(LM_REGION_SIZE_OFF), C(LM_REGION_PERMISSIONS_OFF), C(LM_REGION_CACHE_POLICY_OFF),
        C(LM_INLINE_OFF), C(LM_INLINE_SIZE), C(REGION_PERM_READ), C(CHUNK_ALIGN),
        C(WAIT_SPIN), C(WAIT_ADAPTIVE), C(WAIT_BLOCK), C(DEFAULT_SPIN_NS),
        C(SLEEP_CAP_NS), C(SLICE_NS), C(FULL_SCAN_NS), C(BATCH_MAX),
        {"DEFAULT_RESP_RING_OFF", REQ_RING_OFF + RING_SLOTS_OFF + DEFAULT_NSLOTS * SLOT_SIZE},
        {"RESP_TAIL_OFF", REQ_RING_OFF + RING_SLOTS_OFF + DEFAULT_NSLOTS * SLOT_SIZE + RING_TAIL_OFF},
#undef C
    };
    for (size_t i = 0; i < sizeof consts / sizeof consts[0]; i++)
        if (add_u64(m, consts[i].name, consts[i].v) < 0)
            goto fail;
    PyObject *magic = PyBytes_FromStringAndSize("CAPBUSC1", 8);
    if (!magic || PyModule_AddObject(m, "CHAN_MAGIC_BYTES", magic) < 0) {
        Py_XDECREF(magic);
        goto fail;
    }
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
